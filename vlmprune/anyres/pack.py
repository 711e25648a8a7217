"""LLaVA-NeXT packing on device (jit-friendly): keep masks over the tile tokens -> packed visual slots.

A visual pruner on NeXT returns a :class:`vlmprune.prune.Selection` over each image's tile-token table (T·N); the
functions here turn it into the tokens the LLM receives, in the layout's order (:class:`vlmprune.types.NextLayout`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlmprune.types import NextLayout

Array = jax.Array


def selection_mask(indices: Array, valid: Array, size: int) -> Array:
    """Dense keep mask bool (B, size) from a selection (indices, valid) (B, K) by scatter (O(K), not O(K·size))."""
    b = indices.shape[0]
    idx = jnp.where(valid, indices, size)
    return jnp.zeros((b, size + 1), bool).at[jnp.arange(b)[:, None], idx].set(True)[:, :size]


def tiles_to_image_indices(indices: Array, valid: Array, num_tokens: int) -> tuple[Array, Array]:
    """A per-tile selection (NI, T, K) over N tokens -> one per image (NI, T·K) over the T·N tile-token table
    (tile t's token p -> t·N + p), still ascending; invalid slots hold T·N."""
    ni, t, k = indices.shape
    flat = indices + (jnp.arange(t, dtype=indices.dtype) * num_tokens)[None, :, None]
    flat = jnp.where(valid, flat, t * num_tokens).reshape(ni, t * k)
    return flat, valid.reshape(ni, t * k)


def layout_keep(keep: Array, token: Array, row: Array) -> Array:
    """Which entries of the full layout survive: bool (NI, F).

    keep: bool (NI, T·N) tile-token keep mask; token, row: int (NI, F) layout tables. A token entry survives when
    its tile token is kept; a ``-1`` newline when its grid row keeps a token; a ``-3`` newline always; padding
    (``-2``) never.
    """
    ni = token.shape[0]
    is_tok = token >= 0
    tok_keep = jnp.take_along_axis(keep, jnp.maximum(token, 0), axis=1) & is_tok
    n_rows = token.shape[1]  # static bound on the grid-row ids (< F)
    seg = jnp.where(is_tok & (row >= 0), row, n_rows)
    row_has = jnp.zeros((ni, n_rows + 1), jnp.int32).at[jnp.arange(ni)[:, None], seg].max(tok_keep.astype(jnp.int32))
    nl_keep = (token == -1) & (jnp.take_along_axis(row_has, jnp.maximum(row, 0), axis=1) > 0)
    return tok_keep | nl_keep | (token == -3)


def layout_candidates(layout: NextLayout, num_tokens: int) -> Array:
    """bool (NI, T·N): the tile tokens that appear in each image's layout (base tile: all; grid tiles: inside the
    unpad crop; padded tiles: none)."""
    token, tile_valid = layout.token, layout.tile_valid
    ni, t = tile_valid.shape
    m = t * num_tokens
    rows = jnp.arange(ni)[:, None]
    cand = jnp.zeros((ni, m + 1), bool).at[rows, jnp.where(token >= 0, token, m)].set(True)[:, :m]
    return cand & jnp.repeat(tile_valid, num_tokens, axis=1)


def pack(
    embeddings: Array,
    keep: Array,
    newline: Array,
    layout: NextLayout,
    *,
    stride: int,
    appended: Array | None = None,
    appended_valid: Array | None = None,
) -> tuple[Array, Array]:
    """The packed visual block of every image, in layout order, then its appended tokens.

    embeddings (NI, T·N, D) post-projector tile tokens; keep bool (NI, T·N); newline (D,); appended (NI, E, D)
    with appended_valid bool (NI, E) (their valid ones follow the last layout entry, in order).
    Returns (tokens (NI, stride, D), valid bool (NI, stride)); ``stride`` bounds each image's slot count.
    """
    ni, tn, d = embeddings.shape
    keep = keep & jnp.repeat(layout.tile_valid, tn // layout.tile_valid.shape[1], axis=1)
    table = jnp.concatenate([embeddings, jnp.broadcast_to(newline.astype(embeddings.dtype), (ni, 1, d))], axis=1)
    token = layout.token
    entry_keep = layout_keep(keep, token, layout.row)  # (NI, F), layout order
    entry_row = jnp.where((token == -1) | (token == -3), tn, jnp.maximum(token, 0))  # row of `table`
    if appended is not None:
        e = appended.shape[1]
        table = jnp.concatenate([table, appended.astype(table.dtype)], axis=1)
        extra_rows = jnp.broadcast_to(tn + 1 + jnp.arange(e, dtype=entry_row.dtype), (ni, e))
        entry_row = jnp.concatenate([entry_row, extra_rows], axis=1)
        entry_keep = jnp.concatenate([entry_keep, appended_valid], axis=1)
    src = jax.vmap(lambda k: jnp.nonzero(k, size=stride, fill_value=0)[0])(entry_keep)  # ascending = packed order
    valid = jnp.arange(stride)[None] < jnp.sum(entry_keep, axis=1, keepdims=True)
    idx = jnp.take_along_axis(entry_row, src, axis=1)
    return jnp.take_along_axis(table, idx[..., None], axis=1), valid
