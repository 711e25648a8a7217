"""Straightforward PyTorch implementations of the selection methods, timed against the JAX ones by the selection
suite (``vlmprune.bench.selection``), and an untimed float64 VisPruner reference.

Each follows the method as described in the section cited in its docstring, eager, with
the originals' loop structure where the original has one, so that the speed comparison is against the kind of
code the papers ship. Importing this module imports torch (an optional dependency).
"""

from __future__ import annotations

import os

import numpy as np

# PyTorch's OpenMP workers spin after every op unless told to sleep, and in one process they then take the cores
# from XLA's threads (a 607x2816 @ 2816x1024 matmul ran 1.8x slower in JAX right after a torch call on 2 cores).
# Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402,N812


def torch_vispruner(features: torch.Tensor, cls_attn: torch.Tensor, num_keep: int, ratio: float) -> torch.Tensor:
    """VisPruner, structured like the original ``encode_images`` (docs/methods.md §2.2). Returns (B, T) sorted."""
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
    """HiRED reference-compat (docs/methods.md §3.2), one image at a time.

    shallow/deep (B, P, H, N) -> masks (B, P, N)."""
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
    """HERO (docs/methods.md §4.3), one image at a time. Returns masks (B, 1+K, N)."""
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
    """DivPrune (docs/methods.md §5.6): greedy max-min over 1 - cos, min recomputed over the selected rows each step."""
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
    """VisionZip (docs/methods.md §5.5). hidden_full (B, 1+N, C), cls_attn (B, H, N), keys (B, 1+N, H, d)."""
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
    """PruMerge+ (docs/methods.md §5.4), per image, with the original's per-kept-token loop.

    Returns a list of (M, C)."""
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
