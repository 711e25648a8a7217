"""Reports: the efficiency suite's markdown tables, its plots, its JSON files (and merging split runs), and the
selection suite's table."""

from __future__ import annotations

import json
import os

import numpy as np

from vlmprune.bench import targets
from vlmprune.bench.config import BenchError
from vlmprune.bench.timing import median


def json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _fmt_t(s: dict | None, digits: int = 1) -> str:
    if not s:
        return "n/a"
    return f"{s['median']:.{digits}f} ±{100 * s['spread']:.0f}%"


def _fmt_r(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _fmt_b(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def _fmt_g(x) -> str:
    return "n/a" if x is None else f"{x / 1e9:.2f}"


def _visual(meta: dict) -> str:
    if meta.get("model_type") == "llava_onevision" and meta.get("image_size_hw"):
        h, w = meta["image_size_hw"]
        return (
            f"{meta['tokens_per_image']} visual tokens per tile, the {h}x{w} image packs into "
            f"{meta.get('visual_tokens_unpruned')}"
        )
    return f"{meta['tokens_per_image']} visual tokens per image"


def _header(meta: dict) -> list[str]:
    return [
        f"# Efficiency: {meta['preset']} ({meta['dtype']}) on {meta['backend']} ({meta['device']})",
        "",
        f"{meta['preset_description']}; {meta['params'] / 1e6:.0f} M params, {_visual(meta)}, "
        f"{meta['input_tokens']} input tokens. Median ± half range over {meta['repeats']} timed runs after "
        f"{meta['warmup']} warm-up run(s); decode = {meta['max_new_tokens']} greedy tokens (EOS disabled). "
        f"jax {meta['jax']}"
        + (
            f", torch {meta.get('torch')} ({meta.get('torch_threads')} threads, SDPA, "
            f"OMP_WAIT_POLICY={meta.get('omp_wait_policy')}), "
            f"transformers {meta.get('transformers')}"
            if meta.get("compare_torch")
            else ""
        )
        + f". Host: {meta['host_cpus']} CPUs"
        + (f", load average at start {meta['load_average'][0]:.1f}" if meta.get("load_average") else "")
        + ".",
        "",
        "FLOPs: analytic = 2 × §6 MACs over `n_text + kept` tokens (2ndm = papers' convention, 3ndm = SwiGLU); "
        "XLA = `cost_analysis()` of the LLM-prefill program (incl. LM head over all positions, norms, RoPE). "
        "Selection = the method alone on precomputed encoder outputs (median over "
        f"{meta.get('selection_repeats', meta['repeats'])} calls); select+proj adds the projector.",
        "",
    ]


def _cut(r: dict, key: str) -> str:
    red = r.get("reduction_vs_none", {})
    return f" ({100 * red[key]:.1f}%)" if red.get(key) is not None and r["method"] != "none" else ""


def _jax_table(runs: list[dict], b: int) -> list[str]:
    lines = [
        "## JAX",
        "",
        "| method | kept | analytic GFLOPs 2ndm (cut) | XLA GFLOPs LLM prefill (cut) | vision ms "
        "| selection ms (% of vision) | select+proj ms | LLM prefill ms (cut) | TTFT ms | decode tok/s b1 "
        f"| decode tok/s b{b} | KV cache MiB | peak dev MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} |" + " |" * 11)
            continue
        j = r["jax"]
        share = r.get("selection_share_of_vision")
        sel = "—" if j.get("selection_ms") is None else f"{_fmt_t(j['selection_ms'], 2)} ({100 * share:.2f}%)"
        lines.append(
            f"| {r['label']} | {r['visual_tokens']:g} | "
            f"{_fmt_g(r['analytic']['flops_2ndm'])}{_cut(r, 'analytic_2ndm')} | "
            f"{_fmt_g(r.get('xla_flops_llm_prefill'))}{_cut(r, 'xla_llm_prefill')} | {_fmt_t(j['vision_ms'])} | "
            f"{sel} | "
            f"{_fmt_t(j['select_project_ms'], 2)} | {_fmt_t(j['llm_prefill_ms'])}{_cut(r, 'jax_llm_prefill_ms')} | "
            f"{_fmt_t(j['ttft_ms'])} | {_fmt_t(j['decode_tok_s_b1'])} | {_fmt_t(j.get(f'decode_tok_s_b{b}'))} | "
            f"{_fmt_b(j['kv_cache_bytes'])} | {_fmt_b(j.get('peak_device_bytes'))} |"
        )
    return lines


def _pc(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _batch_table(runs: list[dict], meta: dict, b: int) -> list[str]:
    lines = [
        "",
        f"Batch {b} (the same prompt and image in every row; JAX): the weight reads are shared by {b} rows, "
        "so the prefill is compute-bound and pruning's FLOP cut shows in the time.",
        "",
        f"| method | TTFT ms b{b} (cut) | LLM prefill ms b{b} (cut) | MFU LLM prefill b1 | MFU b{b} |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        if "error" in r:
            continue
        j, mfu = r["jax"], r.get("mfu_llm_prefill") or {}
        lines.append(
            f"| {r['label']} | {_fmt_t(j.get(f'ttft_ms_b{b}'))}{_cut(r, f'jax_ttft_ms_b{b}')} | "
            f"{_fmt_t(j.get(f'llm_prefill_ms_b{b}'))}{_cut(r, f'jax_llm_prefill_ms_b{b}')} | "
            f"{_pc(targets.mfu(mfu))} | {_pc(targets.mfu(mfu, f'_b{b}'))} |"
        )
    if meta.get("peak_flops"):
        lines += [
            "",
            f"MFU = FLOPs of the LLM prefill (XLA's count of the program, or where the backend gives none "
            f"the analytic 3ndm count) ÷ median time ÷ the chip's dense peak of "
            f"{meta['peak_flops'] / 1e12:.0f} TFLOP/s ({meta['dtype']}).",
        ]
    return lines


def _torch_table(runs: list[dict], b: int, hf_class: str) -> list[str]:
    lines = [
        "",
        f"## JAX vs PyTorch (HF `{hf_class}`, SDPA, same weights, same kept tokens)",
        "",
        "Each cell: JAX / PyTorch (ratio JAX÷PyTorch). Times in ms (lower is better), decode in tokens/s "
        "(higher is better). PyTorch TTFT uses JAX's precomputed kept indices (its selection is not run); "
        "PyTorch LLM prefill = `model(inputs_embeds=..., use_cache=True)` (full logits, like JAX), "
        "`last-logits` = the same with `logits_to_keep=1` (what `generate` does).",
        "",
        "| method | vision ms | LLM prefill ms | PT LLM prefill last-logits ms | TTFT ms | decode tok/s b1 "
        f"| decode tok/s b{b} | KV cache MiB | FLOPs LLM prefill G (XLA / torch counter) | peak dev MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if "error" in r or "torch" not in r:
            continue
        j, th, ra = r["jax"], r["torch"], r["ratio"]

        def cell(k, d=1, j=j, th=th, ra=ra):
            return f"{_fmt_t(j.get(k), d)} / {_fmt_t(th.get(k), d)} ({_fmt_r(ra.get(k))})"

        kvr = (j["kv_cache_bytes"] / th["kv_cache_bytes"]) if th.get("kv_cache_bytes") else None
        fl = th.get("flops_llm_prefill")
        flr = (r["xla_flops_llm_prefill"] / fl) if fl and r.get("xla_flops_llm_prefill") else None
        lines.append(
            f"| {r['label']} | {cell('vision_ms')} | {cell('llm_prefill_ms')} | "
            f"{_fmt_t(th.get('llm_prefill_last_logits_ms'))} | {cell('ttft_ms')} | {cell('decode_tok_s_b1')} | "
            f"{cell(f'decode_tok_s_b{b}')} | {_fmt_b(j['kv_cache_bytes'])} / {_fmt_b(th.get('kv_cache_bytes'))} "
            f"({_fmt_r(kvr)}) | {_fmt_g(r.get('xla_flops_llm_prefill'))} / {_fmt_g(fl)} ({_fmt_r(flr)}) | "
            f"{_fmt_b(j.get('peak_device_bytes'))} / {_fmt_b(th.get('peak_device_bytes'))} |"
        )
    return lines


def _targets_list(runs: list[dict], tg: dict) -> list[str]:
    lines = []
    lc = [
        f"{r['label']} {r['logits_vs_torch']['rel_l2']:.1e} / {r['logits_vs_torch']['top1_agree']:.0%}"
        for r in runs
        if r.get("logits_vs_torch")
    ]
    if lc:
        lines += [
            "",
            "Same model on both sides: last-token logits of the two LLM prefills, relative L2 error / "
            "top-1 agreement: " + ", ".join(lc) + ".",
        ]
    tc = [f"{r['label']} {r['tokens_vs_torch']['rel_l2']:.1e}" for r in runs if r.get("tokens_vs_torch")]
    if tc:
        lines += [
            "",
            "Same kept tokens on both sides: the visual tokens the two LLMs receive, relative L2 error over the "
            "valid slots: " + ", ".join(tc) + ".",
        ]
    if tg:
        lines += ["", "## Targets", ""]
        for k, v in tg.items():
            mark = "met" if v.get("met") else "NOT met"
            detail = ", ".join(f"{kk}={_short(vv)}" for kk, vv in v.items() if kk != "met")
            lines.append(f"- **{k}**: {mark} ({detail})")
    return lines


def markdown(out: dict) -> str:
    """The efficiency results as markdown: the JAX table, the batch table, JAX vs PyTorch, the targets."""
    meta, runs = out["meta"], out["runs"]
    b = meta["decode_batch"]
    lines = _header(meta) + _jax_table(runs, b) + _batch_table(runs, meta, b)
    if meta.get("compare_torch"):
        lines += _torch_table(runs, b, meta.get("torch_model", "LlavaForConditionalGeneration"))
    lines += _targets_list(runs, out.get("targets") or {})
    lines.append("")
    return "\n".join(lines)


def _short(v):
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items()) + "}"
    return str(v)


def _series(runs, m, fn):
    pts = sorted((r["visual_tokens"], fn(r)) for r in runs if r["method"] == m and fn(r) is not None)
    return [p[0] for p in pts], [p[1] for p in pts]


def _finish(plt, fig, ax, colors, methods, styles, ylabel, title_text, path):
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=colors[m], marker="o", label=m)
        for m in methods
        if any(ln.get_color() == colors[m] for ln in ax.lines)
    ]
    handles += [Line2D([], [], color="0.3", linestyle=ls, marker=mk, label=lab) for lab, ls, mk in styles]
    if handles:
        ax.legend(handles=handles, fontsize=8)
    ax.set_xlabel("kept visual tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title_text)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _torch_flops_g(r):
    fl = (r.get("torch") or {}).get("flops_llm_prefill")
    return fl / 1e9 if fl else None


def plot(out: dict, path_prefix: str) -> list[str]:
    """``<prefix>_ttft.png`` and ``<prefix>_flops.png``: one line per method, PyTorch dashed beside JAX."""
    import matplotlib  # optional dependency (the viz extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in out["runs"] if "error" not in r]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    meta = out["meta"]
    title = f"{meta['preset']} {meta['dtype']} on {meta['backend']}"
    fig, ax = plt.subplots(figsize=(7, 4.5))  # time to first token
    for m in methods:
        ax.plot(*_series(runs, m, lambda r: r["jax"]["ttft_ms"]["median"]), "o-", color=colors[m])
        xs, ys = _series(runs, m, lambda r: median((r.get("torch") or {}).get("ttft_ms")))
        if xs:
            ax.plot(xs, ys, "s--", color=colors[m], alpha=0.7)
    styles = [("JAX", "-", "o")] + ([("PyTorch (HF)", "--", "s")] if meta.get("compare_torch") else [])
    paths = [
        _finish(
            plt,
            fig,
            ax,
            colors,
            methods,
            styles,
            "time to first token (ms)",
            f"Time to first token — {title}",
            f"{path_prefix}_ttft.png",
        )
    ]
    fig, ax = plt.subplots(figsize=(7, 4.5))  # FLOPs
    has_torch = False
    for m in methods:
        ax.plot(*_series(runs, m, lambda r: r["analytic"]["flops_2ndm"] / 1e9), "o-", color=colors[m])
        xs, ys = _series(
            runs, m, lambda r: r["xla_flops_llm_prefill"] / 1e9 if r.get("xla_flops_llm_prefill") else None
        )
        if xs:
            ax.plot(xs, ys, "^:", color=colors[m], alpha=0.8)
        xs, ys = _series(runs, m, _torch_flops_g)
        if xs:
            has_torch = True
            ax.plot(xs, ys, "s--", color=colors[m], alpha=0.6)
    styles = [("analytic §6 (2ndm)", "-", "o"), ("XLA cost_analysis (JAX)", ":", "^")]
    if has_torch:
        styles.append(("torch FlopCounter (PyTorch)", "--", "s"))
    paths.append(
        _finish(
            plt,
            fig,
            ax,
            colors,
            methods,
            styles,
            "LLM prefill GFLOPs",
            f"Prefill FLOPs — {title}",
            f"{path_prefix}_flops.png",
        )
    )
    return paths


def write_outputs(out: dict, out_dir: str, tag: str, *, plots: bool = True) -> list[str]:
    """``efficiency_<tag>.{json,md}`` (and the PNGs) under ``out_dir``; the run's partial file is removed."""
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, f"efficiency_{tag}")
    with open(prefix + ".json", "w") as f:
        json.dump(out, f, indent=1, default=json_default)
    with open(prefix + ".md", "w") as f:
        f.write(markdown(out))
    paths = [prefix + ".json", prefix + ".md"]
    if plots:
        paths += plot(out, prefix)
    partial = prefix + ".partial.json"
    if os.path.exists(partial):
        os.remove(partial)
    return paths


def merge_outputs(paths: list[str], out_dir: str, tag: str, *, plots: bool = True) -> dict:
    """Merge result files of one preset/dtype/device (e.g. runs split over several sessions on a lent GPU).

    Later files replace earlier runs of the same label; derived figures and targets are recomputed, and the
    merged ``efficiency_<tag>.*`` files are written to ``out_dir``.
    """
    outs = []
    for p in paths:
        try:
            with open(p) as f:
                outs.append(json.load(f))
        except OSError as e:
            raise BenchError(f"cannot read {p}: {e.strerror or e}") from e
        except json.JSONDecodeError as e:
            raise BenchError(f"{p} is not valid JSON ({e})") from e
        if not isinstance(outs[-1], dict) or "meta" not in outs[-1] or "runs" not in outs[-1]:
            raise BenchError(f"{p} is not an efficiency result (no 'meta' and 'runs')")
    key = lambda m: (m["preset"], m["dtype"], m["device"], m["decode_batch"], m["max_new_tokens"])  # noqa: E731
    k0 = key(outs[0]["meta"])
    for p, o in zip(paths, outs):
        if key(o["meta"]) != k0:
            raise BenchError(f"cannot merge {p}: (preset, dtype, device, batch, new tokens) {key(o['meta'])} != {k0}")
    runs: dict[str, dict] = {}
    for o in outs:
        for r in o["runs"]:
            runs[r["label"]] = r
    meta = dict(
        outs[0]["meta"],
        merged_from=[os.path.basename(p) for p in paths],
        compare_torch=any(o["meta"].get("compare_torch") for o in outs),
    )
    for o in outs[1:]:
        for k in (
            "torch",
            "transformers",
            "torch_threads",
            "torch_device",
            "torch_attn",
            "omp_wait_policy",
            "torch_model",
        ):
            meta.setdefault(k, o["meta"].get(k))
    order = [r["label"] for o in outs for r in o["runs"]]
    results = [runs[lab] for lab in dict.fromkeys(order)]
    results.sort(key=lambda r: r.get("method") != "none")  # the unpruned baseline first
    for r in results:
        r.pop("reduction_vs_none", None)
    targets.derived(results, meta)
    out = {"meta": meta, "runs": results, "targets": targets.evaluate_targets(results, meta)}
    out["files"] = write_outputs(out, out_dir, tag, plots=plots)
    return out


# ----------------------------------------------------------------------------------------------- selection suite


def _fmt_ms(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def _exact_note(r: dict) -> str:
    if r.get("agree_exact_ref") is None:
        return ""
    return f"; JAX vs float64 reference: {'same' if r['agree_exact_ref'] else r['agree_exact_ref_detail']}"


def selection_table(rows: list[dict]) -> str:
    head = (
        "| method | budget | JAX jit ms (median ± IQR) | JAX API ms | PyTorch ms (median ± IQR) | "
        "speed-up (torch/jax): median (min) | % of encoder | JAX compile s | selections agree |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        agree = {True: "yes", False: "NO", None: "n/a"}[r["agree"]]
        j, t = r["jax"], r["torch"]
        lines.append(
            f"| {r['method']} | {r['budget']} | {_fmt_ms(j['median'])} ± {_fmt_ms(j['iqr'])} | "
            f"{_fmt_ms(median(r.get('jax_api')))} | {_fmt_ms(t['median'])} ± {_fmt_ms(t['iqr'])} | "
            f"{r['speedup']:.1f}× ({r['speedup_min']:.1f}×) | {r['pct_encoder']:.3f} % | {r['jax_compile_s']:.1f} | "
            f"{agree} ({r['agree_detail']}{_exact_note(r)}) |"
        )
    return "\n".join(lines)


def selection_verdicts(rows: list[dict], speedup: float, encoder_pct: float) -> list[str]:
    out = []
    for r in rows:
        if r["method"] != "vispruner":
            continue
        fast, small = r["speedup"] >= speedup, r["pct_encoder"] <= encoder_pct
        out.append(
            f"VisPruner T={r['budget']}: speed-up {r['speedup']:.1f}× "
            f"({'meets' if fast else 'MISSES'} ≥{speedup:g}×), {r['pct_encoder']:.2f} % of encoder "
            f"({'meets' if small else 'MISSES'} ≤{encoder_pct:g} %)"
        )
    return out


def _selection_notes(rows: list[dict], budgets: list[int]) -> list[str]:
    first = str(min(budgets)) if budgets else None
    notes = [f"* {r['method']}: {r['note']}" for r in rows if r["note"] and r["budget"] in (first, "adaptive")]
    for r in rows:
        o = r.get("torch_1thread")
        if o:
            notes.append(
                f"* {r['method']} T={r['budget']} re-timed with `torch.set_num_threads(1)` (interleaved again): "
                f"JAX {_fmt_ms(o['jax']['median'])} ms, PyTorch {_fmt_ms(o['torch']['median'])} ms, speed-up "
                f"{o['speedup']:.1f}× (min/min {o['torch']['min'] / o['jax']['min']:.1f}×)"
            )
    return notes


def selection_markdown(result: dict, command: str, speedup: float, encoder_pct: float) -> str:
    """The selection suite's results as markdown: machine, inputs, encoder, the table, notes and targets."""
    info, cfg, enc, rows = result["machine"], result["config"], result["encoder"], result["rows"]
    md = [
        "# Token-selection speed on CPU: JAX (jit) vs a straightforward PyTorch implementation",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['processor']}, {info['host_cpus']} CPU cores, {info['platform']}; jax {info['jax']} "
        f"(jaxlib {info['jaxlib']}, backend {info['backend']}), flax {info['flax']}, torch {info.get('torch')} "
        f"({info.get('torch_threads')} threads), numpy {info['numpy']}; {info['date']}. Load average (1/5/15 min) "
        f"at start {info['load_average']}, at end {result.get('loadavg_end')}.",
        "",
        f"Inputs: seeded random, B={cfg['batch']}, N={cfg['num_tokens']}, C={cfg['dim']}, H={cfg['heads']}, float32. "
        f"Timings: median ± IQR over {cfg['repeats']} calls after one warm-up, JAX and PyTorch calls interleaved "
        "(JAX: jitted, `block_until_ready`; JAX API: the public function called eagerly, validation and host-side "
        "NaN check included; PyTorch: eager, `torch.no_grad()`, default threads). Speed-up = PyTorch median / "
        "JAX median (in brackets: fastest PyTorch call / fastest JAX call, less sensitive to background load); "
        '% of encoder = JAX median / encoder median. "selections agree" compares the JAX and PyTorch outputs '
        "of this run (index sets, masks, or merged tokens to 1e-3). For VisPruner and HERO it also compares JAX "
        "with an untimed float64 reference: float32 rounding can reorder near-equal scores (VisPruner's "
        "best-similarity ranking, HERO's double-softmax scores) and so change the kept set; see `exact_vispruner`.",
        "",
        f"Encoder: Flax CLIP vision tower, {enc['layers']} layers ({enc['layers_run']} run, as LLaVA: hidden state -2 "
        f"and the CLS attention row of layer {enc['cls_attention_layer']}), {enc['image_size']} px, B={cfg['batch']}, "
        f"random weights ({enc['params'] / 1e6:.0f} M params), jitted: **{enc['median']:.1f} ms** "
        f"(IQR {enc['iqr']:.1f} ms over {enc['n']} calls; compile {enc['compile_s']:.1f} s).",
        "",
        selection_table(rows),
        "",
    ]
    notes = _selection_notes(rows, cfg["budgets"])
    if notes:
        md += ["Notes:", *notes, ""]
    if result["skipped"]:
        md += ["Skipped:", *[f"* {s['method']}: {s['reason']}" for s in result["skipped"]], ""]
    if result["verdicts"]:
        md += [
            f"Targets (VisPruner ≥ {speedup:g}× faster than PyTorch, ≤ {encoder_pct:g} % of encoder):",
            *[f"* {v}" for v in result["verdicts"]],
            "",
        ]
    return "\n".join(md)
