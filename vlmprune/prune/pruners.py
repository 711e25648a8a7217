"""The built-in visual pruners: frozen (hashable) settings that connect the pure selection functions to the
model through the ``VisualPruner`` protocol (``vlmprune.prune.base``). FastV lives in ``vlmprune.prune.fastv``.

Layer indices are CLIP encoder layers, 0-based (negative allowed). ``None`` means "the layer that produced
LLaVA's features" (``vision_feature_layer``; layer 22 of CLIP-L/14-336 for LLaVA-1.5's -2), which is the layer
VisPruner, FasterVLM and HiRED's selection stage read in the originals.

On LLaVA-NeXT ``prune`` receives the taps of all NI·T tiles (T padded to the largest grid) and returns a
selection per image over its T·N tile tokens (``vlmprune.prune.base.per_image``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from vlmprune import checks
from vlmprune.anyres.geometry import hero_valid_mask
from vlmprune.anyres.layout import reference_pinpoints
from vlmprune.anyres.onevision import PackTables
from vlmprune.anyres.pack import layout_candidates
from vlmprune.prune.base import (
    LAYOUTS,
    Budget,
    HostInputs,
    HostNeeds,
    PruneContext,
    VisualPruner,
    check_keep,
    per_image,
    register,
    resolve_layer,
)
from vlmprune.prune.baselines import (
    divprune,
    divprune_masked,
    prumerge_plus,
    random_keep,
    uniform,
    visionzip,
    visionzip_dominant,
    visionzip_no_cls,
)
from vlmprune.prune.hero import hero_padded
from vlmprune.prune.hired import HiredSelection, hired_allocation, hired_batched, hired_single
from vlmprune.prune.onevision_grid import (
    grid_host_arrays,
    grid_values,
    listed_keep,
    pack_tile_values,
    packed_selection,
    top_count,
    uniform_grid_table,
)
from vlmprune.prune.ops import head_mean
from vlmprune.prune.selection import Selection
from vlmprune.prune.vispruner import fastervlm, vispruner, vispruner_masked, vispruner_masked_plans
from vlmprune.prune.vispruner_siglip import siglip_score, vispruner_siglip
from vlmprune.types import PruneResult, TapRequest, VisionTaps

Array = jax.Array


class _NextLayout:
    """LLaVA-NeXT packing: ``layout="official"`` (HF's: unpadded, a newline after every row that keeps a token) or
    ``"reference"``, the method paper's own layout (docs/methods.md §1.4), for like-for-like comparisons."""

    #: layout style of the method's own paper, see ``vlmprune.anyres.STYLES``
    reference_style: ClassVar[str] = "official"
    #: True when the paper forces VisPruner's fixed 2x2 canvas (672x672 for 336-px tiles)
    reference_fixed_canvas: ClassVar[bool] = False

    def layout_style(self, cfg):
        if self.layout not in LAYOUTS:
            raise ValueError(f"{self.name}: layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout == "official":
            return "official", cfg.image_grid_pinpoints
        pins = reference_pinpoints(cfg.vision.image_size) if self.reference_fixed_canvas else cfg.image_grid_pinpoints
        return self.reference_style, pins


@dataclasses.dataclass(frozen=True)
class _KeepN(VisualPruner):
    """Methods that keep exactly ``num_keep`` tokens per image (per tile on LLaVA-NeXT, base image included)."""

    num_keep: int = 64

    def budget(self, cfg, num_tiles):
        return Budget(self.num_keep if num_tiles is None else self.num_keep * num_tiles)

    def check(self, cfg):
        check_keep(self.name, self.num_keep, cfg.tokens_per_image)


def on_onevision(cfg) -> bool:
    return cfg is not None and cfg.model_type == "llava_onevision"


class _OnevisionTiles:
    """Per-tile selection on LLaVA-OneVision (``num_keep`` = T per tile, base included), packed in one of two
    layouts (docs/methods.md §9.4):

    * ``layout="official"`` (default), mode B [PROPOSED]: HF's packed block (base, unpadded and possibly
      downsampled grid, a newline per row); the base keeps T tokens by the per-tile rule, the ``oh·ow`` grid slots
      ``min(K·T, oh·ow)`` by the method's rule on scores resampled like the features
      (``vlmprune.prune.onevision_grid``); kept slots in packed order, a row's newline kept iff the row keeps a
      token: at most ``T + min(K·T, oh·ow) + oh`` tokens;
    * ``layout="reference"``, mode A (spatial-compat): T per tile on every tile, base raster then the stitched grid
      in global raster order, no unpad, newline or downsampling: exactly (1+K)·T tokens.
    """

    def selects_per_tile(self, cfg):
        return on_onevision(cfg)

    def spatial_compat(self, cfg):
        return on_onevision(cfg) and self.layout == "reference"

    def on_packed_grid(self, cfg) -> bool:
        return on_onevision(cfg) and self.layout == "official"

    def prepare(self, host: HostInputs) -> dict:
        if not self.on_packed_grid(host.config):
            return {}
        if host.layouts is None:
            raise ValueError(f"{self.name}: the official OneVision layout needs the images' layouts on the host")
        arrays = grid_host_arrays(host.layouts, self.num_keep)
        arrays.update(self.grid_prepare(host.layouts, arrays))
        return arrays

    def grid_prepare(self, layouts, arrays: dict) -> dict:
        """Method-specific host arrays for the grid selection (default none)."""
        return {}

    def base_and_grid(self, taps: VisionTaps, ctx: PruneContext) -> tuple[Array, Array]:
        """(base kept tokens int32 (NI, T), grid keep bool (NI, G) over ``aux["grid_slots"]``)."""
        raise NotImplementedError

    def prune_packed(self, taps: VisionTaps, ctx: PruneContext) -> PruneResult:
        """Mode B: a Selection (NI, V) of slots of the packed block (``ctx.layout``, the image's PackTables)."""
        if not isinstance(ctx.layout, PackTables):
            raise ValueError(
                f"{self.name}: the official OneVision layout selects on the packed block and needs the images' "
                "PackTables as PruneContext.layout"
            )
        base, grid_keep = self.base_and_grid(taps, ctx)
        slots = ctx.aux_array("grid_slots", self.name)
        return PruneResult(selection=packed_selection(base, grid_keep, slots, ctx.layout))

    def grid_counts(self, ctx: PruneContext) -> tuple[Array, Array]:
        return ctx.aux_array("grid_count", self.name), ctx.aux_array("grid_budget", self.name)


def tiles_of(x: Array, ctx: PruneContext) -> Array:
    """(NI·T, ...) per-tile arrays -> (NI, T, ...) with the batch's PackTables."""
    ni, t = ctx.layout.tile_valid.shape
    return x.reshape((ni, t) + x.shape[1:])


def packed_grid_scores(score: Array, ctx: PruneContext) -> Array:
    """Per-tile scores (NI·T, N) resampled onto the packed grid -> (NI, G) at ``aux["grid_slots"]``."""
    packed = pack_tile_values(tiles_of(score, ctx)[..., None], ctx.layout)[..., 0]
    return grid_values(packed, ctx.aux_array("grid_slots", "packed grid"))


def received_attention_request(pruner, cfg) -> TapRequest:
    """OneVision: the received attention of ``pruner.layer``; elsewhere its CLS-attention row."""
    layer = resolve_layer(pruner.layer, cfg, "layer")
    if on_onevision(cfg):
        return TapRequest(column_mean_layers=(layer,))
    return TapRequest(cls_attention_layers=(layer,))


@register
@dataclasses.dataclass(frozen=True)
class VisPruner(_OnevisionTiles, _NextLayout, _KeepN):
    """VisPruner (ICCV'25): T·ratio tokens by CLS attention, the rest by similarity-based dedup.

    On LLaVA-NeXT ``num_keep`` applies per tile (base image included). ``layout="reference"``: the paper's fixed
    672x672 canvas (2x2 tiles), no unpad, no newline, exactly 5·T tokens; preprocess with
    ``vlmprune.anyres.reference_processor``. ``exact_similarity=False`` trades bit-parity with the original
    for a cheaper similarity matrix (see ``vlmprune.prune.vispruner``).

    LLaVA-OneVision: the authors' SigLIP rule (``vlmprune.prune.vispruner_siglip``) on the received attention of
    ``layer`` (the feature layer, the tower's last). ``layout="official"`` (default; docs/methods.md §9.4 mode B,
    [PROPOSED]): the base tile keeps ``num_keep`` by that rule; the packed grid keeps ``min(K·T, oh·ow)`` by the
    same rule on the head-mean scores and pre-projector features resampled like HF's packing
    (``vispruner.vispruner_masked``, one plan per image: ``int(budget·ratio)`` by score, dedup rounds for the rest,
    odd residuals by the project's generalisation). ``layout="reference"``: per tile, spatial-compat (mode A),
    exactly (1+K)·T tokens for a grid of K tiles.
    """

    important_ratio: float = 0.5
    layer: int | None = None
    layout: str = "official"
    exact_similarity: bool = True
    reference_style: ClassVar[str] = "uncropped"
    reference_fixed_canvas: ClassVar[bool] = True
    name: ClassVar[str] = "vispruner"
    supports_next: ClassVar[bool] = True
    supports_onevision: ClassVar[bool] = True

    def request(self, cfg):
        return received_attention_request(self, cfg)

    def check(self, cfg):
        super().check(cfg)
        checks.check_float("important_ratio", self.important_ratio, lo=0.0, hi=1.0, where=self.name)
        checks.check_bool("exact_similarity", self.exact_similarity, where=self.name)

    def grid_prepare(self, layouts, arrays):
        plans = vispruner_masked_plans(arrays["grid_count"], arrays["grid_budget"], self.important_ratio)
        return {"vispruner_important": plans["important"], "vispruner_rounds": plans["rounds"]}

    def base_and_grid(self, taps, ctx):
        received = taps.received_attention(ctx.layer(self.layer, "layer"))
        base = vispruner_siglip(
            tiles_of(taps.features, ctx)[:, 0],
            tiles_of(received, ctx)[:, 0],
            num_keep=self.num_keep,
            important_ratio=self.important_ratio,
            exact_similarity=self.exact_similarity,
        ).indices
        slots = ctx.aux_array("grid_slots", self.name)
        feats = grid_values(pack_tile_values(tiles_of(taps.features, ctx), ctx.layout), slots)
        count, budget = self.grid_counts(ctx)
        grid = vispruner_masked(
            feats,
            packed_grid_scores(siglip_score(received), ctx),
            count,
            budget,
            ctx.aux_array("vispruner_important", self.name),
            ctx.aux_array("vispruner_rounds", self.name),
            exact_similarity=self.exact_similarity,
        )
        return base, grid

    def prune(self, taps: VisionTaps, ctx: PruneContext) -> PruneResult:
        if self.on_packed_grid(ctx.config):
            return self.prune_packed(taps, ctx)
        if on_onevision(ctx.config):  # per tile, scores = received attention
            sel = vispruner_siglip(
                taps.features,
                taps.received_attention(ctx.layer(self.layer, "layer")),
                num_keep=self.num_keep,
                important_ratio=self.important_ratio,
                exact_similarity=self.exact_similarity,
            )
            return PruneResult(selection=sel)
        sel = vispruner(
            taps.features,
            taps.cls_attention(ctx.layer(self.layer, "layer")),
            num_keep=self.num_keep,
            important_ratio=self.important_ratio,
            exact_similarity=self.exact_similarity,
        )
        return PruneResult(selection=per_image(sel, ctx, taps.num_tokens))


@register
@dataclasses.dataclass(frozen=True)
class FasterVLM(_OnevisionTiles, _NextLayout, _KeepN):
    """FasterVLM: top-T tokens by head-mean CLS attention (VisPruner with ratio 1). NeXT layouts as VisPruner.

    LLaVA-OneVision [PROPOSED] (no SigLIP original): VisPruner's SigLIP rule with ``important_ratio=1``, i.e. the
    top-T of the head-mean received attention of ``layer``. ``layout="official"`` (default, §9.4 mode B): top-T on
    the base tile, top-``min(K·T, oh·ow)`` of the resampled scores on the packed grid (ties: lower slot first);
    ``layout="reference"``: per tile, spatial-compat (mode A).
    """

    layer: int | None = None
    layout: str = "official"
    reference_style: ClassVar[str] = "uncropped"
    reference_fixed_canvas: ClassVar[bool] = True
    name: ClassVar[str] = "fastervlm"
    supports_next: ClassVar[bool] = True
    supports_onevision: ClassVar[bool] = True

    def request(self, cfg):
        return received_attention_request(self, cfg)

    def base_and_grid(self, taps, ctx):
        received = taps.received_attention(ctx.layer(self.layer, "layer"))
        base = vispruner_siglip(
            tiles_of(taps.features, ctx)[:, 0],
            tiles_of(received, ctx)[:, 0],
            num_keep=self.num_keep,
            important_ratio=1.0,
        ).indices
        count, budget = self.grid_counts(ctx)
        return base, top_count(packed_grid_scores(siglip_score(received), ctx), count, budget)

    def prune(self, taps, ctx):
        if self.on_packed_grid(ctx.config):
            return self.prune_packed(taps, ctx)
        if on_onevision(ctx.config):
            received = taps.received_attention(ctx.layer(self.layer, "layer"))
            sel = vispruner_siglip(taps.features, received, num_keep=self.num_keep, important_ratio=1.0)
            return PruneResult(selection=sel)
        sel = fastervlm(taps.cls_attention(ctx.layer(self.layer, "layer")), num_keep=self.num_keep)
        return PruneResult(selection=per_image(sel, ctx, taps.num_tokens))


@register
@dataclasses.dataclass(frozen=True)
class HiRED(_NextLayout, VisualPruner):
    """HiRED (AAAI'25). On LLaVA-1.5 (one partition) each image keeps ``min(N, int(N·budget_rate))`` tokens by
    head-summed deep-layer CLS attention; alpha and the shallow layer only matter for tiled (NeXT) inputs.

    LLaVA-OneVision [PROPOSED] (docs/methods.md §9.3.6): both CLS rows are replaced by the received attention
    summed over heads (``shallow_layer`` for the budget split, ``deep_layer``, default the feature layer, for the
    selection); ``N_budget = int(P·N·budget_rate)`` for an image of P tiles; the tile budgets follow the paper's
    footprint rule (``hired`` variant "paper": head-summed shallow attention mass of the base tile over each grid
    tile's footprint) instead of the original's raster bands; kept tokens are packed as HiRED packs them: base,
    then the stitched grid inside HF's unpad crop, no newline and no anyres_max downsampling
    (``tile_packing`` "cropped"). Needs ``layout="reference"``; ``swapped_grid`` does not apply there.
    """

    budget_rate: float = 0.2
    alpha: float = 0.5
    shallow_layer: int = 0
    deep_layer: int | None = None
    layout: str = "official"
    #: layout="reference" on LLaVA-NeXT only: reproduce the fork's swapped grid dims (docs/methods.md §3.7; changes
    #: 1x2/2x1/1x3/3x1 grids only). None = True there; False gives the unpadded, newline-free layout with the true
    #: grid. LLaVA-OneVision has no fork to reproduce: None or False only.
    swapped_grid: bool | None = None
    name: ClassVar[str] = "hired"
    reference_style: ClassVar[str] = "cropped"  # unpadded, no newline (its fork hard-codes image_newline=None)
    supports_next: ClassVar[bool] = True
    supports_onevision: ClassVar[bool] = True

    def layout_style(self, cfg):
        style, pins = super().layout_style(cfg)
        if style == "cropped" and self.swapped_grid in (None, True):
            style = "cropped_swapped"
        return style, pins

    def request(self, cfg):
        deep = resolve_layer(self.deep_layer, cfg, "deep_layer")
        if cfg.model_type in ("llava_next", "llava_onevision"):
            shallow = resolve_layer(self.shallow_layer, cfg, "shallow_layer")
            layers = tuple(sorted({shallow, deep}))
            if on_onevision(cfg):
                return TapRequest(column_mean_layers=layers)
            return TapRequest(cls_attention_layers=layers)
        return TapRequest(cls_attention_layers=(deep,))

    def selects_per_tile(self, cfg):
        return on_onevision(cfg)

    def tile_packing(self, cfg):
        return "cropped"

    def budget(self, cfg, num_tiles):
        n = cfg.tokens_per_image
        if num_tiles is None:
            return Budget(min(n, int(n * self.budget_rate)))
        if not on_onevision(cfg) and num_tiles > 2 and n % (num_tiles - 1):
            raise ValueError(
                f"hired: an image with {num_tiles - 1} sub-tiles splits the thumbnail's {n} tokens into "
                f"{num_tiles - 1} raster bands (the original's allocation), which needs N divisible by "
                f"{num_tiles - 1}"
            )
        _, n_full, n_sub = hired_allocation(num_tiles, n, budget_rate=self.budget_rate, alpha=self.alpha)
        return Budget(n_full + n_sub)

    def check(self, cfg):
        n = cfg.tokens_per_image
        if on_onevision(cfg):
            if self.layout == "official":
                raise NotImplementedError(
                    "hired with layout='official' on LLaVA-OneVision is not implemented: HF's official packing "
                    "downsamples the unpadded grid (anyres_max) into blended tokens that no longer map to tile "
                    "tokens; pass layout='reference' for HiRED's own packing (base, then the stitched grid inside "
                    "the unpad crop, no newline, no downsampling; docs/methods.md §9.3.6)"
                )
            if self.swapped_grid:
                raise ValueError(
                    "hired: swapped_grid reproduces a quirk of the authors' LLaVA-NeXT fork and does not apply to "
                    "LLaVA-OneVision; leave it at None (or False)"
                )
            if math.isqrt(n) ** 2 != n:
                raise ValueError(f"hired: the footprint budget split needs a square token grid, got N = {n}")
        checks.check_float("budget_rate", self.budget_rate, lo=0.0, hi=1.0, lo_open=True, where=self.name)
        checks.check_float("alpha", self.alpha, lo=0.0, hi=1.0, where=self.name)
        if self.swapped_grid is not None:
            checks.check_bool("swapped_grid", self.swapped_grid, where=self.name)
        resolve_layer(self.shallow_layer, cfg, "shallow_layer")
        if min(n, int(n * self.budget_rate)) < 1:
            raise ValueError(f"hired: budget_rate={self.budget_rate} keeps int({n}·rate) = 0 tokens per image")

    def _tiled(self, taps, ctx) -> HiredSelection:
        """``hired_batched`` on every image's tiles: (NI, T, K_max). LLaVA-NeXT: CLS rows, the original's band
        split; LLaVA-OneVision: received attention and the images' grids, the footprint split (see the class)."""
        ov = on_onevision(ctx.config)
        if ctx.layout is None:
            raise ValueError("hired: tiled images need the layout in the PruneContext (the model provides it)")
        tile_valid = ctx.layout.tile_valid
        ni, t = tile_valid.shape
        tap = taps.received_attention if ov else taps.cls_attention
        shallow = tap(ctx.layer(self.shallow_layer, "shallow_layer"))
        deep = tap(ctx.layer(self.deep_layer, "deep_layer"))
        shape = (ni, t) + deep.shape[1:]
        # OneVision: the plan's (rows, cols) per image -> hired's (cols, rows)
        split = dict(variant="paper", grids=ctx.aux_array("tile_grid", self.name)[:, ::-1]) if ov else {}
        return hired_batched(
            shallow.reshape(shape),
            deep.reshape(shape),
            jnp.sum(tile_valid, axis=1, dtype=jnp.int32),
            budget_rate=self.budget_rate,
            alpha=self.alpha,
            **split,
        )

    def prune(self, taps, ctx):
        if ctx.layout is None and not on_onevision(ctx.config):
            sel = hired_single(
                taps.cls_attention(ctx.layer(self.deep_layer, "deep_layer")), budget_rate=self.budget_rate
            )
            return PruneResult(selection=sel)
        sel = self._tiled(taps, ctx)
        if on_onevision(ctx.config):  # per tile (selects_per_tile): (NI·T, K_max)
            k = sel.indices.shape[-1]
            return PruneResult(selection=Selection(indices=sel.indices.reshape(-1, k), valid=sel.valid.reshape(-1, k)))
        return PruneResult(selection=per_image(sel, ctx, taps.num_tokens))


def hero_clip_inputs(clip, pixel_values: np.ndarray, layouts, texts, tokens_per_image: int) -> dict:
    """HERO's host inputs: CLIP image embeddings of the sub-tiles (NI, T-1, E), the CLIP text embedding of each
    image's instruction (NI, 1, E) and HERO's own valid-token masks (NI, T-1, N) (its unpad rule).

    clip: a loaded ``vlmprune.models.vision.clip.ClipModel``; pixel_values (NI, T, C, S, S) (tiles padded to the largest
    grid); layouts: the images' ``vlmprune.anyres.ImageLayout``; texts: one instruction per image.
    """
    ni, t = pixel_values.shape[:2]
    n = tokens_per_image
    side = int(round(n**0.5))
    if clip.module.vision.image_size != pixel_values.shape[-1]:
        raise ValueError(
            f"hero: CLIP checkpoint image size {clip.module.vision.image_size} differs from the "
            f"tile size {pixel_values.shape[-1]}"
        )
    img = np.asarray(clip.image_features(pixel_values[:, 1:].reshape((-1,) + pixel_values.shape[2:])))
    img = img.reshape(ni, t - 1, -1)
    txt = np.asarray(clip.text_features(list(texts)))[:, None]
    valid = np.zeros((ni, t - 1, n), bool)
    for i, lay in enumerate(layouts):
        valid[i, : lay.num_tiles - 1] = hero_valid_mask(lay.image_size_hw, lay.grid, tokens_per_side=side)
    return {"clip_image": img, "clip_text": txt, "hero_valid": valid}


@register
@dataclasses.dataclass(frozen=True)
class HERO(_NextLayout, VisualPruner):
    """HERO (arXiv 2509.13067) on LLaVA-NeXT: per-tile budgets from CLS saliency, CLIP text relevance and density;
    the thumbnail keeps its ``high_layers`` picks, each tile its ``low_layers`` picks (docs/methods.md §4).

    ``clip_path`` names a full HF CLIP checkpoint (both towers; CLIP-L/14-336 for LLaVA-v1.6) whose image tower
    sees the same preprocessed tiles and whose text tower embeds the instruction (``prepare``, from the declared
    ``needs``). The defaults of the layer lists, temperatures, alpha and R are ours (the authors publish none;
    §4.7): set them explicitly to reproduce a run. The original crashes on LLaVA-1.5 (no tiles); so does this
    pruner, with a clear error.
    """

    keep_ratio: float = 0.2
    alpha: float = 0.5
    t_cls: float = 0.1
    t_clip: float = 0.1
    low_layers: tuple[int, ...] = tuple(range(1, 12))
    high_layers: tuple[int, ...] = tuple(range(12, 24))
    clip_path: str | None = None
    layout: str = "official"
    name: ClassVar[str] = "hero"
    reference_style: ClassVar[str] = "uncropped_newlines"  # no crop; a newline closes every stitched row
    supports_next: ClassVar[bool] = True

    @property
    def needs(self) -> HostNeeds:
        return HostNeeds(text=True, clip_path=self.clip_path)

    def validate(self, cfg):
        if on_onevision(cfg):
            raise NotImplementedError(
                "hero on LLaVA-OneVision is not implemented (docs/methods.md §9.3.7): HERO's tile saliency and "
                "thumbnail/tile selection read CLS states and CLS attention rows, which the "
                f"{type(cfg.vision).__name__} tower lacks (the generalisation would use received attention and the "
                "mean last hidden state); its text relevance needs a full SigLIP model with a text tower, which "
                "vlmprune does not load (only CLIP's, for LLaVA-NeXT); and its geometry is CLIP-336's 576 tokens "
                "(24 per side, 336-px tiles) where OneVision tiles hold "
                f"{cfg.tokens_per_image} tokens"
            )
        if cfg.model_type != "llava_next":
            raise ValueError(
                "hero: HERO allocates budgets across LLaVA-NeXT tiles; LLaVA-1.5 has a single image "
                "and no tiles (the original crashes there too). Use a LLaVA-NeXT checkpoint."
            )
        if self.clip_path is None:
            raise ValueError(
                "hero: clip_path (a full HF CLIP checkpoint, e.g. openai/clip-vit-large-patch14-336 "
                "downloaded locally) is required for the text-relevance score"
            )
        super().validate(cfg)

    def check(self, cfg):
        n = cfg.tokens_per_image
        checks.check_float("keep_ratio", self.keep_ratio, lo=0.0, hi=1.0, lo_open=True, where=self.name)
        checks.check_float("alpha", self.alpha, lo=0.0, hi=1.0, where=self.name)
        checks.check_float("t_cls", self.t_cls, lo=0.0, lo_open=True, where=self.name)
        checks.check_float("t_clip", self.t_clip, lo=0.0, lo_open=True, where=self.name)
        if not self.low_layers or not self.high_layers:
            raise ValueError("hero: low_layers and high_layers must be non-empty")
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"hero: tiles must have a square token grid, got {n} tokens")

    def _layers(self, cfg):
        low = tuple(resolve_layer(l, cfg, "low_layers") for l in self.low_layers)  # noqa: E741
        high = tuple(resolve_layer(l, cfg, "high_layers") for l in self.high_layers)  # noqa: E741
        return low, high

    def request(self, cfg):
        low, high = self._layers(cfg)
        return TapRequest(
            cls_attention_layers=tuple(sorted(set(low) | set(high))),
            hidden_state_layers=(cfg.vision.num_hidden_layers,),
        )

    def budget(self, cfg, num_tiles):
        if num_tiles is None:
            raise ValueError("hero: LLaVA-NeXT only")
        n, k = cfg.tokens_per_image, num_tiles - 1
        return Budget(int(n * self.keep_ratio) + min(int(k * n * self.keep_ratio), k * n))

    def prepare(self, host: HostInputs) -> dict:
        if host.clip is None or host.texts is None or host.layouts is None:
            raise ValueError("hero: prepare needs the auxiliary CLIP model, the instruction texts and the layouts")
        return hero_clip_inputs(host.clip, host.pixel_values, host.layouts, host.texts, host.config.tokens_per_image)

    def prune(self, taps, ctx):
        if ctx.layout is None or ctx.config is None:
            raise ValueError("hero: LLaVA-NeXT only (needs the layout and the config)")
        cfg = ctx.config
        low, high = self._layers(cfg)
        tile_valid = ctx.layout.tile_valid
        ni, t = tile_valid.shape
        attn = {
            l: taps.cls_attention(l).reshape((ni, t) + taps.cls_attention(l).shape[1:])  # noqa: E741
            for l in sorted(set(low) | set(high))
        }  # noqa: E741
        thumb = jnp.stack([attn[l][:, 0] for l in high], axis=1)  # (NI, n_high, H, N)  # noqa: E741
        tiles = jnp.stack([attn[l][:, 1:] for l in low], axis=2)  # (NI, K_max, n_low, H, N)  # noqa: E741
        cls_last = taps.hidden(cfg.vision.num_hidden_layers)[:, 0].reshape(ni, t, -1)
        aux = lambda k: ctx.aux_array(k, self.name)  # noqa: E731
        sel = hero_padded(
            thumb,
            tiles,
            cls_last,
            aux("clip_image"),
            aux("clip_text"),
            aux("hero_valid"),
            jnp.sum(tile_valid, axis=1, dtype=jnp.int32) - 1,
            keep_ratio=self.keep_ratio,
            alpha=self.alpha,
            t_cls=self.t_cls,
            t_clip=self.t_clip,
        )
        return PruneResult(selection=per_image(sel, ctx, taps.num_tokens))


@register
@dataclasses.dataclass(frozen=True)
class RandomKeep(_OnevisionTiles, _KeepN):
    """Uniformly random subset of ``num_keep`` tokens per image (seeded).

    LLaVA-OneVision [PROPOSED]: ``layout="official"`` (default, docs/methods.md §9.4 mode B): ``num_keep`` random
    base tokens and ``min(K·T, oh·ow)`` random slots of the packed grid (both from ``seed``); ``"reference"``: per
    tile, spatial-compat (mode A). ``layout`` has no effect elsewhere."""

    seed: int = 0
    layout: str = "official"
    name: ClassVar[str] = "random"
    supports_onevision: ClassVar[bool] = True

    def base_and_grid(self, taps, ctx):
        ni = ctx.layout.tile_valid.shape[0]
        key_base, key_grid = jax.random.split(jax.random.PRNGKey(self.seed))
        base = random_keep(key_base, taps.num_tokens, num_keep=self.num_keep, batch=ni).indices
        slots = ctx.aux_array("grid_slots", self.name)
        count, budget = self.grid_counts(ctx)
        return base, top_count(jax.random.uniform(key_grid, slots.shape), count, budget)

    def prune(self, taps, ctx):
        if self.on_packed_grid(ctx.config):
            return self.prune_packed(taps, ctx)
        f = taps.features
        return PruneResult(
            selection=random_keep(jax.random.PRNGKey(self.seed), f.shape[1], num_keep=self.num_keep, batch=f.shape[0])
        )


@register
@dataclasses.dataclass(frozen=True)
class Uniform(_OnevisionTiles, _KeepN):
    """Spatially even grid of ``num_keep`` tokens (``baselines.uniform``).

    LLaVA-OneVision [PROPOSED]: ``layout="official"`` (default, docs/methods.md §9.4 mode B): ``num_keep`` on the
    base tile and ``min(K·T, oh·ow)`` on the ``oh × ow`` packed grid map, both by ``uniform_grid_indices`` (host
    computed); ``"reference"``: per tile, spatial-compat (mode A). ``layout`` has no effect elsewhere."""

    layout: str = "official"
    name: ClassVar[str] = "uniform"
    supports_onevision: ClassVar[bool] = True

    def grid_prepare(self, layouts, arrays):
        return {"uniform_grid": uniform_grid_table(layouts, arrays["grid_budget"])}

    def base_and_grid(self, taps, ctx):
        ni = ctx.layout.tile_valid.shape[0]
        base = jnp.broadcast_to(uniform(taps.num_tokens, num_keep=self.num_keep).indices, (ni, self.num_keep))
        g = ctx.aux_array("grid_slots", self.name).shape[1]
        return base, listed_keep(ctx.aux_array("uniform_grid", self.name), g)

    def prune(self, taps, ctx):
        if self.on_packed_grid(ctx.config):
            return self.prune_packed(taps, ctx)
        f = taps.features
        idx = jnp.broadcast_to(uniform(f.shape[1], num_keep=self.num_keep).indices, (f.shape[0], self.num_keep))
        return PruneResult(selection=Selection(indices=idx, valid=jnp.ones(idx.shape, bool)))


def _official_only(pruner) -> None:
    if pruner.layout != "official":
        raise ValueError(
            f"{pruner.name}: layout must be 'official' (got {pruner.layout!r}); the method's paper has "
            "no LLaVA-NeXT packing of its own to reproduce, so only HF's official layout is offered"
        )


@register
@dataclasses.dataclass(frozen=True)
class DivPrune(_KeepN):
    """DivPrune (CVPR'25): max-min diverse subset of the post-projector embeddings.

    LLaVA-NeXT: selection on the whole image. The candidates are the image's tokens that appear in the official
    layout (the base tile's N tokens and the grid tokens inside the unpad crop; never newlines or padded tiles);
    an image with ``T`` tiles (base included) keeps exactly ``min(num_keep·T, candidates)`` of them, chosen by
    the max-min rule over all its candidates' post-projector embeddings jointly (``baselines.divprune_masked``).
    Kept tokens are packed in the official order with a newline after every grid row that keeps a token. The
    original runs on the packed sequence with its newline embeddings among the candidates and a budget
    ``round(ratio·V)`` over it; here newlines follow the official rule and the budget is ``num_keep`` per tile,
    like VisPruner's. ``layout`` must be "official".

    LLaVA-OneVision ([PROPOSED] details): selection on the image's packed block as the LLM receives it (base tile,
    unpadded and possibly downsampled grid, newline tokens all candidates, as the original treats its packed
    sequence); an image with ``T`` tiles keeps ``min(num_keep·T, V)`` of its ``V`` packed tokens, in packed order.
    """

    layout: str = "official"
    name: ClassVar[str] = "divprune"
    supports_next: ClassVar[bool] = True
    supports_onevision: ClassVar[bool] = True
    projects_all: ClassVar[bool] = True

    def validate(self, cfg):
        _official_only(self)
        super().validate(cfg)

    def prune(self, taps, ctx):
        emb = taps.embeddings
        if emb is None:
            raise ValueError(
                "divprune: needs taps.embeddings, the post-projector features (its request sets "
                "projected=True; the model provides them)"
            )
        if ctx.layout is None:
            return PruneResult(selection=divprune(emb, num_keep=self.num_keep))
        if isinstance(ctx.layout, PackTables):  # OneVision: emb is the packed block (NI, V, D)
            tiles = jnp.sum(ctx.layout.tile_valid, axis=1, dtype=jnp.int32)
            t, v = ctx.layout.tile_valid.shape[1], emb.shape[1]
            return PruneResult(
                selection=divprune_masked(
                    emb, ctx.layout.valid, self.num_keep * tiles, max_keep=min(self.num_keep * t, v)
                )
            )
        tile_valid = ctx.layout.tile_valid
        ni, t = tile_valid.shape
        n = emb.shape[1]
        cand = layout_candidates(ctx.layout, n)
        count = self.num_keep * jnp.sum(tile_valid, axis=1, dtype=jnp.int32)
        sel = divprune_masked(emb.reshape(ni, t * n, emb.shape[-1]), cand, count, max_keep=self.num_keep * t)
        return PruneResult(selection=sel)


@register
@dataclasses.dataclass(frozen=True)
class VisionZip(VisualPruner):
    """VisionZip (CVPR'25): CLS + dominant tokens by attention, plus merged contextual tokens.

    LLaVA-1.5: ``[CLS, dominant - 1 patches (raster), contextual]`` per image, as the original feeds them.

    LLaVA-NeXT: VisionZip runs on every valid tile (as the original's NeXT code does), so each tile yields
    ``dominant + contextual`` tokens as on 1.5. Placement (our choice, official layout only):
      * the ``dominant - 1`` dominant *patch* tokens of each tile stay at their positions in HF's official layout
        (base tile in raster order, then the unpadded stitched grid with a newline after every row that keeps
        a token); a dominant patch outside the unpad crop is dropped, as for VisPruner;
      * after the image's whole packed block (after its last newline) come the tiles' CLS tokens (base tile
        first, then the grid tiles in raster order), then their ``contextual`` merged tokens, tile by tile.
    The original packs the same kinds of tokens in the same tail order (CLS tokens, then contextual tokens) but
    keeps the base tile's VisionZip output unrestored and places the grid's dominant tokens without unpad or
    newlines; the layout here keeps LLaVA-NeXT's official spatial packing instead.

    LLaVA-OneVision [PROPOSED] (docs/methods.md §9.3): per tile (base and grid tiles), no CLS slot: the
    ``dominant`` tokens with the largest head-mean received attention of ``layer`` (default the feature layer,
    the tower's last) and ``contextual`` tokens merged on that layer's head-mean raw keys
    (``baselines.visionzip_no_cls``), from the pre-projector features. Each tile gives
    ``[dominant (raster), contextual (target order)]``; the tiles follow one another, base tile first, then the
    grid tiles in raster order of the grid: ``(1+K)·(dominant + contextual)`` tokens, no unpad, newline or
    downsampling. This is the spatial-compat layout (docs/methods.md §9.4 mode A) and needs
    ``layout="reference"`` explicitly; ``"official"`` (mode B) is refused there.
    """

    dominant: int = 54
    contextual: int = 10
    layer: int | None = None
    layout: str = "official"
    name: ClassVar[str] = "visionzip"
    supports_next: ClassVar[bool] = True
    supports_onevision: ClassVar[bool] = True

    def validate(self, cfg):
        if not on_onevision(cfg):
            _official_only(self)
        elif self.layout == "official":
            raise NotImplementedError(
                "visionzip with layout='official' on LLaVA-OneVision is not implemented: its merged tokens have no "
                "place on HF's unpadded, downsampled grid with newlines (docs/methods.md §9.3); pass "
                "layout='reference' for the spatial-compat layout (each tile's [dominant, contextual] block, base "
                "tile first, no unpad, newline or downsampling)"
            )
        super().validate(cfg)

    def request(self, cfg):
        layer = resolve_layer(self.layer, cfg, "layer")
        if on_onevision(cfg):
            return TapRequest(column_mean_layers=(layer,), key_layers=(layer,))
        return TapRequest(cls_attention_layers=(layer,), key_layers=(layer,))

    def selects_per_tile(self, cfg):
        return on_onevision(cfg)

    def budget(self, cfg, num_tiles):
        if on_onevision(cfg):  # every tile's dominant + contextual tokens
            return Budget((self.dominant + self.contextual) * num_tiles)
        if num_tiles is None:
            return Budget(self.dominant + self.contextual)
        # dominant patches in the layout; one CLS and `contextual` merged tokens per tile appended
        return Budget((self.dominant - 1) * num_tiles, num_tiles * (1 + self.contextual))

    def check(self, cfg):
        n = cfg.tokens_per_image
        if on_onevision(cfg):  # no CLS slot: dominant counts patches only
            checks.check_int("dominant", self.dominant, lo=1, hi=n, where=self.name)
            checks.check_int("contextual", self.contextual, lo=0, hi=n - self.dominant, where=self.name)
            return
        checks.check_int("dominant", self.dominant, lo=2, hi=n, where=self.name)
        checks.check_int("contextual", self.contextual, lo=0, hi=n + 1 - self.dominant, where=self.name)

    def merge(self, taps: VisionTaps, ctx: PruneContext):
        """``baselines.MergeResult``: [CLS, dominant patches, contextual merged tokens] (pre-projector); on
        OneVision per tile and without CLS: [dominant, contextual]."""
        layer = ctx.layer(self.layer, "layer")
        if on_onevision(ctx.config):
            received, keys = taps.received_attention(layer), taps.key(layer)
            keys = keys.reshape(keys.shape[0], keys.shape[1], received.shape[1], -1)
            return visionzip_no_cls(taps.features, received, keys, dominant=self.dominant, contextual=self.contextual)
        attn, keys = taps.cls_attention(layer), taps.key(layer)
        keys = keys.reshape(keys.shape[0], keys.shape[1], attn.shape[1], -1)
        return visionzip(taps.feature_hidden, attn, keys, dominant=self.dominant, contextual=self.contextual)

    def prune(self, taps, ctx):
        res = self.merge(taps, ctx)
        if ctx.layout is None or on_onevision(ctx.config):  # LLaVA-1.5, or OneVision's tiles (selects_per_tile)
            return PruneResult(selection=res.selection, tokens=res.tokens, tokens_valid=res.valid)
        tile_valid = ctx.layout.tile_valid
        ni, t = tile_valid.shape
        tok = res.tokens.reshape((ni, t) + res.tokens.shape[1:])
        tail = jnp.concatenate([tok[:, :, 0], tok[:, :, self.dominant :].reshape(ni, t * self.contextual, -1)], 1)
        valid = jnp.concatenate([tile_valid, jnp.repeat(tile_valid, self.contextual, axis=1)], axis=1)
        dom = visionzip_dominant(taps.cls_attention(ctx.layer(self.layer, "layer")), dominant=self.dominant)
        return PruneResult(selection=per_image(dom, ctx, taps.num_tokens), appended=tail, appended_valid=valid)


@register
@dataclasses.dataclass(frozen=True)
class PruMergePlus(VisualPruner):
    """PruMerge / PruMerge+ (adaptive IQR count, key-similarity merge) on the last layer's single-head attention.

    LLaVA-OneVision [PROPOSED] (docs/methods.md §9.3): per tile (base and grid tiles), the CLS row replaced by the
    head-mean received attention of ``layer`` (the tower's last, also the feature layer), keys = that layer's raw
    keys, merging the pre-projector features. Each tile gets its own adaptive count in a static block of N+1
    slots (the kept tokens, the extra token, then invalid slots); the tiles' valid tokens follow one another,
    base tile first, then the grid tiles in raster order of the grid (the spatial-compat layout, docs/methods.md
    §9.4 mode A; no unpad, newline or downsampling).
    """

    plus: bool = True
    layer: int = -1
    name: ClassVar[str] = "prumerge_plus"
    supports_onevision: ClassVar[bool] = True

    def request(self, cfg):
        layer = resolve_layer(self.layer, cfg, "layer")
        if on_onevision(cfg):
            return TapRequest(column_mean_layers=(layer,), key_layers=(layer,))
        return TapRequest(key_layers=(layer,))

    def selects_per_tile(self, cfg):
        return on_onevision(cfg)

    def budget(self, cfg, num_tiles):
        if on_onevision(cfg):  # N + 1 slots per tile, a valid prefix of each
            return Budget((cfg.tokens_per_image + 1) * num_tiles)
        return Budget(cfg.tokens_per_image + 1)

    def check(self, cfg):
        checks.check_bool("plus", self.plus, where=self.name)

    def merge(self, taps: VisionTaps, ctx: PruneContext):
        """MergeResult: kept tokens (score order) merged with their key-similar neighbours, + samples, + extra."""
        layer = ctx.layer(self.layer, "layer")
        if on_onevision(ctx.config):  # head-mean received attention replaces the CLS row (no CLS to drop)
            received = head_mean(taps.received_attention(layer))
            return prumerge_plus(taps.features, received, taps.key(layer).astype(jnp.float32), plus=self.plus)
        k = taps.key(layer).astype(jnp.float32)  # (B, 1+N, D)
        q = taps.query_cls(layer).astype(jnp.float32)  # (B, D)
        logits = jnp.einsum("bd,btd->bt", q, k) * k.shape[-1] ** -0.5  # single head over all D dims (§5.4)
        attn = jax.nn.softmax(logits, axis=-1)[:, 1:]
        return prumerge_plus(taps.features, attn, k[:, 1:], plus=self.plus)

    def prune(self, taps, ctx):
        res = self.merge(taps, ctx)
        return PruneResult(selection=res.selection, tokens=res.tokens, tokens_valid=res.valid)


def demo_settings(num_tokens: int) -> list[tuple[str, dict]]:
    """Methods and budgets the demo compares (a quarter of the tokens each)."""
    k = max(2, num_tokens // 4)
    return [
        ("vispruner", dict(num_keep=k, important_ratio=0.5)),
        ("fastervlm", dict(num_keep=k)),
        ("hired", dict(budget_rate=0.25)),
        ("divprune", dict(num_keep=k)),
        ("random", dict(num_keep=k)),
    ]
