"""The pure, jit-friendly stages of one forward pass, in the order data flows.

    encode   (pixels, TapRequest)            -> VisionTaps
    prune    (VisionTaps, PruneContext)      -> PruneResult           (the pruner's own pure function)
    tokens_from_taps (taps, pruner, layout)  -> tokens (NI, K, D_llm), valid (NI, K)   (LLaVA-1.5 or NeXT packing)
    visual_tokens = encode + tokens_from_taps
    assemble (DeviceInputs, pruner, stride)  -> Assembled(embeds, mask, positions, hook)
    prefill / forward                        -> logits (and a filled KV cache)

Every function takes the ``Llava`` module and its params explicitly; pruners are static (hashable) arguments.
The model never learns which method ran: taps come from the pruner's ``request``, slots from its ``budget``, the
result is a ``PruneResult``, and an in-LLM pruner contributes a decoder hook.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from vlmprune.anyres.onevision import PackTables, pack_image_features
from vlmprune.anyres.pack import pack
from vlmprune.models.llava import Llava
from vlmprune.models.text.llama import KVCache
from vlmprune.pipeline.plan import DeviceInputs
from vlmprune.prune.base import (
    LLMPruner,
    PruneContext,
    VisualPruner,
    image_keep_mask,
    keep_all,
    tokens_for_llm,
)
from vlmprune.prune.selection import Selection
from vlmprune.types import NO_TAPS, ModelOutput, NextLayout, PruneResult, TapRequest, VisionTaps

Array = jax.Array


@flax.struct.dataclass
class Assembled:
    """The decoder's input: embeds (B, L', D), mask bool (B, L') real slots, positions int32 (B, L') and the
    in-LLM pruner's decoder hook (or None)."""

    embeds: Array
    mask: Array
    positions: Array
    hook: object = None


def visual_pruner(pruner) -> VisualPruner | None:
    return pruner if isinstance(pruner, VisualPruner) else None


def tap_request(config, pruner) -> TapRequest:
    """What the tower must compute for ``pruner`` (nothing beyond the features without a visual pruner)."""
    p = visual_pruner(pruner)
    return TapRequest() if p is None else p.request(config)


def project(module: Llava, params, features: Array) -> Array:
    """Multimodal projector: (..., C_vis) -> (..., D_llm)."""
    return module.apply({"params": params}, features, method=Llava.project)


def encode(
    module: Llava,
    params,
    pixel_values: Array,
    request: TapRequest = NO_TAPS,
    *,
    output_hidden_states: bool = False,
) -> VisionTaps:
    """Vision tower on images or tiles (B, C, S, S) with exactly the taps ``request`` names -> VisionTaps
    (``embeddings`` filled when ``request.projected``)."""
    enc = module.apply(
        {"params": params},
        pixel_values,
        method=Llava.encode,
        cls_attention_layers=request.cls_attention_layers,
        received_attention_layers=request.column_mean_layers,
        key_layers=request.key_layers,
        hidden_state_layers=request.hidden_state_layers,
        output_hidden_states=output_hidden_states,
        post_layernorm=request.post_layernorm,
    )
    taps = VisionTaps(
        features=enc["features"],
        feature_hidden=enc["feature_hidden"],
        cls_attn=enc.get("cls_attn", {}),
        column_mean=enc.get("received_attn", {}),
        keys=enc["keys"],
        cls_query=enc.get("cls_query", {}),
        hidden_states=enc["hidden_states"],
        pooled=enc.get("pooled"),
    )
    if request.projected:
        taps = taps.replace(embeddings=project(module, params, taps.features))
    return taps


def prune(pruner, taps: VisionTaps, ctx: PruneContext) -> PruneResult:
    """The visual pruner's result on ``taps``; every token kept without one (or for an in-LLM pruner)."""
    p = visual_pruner(pruner)
    return keep_all(taps, ctx) if p is None else p.prune(taps, ctx)


def tokens_from_taps(
    module: Llava,
    params,
    taps: VisionTaps,
    pruner=None,
    layout: NextLayout | PackTables | None = None,
    aux: dict | None = None,
    stride: int | None = None,
) -> tuple[Array, Array]:
    """Prune and project encoded images: (tokens (NI, K, D_llm), valid bool (NI, K)).

    LLaVA-1.5: taps of NI images, K = the pruner's budget (all tokens without one).
    LLaVA-NeXT: taps of the NI·T tiles (T padded to the largest grid) and ``layout``; kept tile tokens are packed
    in layout order (``vlmprune.anyres.pack``), appended tokens after each image's block, into ``stride`` slots.
    LLaVA-OneVision: ``layout`` is its ``PackTables`` (``vlmprune.anyres.onevision``): HF's packing (base, unpadded
    and possibly downsampled grid, a newline per row), every image's block padded to the tables' length; a pruner
    that ``selects_per_tile`` scores the tiles' taps instead: its kept slots of the packed block (docs/methods.md
    §9.4 mode B, the first ``stride`` of its packed-order selection; the planner's stride bounds every image's kept
    count) or, when it is ``spatial_compat``, its per-tile selections packed by :func:`spatial_tiles` (mode A; or
    :func:`tile_blocks` when it returns merged tokens).
    ``taps.embeddings`` is filled here when the pruner's request asks for it.
    """
    cfg = module.config
    request = tap_request(cfg, pruner)
    ctx = PruneContext(layout=layout, aux=dict(aux or {}), config=cfg)
    if layout is None:
        if request.projected and taps.embeddings is None:
            taps = taps.replace(embeddings=project(module, params, taps.features))
        return tokens_for_llm(prune(pruner, taps, ctx), taps, lambda f: project(module, params, f))
    ni, t = layout.tile_valid.shape
    n = taps.num_tokens
    flat_emb = project(module, params, taps.features)  # (NI·T, N, D): what the LLM receives
    p = visual_pruner(pruner)
    newline = module.apply({"params": params}, method=lambda m: m.image_newline)
    if isinstance(layout, PackTables) and p is not None and p.selects_per_tile(cfg) and p.spatial_compat(cfg):
        res = p.prune(taps, ctx)
        if res.tokens is not None:  # merged tokens: each tile's block in the method's order
            return tile_blocks(res.tokens if res.projected else project(module, params, res.tokens), res, layout)
        return spatial_tiles(flat_emb.reshape(ni, t * n, -1), res, layout, ctx, stride)
    if isinstance(layout, PackTables):  # OneVision: the official packing; a pruner selects slots of the packed block
        packed = packed_block(module, params, flat_emb, layout)
        if p is None:
            return packed, layout.valid
        if p.selects_per_tile(cfg):  # mode B: scored on the tiles' taps, kept slots first in packed order
            sel = p.prune(taps, ctx).selection
            width = sel.indices.shape[1] if stride is None else stride
            return jnp.take_along_axis(packed, sel.indices[:, :width, None], axis=1), sel.valid[:, :width]
        sel = packed_selection(p, packed, taps, ctx)
        return jnp.take_along_axis(packed, sel.indices[..., None], axis=1), sel.valid
    if request.projected:
        taps = taps.replace(embeddings=flat_emb)
    res = prune(pruner, taps, ctx)
    appended = res.appended
    if appended is not None and not res.projected:
        appended = project(module, params, appended)
    return pack(
        flat_emb.reshape(ni, t * n, -1),
        image_keep_mask(res, t * n),
        newline,
        layout,
        stride=stride,
        appended=appended,
        appended_valid=res.appended_valid,
    )


def packed_selection(pruner: VisualPruner, packed: Array, taps: VisionTaps, ctx: PruneContext) -> Selection:
    """LLaVA-OneVision: the pruner's selection on each image's packed block, Selection (NI, K) over its V slots.

    packed (NI, V, D_llm): HF's packing of the projected tiles (``pack_image_features`` with ``ctx.layout``, the
    ``PackTables``); taps: the tiles' own (NI·T tiles), for a method that scores on the tower's outputs (the
    packed-block methods so far read the packed block only)."""
    del taps
    return pruner.prune(VisionTaps(features=packed, embeddings=packed), ctx).selection


def packed_block(module: Llava, params, tile_embeddings: Array, tables: PackTables) -> Array:
    """OneVision: HF's packed visual block (NI, V, D) of projected tile tokens (NI·T, N, D) (base, unpadded and
    possibly downsampled grid, a newline per row; ``vlmprune.anyres.onevision.pack_image_features``)."""
    ni, t = tables.tile_valid.shape
    newline = module.apply({"params": params}, method=lambda m: m.image_newline)
    return pack_image_features(tile_embeddings.reshape(ni, t, tile_embeddings.shape[1], -1), newline, tables)


def spatial_tiles(
    emb: Array, result: PruneResult, tables: PackTables, ctx: PruneContext, stride: int | None = None
) -> tuple[Array, Array]:
    """OneVision's per-tile packings (``vlmprune.anyres.onevision.TILE_PACKINGS``: docs/methods.md §9.4 mode A, or
    the same order inside the unpad crop) of per-tile selections.

    emb (NI, T·N, D) projected tile tokens; ``result.selection`` (NI·T, K) per tile; ``ctx.aux["spatial_rank"]``
    int32 (NI, T·N) (``vlmprune.anyres.onevision.spatial_ranks``; rank -1 = a token the packing drops). Returns
    (tokens (NI, S, D), valid (NI, S)) with S = ``stride`` (default T·K): each image's kept tokens of its own tiles
    sorted by rank (base in raster order, then the stitched grid in global raster order), invalid slots last. A
    stride shorter than T·K must still hold every image's valid tokens (the pruner's budget guarantees it)."""
    idx, valid = spatial_order(result, tables, ctx, emb.shape[1] // tables.tile_valid.shape[1])
    tk = idx.shape[1]
    s = tk if stride is None else stride
    if s > tk:  # pad with invalid slots
        idx = jnp.pad(idx, ((0, 0), (0, s - tk)))
        valid = jnp.pad(valid, ((0, 0), (0, s - tk)))
    idx, valid = idx[:, :s], valid[:, :s]
    return jnp.take_along_axis(emb, idx[..., None], axis=1), valid


def spatial_order(result: PruneResult, tables: PackTables, ctx: PruneContext, n: int) -> tuple[Array, Array]:
    """The tile tokens :func:`spatial_tiles` hands the LLM: (indices int32 (NI, T·K) into each image's T·N tile
    tokens (``tile · n + patch``), in the LLM's order, valid bool (NI, T·K)); n = tokens per tile. A token whose
    rank is -1 (dropped by the packing) is invalid."""
    ni, t = tables.tile_valid.shape
    sel = result.selection
    k = sel.indices.shape[-1]
    idx = (sel.indices.reshape(ni, t, k) + n * jnp.arange(t, dtype=jnp.int32)[:, None]).reshape(ni, t * k)
    valid = (sel.valid.reshape(ni, t, k) & tables.tile_valid[..., None]).reshape(ni, t * k)
    rank = jnp.take_along_axis(ctx.aux_array("spatial_rank", "spatial-compat layout"), idx, axis=1)
    valid = valid & (rank >= 0)
    order = jnp.argsort(jnp.where(valid, rank, jnp.iinfo(jnp.int32).max), axis=1, stable=True)
    return jnp.take_along_axis(idx, order, axis=1), jnp.take_along_axis(valid, order, axis=1)


def tile_blocks(tokens: Array, result: PruneResult, tables: PackTables) -> tuple[Array, Array]:
    """OneVision's spatial-compat layout (docs/methods.md §9.4 mode A) of per-tile *merged* tokens.

    tokens (NI·T, K, D) every tile's tokens as the LLM receives them (``result.tokens``, projected), valid where
    ``result.tokens_valid`` (NI·T, K). Merged tokens have no place on the stitched grid, so each tile's block stays
    whole and in the method's order: the base tile's block, then the grid tiles' blocks in tile order (raster over
    the grid). Returns (tokens (NI, T·K, D), valid (NI, T·K)): each image's valid tokens first, in that order, its
    invalid slots (a method's unused slots, the padding tiles) last."""
    if result.appended is not None:
        raise ValueError(
            "a per-tile OneVision result with merged tokens cannot also append tokens (PruneResult.appended); "
            "put them in each tile's PruneResult.tokens"
        )
    ni, t = tables.tile_valid.shape
    k = tokens.shape[1]
    valid = (result.tokens_valid.reshape(ni, t, k) & tables.tile_valid[..., None]).reshape(ni, t * k)
    order = jnp.argsort(~valid, axis=1, stable=True)  # valid slots first, each group in block order
    tokens = jnp.take_along_axis(tokens.reshape(ni, t * k, -1), order[..., None], axis=1)
    return tokens, jnp.take_along_axis(valid, order, axis=1)


def visual_tokens(
    module: Llava,
    params,
    pixel_values: Array,
    pruner=None,
    layout=None,
    aux: dict | None = None,
    stride: int | None = None,
) -> tuple[Array, Array]:
    """``encode`` with the pruner's request, then ``tokens_from_taps``. pixel_values (NI, C, S, S) (LLaVA-1.5)
    or (NI, T_max, C, S, S) with ``layout`` (LLaVA-NeXT, LLaVA-OneVision; OneVision videos (NV, F, C, S, S) with
    their ``PackTables``)."""
    request = tap_request(module.config, pruner).replace(projected=False)  # projected in tokens_from_taps
    pix = pixel_values if layout is None else pixel_values.reshape((-1,) + pixel_values.shape[2:])
    taps = encode(module, params, pix, request)
    return tokens_from_taps(module, params, taps, pruner, layout, aux, stride)


def assemble(module: Llava, params, inputs: DeviceInputs, pruner=None, stride: int | None = None) -> Assembled:
    """Visual tokens merged at the image (and video) slots of the text embeddings, with masks and contiguous
    positions. The visual table is the images' blocks, then the videos' (LLaVA-OneVision: packed by the same
    ``tokens_from_taps`` with their frames on the tile axis), as the sequence plan numbers the slots."""
    input_ids = inputs.input_ids
    text_emb = module.apply({"params": params}, input_ids, method=Llava.embed)
    blocks = []  # (tokens (N, K, D), valid (N, K)) per kind of visual input
    if inputs.pixel_values is not None:
        blocks.append(visual_tokens(module, params, inputs.pixel_values, pruner, inputs.layout, inputs.aux, stride))
    if inputs.pixel_values_videos is not None:
        blocks.append(visual_tokens(module, params, inputs.pixel_values_videos, pruner, inputs.video_layout))
    d = text_emb.shape[-1]
    if blocks:
        flat_tok = jnp.concatenate([t.reshape(-1, d).astype(text_emb.dtype) for t, _ in blocks])
        flat_valid = jnp.concatenate([v.reshape(-1) for _, v in blocks])
    else:  # no visual input at all: every slot is text (the plan refuses placeholders without inputs)
        flat_tok, flat_valid = jnp.zeros((1, d), text_emb.dtype), jnp.zeros((1,), bool)
    num_items = sum(t.shape[0] for t, _ in blocks)
    vis_src = inputs.vis_src
    is_vis = vis_src >= 0
    rows = jnp.arange(input_ids.shape[0])[:, None]
    t_emb = text_emb[rows, jnp.maximum(inputs.text_src, 0)]
    v_emb = flat_tok[jnp.maximum(vis_src, 0)].astype(t_emb.dtype)
    embeds = jnp.where(is_vis[..., None], v_emb, t_emb)
    mask = jnp.where(is_vis, flat_valid[jnp.maximum(vis_src, 0)], inputs.text_mask)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
    hook = None
    if isinstance(pruner, LLMPruner):
        hook = pruner.decoder_hook(module.config, is_vis, num_items // input_ids.shape[0])
    return Assembled(embeds=embeds, mask=mask, positions=positions, hook=hook)


def decoder_prefill(module: Llava, params, seq: Assembled, *, max_len: int | None = None):
    """The decoder on an assembled sequence. ``max_len`` None: full logits (B, L'', V) and the kept mask;
    else generation's prefill into a fresh cache of ``max_len`` slots: (last logits (B, V), cache, next positions
    (B,))."""
    if max_len is None:
        logits, mask, _ = module.apply(
            {"params": params}, seq.embeds, seq.positions, seq.mask, None, seq.hook, method=Llava.prefill
        )
        return logits, mask
    b = seq.embeds.shape[0]
    next_pos = jnp.sum(seq.mask, axis=1, dtype=jnp.int32)  # positions continue after the real prompt tokens
    cache = KVCache.zeros(module.config.text, b, max_len, seq.embeds.dtype)
    logits, _, cache = module.apply(
        {"params": params}, seq.embeds, seq.positions, seq.mask, cache, seq.hook, True, method=Llava.prefill
    )
    return logits[:, 0], cache, next_pos  # LM head at each row's last real token only


def forward(module: Llava, params, inputs: DeviceInputs, *, pruner=None, stride: int | None = None) -> ModelOutput:
    """Logits over the assembled (optionally pruned) sequence."""
    logits, mask = decoder_prefill(module, params, assemble(module, params, inputs, pruner, stride))
    return ModelOutput(logits=logits, mask=mask)


def prefill(module: Llava, params, inputs: DeviceInputs, *, pruner=None, stride: int | None = None, max_len: int):
    """Prefill into a fresh cache of ``max_len`` slots: (last logits (B, V), cache, next positions (B,))."""
    return decoder_prefill(module, params, assemble(module, params, inputs, pruner, stride), max_len=max_len)
