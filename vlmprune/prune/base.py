"""The two pruner protocols and the registry of methods.

A **visual pruner** sits between the vision tower and the projector and sees typed arrays only:

* ``request(cfg) -> TapRequest``: the taps it needs (resolved layers), nothing else is computed;
* ``budget(cfg, num_tiles) -> Budget``: the static maximum of slots per image (``num_tiles`` None on
  LLaVA-1.5, the image's tile count, base image included, on LLaVA-NeXT);
* ``validate(cfg)``: raise ValueError before any compile when it cannot run on this checkpoint;
* ``prune(taps, ctx) -> PruneResult``: the kept tokens (a ``Selection``) plus any merged or appended tokens;
* optional host preparation: ``needs`` declares auxiliary inputs (the instruction text, an auxiliary CLIP
  checkpoint) and ``prepare(host) -> dict`` turns them into arrays on the host; they reach ``prune`` as
  ``ctx.aux``. The model provides what is declared; a benchmark or a notebook calls ``prepare`` itself.

An **in-LLM pruner** leaves the vision tokens alone and gives the decoder a hook
(``decoder_hook(cfg, visual, images_per_row)``), a pytree with a static ``layer``: before that decoder layer the
decoder calls ``hook(q, k, key_mask)`` with the previous layer's queries and keys and continues on the slots the
hook returns.

``register`` adds a pruner class under its ``name`` so that ``get(name, **settings)``, the model, ``generate`` and
everything built on them find it, wherever the class is defined.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vlmprune import checks
from vlmprune.anyres.pack import selection_mask, tiles_to_image_indices
from vlmprune.prune.selection import Selection, gather_tokens
from vlmprune.types import NextLayout, PruneResult, TapRequest, VisionTaps

Array = jax.Array

LAYOUTS = ("official", "reference")


# ----------------------------------------------------------------------------------------------- layers


def feature_layer(cfg) -> int:
    """Encoder layer (0-based) whose output is LLaVA's feature layer."""
    n = cfg.vision.num_hidden_layers
    idx = cfg.vision_feature_layer % (n + 1) - 1
    if idx < 0:
        raise ValueError("vision_feature_layer selects the embeddings; there is no attention layer to score with")
    return idx


def resolve_layer(layer: int | None, cfg, name: str) -> int:
    """A 0-based encoder layer: ``None`` is the feature layer, negatives count from the end."""
    n = cfg.vision.num_hidden_layers
    if layer is None:
        return feature_layer(cfg)
    if not -n <= layer < n:
        raise ValueError(f"{name}={layer} is out of range for a vision tower with {n} layers")
    return layer % n


# ----------------------------------------------------------------------------------------------- contexts


@dataclasses.dataclass(frozen=True)
class Budget:
    """Static slot counts per image: ``kept`` tokens at most (newlines excluded) and ``appended`` after them."""

    kept: int
    appended: int = 0


@dataclasses.dataclass(frozen=True)
class HostNeeds:
    """Auxiliary host inputs a pruner declares: the instruction text per image, an auxiliary CLIP checkpoint."""

    text: bool = False
    clip_path: str | None = None


@dataclasses.dataclass(frozen=True)
class HostInputs:
    """What ``prepare`` receives (host arrays, before tracing).

    config: the model's ``LlavaConfig``; pixel_values (NI, T, C, S, S) (tiles padded to the largest grid) or
    (NI, C, S, S); layouts: the images' ``vlmprune.anyres.ImageLayout`` (NeXT) or None; texts: one instruction
    per image when ``needs.text``; clip: the loaded auxiliary CLIP model when ``needs.clip_path``.
    """

    config: Any
    pixel_values: np.ndarray
    layouts: Sequence[Any] | None = None
    texts: Sequence[str] | None = None
    clip: Any = None


@flax.struct.dataclass
class PruneContext:
    """What ``prune`` sees besides the taps: the config (static), the NeXT layout and the prepared arrays.

    ``config`` may be None for callers that hold the taps only (then each tap is read from its only tapped layer).
    """

    layout: NextLayout | None = None
    aux: dict = flax.struct.field(default_factory=dict)
    config: Any = flax.struct.field(pytree_node=False, default=None)

    def layer(self, value: int | None, name: str) -> int | None:
        """``resolve_layer`` with the config, None without one (the taps' only layer)."""
        return None if self.config is None else resolve_layer(value, self.config, name)

    def aux_array(self, key: str, owner: str) -> Array:
        if key not in self.aux:
            raise ValueError(
                f"{owner}: the prepared input {key!r} is missing; call the pruner's prepare() (the "
                "model does it for you) and pass its result as PruneContext.aux"
            )
        return self.aux[key]


# ----------------------------------------------------------------------------------------------- protocols


class PrunerBase:
    """What both kinds share: a registry ``name`` and host-side ``validate``."""

    name: ClassVar[str] = "base"
    #: True when the method has a LLaVA-NeXT (tiled) form
    supports_next: ClassVar[bool] = False
    #: True when the method runs on LLaVA-OneVision's packed block (docs/methods.md §9.3)
    supports_onevision: ClassVar[bool] = False

    def validate(self, cfg) -> None:
        raise NotImplementedError


def check_select_strategy(name: str, cfg) -> None:
    """Pruning selects patch tokens: the "default" strategy (CLS dropped), or "full" on a tower without a CLS
    token (SigLIP), where every output token is a patch."""
    no_cls = cfg.vision.num_positions == cfg.vision.num_patches
    if cfg.vision_feature_select_strategy != "default" and not no_cls:
        raise ValueError(
            f"{name}: pruning selects patch tokens and needs vision_feature_select_strategy='default' "
            f"(this checkpoint uses {cfg.vision_feature_select_strategy!r}, which also feeds the CLS token)"
        )


def check_family(name: str, cfg, supports_next: bool, supports_onevision: bool = False) -> None:
    """NotImplementedError (raised in ``validate``, before any compile) for a model family the method does not run
    on, naming the reason."""
    if cfg.model_type == "llava_onevision":
        if not supports_onevision:
            raise NotImplementedError(
                f"{name} on LLaVA-OneVision is not implemented: its {type(cfg.vision).__name__} tower has no CLS "
                "token and its images are packed with anyres_max downsampling, and this method's selection is not "
                "defined on that layout yet (docs/methods.md §9.3)"
            )
        return
    if cfg.model_type != "llava" and not supports_next:
        raise NotImplementedError(f"{name} on {cfg.model_type} (anyres tiles) is not implemented yet")


@dataclasses.dataclass(frozen=True)
class VisualPruner(PrunerBase):
    """Base class of pruners acting on the vision tokens. Subclasses implement ``request``, ``budget`` and
    ``prune`` (and ``check`` for their settings)."""

    #: True when ``prune`` reads the post-projector embeddings of every token (``taps.embeddings``)
    projects_all: ClassVar[bool] = False
    needs: ClassVar[HostNeeds] = HostNeeds()

    def request(self, cfg) -> TapRequest:
        return TapRequest(projected=self.projects_all)

    def budget(self, cfg, num_tiles: int | None) -> Budget:
        raise NotImplementedError

    def check(self, cfg) -> None:
        """Range-check the settings against ``cfg`` (ValueError naming the setting)."""

    def validate(self, cfg) -> None:
        check_family(self.name, cfg, self.supports_next, self.supports_onevision)
        check_select_strategy(self.name, cfg)
        if getattr(self, "layout", "official") not in LAYOUTS:
            raise ValueError(f"{self.name}: layout must be one of {LAYOUTS}, got {self.layout!r}")
        self.check(cfg)
        request = self.request(cfg)  # resolves and range-checks the layers
        if request.column_mean_layers and not type(cfg.vision).__name__.startswith("Siglip"):
            raise ValueError(
                f"{self.name}: received-attention column means are not provided by the "
                f"{cfg.vision.__class__.__name__} tower"
            )

    def selects_per_tile(self, cfg) -> bool:
        """LLaVA-OneVision: True when ``prune`` scores each tile's tower tokens (taps of the NI·T tiles); the
        result is then packed as :meth:`spatial_compat` says. False (default): ``prune`` selects on the image's
        post-projector packed block (``taps.embeddings``)."""
        return False

    def spatial_compat(self, cfg) -> bool:
        """LLaVA-OneVision, for a pruner that ``selects_per_tile``: True when ``prune`` returns a ``Selection``
        (NI·T, K) per tile, packed in the spatial-compat layout (docs/methods.md §9.4 mode A); False when it
        returns a ``Selection`` (NI, V) of slots of HF's packed block (mode B, ``ctx.layout`` = the PackTables,
        ``ctx.aux`` = its ``prepare`` arrays). Default True (a pruner that selects per tile and declares nothing
        else is packed tile by tile)."""
        return True

    def tile_packing(self, cfg) -> str:
        """LLaVA-OneVision, for a pruner that ``selects_per_tile``: how its kept tokens are packed, one of
        ``vlmprune.anyres.onevision.TILE_PACKINGS`` ("uncropped": the spatial-compat layout, default; "cropped":
        the same order restricted to HF's unpad crop)."""
        return "uncropped"

    def layout_style(self, cfg) -> tuple[str, Any]:
        """LLaVA-NeXT packing (``vlmprune.anyres.STYLES``) and the pinpoints it uses; default: HF's official."""
        return "official", cfg.image_grid_pinpoints

    def prepare(self, host: HostInputs) -> dict:
        """Host arrays ``prune`` reads from ``ctx.aux`` (see ``needs``); default none."""
        return {}

    def prune(self, taps: VisionTaps, ctx: PruneContext) -> PruneResult:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class LLMPruner(PrunerBase):
    """Base class of pruners acting inside the decoder through a per-layer hook."""

    supports_next: ClassVar[bool] = False

    def validate(self, cfg) -> None:
        check_family(self.name, cfg, self.supports_next, self.supports_onevision)
        check_select_strategy(self.name, cfg)
        self.check(cfg)

    def check(self, cfg) -> None:
        """Range-check the settings against ``cfg`` (ValueError naming the setting)."""

    def decoder_hook(self, cfg, visual: Array, images_per_row: int):
        """A pytree with a static ``layer`` and ``__call__(q, k, key_mask)`` -> int32 (B, T') kept slots, or
        (slots, valid bool (B, T')) to mask kept slots out of the later layers (see ``LlamaForCausalLM``).

        visual bool (B, T): each row's visual slots (on LLaVA-OneVision their number differs between rows)."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------- results


def per_image(sel: Selection, ctx: PruneContext, num_tokens: int) -> Selection:
    """LLaVA-1.5: ``sel`` as is. LLaVA-NeXT: a per-tile selection ((NI·T, K) or (NI, T, K)) over N tokens as one
    selection per image (NI, T·K) over its T·N tile tokens."""
    if ctx.layout is None:
        return sel
    ni, t = ctx.layout.tile_valid.shape
    k = sel.indices.shape[-1]
    idx, valid = tiles_to_image_indices(sel.indices.reshape(ni, t, k), sel.valid.reshape(ni, t, k), num_tokens)
    return Selection(indices=idx, valid=valid)


def keep_all(taps: VisionTaps, ctx: PruneContext) -> PruneResult:
    """Every token kept (no visual pruner)."""
    b, n = taps.features.shape[:2]
    idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    return PruneResult(selection=per_image(Selection(indices=idx, valid=jnp.ones((b, n), bool)), ctx, n))


def tokens_for_llm(result: PruneResult, taps: VisionTaps, project: Callable[[Array], Array]) -> tuple[Array, Array]:
    """LLaVA-1.5: (tokens (B, K + E, D_llm), valid (B, K + E)) from a result: its merged tokens, else the kept rows
    (of the embeddings when the method asked for them, else of the features, then projected), then its appended
    tokens."""
    sel = result.selection
    as_llm = (lambda x: x) if result.projected else project
    if result.tokens is not None:
        tokens, valid = as_llm(result.tokens), result.tokens_valid
    elif taps.embeddings is not None:
        tokens, valid = gather_tokens(taps.embeddings, sel), sel.valid
    else:
        tokens, valid = project(gather_tokens(taps.features, sel)), sel.valid
    if result.appended is not None:
        tokens = jnp.concatenate([tokens, as_llm(result.appended).astype(tokens.dtype)], axis=1)
        valid = jnp.concatenate([valid, result.appended_valid], axis=1)
    return tokens, valid


def image_keep_mask(result: PruneResult, size: int) -> Array:
    """bool (NI, size): dense keep mask of a NeXT result over the tile-token table."""
    return selection_mask(result.selection.indices, result.selection.valid, size)


def tile_keep_mask(result: PruneResult, ctx: PruneContext, num_tokens: int) -> Array:
    """LLaVA-NeXT: bool (NI, T, N) keep mask of a result over every tile's ``num_tokens`` tokens (``ctx.layout``
    gives NI and T)."""
    ni, t = ctx.layout.tile_valid.shape
    return image_keep_mask(result, t * num_tokens).reshape(ni, t, num_tokens)


def slot_count(pruner, cfg, num_tiles: int | None, layout_length: int, num_newlines: int) -> int:
    """Static visual slots of one image: all of them without a (visual) pruner; else the budget (plus the
    newlines its kept tokens can bring on NeXT, at most the full layout) and the appended tokens."""
    if not isinstance(pruner, VisualPruner):
        return layout_length
    b = pruner.budget(cfg, num_tiles)
    if num_tiles is None:
        return b.kept + b.appended
    return min(layout_length, b.kept + num_newlines) + b.appended


# ----------------------------------------------------------------------------------------------- registry


REGISTRY: dict[str, type] = {}


def _key(name: str) -> str:
    return name.lower().replace("-", "_")


def register(cls=None, *, name: str | None = None, replace: bool = False):
    """Class decorator: make a pruner available to ``get(name)`` (its ``name`` class attribute by default).

    The class must be a frozen dataclass deriving from ``VisualPruner`` or ``LLMPruner``. A name already taken
    raises ValueError unless ``replace=True``.
    """

    def add(c):
        if not (isinstance(c, type) and issubclass(c, (VisualPruner, LLMPruner))):
            raise TypeError(f"register: {c!r} is not a VisualPruner or LLMPruner subclass")
        if not dataclasses.is_dataclass(c) or not c.__dataclass_params__.frozen:
            raise TypeError(f"register: {c.__name__} must be a frozen dataclass (settings are static jit arguments)")
        key = _key(name or c.name)
        if key == "base":
            raise ValueError(f"register: {c.__name__} needs a `name` class attribute (or register(name=...))")
        if key in REGISTRY and REGISTRY[key] is not c and not replace:
            raise ValueError(
                f"register: the name {key!r} is taken by {REGISTRY[key].__qualname__}; pass replace=True to override it"
            )
        REGISTRY[key] = c
        return c

    return add if cls is None else add(cls)


def get(name: str, **kwargs):
    """A pruner by registry name with keyword settings, e.g. ``get("vispruner", num_keep=64)``."""
    key = _key(name)
    if key not in REGISTRY:
        raise ValueError(f"unknown pruning method {name!r}; available: {sorted(REGISTRY)}")
    cls = REGISTRY[key]
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(kwargs) - fields)
    if bad:
        raise ValueError(f"{key} does not take {bad}; its settings are {sorted(fields)}")
    return cls(**kwargs)


def check_pruner(pruner):
    """None, or a pruner instance (TypeError otherwise)."""
    if pruner is None or isinstance(pruner, (VisualPruner, LLMPruner)):
        return pruner
    raise TypeError(
        f"pruner must be a vlmprune pruner (e.g. vlmprune.prune.get('vispruner', num_keep=64)), got {pruner!r}"
    )


def check_keep(name: str, num_keep, n: int) -> int:
    return checks.check_int("num_keep", num_keep, lo=1, hi=n, where=name)
