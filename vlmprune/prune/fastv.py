"""FastV (ECCV'24) inside the LLM, as an in-LLM pruner: a decoder hook that drops visual tokens after a layer.

After decoder layer ``layer - 1`` the hook ranks each row's visual tokens by the head-mean attention of the last
real token (that layer's queries and keys, RoPE applied) and keeps the ``keep`` best; the decoder runs the later
layers on the kept slots with their original positions (in-place variant, gaps kept). With a KV cache the
selection is made once at prefill and decoding attends to the kept set in the later layers (algorithms.md §5.2).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from vlmprune import _checks
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
    return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1)


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


@flax.struct.dataclass
class FastVHook:
    """The decoder hook: before decoder layer ``layer`` keep ``keep`` of the ``num_visual`` visual slots of each
    row (``visual`` bool (B, T) marks them, exactly ``num_visual`` per row) and every other slot."""

    visual: Array
    layer: int = flax.struct.field(pytree_node=False, default=2)
    keep: int = flax.struct.field(pytree_node=False, default=288)
    num_visual: int = flax.struct.field(pytree_node=False, default=576)

    def __call__(self, q: Array, k: Array, key_mask: Array) -> Array:
        """q (B, T, H, D), k (B, T, KVH, D) of layer ``layer - 1``; key_mask bool (B, T) -> int32 (B, T')."""
        scores = last_token_attention(q, k, key_mask)
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

    def num_slots(self, cfg) -> int:
        return cfg.tokens_per_image  # nothing is removed before the LLM

    def kept_per_image(self, cfg) -> int:
        return int(self.keep_ratio * cfg.tokens_per_image)

    def check(self, cfg):
        n = cfg.tokens_per_image
        _checks.check_int("layer", self.layer, lo=1, hi=cfg.text.num_hidden_layers - 1, where=self.name)
        _checks.check_float("keep_ratio", self.keep_ratio, lo=0.0, hi=1.0, lo_open=True, where=self.name)
        if self.kept_per_image(cfg) < 1:
            raise ValueError(f"fastv: keep_ratio={self.keep_ratio} keeps int({n}·ratio) = 0 visual tokens")

    def decoder_hook(self, cfg, visual: Array, images_per_row: int) -> FastVHook:
        n = cfg.tokens_per_image
        return FastVHook(visual=visual, layer=self.layer, keep=self.kept_per_image(cfg) * images_per_row,
                         num_visual=n * images_per_row)
