"""What the CLIP and SigLIP encoder layers have in common: the pre-LN MLP half of a layer
(``x + fc2(act(fc1(layer_norm2(x))))``), the HF-key rules of a layer's weights and its tensor-parallel rules.

Both towers name a layer's parts as HF does (``layer_norm1``, ``self_attn.{q,k,v,out}_proj``, ``layer_norm2``,
``mlp.fc1``, ``mlp.fc2``); the flax param paths drop the ``mlp`` level (``layers_i/fc1``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from vlmprune.io.weights import Rules, identity, transpose
from vlmprune.models.activations import activation
from vlmprune.sharding import ShardingRules

Array = jax.Array


def mlp_residual(x: Array, hidden_size: int, intermediate_size: int, eps: float, act: str, dtype: Any) -> Array:
    """(B, N, D) -> ``x + fc2(act(fc1(layer_norm2(x))))``; called inside a layer's compact ``__call__``, whose
    submodules ``layer_norm2``, ``fc1`` and ``fc2`` it creates."""
    h = nn.LayerNorm(epsilon=eps, dtype=dtype, name="layer_norm2")(x)
    h = nn.Dense(intermediate_size, dtype=dtype, name="fc1")(h)
    h = activation(act)(h)
    h = nn.Dense(hidden_size, dtype=dtype, name="fc2")(h)
    return x + h


# HF ``encoder.layers.i.*`` -> ``layers_i/*`` (both towers).
_LAYER = r"encoder\.layers\.(\d+)\."
ENCODER_RULES: Rules = [
    (_LAYER + r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight", r"layers_\1/self_attn/\2/kernel", transpose),
    (_LAYER + r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.bias", r"layers_\1/self_attn/\2/bias", identity),
    (_LAYER + r"(layer_norm1|layer_norm2)\.weight", r"layers_\1/\2/scale", identity),
    (_LAYER + r"(layer_norm1|layer_norm2)\.bias", r"layers_\1/\2/bias", identity),
    (_LAYER + r"mlp\.(fc1|fc2)\.weight", r"layers_\1/\2/kernel", transpose),
    (_LAYER + r"mlp\.(fc1|fc2)\.bias", r"layers_\1/\2/bias", identity),
]

_COLUMNS = r"layers_\d+/(self_attn/(q_proj|k_proj|v_proj)|fc1)"  # the column-parallel projections

#: Megatron-style tensor parallelism over mesh axis "model": q/k/v and fc1 split their output columns (whole heads
#: when heads divide the axis), out_proj and fc2 their input rows; everything else stays replicated.
ENCODER_SHARDING_RULES: ShardingRules = [
    (_COLUMNS + "/kernel", (None, "model")),
    (_COLUMNS + "/bias", ("model",)),
    (r"layers_\d+/(self_attn/out_proj|fc2)/kernel", ("model", None)),
]
