"""Qwen2 decoder (flax.linen), matching HF ``Qwen2ForCausalLM``; the language model of LLaVA-OneVision.

Qwen2 is the LLaMA decoder with three differences, all of them held in this family's config:
  * the q/k/v projections carry a bias, the output projection does not (``qkv_bias``, which the LLaMA
    attention reads; LLaMA's own ``attention_bias`` puts a bias on all four);
  * grouped-query attention is the rule (OV-0.5B: 14 query / 2 key-value heads; OV-7B: 28 / 4);
  * the 0.5B checkpoint ties the LM head to the token embedding; the 7B one does not.
The modules are the LLaMA ones, reused through their public names: RoPE (rotate-half, 1-D positions, θ from the
config), RMSNorm (float32 variance), the attention, the SwiGLU MLP, the preallocated heads-first
:class:`~vlmprune.models.text.llama.KVCache` and the prefill / decode contract (explicit positions that count only
real tokens, a key mask for padding slots, FastV's in-LLM drop). :class:`Qwen2ForCausalLM` is a
:class:`~vlmprune.models.text.llama.LlamaForCausalLM` on a :class:`Qwen2Config`, so ``__call__`` (prefill) and
``decode_step`` are the same code.

Also in this file: the HF-key -> param-path table (:func:`weight_rules`, the style of ``vlmprune.io.weights``) and the
tensor-parallel partition rules (:data:`SHARDING_RULES`, the style of ``vlmprune.sharding``).

Sliding-window attention (``use_sliding_window``) is not implemented; the Qwen2 checkpoints LLaVA-OneVision uses
do not enable it, and a config that does is refused by :meth:`Qwen2Config.from_hf`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from transformers import AutoConfig

from vlmprune.io.weights import Rules, load_params
from vlmprune.models.family import TEXT, Family
from vlmprune.models.text.llama import SHARDING_RULES as LLAMA_SHARDING_RULES
from vlmprune.models.text.llama import LlamaConfig, LlamaForCausalLM, rope_frequencies
from vlmprune.models.text.llama import weight_rules as llama_weight_rules
from vlmprune.sharding import ShardingRules

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Static Qwen2 hyper-parameters (hashable: a static argument of jitted functions).

    The defaults are Qwen2-0.5B-Instruct's (the text model of LLaVA-OneVision-0.5B, whose vocabulary the HF
    conversion grew to 152000).
    """

    vocab_size: int = 152000
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rope_scaling: tuple = ()  # sorted (key, value) items of HF's rope parameters other than rope_theta
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"

    def __post_init__(self):
        where = "Qwen2Config"
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where}: {name} must be a positive int, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{where}: num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"{where}: head_dim must be even for rotate-half RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"{where}: rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"{where}: rope_theta must be > 0, got {self.rope_theta!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"{where}: hidden_act {self.hidden_act!r} is not supported (Qwen2's MLP uses 'silu')")

    # Read by the shared LLaMA modules: biases on q/k/v only (none on o_proj), none in the MLP.
    attention_bias = False
    qkv_bias = True
    mlp_bias = False

    @classmethod
    def from_hf(cls, c) -> Qwen2Config:
        """From a ``transformers.Qwen2Config`` (or a LLaVA-OneVision ``text_config``).

        Raises ValueError, naming the field, for a config this port would not reproduce: another model_type,
        sliding-window attention switched on, an activation other than SiLU.
        """
        mt = getattr(c, "model_type", "qwen2")
        if mt != "qwen2":
            raise ValueError(f"Qwen2Config.from_hf: model_type must be 'qwen2', got {mt!r}")
        if getattr(c, "use_sliding_window", False):
            raise ValueError(
                "Qwen2Config.from_hf: use_sliding_window=True is not supported (sliding-window "
                "attention is not implemented; the LLaVA-OneVision checkpoints do not use it)"
            )
        types = set(getattr(c, "layer_types", None) or ())
        if types - {"full_attention"}:
            raise ValueError(
                f"Qwen2Config.from_hf: layer_types {sorted(types)} are not supported (only 'full_attention')"
            )
        # the rope / head-dim reading is the LLaMA one (HF's rope_parameters, legacy rope_scaling)
        ll = LlamaConfig.from_hf(c)
        return cls(
            vocab_size=ll.vocab_size,
            hidden_size=ll.hidden_size,
            intermediate_size=ll.intermediate_size,
            num_hidden_layers=ll.num_hidden_layers,
            num_attention_heads=ll.num_attention_heads,
            num_key_value_heads=ll.num_key_value_heads,
            head_dim=ll.head_dim,
            rms_norm_eps=float(ll.rms_norm_eps),
            max_position_embeddings=ll.max_position_embeddings,
            rope_theta=ll.rope_theta,
            rope_scaling=ll.rope_scaling,
            tie_word_embeddings=ll.tie_word_embeddings,
            hidden_act=ll.hidden_act,
        )

    def rope(self) -> tuple[np.ndarray, float]:
        """(inv_freq float32 (head_dim/2,), attention_scaling) for this config's RoPE variant."""
        return rope_frequencies(self.head_dim, self.rope_theta, dict(self.rope_scaling), self.max_position_embeddings)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 decoder + LM head. Param tree: embed_tokens, layers_{i}, norm, lm_head (absent when tied).

    Prefill (``__call__``), ``decode_step``, ``embed`` and ``logits`` are LLaMA's (see the module docstring);
    build the cache with ``KVCache.zeros(cfg, batch, max_len, dtype)``.
    """

    cfg: Qwen2Config
    dtype: Any = jnp.float32

    def forward_ids(self, input_ids: Array, positions: Array, key_mask: Array, cache=None, last_only: bool = False):
        """Prefill from token ids (a text-only sequence): ``embed`` then ``__call__``; same returns.

        input_ids int (B, T); positions int32 (B, T); key_mask bool (B, T). Also the init method that creates
        every param (``__call__`` alone never touches an untied model's embedding).
        """
        return self(self.embed(input_ids), positions, key_mask, cache, last_only=last_only)


# --- weights: HF key -> param path ---------------------------------------------------------------------------


def weight_rules(src: str = "model.", dst: str = "", lm_head: str = "lm_head.") -> Rules:
    """``(regex over the HF key, param path template, transform)`` for one Qwen2 decoder.

    Args:
      src: HF prefix of the decoder body: ``"model."`` for ``Qwen2ForCausalLM``, ``"model.language_model."`` for
        LLaVA-OneVision (transformers >= 4.52 layout).
      dst: param-path prefix of the decoder, e.g. ``"language_model/"`` inside a LLaVA param tree.
      lm_head: HF prefix of the LM head (``"lm_head."`` in both layouts).

    There is deliberately no rule for an ``o_proj`` bias or MLP biases: a checkpoint holding one is reported as an
    unexpected tensor instead of being dropped. A tied model has no ``lm_head`` param, so a stored
    ``lm_head.weight`` is reported too.
    """
    return llama_weight_rules(src, dst, lm_head, biased="q_proj|k_proj|v_proj", mlp_bias=False)


def load(directory: str, *, dtype=jnp.float32) -> tuple[Qwen2Config, Qwen2ForCausalLM, dict]:
    """A HF ``Qwen2ForCausalLM`` directory (``config.json`` + safetensors) -> (config, module, params).

    The config is read with transformers' ``AutoConfig`` (HF's defaults for absent fields); params are built from
    ``jax.eval_shape`` and filled through :func:`weight_rules`, in ``dtype``.

    Raises:
      ValueError: the config is not a supported Qwen2 (see :meth:`Qwen2Config.from_hf`).
      vlmprune.io.weights.CheckpointError: every missing, unexpected or mis-shaped tensor, in one error.
    """
    cfg = Qwen2Config.from_hf(AutoConfig.from_pretrained(directory, local_files_only=True))
    module = Qwen2ForCausalLM(cfg, dtype=dtype)
    one = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), one, one, one.astype(bool), method=Qwen2ForCausalLM.forward_ids)
    )["params"]
    return cfg, module, load_params(directory, shapes, weight_rules(), dtype=dtype)


# --- sharding: param path -> PartitionSpec dims over the mesh axis "model" --------------------------------------

#: Megatron-style tensor parallelism (the rule format of ``vlmprune.sharding.RULES``): q/k/v and gate/up split
#: their output features (column-parallel; the q/k/v biases with them), o_proj and down_proj their input features
#: (row-parallel), the embedding its vocabulary rows, an untied LM head its vocabulary columns. With GQA the k/v
#: width is ``kv_heads · head_dim`` (128 on OV-0.5B): a mesh whose size does not divide it leaves k/v replicated.
SHARDING_RULES: ShardingRules = LLAMA_SHARDING_RULES  # its MLP-bias rule matches nothing in a Qwen2 tree

# HF ``Qwen2ForCausalLM`` keys (``model.*``, ``lm_head.*``) -> :class:`Qwen2ForCausalLM` params.
WEIGHT_RULES: Rules = weight_rules()

FAMILY = Family(
    name="Qwen2",
    kind=TEXT,
    config=Qwen2Config,
    module=Qwen2ForCausalLM,
    weight_rules=WEIGHT_RULES,
    sharding_rules=SHARDING_RULES,
    tied=("lm_head/kernel", "embed_tokens/embedding"),
)
