"""The efficiency suite: one method run measured stage by stage, and the whole benchmark over a method list.

Per run (median and spread over ``repeats`` timed runs after ``warmup`` untimed ones, every figure behind
``jax.block_until_ready``): analytic and XLA FLOPs of the LLM prefill, vision encoder time, selection time (the
method alone on precomputed encoder outputs) and select+project time, LLM prefill time on the assembled sequence,
time to first token end to end, decode tokens/s at batch 1 and at a larger batch, KV-cache bytes and peak device
memory where the backend reports it; with a PyTorch side, the same figures for HF's model fed the same tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlmprune import pipeline
from vlmprune.bench import model_access as access
from vlmprune.bench import report, targets
from vlmprune.bench.config import BenchConfig, BenchError, MethodRun, log, parse_methods
from vlmprune.bench.presets import PRESETS, bench_inputs, build_model
from vlmprune.bench.timing import SELECTION_REPEATS, load_average, machine_info, measure, median
from vlmprune.bench.torch_side import (
    TorchSide,
    compare_logits,
    compare_tokens,
    torch_mode,
    torch_selection,
    torch_selection_onevision,
)
from vlmprune.flops import prefill_macs


def xla_flops(lowered) -> float | None:
    """XLA's FLOP count of a lowered program (pre-optimisation HLO: after compilation the GPU backend moves the
    matmuls into library calls its cost model does not count); None where the backend gives none."""
    try:
        ca = lowered.cost_analysis()
    except Exception:  # noqa: BLE001  (backends without a cost model raise various errors)
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


def peak_device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    if not stats or stats.get("peak_bytes_in_use") is None:
        return None
    return int(stats["peak_bytes_in_use"])


def ratios(jx: dict, th: dict) -> dict:
    out = {}
    for k, v in jx.items():
        a, b = median(v), median(th.get(k))
        out[k] = (a / b) if (a is not None and b) else None
    return out


@dataclasses.dataclass
class _Run:
    """One method run in progress: its inputs, the figures so far (res / jx / th) and what later stages reuse."""

    model: Any
    pieces: access.JaxPieces
    run: MethodRun
    x1: dict
    xb: dict
    ts: TorchSide | None
    repeats: int
    warmup: int
    max_new_tokens: int
    res: dict = dataclasses.field(default_factory=dict)
    jx: dict = dataclasses.field(default_factory=dict)
    th: dict = dataclasses.field(default_factory=dict)
    st: dict = dataclasses.field(default_factory=dict)  # intermediate arrays shared between stages

    def measure(self, jfn, tfn=None, **kw):
        kw.setdefault("repeats", self.repeats)
        with torch_mode(self.ts):
            return measure(jfn, tfn, warmup=self.warmup, **kw)

    @property
    def inside_llm(self) -> bool:
        return access.inside_llm(self.run.pruner)


def _vision(r: _Run) -> None:
    p, st = r.run.pruner, r.st
    st["planned"] = planned = access.plan_inputs(r.model, r.x1, p)
    st["plan"] = planned.sequence
    vis_fn = r.pieces.vision_fn(p, planned.inputs.pixel_values)  # the pixels the model encodes (NeXT: padded grid)
    st["pix_t"] = r.ts.t(r.x1["pixel_values"], r.ts.dtype) if r.ts else None
    sizes = r.x1.get("image_sizes")
    st["sizes_t"] = r.ts.t(sizes, r.ts.torch.long) if (r.ts and sizes is not None) else None
    tfn = (lambda: r.ts.features(st["pix_t"], st["sizes_t"])) if r.ts else None
    r.jx["vision_ms"], r.th["vision_ms"] = r.measure(vis_fn, tfn)
    st["enc"] = vis_fn()


def _selection_next(r: _Run) -> None:
    p, st, params, cfg = r.run.pruner, r.st, r.model.params, r.model.config
    sp = r.pieces.select_project_fn(None if r.inside_llm else p, st["planned"])
    st["select_project"] = lambda: sp(st["enc"])
    r.jx["selection_ms"] = None
    st["result"] = None
    if p is not None and not r.inside_llm:
        # the selection alone on precomputed encoder outputs (and, for DivPrune, projected embeddings)
        taps_sel = st["enc"].replace(embeddings=r.pieces.project(params, st["enc"].features))
        sel = r.pieces.select_fn(p, st["planned"].context(cfg))
        r.jx["selection_ms"], _ = r.measure(lambda: sel(taps_sel), repeats=max(r.repeats, SELECTION_REPEATS))
    st["tokens"], st["valid"] = st["select_project"]()
    st["project_first"] = False


def _selection_llava(r: _Run) -> None:
    p, st, params, cfg, enc = r.run.pruner, r.st, r.model.params, r.model.config, r.st["enc"]
    proj_all = r.pieces.project(params, enc.features)
    st["project_first"] = False
    st["result"] = None
    r.jx["selection_ms"] = None
    if p is None or r.inside_llm:
        st["select_project"] = lambda: r.pieces.project(params, enc.features)
        st["tokens"], st["valid"] = proj_all, jnp.ones(proj_all.shape[:2], bool)
        return
    st["project_first"] = access.project_first(p, cfg, enc.num_tokens)
    # the selection alone on precomputed encoder outputs (DivPrune: on the projected embeddings)
    taps_sel = enc
    if pipeline.tap_request(cfg, p).projected:
        taps_sel = enc.replace(embeddings=proj_all)
    if st["project_first"]:
        taps_sel = taps_sel.replace(features=proj_all)
    sel = r.pieces.select_fn(p, st["planned"].context(cfg))
    r.jx["selection_ms"], _ = r.measure(lambda: sel(taps_sel), repeats=max(r.repeats, SELECTION_REPEATS))
    st["result"] = sel(taps_sel)[0]
    sp = r.pieces.select_project_fn(p, st["planned"])
    st["select_project"] = lambda: sp(enc)
    st["tokens"], st["valid"] = st["select_project"]()


def _selection_onevision(r: _Run) -> None:
    """LLaVA-OneVision: the selection alone on the tiles' taps (per-tile methods) or on the precomputed projected
    packed block (DivPrune); its kept indices in the LLM's order feed the PyTorch side."""
    p, st = r.run.pruner, r.st
    sp = r.pieces.select_project_fn(None if r.inside_llm else p, st["planned"])
    st["select_project"] = lambda: sp(st["enc"])
    st["project_first"] = False
    st["result"] = st["kept"] = None
    r.jx["selection_ms"] = None
    if p is not None and not r.inside_llm:
        prepare, select, where = r.pieces.onevision_select_fn(p, st["planned"])
        sel_in = prepare(st["enc"])
        r.jx["selection_ms"], _ = r.measure(lambda: select(sel_in), repeats=max(r.repeats, SELECTION_REPEATS))
        st["result"], (idx, valid) = select(sel_in)
        st["kept"] = {"where": where, "idx": idx, "valid": valid}
    st["tokens"], st["valid"] = st["select_project"]()
    if st.get("kept") is not None:  # the LLM gets the first `stride` entries (mode B: kept slots come first)
        w = int(st["valid"].shape[1])
        st["kept"] = dict(st["kept"], idx=st["kept"]["idx"][:, :w], valid=st["kept"]["valid"][:, :w])


_SELECTION = {"llava_next": _selection_next, "llava_onevision": _selection_onevision}


def _selection(r: _Run) -> None:
    _SELECTION.get(r.model.config.model_type, _selection_llava)(r)
    r.jx["select_project_ms"], _ = r.measure(r.st["select_project"])
    valid = r.st["valid"]
    r.res["visual_tokens"] = float(np.asarray(valid).sum(-1).mean())
    r.res["visual_slots"] = int(valid.shape[1])
    r.res["project_first"] = r.st["project_first"]


def _analytic(r: _Run) -> None:
    """§6 FLOPs of the LLM prefill over ``n_text + kept`` tokens (FastV: all tokens up to its layer)."""
    p, plan, t, res = r.run.pruner, r.st["plan"], r.model.config.text, r.res
    n_text = int(np.asarray(plan.text_mask[0]).sum())
    res["text_tokens"] = n_text
    res["sequence_slots"] = int(plan.length)
    n_valid = res["visual_tokens"]
    fkw = {}
    if r.inside_llm:
        if r.model.config.model_type == "llava_onevision":  # FastV keeps floor(ratio·V) of each row's V
            kept = int(np.floor(np.float32(p.keep_ratio) * np.float32(n_valid)))
        else:
            kept = p.kept_per_image(r.model.config) * plan.num_images
        fkw = dict(drop_after_layer=p.layer, dropped=int(round(n_valid)) - kept)
        res["visual_tokens"] = kept
        res["visual_tokens_before_drop"] = n_valid
    n = n_text + n_valid
    dims = (t.hidden_size, t.intermediate_size, t.num_hidden_layers)
    macs2 = prefill_macs(int(round(n)), *dims, **fkw)
    macs3 = prefill_macs(int(round(n)), *dims, ffn="3ndm", **fkw)
    res["analytic"] = {"n_tokens": n, "macs_2ndm": macs2, "flops_2ndm": 2 * macs2, "flops_3ndm": 2 * macs3}


def _torch_inputs(r: _Run) -> None:
    """The PyTorch side's kept tokens and assembled sequence (the same plan as JAX's)."""
    ts, st = r.ts, r.st
    if ts.onevision:
        st["tsel"] = tsel = torch_selection_onevision(ts, st["kept"], int(st["valid"].shape[1]))
        r.res["torch_tokens"] = "hf-packed" if st["kept"] is None else f"hf-at-kept-{st['kept']['where']}-indices"
    else:
        st["tsel"] = tsel = torch_selection(ts, st["result"], st["tokens"], st["project_first"])
        r.res["torch_tokens"] = "jax-merged" if (tsel and tsel["tokens"] is not None) else "hf-at-kept-indices"
    plan = st["plan"]
    st["plan_t"] = tuple(ts.t(a) for a in (plan.text_src, plan.vis_src, plan.text_mask)) + (
        ts.t(np.asarray(st["valid"])),
    )
    st["ids_t"] = ts.t(r.x1["input_ids"], ts.torch.long)
    with torch_mode(ts):
        vis_t = ts.visual_tokens(st["pix_t"], tsel, st["sizes_t"])
        st["emb_t"] = ts.assemble(st["ids_t"], vis_t, st["plan_t"])
    r.res["tokens_vs_torch"] = compare_tokens(st["tokens"], vis_t, st["valid"])


def _llm_prefill(r: _Run) -> None:
    st, res = r.st, r.res
    max_len = st["plan"].length + r.max_new_tokens
    compiled, call, lowered = r.pieces.llm_prefill_program(st["planned"], max_len)
    res["xla_flops_llm_prefill"] = xla_flops(lowered)
    res["xla_flops_prefill"] = xla_flops(r.pieces.prefill_program(st["planned"], max_len))
    _analytic(r)
    tfn = tfn_last = None
    if r.ts is not None:
        _torch_inputs(r)
        tfn = lambda: r.ts.prefill(*st["emb_t"])  # noqa: E731
        tfn_last = lambda: r.ts.prefill(*st["emb_t"], logits_to_keep=1)  # noqa: E731
    r.jx["llm_prefill_ms"], r.th["llm_prefill_ms"] = r.measure(lambda: compiled(*call), tfn)
    if r.ts is not None:
        _, r.th["llm_prefill_last_logits_ms"] = r.measure(lambda: None, tfn_last)
        with torch_mode(r.ts):
            r.th["flops_llm_prefill"] = r.ts.flops(tfn)
            res["logits_vs_torch"] = compare_logits(compiled(*call)[0], tfn_last().logits[:, -1])


def _torch_ttft(r: _Run):
    """A closure: PyTorch's time to first token on JAX's kept tokens (its selection is not run)."""
    ts, st, p = r.ts, r.st, r.run.pruner
    tst = st["tst"] = {}

    def run():
        if p is None:
            m = ts.t(r.x1["attention_mask"])
            extra = {} if st["sizes_t"] is None else {"image_sizes": st["sizes_t"]}
            out = ts.model(
                input_ids=st["ids_t"],
                pixel_values=st["pix_t"],
                attention_mask=m,
                use_cache=True,
                logits_to_keep=1,
                **extra,
            )
            pos = m.long().sum(1)
        else:
            vis = ts.visual_tokens(st["pix_t"], st["tsel"], st["sizes_t"])
            e, m, ps = ts.assemble(st["ids_t"], vis, st["plan_t"])
            out = ts.model(inputs_embeds=e, attention_mask=m, position_ids=ps, use_cache=True, logits_to_keep=1)
            pos = m.sum(1)
        tok = out.logits[:, -1].argmax(-1)
        tst.update(cache=out.past_key_values, tok=tok, mask=m.long(), pos=pos)
        return tok

    return run


def _ttft(r: _Run) -> None:
    state = r.st["state"] = {}
    x1 = r.x1

    def jttft():
        logits, cache, pos, plan = r.model.prefill(
            x1["input_ids"],
            x1["pixel_values"],
            attention_mask=x1["attention_mask"],
            pruner=r.run.pruner,
            max_new_tokens=r.max_new_tokens,
            image_sizes=x1.get("image_sizes"),
        )
        state.update(logits=logits, cache=cache, pos=pos, plan=plan)
        return access.first_token(logits)

    r.jx["ttft_ms"], r.th["ttft_ms"] = r.measure(jttft, _torch_ttft(r) if r.ts is not None else None)
    r.jx["kv_cache_bytes"] = state["cache"].nbytes
    if r.ts is not None:
        r.th["kv_cache_bytes"] = r.ts.cache_bytes(r.st["tst"]["cache"])


def _decode_b1(r: _Run) -> None:
    n_new, tst = r.max_new_tokens, r.st.get("tst")
    with torch_mode(r.ts):
        tdec = r.ts.decode(tst["tok"], tst["cache"], tst["mask"], tst["pos"], n_new) if r.ts is not None else None
    r.jx["decode_tok_s_b1"], r.th["decode_tok_s_b1"] = r.measure(
        access.decode(r.model, r.st["state"], n_new), tdec, invert=(n_new - 1)
    )


def _batch(r: _Run) -> None:
    """The larger batch (the same prompt and image in every row, so every row keeps the same tokens): time to
    first token, decode and LLM prefill, where the weight reads are shared by B rows and the prefill becomes
    compute-bound (JAX; PyTorch decodes from its batch-1 cache repeated)."""
    xb, n_new, bsz = r.xb, r.max_new_tokens, r.xb["input_ids"].shape[0]
    stb = {}

    def jttft_b():
        out = r.model.prefill(
            xb["input_ids"],
            xb["pixel_values"],
            attention_mask=xb["attention_mask"],
            pruner=r.run.pruner,
            max_new_tokens=n_new,
            image_sizes=xb.get("image_sizes"),
        )
        stb.update(logits=out[0], cache=out[1], pos=out[2], plan=out[3])
        return access.first_token(out[0])

    r.jx[f"ttft_ms_b{bsz}"], _ = r.measure(jttft_b)
    tdec_b = None
    if r.ts is not None:
        tst = r.st["tst"]
        cache_b = copy_cache(tst["cache"], bsz)
        rep = lambda a: a.repeat(bsz, *([1] * (a.dim() - 1)))  # noqa: E731
        with torch_mode(r.ts):
            tdec_b = r.ts.decode(rep(tst["tok"]), cache_b, rep(tst["mask"]), rep(tst["pos"]), n_new)
    r.jx[f"decode_tok_s_b{bsz}"], r.th[f"decode_tok_s_b{bsz}"] = r.measure(
        access.decode(r.model, stb, n_new), tdec_b, invert=bsz * (n_new - 1)
    )
    stb.clear()  # drop the batch's caches before the batch LLM prefill allocates its own
    tdec_b = None
    planned_b = access.plan_inputs(r.model, xb, r.run.pruner)
    comp_b, call_b, lowered_b = r.pieces.llm_prefill_program(planned_b, planned_b.sequence.length + n_new)
    r.res[f"xla_flops_llm_prefill_b{bsz}"] = xla_flops(lowered_b)
    r.jx[f"llm_prefill_ms_b{bsz}"], _ = r.measure(lambda: comp_b(*call_b))


def copy_cache(cache, batch: int):
    """A private copy of an HF cache with every row repeated ``batch`` times."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(batch)
    return out


STAGES = (
    ("vision encoder", _vision),
    ("selection", _selection),
    ("LLM prefill", _llm_prefill),
    ("time to first token", _ttft),
    ("decode (batch 1)", _decode_b1),
    ("decode (larger batch)", _batch),
)


def run_one(
    model,
    pieces: access.JaxPieces,
    run: MethodRun,
    x1,
    xb,
    *,
    torch_side: TorchSide | None,
    repeats: int,
    warmup: int,
    max_new_tokens: int,
    progress=log,
) -> dict:
    """Measure one method/budget. x1 / xb: processor outputs at batch 1 / the decode batch."""
    if run.pruner is not None:
        run.pruner.validate(model.config)
    r = _Run(model, pieces, run, x1, xb, torch_side, repeats, warmup, max_new_tokens)
    r.res.update(label=run.label, method=run.method, budget=run.budget, settings=run.settings)
    load = load_average()
    if load is not None:
        r.res["load_average_1min"] = load[0]
    if r.inside_llm and torch_side is not None:
        r.ts = None  # HF has no in-LLM pruning to feed the same tokens to
        r.res["torch_skipped"] = f"method prunes inside the LLM; HF {torch_side.hf_class} has no equivalent"
    tick = time.perf_counter()
    for name, stage in STAGES:
        progress(f"  {run.label}: {name} ({time.perf_counter() - tick:.1f}s)")
        stage(r)
    r.jx["peak_device_bytes"] = peak_device_bytes()
    r.res["jax"] = r.jx
    if r.ts is not None:
        r.th["peak_device_bytes"] = r.ts.peak_bytes()
        r.res["torch"] = r.th
        r.res["ratio"] = ratios(r.jx, r.th)
    progress(f"  {run.label}: done ({time.perf_counter() - tick:.1f}s)")
    return r.res


# ----------------------------------------------------------------------------------------------- the benchmark


def _prepare_env(bc: BenchConfig) -> None:
    if bc.threads is not None:
        set_threads(bc.threads)
    if bc.compare_torch:
        # PyTorch's OpenMP workers spin after every op unless told to sleep, and in one process they then take the
        # CPU cores from XLA's threads: a 607x2816 @ 2816x1024 matmul ran 1.8x slower in JAX right after a torch
        # call on 2 cores. PASSIVE must be set before torch loads its OpenMP runtime.
        if "torch" in sys.modules and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
            log(
                "warning: torch was imported before the benchmark set OMP_WAIT_POLICY=PASSIVE; its spinning "
                "OpenMP threads can slow the JAX timings on CPU"
            )
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # Two frameworks share the accelerator: JAX gets a fixed half (its default arena is 75 %, and a growing,
        # non-preallocated pool keeps what it freed, which starved PyTorch's 13B decode at batch 8 on an H100).
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")


def check_config(bc: BenchConfig) -> list[MethodRun]:
    """Everything checkable before a model is built: the methods, the counts, the preset."""
    runs = parse_methods(bc.methods, clip_path=bc.clip_path)
    if bc.batch < 1 or bc.repeats < 1 or bc.warmup < 0 or bc.max_new_tokens < 2:
        raise BenchError("need --batch >= 1, --repeats >= 1, --warmup >= 0, --max-new-tokens >= 2")
    if bc.model is None and bc.preset not in PRESETS:
        raise BenchError(f"unknown preset {bc.preset!r}; choose from {', '.join(PRESETS)}")
    if bc.compare_torch and bc.model is None and PRESETS[bc.preset].next_model:
        raise BenchError(
            f"--compare-torch supports the LLaVA-1.5 and LLaVA-OneVision presets; {bc.preset} is a LLaVA-NeXT model"
        )
    return runs


def _one_safely(model, pieces, run, x1, xb, bc, torch_side) -> dict:
    try:
        return run_one(
            model,
            pieces,
            run,
            x1,
            xb,
            torch_side=torch_side,
            repeats=bc.repeats,
            warmup=bc.warmup,
            max_new_tokens=bc.max_new_tokens,
        )
    except (NotImplementedError, ValueError, ImportError, OSError) as e:
        log(f"  {run.label}: FAILED: {type(e).__name__}: {e}")
        if os.environ.get("VLMPRUNE_BENCH_DEBUG"):
            traceback.print_exc()
        return {
            "label": run.label,
            "method": run.method,
            "budget": run.budget,
            "settings": run.settings,
            "error": f"{type(e).__name__}: {e}",
        }


def run_bench(bc: BenchConfig) -> dict:
    """Run the benchmark, write ``efficiency_<tag>.{json,md}`` and PNGs under ``bc.out_dir``; return the results."""
    t_start = time.perf_counter()
    _prepare_env(bc)
    runs = check_config(bc)
    model, directory, info = build_model(
        bc.preset,
        bc.dtype,
        root=bc.checkpoint_root,
        seed=bc.seed,
        batch=bc.batch,
        max_new_tokens=bc.max_new_tokens,
        model_dir=bc.model,
    )
    torch_side = None
    if bc.compare_torch:
        if model.config.model_type not in ("llava", "llava_onevision"):
            raise BenchError(
                f"--compare-torch supports LLaVA-1.5 and LLaVA-OneVision models; {bc.model} is "
                f"{model.config.model_type}"
            )
        log(
            f"loading the HF PyTorch model from {directory} ..."
            if directory
            else f"building the HF PyTorch model with the same {bc.dtype} weights ..."
        )
        torch_side = TorchSide(directory, bc.dtype, model=model)
    image_hw = PRESETS[bc.preset].image_hw if bc.model is None else None
    x1, xb = bench_inputs(model, 1, image_hw), bench_inputs(model, bc.batch, image_hw)
    meta = _meta(bc, model, info, x1, torch_side)
    pieces = access.JaxPieces(model)
    results = []
    for i, run in enumerate(runs, 1):
        log(f"[{i}/{len(runs)}] {run.label} (elapsed {time.perf_counter() - t_start:.0f}s)")
        results.append(_one_safely(model, pieces, run, x1, xb, bc, torch_side))
        _write_partial(bc, meta, results)
    targets.derived(results, meta)
    meta["elapsed_s"] = time.perf_counter() - t_start
    out = {"meta": meta, "runs": results, "targets": targets.evaluate_targets(results, meta)}
    out["files"] = report.write_outputs(out, bc.out_dir, tag(bc), plots=bc.plots)
    log(f"done in {meta['elapsed_s']:.0f}s; wrote {', '.join(out['files'])}")
    return out


def set_threads(n: int) -> None:
    """Pin both frameworks to ``n`` threads. JAX: only 1 is supported (XLA flags, read when the backend starts)."""
    if n != 1:
        raise BenchError("--threads supports only 1 (XLA's CPU thread pool size cannot be set otherwise)")
    flags = os.environ.get("XLA_FLAGS", "")
    want = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    if want not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + want).strip()
    try:
        if jax._src.xla_bridge.backends_are_initialized():  # noqa: SLF001  (no public query exists)
            log("warning: the JAX backend is already initialised; --threads 1 does not apply to JAX")
    except AttributeError:
        pass
    try:
        import torch  # optional dependency
    except ImportError:
        return
    torch.set_num_threads(1)


def _write_partial(bc, meta, results):
    os.makedirs(bc.out_dir, exist_ok=True)
    with open(os.path.join(bc.out_dir, f"efficiency_{tag(bc)}.partial.json"), "w") as f:
        json.dump({"meta": meta, "runs": results}, f, indent=1, default=report.json_default)


def tag(bc: BenchConfig) -> str:
    if bc.tag:
        return bc.tag
    name = bc.preset if bc.model is None else os.path.basename(os.path.normpath(bc.model))
    return f"{jax.devices()[0].platform}-{name}-{bc.dtype}"


def _meta(bc, model, info, x1, torch_side) -> dict:
    c = model.config
    m = machine_info()
    desc = PRESETS[bc.preset].description if bc.model is None else f"checkpoint {bc.model} ({c.model_type})"
    meta = {
        "preset": bc.preset if bc.model is None else "checkpoint",
        "preset_description": desc,
        "dtype": bc.dtype,
        **m,
        "repeats": bc.repeats,
        "selection_repeats": max(bc.repeats, SELECTION_REPEATS),
        "warmup": bc.warmup,
        "decode_batch": bc.batch,
        "max_new_tokens": bc.max_new_tokens,
        "params": info.get("params"),
        "tokens_per_image": c.tokens_per_image,
        "model_type": c.model_type,
        "input_tokens": int(x1["input_ids"].shape[1]),
        "image_size_hw": [int(v) for v in x1["image_sizes"][0]] if "image_sizes" in x1 else None,
        "visual_tokens_unpruned": int((x1["input_ids"][0] == c.image_token_id).sum()),
        "vision": dataclasses.asdict(c.vision),
        "text": {k: v for k, v in dataclasses.asdict(c.text).items() if k != "rope_scaling"},
        "threads": bc.threads or "default",
        "compare_torch": torch_side is not None,
        "peak_flops": targets.peak_flops(m["device"], bc.dtype),
    }
    if bc.model is not None:
        meta["model"] = bc.model
    if torch_side is not None:
        import torch
        import transformers

        meta.update(
            torch=torch.__version__,
            transformers=transformers.__version__,
            torch_threads=torch.get_num_threads(),
            torch_device=torch_side.device,
            torch_model=torch_side.hf_class,
            torch_attn="sdpa",
            omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        )
    if "memory_estimate" in info:
        meta["memory_estimate"] = info["memory_estimate"]
    return meta
