"""SigLIP vision tower (flax.linen), numerically matching HF transformers' ``SiglipVisionModel``.

The tower LLaVA-OneVision uses (docs/methods.md §9.1.2): a strided patch convolution (with bias) plus a learned
position embedding, no class token and no pre-layernorm; pre-LN encoder layers (``x + attn(LN1(x))``,
``x + fc2(gelu_tanh(fc1(LN2(x))))``) whose q/k/v/out projections all carry biases; then ``post_layernorm`` and,
when the config has ``vision_use_head``, the attention-pooling head. OneVision's image features are the last
layer's output *before* ``post_layernorm`` (HF's ``hidden_states[-1]``), so post-LN and head run only on request.

What a pruning method can ask the tower for (§9.3.9), each only at the layers it names:

* hidden states (HF's ``hidden_states`` numbering: 0 = embeddings, i = output of encoder layer i-1);
* the **received attention** (§9.2): for every head, the attention each token receives averaged over all
  queries, ``r[b, h, j] = mean_i softmax_j(q_i . k_j / sqrt(d))`` -- the signal that replaces the CLS row on a
  tower without CLS. It is accumulated over blocks of queries (:func:`attention_and_received`): a block's
  (queries x N) probabilities are reduced to column sums before the next block is formed, so no N x N map
  per head exists at any time. On a tapped layer the same blocks also give the layer's attention output, so
  the tap costs no second pass over the keys;
* the raw ``k_proj`` / ``q_proj`` outputs (before scaling) of a layer, for methods that score with keys.

Everything else goes through the shared ``vlmprune.models.attention.attention`` (fused on GPU/TPU).

The file also holds the family's tables: :data:`WEIGHT_RULES` (HF key regex -> param path,
:class:`vlmprune.io.weights.Transform`, so the same table loads and exports), :func:`siglip_vision_rules` (the
same table under a key / param prefix), :func:`siglip_vision_renames` (older key layouts),
:data:`SHARDING_RULES` and the :data:`FAMILY` value registered as ``siglip_vision_model`` in
``vlmprune.models.FAMILIES``.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmprune.io.weights import Rules, identity, patch_conv, prefix_rules, transpose
from vlmprune.models.activations import activation
from vlmprune.models.attention import QUERY_BLOCK, attention
from vlmprune.models.family import VISION, Family, fields_from_hf
from vlmprune.models.vit_encoder import ENCODER_RULES, ENCODER_SHARDING_RULES, mlp_residual
from vlmprune.models.vit_taps import resolve_requests, run_layers
from vlmprune.sharding import ShardingRules

Array = jax.Array


# --------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    """Static shape of a SigLIP vision tower. Defaults: LLaVA-OneVision's (so400m-patch14-384, 26 layers,
    no head; §9.1.1); :meth:`from_hf` is the usual way in."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 26
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    use_head: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"SiglipVisionConfig: hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.patch_size > self.image_size:
            raise ValueError(f"SiglipVisionConfig: patch_size {self.patch_size} exceeds image_size {self.image_size}")
        activation(self.hidden_act)  # raises for an activation this port does not implement

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        """Patches per side (27 for OneVision's 384 / 14). Like HF's "valid" convolution, the last
        ``image_size % patch_size`` pixel rows and columns (6 for 384 / 14) fall outside every patch."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per image tile (729 for OneVision); there is no class token."""
        return self.grid**2

    @property
    def num_positions(self) -> int:
        """Tokens the tower outputs: the patches only (no class token)."""
        return self.num_patches

    @classmethod
    def from_hf(cls, c) -> SiglipVisionConfig:
        """From a ``transformers.SiglipVisionConfig`` (or any object with its attribute names)."""
        return fields_from_hf(cls, c, use_head=bool(getattr(c, "vision_use_head", True)))  # HF's default is True


# --------------------------------------------------------------------------------------------------------
# Received attention: streaming column sums over query blocks
# --------------------------------------------------------------------------------------------------------


def _blocked_attention(q: Array, k: Array, v: Array | None, scale: float, block: int):
    """Shared body of :func:`attention_and_received` / :func:`received_attention` (see there).

    ``lax.scan`` over query blocks: the carry is the float32 column sum (B, H, N); one step forms the
    (B, H, block, N) logits of its queries, their float32 softmax over all keys (rows are complete, so each
    row's normalisation is exact), rounds the probabilities to the query dtype as HF's eager attention does,
    adds their masked column sums to the carry and, when ``v`` is given, multiplies them into the block's
    output. The queries are zero-padded to whole blocks; padded rows are excluded from the sums.
    """
    b, n, h, d = q.shape
    block = min(block, n)  # never pad a short sequence up to a long block
    nb = -(-n // block)
    pad = nb * block - n
    qh, kh = jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2)  # (B, H, N, d)
    qb = jnp.pad(qh, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, h, nb, block, d)
    qb = jnp.moveaxis(qb, 2, 0)  # (nb, B, H, block, d)
    rows = (jnp.arange(nb * block) < n).reshape(nb, block).astype(jnp.float32)
    vh = None if v is None else jnp.swapaxes(v, 1, 2)
    sc = jnp.asarray(scale, q.dtype)

    def step(colsum, xs):
        qi, valid = xs
        # HF: (q @ kᵀ) * scale in the query dtype, then softmax in float32, then back to the query dtype.
        s = jnp.einsum("bhtd,bhsd->bhts", qi, kh, preferred_element_type=jnp.float32).astype(q.dtype) * sc
        s = s.astype(jnp.float32)
        e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
        p = (e / jnp.sum(e, axis=-1, keepdims=True)).astype(q.dtype)
        colsum = colsum + jnp.einsum("bhts,t->bhs", p.astype(jnp.float32), valid, precision=jax.lax.Precision.HIGHEST)
        out = None
        if vh is not None:
            out = jnp.einsum("bhts,bhsd->bhtd", p, vh, preferred_element_type=jnp.float32).astype(v.dtype)
        return colsum, out

    colsum, outs = jax.lax.scan(step, jnp.zeros((b, h, n), jnp.float32), (qb, rows))
    # A true division by N, as torch's mean divides the sum. XLA rewrites a division by a broadcast scalar into a
    # multiplication by its reciprocal (up to an ulp off); a full-shape divisor behind a barrier stays a divide.
    received = (colsum / jax.lax.optimization_barrier(jnp.full_like(colsum, n))).astype(q.dtype)
    if outs is None:
        return None, received
    out = jnp.moveaxis(outs, 0, 2).reshape(b, h, nb * block, d)[:, :, :n]  # (B, H, N, d)
    return jnp.swapaxes(out, 1, 2), received


def _check_block(block) -> int:
    if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1:
        raise ValueError(f"received-attention query block must be a positive int, got {block!r}")
    return int(block)


def _check_heads(where: str, **arrays) -> None:
    """(B, N, H, d) arrays of one shape and one floating dtype."""
    shapes = {name: tuple(getattr(a, "shape", ())) for name, a in arrays.items()}
    for name, shape in shapes.items():
        if len(shape) != 4:
            raise ValueError(f"{where}: {name} must have rank 4 (B, N, H, d), got shape {shape}")
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{where}: {', '.join(arrays)} must have one shape, got {shapes}")
    dtypes = {name: a.dtype for name, a in arrays.items()}
    if len(set(dtypes.values())) > 1 or not jnp.issubdtype(next(iter(dtypes.values())), jnp.floating):
        raise ValueError(f"{where}: {', '.join(arrays)} must share one floating dtype, got {dtypes}")


def attention_and_received(
    q: Array, k: Array, v: Array, *, scale: float | None = None, block: int = QUERY_BLOCK
) -> tuple[Array, Array]:
    """Unmasked self-attention and, from the same probabilities, the attention each key receives.

    Args:
      q, k, v: (B, N, H, d), one dtype (the tower's).
      scale: logit scale, default ``d ** -0.5``.
      block: static query-block length; at most ``block x N`` probabilities per head exist at a time.

    Returns:
      ``(out, received)``: out (B, N, H, d) = ``softmax(q kᵀ scale) v`` and received (B, H, N) =
      ``mean over queries`` of those probabilities (HF: ``attentions[L].mean(-2)``), both in q's dtype. The
      probabilities are rounded to q's dtype before either use, as HF's eager attention does.
    """
    _check_heads("attention_and_received", q=q, k=k, v=v)
    block = _check_block(block)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _blocked_attention(q, k, v, scale, block)


def received_attention(q: Array, k: Array, *, scale: float | None = None, block: int = QUERY_BLOCK) -> Array:
    """The attention each token receives, averaged over queries, per head: (B, N, H, d) q, k -> (B, H, N).

    ``r[b, h, j] = (1/N) sum_i softmax_j(q[b, i, h] . k[b, j, h] * scale)`` (docs/methods.md §9.2), streamed over
    query blocks exactly as in :func:`attention_and_received` (same numbers), without the value product. Use it
    on q/k taken from elsewhere (e.g. the raw ``q_proj``/``k_proj`` taps reshaped to heads).
    """
    _check_heads("received_attention", q=q, k=k)
    block = _check_block(block)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _blocked_attention(q, k, None, scale, block)[1]


# --------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------


class SiglipAttention(nn.Module):
    """Multi-head self-attention (biases on q/k/v/out) with the optional received-attention and q/k taps."""

    hidden_size: int
    num_heads: int
    query_block: int = QUERY_BLOCK
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, received: bool = False, keys: bool = False, queries: bool = False):
        """x: (B, N, D). Returns (out (B, N, D), received (B, H, N) or None, raw k (B, N, D) or None,
        raw q (B, N, D) or None); raw = the projection outputs before any scaling."""
        b, n, d = x.shape
        hd = d // self.num_heads

        def dense(name):
            return nn.Dense(d, dtype=self.dtype, name=name)

        q = dense("q_proj")(x)
        k = dense("k_proj")(x)
        v = dense("v_proj")(x)
        q4, k4, v4 = (a.reshape(b, n, self.num_heads, hd) for a in (q, k, v))
        scale = hd**-0.5
        r = None
        if received:
            out, r = _blocked_attention(q4, k4, v4, scale, self.query_block)
        else:
            out = attention(q4, k4, v4, scale=scale)
        out = dense("out_proj")(out.reshape(b, n, d))
        return out, r, (k if keys else None), (q if queries else None)


class SiglipEncoderLayer(nn.Module):
    hidden_size: int
    intermediate_size: int
    num_heads: int
    eps: float
    act: str
    query_block: int = QUERY_BLOCK
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, received=False, keys=False, queries=False):
        h = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="layer_norm1")(x)
        h, r, k, q = SiglipAttention(
            self.hidden_size, self.num_heads, self.query_block, dtype=self.dtype, name="self_attn"
        )(h, received=received, keys=keys, queries=queries)
        x = mlp_residual(x + h, self.hidden_size, self.intermediate_size, self.eps, self.act, self.dtype)
        return x, r, k, q


class SiglipPoolingHead(nn.Module):
    """HF ``SiglipMultiheadAttentionPoolingHead``: one learned probe query attends over all tokens (a torch
    ``nn.MultiheadAttention`` with packed q/k/v weights), then ``h + mlp(layernorm(h))``."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    eps: float
    act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (B, N, D) post-layernorm tokens -> (B, D)."""
        b, n, d = x.shape
        hd = d // self.num_heads
        probe = self.param("probe", nn.initializers.normal(0.02), (1, 1, d)).astype(self.dtype)
        in_proj = nn.Dense(3 * d, dtype=self.dtype, name="in_proj")  # rows of HF's in_proj_weight: q, k, v
        qkv_probe = in_proj(jnp.broadcast_to(probe, (b, 1, d)))
        qkv_x = in_proj(x)
        q = qkv_probe[..., :d].reshape(b, 1, self.num_heads, hd)
        k = qkv_x[..., d : 2 * d].reshape(b, n, self.num_heads, hd)
        v = qkv_x[..., 2 * d :].reshape(b, n, self.num_heads, hd)
        h = attention(q, k, v, scale=hd**-0.5).reshape(b, 1, d)
        h = nn.Dense(d, dtype=self.dtype, name="out_proj")(h)
        y = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="layernorm")(h)
        y = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(y)
        y = nn.Dense(d, dtype=self.dtype, name="fc2")(activation(self.act)(y))
        return (h + y)[:, 0]


def _patches(pixel_values: Array, p: int, g: int) -> Array:
    """(B, C, S, S) pixels -> (B, g*g, C*p*p) flattened (C, p, p) patches in raster order, the input of the patch
    conv as a matmul (kernel layout (C*p*p, D)). HF's stride-p "valid" conv never reads the pixels past g * p."""
    b, ch = pixel_values.shape[:2]
    x = pixel_values[:, :, : g * p, : g * p]
    x = x.reshape(b, ch, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, g * g, ch * p * p)


def check_pixels(pixel_values, config: SiglipVisionConfig) -> None:
    """Static checks of a pixel batch: rank-4 floating (B, C, S, S) with C and S as the config says.

    Positions are never interpolated (OneVision's tiles are exactly ``image_size``), so any other size is an
    error rather than a resize.
    """
    shape = getattr(pixel_values, "shape", None)
    dtype = getattr(pixel_values, "dtype", None)
    where = "SiglipVisionTransformer"
    if shape is None or dtype is None:
        raise ValueError(f"{where}: pixel_values must be an array, got {type(pixel_values).__name__}")
    if len(shape) != 4:
        raise ValueError(f"{where}: pixel_values must have rank 4 (B, C, H, W), got shape {tuple(shape)}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{where}: pixel_values must be a floating dtype (normalised pixels), got {dtype}")
    c, s = config.num_channels, config.image_size
    if shape[1] != c or shape[2] != s or shape[3] != s:
        raise ValueError(
            f"{where}: pixel_values must be (B, {c}, {s}, {s}) for this config "
            f"(image_size {s}, no position interpolation), got {tuple(shape)}"
        )
    if shape[0] < 1:
        raise ValueError(f"{where}: pixel_values has an empty batch, shape {tuple(shape)}")


class SiglipVisionTransformer(nn.Module):
    """SigLIP ViT. Param tree mirrors HF ``SiglipVisionModel`` (see :func:`siglip_vision_rules`).

    Attributes:
      config: the tower's :class:`SiglipVisionConfig`.
      query_block: static query-block length of the received-attention tap (memory: one (B, H, block, N)
        float32 block per tapped layer at a time).
      dtype: compute dtype.
    """

    config: SiglipVisionConfig
    query_block: int = QUERY_BLOCK
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        pixel_values: Array,
        *,
        hidden_state_layers: tuple[int, ...] = (),
        received_attention_layers: tuple[int, ...] = (),
        key_layers: tuple[int, ...] = (),
        query_layers: tuple[int, ...] = (),
        num_layers: int | None = None,
        output_hidden_states: bool = False,
        post_layernorm: bool = False,
    ) -> dict:
        """Run the tower.

        Args:
          pixel_values: float (B, C, S, S), HF's NCHW layout and normalisation, S = ``config.image_size``.
          hidden_state_layers: indices into HF's ``hidden_states`` tuple (0 = embeddings, i = output of encoder
            layer i-1, -1 = the last layer's output before post_layernorm = OneVision's features).
          received_attention_layers: encoder layer indices (0-based, negative allowed) whose received attention
            (per head, mean over queries; module docstring) to return.
          key_layers / query_layers: encoder layer indices whose raw ``k_proj`` / ``q_proj`` outputs to return.
          num_layers: run only the first ``num_layers`` encoder layers (default: as many as the requests need).
          output_hidden_states: return every hidden state (parity tests).
          post_layernorm: run all layers and also return ``last_hidden_state`` = post_layernorm(last output)
            (HF's ``last_hidden_state``) and, if the config has the head, ``pooled`` (HF's ``pooler_output``).

        Returns a dict with
          ``hidden_states``: {hf_index: (B, N, D)} for the requested indices (all if output_hidden_states),
          ``received_attn``: {layer: (B, H, N)} in the compute dtype, ``keys`` / ``queries``:
          {layer: (B, N, D)}, and with post_layernorm ``last_hidden_state`` (B, N, D) (+ ``pooled`` (B, D)).

        Raises:
          ValueError (at trace time, before any compile): pixel_values of the wrong rank, dtype, channel count
            or size; a layer index out of range or not an int; num_layers outside [needed, L].
        """
        c = self.config
        L = c.num_hidden_layers
        check_pixels(pixel_values, c)
        _check_block(self.query_block)
        hs_idx, idx, n_run = resolve_requests(
            "SiglipVisionTransformer",
            L,
            hidden_state_layers,
            {
                "received_attention_layers": received_attention_layers,
                "key_layers": key_layers,
                "query_layers": query_layers,
            },
            num_layers,
            run_all=output_hidden_states or post_layernorm,
        )
        x = _patches(pixel_values, c.patch_size, c.grid).astype(self.dtype)
        x = nn.Dense(c.hidden_size, dtype=self.dtype, name="patch_embedding")(x)
        pos = self.param("position_embedding", nn.initializers.normal(0.02), (c.num_patches, c.hidden_size))
        x = x + pos.astype(self.dtype)[None]

        def make_layer(i):
            return SiglipEncoderLayer(
                c.hidden_size,
                c.intermediate_size,
                c.num_attention_heads,
                c.layer_norm_eps,
                c.hidden_act,
                query_block=self.query_block,
                dtype=self.dtype,
                name=f"layers_{i}",
            )

        flags = {
            "received": idx["received_attention_layers"],
            "keys": idx["key_layers"],
            "queries": idx["query_layers"],
        }
        x, hidden, extras = run_layers(
            self, x, make_layer, L, n_run, hs_idx, flags, output_hidden_states=output_hidden_states
        )
        received, keys, queries = extras["received"], extras["keys"], extras["queries"]
        out = {"hidden_states": hidden, "received_attn": received, "keys": keys, "queries": queries}
        if post_layernorm or self.is_initializing():
            last = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(x)
            out["last_hidden_state"] = last
            if c.use_head:
                out["pooled"] = SiglipPoolingHead(
                    c.hidden_size,
                    c.intermediate_size,
                    c.num_attention_heads,
                    c.layer_norm_eps,
                    c.hidden_act,
                    dtype=self.dtype,
                    name="head",
                )(last)
        return out


# --------------------------------------------------------------------------------------------------------
# Weights and sharding tables
# --------------------------------------------------------------------------------------------------------


def siglip_vision_rules(src: str = "", dst: str = "") -> Rules:
    """:data:`WEIGHT_RULES` under the HF key prefix ``src`` and the param path prefix ``dst``.

    Args:
      src: HF key prefix of the tower in transformers 5.x layout, e.g. ``""`` for a saved ``SiglipVisionModel``
        or ``"model.vision_tower."`` inside LLaVA-OneVision (older layouts: :func:`siglip_vision_renames`).
      dst: param path prefix of the :class:`SiglipVisionTransformer` in the caller's tree (``""`` = root).

    The pooling head's rules (``head.*``) are included; a config without the head has no such params, so a
    checkpoint carrying them is reported as unexpected by the loader.
    """
    return prefix_rules(WEIGHT_RULES, src, dst)


# HF ``SiglipVisionModel`` keys (transformers 5.x layout, no ``vision_model.`` level) -> tower params. The pooling
# head's rules are included; a config without the head has no such params, so a checkpoint carrying them is
# reported as unexpected by the loader.
WEIGHT_RULES: Rules = [
    (r"embeddings\.patch_embedding\.weight", "patch_embedding/kernel", patch_conv),
    (r"embeddings\.patch_embedding\.bias", "patch_embedding/bias", identity),
    (r"embeddings\.position_embedding\.weight", "position_embedding", identity),
    (r"post_layernorm\.weight", "post_layernorm/scale", identity),
    (r"post_layernorm\.bias", "post_layernorm/bias", identity),
    *ENCODER_RULES,
    (r"head\.probe", "head/probe", identity),
    (r"head\.attention\.in_proj_weight", "head/in_proj/kernel", transpose),
    (r"head\.attention\.in_proj_bias", "head/in_proj/bias", identity),
    (r"head\.attention\.out_proj\.weight", "head/out_proj/kernel", transpose),
    (r"head\.attention\.out_proj\.bias", "head/out_proj/bias", identity),
    (r"head\.layernorm\.weight", "head/layernorm/scale", identity),
    (r"head\.layernorm\.bias", "head/layernorm/bias", identity),
    (r"head\.mlp\.(fc1|fc2)\.weight", r"head/\1/kernel", transpose),
    (r"head\.mlp\.(fc1|fc2)\.bias", r"head/\1/bias", identity),
]


def siglip_vision_renames(src: str = "") -> list[tuple[str, str]]:
    """Key renames from older layouts to the one :func:`siglip_vision_rules` reads: transformers 4.x nested the
    tower one level deeper (``{src}vision_model.embeddings...``); 5.x saves ``{src}embeddings...``."""
    s = re.escape(src)
    return [(rf"^{s}vision_model\.", src)]


#: Megatron-style tensor parallelism over mesh axis "model" (same format as ``vlmprune.sharding.RULES``): the
#: q/k/v and fc1 projections split their output columns (whole heads when heads divide the axis), out_proj
#: and fc2 their input rows. Embeddings, norms and the pooling head (one probe token) stay replicated.
SHARDING_RULES: ShardingRules = ENCODER_SHARDING_RULES

SIGLIP_SHARDING_RULES = SHARDING_RULES  # the name the standalone tests used

FAMILY = Family(
    name="SigLIP",
    kind=VISION,
    config=SiglipVisionConfig,
    module=SiglipVisionTransformer,
    weight_rules=WEIGHT_RULES,
    sharding_rules=SHARDING_RULES,
)
