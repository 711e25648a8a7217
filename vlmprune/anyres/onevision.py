"""LLaVA-OneVision visual-token geometry and packing, computed on the host from the image size.

What HF's ``LlavaOnevisionModel.pack_image_features`` does with one image's projected tile features
``(1 + rows·cols, n², D)`` (``n`` tokens per tile side), restated so one compiled program serves every image size:
  1. the base tile's ``n²`` tokens come first, in raster order;
  2. the ``rows × cols`` grid tiles are stitched into a ``(rows·n, cols·n)`` map (tiles row-major) and cropped
     back to the image's aspect ratio with HF's unpad rule (``int(round(x, 7))``, a symmetric crop);
  3. when the cropped map holds more than ``1.1² · N_max · n²`` tokens (``vision_aspect_ratio =
     "anyres_max_N_max"``) it is resized with torch's bilinear rule (``align_corners=False``, no antialias) to
     ``(int(uh // ratio), int(uw // ratio))``, ``ratio = sqrt(uh·uw / (N_max·n²))``;
  4. every row of the (resized) map is followed by one ``image_newline``; there is no newline after the base.
Everything above depends only on ``(height, width)`` and the pinpoints, never on pixel values. The host turns it
into gather tables (:class:`PackTables`): each packed slot reads up to four entries of the image's tile-token
table (``tile · n² + patch``) with bilinear weights, or is a newline, or padding. The device step
(:func:`pack_image_features`) is one fixed-shape gather-and-blend for every grid, with tiles padded to the
largest grid (``tile_valid`` marks the real ones).

Video (HF ``get_video_features`` / ``apply_pooling``): each frame's ``n × n`` map is resized bilinearly to
``ceil(n/2) × ceil(n/2)``, the frames are concatenated, and one newline closes the whole video.

The grid convention is ``(rows, cols)`` and pinpoints are ``(height, width)`` pixels, as HF's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vlmprune.anyres.geometry import grid_for, unpad_bounds

Array = jax.Array

_ANYRES_MAX = re.compile(r"anyres_max_(\d+)")


def anyres_max(vision_aspect_ratio: str) -> int:
    """The token budget factor ``N_max`` of ``"anyres_max_N_max"`` (HF strips the prefix's characters; we
    require the exact form so a value HF would misread is refused). Raises ValueError naming the value."""
    m = _ANYRES_MAX.fullmatch(str(vision_aspect_ratio))
    if m is None or int(m.group(1)) < 1:
        raise ValueError(
            f"vision_aspect_ratio must look like 'anyres_max_<N>' with N >= 1, got {vision_aspect_ratio!r}"
        )
    return int(m.group(1))


@dataclasses.dataclass(frozen=True)
class OnevisionGeometry:
    """Static facts of a OneVision model's visual layout.

    tile_size: tower input side in pixels (``vision_config.image_size``, 384);
    tokens_per_side: ``image_size // patch_size`` (27);
    pinpoints: candidate canvases, (height, width) pixels, multiples of ``tile_size``;
    max_num: ``N_max`` of ``vision_aspect_ratio`` (9).
    """

    tile_size: int
    tokens_per_side: int
    pinpoints: tuple[tuple[int, int], ...]
    max_num: int = 9

    def __post_init__(self):
        for name in ("tile_size", "tokens_per_side", "max_num"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"OnevisionGeometry: {name} must be a positive int, got {v!r}")
        pins = tuple(tuple(int(x) for x in p) for p in self.pinpoints)
        if not pins:
            raise ValueError("OnevisionGeometry: image_grid_pinpoints must not be empty")
        for i, p in enumerate(pins):
            if len(p) != 2 or min(p) < self.tile_size or p[0] % self.tile_size or p[1] % self.tile_size:
                raise ValueError(
                    f"OnevisionGeometry: image_grid_pinpoints[{i}] = {list(p)} must be a (height, width) "
                    f"pair of positive multiples of tile_size={self.tile_size}"
                )
        object.__setattr__(self, "pinpoints", pins)

    @classmethod
    def from_hf(cls, hf_config) -> OnevisionGeometry:
        """From a ``transformers.LlavaOnevisionConfig``."""
        vc = hf_config.vision_config
        return cls(
            tile_size=int(vc.image_size),
            tokens_per_side=int(vc.image_size // vc.patch_size),
            pinpoints=tuple(tuple(p) for p in hf_config.image_grid_pinpoints),
            max_num=anyres_max(getattr(hf_config, "vision_aspect_ratio", "anyres_max_9")),
        )

    @property
    def tokens_per_tile(self) -> int:
        return self.tokens_per_side**2

    @property
    def max_tiles(self) -> int:
        """Static tile axis: the largest grid's tiles plus the base tile."""
        return 1 + max((h // self.tile_size) * (w // self.tile_size) for h, w in self.pinpoints)

    def grids(self) -> tuple[tuple[int, int], ...]:
        """Every (rows, cols) grid the pinpoints allow, in pinpoint order."""
        return tuple(dict.fromkeys((h // self.tile_size, w // self.tile_size) for h, w in self.pinpoints))


def downsampled_size(uh: int, uw: int, tokens_per_side: int, max_num: int) -> tuple[int, int]:
    """Size of the packed grid map for an unpadded ``(uh, uw)`` map: itself unless ``ratio > 1.1``, then
    ``(int(uh // ratio), int(uw // ratio))`` with ``ratio = sqrt(uh·uw / (max_num · n²))`` (Python floats, as HF)."""
    ratio = math.sqrt(uh * uw / (max_num * tokens_per_side**2))
    if ratio > 1.1:
        return int(uh // ratio), int(uw // ratio)
    return uh, uw


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """Host layout of one image: grid, crop of the stitched map (token rows top:bottom, columns left:right), the
    packed map size ``out_hw`` and whether it was resized. ``tiled=False``: an image of a several-image prompt,
    which HF does not tile (one tile, its tokens, one newline; grid and crop are all 0)."""

    image_size_hw: tuple[int, int]
    rows: int
    cols: int
    top: int
    bottom: int
    left: int
    right: int
    out_hw: tuple[int, int]
    tokens_per_side: int
    tiled: bool = True

    @property
    def num_tiles(self) -> int:
        """Tiles the processor produces for this image: the base plus the grid."""
        return 1 + self.rows * self.cols

    @property
    def unpadded_hw(self) -> tuple[int, int]:
        return self.bottom - self.top, self.right - self.left

    @property
    def downsampled(self) -> bool:
        return self.out_hw != self.unpadded_hw

    @property
    def num_tokens(self) -> int:
        """Packed visual tokens ``n² + oh·(ow + 1)`` (HF's ``_get_number_of_features``); ``n² + 1`` untiled."""
        if not self.tiled:
            return self.tokens_per_side**2 + 1
        oh, ow = self.out_hw
        return self.tokens_per_side**2 + oh * (ow + 1)


def image_layout(image_size_hw: Sequence[int], geom: OnevisionGeometry, *, tiled: bool = True) -> ImageLayout:
    """The layout of one image of (height, width) pixels. ``tiled=False`` for each image of a prompt with several
    images (HF's ``batch_num_images > 1``). Raises ValueError for a non-positive size."""
    size = tuple(int(v) for v in image_size_hw)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image size must be (height, width) with positive entries, got {tuple(image_size_hw)}")
    n = geom.tokens_per_side
    if not tiled:
        return ImageLayout(size, 0, 0, 0, 0, 0, 0, (0, 0), n, tiled=False)
    g = grid_for(size, geom.pinpoints, tile_size=geom.tile_size)  # (height, width) pinpoints, as HF
    rows, cols = g.rows, g.cols
    top, bottom, left, right = unpad_bounds(size, (rows * n, cols * n), rule="hf")
    out = downsampled_size(bottom - top, right - left, n, geom.max_num)
    return ImageLayout(size, rows, cols, top, bottom, left, right, out, n)


def max_tokens_per_image(geom: OnevisionGeometry) -> int:
    """A static upper bound on :attr:`ImageLayout.num_tokens` over all image sizes: every grid of the pinpoints
    and every symmetric crop of its stitched map (rows or columns), each through the downsampling rule. Not every
    crop is reachable from an image size, so the bound can exceed the largest real count."""
    n = geom.tokens_per_side
    best = n * n + 1  # an untiled image
    for rows, cols in geom.grids():
        gh, gw = rows * n, cols * n
        shapes = [(gh - 2 * p, gw) for p in range(gh // 2 + 1)] + [(gh, gw - 2 * p) for p in range(gw // 2 + 1)]
        for uh, uw in shapes:
            oh, ow = downsampled_size(uh, uw, n, geom.max_num) if uh * uw else (uh, uw)
            best = max(best, n * n + oh * (ow + 1))
    return best


def bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's ``upsample_bilinear2d`` source indices and weights along one axis (``align_corners=False``, sizes
    given), bit for bit: ``src = max(fma(scale, o + 0.5, −0.5), 0)`` rounded once to float32, with the float32
    ``scale = n_in / n_out`` (torch's CPU build contracts the multiply-add into one FMA; a separately rounded
    product moves some weights by an ulp of ``src``, up to 4e-6 at OneVision's sizes); ``i0 = floor(src)``,
    ``i1 = i0 + 1`` clamped to ``n_in − 1``, ``λ1 = src − i0``, ``λ0 = 1 − λ1`` (float32).

    The fused step is computed in float64, where it is exact for sizes below 4096 (the product of a float32
    scale >= 2**-12 and ``o + 0.5`` spans < 50 bits), then rounded to float32 once.
    Returns (i0 int32, i1 int32, λ0 float32, λ1 float32), each (n_out,).
    """
    if not (1 <= n_in < 4096 and 1 <= n_out < 4096):
        raise ValueError(f"bilinear_axis: sizes must be in [1, 4096), got {n_in} -> {n_out}")
    f32 = np.float32
    scale = np.float64(f32(n_in) / f32(n_out))
    src = (scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(f32)
    src = np.maximum(src, f32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    l1 = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)
    l0 = (f32(1) - l1).astype(f32)
    if n_in == n_out:  # torch copies
        i0 = i1 = np.arange(n_out)
        l0, l1 = np.ones(n_out, f32), np.zeros(n_out, f32)
    return i0.astype(np.int32), i1.astype(np.int32), l0, l1


def resize_bilinear(x: Array, out_hw: tuple[int, int]) -> Array:
    """x (..., H, W, D) -> (..., oh, ow, D), torch ``F.interpolate(mode="bilinear")`` (no antialias), blended in
    torch's order ``λh0·(λw0·x00 + λw1·x01) + λh1·(λw0·x10 + λw1·x11)``."""
    h, w = x.shape[-3], x.shape[-2]
    r0, r1, a0, a1 = bilinear_axis(h, out_hw[0])
    c0, c1, b0, b1 = bilinear_axis(w, out_hw[1])
    dt = x.dtype
    a0, a1 = (jnp.asarray(v, dt)[:, None, None] for v in (a0, a1))
    b0, b1 = (jnp.asarray(v, dt)[None, :, None] for v in (b0, b1))
    rows0, rows1 = jnp.take(x, r0, axis=-3), jnp.take(x, r1, axis=-3)
    x00, x01 = jnp.take(rows0, c0, axis=-2), jnp.take(rows0, c1, axis=-2)
    x10, x11 = jnp.take(rows1, c0, axis=-2), jnp.take(rows1, c1, axis=-2)
    return a0 * (b0 * x00 + b1 * x01) + a1 * (b0 * x10 + b1 * x11)


@flax.struct.dataclass
class PackTables:
    """Gather tables of a batch of images (NI images, V packed slots each; NumPy on the host, any array type).

    src: int32 (NI, V, 4) entries of the image's tile-token table (``tile · n² + patch``) read by each slot, in
      the order (top-left, top-right, bottom-left, bottom-right);
    hw: float32 (NI, V, 2) row weights (λh0, λh1); ww: float32 (NI, V, 2) column weights (λw0, λw1); a slot
      that copies one token has src repeated and weights (1, 0);
    newline: bool (NI, V) slots that hold ``image_newline``; valid: bool (NI, V) real slots (False = padding);
    tile_valid: bool (NI, T_max) tiles the processor produced for each image.
    """

    src: Array
    hw: Array
    ww: Array
    newline: Array
    valid: Array
    tile_valid: Array


def _image_tables(lay: ImageLayout, length: int):
    n = lay.tokens_per_side
    nn_ = n * n
    src = np.zeros((length, 4), np.int32)
    hw = np.zeros((length, 2), np.float32)
    ww = np.zeros((length, 2), np.float32)
    newline = np.zeros(length, bool)
    valid = np.zeros(length, bool)
    v = lay.num_tokens
    if v > length:
        raise ValueError(f"image {lay.image_size_hw} packs into {v} tokens, more than the table length {length}")
    src[:nn_] = np.arange(nn_, dtype=np.int32)[:, None]
    hw[:nn_], ww[:nn_] = (1, 0), (1, 0)
    if not lay.tiled:
        newline[nn_] = True
    uh, uw = lay.unpadded_hw
    oh, ow = lay.out_hw
    if oh:  # (an extreme aspect ratio can crop the map to zero columns: its rows still get their newlines)
        if lay.downsampled:
            r0, r1, a0, a1 = bilinear_axis(uh, oh)
            c0, c1, b0, b1 = bilinear_axis(uw, ow)
        else:
            r0 = r1 = np.arange(oh)
            c0 = c1 = np.arange(ow)
            a0, a1 = np.ones(oh, np.float32), np.zeros(oh, np.float32)
            b0, b1 = np.ones(ow, np.float32), np.zeros(ow, np.float32)

        def token(r, c):  # unpadded map (r, c) -> tile-token index, (oh, ow) broadcast
            y, x = lay.top + r[:, None], lay.left + c[None, :]
            return (1 + (y // n) * lay.cols + x // n) * nn_ + (y % n) * n + x % n

        grid = np.stack([token(r0, c0), token(r0, c1), token(r1, c0), token(r1, c1)], axis=-1)  # (oh, ow, 4)
        per_row = ow + 1
        body = np.zeros((oh, per_row, 4), np.int32)
        body[:, :ow] = grid
        body_hw = np.zeros((oh, per_row, 2), np.float32)
        body_hw[:, :ow] = np.stack([a0, a1], -1)[:, None, :]
        body_ww = np.zeros((oh, per_row, 2), np.float32)
        body_ww[:, :ow] = np.stack([b0, b1], -1)[None, :, :]
        nl = np.zeros((oh, per_row), bool)
        nl[:, ow] = True
        src[nn_:v] = body.reshape(-1, 4)
        hw[nn_:v] = body_hw.reshape(-1, 2)
        ww[nn_:v] = body_ww.reshape(-1, 2)
        newline[nn_:v] = nl.reshape(-1)
    valid[:v] = True
    return src, hw, ww, newline, valid


def pack_tables(
    image_sizes_hw, geom: OnevisionGeometry, length: int | None = None, tiled: bool | Sequence[bool] = True
) -> PackTables:
    """Host tables for a batch of images of (height, width) pixels.

    length: packed slots per image (static); default :func:`max_tokens_per_image`, so that every image size
    shares one shape. tiled: per image (or one value for all), False for the images of a several-image prompt.
    Raises ValueError when an image needs more slots than ``length``.
    """
    sizes = np.asarray(image_sizes_hw).reshape(-1, 2).tolist()
    if not sizes:
        raise ValueError("pack_tables: no image sizes given")
    tiled = [bool(tiled)] * len(sizes) if isinstance(tiled, (bool, np.bool_)) else [bool(t) for t in tiled]
    if len(tiled) != len(sizes):
        raise ValueError(f"pack_tables: tiled has {len(tiled)} entries for {len(sizes)} images")
    length = max_tokens_per_image(geom) if length is None else int(length)
    lays = [image_layout(s, geom, tiled=t) for s, t in zip(sizes, tiled)]
    parts = [_image_tables(lay, length) for lay in lays]
    tile_valid = np.zeros((len(lays), geom.max_tiles), bool)
    for i, lay in enumerate(lays):
        tile_valid[i, : lay.num_tiles] = True
    src, hw, ww, newline, valid = (np.stack(z) for z in zip(*parts))
    return PackTables(src=src, hw=hw, ww=ww, newline=newline, valid=valid, tile_valid=tile_valid)


def pack_image_features(tile_features: Array, image_newline: Array, tables: PackTables) -> Array:
    """Packed visual block of each image (jit-friendly, one shape for every grid).

    tile_features: (NI, T_max, n², D) projected features, tile 0 = base, then the grid row-major (padding tiles
      are never read); image_newline: (D,); tables: :func:`pack_tables` for the same images.
    Returns (NI, V, D): image ``i``'s first ``tables.valid[i].sum()`` rows equal HF's packed features, the rest 0.
    """
    ni, t, nn_, d = tile_features.shape
    v = tables.src.shape[1]
    chex.assert_shape(image_newline, (d,))
    chex.assert_shape(tables.src, (ni, v, 4))
    chex.assert_shape(tables.tile_valid, (ni, t))
    flat = tile_features.reshape(ni, t * nn_, d)
    dt = tile_features.dtype

    def take(k):
        return jnp.take_along_axis(flat, tables.src[:, :, k, None], axis=1)

    hw, ww = jnp.asarray(tables.hw, dt)[..., None], jnp.asarray(tables.ww, dt)[..., None]
    top = ww[:, :, 0] * take(0) + ww[:, :, 1] * take(1)
    bottom = ww[:, :, 0] * take(2) + ww[:, :, 1] * take(3)
    out = hw[:, :, 0] * top + hw[:, :, 1] * bottom
    out = jnp.where(tables.newline[..., None], image_newline.astype(dt), out)
    return jnp.where(tables.valid[..., None], out, jnp.zeros((), dt))


#: how a per-tile pruner's kept tokens are laid out on OneVision (``VisualPruner.tile_packing``): base tile first in
#: raster order, then the stitched grid in global raster order, all of it ("uncropped", docs/methods.md §9.4 mode A)
#: or only the tokens inside HF's unpad crop ("cropped", HiRED's packing, §9.3.6). Neither adds newlines or
#: downsamples.
TILE_PACKINGS = ("uncropped", "cropped")


def spatial_ranks(layouts: Sequence[ImageLayout], num_tiles: int, packing: str = "uncropped") -> np.ndarray:
    """int32 (NI, num_tiles·n²): each tile token's place in a per-tile packing (:data:`TILE_PACKINGS`).

    The base tile's tokens come first in raster order, then the grid tiles stitched into one
    ``(n·rows, n·cols)`` map in global raster order; tokens of padding tiles (past an image's own) rank last.
    ``packing="cropped"``: grid tokens outside the image's unpad crop (:func:`image_layout`, HF's rounding) get
    rank -1, i.e. the layout drops them. Sorting an image's kept tile tokens of rank >= 0 by these ranks gives its
    packed block (no newline, no downsampling)."""
    if packing not in TILE_PACKINGS:
        raise ValueError(f"spatial_ranks: packing must be one of {TILE_PACKINGS}, got {packing!r}")
    rows = []
    for lay in layouts:
        n = lay.tokens_per_side
        nn = n * n
        y, x = np.divmod(np.arange(nn), n)
        ranks = np.empty((num_tiles, nn), np.int64)
        ranks[0] = np.arange(nn)
        for t in range(1, num_tiles):
            if t < lay.num_tiles:
                tr, tc = divmod(t - 1, lay.cols)
                gy, gx = tr * n + y, tc * n + x  # position on the stitched map
                ranks[t] = nn + gy * (lay.cols * n) + gx
                if packing == "cropped":
                    inside = (gy >= lay.top) & (gy < lay.bottom) & (gx >= lay.left) & (gx < lay.right)
                    ranks[t] = np.where(inside, ranks[t], -1)
            else:
                ranks[t] = t * nn + np.arange(nn) + num_tiles * nn
        rows.append(ranks.reshape(-1))
    return np.stack(rows).astype(np.int32)


def grid_table(layouts: Sequence[ImageLayout]) -> np.ndarray:
    """int32 (NI, 2): each image's tile grid ``(rows, cols)`` (0, 0 for an untiled image)."""
    return np.asarray([(lay.rows, lay.cols) for lay in layouts], np.int32).reshape(-1, 2)


def video_pooled_side(tokens_per_side: int) -> int:
    """Side of a frame's pooled map: ``ceil(n / 2)`` (14 for 27)."""
    return -(-tokens_per_side // 2)


def video_num_tokens(num_frames: int, tokens_per_side: int) -> int:
    """Visual tokens of a video: ``F · ceil(n/2)² + 1`` (one newline after the last frame)."""
    return num_frames * video_pooled_side(tokens_per_side) ** 2 + 1


def pack_video_features(frame_features: Array, image_newline: Array) -> Array:
    """frame_features (B, F, n², D) projected -> (B, F·m² + 1, D), m = ceil(n/2): each frame's n×n map resized
    bilinearly (torch's rule, :func:`resize_bilinear`), frames in order, then one newline."""
    b, f, nn_, d = frame_features.shape
    n = math.isqrt(nn_)
    if n * n != nn_:
        raise ValueError(f"pack_video_features: {nn_} tokens per frame is not a square map")
    chex.assert_shape(image_newline, (d,))
    m = video_pooled_side(n)
    pooled = resize_bilinear(frame_features.reshape(b, f, n, n, d), (m, m)).reshape(b, f * m * m, d)
    nl = jnp.broadcast_to(image_newline.astype(pooled.dtype), (b, 1, d))
    return jnp.concatenate([pooled, nl], axis=1)


# --- the checkpoint's image-processor facts --------------------------------------------------------------------

#: ``LlavaOnevisionImageProcessor``'s class defaults (OpenAI CLIP's statistics), which HF applies to any key a
#: checkpoint's preprocessor config leaves out. The released checkpoints store SigLIP's 0.5 / 0.5 instead.
CLASS_DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLASS_DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)
#: the class-default canvases: (384·a, 384·b) for a, b in 1..6, a-major
CLASS_DEFAULT_PINPOINTS = tuple((384 * a, 384 * b) for a in range(1, 7) for b in range(1, 7))


@dataclasses.dataclass(frozen=True)
class ProcessorFacts:
    """What the image processor of a OneVision checkpoint does, read from its own config file.

    image_mean / image_std: per-channel normalisation after ``rescale_factor``; tile_size: side of every tile
    (``size["height"]``); pinpoints: (height, width) canvases; resample: PIL resampling id (3 = bicubic).
    """

    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    tile_size: int
    pinpoints: tuple[tuple[int, int], ...]
    resample: int

    def num_tiles(self, image_size_hw: Sequence[int]) -> int:
        """Tiles the processor emits for one image (single-image prompt): the base plus the grid."""
        return grid_for(tuple(int(v) for v in image_size_hw), self.pinpoints, tile_size=self.tile_size).num_tiles


def read_processor_facts(directory: str) -> ProcessorFacts:
    """Read ``preprocessor_config.json`` (or the ``image_processor`` entry of ``processor_config.json``) of a
    checkpoint directory; absent keys take the HF class defaults. Raises FileNotFoundError / ValueError naming
    the file and field."""
    cfg = None
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path) as fh:
                data = json.load(fh)
            data = data.get(key) if key else data
            if isinstance(data, dict):
                cfg, where = data, path
                break
    if cfg is None:
        raise FileNotFoundError(
            f"{directory}: no preprocessor_config.json (nor an image_processor entry in processor_config.json)"
        )

    def triple(field, default):
        v = cfg.get(field, default)
        v = (v,) * 3 if isinstance(v, (int, float)) else tuple(v)
        if len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
            raise ValueError(f"{where}: {field} must be 3 numbers, got {cfg.get(field)!r}")
        return tuple(float(x) for x in v)

    mean, std = triple("image_mean", CLASS_DEFAULT_MEAN), triple("image_std", CLASS_DEFAULT_STD)
    if min(std) <= 0:
        raise ValueError(f"{where}: image_std must be > 0, got {list(std)}")
    size = cfg.get("size", {"height": 384, "width": 384})
    crop = cfg.get("crop_size") or {}
    tile = crop.get("height") or size.get("height") or size.get("shortest_edge")
    if not isinstance(tile, int) or tile < 1 or (size.get("width") not in (None, size.get("height"))):
        raise ValueError(f"{where}: size must be a square {{'height': s, 'width': s}} tile, got {size!r}")
    pins = cfg.get("image_grid_pinpoints", CLASS_DEFAULT_PINPOINTS)
    if not pins or not all(len(p) == 2 for p in pins):
        raise ValueError(
            f"{where}: image_grid_pinpoints must be a non-empty list of (height, width) pairs, got {pins!r}"
        )
    return ProcessorFacts(
        image_mean=mean,
        image_std=std,
        rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
        tile_size=int(tile),
        pinpoints=tuple(tuple(int(x) for x in p) for p in pins),
        resample=int(cfg.get("resample", 3)),
    )


# --- a batch of OneVision images, planned on the host ---------------------------------------------------------


def geometry(config) -> OnevisionGeometry:
    """The :class:`OnevisionGeometry` of a frozen ``LlavaConfig`` of model type ``llava_onevision``."""
    v = config.vision
    return OnevisionGeometry(
        tile_size=int(v.image_size),
        tokens_per_side=int(v.image_size // v.patch_size),
        pinpoints=tuple(tuple(p) for p in config.image_grid_pinpoints),
        max_num=anyres_max(config.vision_aspect_ratio),
    )


@dataclasses.dataclass(frozen=True)
class OnevisionBatch:
    """Host layout of a batch of OneVision images: one :class:`ImageLayout` per image and the gather tables
    (NumPy) of their packed blocks, ``length`` slots each."""

    layouts: tuple[ImageLayout, ...]
    pack: PackTables
    length: int

    def tables(self) -> PackTables:
        """The tables as device arrays (what the jitted pack step takes)."""
        return jax.tree.map(jnp.asarray, self.pack)


def onevision_batch(config, pixel_values, image_sizes) -> tuple[np.ndarray, OnevisionBatch, list[int]]:
    """Plan a batch of single-image prompts (HF's tiled path) on the host.

    pixel_values: (NI, T, C, S, S) as the processor returns them (tile axis padded to the batch maximum);
    image_sizes: (NI, 2) original (height, width).
    Returns (pixels (NI, T_max, C, S, S) float32, zero tiles after each image's own, T_max = the largest grid's
    tiles + 1 so that one compiled tower serves every grid; the batch layout with ``length`` = the largest packed
    block of the batch; the packed token count of every image, i.e. its ``<image>`` placeholders).

    Raises ValueError naming the image when sizes are missing or mis-shaped, or an image has fewer tiles than its
    grid needs.
    """
    geom = geometry(config)
    if image_sizes is None:
        raise ValueError("image_sizes (num_images, 2) as (height, width) is required for LLaVA-OneVision inputs")
    sizes = np.asarray(image_sizes)
    ni = pixel_values.shape[0]
    if sizes.shape != (ni, 2):
        raise ValueError(f"image_sizes must have shape ({ni}, 2) (one (height, width) per image), got {sizes.shape}")
    lays = tuple(image_layout(s, geom) for s in sizes.tolist())
    for i, lay in enumerate(lays):
        if lay.num_tiles > pixel_values.shape[1]:
            raise ValueError(
                f"image {i} of size {tuple(sizes[i])} needs {lay.num_tiles} tiles ({lay.rows}x{lay.cols} "
                f"grid + base) but pixel_values holds {pixel_values.shape[1]}"
            )
    t_max = geom.max_tiles
    if pixel_values.shape[1] > t_max:
        raise ValueError(
            f"pixel_values holds {pixel_values.shape[1]} tiles per image; the pinpoints allow at most {t_max}"
        )
    pix = np.zeros((ni, t_max) + tuple(pixel_values.shape[2:]), np.float32)
    pix[:, : pixel_values.shape[1]] = np.asarray(pixel_values, np.float32)
    # padding tiles past an image's own are zero: HF cuts them off, and the pack tables never read them
    for i, lay in enumerate(lays):
        pix[i, lay.num_tiles :] = 0
    counts = [lay.num_tokens for lay in lays]
    length = max(counts)
    return pix, OnevisionBatch(lays, pack_tables(sizes, geom, length=length), length), counts


# --- a batch of OneVision videos, planned on the host ---------------------------------------------------------


def video_tables(num_frames: Sequence[int], tokens_per_side: int, length: int | None = None) -> PackTables:
    """:class:`PackTables` of a batch of videos, so that :func:`pack_image_features` packs them as HF's
    ``get_video_features`` does (the gather form of :func:`pack_video_features`).

    The tile axis holds the frames (``num_frames`` per video, padded to the batch maximum); each frame's ``n × n``
    map is resized with torch's bilinear weights to ``m × m`` (``m = ceil(n/2)``), frames in order, then one
    newline: ``F·m² + 1`` slots, padded to ``length`` (default: the largest video of the batch).
    Raises ValueError for a video without frames or a ``length`` too short.
    """
    frames = [int(f) for f in num_frames]
    if not frames or min(frames) < 1:
        raise ValueError(f"video_tables: every video needs at least one frame, got frame counts {frames}")
    n = int(tokens_per_side)
    m = video_pooled_side(n)
    counts = [video_num_tokens(f, n) for f in frames]
    length = max(counts) if length is None else int(length)
    if max(counts) > length:
        raise ValueError(f"video_tables: a video packs into {max(counts)} tokens, more than the length {length}")
    r0, r1, a0, a1 = bilinear_axis(n, m)
    top = np.stack([r0[:, None] * n + r0[None, :], r0[:, None] * n + r1[None, :]], -1)  # rows r0, cols c0 / c1
    bottom = np.stack([r1[:, None] * n + r0[None, :], r1[:, None] * n + r1[None, :]], -1)
    patch = np.concatenate([top, bottom], -1).reshape(m * m, 4)  # (tl, tr, bl, br); square maps: one axis table
    hw1 = np.stack([a0, a1], -1)[:, None, :].repeat(m, 1).reshape(m * m, 2)
    ww1 = np.stack([a0, a1], -1)[None, :, :].repeat(m, 0).reshape(m * m, 2)
    nv, f_max = len(frames), max(frames)
    src = np.zeros((nv, length, 4), np.int32)
    hw = np.zeros((nv, length, 2), np.float32)
    ww = np.zeros((nv, length, 2), np.float32)
    newline = np.zeros((nv, length), bool)
    valid = np.zeros((nv, length), bool)
    tile_valid = np.zeros((nv, f_max), bool)
    for i, f in enumerate(frames):
        k = f * m * m
        src[i, :k] = (patch[None] + (np.arange(f) * n * n)[:, None, None]).reshape(k, 4)
        hw[i, :k] = np.tile(hw1, (f, 1))
        ww[i, :k] = np.tile(ww1, (f, 1))
        newline[i, k] = True
        valid[i, : k + 1] = True
        tile_valid[i, :f] = True
    return PackTables(src=src, hw=hw, ww=ww, newline=newline, valid=valid, tile_valid=tile_valid)


@dataclasses.dataclass(frozen=True)
class VideoBatch:
    """Host layout of a batch of OneVision videos: frames per video, the gather tables (NumPy) of their packed
    blocks (``length`` slots each) and the packed token count of each (its ``<video>`` placeholders)."""

    num_frames: tuple[int, ...]
    pack: PackTables
    length: int
    counts: tuple[int, ...]

    def tables(self) -> PackTables:
        """The tables as device arrays (what the jitted pack step takes)."""
        return jax.tree.map(jnp.asarray, self.pack)


def onevision_video_batch(config, pixel_values_videos) -> tuple[np.ndarray, VideoBatch]:
    """Plan a batch of videos on the host: pixel_values_videos (NV, F, C, S, S) as the video processor returns
    them (every video of a batch has the same frame count F, as HF's ``get_video_features`` requires).

    Returns (pixels float32 (NV, F, C, S, S), the batch layout). The caller checks shapes and values first.
    """
    nv, f = pixel_values_videos.shape[:2]
    n = int(config.vision.image_size // config.vision.patch_size)
    pack = video_tables([f] * nv, n)
    counts = tuple(video_num_tokens(f, n) for _ in range(nv))
    return np.asarray(pixel_values_videos, np.float32), VideoBatch((f,) * nv, pack, max(counts), counts)
