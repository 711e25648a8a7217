#!/usr/bin/env python
"""Speed benchmark of the token-selection functions on CPU (issue 3).

For every method in ``vlmprune.prune`` and every budget (default 64 / 128 / 192 kept tokens of N = 576) this
script times, *in the same process and on the same seeded inputs*:

* the JAX selection, jit-compiled (one warm-up call, then ``--repeats`` timed calls, each ending in
  ``jax.block_until_ready``); the eager public wrapper (input validation + host-side NaN check) is timed too;
* a straightforward PyTorch implementation of the same algorithm written below (for VisPruner the original's
  structure, ``algorithms.md`` §2.2: argsort, a Python ``while`` loop of dedup rounds with an even/odd split, one
  cosine matmul per round, argsort, concat), run under ``torch.no_grad()`` with torch's default thread count;
* the Flax CLIP-L/14-336 vision tower (random weights, jitted) asked for what LLaVA needs (hidden state -2 and the
  CLS attention row of layer 22), to express each selection as a share of the encoder's time.

It checks that the PyTorch and JAX selections agree (same index sets; same merged tokens for the merging
baselines) and prints one markdown table; with ``--out-dir`` (default ``experiments/results``) it writes
``selection_cpu.md`` and ``selection_cpu.json`` with machine information.

Targets from the issue: VisPruner's jitted selection >= 10x faster than the PyTorch loop and <= 2 % of the
encoder's time. The verdict is printed at the end.

Usage::

    python experiments/bench_selection.py                 # full run (~10 min on 2 shared cores)
    python experiments/bench_selection.py --quick         # smoke run
    python experiments/bench_selection.py --methods vispruner,fastervlm --budgets 64

Methods whose JAX implementation cannot be imported (``vlmprune.prune.baselines`` may not exist yet) are skipped
with a printed note.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import sys
import time
from typing import Any, Callable

import numpy as np

# Run from a checkout without installing: make `vlmprune` importable.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

# PyTorch's OpenMP workers spin after every op unless told to sleep, and in one process they then take the cores
# from XLA's threads (a 607x2816 @ 2816x1024 matmul ran 1.8x slower in JAX right after a torch call on 2 cores).
# Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ALL_METHODS = (
    "vispruner", "fastervlm", "hired_single", "hired", "hero",
    "divprune", "visionzip", "prumerge_plus", "random_keep", "uniform",
)
TARGET_SPEEDUP = 10.0
TARGET_ENCODER_PCT = 2.0


# ================================================================================================================
# Inputs
# ================================================================================================================


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


def make_inputs(batch: int, n: int, dim: int, heads: int, emb_dim: int, seed: int,
                hero_low: int = 11, hero_high: int = 12) -> Inputs:
    rng = np.random.default_rng(seed)
    s = int(round(n**0.5))
    k_tiles = 4
    from vlmprune.anyres import hero_valid_mask

    valid = hero_valid_mask((600, 800), (2, 2), tokens_per_side=s)  # (h, w) on a 2x2 grid: padding above, below
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


def _rate_for(budget: int, n: int) -> float:
    """A rate r with int(n * r) == budget (the methods truncate n * r with Python int())."""
    r = budget / n
    if int(n * r) != budget:
        r = (budget + 0.5) / n
    assert int(n * r) == budget, (budget, n, r)
    return r


# ================================================================================================================
# PyTorch reference implementations (straightforward, eager, written for this benchmark)
# ================================================================================================================


def torch_vispruner(features: torch.Tensor, cls_attn: torch.Tensor, num_keep: int, ratio: float) -> torch.Tensor:
    """VisPruner, structured like the original ``encode_images`` (algorithms.md §2.2). Returns (B, T) sorted."""
    b = features.shape[0]
    num_imp = int(num_keep * ratio)
    num_div = num_keep - num_imp
    scores = cls_attn.mean(dim=1)  # (B, N)
    order = scores.argsort(dim=-1, descending=True)
    important = order[:, :num_imp]
    residual = order[:, num_imp:]  # descending-attention order
    normed = features / features.norm(dim=-1, keepdim=True)
    rows = torch.arange(b).unsqueeze(-1)
    while num_div > 0:
        size = residual.shape[1]
        r = min(8, size - num_div)
        if r <= 0:
            break
        tokens = normed[rows, residual]  # (B, R, C) in current list order
        side_a, side_b = tokens[:, ::2], tokens[:, 1::2]
        sim = side_a @ side_b.transpose(-1, -2)  # cosine matmul, recomputed every round
        best = sim.max(dim=-1).values  # (B, ceil(R/2))
        keep_a = best.argsort(dim=-1, descending=True)[:, r:]
        idx_a, idx_b = residual[:, ::2], residual[:, 1::2]
        residual = torch.cat([idx_a.gather(1, keep_a), idx_b], dim=1)
    kept = torch.cat([important, residual], dim=1) if num_div > 0 else important
    return kept.sort(dim=-1).values


def exact_vispruner(normalized: np.ndarray, cls_attn: np.ndarray, num_keep: int, ratio: float) -> np.ndarray:
    """Untimed float64 reference: the same rounds on (almost) exact cosine similarities of *given* unit rows.

    VisPruner's dedup ranking is chaotic in float32: every round sorts all A tokens by their best similarity
    and the sorted order decides the next even/odd split, so a rounding difference of one ulp between two
    near-equal best similarities can change the final set. The JAX port ranks by a near-exact
    dot product; a plain float32 loop (the timed PyTorch code, like the original) does not. Feeding both this
    reference and JAX the same normalised rows (JAX's) separates "port is wrong" from "float32 reordered".
    normalized (B, N, C) float32 unit rows, cls_attn (B, H, N) -> sorted indices (B, T).
    """
    out = []
    for x32, attn in zip(normalized, cls_attn):
        x = x32.astype(np.float64)
        num_imp = int(num_keep * ratio)
        num_div = num_keep - num_imp
        order = np.argsort(-attn.mean(0), kind="stable")
        important, residual = order[:num_imp], order[num_imp:]
        while num_div > 0:
            r = min(8, len(residual) - num_div)
            if r <= 0:
                break
            side_a, side_b = residual[0::2], residual[1::2]
            best = (x[side_a] @ x[side_b].T).max(axis=1)
            residual = np.concatenate([side_a[np.argsort(-best, kind="stable")[r:]], side_b])
        out.append(np.sort(np.concatenate([important, residual]) if num_div > 0 else important))
    return np.stack(out)


def torch_fastervlm(cls_attn: torch.Tensor, num_keep: int) -> torch.Tensor:
    return cls_attn.mean(dim=1).topk(num_keep, dim=-1).indices.sort(dim=-1).values


def torch_hired_single(cls_attn: torch.Tensor, budget_rate: float) -> torch.Tensor:
    n = cls_attn.shape[-1]
    k = min(n, int(n * budget_rate))
    return cls_attn.sum(dim=1).topk(k, dim=-1).indices.sort(dim=-1).values


def torch_hired(shallow: torch.Tensor, deep: torch.Tensor, budget_rate: float, alpha: float) -> torch.Tensor:
    """HiRED reference-compat (algorithms.md §3.2), one image at a time. shallow/deep (B, P, H, N) -> masks (B, P, N)."""
    bsz, p, _, n = shallow.shape
    masks = torch.zeros(bsz, p, n, dtype=torch.bool)
    for i in range(bsz):
        f0 = shallow[i].sum(dim=1)  # (P, N), head sum
        f22 = deep[i].sum(dim=1)
        n_budget = int(p * n * budget_rate)
        n_full = min(int(n_budget * alpha), n)
        n_sub = min(n_budget - n_full, (p - 1) * n)
        masks[i, 0, f22[0].topk(n_full).indices] = True
        if n_sub > 0:
            k = p - 1
            k_sp = int(n * (1 - alpha))
            spatial = torch.zeros(n, dtype=torch.bool)
            spatial[f0[0].topk(k_sp).indices] = True
            counts = spatial.reshape(k, n // k).sum(-1)  # contiguous raster bands (reference quirk, §3.7)
            ratio = counts / counts.sum()  # int64 / int64 -> float32
            budgets = (ratio * n_sub).int().clamp(max=n)
            for t in range(k):
                bt = int(budgets[t])
                if bt > 0:
                    masks[i, t + 1, f22[t + 1].topk(bt).indices] = True
    return masks


def torch_hero(thumb, tiles, cls_last, img_emb, txt_emb, valid, *, keep_ratio, alpha, t_cls, t_clip) -> torch.Tensor:
    """HERO (algorithms.md §4.3), one image at a time. Returns masks (B, 1+K, N)."""
    bsz, k, n = valid.shape
    masks = torch.zeros(bsz, 1 + k, n, dtype=torch.bool)
    n_global, n_local = int(n * keep_ratio), int(k * n * keep_ratio)
    for i in range(bsz):
        g = torch.softmax(thumb[i], dim=-1).mean(dim=1).mean(dim=0)  # (N,)
        s = torch.softmax(tiles[i], dim=-1).mean(dim=2).mean(dim=1)  # (K, N)
        c = F.normalize(cls_last[i], dim=-1)
        sim = torch.softmax((c[1:] * c[0]).sum(-1) / t_cls, dim=0)
        u, v = F.normalize(img_emb[i], dim=-1), F.normalize(txt_emb[i], dim=-1)
        clip = torch.softmax((u * v[0]).sum(-1) / t_clip, dim=0)
        cnt = valid[i].sum(dim=1)
        d = cnt.float() / n
        d = d / (d.sum() + 1e-6)
        fused = 0.2 * d + 0.8 * (alpha * sim + (1 - alpha) * clip)
        budgets = torch.minimum((fused * n_local).long(), cnt)
        masks[i, 0, g.topk(n_global).indices] = True
        for t in range(k):
            bt = int(budgets[t])
            if bt > 0:
                st = s[t].masked_fill(~valid[i, t], float("-inf"))
                masks[i, t + 1, st.topk(bt).indices] = True
    return masks


def torch_divprune(emb: torch.Tensor, num_keep: int) -> torch.Tensor:
    """DivPrune (algorithms.md §5.6): greedy max-min over 1 - cos, min recomputed over the selected rows each step."""
    out = []
    for x in emb:
        xn = F.normalize(x, dim=-1)
        dist = 1.0 - xn @ xn.T
        sel = torch.empty(num_keep, dtype=torch.long)
        for i in range(num_keep):
            if i == 0:
                scores = dist.topk(2, dim=0, largest=False).values[1]  # second-smallest of each column
            else:
                scores = dist[sel[:i]].min(dim=0).values
            sel[i] = scores.argmax()
        out.append(sel.sort().values)
    return torch.stack(out)


def torch_visionzip(hidden_full, cls_attn, keys, dominant: int, contextual: int) -> torch.Tensor:
    """VisionZip (algorithms.md §5.5). hidden_full (B, 1+N, C), cls_attn (B, H, N), keys (B, 1+N, H, d)."""
    bsz, t, c = hidden_full.shape
    top = cls_attn.sum(dim=1).topk(dominant - 1, dim=-1).indices + 1
    all_idx = torch.cat([torch.zeros(bsz, 1, dtype=torch.long), top], dim=1)
    mask = torch.ones(bsz, t, dtype=torch.bool)
    mask.scatter_(1, all_idx, False)
    dominant_tokens = hidden_full.masked_select(~mask.unsqueeze(-1)).view(bsz, dominant, c)
    metric = keys.mean(dim=2)  # (B, 1+N, d), head mean
    metric_f = metric.masked_select(mask.unsqueeze(-1)).view(bsz, t - dominant, -1)
    hidden_f = hidden_full.masked_select(mask.unsqueeze(-1)).view(bsz, t - dominant, c)
    metric_n = metric_f / metric_f.norm(dim=-1, keepdim=True)
    rest = t - dominant
    step = max(1, rest // contextual)
    target = torch.arange(0, rest, step)[:contextual]
    is_target = torch.isin(torch.arange(rest), target)
    sim = torch.bmm(metric_n[:, ~is_target], metric_n[:, target].transpose(1, 2))
    one_hot = torch.zeros(bsz, int((~is_target).sum()), contextual, dtype=hidden_full.dtype)
    one_hot.scatter_(2, sim.argmax(dim=2, keepdim=True), 1)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    merged = torch.bmm(one_hot.transpose(1, 2), hidden_f[:, ~is_target]) / counts
    contextual_tokens = hidden_f[:, target] + merged
    return torch.cat([dominant_tokens, contextual_tokens], dim=1)


def torch_prumerge_plus(features, attn, keys) -> list[torch.Tensor]:
    """PruMerge+ (algorithms.md §5.4), per image, with the original's per-kept-token loop. Returns a list of (M, C)."""
    out = []
    n = features.shape[1]
    for x, a, k in zip(features, attn, keys):
        q1, q3 = np.percentile(a.numpy(), [25, 75])
        thr = q3 + 1.5 * (q3 - q1)
        ratio = float((a > thr).sum()) / n
        num = int(n * ratio)
        idx = a.topk(num).indices
        step = int(1 / ratio)
        cand = torch.arange(0, n - 1, int(step / 3))
        extra = cand[~torch.isin(cand, idx)]
        idx = torch.cat([idx, extra])
        kn = F.normalize(k, dim=-1)
        upd = torch.zeros(len(idx), x.shape[-1])
        for j, i in enumerate(idx.tolist()):
            rest = torch.cat([torch.arange(i), torch.arange(i + 1, n)])
            cos = kn[rest] @ kn[i]
            nn_idx = rest[cos.topk(32).indices]
            upd[j] = x[i] + (x[nn_idx] * a[nn_idx, None]).sum(0)
        pruned = torch.ones(n, dtype=torch.bool)
        pruned[idx] = False
        extra_tok = (x[pruned] * a[pruned, None]).sum(0, keepdim=True)
        out.append(torch.cat([upd, extra_tok]))
    return out


def torch_uniform(n: int, num_keep: int, batch: int) -> torch.Tensor:
    """Even spatial grid on the sqrt(N) x sqrt(N) patch grid, the rule documented in ``baselines.uniform``:
    g = round(sqrt(K)) rows (clipped to [ceil(K / side), side]) at band centres, row i holds
    floor((i+1)K/g) - floor(iK/g) tokens at the centres of equal column bins."""
    side = int(round(n**0.5))
    g = min(side, max(-(-num_keep // side), round((num_keep * side / side) ** 0.5)))
    centres = lambda count: (torch.arange(count, dtype=torch.float64) + 0.5).mul(side / count).long()  # noqa: E731
    picked = []
    for i, row in enumerate(centres(g).tolist()):
        in_row = (i + 1) * num_keep // g - i * num_keep // g
        picked.append(row * side + centres(in_row))
    return torch.cat(picked).sort().values.expand(batch, -1)


def torch_random(n: int, num_keep: int, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:num_keep].sort().values for _ in range(batch)])


# ================================================================================================================
# Timing helpers
# ================================================================================================================


def _stats(times_s: list[float]) -> dict:
    t = np.asarray(times_s) * 1e3
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    return {"median_ms": float(med), "iqr_ms": float(q3 - q1), "min_ms": float(t.min()), "n": int(t.size)}


def time_jax(fn: Callable[[], Any], repeats: int) -> tuple[dict, float, Any]:
    """(stats, compile+first-call seconds, output). fn must already close over its (device) inputs."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())  # compile + warm-up
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return _stats(times), first, out


def time_pair(jax_fn: Callable[[], Any], torch_fn: Callable[[], Any], repeats: int):
    """Time a JAX and a PyTorch function with their calls *interleaved* (J, T, J, T, ...), so that both see
    the same background load (this matters on a small shared machine). Returns
    (jax stats, jax compile+first-call seconds, jax output, torch stats, torch output)."""
    t0 = time.perf_counter()
    jout = jax.block_until_ready(jax_fn())  # compile + warm-up
    first = time.perf_counter() - t0
    jt, tt = [], []
    with torch.no_grad():
        tout = torch_fn()  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(jax_fn())
            jt.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch_fn()
            tt.append(time.perf_counter() - t0)
    return _stats(jt), first, jout, _stats(tt), tout


# ================================================================================================================
# Methods: each case = (jit fn, eager API fn, torch fn, comparison)
# ================================================================================================================


@dataclasses.dataclass
class Case:
    jit_fn: Callable[[], Any]  # jitted selection on device-resident inputs
    api_fn: Callable[[], Any] | None  # the public function called eagerly (validation included)
    torch_fn: Callable[[], Any]
    compare: Callable[[Any, Any], tuple[bool | None, str]]
    budget_label: str
    note: str = ""
    extra_check: Callable[[Any], tuple[bool | None, str]] | None = None  # untimed, on the JAX output


def _sets_equal(jax_idx, torch_idx) -> tuple[bool, str]:
    a = np.sort(np.asarray(jax_idx), axis=-1)
    b = np.sort(np.asarray(torch_idx), axis=-1)
    if a.shape != b.shape:
        return False, f"shape {a.shape} vs {b.shape}"
    diff = sum(len(set(x.tolist()) ^ set(y.tolist())) // 2 for x, y in zip(a.reshape(-1, a.shape[-1]),
                                                                           b.reshape(-1, b.shape[-1])))
    return diff == 0, ("identical index sets" if diff == 0 else f"{diff} index(es) differ")


def _masks_equal(jax_mask, torch_mask) -> tuple[bool, str]:
    a, b = np.asarray(jax_mask), np.asarray(torch_mask)
    diff = int(np.sum(a != b))
    return diff == 0, ("identical masks" if diff == 0 else f"{diff} mask entries differ")


def _tokens_close(jax_tokens, torch_tokens, atol=1e-3, rtol=1e-4) -> tuple[bool, str]:
    a, b = np.asarray(jax_tokens), np.asarray(torch_tokens)
    if a.shape != b.shape:
        return False, f"shape {a.shape} vs {b.shape}"
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    ok = bool(np.allclose(a, b, atol=atol, rtol=rtol))
    return ok, f"max |diff| {err:.2e}"


def build_case(method: str, budget: int, inp: Inputs, seed: int) -> Case | None:
    """Returns None when the method has no row for this budget (PruMerge+ is adaptive: one row only)."""
    from vlmprune import prune as P  # noqa: N812

    j = {k: jnp.asarray(v) for k, v in vars(inp).items()}
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in vars(inp).items()}
    bsz, n = inp.features.shape[:2]
    label = str(budget)

    if method == "vispruner":
        f = functools.partial(P.vispruner, num_keep=budget, important_ratio=0.5)
        jf = jax.jit(f)

        def exact_check(o):
            from vlmprune.prune.vispruner import l2_normalize

            normalized = np.asarray(jax.jit(l2_normalize)(j["features"]))
            return _sets_equal(o.indices, exact_vispruner(normalized, inp.cls_attn, budget, 0.5))

        return Case(lambda: jf(j["features"], j["cls_attn"]), lambda: f(j["features"], j["cls_attn"]),
                    lambda: torch_vispruner(t["features"], t["cls_attn"], budget, 0.5),
                    lambda o, r: _sets_equal(o.indices, r), label, "important_ratio 0.5", exact_check)
    if method == "fastervlm":
        f = functools.partial(P.fastervlm, num_keep=budget)
        jf = jax.jit(f)
        return Case(lambda: jf(j["cls_attn"]), lambda: f(j["cls_attn"]),
                    lambda: torch_fastervlm(t["cls_attn"], budget),
                    lambda o, r: _sets_equal(o.indices, r), label)
    if method == "hired_single":
        rate = _rate_for(budget, n)
        f = functools.partial(P.hired_single, budget_rate=rate)
        jf = jax.jit(f)
        return Case(lambda: jf(j["cls_attn"]), lambda: f(j["cls_attn"]),
                    lambda: torch_hired_single(t["cls_attn"], rate),
                    lambda o, r: _sets_equal(o.indices, r), label, "LLaVA-1.5 (one partition)")
    if method == "hired":
        rate = _rate_for(budget, n)
        if bsz == 1:
            f = functools.partial(P.hired, budget_rate=rate, alpha=0.5)
            args = (j["nx_shallow"][0], j["nx_deep"][0])
        else:
            f = functools.partial(P.hired_batched, num_tiles=np.full((bsz,), 5, np.int32), budget_rate=rate, alpha=0.5)
            args = (j["nx_shallow"], j["nx_deep"])
        jf = jax.jit(f)
        return Case(lambda: jf(*args), lambda: f(*args),
                    lambda: torch_hired(t["nx_shallow"], t["nx_deep"], rate, 0.5),
                    lambda o, r: _masks_equal(o.mask(n).reshape(r.shape), r), label,
                    "LLaVA-NeXT, 5 partitions, alpha 0.5: budget = mean per partition")
    if method == "hero":
        rate = _rate_for(budget, n)
        side = int(round(n**0.5))
        kw = dict(keep_ratio=rate, alpha=0.5, t_cls=0.1, t_clip=0.1, tokens_per_side=side)
        names = ("hero_thumb", "hero_tiles", "hero_cls", "hero_img", "hero_txt", "hero_valid")
        if bsz == 1:
            f = functools.partial(P.hero, **kw)
            args = tuple(j[k][0] for k in names)
        else:
            from vlmprune.prune.hero import hero_batched

            f = functools.partial(hero_batched, **kw)
            args = tuple(j[k] for k in names)
        jf = jax.jit(f)
        targs = tuple(t[k] for k in names)
        kw_t = {k: v for k, v in kw.items() if k != "tokens_per_side"}
        def exact_check(o):  # HERO's double-softmax scores sit within a few float32 ulps of each other
            ref = torch_hero(*(x.double() if x.is_floating_point() else x for x in targs), **kw_t)
            return _masks_equal(o.mask(n).reshape(ref.shape), ref)

        return Case(lambda: jf(*args), lambda: f(*args), lambda: torch_hero(*targs, **kw_t),
                    lambda o, r: _masks_equal(o.mask(n).reshape(r.shape), r), label,
                    "LLaVA-NeXT 2x2 (800x600), R = budget/N, 11 low + 12 high layers", exact_check)

    # ---- baselines (vlmprune.prune.baselines may not exist yet; ImportError -> skipped by the caller) ----
    from vlmprune.prune import baselines as BL  # noqa: N812

    if method == "divprune":
        f = functools.partial(BL.divprune, num_keep=budget)
        jf = jax.jit(f)
        return Case(lambda: jf(j["emb"]), lambda: f(j["emb"]), lambda: torch_divprune(t["emb"], budget),
                    lambda o, r: _sets_equal(o.indices, r), label,
                    f"post-projector embeddings (B, N, {inp.emb.shape[-1]})")
    if method == "visionzip":
        # VisionZip's README splits: 64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30 (dominant + contextual).
        contextual = max(1, round(budget * 10 / 64))
        dominant = budget - contextual
        heads = inp.cls_attn.shape[1]
        kj = j["keys"].reshape(bsz, n + 1, heads, -1)
        kt = t["keys"].reshape(bsz, n + 1, heads, -1)
        f = functools.partial(BL.visionzip, dominant=dominant, contextual=contextual)
        jf = jax.jit(f)
        return Case(lambda: jf(j["hidden_full"], j["cls_attn"], kj), lambda: f(j["hidden_full"], j["cls_attn"], kj),
                    lambda: torch_visionzip(t["hidden_full"], t["cls_attn"], kt, dominant, contextual),
                    lambda o, r: _tokens_close(np.asarray(o.tokens)[np.asarray(o.valid)].reshape(r.shape), r),
                    label, f"dominant {dominant} + contextual {contextual}")
    if method == "prumerge_plus":
        if budget != min(BUDGETS_SEEN):  # adaptive count: one row only
            return None
        keys = j["keys"][:, 1:]
        f = functools.partial(BL.prumerge_plus, plus=True)
        jf = jax.jit(f)

        def cmp(o, r):
            valid = np.asarray(o.valid)
            tokens = np.asarray(o.tokens)
            counts = [int(v.sum()) for v in valid]
            if counts != [x.shape[0] for x in r]:
                return False, f"counts {counts} vs {[x.shape[0] for x in r]}"
            oks = [_tokens_close(tok[v], x.numpy()) for tok, v, x in zip(tokens, valid, r)]
            return all(ok for ok, _ in oks), f"counts {counts}; " + "; ".join(d for _, d in oks)

        return Case(lambda: jf(j["features"], j["single_attn"], keys), lambda: f(j["features"], j["single_attn"], keys),
                    lambda: torch_prumerge_plus(t["features"], t["single_attn"], t["keys"][:, 1:]), cmp,
                    "adaptive", "IQR outlier count + spatial samples; torch loops over kept tokens as the original")
    if method == "random_keep":
        key = jax.random.PRNGKey(seed)
        f = functools.partial(BL.random_keep, num_keep=budget, batch=bsz)
        jf = jax.jit(f, static_argnums=1)
        return Case(lambda: jf(key, n), lambda: f(key, n), lambda: torch_random(n, budget, bsz, seed),
                    lambda o, r: (None, "n/a: different RNGs"), label)
    if method == "uniform":
        f = functools.partial(BL.uniform, num_keep=budget)
        jf = jax.jit(f, static_argnums=0)
        return Case(lambda: jf(n), lambda: f(n), lambda: torch_uniform(n, budget, bsz),
                    lambda o, r: _sets_equal(np.broadcast_to(np.asarray(o.indices), r.shape), r), label,
                    "data-independent constant grid")
    raise ValueError(f"unknown method {method!r}")


BUDGETS_SEEN: list[int] = []


# ================================================================================================================
# Encoder timing
# ================================================================================================================


def time_encoder(batch: int, layers: int, image_size: int, repeats: int, seed: int) -> dict:
    """Median time of the jitted Flax CLIP vision tower asked for LLaVA's outputs (hidden -2, CLS row of L-2)."""
    from vlmprune.models.vision.clip import CLIPVisionConfig, CLIPVisionTransformer

    cfg = CLIPVisionConfig(num_hidden_layers=layers, image_size=image_size)
    cls_layer = layers - 2 if layers >= 2 else 0  # 22 for the 24-layer CLIP-L
    kw = dict(hidden_state_layers=(-2,), cls_attention_layers=(cls_layer,))
    model = CLIPVisionTransformer(cfg)
    pixels = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, 3, image_size, image_size), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), pixels, **kw))

    # Random params without running the (slow) init: N(0, 0.02) weights, unit LayerNorm scales, zero biases.
    # One NumPy draw for all weights, then views per leaf (no per-shape XLA compilation).
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    names = [str(getattr(path[-1], "key", path[-1])) for path, _ in leaves]
    sizes = [int(np.prod(sd.shape)) for _, sd in leaves]
    n_params = sum(sizes)
    flat = np.random.default_rng(seed).standard_normal(n_params, dtype=np.float32)
    flat *= np.float32(0.02)
    vals, offset = [], 0
    for name, size, (_, sd) in zip(names, sizes, leaves):
        if name == "scale":
            vals.append(jnp.ones(sd.shape, sd.dtype))
        elif name == "bias":
            vals.append(jnp.zeros(sd.shape, sd.dtype))
        else:
            vals.append(jnp.asarray(flat[offset:offset + size].reshape(sd.shape), sd.dtype))
        offset += size
    del flat
    params = jax.tree_util.tree_unflatten(treedef, vals)

    fwd = jax.jit(lambda p, x: model.apply(p, x, **kw))
    stats, first, out = time_jax(lambda: fwd(params, pixels), repeats)
    del params
    return {
        "layers": layers, "layers_run": cls_layer + 1, "image_size": image_size, "batch": batch,
        "hidden_size": cfg.hidden_size, "num_patches": cfg.num_patches, "params": n_params,
        "cls_attention_layer": cls_layer, "compile_s": first, **stats,
    }


# ================================================================================================================
# Report
# ================================================================================================================


def machine_info() -> dict:
    import flax

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or __import__("jaxlib").__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "flax": flax.__version__,
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def _fmt_ms(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def _exact_note(r: dict) -> str:
    if r.get("agree_exact_ref") is None:
        return ""
    return f"; JAX vs float64 reference: {'same' if r['agree_exact_ref'] else r['agree_exact_ref_detail']}"


def markdown_table(rows: list[dict]) -> str:
    head = ("| method | budget | JAX jit ms (median ± IQR) | JAX API ms | PyTorch ms (median ± IQR) | "
            "speed-up (torch/jax): median (min) | % of encoder | JAX compile s | selections agree |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        agree = {True: "yes", False: "NO", None: "n/a"}[r["agree"]]
        lines.append(
            f"| {r['method']} | {r['budget']} | {_fmt_ms(r['jax_ms'])} ± {_fmt_ms(r['jax_iqr_ms'])} | "
            f"{_fmt_ms(r['jax_api_ms'])} | {_fmt_ms(r['torch_ms'])} ± {_fmt_ms(r['torch_iqr_ms'])} | "
            f"{r['speedup']:.1f}× ({r['speedup_min']:.1f}×) | {r['pct_encoder']:.3f} % | {r['jax_compile_s']:.1f} | "
            f"{agree} ({r['agree_detail']}{_exact_note(r)}) |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["method"] != "vispruner":
            continue
        fast = r["speedup"] >= TARGET_SPEEDUP
        small = r["pct_encoder"] <= TARGET_ENCODER_PCT
        out.append(
            f"VisPruner T={r['budget']}: speed-up {r['speedup']:.1f}× "
            f"({'meets' if fast else 'MISSES'} ≥{TARGET_SPEEDUP:g}×), {r['pct_encoder']:.2f} % of encoder "
            f"({'meets' if small else 'MISSES'} ≤{TARGET_ENCODER_PCT:g} %)"
        )
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=1, help="images per call (B)")
    ap.add_argument("--budgets", default="64,128,192", help="comma-separated kept-token budgets")
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated subset of: " + ", ".join(ALL_METHODS))
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    ap.add_argument("--encoder-repeats", type=int, default=3, help="timed encoder calls")
    ap.add_argument("--encoder-layers", type=int, default=24, help="CLIP encoder layers (24 = CLIP-L)")
    ap.add_argument("--image-size", type=int, default=336, help="encoder input size in pixels (multiple of 14)")
    ap.add_argument("--num-tokens", type=int, default=None,
                    help="N for the selection inputs (default: the encoder's patch count, 576 at 336 px)")
    ap.add_argument("--dim", type=int, default=1024, help="feature width C")
    ap.add_argument("--heads", type=int, default=16, help="attention heads H")
    ap.add_argument("--emb-dim", type=int, default=4096, help="post-projector width for DivPrune")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads value (default: leave torch's default, one per core)")
    ap.add_argument("--single-thread-torch", default="vispruner",
                    help="methods also timed with torch.set_num_threads(1), JAX interleaved again (a check on\n"
                         "OpenMP contention when the machine is shared; '' = none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 repeats, 1 encoder repeat")
    ap.add_argument("--out-dir", default=os.path.join(_REPO, "experiments", "results"),
                    help="where selection_cpu.{md,json} go ('' = do not write)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.encoder_repeats = 1
    budgets = [int(b) for b in args.budgets.split(",") if b]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    single_thread = {m.strip() for m in args.single_thread_torch.split(",") if m.strip()}
    for m in methods:
        if m not in ALL_METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    if args.image_size % 14:
        raise SystemExit("--image-size must be a multiple of the patch size 14")
    n = args.num_tokens or (args.image_size // 14) ** 2
    too_big = [b for b in budgets if not 1 <= b <= n]
    if too_big:
        print(f"NOTE budgets {too_big} are outside [1, N={n}] and are dropped", flush=True)
        budgets = [b for b in budgets if 1 <= b <= n]
    BUDGETS_SEEN[:] = budgets

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    info = machine_info()
    print(f"# selection benchmark  {info['date']}  cpu_count={info['cpu_count']}  jax {info['jax']} "
          f"({info['jax_backend']})  torch {info['torch']} ({info['torch_num_threads']} threads)", flush=True)
    print(f"inputs: B={args.batch} N={n} C={args.dim} H={args.heads}; budgets {budgets}; "
          f"repeats {args.repeats}", flush=True)

    inp = make_inputs(args.batch, n, args.dim, args.heads, args.emb_dim, args.seed)

    print(f"encoder: CLIP {args.encoder_layers} layers @ {args.image_size}px, B={args.batch} ...", flush=True)
    enc = time_encoder(args.batch, args.encoder_layers, args.image_size, args.encoder_repeats, args.seed)
    print(f"encoder: {enc['median_ms']:.1f} ms (IQR {enc['iqr_ms']:.1f}, compile {enc['compile_s']:.1f} s, "
          f"{enc['params'] / 1e6:.0f} M params, {enc['layers_run']} layers run)", flush=True)

    rows, skipped = [], []
    for method in methods:
        for budget in budgets:
            try:
                case = build_case(method, budget, inp, args.seed)
            except ImportError as e:
                msg = f"{method}: skipped, JAX implementation not importable ({e})"
                print("NOTE", msg, flush=True)
                skipped.append({"method": method, "reason": str(e)})
                break
            if case is None:
                continue
            try:
                jstats, compile_s, jout, tstats, tout = time_pair(case.jit_fn, case.torch_fn, args.repeats)
                astats, _, _ = time_jax(case.api_fn, max(1, args.repeats // 2)) if case.api_fn else ({}, 0, None)
                agree, detail = case.compare(jout, tout)
                exact, exact_detail = case.extra_check(jout) if case.extra_check else (None, "")
                one_thread = None
                if method in single_thread and torch.get_num_threads() > 1:
                    threads = torch.get_num_threads()
                    torch.set_num_threads(1)
                    try:
                        j1, _, _, t1, _ = time_pair(case.jit_fn, case.torch_fn, args.repeats)
                    finally:
                        torch.set_num_threads(threads)
                    one_thread = {"jax_ms": j1["median_ms"], "torch_ms": t1["median_ms"], "jax_min_ms": j1["min_ms"],
                                  "torch_min_ms": t1["min_ms"], "speedup": t1["median_ms"] / j1["median_ms"]}
            except Exception as e:  # a method whose API differs from what this script expects
                msg = f"{method} budget {budget}: skipped, {type(e).__name__}: {e}"
                print("NOTE", msg, flush=True)
                skipped.append({"method": method, "budget": budget, "reason": f"{type(e).__name__}: {e}"})
                continue
            row = {
                "method": method, "budget": case.budget_label,
                "jax_ms": jstats["median_ms"], "jax_iqr_ms": jstats["iqr_ms"], "jax_min_ms": jstats["min_ms"],
                "jax_api_ms": astats.get("median_ms", float("nan")), "jax_compile_s": compile_s,
                "torch_ms": tstats["median_ms"], "torch_iqr_ms": tstats["iqr_ms"], "torch_min_ms": tstats["min_ms"],
                "speedup": tstats["median_ms"] / jstats["median_ms"],
                "speedup_min": tstats["min_ms"] / jstats["min_ms"],
                "pct_encoder": 100.0 * jstats["median_ms"] / enc["median_ms"],
                "agree": agree, "agree_detail": detail, "note": case.note,
                "agree_exact_ref": exact, "agree_exact_ref_detail": exact_detail,
                "torch_1thread": one_thread,
            }
            rows.append(row)
            print(f"{method:>14} {case.budget_label:>8}: jax {row['jax_ms']:9.3f} ms  torch {row['torch_ms']:9.3f} ms"
                  f"  x{row['speedup']:7.1f}  {row['pct_encoder']:7.3f} % enc  compile {compile_s:5.1f} s  "
                  f"agree={agree} ({detail})" + (f"; vs float64 ref: {exact} ({exact_detail})" if case.extra_check else "")
                  + (f"; torch 1 thread: {one_thread['torch_ms']:.1f} ms, x{one_thread['speedup']:.1f}" if one_thread else ""),
                  flush=True)

    table = markdown_table(rows)
    verdicts = verdict(rows)
    md = [
        "# Token-selection speed on CPU: JAX (jit) vs a straightforward PyTorch implementation",
        "",
        "Command: `" + " ".join(["python experiments/bench_selection.py", *(argv if argv is not None else sys.argv[1:])])
        + "`",
        "",
        f"Machine: {info['processor']}, {info['cpu_count']} CPU cores, {info['platform']}; jax {info['jax']} "
        f"(jaxlib {info['jaxlib']}, backend {info['jax_backend']}), flax {info['flax']}, torch {info['torch']} "
        f"({info['torch_num_threads']} threads), numpy {info['numpy']}; {info['date']}. Load average (1/5/15 min) "
        f"at start {info['loadavg_1_5_15']}, at end {[round(x, 2) for x in os.getloadavg()]}.",
        "",
        f"Inputs: seeded random, B={args.batch}, N={n}, C={args.dim}, H={args.heads}, float32. "
        f"Timings: median ± IQR over {args.repeats} calls after one warm-up, JAX and PyTorch calls interleaved "
        "(JAX: jitted, `block_until_ready`; JAX API: the public function called eagerly, validation and host-side "
        "NaN check included; PyTorch: eager, `torch.no_grad()`, default threads). Speed-up = PyTorch median / "
        "JAX median (in brackets: fastest PyTorch call / fastest JAX call, less sensitive to background load); "
        "% of encoder = JAX median / encoder median. \"selections agree\" compares the JAX and PyTorch outputs "
        "of this run (index sets, masks, or merged tokens to 1e-3). For VisPruner and HERO it also compares JAX "
        "with an untimed float64 reference: float32 rounding can reorder near-equal scores (VisPruner's "
        "best-similarity ranking, HERO's double-softmax scores) and so change the kept set; see `exact_vispruner`.",
        "",
        f"Encoder: Flax CLIP vision tower, {enc['layers']} layers ({enc['layers_run']} run, as LLaVA: hidden state -2 "
        f"and the CLS attention row of layer {enc['cls_attention_layer']}), {enc['image_size']} px, B={args.batch}, "
        f"random weights ({enc['params'] / 1e6:.0f} M params), jitted: **{enc['median_ms']:.1f} ms** "
        f"(IQR {enc['iqr_ms']:.1f} ms over {enc['n']} calls; compile {enc['compile_s']:.1f} s).",
        "",
        table,
        "",
    ]
    notes = [f"* {r['method']}: {r['note']}" for r in rows if r["note"] and r["budget"] in (str(budgets[0]), "adaptive")]
    for r in rows:
        o = r.get("torch_1thread")
        if o:
            notes.append(
                f"* {r['method']} T={r['budget']} re-timed with `torch.set_num_threads(1)` (interleaved again): "
                f"JAX {_fmt_ms(o['jax_ms'])} ms, PyTorch {_fmt_ms(o['torch_ms'])} ms, speed-up {o['speedup']:.1f}× "
                f"(min/min {o['torch_min_ms'] / o['jax_min_ms']:.1f}×)"
            )
    if notes:
        md += ["Notes:", *notes, ""]
    if skipped:
        md += ["Skipped:", *[f"* {s['method']}: {s['reason']}" for s in skipped], ""]
    if verdicts:
        md += [f"Targets (VisPruner ≥ {TARGET_SPEEDUP:g}× faster than PyTorch, ≤ {TARGET_ENCODER_PCT:g} % of encoder):",
               *[f"* {v}" for v in verdicts], ""]
    md_text = "\n".join(md)
    print()
    print(md_text)

    result = {
        "machine": info,
        "config": {k: v for k, v in vars(args).items()} | {"num_tokens": n, "budgets": budgets, "methods": methods},
        "encoder": enc,
        "rows": rows,
        "skipped": skipped,
        "verdicts": verdicts,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "selection_cpu.md"), "w") as fh:
            fh.write(md_text)
        with open(os.path.join(args.out_dir, "selection_cpu.json"), "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.out_dir}/selection_cpu.{{md,json}}", flush=True)
    return result


if __name__ == "__main__":
    main()
