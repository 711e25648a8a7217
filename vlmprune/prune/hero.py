"""HERO: visual-token early dropping for high-resolution LVLMs (Li et al., arXiv 2509.13067). ``docs/methods.md`` §4.

One LLaVA-NeXT anyres image = a squashed global thumbnail (tile 0) plus ``K = cols * rows`` local tiles. HERO
(§4.3, exactly as the authors' code at ``41cc334``):

1. Patch scores by a *double softmax*: the CLS-query attention rows (already probabilities over 577 keys, CLS
   column dropped without renormalising) go through another softmax over the N patches, per layer and head; then
   the mean over heads, then the mean over layers. Thumbnail: the *high* layers, ``g (N,)``; tiles: the *low*
   layers, ``s (K, N)``.
2. Tile saliency ``sim = softmax_K(cos(z_t, z_0) / T_cls)`` from last-layer CLS vectors ``z``.
3. Task relevance ``clip = softmax_K(cos(u_t, v) / T_clip)`` from a full CLIP model's image/text embeddings.
4. Density ``d = (cnt / N) / (Σ (cnt / N) + 1e-6)`` from the valid (non-padding) token count of each tile
   (host-side rule: :func:`vlmprune.prune.anyres.hero_valid_mask`).
5. ``fused = 0.2 d + 0.8 (alpha sim + (1 - alpha) clip)``.
6. Budgets: thumbnail ``N_global = int(N * R)`` (static); tile t ``b_t = min(trunc(fused_t * N_local), cnt_t)``
   with ``N_local = int(K * N * R)`` (static); nothing is redistributed, so ``Σ b_t <= N_local``.
7. Thumbnail keeps its ``N_global`` best ``g``; tile t keeps its ``b_t`` best ``s_t`` among valid tokens only.
8. Packing (§4.3-9): thumbnail kept tokens (raster), then for every stitched-grid row the kept tokens of that row
   left to right across the tiles, then one ``image_newline`` — for *every* row, padding rows included.

Static vs traced: the grid (through the shapes K and, for packing, ``grid_cols_rows``), ``keep_ratio`` (so
``N_global``, ``N_local``), ``alpha``, the temperatures and ``tokens_per_side`` are static Python values (changing
one recompiles); scores, budgets, masks and the packed length are traced. Everything is float32, as the golden run.

Tie rule: equal scores go to the lower token index (``lax.top_k`` order); ``torch.topk`` leaves it unspecified, so
parity is defined on tie-free float32 inputs (§4.6: fp16 scores tie heavily after the double softmax).

Zero budgets: a tile with ``b_t = 0`` (truncation) or ``cnt_t = 0`` (all padding) keeps nothing; its row of
``valid`` is all False. The thumbnail always keeps exactly ``N_global``.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from vlmprune import checks
from vlmprune.prune.ops import divide, l2_normalize, mean, no_fma, top_budget_selection
from vlmprune.prune.selection import Selection

#: HERO's hard-coded density weight (§4.3-6).
DENSITY_WEIGHT = 0.2


@flax.struct.dataclass
class HeroSelection(Selection):
    """A :class:`Selection` over the ``1 + K`` tiles (row 0 = thumbnail) plus HERO's budgets and scores.

    All fields may carry extra leading batch dims (``...``) in the batched form.

    Attributes:
      indices: int32 (..., 1+K, K_max), ascending kept indices per tile; fill value N in invalid slots.
      valid: bool (..., 1+K, K_max); row t has exactly ``budgets[..., t]`` True slots.
      budgets: int32 (..., 1+K). ``N_global`` for the thumbnail, ``b_t`` for tiles 1..K.
      valid_counts: int32 (..., K). Valid (non-padding) tokens per tile, ``cnt``.
      global_scores: float32 (..., N). Thumbnail double-softmax scores ``g``.
      sub_scores: float32 (..., K, N). Tile double-softmax scores ``s``.
      similarity: float32 (..., K). CLS saliency softmax ``sim``.
      clip: float32 (..., K). CLIP text-relevance softmax.
      density: float32 (..., K). Normalised valid-token density ``d``.
      fused: float32 (..., K). Fused tile score.
    """

    budgets: jax.Array
    valid_counts: jax.Array
    global_scores: jax.Array
    sub_scores: jax.Array
    similarity: jax.Array
    clip: jax.Array
    density: jax.Array
    fused: jax.Array


# ----------------------------------------------------------------------------------------------------------------
# Host-side static sizes.
# ----------------------------------------------------------------------------------------------------------------


def hero_budget_sizes(num_local_tiles: int, keep_ratio: float, num_tokens: int = 576) -> tuple[int, int]:
    """``(N_global, N_local) = (int(N * R), int(K * N * R))`` in Python float64 (§4.3-7).

    E.g. R = 0.3: N_global = 172, and N_local = 518 for K = 3.
    """
    where = "hero_budget_sizes"
    k = checks.check_int("num_local_tiles", num_local_tiles, lo=1, where=where)
    n = checks.check_int("num_tokens", num_tokens, lo=1, where=where)
    r = checks.check_float("keep_ratio", keep_ratio, lo=0.0, hi=1.0, lo_open=True, where=where)
    return int(n * r), int(k * n * r)


def hero_max_keep(num_local_tiles: int, keep_ratio: float, num_tokens: int = 576) -> int:
    """Static slot count ``K_max = max(N_global, min(N, N_local))`` of a :class:`HeroSelection`."""
    n_global, n_local = hero_budget_sizes(num_local_tiles, keep_ratio, num_tokens)
    return max(n_global, min(num_tokens, n_local))


# ----------------------------------------------------------------------------------------------------------------
# Traced core.
# ----------------------------------------------------------------------------------------------------------------


def _hero_impl(
    thumb_attn,
    tile_attn,
    cls_last,
    img_emb,
    txt_emb,
    valid,
    present=None,
    n_local_dyn=None,
    *,
    n_global,
    n_local,
    alpha,
    t_cls,
    t_clip,
):
    """present (K,) bool marks real tiles when tiles are padded to a common K (absent tiles take no part in the
    tile softmaxes and get budget 0); n_local_dyn is then the traced ``int(K_real·N·R)`` (n_local the static max)."""
    f32 = jnp.float32
    thumb_attn, tile_attn = thumb_attn.astype(f32), tile_attn.astype(f32)
    cls_last, img_emb, txt_emb = cls_last.astype(f32), img_emb.astype(f32), txt_emb.astype(f32)
    n = valid.shape[-1]

    # §4.3-1 double softmax: softmax over the N patch entries per (layer, head), mean over heads, then over layers.
    g = mean(mean(jax.nn.softmax(thumb_attn, axis=-1), axis=1), axis=0)  # (N,)
    s = mean(mean(jax.nn.softmax(tile_attn, axis=-1), axis=2), axis=1)  # (K, N)

    # §4.3-2 saliency: cosine of each tile's last-layer CLS with the thumbnail's, softmax over tiles at T_cls.
    c = l2_normalize(cls_last, eps=1e-12)  # torch F.normalize
    mask = (lambda x: x) if present is None else (lambda x: jnp.where(present, x, -jnp.inf))  # noqa: E731
    sim = jax.nn.softmax(mask(divide(jnp.sum(c[1:] * c[0], axis=-1), jnp.asarray(t_cls, f32))))  # (K,)
    # §4.3-3 relevance: full-CLIP image/text cosine; T_clip replaces CLIP's logit scale.
    u, v = l2_normalize(img_emb, eps=1e-12), l2_normalize(txt_emb, eps=1e-12)
    clip = jax.nn.softmax(mask(divide(jnp.sum(u * v[0], axis=-1), jnp.asarray(t_clip, f32))))  # (K,)

    # §4.3-5 density, float32.
    cnt = jnp.sum(valid, axis=-1, dtype=jnp.int32)  # (K,)
    d = divide(cnt.astype(f32), jnp.asarray(n, f32))
    d = divide(d, jnp.sum(d) + jnp.asarray(1e-6, f32))

    # §4.3-6/7 fused score and budgets: float32 product truncated toward zero (fused >= 0, so floor == trunc),
    # clamped to the valid count; remainders are lost (no redistribution).
    # each product rounded before its add, as torch's separate kernels (no fused multiply-add, ops.no_fma)
    blend = no_fma(alpha * sim) + no_fma((1 - alpha) * clip)
    fused = no_fma(DENSITY_WEIGHT * d) + no_fma((1 - DENSITY_WEIGHT) * blend)
    n_local_f = jnp.asarray(n_local, f32) if n_local_dyn is None else n_local_dyn.astype(f32)
    b = jnp.minimum(jnp.floor(fused * n_local_f).astype(jnp.int32), cnt)

    # §4.3-8 selection. Thumbnail: static top-N_global, no validity mask. Tiles: valid tokens only; b <= cnt, so a
    # -inf (padding) entry is never inside a tile's budget.
    scores = jnp.concatenate([g[None], jnp.where(valid, s, -jnp.inf)], axis=0)  # (1+K, N)
    budgets = jnp.concatenate([jnp.full((1,), n_global, jnp.int32), b])
    indices, kept = top_budget_selection(scores, budgets, max(n_global, min(n, n_local)))

    return HeroSelection(
        indices=indices,
        valid=kept,
        budgets=budgets,
        valid_counts=cnt,
        global_scores=g,
        sub_scores=s,
        similarity=sim,
        clip=clip,
        density=d,
        fused=fused,
    )


_STATIC = ("n_global", "n_local", "alpha", "t_cls", "t_clip")


@functools.partial(jax.jit, static_argnames=_STATIC + ("table",))
def _hero_padded_core(thumb_attn, tile_attn, cls_last, img_emb, txt_emb, valid, num_local, *, table, **static):
    def one(ta, la, cl, ie, te, va, k):
        present = jnp.arange(va.shape[0]) < k
        n_local_dyn = jnp.asarray(table, jnp.int32)[k]
        return _hero_impl(ta, la, cl, ie, te, va & present[:, None], present, n_local_dyn, **static)

    return jax.vmap(one)(thumb_attn, tile_attn, cls_last, img_emb, txt_emb, valid, num_local)


def hero_padded(
    thumb_attn,
    tile_attn,
    cls_last,
    clip_image_embeds,
    clip_text_embeds,
    valid,
    num_local_tiles,
    *,
    keep_ratio: float,
    alpha: float,
    t_cls: float,
    t_clip: float,
) -> HeroSelection:
    """HERO for a batch of images of different grids, sub-tiles padded to a common ``K_max``.

    Shapes as :func:`hero` with a leading batch axis B and ``K_max`` sub-tiles: thumb_attn (B, n_high, H, N),
    tile_attn (B, K_max, n_low, H, N), cls_last (B, 1+K_max, D), clip_image_embeds (B, K_max, E),
    clip_text_embeds (B, 1, E), valid (B, K_max, N) bool, num_local_tiles int (B,) real sub-tiles per image
    (traced). Absent tiles are left out of the tile softmaxes and keep nothing; ``N_local = int(K·N·R)`` comes
    from a host table indexed by each image's K, so an image equals :func:`hero` on its unpadded inputs.
    Slot count: ``max(N_global, min(N, N_local(K_max)))``.
    """
    where = "hero_padded"
    checks.check_rank("tile_attn", tile_attn, 5, where=where, dims="(B, K_max, n_low, H, N)")
    k_max, n = tile_attn.shape[1], tile_attn.shape[-1]
    keep_ratio = checks.check_float("keep_ratio", keep_ratio, lo=0.0, hi=1.0, lo_open=True, where=where)
    alpha = checks.check_float("alpha", alpha, lo=0.0, hi=1.0, where=where)
    t_cls = checks.check_float("t_cls", t_cls, lo=0.0, lo_open=True, where=where)
    t_clip = checks.check_float("t_clip", t_clip, lo=0.0, lo_open=True, where=where)
    table = tuple(int(k * n * keep_ratio) for k in range(k_max + 1))
    n_global, n_local = int(n * keep_ratio), table[-1]
    return _hero_padded_core(
        thumb_attn,
        tile_attn,
        cls_last,
        clip_image_embeds,
        clip_text_embeds,
        valid,
        jnp.asarray(num_local_tiles, jnp.int32),
        table=table,
        n_global=n_global,
        n_local=n_local,
        alpha=alpha,
        t_cls=t_cls,
        t_clip=t_clip,
    )


_hero_core = jax.jit(_hero_impl, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _hero_batched_core(thumb_attn, tile_attn, cls_last, img_emb, txt_emb, valid, **static):
    return jax.vmap(functools.partial(_hero_impl, **static))(thumb_attn, tile_attn, cls_last, img_emb, txt_emb, valid)


# ----------------------------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------------------------


def _check_float_array(name, x, where):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{where}: {name} must be floating point, got {x.dtype}")
    checks.check_finite(name, x, where=where)


def _validate(
    thumb_attn,
    tile_attn,
    cls_last,
    img_emb,
    txt_emb,
    valid,
    keep_ratio,
    alpha,
    t_cls,
    t_clip,
    tokens_per_side,
    *,
    batch: bool,
    where: str,
):
    lead = 1 if batch else 0
    bdim = "B, " if batch else ""
    arrays = {
        "thumb_attn": (thumb_attn, 3, f"({bdim}n_high, H, N)"),
        "tile_attn": (tile_attn, 4, f"({bdim}K, n_low, H, N)"),
        "cls_last": (cls_last, 2, f"({bdim}1+K, D)"),
        "clip_image_embeds": (img_emb, 2, f"({bdim}K, E)"),
        "clip_text_embeds": (txt_emb, 2, f"({bdim}1, E)"),
        "valid": (valid, 2, f"({bdim}K, N)"),
    }
    for name, (x, rank, dims) in arrays.items():
        checks.check_rank(name, x, rank + lead, where=where, dims=dims)
    if tile_attn.shape[lead] == 0:
        raise ValueError(
            f"{where}: HERO needs at least one sub-tile (K >= 1); a single LLaVA-1.5 image has none (§4.6)"
        )
    for name, (x, _rank, dims) in arrays.items():
        if any(d < 1 for d in x.shape):
            raise ValueError(f"{where}: {name} has an empty dimension, shape {tuple(x.shape)} {dims}")
    if batch:
        bsz = thumb_attn.shape[0]
        checks.check_dims_equal(
            [(f"{name} batch dim", x.shape[0], "thumb_attn batch dim", bsz) for name, (x, _, _) in arrays.items()],
            where=where,
        )
    th, ta, cl, ie, te, va = (x.shape[lead:] for x in (thumb_attn, tile_attn, cls_last, img_emb, txt_emb, valid))
    k = ta[0]
    checks.check_dims_equal(
        [
            ("tile_attn heads", ta[2], "thumb_attn heads", th[1]),
            ("tile_attn N", ta[3], "thumb_attn N", th[2]),
            ("cls_last rows", cl[0], "1 + K (tile_attn)", 1 + k),
            ("clip_image_embeds rows", ie[0], "K (tile_attn)", k),
            ("clip_text_embeds rows", te[0], "1", 1),
            ("clip_text_embeds E", te[1], "clip_image_embeds E", ie[1]),
            ("valid rows", va[0], "K (tile_attn)", k),
            ("valid N", va[1], "thumb_attn N", th[2]),
        ],
        where=where,
    )
    s = checks.check_int("tokens_per_side", tokens_per_side, lo=1, where=where)
    if th[2] != s * s:
        raise ValueError(
            f"{where}: N = {th[2]} is not a {s}x{s} token grid (HERO's geometry is CLIP-336: 576 = 24x24 per tile)"
        )
    if valid.dtype != jnp.bool_:
        raise ValueError(f"{where}: valid must be bool, got {valid.dtype}")
    for name, (x, _, _) in arrays.items():
        if name != "valid":
            _check_float_array(name, x, where)
    keep_ratio = checks.check_float("keep_ratio", keep_ratio, lo=0.0, hi=1.0, lo_open=True, where=where)
    alpha = checks.check_float("alpha", alpha, lo=0.0, hi=1.0, where=where)
    t_cls = checks.check_float("t_cls", t_cls, lo=0.0, lo_open=True, where=where)
    t_clip = checks.check_float("t_clip", t_clip, lo=0.0, lo_open=True, where=where)
    n_global, n_local = hero_budget_sizes(k, keep_ratio, th[2])
    return dict(n_global=n_global, n_local=n_local, alpha=alpha, t_cls=t_cls, t_clip=t_clip)


# ----------------------------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------------------------


def _checked_call(core, arrays: tuple, settings: tuple, *, batch: bool, where: str) -> HeroSelection:
    """``core`` (the jitted single or batched HERO) on ``arrays`` (its six inputs) once :func:`_validate` has
    checked them and ``settings`` ``(keep_ratio, alpha, t_cls, t_clip, tokens_per_side)``."""
    return core(*arrays, **_validate(*arrays, *settings, batch=batch, where=where))


def hero(
    thumb_attn: jax.Array,
    tile_attn: jax.Array,
    cls_last: jax.Array,
    clip_image_embeds: jax.Array,
    clip_text_embeds: jax.Array,
    valid: jax.Array,
    *,
    keep_ratio: float,
    alpha: float,
    t_cls: float,
    t_clip: float,
    tokens_per_side: int = 24,
) -> HeroSelection:
    """HERO token selection for ONE anyres image (``docs/methods.md`` §4.3 / §4.5).

    Args:
      thumb_attn: float (n_high, H, N). The thumbnail's CLS-query attention rows of the ``high_layers`` maps,
        per head, patch keys only (probabilities over all N+1 keys; not renormalised).
      tile_attn: float (K, n_low, H, N). The same for sub-tiles 1..K (index t-1) and the ``low_layers`` maps.
      cls_last: float (1+K, D). Last encoder layer's CLS state (before ``post_layernorm``), thumbnail first.
      clip_image_embeds: float (K, E). Full-CLIP projected image embeddings of the sub-tiles.
      clip_text_embeds: float (1, E). Full-CLIP projected text embedding of the instruction.
      valid: bool (K, N). Non-padding tokens per tile, from :func:`vlmprune.prune.anyres.hero_valid_mask`.
      keep_ratio: ``R`` in (0, 1]; ``N_global = int(N R)``, ``N_local = int(K N R)`` (static).
      alpha: in [0, 1], saliency vs relevance weight (static).
      t_cls, t_clip: softmax temperatures > 0 (static).
      tokens_per_side: tokens along a tile side; N must equal its square (24 -> 576, the only geometry HERO
        supports as written).

    Returns:
      :class:`HeroSelection`: ``indices``/``valid`` (1+K, K_max) with ``K_max = hero_max_keep(K, R, N)``; ``.mask(N)``
      is the (1+K, N) keep mask, row 0 the thumbnail; ``budgets`` (1+K,) and the intermediate scores.
      All computation in float32.

    Raises:
      ValueError: wrong ranks, mismatched K/H/N/E, N not ``tokens_per_side**2``, ``valid`` not bool, non-float or
        (concrete) non-finite inputs, ``keep_ratio`` outside (0, 1], ``alpha`` outside [0, 1], temperatures <= 0.
    """
    arrays = (thumb_attn, tile_attn, cls_last, clip_image_embeds, clip_text_embeds, valid)
    settings = (keep_ratio, alpha, t_cls, t_clip, tokens_per_side)
    return _checked_call(_hero_core, arrays, settings, batch=False, where="hero")


def hero_batched(
    thumb_attn: jax.Array,
    tile_attn: jax.Array,
    cls_last: jax.Array,
    clip_image_embeds: jax.Array,
    clip_text_embeds: jax.Array,
    valid: jax.Array,
    *,
    keep_ratio: float,
    alpha: float,
    t_cls: float,
    t_clip: float,
    tokens_per_side: int = 24,
) -> HeroSelection:
    """:func:`hero` over a batch of images with the same grid (same K), vmapped in one compiled call.

    Every argument of :func:`hero` gains a leading batch dim B (``valid`` is (B, K, N): each image has its own
    padding). Images of different grids must be bucketed by grid (§4.5). Returns a :class:`HeroSelection` with
    leading dim B, equal item for item to :func:`hero`.
    """
    arrays = (thumb_attn, tile_attn, cls_last, clip_image_embeds, clip_text_embeds, valid)
    settings = (keep_ratio, alpha, t_cls, t_clip, tokens_per_side)
    return _checked_call(_hero_batched_core, arrays, settings, batch=True, where="hero_batched")
