"""``vlmprune bench``: arguments, and the command that runs (or merges) the efficiency suite."""

from __future__ import annotations

import argparse
import os
import sys

from vlmprune.bench.config import DEFAULT_METHODS, BenchConfig, BenchError
from vlmprune.bench.efficiency import run_bench
from vlmprune.bench.presets import PRESETS
from vlmprune.bench.report import markdown, merge_outputs

DESCRIPTION = (
    "Efficiency benchmark: FLOPs, encoder/selection/prefill time, TTFT, decode tokens/s, KV cache and "
    "memory per method (JSON, markdown, PNG)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default="cpu-small",
        choices=list(PRESETS),
        help="model shapes: tiny, cpu-small (CPU, minutes), llava-1.5-7b/13b, llava-next-7b (GPU/TPU); "
        "LLaVA-OneVision: tiny-ov, cpu-small-ov (CPU), llava-onevision-0.5b/7b (GPU/TPU)",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="benchmark this checkpoint (HF LLaVA-1.5 / LLaVA-NeXT or vlmprune) instead of a preset",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        metavar="SPEC",
        help="name[:budget,...][:key=val,...], e.g. none vispruner:64,128,192 fastervlm:64 hired:0.2 "
        "divprune:64 hero:0.2 (budget = kept tokens; hired: budget rate; hero/fastv: keep ratio)",
    )
    p.add_argument(
        "--clip-path",
        default=None,
        metavar="DIR",
        help="HERO: the full HF CLIP checkpoint (both towers) for its text-relevance score",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=4, help="the larger decode batch (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median and spread)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (the first compiles)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per decode run (default 16)")
    p.add_argument(
        "--compare-torch",
        action="store_true",
        help="also run the HF PyTorch model (same weights, same kept tokens) and print JAX/PyTorch ratios "
        "(LLaVA-1.5 and LLaVA-OneVision)",
    )
    p.add_argument("--out-dir", default=os.path.join("experiments", "results"))
    p.add_argument("--tag", default=None, help="output name efficiency_<tag>.* (default <backend>-<preset>-<dtype>)")
    p.add_argument("--checkpoint-root", default="checkpoints", help="where bench-<preset>/ checkpoints are written")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="merge efficiency_*.json files of one preset/device into efficiency_<tag>.* (no run)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        choices=[1],
        help="1: run JAX (XLA flags) and PyTorch single-threaded (robust timings on a loaded host)",
    )


def config_from_args(args) -> BenchConfig:
    return BenchConfig(
        preset=args.preset,
        methods=tuple(args.methods),
        dtype=args.dtype,
        batch=args.batch,
        repeats=args.repeats,
        warmup=args.warmup,
        max_new_tokens=args.max_new_tokens,
        compare_torch=args.compare_torch,
        out_dir=args.out_dir,
        tag=args.tag,
        checkpoint_root=args.checkpoint_root,
        seed=args.seed,
        plots=not args.no_plots,
        threads=args.threads,
        clip_path=args.clip_path,
        model=args.model,
    )


def main_from_args(args) -> int:
    """Run or merge; print the markdown. Exit 2 on a refused request, 1 when any requested run failed."""
    try:
        if args.merge:
            if not args.tag:
                raise BenchError("--merge needs --tag (the merged files' name)")
            out = merge_outputs(args.merge, args.out_dir, args.tag, plots=not args.no_plots)
        else:
            out = run_bench(config_from_args(args))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(out))
    failed = [r for r in out["runs"] if "error" in r]
    if failed:  # the tables are written, but a run that asked for a method and did not get it says so
        n = len(out["runs"])
        which = "every requested method" if len(failed) == n else f"{len(failed)} of {n} runs"
        print(f"error: {which} failed: " + "; ".join(f"{r['label']}: {r['error']}" for r in failed), file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vlmprune bench", description=DESCRIPTION)
    add_arguments(p)
    return main_from_args(p.parse_args(argv))
