"""Full efficiency tables (issue #5): a thin driver of ``vlmprune.bench`` for every preset the backend can run.

    python experiments/efficiency.py                 # CPU: cpu-small fp32 with --compare-torch -> efficiency_cpu.*
    python experiments/efficiency.py --suite cpu-ov  # CPU: cpu-small-ov (LLaVA-OneVision) -> efficiency_cpu-ov.*
    python experiments/efficiency.py --suite gpu     # GPU/TPU: llava-1.5-7b / 13b / next-7b in bfloat16
    python experiments/efficiency.py --suite gpu-ov  # GPU/TPU: llava-onevision-0.5b / 7b in bfloat16
    python experiments/efficiency.py --suite cpu --repeats 5 --threads 1

Results go to ``experiments/results/efficiency_<tag>.{json,md}`` plus ``_ttft.png`` / ``_flops.png``; the CPU
suite's tag is ``cpu`` (the committed tables). Every run prints progress to stderr and its markdown to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vlmprune.bench import BenchConfig, BenchError, markdown, run_bench  # noqa: E402

#: the issue's method list: no pruning, VisPruner at 64/128/192 of 576, FasterVLM 64, HiRED 20 %, DivPrune 64,
#: VisionZip 64; on CPU also VisPruner's plain float32 similarity (``exact_similarity=False``) at 64
_METHODS = ("none", "vispruner:64,128,192", "fastervlm:64", "hired:0.2", "divprune:64", "visionzip:64")
CPU_METHODS = _METHODS + ("vispruner:64:exact_similarity=False",)
GPU_METHODS = _METHODS + ("fastv:0.25",)
#: LLaVA-NeXT budgets are per tile (up to 5 tiles of 576)
NEXT_METHODS = ("none", "vispruner:64,128", "fastervlm:64", "hired:0.2")
#: LLaVA-OneVision, budgets per tile of 729: VisPruner / FasterVLM in the official layout (mode B, the default) and
#: VisPruner in the spatial-compat one (``layout=reference``, mode A); DivPrune on the packed block; FastV inside the
#: Qwen2 decoder; random (mode B)
OV_METHODS = (
    "none",
    "vispruner:64,128",
    "vispruner:64:layout=reference",
    "fastervlm:64",
    "divprune:64",
    "fastv:0.25",
    "random:64",
)

SUITES = {
    "cpu": [dict(preset="cpu-small", dtype="float32", methods=CPU_METHODS, compare_torch=True, tag="cpu")],
    # the larger batch at 2: the unpruned block is 2214 visual tokens, four rows of it dominate a 2-core run
    "cpu-ov": [
        dict(preset="cpu-small-ov", dtype="float32", methods=OV_METHODS, compare_torch=True, tag="cpu-ov", batch=2)
    ],
    "gpu": [
        dict(preset="llava-1.5-7b", dtype="bfloat16", methods=GPU_METHODS, compare_torch=True, tag="gpu-llava-1.5-7b"),
        dict(
            preset="llava-1.5-13b", dtype="bfloat16", methods=GPU_METHODS, compare_torch=True, tag="gpu-llava-1.5-13b"
        ),
        dict(preset="llava-next-7b", dtype="bfloat16", methods=NEXT_METHODS, tag="gpu-llava-next-7b"),
    ],
    "gpu-ov": [
        dict(
            preset=f"llava-onevision-{size}",
            dtype="bfloat16",
            methods=OV_METHODS,
            compare_torch=True,
            tag=f"gpu-llava-onevision-{size}",
        )
        for size in ("0.5b", "7b")
    ],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--suite",
        choices=["auto", *SUITES],
        default="auto",
        help="auto: gpu when JAX sees a GPU/TPU, else cpu (the OneVision suites, cpu-ov / gpu-ov, are run by name)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=None, help="the larger decode batch (default: the suite's, else 4)")
    ap.add_argument("--threads", type=int, choices=[1], default=None)
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    ap.add_argument("--presets", nargs="+", default=None, help="run only these presets of the suite")
    ap.add_argument("--methods", nargs="+", default=None, help="override the suite's method list")
    ap.add_argument("--tag-suffix", default="", help="appended to each output name (e.g. a part of a split run)")
    args = ap.parse_args(argv)

    suite = args.suite
    if suite == "auto":
        if args.threads is None:
            import jax

            suite = "cpu" if jax.devices()[0].platform == "cpu" else "gpu"
        else:
            suite = "cpu"  # --threads 1 must set XLA flags before JAX starts: only meaningful on CPU
    failures = 0
    specs = [s for s in SUITES[suite] if args.presets is None or s["preset"] in args.presets]
    if not specs:
        ap.error(f"no preset of suite {suite} among {args.presets}")
    for spec in specs:
        bc = BenchConfig(
            preset=spec["preset"],
            dtype=spec["dtype"],
            methods=tuple(args.methods or spec["methods"]),
            compare_torch=spec.get("compare_torch", False) and not args.no_torch,
            tag=spec["tag"] + ("-1thread" if args.threads == 1 else "") + args.tag_suffix,
            repeats=args.repeats,
            warmup=args.warmup,
            max_new_tokens=args.max_new_tokens,
            batch=args.batch if args.batch is not None else spec.get("batch", 4),
            out_dir=args.out_dir,
            threads=args.threads,
        )
        try:
            out = run_bench(bc)
        except BenchError as e:
            print(f"[efficiency] {spec['preset']}: {e}", file=sys.stderr)
            failures += 1
            continue
        print(markdown(out))
        failed = [r["label"] for r in out["runs"] if "error" in r]
        if failed:
            print(f"[efficiency] {spec['preset']}: failed runs: {', '.join(failed)}", file=sys.stderr)
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
