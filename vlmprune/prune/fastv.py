"""FastV (ECCV'24) inside the LLM, as an in-LLM pruner: a decoder hook that drops visual tokens after a layer.

After decoder layer ``layer - 1`` the hook ranks each row's visual tokens by the head-mean attention of the last
real token (that layer's queries and keys, RoPE applied) and keeps the ``keep`` best; the decoder runs the later
layers on the kept slots with their original positions (in-place variant, gaps kept). With a KV cache the
selection is made once at prefill and decoding attends to the kept set in the later layers (docs/methods.md §5.2).

On LLaVA-OneVision (Qwen2 decoder; [PROPOSED], the original patches LLaMA only) the image span is the packed block
(base, grid, newlines), whose length ``V`` depends on the image, so rows of a batch differ: each row keeps
``floor(keep_ratio·V)`` of its own visual tokens, and the dropped ones are masked out of every later layer (keys
and cache) instead of being removed: the logits of the kept tokens are the in-place variant's, the compute saving
of removal is not realised on OneVision yet.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from vlmprune import checks
from vlmprune.prune import ops
from vlmprune.prune.base import LLMPruner, register

Array = jax.Array


def last_token_attention(q: Array, k: Array, key_mask: Array) -> Array:
    """Head-mean softmax attention of each row's last real query over all keys.

    q (B, T, H, D) with RoPE applied, k (B, T, KVH, D), key_mask bool (B, T) -> float32 (B, T).
    """
    b, t, h, d = q.shape
    last = t - 1 - jnp.argmax(key_mask[:, ::-1], axis=1)
    ql = q[jnp.arange(b), last].astype(jnp.float32)  # (B, H, D)
    kk = jnp.repeat(k.astype(jnp.float32), h // k.shape[2], axis=2)  # (B, T, H, D)
    logits = jnp.einsum("bhd,bthd->bht", ql, kk) * d**-0.5
    logits = jnp.where(key_mask[:, None, :], logits, -jnp.inf)
    return ops.head_mean(jax.nn.softmax(logits, axis=-1))  # torch's mean over heads: its order, divided exactly


def fastv_keep(scores: Array, visual: Array, *, keep: int, num_visual: int) -> Array:
    """Slots kept after FastV's layer: all non-visual slots and the ``keep`` best visual ones, ascending.

    scores float (B, T), visual bool (B, T) -> int32 (B, T - num_visual + keep). Ties: lower slot first.
    """
    t = scores.shape[1]

    def row(s, vis):
        (vis_idx,) = jnp.nonzero(vis, size=num_visual)
        (txt_idx,) = jnp.nonzero(~vis, size=t - num_visual)
        _, top = jax.lax.top_k(s[vis_idx], keep)
        return jnp.sort(jnp.concatenate([txt_idx, vis_idx[top]])).astype(jnp.int32)

    return jax.vmap(row)(scores, visual)


def fastv_drop_per_row(scores: Array, real: Array, *, ratio: float) -> Array:
    """FastV's choice on rows with different numbers of visual tokens: bool (B, T), True at the visual slots a
    row drops.

    scores float (B, T); real bool (B, T) marks each row's real visual slots (V_b of them). Row ``b`` keeps its
    ``floor(ratio·V_b)`` best (ties: lower slot first) and drops the rest. The floor is taken in float32.
    """
    n_real = jnp.sum(real, axis=1, dtype=jnp.int32)  # (B,)
    k_row = jnp.floor(jnp.float32(ratio) * n_real.astype(jnp.float32)).astype(jnp.int32)
    key = jnp.where(real, scores.astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(-key, axis=1, stable=True)  # real slots by score, the rest after
    rank = jnp.argsort(order, axis=1, stable=True)
    return real & (rank >= k_row[:, None])


@flax.struct.dataclass
class FastVHook:
    """The decoder hook: before decoder layer ``layer`` keep ``keep`` of the ``num_visual`` visual slots of each
    row (``visual`` bool (B, T) marks them, exactly ``num_visual`` per row) and every other slot."""

    visual: Array
    layer: int = flax.struct.field(pytree_node=False, default=2)
    keep: int = flax.struct.field(pytree_node=False, default=288)
    num_visual: int = flax.struct.field(pytree_node=False, default=576)
    #: None: a fixed ``keep`` per row (LLaVA-1.5); else the ratio applied per row to its real visual tokens (keep and
    #: num_visual unused)
    per_row_ratio: float | None = flax.struct.field(pytree_node=False, default=None)

    def __call__(self, q: Array, k: Array, key_mask: Array) -> Array:
        """q (B, T, H, D), k (B, T, KVH, D) of layer ``layer - 1``; key_mask bool (B, T) -> int32 (B, T')."""
        scores = last_token_attention(q, k, key_mask)
        if self.per_row_ratio is not None:  # every slot stays; the dropped ones are masked (see module docstring)
            drop = fastv_drop_per_row(scores, self.visual & key_mask, ratio=self.per_row_ratio)
            b, t = key_mask.shape
            return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), ~drop
        return fastv_keep(scores, self.visual & key_mask, keep=self.keep, num_visual=self.num_visual)


@register
@dataclasses.dataclass(frozen=True)
class FastV(LLMPruner):
    """FastV (ECCV'24), inside the LLM: after decoder layer ``layer`` keep ``int(keep_ratio·N)`` visual tokens per
    image, ranked by the head-mean attention of the last prompt token at layer ``layer - 1`` (see the module
    docstring)."""

    layer: int = 2
    keep_ratio: float = 0.5
    name: ClassVar[str] = "fastv"
    supports_onevision: ClassVar[bool] = True

    def kept_per_image(self, cfg) -> int:
        return int(self.keep_ratio * cfg.tokens_per_image)

    def check(self, cfg):
        n = cfg.tokens_per_image
        checks.check_int("layer", self.layer, lo=1, hi=cfg.text.num_hidden_layers - 1, where=self.name)
        checks.check_float("keep_ratio", self.keep_ratio, lo=0.0, hi=1.0, lo_open=True, where=self.name)
        if self.kept_per_image(cfg) < 1:
            raise ValueError(f"fastv: keep_ratio={self.keep_ratio} keeps int({n}·ratio) = 0 visual tokens")

    def decoder_hook(self, cfg, visual: Array, images_per_row: int) -> FastVHook:
        if cfg.model_type == "llava_onevision":  # variable packed length per image: the ratio applies per row
            if images_per_row != 1:
                raise ValueError(f"fastv on LLaVA-OneVision takes one image or video per prompt, got {images_per_row}")
            return FastVHook(
                visual=visual, layer=self.layer, keep=0, num_visual=0, per_row_ratio=float(self.keep_ratio)
            )
        n = cfg.tokens_per_image
        return FastVHook(
            visual=visual,
            layer=self.layer,
            keep=self.kept_per_image(cfg) * images_per_row,
            num_visual=n * images_per_row,
        )
