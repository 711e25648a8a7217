"""Figures derived from the measured runs (reductions vs the unpruned run, selection share, MFU) and the issue's
targets read off them."""

from __future__ import annotations

import os

import numpy as np

from vlmprune.flops import reduction

#: Dense bf16/fp16 peak FLOP/s from the vendors' datasheets (no sparsity), matched on ``device_kind``
#: (first match wins, so the more specific names come first). Override with VLMPRUNE_PEAK_FLOPS.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("H20", 148e12),
    ("GH200", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The chip's dense peak FLOP/s for ``dtype`` (bf16/fp16 only), or None where unknown."""
    env = os.environ.get("VLMPRUNE_PEAK_FLOPS")
    if env:
        return float(env)
    if dtype not in ("bfloat16", "float16"):
        return None
    for name, v in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return v
    return None


def mfu(figures: dict, suffix: str = "") -> float | None:
    """A run's LLM-prefill MFU (``suffix`` "" for batch 1, "_b<B>" for the larger batch): XLA's FLOP count where
    the backend gives one, else the analytic 3ndm count."""
    v = figures.get("xla" + suffix)
    return v if v is not None else figures.get("analytic_3ndm" + suffix)


def derived(results: list[dict], meta: dict | None = None) -> None:
    """Reductions vs the unpruned run, selection share of the encoder time and model FLOP utilisation."""
    peak = (meta or {}).get("peak_flops")
    base = next((r for r in results if r.get("method") == "none" and "error" not in r), None)
    for r in results:
        if "error" in r:
            continue
        j = r["jax"]
        if peak and j.get("llm_prefill_ms"):
            sec = j["llm_prefill_ms"]["median"] / 1e3
            fl = r.get("xla_flops_llm_prefill")
            r["mfu_llm_prefill"] = {
                "xla": fl / sec / peak if fl else None,
                "analytic_3ndm": r["analytic"]["flops_3ndm"] / sec / peak,
            }
            b = (meta or {}).get("decode_batch")
            flb, tb = r.get(f"xla_flops_llm_prefill_b{b}"), j.get(f"llm_prefill_ms_b{b}")
            if tb:
                secb = tb["median"] / 1e3
                r["mfu_llm_prefill"][f"xla_b{b}"] = flb / secb / peak if flb else None
                r["mfu_llm_prefill"][f"analytic_3ndm_b{b}"] = b * r["analytic"]["flops_3ndm"] / secb / peak
        if j.get("selection_ms") and j.get("vision_ms"):
            r["selection_share_of_vision"] = j["selection_ms"]["median"] / j["vision_ms"]["median"]
        if base is None:
            continue
        a, b = r["analytic"], base["analytic"]
        r["reduction_vs_none"] = red = {
            "analytic_2ndm": reduction(a["flops_2ndm"], b["flops_2ndm"]),
            "analytic_3ndm": reduction(a["flops_3ndm"], b["flops_3ndm"]),
            "xla_llm_prefill": (
                reduction(r["xla_flops_llm_prefill"], base["xla_flops_llm_prefill"])
                if r.get("xla_flops_llm_prefill") and base.get("xla_flops_llm_prefill")
                else None
            ),
            "jax_llm_prefill_ms": 1 - j["llm_prefill_ms"]["median"] / base["jax"]["llm_prefill_ms"]["median"],
            "jax_ttft_ms": 1 - j["ttft_ms"]["median"] / base["jax"]["ttft_ms"]["median"],
        }
        for k in [k for k in j if k.startswith(("ttft_ms_b", "llm_prefill_ms_b"))]:
            if j.get(k) and base["jax"].get(k):
                red[f"jax_{k}"] = 1 - j[k]["median"] / base["jax"][k]["median"]
        if "torch" in r and r["torch"].get("llm_prefill_ms") and base.get("torch", {}).get("llm_prefill_ms"):
            tb = base["torch"]
            red["torch_llm_prefill_ms"] = 1 - r["torch"]["llm_prefill_ms"]["median"] / tb["llm_prefill_ms"]["median"]
            red["torch_ttft_ms"] = 1 - r["torch"]["ttft_ms"]["median"] / tb["ttft_ms"]["median"]


def evaluate_targets(results: list[dict], meta: dict) -> dict:
    """The issue's targets, read off the results (None where a figure is missing)."""
    ok = [r for r in results if "error" not in r]
    t: dict = {}
    b = meta.get("decode_batch", 4)
    if meta.get("compare_torch"):
        pr = [r["ratio"]["llm_prefill_ms"] for r in ok if r.get("ratio", {}).get("llm_prefill_ms")]
        t["jax_llm_prefill_le_torch"] = {
            "max_ratio": max(pr) if pr else None,
            "median_ratio": float(np.median(pr)) if pr else None,
            "met": bool(pr) and max(pr) <= 1.0,
            "aim_0.7_met": bool(pr) and max(pr) <= 0.7,
        }
        tt = [r["ratio"]["ttft_ms"] for r in ok if r.get("ratio", {}).get("ttft_ms")]
        t["jax_ttft_le_torch"] = {"max_ratio": max(tt) if tt else None, "met": bool(tt) and max(tt) <= 1.0}
        for key in ("decode_tok_s_b1", f"decode_tok_s_b{b}"):
            d = [r["ratio"][key] for r in ok if r.get("ratio", {}).get(key)]
            t[f"jax_{key}_ge_torch"] = {"min_ratio": min(d) if d else None, "met": bool(d) and min(d) >= 1.0}
    shares = {r["label"]: r.get("selection_share_of_vision") for r in ok if r.get("method") != "none"}
    vals = [v for v in shares.values() if v is not None]
    t["selection_le_2pct_of_vision"] = {
        "shares": shares,
        "max": max(vals) if vals else None,
        "met": bool(vals) and max(vals) <= 0.02,
    }
    vp = next(
        (r for r in ok if r.get("method") == "vispruner" and r.get("budget") == 64 and r.get("reduction_vs_none")), None
    )
    base = next((r for r in ok if r.get("method") == "none"), None)
    if meta.get("backend") != "cpu":  # the accelerator targets, at batch 1 and at the larger batch
        if base is not None and base.get("mfu_llm_prefill"):
            m = base["mfu_llm_prefill"]
            v = mfu(m)
            t["unpruned_llm_prefill_mfu_ge_40pct_b1"] = {
                "mfu": v,
                "mfu_analytic_3ndm": m["analytic_3ndm"],
                "peak_tflops": meta["peak_flops"] / 1e12,
                "met": v >= 0.40,
            }
            vb = mfu(m, f"_b{b}")
            if vb is not None:
                t[f"unpruned_llm_prefill_mfu_ge_40pct_b{b}"] = {"mfu": vb, "met": vb >= 0.40}
        if base is not None and vp is not None:
            for key, name in (("ttft_ms", "b1"), (f"ttft_ms_b{b}", f"b{b}")):
                if vp["jax"].get(key) and base["jax"].get(key):
                    r = vp["jax"][key]["median"] / base["jax"][key]["median"]
                    t[f"vispruner64_ttft_le_0.3x_unpruned_{name}"] = {"ratio": r, "met": r <= 0.3}
    if vp is not None:
        red = vp["reduction_vs_none"]
        t["vispruner64_llm_prefill_cut_ge_70pct"] = {
            "cut": red["jax_llm_prefill_ms"],
            "met": red["jax_llm_prefill_ms"] >= 0.70,
        }
        # the measured count: XLA's, else (GPU, where the lowered program reports none) PyTorch's FLOP counter
        measured = red["xla_llm_prefill"]
        src = "xla"
        tf_vp, tf_base = (
            vp.get("torch", {}).get("flops_llm_prefill"),
            (base or {}).get("torch", {}).get("flops_llm_prefill"),
        )
        if measured is None and tf_vp and tf_base:
            measured, src = 1 - tf_vp / tf_base, "torch_flop_counter"
        t["vispruner64_flops_cut_as_predicted"] = {
            "analytic_2ndm": red["analytic_2ndm"],
            "analytic_3ndm": red["analytic_3ndm"],
            "measured": measured,
            "measured_by": src,
            "met": measured is not None and abs(measured - red["analytic_3ndm"]) <= 0.05,
        }
    return t
