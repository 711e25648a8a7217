"""LLaMA / Mistral decoder (flax.linen) with a preallocated KV cache, matching HF ``LlamaForCausalLM``; the
``llama`` and ``mistral`` families (config, module, weight and sharding rules).

Layout conventions:
  * the cache holds ``k`` and ``v``, one (B, kv_heads, S, head_dim) array per layer; slot ``s`` of a row is the
    ``s``-th position of the assembled (possibly padded) sequence;
  * ``key_mask`` (B, S) marks slots holding real tokens; padding slots (left padding, masked pruning slots) are
    never attended to;
  * RoPE positions are passed explicitly (B, T): they count only real tokens, so a pruned or padded sequence
    gets exactly the contiguous positions HF computes from ``cumsum(attention_mask) - 1``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vlmprune.io.weights import Rules, identity, transpose
from vlmprune.models.attention import attention, cached_attention
from vlmprune.models.family import TEXT, Family
from vlmprune.sharding import ShardingRules

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()  # sorted (key, value) items of HF's rope parameters other than rope_theta
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v and o_proj (HF's ``attention_bias``)
    qkv_bias: bool = False  # biases on q/k/v only, none on o_proj (Qwen2); HF's LLaMA configs never set it
    mlp_bias: bool = False
    hidden_act: str = "silu"

    @classmethod
    def from_hf(cls, c) -> LlamaConfig:
        rope = dict(getattr(c, "rope_parameters", None) or {})
        legacy = getattr(c, "rope_scaling", None)
        if not rope and legacy:
            rope = dict(legacy)
        theta = rope.pop("rope_theta", getattr(c, "rope_theta", 10000.0))
        if rope.get("type") and not rope.get("rope_type"):
            rope["rope_type"] = rope.pop("type")
        rope.pop("type", None)
        if rope.get("rope_type", "default") == "default":
            rope = {}
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=c.rms_norm_eps,
            max_position_embeddings=c.max_position_embeddings,
            rope_theta=float(theta),
            rope_scaling=tuple(sorted((k, _freeze(v)) for k, v in rope.items())),
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(c, "attention_bias", False)),
            mlp_bias=bool(getattr(c, "mlp_bias", False)),
            hidden_act=getattr(c, "hidden_act", "silu"),
        )

    def rope(self) -> tuple[np.ndarray, float]:
        """(inv_freq float32 (head_dim/2,), attention_scaling) for this config's RoPE variant."""
        return rope_frequencies(self.head_dim, self.rope_theta, dict(self.rope_scaling), self.max_position_embeddings)


def _freeze(v):
    return tuple(v) if isinstance(v, list) else v


def rope_powers(theta: float, dim: int) -> np.ndarray:
    """``theta ** (2i / dim)`` for ``i < dim / 2`` as float32 (dim/2,), the exponent rounded to float32 as HF does.

    The power is evaluated in float64 and rounded once, i.e. correctly rounded for these arguments. HF evaluates it
    with torch's float32 ``pow``, which is within one float32 ulp of that (it agrees on almost every entry);
    NumPy's float32 ``pow`` differed from both by one ulp on up to 14 of 64 entries.
    """
    exponent = (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)).astype(np.float64)
    return (np.float64(theta) ** exponent).astype(np.float32)


def rope_frequencies(dim: int, theta: float, scaling: dict, max_positions: int) -> tuple[np.ndarray, float]:
    """Inverse RoPE frequencies for HF's rope types "default", "linear", "dynamic", "llama3" and "yarn".

    Computed in float32 like HF, except that ``theta ** (2i / dim)`` is rounded once from float64 (see
    :func:`rope_powers`). "dynamic" (NTK) equals the default inside ``max_position_embeddings``; the model refuses
    sequences beyond that for this type (see ``LlamaForCausalLM``).
    """
    kind = scaling.get("rope_type", "default")
    inv = (np.float32(1.0) / rope_powers(theta, dim)).astype(np.float32)
    if kind in ("default", "dynamic"):
        return inv, 1.0
    if kind == "linear":
        return (inv / np.float32(scaling["factor"])).astype(np.float32), 1.0
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, out).astype(np.float32), 1.0
    if kind == "yarn":
        factor = scaling["factor"]
        old = scaling.get("original_max_position_embeddings") or max_positions
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
        mscale = scaling.get("attention_factor")
        if mscale is None:
            mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

        def corr(rot):
            return (dim * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(theta))

        lo = math.floor(corr(beta_fast)) if scaling.get("truncate", True) else corr(beta_fast)
        hi = math.ceil(corr(beta_slow)) if scaling.get("truncate", True) else corr(beta_slow)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1)
        extra = 1 - ramp
        pos = rope_powers(theta, dim)
        inv_e, inv_i = np.float32(1.0) / pos, np.float32(1.0) / (np.float32(factor) * pos)
        return (inv_i * (1 - extra) + inv_e * extra).astype(np.float32), float(mscale)
    raise ValueError(f"unsupported rope_type {kind!r} (supported: default, linear, dynamic, llama3, yarn)")


@flax.struct.dataclass
class KVCache:
    """Preallocated cache. k, v: one (B, kv_heads, S, head_dim) array per layer (a tuple), heads-first so that a
    decode step reads each layer's keys as (B·kv_heads) contiguous (S, head_dim) matrices (no per-step transpose),
    and one buffer per layer so that each step's in-place write touches only that layer (slices of one stacked
    array made XLA:CPU copy the whole cache); key_mask: bool (B, S) real slots.

    ``late_mask`` (B, S) is the key mask of layers >= ``late_from`` (a decoder hook dropped tokens there); it
    equals ``key_mask`` when nothing is dropped inside the LLM.
    """

    k: Array
    v: Array
    key_mask: Array
    late_mask: Array
    late_from: int = flax.struct.field(pytree_node=False, default=0)

    @classmethod
    def zeros(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype) -> KVCache:
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        m = jnp.zeros((batch, max_len), bool)
        layers = range(cfg.num_hidden_layers)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in layers),
            v=tuple(jnp.zeros(shape, dtype) for _ in layers),
            key_mask=m,
            late_mask=m,
            late_from=cfg.num_hidden_layers,
        )

    @property
    def nbytes(self) -> int:
        return int(sum(a.size * a.dtype.itemsize for a in (*self.k, *self.v)))


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return w.astype(self.dtype) * xf.astype(self.dtype)


def rope_tables(positions: Array, inv_freq: Array, scaling: float, dtype) -> tuple[Array, Array]:
    """cos / signed-sin tables of HF's rotate_half RoPE for int positions (B, T) -> two (B, T, 1, head_dim).

    ``cos = [cos f, cos f] * scaling`` and ``sin_signed = [-sin f, sin f] * scaling`` with ``f = positions * inv_freq``.
    Computed once per forward and shared by every layer. The halves are laid out by a small exact matmul
    (entries 0 and +-1): XLA does not fuse a matmul into its consumers, whereas it would fuse sin/cos into each
    layer's per-element RoPE loop and evaluate them once per *head* (607 tokens, 16 heads: 4.9 -> 0.9 ms per layer
    on CPU).
    """
    half = inv_freq.shape[-1]
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    cos_sin = jnp.concatenate([jnp.cos(freqs), jnp.sin(freqs)], axis=-1) * scaling  # (B, T, head_dim)
    eye, zero = np.eye(half, dtype=np.float32), np.zeros((half, half), np.float32)
    layout = np.block([[eye, eye, zero, zero], [zero, zero, -eye, eye]])  # -> [cos, cos | -sin, sin]
    tables = jnp.matmul(cos_sin, jnp.asarray(layout), precision=jax.lax.Precision.HIGHEST).astype(dtype)
    return tables[:, :, None, : 2 * half], tables[:, :, None, 2 * half :]


def apply_rope(x: Array, rope: tuple[Array, Array]) -> Array:
    """x (B, T, H, D) rotated by :func:`rope_tables` ``(cos, sin_signed)``, each (B, T, 1, D); HF's rotate_half
    convention: ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``."""
    cos, sin_signed = rope
    half = x.shape[-1] // 2
    return x * cos + jnp.concatenate([x[..., half:], x[..., :half]], axis=-1) * sin_signed


class LlamaAttention(nn.Module):
    cfg: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, rope, mask, kv=None, write_at=None):
        """x (B,T,D); rope: :func:`rope_tables` at this call's positions; mask bool (B,1,T,S_att).

        kv: None (attend to this call's own keys, prefill) or (k_cache, v_cache), this layer's caches (B,KVH,S,hd):
        the new keys are written at (:, :, write_at) in place and the whole cache is attended.
        Returns (out, (k, v), q): the updated caches, or this call's keys (B,T,KVH,hd).
        """
        c = self.cfg
        b, t, _ = x.shape
        qkv_bias = c.attention_bias or c.qkv_bias
        dense = lambda n, name: nn.Dense(n, use_bias=qkv_bias, dtype=self.dtype, name=name)  # noqa: E731
        q = dense(c.num_attention_heads * c.head_dim, "q_proj")(x).reshape(b, t, c.num_attention_heads, c.head_dim)
        k = dense(c.num_key_value_heads * c.head_dim, "k_proj")(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = dense(c.num_key_value_heads * c.head_dim, "v_proj")(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv is None:
            out = attention(q, k, v, mask=mask, causal=True)  # prefill: `mask` is _prefill_mask's (causal)
        else:
            kc, vc = kv
            heads_first = lambda a, c: jnp.swapaxes(a, 1, 2).astype(c.dtype)  # noqa: E731
            kc = jax.lax.dynamic_update_slice(kc, heads_first(k, kc), (0, 0, write_at, 0))
            vc = jax.lax.dynamic_update_slice(vc, heads_first(v, vc), (0, 0, write_at, 0))
            out = cached_attention(q, kc.astype(q.dtype), vc.astype(q.dtype), mask=mask)
            k, v = kc, vc
        out = nn.Dense(c.hidden_size, use_bias=c.attention_bias, dtype=self.dtype, name="o_proj")(
            out.reshape(b, t, c.num_attention_heads * c.head_dim)
        )
        return out, (k, v), q


class LlamaMLP(nn.Module):
    cfg: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dense = lambda n, name: nn.Dense(n, use_bias=c.mlp_bias, dtype=self.dtype, name=name)  # noqa: E731
        h = jax.nn.silu(dense(c.intermediate_size, "gate_proj")(x)) * dense(c.intermediate_size, "up_proj")(x)
        return dense(c.hidden_size, "down_proj")(h)


class LlamaDecoderLayer(nn.Module):
    cfg: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, rope, mask, kv=None, write_at=None):
        h = RMSNorm(self.cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        h, kv_out, q = LlamaAttention(self.cfg, self.dtype, name="self_attn")(
            h, rope=rope, mask=mask, kv=kv, write_at=write_at
        )
        x = x + h
        h = RMSNorm(self.cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        return x + LlamaMLP(self.cfg, self.dtype, name="mlp")(h), kv_out, q


class LlamaForCausalLM(nn.Module):
    """Decoder + LM head. Param tree: embed_tokens, layers_{i}, norm, lm_head (absent when tied)."""

    cfg: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.cfg
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype)
        self.layers = [LlamaDecoderLayer(c, self.dtype, name=f"layers_{i}") for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype)

    def embed(self, input_ids: Array) -> Array:
        """int (B, T) -> (B, T, D)."""
        return self.embed_tokens(input_ids)

    def logits(self, h: Array) -> Array:
        """Final hidden (B, T, D) -> float32 logits (B, T, V)."""
        h = self.norm(h)
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.attend(h).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def _rope(self, positions: Array, dtype) -> tuple[Array, Array]:
        inv, scale = self.cfg.rope()
        return rope_tables(positions, jnp.asarray(inv), scale, dtype)

    def __call__(
        self,
        inputs_embeds: Array,
        positions: Array,
        key_mask: Array,
        cache: KVCache | None = None,
        hook=None,
        last_only: bool = False,
    ):
        """Prefill: run the whole sequence and (optionally) fill the cache from slot 0.

        inputs_embeds (B, T, D); positions int32 (B, T); key_mask bool (B, T) real tokens.
        hook: None, or a pytree with a static ``layer`` (>= 1) and ``hook(q, k, key_mask) -> int32 (B, T')`` (an
          in-LLM pruner's ``decoder_hook``): before that layer it gets the previous layer's queries and keys
          (RoPE applied) and returns the slots kept from there on, ascending, or ``(slots, valid bool (B, T'))``
          where ``valid`` False masks a kept slot out of the later layers. The shorter sequence keeps its
          original positions; the cache keeps all slots and masks the dropped ones for the later layers.
        last_only: apply the LM head only at each row's last real token (generation's prefill): logits (B, 1, V).
        Returns (logits float32 (B, T', V), mask bool (B, T'), cache); T' = T unless the hook dropped tokens.
        """
        x = inputs_embeds
        rope = self._rope(positions, x.dtype)
        b, t = key_mask.shape
        slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # cache slot of every sequence entry
        late_from = self.cfg.num_hidden_layers if hook is None else hook.layer
        if not 1 <= late_from <= self.cfg.num_hidden_layers:
            raise ValueError(f"decoder hook layer {late_from} must be in [1, {self.cfg.num_hidden_layers}]")
        kv_early, kv_late = [], []
        full_key_mask = key_mask
        mask = _prefill_mask(key_mask)
        q = k = None  # the previous layer's queries and keys, read by the hook
        for i, layer in enumerate(self.layers):
            if i == late_from:
                keep = hook(q, k, key_mask)
                keep, keep_valid = keep if isinstance(keep, tuple) else (keep, None)

                def take(a, keep=keep):
                    return jnp.take_along_axis(a, keep.reshape(keep.shape + (1,) * (a.ndim - 2)), axis=1)

                x, positions, key_mask, slots = take(x), take(positions), take(key_mask), keep
                if keep_valid is not None:  # slots the hook keeps in place but masks out from here on
                    key_mask = key_mask & keep_valid
                mask = _prefill_mask(key_mask)
                rope = self._rope(positions, x.dtype)
            x, (k, v), q = layer(x, rope=rope, mask=mask)
            (kv_early if i < late_from else kv_late).append((k, v))
        if last_only:
            last = key_mask.shape[1] - 1 - jnp.argmax(key_mask[:, ::-1], axis=1)
            x = x[jnp.arange(b), last][:, None]
        logits = self.logits(x)
        if cache is not None:
            cache = _fill_cache(cache, kv_early, kv_late, slots, full_key_mask, key_mask, late_from)
        return logits, key_mask, cache

    def decode_step(self, token_embeds: Array, positions: Array, cache: KVCache, slot: Array):
        """One token per row. token_embeds (B, 1, D); positions (B, 1); slot: int32 scalar cache index.

        Returns (logits float32 (B, 1, V), cache with the token written at ``slot``).
        """
        b = token_embeds.shape[0]
        one = jnp.ones((b, 1), bool)
        key_mask = jax.lax.dynamic_update_slice(cache.key_mask, one, (0, slot))
        late_mask = jax.lax.dynamic_update_slice(cache.late_mask, one, (0, slot))
        x = token_embeds
        rope = self._rope(positions, x.dtype)
        k, v = list(cache.k), list(cache.v)
        for i, layer in enumerate(self.layers):
            m = (key_mask if i < cache.late_from else late_mask)[:, None, None, :]
            x, (k[i], v[i]), _ = layer(x, rope=rope, mask=m, kv=(k[i], v[i]), write_at=slot)
        return self.logits(x), KVCache(
            k=tuple(k), v=tuple(v), key_mask=key_mask, late_mask=late_mask, late_from=cache.late_from
        )


def _prefill_mask(key_mask: Array) -> Array:
    """Causal & key-padding mask (B, 1, T, T); a padding query sees itself so its row is never empty."""
    t = key_mask.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return (causal[None, None] & key_mask[:, None, None, :]) | jnp.eye(t, dtype=bool)[None, None]


def _fill_cache(cache: KVCache, kv_early, kv_late, slots, full_mask, kept_mask, late_from: int) -> KVCache:
    """Write prefill keys/values from slot 0: layers < late_from hold every slot; later layers (after the hook)
    hold only the kept slots ``slots`` (B, T'), and their key mask ``late_mask`` excludes the dropped ones."""
    b, t = full_mask.shape
    # written sequence-major (layers, B, S, KVH, hd), then stored heads-first (prefill-time copies only)
    k, v = jnp.swapaxes(jnp.stack(cache.k), 2, 3), jnp.swapaxes(jnp.stack(cache.v), 2, 3)
    rows = jnp.arange(b)[:, None]
    if kv_early:
        ke = jnp.stack([a for a, _ in kv_early]).astype(k.dtype)  # (early, B, T, KVH, D)
        ve = jnp.stack([c for _, c in kv_early]).astype(v.dtype)
        k = jax.lax.dynamic_update_slice(k, ke, (0, 0, 0, 0, 0))
        v = jax.lax.dynamic_update_slice(v, ve, (0, 0, 0, 0, 0))
    if kv_late:
        kl = jnp.stack([a for a, _ in kv_late]).astype(k.dtype)  # (late, B, T', KVH, D)
        vl = jnp.stack([c for _, c in kv_late]).astype(v.dtype)
        k = k.at[late_from:, rows, slots].set(kl)
        v = v.at[late_from:, rows, slots].set(vl)
    key_mask = jax.lax.dynamic_update_slice(cache.key_mask, full_mask, (0, 0))
    late_mask = jnp.zeros_like(cache.key_mask).at[rows, slots].set(kept_mask)
    k, v = jnp.swapaxes(k, 2, 3), jnp.swapaxes(v, 2, 3)
    return KVCache(k=tuple(k), v=tuple(v), key_mask=key_mask, late_mask=late_mask, late_from=late_from)


# ---------------------------------------------------------------------------------------------- weights, sharding


def weight_rules(
    src: str = "model.",
    dst: str = "",
    lm_head: str = "lm_head.",
    *,
    biased: str = "q_proj|k_proj|v_proj|o_proj",
    mlp_bias: bool = True,
) -> Rules:
    """``(regex over the HF key, param path template, transform)`` for one LLaMA-style decoder.

    Args:
      src: HF prefix of the decoder body (``"model."`` for ``*ForCausalLM``).
      dst: param-path prefix of the decoder in the caller's tree (``""`` = root).
      lm_head: HF prefix of the LM head.
      biased: the attention projections (regex alternatives) that may carry a bias.
      mlp_bias: whether the MLP projections may carry a bias.

    A bias outside those has no rule, so a checkpoint holding one reports it as an unexpected tensor.
    """
    s, d = re.escape(src), dst
    layer = s + r"layers\.(\d+)\."
    mlp = "gate_proj|up_proj|down_proj"
    rules = [
        (s + r"embed_tokens\.weight", f"{d}embed_tokens/embedding", identity),
        (s + r"norm\.weight", f"{d}norm/weight", identity),
        (layer + r"self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight", d + r"layers_\1/self_attn/\2/kernel", transpose),
        (layer + rf"self_attn\.({biased})\.bias", d + r"layers_\1/self_attn/\2/bias", identity),
        (layer + rf"mlp\.({mlp})\.weight", d + r"layers_\1/mlp/\2/kernel", transpose),
    ]
    if mlp_bias:
        rules.append((layer + rf"mlp\.({mlp})\.bias", d + r"layers_\1/mlp/\2/bias", identity))
    return [
        *rules,
        (layer + r"(input_layernorm|post_attention_layernorm)\.weight", d + r"layers_\1/\2/weight", identity),
        (re.escape(lm_head) + r"weight", f"{d}lm_head/kernel", transpose),
    ]


# HF ``LlamaForCausalLM`` keys -> :class:`LlamaForCausalLM` params.
WEIGHT_RULES: Rules = weight_rules()

# Tensor parallel over heads and MLP width (Megatron style); the vocabulary splits the embedding and the LM head.
SHARDING_RULES: ShardingRules = [
    (r"layers_\d+/self_attn/(q_proj|k_proj|v_proj)/kernel", (None, "model")),
    (r"layers_\d+/self_attn/(q_proj|k_proj|v_proj)/bias", ("model",)),
    (r"layers_\d+/mlp/(gate_proj|up_proj)/kernel", (None, "model")),
    (r"layers_\d+/mlp/(gate_proj|up_proj)/bias", ("model",)),
    (r"layers_\d+/(self_attn/o_proj|mlp/down_proj)/kernel", ("model", None)),
    (r"embed_tokens/embedding", ("model", None)),
    (r"lm_head/kernel", (None, "model")),
]

FAMILY = Family(
    name="LLaMA",
    kind=TEXT,
    config=LlamaConfig,
    module=LlamaForCausalLM,
    weight_rules=WEIGHT_RULES,
    sharding_rules=SHARDING_RULES,
    tied=("lm_head/kernel", "embed_tokens/embedding"),
)
