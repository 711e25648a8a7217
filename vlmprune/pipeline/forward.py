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
    that ``selects_per_tile`` selects on the tiles' taps instead, packed by :func:`spatial_tiles`.
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
    if isinstance(layout, PackTables) and p is not None and p.selects_per_tile(cfg):
        return spatial_tiles(flat_emb.reshape(ni, t * n, -1), p.prune(taps, PruneContext(config=cfg)), layout, ctx)
    if isinstance(layout, PackTables):  # OneVision: the official packing; a pruner selects on the packed block
        packed = packed_block(module, params, flat_emb, layout)
        if p is None:
            return packed, layout.valid
        sel = p.prune(VisionTaps(features=packed, embeddings=packed), ctx).selection
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


def packed_block(module: Llava, params, tile_embeddings: Array, tables: PackTables) -> Array:
    """OneVision: HF's packed visual block (NI, V, D) of projected tile tokens (NI·T, N, D) (base, unpadded and
    possibly downsampled grid, a newline per row; ``vlmprune.anyres.onevision.pack_image_features``)."""
    ni, t = tables.tile_valid.shape
    newline = module.apply({"params": params}, method=lambda m: m.image_newline)
    return pack_image_features(tile_embeddings.reshape(ni, t, tile_embeddings.shape[1], -1), newline, tables)


def spatial_tiles(emb: Array, result: PruneResult, tables: PackTables, ctx: PruneContext) -> tuple[Array, Array]:
    """OneVision's spatial-compat layout (docs/methods.md §9.4 mode A) of per-tile selections.

    emb (NI, T·N, D) projected tile tokens; ``result.selection`` (NI·T, K) per tile; ``ctx.aux["spatial_rank"]``
    int32 (NI, T·N) (``vlmprune.anyres.onevision.spatial_ranks``). Returns (tokens (NI, T·K, D), valid (NI, T·K)):
    each image's kept tokens of its own tiles sorted by rank (base in raster order, then the stitched grid in global
    raster order), the padding tiles' slots last and invalid."""
    idx, valid = spatial_order(result, tables, ctx, emb.shape[1] // tables.tile_valid.shape[1])
    return jnp.take_along_axis(emb, idx[..., None], axis=1), valid


def spatial_order(result: PruneResult, tables: PackTables, ctx: PruneContext, n: int) -> tuple[Array, Array]:
    """The tile tokens :func:`spatial_tiles` hands the LLM: (indices int32 (NI, T·K) into each image's T·N tile
    tokens (``tile · n + patch``), in the LLM's order, valid bool (NI, T·K)); n = tokens per tile."""
    ni, t = tables.tile_valid.shape
    sel = result.selection
    k = sel.indices.shape[-1]
    idx = (sel.indices.reshape(ni, t, k) + n * jnp.arange(t, dtype=jnp.int32)[:, None]).reshape(ni, t * k)
    valid = (sel.valid.reshape(ni, t, k) & tables.tile_valid[..., None]).reshape(ni, t * k)
    rank = jnp.take_along_axis(ctx.aux_array("spatial_rank", "spatial-compat layout"), idx, axis=1)
    order = jnp.argsort(jnp.where(valid, rank, jnp.iinfo(jnp.int32).max), axis=1, stable=True)
    return jnp.take_along_axis(idx, order, axis=1), jnp.take_along_axis(valid, order, axis=1)


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
    or (NI, T_max, C, S, S) with ``layout`` (LLaVA-NeXT)."""
    request = tap_request(module.config, pruner).replace(projected=False)  # projected in tokens_from_taps
    pix = pixel_values if layout is None else pixel_values.reshape((-1,) + pixel_values.shape[2:])
    taps = encode(module, params, pix, request)
    return tokens_from_taps(module, params, taps, pruner, layout, aux, stride)


def assemble(module: Llava, params, inputs: DeviceInputs, pruner=None, stride: int | None = None) -> Assembled:
    """Visual tokens merged at the image slots of the text embeddings, with masks and contiguous positions."""
    tokens, valid = visual_tokens(module, params, inputs.pixel_values, pruner, inputs.layout, inputs.aux, stride)
    d = tokens.shape[-1]
    flat_tok = tokens.reshape(-1, d)
    flat_valid = valid.reshape(-1)
    input_ids = inputs.input_ids
    text_emb = module.apply({"params": params}, input_ids, method=Llava.embed)
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
        hook = pruner.decoder_hook(module.config, is_vis, tokens.shape[0] // input_ids.shape[0])
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
