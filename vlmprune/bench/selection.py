"""The selection suite: every method's selection function alone, jitted, against a straightforward PyTorch loop.

For every method and budget (default 64 / 128 / 192 kept tokens of N = 576) it times, in one process on the same
seeded inputs: the JAX selection, jit-compiled (one warm-up call, then ``repeats`` timed calls), and the eager public
function (input validation included); the PyTorch implementation of ``torch_reference`` under ``torch.no_grad()``,
its calls interleaved with JAX's; and the Flax CLIP vision tower asked for what LLaVA needs, to express each
selection as a share of the encoder's time. It checks that both sides select the same tokens. Methods and their
settings are specs (``vlmprune.prune.parse_spec``); the budgets come from ``--budgets``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlmprune import prune as P  # noqa: N812
from vlmprune.anyres import hero_valid_mask
from vlmprune.bench import report
from vlmprune.bench import torch_reference as T  # noqa: N812
from vlmprune.bench.presets import random_params
from vlmprune.bench.timing import load_average, machine_info, measure, timed
from vlmprune.models.vision.clip import CLIPVisionConfig, CLIPVisionTransformer
from vlmprune.prune import baselines as BL  # noqa: N812
from vlmprune.prune import spec
from vlmprune.prune.hero import hero_batched
from vlmprune.prune.ops import l2_normalize

torch = T.torch

#: the suite's rows -> the registered method whose settings they take (hired_single: HiRED's LLaVA-1.5 form)
SUITE_METHODS = {
    "vispruner": "vispruner",
    "fastervlm": "fastervlm",
    "hired_single": "hired",
    "hired": "hired",
    "hero": "hero",
    "divprune": "divprune",
    "visionzip": "visionzip",
    "prumerge_plus": "prumerge_plus",
    "random_keep": "random",
    "uniform": "uniform",
}
ALL_METHODS = tuple(SUITE_METHODS)
TARGET_SPEEDUP = 10.0
TARGET_ENCODER_PCT = 2.0


# ----------------------------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
    """Seeded random inputs, numpy float32 (converted to jax / torch per method)."""

    features: np.ndarray  # (B, N, C) patch features (layer-22 output, CLS removed)
    cls_attn: np.ndarray  # (B, H, N) CLS-query attention rows, patch columns (softmax over 1+N keys)
    hidden_full: np.ndarray  # (B, 1+N, C) hidden states incl. CLS (VisionZip)
    keys: np.ndarray  # (B, 1+N, C) raw k_proj outputs incl. CLS (VisionZip per head, PruMerge+ single head)
    single_attn: np.ndarray  # (B, N) single-head CLS attention (PruMerge+), softmax over 1+N keys, CLS dropped
    emb: np.ndarray  # (B, N, E) post-projector embeddings (DivPrune)
    # LLaVA-NeXT inputs (1 + K = 5 partitions, 2x2 grid): HiRED and HERO
    nx_shallow: np.ndarray  # (B, 5, H, N) layer-0 CLS rows
    nx_deep: np.ndarray  # (B, 5, H, N) layer-22 CLS rows
    hero_thumb: np.ndarray  # (B, n_high, H, N)
    hero_tiles: np.ndarray  # (B, K, n_low, H, N)
    hero_cls: np.ndarray  # (B, 1+K, C)
    hero_img: np.ndarray  # (B, K, 768)
    hero_txt: np.ndarray  # (B, 1, 768)
    hero_valid: np.ndarray  # (B, K, N) bool


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _cls_rows(rng, shape, n: int) -> np.ndarray:
    """Softmax-like CLS rows: softmax over 1 + n keys of heavy-ish logits, CLS column dropped (rows sum < 1)."""
    logits = rng.standard_normal(shape + (n + 1,), dtype=np.float32) * 1.5
    return _softmax_rows(logits)[..., 1:]


def make_inputs(
    batch: int, n: int, dim: int, heads: int, emb_dim: int, seed: int, hero_low: int = 11, hero_high: int = 12
) -> Inputs:
    rng = np.random.default_rng(seed)
    s = int(round(n**0.5))
    k_tiles = 4
    valid = hero_valid_mask((800, 600), (2, 2), tokens_per_side=s)  # 2x2 grid, padding above and below
    hidden_full = rng.standard_normal((batch, n + 1, dim), dtype=np.float32)
    return Inputs(
        features=hidden_full[:, 1:].copy(),
        cls_attn=_cls_rows(rng, (batch, heads), n),
        hidden_full=hidden_full,
        keys=rng.standard_normal((batch, n + 1, dim), dtype=np.float32),
        single_attn=_cls_rows(rng, (batch,), n),
        emb=rng.standard_normal((batch, n, emb_dim), dtype=np.float32),
        nx_shallow=_cls_rows(rng, (batch, 1 + k_tiles, heads), n),
        nx_deep=_cls_rows(rng, (batch, 1 + k_tiles, heads), n),
        hero_thumb=_cls_rows(rng, (batch, hero_high, heads), n),
        hero_tiles=_cls_rows(rng, (batch, k_tiles, hero_low, heads), n),
        hero_cls=rng.standard_normal((batch, 1 + k_tiles, dim), dtype=np.float32),
        hero_img=rng.standard_normal((batch, k_tiles, 768), dtype=np.float32),
        hero_txt=rng.standard_normal((batch, 1, 768), dtype=np.float32),
        hero_valid=np.broadcast_to(valid, (batch,) + valid.shape).copy(),
    )


def rate_for(budget: int, n: int) -> float:
    """A rate r with int(n * r) == budget (the methods truncate n * r with Python int())."""
    r = budget / n
    if int(n * r) != budget:
        r = (budget + 0.5) / n
    if int(n * r) != budget:
        raise ValueError(f"no rate r gives int({n} * r) == {budget}")
    return r


# ----------------------------------------------------------------------------------------------- timing


def time_jax(fn: Callable[[], Any], repeats: int) -> tuple[dict, float, Any]:
    """(stats in ms, compile + first-call seconds, output). ``fn`` closes over its (device) inputs."""
    first, out = timed(fn)
    return measure(fn, repeats=repeats, warmup=0)[0], first, out


def time_pair(jax_fn: Callable[[], Any], torch_fn: Callable[[], Any], repeats: int):
    """A JAX and a PyTorch function timed with their calls interleaved (the one timer of ``timing``).

    Returns (JAX stats, JAX compile + first-call seconds, JAX output, PyTorch stats, PyTorch output)."""
    first, jout = timed(jax_fn)
    with torch.no_grad():
        tout = torch_fn()  # warm-up
        js, ts = measure(jax_fn, torch_fn, repeats=repeats, warmup=0)
    return js, first, jout, ts, tout


# ----------------------------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    jit_fn: Callable[[], Any]  # jitted selection on device-resident inputs
    api_fn: Callable[[], Any] | None  # the public function called eagerly (validation included)
    torch_fn: Callable[[], Any]
    compare: Callable[[Any, Any], tuple[bool | None, str]]
    budget_label: str
    note: str = ""
    extra_check: Callable[[Any], tuple[bool | None, str]] | None = None  # untimed, on the JAX output


def sets_equal(jax_idx, torch_idx) -> tuple[bool, str]:
    a = np.sort(np.asarray(jax_idx), axis=-1)
    b = np.sort(np.asarray(torch_idx), axis=-1)
    if a.shape != b.shape:
        return False, f"shape {a.shape} vs {b.shape}"
    diff = sum(
        len(set(x.tolist()) ^ set(y.tolist())) // 2
        for x, y in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))
    )
    return diff == 0, ("identical index sets" if diff == 0 else f"{diff} index(es) differ")


def masks_equal(jax_mask, torch_mask) -> tuple[bool, str]:
    a, b = np.asarray(jax_mask), np.asarray(torch_mask)
    diff = int(np.sum(a != b))
    return diff == 0, ("identical masks" if diff == 0 else f"{diff} mask entries differ")


def tokens_close(jax_tokens, torch_tokens, atol=1e-3, rtol=1e-4) -> tuple[bool, str]:
    a, b = np.asarray(jax_tokens), np.asarray(torch_tokens)
    if a.shape != b.shape:
        return False, f"shape {a.shape} vs {b.shape}"
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    return bool(np.allclose(a, b, atol=atol, rtol=rtol)), f"max |diff| {err:.2e}"


@dataclasses.dataclass(frozen=True)
class CaseInputs:
    """The suite's inputs as JAX arrays (``j``) and torch tensors (``t``), with the numpy originals."""

    inp: Inputs
    j: dict
    t: dict
    seed: int

    @classmethod
    def of(cls, inp: Inputs, seed: int) -> CaseInputs:
        return cls(
            inp,
            {k: jnp.asarray(v) for k, v in vars(inp).items()},
            {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in vars(inp).items()},
            seed,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self.inp.features.shape[:2]


def _case(f, args: tuple, torch_fn, compare, label: str, note: str = "", extra_check=None, *, static_argnums=()):
    """A :class:`Case` timing ``f(*args)`` jitted (``static_argnums`` as ``jax.jit`` takes them) and eagerly."""
    jf = jax.jit(f, static_argnums=static_argnums)
    return Case(lambda: jf(*args), lambda: f(*args), torch_fn, compare, label, note, extra_check)


def _vispruner(p, c: CaseInputs, label: str) -> Case:
    j, t, k, ratio = c.j, c.t, p.num_keep, p.important_ratio
    f = functools.partial(P.vispruner, num_keep=k, important_ratio=ratio)

    def exact_check(o):
        normalized = np.asarray(jax.jit(l2_normalize)(j["features"]))
        return sets_equal(o.indices, T.exact_vispruner(normalized, c.inp.cls_attn, k, ratio))

    return _case(
        f,
        (j["features"], j["cls_attn"]),
        lambda: T.torch_vispruner(t["features"], t["cls_attn"], k, ratio),
        lambda o, r: sets_equal(o.indices, r),
        label,
        f"important_ratio {ratio:g}",
        exact_check,
    )


def _cls_attn_case(f, torch_fn, c: CaseInputs, label: str, note: str = "") -> Case:
    """A selection of index sets from the CLS attention alone: ``f(cls_attn)`` against ``torch_fn(cls_attn)``."""
    return _case(
        f, (c.j["cls_attn"],), lambda: torch_fn(c.t["cls_attn"]), lambda o, r: sets_equal(o.indices, r), label, note
    )


def _fastervlm(p, c: CaseInputs, label: str) -> Case:
    f = functools.partial(P.fastervlm, num_keep=p.num_keep)
    return _cls_attn_case(f, lambda a: T.torch_fastervlm(a, p.num_keep), c, label)


def _hired_single(p, c: CaseInputs, label: str) -> Case:
    f = functools.partial(P.hired_single, budget_rate=p.budget_rate)
    return _cls_attn_case(f, lambda a: T.torch_hired_single(a, p.budget_rate), c, label, "LLaVA-1.5 (one partition)")


def _hired(p, c: CaseInputs, label: str) -> Case:
    (bsz, n), j = c.shape, c.j
    if bsz == 1:
        f = functools.partial(P.hired, budget_rate=p.budget_rate, alpha=p.alpha)
        args = (j["nx_shallow"][0], j["nx_deep"][0])
    else:
        f = functools.partial(
            P.hired_batched, num_tiles=np.full((bsz,), 5, np.int32), budget_rate=p.budget_rate, alpha=p.alpha
        )
        args = (j["nx_shallow"], j["nx_deep"])
    return _case(
        f,
        args,
        lambda: T.torch_hired(c.t["nx_shallow"], c.t["nx_deep"], p.budget_rate, p.alpha),
        lambda o, r: masks_equal(o.mask(n).reshape(r.shape), r),
        label,
        f"LLaVA-NeXT, 5 partitions, alpha {p.alpha:g}: budget = mean per partition",
    )


_HERO_INPUTS = ("hero_thumb", "hero_tiles", "hero_cls", "hero_img", "hero_txt", "hero_valid")


def _hero(p, c: CaseInputs, label: str) -> Case:
    (bsz, n), j = c.shape, c.j
    kw = dict(keep_ratio=p.keep_ratio, alpha=p.alpha, t_cls=p.t_cls, t_clip=p.t_clip)
    side = int(round(n**0.5))
    if bsz == 1:
        f = functools.partial(P.hero, **kw, tokens_per_side=side)
        args = tuple(j[k][0] for k in _HERO_INPUTS)
    else:
        f = functools.partial(hero_batched, **kw, tokens_per_side=side)
        args = tuple(j[k] for k in _HERO_INPUTS)
    targs = tuple(c.t[k] for k in _HERO_INPUTS)

    def exact_check(o):  # HERO's double-softmax scores sit within a few float32 ulps of each other
        ref = T.torch_hero(*(x.double() if x.is_floating_point() else x for x in targs), **kw)
        return masks_equal(o.mask(n).reshape(ref.shape), ref)

    return _case(
        f,
        args,
        lambda: T.torch_hero(*targs, **kw),
        lambda o, r: masks_equal(o.mask(n).reshape(r.shape), r),
        label,
        "LLaVA-NeXT 2x2 (800x600), R = budget/N, 11 low + 12 high layers",
        exact_check,
    )


def _divprune(p, c: CaseInputs, label: str) -> Case:
    return _case(
        functools.partial(BL.divprune, num_keep=p.num_keep),
        (c.j["emb"],),
        lambda: T.torch_divprune(c.t["emb"], p.num_keep),
        lambda o, r: sets_equal(o.indices, r),
        label,
        f"post-projector embeddings (B, N, {c.inp.emb.shape[-1]})",
    )


def _visionzip(p, c: CaseInputs, label: str) -> Case:
    (bsz, n), heads = c.shape, c.inp.cls_attn.shape[1]
    kj = c.j["keys"].reshape(bsz, n + 1, heads, -1)
    kt = c.t["keys"].reshape(bsz, n + 1, heads, -1)
    return _case(
        functools.partial(BL.visionzip, dominant=p.dominant, contextual=p.contextual),
        (c.j["hidden_full"], c.j["cls_attn"], kj),
        lambda: T.torch_visionzip(c.t["hidden_full"], c.t["cls_attn"], kt, p.dominant, p.contextual),
        lambda o, r: tokens_close(np.asarray(o.tokens)[np.asarray(o.valid)].reshape(r.shape), r),
        label,
        f"dominant {p.dominant} + contextual {p.contextual}",
    )


def _prumerge_cmp(o, r):
    valid, tokens = np.asarray(o.valid), np.asarray(o.tokens)
    counts = [int(v.sum()) for v in valid]
    if counts != [x.shape[0] for x in r]:
        return False, f"counts {counts} vs {[x.shape[0] for x in r]}"
    oks = [tokens_close(tok[v], x.numpy()) for tok, v, x in zip(tokens, valid, r)]
    return all(ok for ok, _ in oks), f"counts {counts}; " + "; ".join(d for _, d in oks)


def _prumerge_plus(p, c: CaseInputs, label: str) -> Case:
    j = c.j
    if not p.plus:
        raise ValueError("the PyTorch reference implements PruMerge+ (plus=true) only")
    return _case(
        functools.partial(BL.prumerge_plus, plus=p.plus),
        (j["features"], j["single_attn"], j["keys"][:, 1:]),
        lambda: T.torch_prumerge_plus(c.t["features"], c.t["single_attn"], c.t["keys"][:, 1:]),
        _prumerge_cmp,
        "adaptive",
        "IQR outlier count + spatial samples; torch loops over kept tokens as the original",
    )


def _random_keep(p, c: CaseInputs, label: str) -> Case:
    (bsz, n), key = c.shape, jax.random.PRNGKey(c.seed)
    return _case(
        functools.partial(BL.random_keep, num_keep=p.num_keep, batch=bsz),
        (key, n),
        lambda: T.torch_random(n, p.num_keep, bsz, c.seed),
        lambda o, r: (None, "n/a: different RNGs"),
        label,
        static_argnums=1,
    )


def _uniform(p, c: CaseInputs, label: str) -> Case:
    bsz, n = c.shape
    return _case(
        functools.partial(BL.uniform, num_keep=p.num_keep),
        (n,),
        lambda: T.torch_uniform(n, p.num_keep, bsz),
        lambda o, r: sets_equal(np.broadcast_to(np.asarray(o.indices), r.shape), r),
        label,
        "data-independent constant grid",
        static_argnums=0,
    )


BUILDERS = {
    "vispruner": _vispruner,
    "fastervlm": _fastervlm,
    "hired_single": _hired_single,
    "hired": _hired,
    "hero": _hero,
    "divprune": _divprune,
    "visionzip": _visionzip,
    "prumerge_plus": _prumerge_plus,
    "random_keep": _random_keep,
    "uniform": _uniform,
}


def suite_pruner(method: str, budget: int | None, n: int, settings=()):
    """The pruner whose settings a row uses: ``method`` at ``budget`` of ``n`` tokens, through the spec parser
    (HiRED / HERO rates: the rate that keeps ``budget`` of ``n``, :func:`rate_for`)."""
    reg = SUITE_METHODS[method]
    kw = spec.typed_settings(reg, settings)
    if budget is not None:
        value = (
            rate_for(budget, n)
            if spec.budget_setting(spec.method_class(reg)) in ("budget_rate", "keep_ratio")
            else budget
        )
        kw.update(spec.budget_settings(reg, value))
    return spec.make(reg, **kw)


def build_case(method: str, budget: int, inp: Inputs, seed: int, settings=()) -> Case:
    """The timed pair of one row. PruMerge+ (an adaptive count) ignores the budget."""
    n = inp.features.shape[1]
    pruner = suite_pruner(method, None if method == "prumerge_plus" else budget, n, settings)
    return BUILDERS[method](pruner, CaseInputs.of(inp, seed), str(budget))


# ----------------------------------------------------------------------------------------------- encoder


def time_encoder(batch: int, layers: int, image_size: int, repeats: int, seed: int) -> dict:
    """The jitted Flax CLIP vision tower asked for LLaVA's outputs (hidden -2, CLS row of L-2), random weights:
    its stats (ms) and shape."""
    cfg = CLIPVisionConfig(num_hidden_layers=layers, image_size=image_size)
    cls_layer = layers - 2 if layers >= 2 else 0  # 22 for the 24-layer CLIP-L
    kw = dict(hidden_state_layers=(-2,), cls_attention_layers=(cls_layer,))
    model = CLIPVisionTransformer(cfg)
    pixels = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, 3, image_size, image_size), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), pixels, **kw))
    params = random_params(shapes, jnp.float32, seed)
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    fwd = jax.jit(lambda p, x: model.apply(p, x, **kw))
    st, first, _ = time_jax(lambda: fwd(params, pixels), repeats)
    return {
        "layers": layers,
        "layers_run": cls_layer + 1,
        "image_size": image_size,
        "batch": batch,
        "hidden_size": cfg.hidden_size,
        "num_patches": cfg.num_patches,
        "params": n_params,
        "cls_attention_layer": cls_layer,
        "compile_s": first,
        **st,
    }


# ----------------------------------------------------------------------------------------------- the suite


def _one_thread(case: Case, repeats: int) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        j1, _, _, t1, _ = time_pair(case.jit_fn, case.torch_fn, repeats)
    finally:
        torch.set_num_threads(threads)
    return {"jax": j1, "torch": t1, "speedup": t1["median"] / j1["median"]}


def measure_row(method: str, case: Case, repeats: int, encoder_ms: float, single_thread: bool) -> dict:
    """Time one case and compare both sides' selections: the row of the table."""
    js, compile_s, jout, ts, tout = time_pair(case.jit_fn, case.torch_fn, repeats)
    api = time_jax(case.api_fn, max(1, repeats // 2))[0] if case.api_fn else None
    agree, detail = case.compare(jout, tout)
    exact, exact_detail = case.extra_check(jout) if case.extra_check else (None, "")
    one = _one_thread(case, repeats) if single_thread and torch.get_num_threads() > 1 else None
    return {
        "method": method,
        "budget": case.budget_label,
        "jax": js,
        "jax_api": api,
        "jax_compile_s": compile_s,
        "torch": ts,
        "speedup": ts["median"] / js["median"],
        "speedup_min": ts["min"] / js["min"],
        "pct_encoder": 100.0 * js["median"] / encoder_ms,
        "agree": agree,
        "agree_detail": detail,
        "note": case.note,
        "agree_exact_ref": exact,
        "agree_exact_ref_detail": exact_detail,
        "torch_1thread": one,
    }


def _progress(row: dict, case: Case) -> str:
    one = row["torch_1thread"]
    return (
        f"{row['method']:>14} {row['budget']:>8}: jax {row['jax']['median']:9.3f} ms  torch "
        f"{row['torch']['median']:9.3f} ms  x{row['speedup']:7.1f}  {row['pct_encoder']:7.3f} % enc  compile "
        f"{row['jax_compile_s']:5.1f} s  agree={row['agree']} ({row['agree_detail']})"
        + (f"; vs float64 ref: {row['agree_exact_ref']} ({row['agree_exact_ref_detail']})" if case.extra_check else "")
        + (f"; torch 1 thread: {one['torch']['median']:.1f} ms, x{one['speedup']:.1f}" if one else "")
    )


def run_rows(methods, budgets: list[int], inp: Inputs, args, encoder_ms: float):
    """(rows, skipped) over every (method, budget); PruMerge+ (adaptive) has one row."""
    single = {m.strip() for m in args.single_thread_torch.split(",") if m.strip()}
    rows, skipped = [], []
    for parts in methods:
        for budget in budgets[:1] and [min(budgets)] if parts.name == "prumerge_plus" else budgets:
            try:
                case = build_case(parts.name, budget, inp, args.seed, parts.settings)
                row = measure_row(parts.name, case, args.repeats, encoder_ms, parts.name in single)
            except Exception as e:  # noqa: BLE001  (a failing method is reported in the table, the others run)
                print(f"NOTE {parts.name} budget {budget}: skipped, {type(e).__name__}: {e}", flush=True)
                skipped.append({"method": parts.name, "budget": budget, "reason": f"{type(e).__name__}: {e}"})
                continue
            rows.append(row)
            print(_progress(row, case), flush=True)
    return rows, skipped


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=1, help="images per call (B)")
    ap.add_argument("--budgets", default="64,128,192", help="comma-separated kept-token budgets")
    ap.add_argument(
        "--methods",
        default=",".join(ALL_METHODS),
        help="comma-separated specs without budgets, e.g. vispruner:important_ratio=0.25,fastervlm;\n"
        "names: " + ", ".join(ALL_METHODS),
    )
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    ap.add_argument("--encoder-repeats", type=int, default=3, help="timed encoder calls")
    ap.add_argument("--encoder-layers", type=int, default=24, help="CLIP encoder layers (24 = CLIP-L)")
    ap.add_argument("--image-size", type=int, default=336, help="encoder input size in pixels (multiple of 14)")
    ap.add_argument(
        "--num-tokens",
        type=int,
        default=None,
        help="N for the selection inputs (default: the encoder's patch count, 576 at 336 px)",
    )
    ap.add_argument("--dim", type=int, default=1024, help="feature width C")
    ap.add_argument("--heads", type=int, default=16, help="attention heads H")
    ap.add_argument("--emb-dim", type=int, default=4096, help="post-projector width for DivPrune")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads value (default: leave torch's default, one per core)",
    )
    ap.add_argument(
        "--single-thread-torch",
        default="vispruner",
        help="methods also timed with torch.set_num_threads(1), JAX interleaved again (a check on\n"
        "OpenMP contention when the machine is shared; '' = none)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 repeats, 1 encoder repeat")
    ap.add_argument(
        "--out-dir",
        default=os.path.join("experiments", "results"),
        help="where selection_cpu.{md,json} go ('' = do not write)",
    )
    return ap.parse_args(argv)


def _check_args(args) -> tuple[list, list[int], int]:
    """(method specs, budgets, N); SystemExit with the problem named."""
    try:
        methods = spec.split_specs(args.methods) if args.methods.strip() else []
    except ValueError as e:
        raise SystemExit(f"error: --methods: {e}") from None
    for m in methods:
        if m.name not in SUITE_METHODS or m.budgets:
            raise SystemExit(
                f"error: --methods: {m.text!r}: choose from {', '.join(ALL_METHODS)}, without a budget "
                "(the budgets come from --budgets)"
            )
    if args.image_size % 14:
        raise SystemExit("error: --image-size must be a multiple of the patch size 14")
    n = args.num_tokens or (args.image_size // 14) ** 2
    budgets = [int(b) for b in args.budgets.split(",") if b]
    too_big = [b for b in budgets if not 1 <= b <= n]
    if too_big:
        print(f"NOTE budgets {too_big} are outside [1, N={n}] and are dropped", flush=True)
    return methods, [b for b in budgets if 1 <= b <= n], n


def main(argv=None) -> dict:
    """Run the suite; print and (``--out-dir``) write ``selection_cpu.{md,json}``. Returns the results."""
    args = parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.encoder_repeats = 1
    methods, budgets, n = _check_args(args)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    info = machine_info()
    print(
        f"# selection benchmark  {info['date']}  host_cpus={info['host_cpus']}  jax {info['jax']} "
        f"({info['backend']})  torch {info['torch']} ({info['torch_threads']} threads)",
        flush=True,
    )
    inp = make_inputs(args.batch, n, args.dim, args.heads, args.emb_dim, args.seed)
    enc = time_encoder(args.batch, args.encoder_layers, args.image_size, args.encoder_repeats, args.seed)
    print(
        f"encoder: {enc['median']:.1f} ms (IQR {enc['iqr']:.1f}, compile {enc['compile_s']:.1f} s, "
        f"{enc['params'] / 1e6:.0f} M params, {enc['layers_run']} layers run)",
        flush=True,
    )
    rows, skipped = run_rows(methods, budgets, inp, args, enc["median"])
    config = dict(vars(args), num_tokens=n, budgets=budgets, methods=[m.text for m in methods])
    result = {
        "machine": info,
        "config": config,
        "encoder": enc,
        "rows": rows,
        "skipped": skipped,
        "verdicts": report.selection_verdicts(rows, TARGET_SPEEDUP, TARGET_ENCODER_PCT),
        "loadavg_end": load_average(),
    }
    command = " ".join(["python experiments/bench_selection.py", *(argv if argv is not None else sys.argv[1:])])
    md_text = report.selection_markdown(result, command, TARGET_SPEEDUP, TARGET_ENCODER_PCT)
    print()
    print(md_text)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "selection_cpu.md"), "w") as fh:
            fh.write(md_text)
        with open(os.path.join(args.out_dir, "selection_cpu.json"), "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.out_dir}/selection_cpu.{{md,json}}", flush=True)
    return result
