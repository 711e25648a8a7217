"""Model-facing pruners: frozen (hashable) configs that connect the pure selection functions to the model.

A pruner tells the vision tower which taps it needs (``vision_request``: CLS-attention rows and key/query
projections of named layers, nothing else), says how many visual slots it produces per image (``num_slots``,
a static maximum), and maps the encoder outputs to the tokens the LLM receives (``apply``). The model never
knows which method ran.

Layer indices are CLIP encoder layers, 0-based (negative allowed). ``None`` means "the layer that produced
LLaVA's features" (``vision_feature_layer``; layer 22 of CLIP-L/14-336 for LLaVA-1.5's -2), which is the layer
VisPruner, FasterVLM and HiRED's selection stage read in the originals.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from vlmprune import _checks
from vlmprune.prune.selection import Selection, gather_tokens

Array = jax.Array


def feature_layer(cfg) -> int:
    """Encoder layer (0-based) whose output is LLaVA's feature layer."""
    n = cfg.vision.num_hidden_layers
    idx = cfg.vision_feature_layer % (n + 1) - 1
    if idx < 0:
        raise ValueError("vision_feature_layer selects the embeddings; there is no attention layer to score with")
    return idx


def resolve_layer(layer: int | None, cfg, name: str) -> int:
    n = cfg.vision.num_hidden_layers
    if layer is None:
        return feature_layer(cfg)
    if not -n <= layer < n:
        raise ValueError(f"{name}={layer} is out of range for a vision tower with {n} layers")
    return layer % n


@dataclasses.dataclass(frozen=True)
class Pruner:
    """Base class. Subclasses set ``name`` and implement ``num_slots`` and ``apply``."""

    name: ClassVar[str] = "base"
    #: True for methods that run inside the LLM (FastV); the model then calls ``llm_config`` instead.
    inside_llm: ClassVar[bool] = False
    #: True for methods with a per-tile form for LLaVA-NeXT (``tile_mask`` and ``max_tokens_next``).
    supports_next: ClassVar[bool] = False

    def vision_request(self, cfg) -> dict:
        return {}

    def num_slots(self, cfg) -> int:
        raise NotImplementedError

    def validate(self, cfg) -> None:
        """Raise ValueError (before any compile) when this pruner cannot run on ``cfg``."""
        if cfg.model_type != "llava" and not self.supports_next:
            raise NotImplementedError(f"{self.name} on {cfg.model_type} (anyres tiles) is not implemented yet")
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError(
                f"{self.name}: pruning selects patch tokens and needs vision_feature_select_strategy='default' "
                f"(this checkpoint uses {cfg.vision_feature_select_strategy!r}, which also feeds the CLS token)"
            )
        if getattr(self, "layout", "official") not in LAYOUTS:
            raise ValueError(f"{self.name}: layout must be one of {LAYOUTS}, got {self.layout!r}")
        n = cfg.tokens_per_image
        self._check(n, cfg)
        # vision_request resolves and range-checks the layers.
        self.vision_request(cfg)

    def _check(self, num_tokens: int, cfg) -> None:
        pass

    def max_tokens_next(self, cfg, num_tiles: int) -> int:
        """LLaVA-NeXT: most tokens (newlines excluded) one image with ``num_tiles`` tiles (base included) keeps."""
        raise NotImplementedError

    def extra_tokens_next(self, cfg, num_tiles: int) -> int:
        """LLaVA-NeXT: most tokens appended after the image's packed block (VisionZip's merged tokens); default 0."""
        return 0

    def tile_mask(self, enc: dict, layout: dict, cfg) -> Array:
        """LLaVA-NeXT: keep mask bool (NI, T, N) over every tile's tokens; enc holds the NI·T tiles' outputs
        (the model adds ``embeddings``, the post-projector features (NI·T, N, D_llm)), layout the host tables
        (``token``, ``row``, ``tile_valid`` (NI, T) and any ``host_inputs``)."""
        raise NotImplementedError

    def next_tokens(self, enc: dict, layout: dict, cfg, project: Callable[[Array], Array]):
        """LLaVA-NeXT: (keep bool (NI, T, N), extra) where extra is None or (tokens (NI, E, D_llm), valid bool
        (NI, E)): tokens appended, in order (valid ones only), after the image's packed official block.
        Default: ``tile_mask`` and nothing appended."""
        return self.tile_mask(enc, layout, cfg), None

    def host_inputs(self, model, pixel_values, layouts, input_ids, text) -> dict:
        """Extra arrays computed on the host before the jitted forward (HERO's CLIP scores); default none."""
        return {}

    def select(self, enc: dict, project: Callable[[Array], Array]) -> Selection:
        """LLaVA-1.5: which patch tokens of each image are kept (for merging methods: the anchor tokens).

        enc: ``Llava.encode`` outputs; project: features -> LLM embeddings. Returns a Selection (NI, K).
        """
        raise NotImplementedError

    def apply(self, enc: dict, project: Callable[[Array], Array]) -> tuple[Array, Array]:
        """LLaVA-1.5: the tokens the LLM receives: (tokens (NI, K, D_llm), valid bool (NI, K)), K = ``num_slots``.

        Default: the selected patch features, projected, in raster order.
        """
        sel = self.select(enc, project)
        return project(gather_tokens(enc["features"], sel)), sel.valid


LAYOUTS = ("official", "reference")


class _NextLayout:
    """LLaVA-NeXT packing: ``layout="official"`` (HF's: unpadded, a newline after every row that keeps a token) or
    ``"reference"``, the method paper's own layout (algorithms.md §1.4), for like-for-like comparisons."""

    #: layout style of the method's own paper, see ``vlmprune.next_layout.STYLES``
    reference_style: ClassVar[str] = "official"
    #: True when the paper forces VisPruner's fixed 2x2 canvas (672x672 for 336-px tiles)
    reference_fixed_canvas: ClassVar[bool] = False

    def next_layout_style(self, cfg):
        from vlmprune.next_layout import reference_pinpoints

        if self.layout not in LAYOUTS:
            raise ValueError(f"{self.name}: layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout == "official":
            return "official", cfg.image_grid_pinpoints
        pins = reference_pinpoints(cfg.vision.image_size) if self.reference_fixed_canvas else cfg.image_grid_pinpoints
        return self.reference_style, pins


def _check_keep(name: str, num_keep, n: int) -> int:
    return _checks.check_int("num_keep", num_keep, lo=1, hi=n, where=name)


@dataclasses.dataclass(frozen=True)
class _KeepN(Pruner):
    """Methods that keep exactly ``num_keep`` tokens per image."""

    num_keep: int = 64

    def num_slots(self, cfg):
        return self.num_keep

    def max_tokens_next(self, cfg, num_tiles):
        return self.num_keep * num_tiles  # num_keep per tile, base image included

    def _check(self, n, cfg):
        _check_keep(self.name, self.num_keep, n)


@dataclasses.dataclass(frozen=True)
class VisPruner(_NextLayout, _KeepN):
    """VisPruner (ICCV'25): T·ratio tokens by CLS attention, the rest by similarity-based dedup.

    On LLaVA-NeXT ``num_keep`` applies per tile (base image included). ``layout="reference"``: the paper's fixed
    672x672 canvas (2x2 tiles), no unpad, no newline, exactly 5·T tokens; preprocess with
    ``vlmprune.next_layout.reference_processor``. ``exact_similarity=False`` trades bit-parity with the original
    for a cheaper similarity matrix (see ``vlmprune.prune.vispruner``).
    """

    important_ratio: float = 0.5
    layer: int | None = None
    layout: str = "official"
    exact_similarity: bool = True
    reference_style: ClassVar[str] = "uncropped"
    reference_fixed_canvas: ClassVar[bool] = True
    name: ClassVar[str] = "vispruner"

    def vision_request(self, cfg):
        return {"cls_attention_layers": (resolve_layer(self.layer, cfg, "layer"),)}

    def _check(self, n, cfg):
        super()._check(n, cfg)
        _checks.check_float("important_ratio", self.important_ratio, lo=0.0, hi=1.0, where=self.name)
        _checks.check_bool("exact_similarity", self.exact_similarity, where=self.name)

    supports_next: ClassVar[bool] = True

    def select(self, enc, project=None):
        from vlmprune.prune.vispruner import vispruner

        (layer,) = enc["cls_attn"].keys()
        return vispruner(enc["features"], enc["cls_attn"][layer], num_keep=self.num_keep,
                         important_ratio=self.important_ratio, exact_similarity=self.exact_similarity)

    def tile_mask(self, enc, layout, cfg):
        n = enc["features"].shape[1]
        return self.select(enc).mask(n).reshape(layout["tile_valid"].shape + (n,))


@dataclasses.dataclass(frozen=True)
class FasterVLM(_NextLayout, _KeepN):
    """FasterVLM: top-T tokens by head-mean CLS attention (VisPruner with ratio 1). NeXT layouts as VisPruner."""

    layer: int | None = None
    layout: str = "official"
    reference_style: ClassVar[str] = "uncropped"
    reference_fixed_canvas: ClassVar[bool] = True
    name: ClassVar[str] = "fastervlm"

    def vision_request(self, cfg):
        return {"cls_attention_layers": (resolve_layer(self.layer, cfg, "layer"),)}

    supports_next: ClassVar[bool] = True

    def select(self, enc, project=None):
        from vlmprune.prune.vispruner import fastervlm

        (layer,) = enc["cls_attn"].keys()
        return fastervlm(enc["cls_attn"][layer], num_keep=self.num_keep)

    def tile_mask(self, enc, layout, cfg):
        n = enc["features"].shape[1]
        return self.select(enc).mask(n).reshape(layout["tile_valid"].shape + (n,))


@dataclasses.dataclass(frozen=True)
class HiRED(_NextLayout, Pruner):
    """HiRED (AAAI'25). On LLaVA-1.5 (one partition) each image keeps ``min(N, int(N·budget_rate))`` tokens by
    head-summed deep-layer CLS attention; alpha and the shallow layer only matter for tiled (NeXT) inputs."""

    budget_rate: float = 0.2
    alpha: float = 0.5
    shallow_layer: int = 0
    deep_layer: int | None = None
    layout: str = "official"
    #: layout="reference" only: reproduce the fork's swapped grid dims (algorithms.md §3.7; changes 1x2/2x1/1x3/3x1
    #: grids only). False gives the unpadded, newline-free layout with the true grid.
    swapped_grid: bool = True
    name: ClassVar[str] = "hired"
    reference_style: ClassVar[str] = "cropped"  # unpadded, no newline (its fork hard-codes image_newline=None)

    supports_next: ClassVar[bool] = True

    def next_layout_style(self, cfg):
        style, pins = super().next_layout_style(cfg)
        if style == "cropped" and self.swapped_grid:
            style = "cropped_swapped"
        return style, pins

    def vision_request(self, cfg):
        deep = resolve_layer(self.deep_layer, cfg, "deep_layer")
        if cfg.model_type == "llava_next":
            return {"cls_attention_layers": tuple(sorted({resolve_layer(self.shallow_layer, cfg, "shallow_layer"),
                                                          deep}))}
        return {"cls_attention_layers": (deep,)}

    def num_slots(self, cfg):
        n = cfg.tokens_per_image
        return min(n, int(n * self.budget_rate))

    def max_tokens_next(self, cfg, num_tiles):
        from vlmprune.prune.hired import hired_allocation

        n = cfg.tokens_per_image
        if num_tiles > 2 and n % (num_tiles - 1):
            raise ValueError(f"hired: an image with {num_tiles - 1} sub-tiles splits the thumbnail's {n} tokens into "
                             f"{num_tiles - 1} raster bands (the original's allocation), which needs N divisible by "
                             f"{num_tiles - 1}")
        n_budget, n_full, n_sub = hired_allocation(num_tiles, n, budget_rate=self.budget_rate, alpha=self.alpha)
        return n_full + n_sub

    def tile_mask(self, enc, layout, cfg):
        from vlmprune.prune.hired import hired_batched

        tile_valid = layout["tile_valid"]
        shallow_l = resolve_layer(self.shallow_layer, cfg, "shallow_layer")
        deep_l = resolve_layer(self.deep_layer, cfg, "deep_layer")
        ni, t = tile_valid.shape
        n = enc["features"].shape[1]
        shape = (ni, t) + enc["cls_attn"][deep_l].shape[1:]
        sel = hired_batched(enc["cls_attn"][shallow_l].reshape(shape), enc["cls_attn"][deep_l].reshape(shape),
                            jnp.sum(tile_valid, axis=1, dtype=jnp.int32), budget_rate=self.budget_rate,
                            alpha=self.alpha)
        return sel.mask(n)

    def _check(self, n, cfg):
        _checks.check_float("budget_rate", self.budget_rate, lo=0.0, hi=1.0, lo_open=True, where=self.name)
        _checks.check_float("alpha", self.alpha, lo=0.0, hi=1.0, where=self.name)
        resolve_layer(self.shallow_layer, cfg, "shallow_layer")
        if self.num_slots(cfg) < 1:
            raise ValueError(f"hired: budget_rate={self.budget_rate} keeps int({n}·rate) = 0 tokens per image")

    def select(self, enc, project=None):
        from vlmprune.prune.hired import hired_single

        (layer,) = enc["cls_attn"].keys()
        return hired_single(enc["cls_attn"][layer], budget_rate=self.budget_rate)


@dataclasses.dataclass(frozen=True)
class HERO(_NextLayout, Pruner):
    """HERO (arXiv 2509.13067) on LLaVA-NeXT: per-tile budgets from CLS saliency, CLIP text relevance and density;
    the thumbnail keeps its ``high_layers`` picks, each tile its ``low_layers`` picks (algorithms.md §4).

    ``clip_path`` names a full HF CLIP checkpoint (both towers; CLIP-L/14-336 for LLaVA-v1.6) whose image tower
    sees the same preprocessed tiles and whose text tower embeds the instruction. The defaults of the layer
    lists, temperatures, alpha and R are ours (the authors publish none; §4.7): set them explicitly to reproduce a
    run. The original crashes on LLaVA-1.5 (no tiles); so does this pruner, with a clear error.
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

    def validate(self, cfg):
        if cfg.model_type != "llava_next":
            raise ValueError("hero: HERO allocates budgets across LLaVA-NeXT tiles; LLaVA-1.5 has a single image "
                             "and no tiles (the original crashes there too). Use a LLaVA-NeXT checkpoint.")
        if self.clip_path is None:
            raise ValueError("hero: clip_path (a full HF CLIP checkpoint, e.g. openai/clip-vit-large-patch14-336 "
                             "downloaded locally) is required for the text-relevance score")
        super().validate(cfg)

    def _check(self, n, cfg):
        _checks.check_float("keep_ratio", self.keep_ratio, lo=0.0, hi=1.0, lo_open=True, where=self.name)
        _checks.check_float("alpha", self.alpha, lo=0.0, hi=1.0, where=self.name)
        _checks.check_float("t_cls", self.t_cls, lo=0.0, lo_open=True, where=self.name)
        _checks.check_float("t_clip", self.t_clip, lo=0.0, lo_open=True, where=self.name)
        if not self.low_layers or not self.high_layers:
            raise ValueError("hero: low_layers and high_layers must be non-empty")
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"hero: tiles must have a square token grid, got {n} tokens")

    def _layers(self, cfg):
        low = tuple(resolve_layer(l, cfg, "low_layers") for l in self.low_layers)
        high = tuple(resolve_layer(l, cfg, "high_layers") for l in self.high_layers)
        return low, high

    def vision_request(self, cfg):
        low, high = self._layers(cfg)
        return {"cls_attention_layers": tuple(sorted(set(low) | set(high))),
                "hidden_state_layers": (cfg.vision.num_hidden_layers,)}

    def num_slots(self, cfg):
        raise ValueError("hero: LLaVA-NeXT only")

    def max_tokens_next(self, cfg, num_tiles):
        n, k = cfg.tokens_per_image, num_tiles - 1
        return int(n * self.keep_ratio) + min(int(k * n * self.keep_ratio), k * n)

    def host_inputs(self, model, pixel_values, layouts, input_ids, text) -> dict:
        """CLIP image embeddings of the sub-tiles, CLIP text embedding of each image's instruction, and HERO's
        own valid-token masks (§4.3 step 4, from the image size in (width, height))."""
        from vlmprune.prune.anyres import hero_valid_mask

        clip = model.auxiliary_clip(self.clip_path)
        ni, t = pixel_values.shape[:2]
        n = model.config.tokens_per_image
        side = int(round(n**0.5))
        if clip.module.vision.image_size != pixel_values.shape[-1]:
            raise ValueError(f"hero: CLIP checkpoint image size {clip.module.vision.image_size} differs from the "
                             f"tile size {pixel_values.shape[-1]}")
        img = np.asarray(clip.image_features(pixel_values[:, 1:].reshape((-1,) + pixel_values.shape[2:])))
        img = img.reshape(ni, t - 1, -1)
        txt = np.asarray(clip.text_features(list(text)))[:, None]  # (NI, 1, E)
        valid = np.zeros((ni, t - 1, n), bool)
        for i, lay in enumerate(layouts):
            k = lay.grid_rows * lay.grid_cols
            h, w = lay.image_size_hw
            valid[i, :k] = hero_valid_mask((w, h), (lay.grid_cols, lay.grid_rows), tokens_per_side=side)
        return {"clip_image": img, "clip_text": txt, "hero_valid": valid}

    def tile_mask(self, enc, layout, cfg):
        from vlmprune.prune.hero import hero_padded

        low, high = self._layers(cfg)
        tile_valid = layout["tile_valid"]
        ni, t = tile_valid.shape
        n = enc["features"].shape[1]
        attn = {l: a.reshape((ni, t) + a.shape[1:]) for l, a in enc["cls_attn"].items()}
        thumb = jnp.stack([attn[l][:, 0] for l in high], axis=1)  # (NI, n_high, H, N)
        tiles = jnp.stack([attn[l][:, 1:] for l in low], axis=2)  # (NI, K_max, n_low, H, N)
        last = enc["hidden_states"][cfg.vision.num_hidden_layers]
        cls_last = last[:, 0].reshape(ni, t, -1)
        sel = hero_padded(thumb, tiles, cls_last, layout["clip_image"], layout["clip_text"], layout["hero_valid"],
                          jnp.sum(tile_valid, axis=1, dtype=jnp.int32) - 1, keep_ratio=self.keep_ratio,
                          alpha=self.alpha, t_cls=self.t_cls, t_clip=self.t_clip)
        return sel.mask(n)


@dataclasses.dataclass(frozen=True)
class RandomKeep(_KeepN):
    """Uniformly random subset of ``num_keep`` tokens per image (seeded)."""

    seed: int = 0
    name: ClassVar[str] = "random"

    def select(self, enc, project=None):
        from vlmprune.prune.baselines import random_keep

        f = enc["features"]
        return random_keep(jax.random.PRNGKey(self.seed), f.shape[1], num_keep=self.num_keep, batch=f.shape[0])


@dataclasses.dataclass(frozen=True)
class Uniform(_KeepN):
    """Spatially even grid of ``num_keep`` tokens."""

    name: ClassVar[str] = "uniform"

    def select(self, enc, project=None):
        from vlmprune.prune.baselines import uniform

        f = enc["features"]
        idx = jnp.broadcast_to(uniform(f.shape[1], num_keep=self.num_keep).indices, (f.shape[0], self.num_keep))
        return Selection(indices=idx, valid=jnp.ones(idx.shape, bool))


def _official_only(pruner) -> None:
    if pruner.layout != "official":
        raise ValueError(f"{pruner.name}: layout must be 'official' (got {pruner.layout!r}); the method's paper has "
                         "no LLaVA-NeXT packing of its own to reproduce, so only HF's official layout is offered")


def _layout_candidates(layout: dict, num_tokens: int) -> Array:
    """bool (NI, T·N): the tile tokens of each image that appear in its official layout (base tile: all; grid
    tiles: inside the unpad crop; padded tiles: none)."""
    token, tile_valid = layout["token"], layout["tile_valid"]
    ni, t = tile_valid.shape
    m = t * num_tokens
    rows = jnp.arange(ni)[:, None]
    cand = jnp.zeros((ni, m + 1), bool).at[rows, jnp.where(token >= 0, token, m)].set(True)[:, :m]
    return cand & jnp.repeat(tile_valid, num_tokens, axis=1)


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
    """

    layout: str = "official"
    name: ClassVar[str] = "divprune"
    supports_next: ClassVar[bool] = True

    def validate(self, cfg):
        _official_only(self)
        super().validate(cfg)

    def tile_mask(self, enc, layout, cfg):
        from vlmprune.prune.baselines import divprune_masked

        emb = enc.get("embeddings")
        if emb is None:
            raise ValueError("divprune: tile_mask needs enc['embeddings'], the post-projector features (NI·T, N, D) "
                             "of the tiles (the model adds them)")
        tile_valid = layout["tile_valid"]
        ni, t = tile_valid.shape
        n = emb.shape[1]
        cand = _layout_candidates(layout, n)
        count = self.num_keep * jnp.sum(tile_valid, axis=1, dtype=jnp.int32)
        sel = divprune_masked(emb.reshape(ni, t * n, emb.shape[-1]), cand, count, max_keep=self.num_keep * t)
        return sel.mask(t * n).reshape(ni, t, n)

    def select(self, enc, project):
        from vlmprune.prune.baselines import divprune

        return divprune(project(enc["features"]), num_keep=self.num_keep)

    def apply(self, enc, project):
        from vlmprune.prune.baselines import divprune

        emb = project(enc["features"])  # DivPrune scores the post-projector embeddings: project once, gather
        sel = divprune(emb, num_keep=self.num_keep)
        return gather_tokens(emb, sel), sel.valid


class _Merging:
    """Merging methods: ``merge(enc)`` returns a MergeResult; the LLM gets its (projected) tokens, and
    ``select`` reports the anchor tokens."""

    def select(self, enc, project=None):
        return self.merge(enc).selection

    def apply(self, enc, project):
        res = self.merge(enc)
        return project(res.tokens), res.valid


@dataclasses.dataclass(frozen=True)
class VisionZip(_Merging, Pruner):
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
    """

    dominant: int = 54
    contextual: int = 10
    layer: int | None = None
    layout: str = "official"
    name: ClassVar[str] = "visionzip"
    supports_next: ClassVar[bool] = True

    def validate(self, cfg):
        _official_only(self)
        super().validate(cfg)

    def max_tokens_next(self, cfg, num_tiles):
        return (self.dominant - 1) * num_tiles  # dominant patches in the layout; CLS goes to the appended tail

    def extra_tokens_next(self, cfg, num_tiles):
        return num_tiles * (1 + self.contextual)  # one CLS and `contextual` merged tokens per tile

    def tile_mask(self, enc, layout, cfg):
        from vlmprune.prune.baselines import visionzip_dominant

        (layer,) = enc["cls_attn"].keys()
        n = enc["features"].shape[1]
        sel = visionzip_dominant(enc["cls_attn"][layer], dominant=self.dominant)
        return sel.mask(n).reshape(layout["tile_valid"].shape + (n,))

    def next_tokens(self, enc, layout, cfg, project):
        tile_valid = layout["tile_valid"]
        ni, t = tile_valid.shape
        res = self.merge(enc)  # tokens (NI·T, dominant + contextual, C): [CLS, dominant patches, contextual]
        tok = res.tokens.reshape((ni, t) + res.tokens.shape[1:])
        tail = jnp.concatenate([tok[:, :, 0], tok[:, :, self.dominant:].reshape(ni, t * self.contextual, -1)], 1)
        valid = jnp.concatenate([tile_valid, jnp.repeat(tile_valid, self.contextual, axis=1)], axis=1)
        return self.tile_mask(enc, layout, cfg), (project(tail), valid)

    def vision_request(self, cfg):
        layer = resolve_layer(self.layer, cfg, "layer")
        return {"cls_attention_layers": (layer,), "key_layers": (layer,)}

    def num_slots(self, cfg):
        return self.dominant + self.contextual

    def _check(self, n, cfg):
        _checks.check_int("dominant", self.dominant, lo=2, hi=n, where=self.name)
        _checks.check_int("contextual", self.contextual, lo=0, hi=n + 1 - self.dominant, where=self.name)

    def merge(self, enc):
        """MergeResult: [CLS, dominant patches, contextual merged tokens] (pre-projector)."""
        from vlmprune.prune.baselines import visionzip

        (layer,) = enc["cls_attn"].keys()
        keys = enc["keys"][layer]
        nh = enc["cls_attn"][layer].shape[1]
        keys = keys.reshape(keys.shape[0], keys.shape[1], nh, -1)
        return visionzip(enc["feature_hidden"], enc["cls_attn"][layer], keys, dominant=self.dominant,
                         contextual=self.contextual)


@dataclasses.dataclass(frozen=True)
class PruMergePlus(_Merging, Pruner):
    """PruMerge / PruMerge+ (adaptive IQR count, key-similarity merge) on the last layer's single-head attention."""

    plus: bool = True
    layer: int = -1
    name: ClassVar[str] = "prumerge_plus"

    def vision_request(self, cfg):
        return {"key_layers": (resolve_layer(self.layer, cfg, "layer"),)}

    def num_slots(self, cfg):
        return cfg.tokens_per_image + 1

    def merge(self, enc):
        """MergeResult: kept tokens (score order) merged with their key-similar neighbours, + samples, + extra."""
        from vlmprune.prune.baselines import prumerge_plus

        (layer,) = enc["keys"].keys()
        k = enc["keys"][layer].astype(jnp.float32)  # (B, 1+N, D)
        q = enc["cls_query"][layer].astype(jnp.float32)  # (B, D)
        logits = jnp.einsum("bd,btd->bt", q, k) * k.shape[-1] ** -0.5  # single head over all D dims (§5.4)
        attn = jax.nn.softmax(logits, axis=-1)[:, 1:]
        return prumerge_plus(enc["features"], attn, k[:, 1:], plus=self.plus)


@dataclasses.dataclass(frozen=True)
class FastV(Pruner):
    """FastV (ECCV'24), inside the LLM: after decoder layer ``layer`` keep ``int(keep_ratio·N)`` visual tokens per
    image, ranked by the head-mean attention of the last prompt token at layer ``layer - 1``. In-place variant
    (the later layers run on the shorter sequence with the original positions, gaps kept); with a KV cache the
    selection is made once at prefill and decoding attends to the kept set in the later layers (§5.2)."""

    layer: int = 2
    keep_ratio: float = 0.5
    name: ClassVar[str] = "fastv"
    inside_llm: ClassVar[bool] = True

    def num_slots(self, cfg):
        return cfg.tokens_per_image  # nothing is removed before the LLM

    def kept_per_image(self, cfg) -> int:
        return int(self.keep_ratio * cfg.tokens_per_image)

    def _check(self, n, cfg):
        _checks.check_int("layer", self.layer, lo=1, hi=cfg.text.num_hidden_layers - 1, where=self.name)
        _checks.check_float("keep_ratio", self.keep_ratio, lo=0.0, hi=1.0, lo_open=True, where=self.name)
        if self.kept_per_image(cfg) < 1:
            raise ValueError(f"fastv: keep_ratio={self.keep_ratio} keeps int({n}·ratio) = 0 visual tokens")

    def llm_config(self, cfg, visual: Array, images_per_row: int):
        from vlmprune.models.text.llama import FastVConfig

        n = cfg.tokens_per_image
        return FastVConfig(visual=visual, layer=self.layer, keep=self.kept_per_image(cfg) * images_per_row,
                           num_visual=n * images_per_row)


REGISTRY: dict[str, type[Pruner]] = {
    cls.name: cls
    for cls in (VisPruner, FasterVLM, HiRED, HERO, RandomKeep, Uniform, DivPrune, VisionZip, PruMergePlus, FastV)
}


def get(name: str, **kwargs) -> Pruner:
    """A pruner by registry name with keyword settings, e.g. ``get("vispruner", num_keep=64)``."""
    key = name.lower().replace("-", "_")
    if key not in REGISTRY:
        raise ValueError(f"unknown pruning method {name!r}; available: {sorted(REGISTRY)}")
    cls = REGISTRY[key]
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(kwargs) - fields)
    if bad:
        raise ValueError(f"{key} does not take {bad}; its settings are {sorted(fields)}")
    return cls(**kwargs)


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
