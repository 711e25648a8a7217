#!/usr/bin/env python
"""Reproduce a paper's accuracy table (methods x budgets) with ``vlmprune.evaluation`` (issue 6).

Each table names the model it was measured on, the runs (method + settings per budget) and the benchmarks; the
published numbers (the papers, as ``docs/methods.md`` §2.6 and §3.6 point to them) sit in ``PUBLISHED`` below. The
script runs every (run, benchmark) pair through ``run_eval`` -- resumable, so an interrupted reproduction picks up
where it stopped -- and prints a markdown table of ``ours (paper)`` cells, also written to ``<out-dir>/<table>.md``
and ``.json``, with one PNG per benchmark (``<table>_<task>.png``: accuracy against kept visual tokens, ours beside
the paper's). Images are preprocessed as the paper did (``IMAGE_ASPECT``: pad for VisPruner's table, crop for
HiRED's; ``--image-aspect`` overrides).

Tables:

* ``vispruner-llava15``: VisPruner Table 1, LLaVA-1.5-7B (``llava-hf/llava-1.5-7b-hf``), 576 (no pruning) and
  VisPruner with 128 / 64 / 32 tokens, important_ratio 0.5; GQA, SQA-IMG, TextVQA, POPE (F1), MME perception.
  A second reference row per budget gives the independent reproduction with the original code (docs/methods.md
  §2.6), whose SQA-IMG at 576 (69.51) is what LLaVA's ScienceQA prompt gives; the paper's 66.8 is the official
  LLaVA-1.5 number.
* ``hired-llava15``: HiRED Table 6, LLaVA-1.5-7B, Full / HiRED 40 % / 20 %; SQA-IMG, TextVQA. HiRED evaluated
  with lmms-eval, whose TextVQA prompt has no OCR tokens (46.1 vs LLaVA's 58.2), so this table runs TextVQA
  without them.
* ``hired-llava-next-7b``: HiRED Table 3, LLaVA-NeXT-7B (``llava-hf/llava-v1.6-vicuna-7b-hf``), Full / HiRED
  20 % / 40 %; SQA-IMG, TextVQA (no OCR), MME, POPE. Table 3 says "lmms-eval default metrics"; which POPE
  metric that row shows is not stated, we print F1.

Usage (real weights and data)::

    python experiments/accuracy.py --table vispruner-llava15 --model /models/llava-1.5-7b-hf --dtype bfloat16 \\
        --data pope=/data/lmms-lab/POPE --data gqa=/data/lmms-lab/GQA ...   # default: the lmms-lab hub datasets
    python experiments/accuracy.py --table vispruner-llava15 --model ... --tasks pope,textvqa --limit 500
    python experiments/accuracy.py --list             # the tables and their published numbers, no model needed

Expect agreement within about 1-1.5 points (the reproduction in §2.6 matched VisPruner within that); bfloat16 vs
float16, batching and the HF processor's resizing move single numbers by a few tenths.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

# Published numbers: table -> run label -> task -> value (POPE F1 / accuracies in %, MME perception in points).
PUBLISHED = {
    "vispruner-llava15": {  # VisPruner Table 1 (third-party transcription), LLaVA-1.5-7B; 576 = official LLaVA-1.5
        "576 (none)": {"gqa": 62.0, "scienceqa_img": 66.8, "textvqa": 58.2, "pope": 85.9, "mme": 1510.7},
        "128 vispruner": {"gqa": 58.2, "scienceqa_img": 69.1, "textvqa": 57.0, "pope": 84.6, "mme": 1461.4},
        "64 vispruner": {"gqa": 55.4, "scienceqa_img": 69.1, "textvqa": 55.8, "pope": 80.4, "mme": 1369.9},
        "32 vispruner": {"gqa": 52.2, "scienceqa_img": 69.2, "textvqa": 53.9, "pope": 72.7, "mme": 1271.0},
    },
    "hired-llava15": {  # HiRED Table 6, LLaVA-1.5-7B (single partition)
        "Full": {"scienceqa_img": 69.5, "textvqa": 46.1},
        "HiRED 40%": {"scienceqa_img": 67.2, "textvqa": 47.0},
        "HiRED 20%": {"scienceqa_img": 66.4, "textvqa": 44.2},
    },
    "hired-llava-next-7b": {  # HiRED Table 3, LLaVA-NeXT-7B
        "Full": {"scienceqa_img": 73.2, "textvqa": 64.8, "mme": 1519, "pope": 87.6},
        "HiRED 20%": {"scienceqa_img": 73.4, "textvqa": 61.4, "mme": 1483, "pope": 87.0},
        "HiRED 40%": {"scienceqa_img": 73.8, "textvqa": 63.6, "mme": 1474, "pope": 88.2},
    },
}

# Independent reproduction of VisPruner with the original code (docs/methods.md §2.6), same runs.
REPRODUCED = {
    "vispruner-llava15": {
        "576 (none)": {"pope": 85.87, "textvqa": 58.25, "gqa": 61.95, "scienceqa_img": 69.51},
        "128 vispruner": {"pope": 84.43, "textvqa": 56.76, "gqa": 58.28, "scienceqa_img": 68.86},
        "64 vispruner": {"pope": 80.91, "textvqa": 55.68, "gqa": 55.59, "scienceqa_img": 68.57},
        "32 vispruner": {"pope": 74.17, "textvqa": 53.55, "gqa": 51.58, "scienceqa_img": 68.32},
    },
}

# The preprocessing each paper ran (vlmprune.preprocess): VisPruner used the original LLaVA code (pad to a
# mean-colour square); HiRED used lmms-eval's llava-hf pipeline (centre crop; NeXT tiles either way).
IMAGE_ASPECT = {"vispruner-llava15": "pad", "hired-llava15": "crop", "hired-llava-next-7b": "crop"}

# table -> (model, tasks, runs [(label, method or None, settings)], run_eval options)
TABLES = {
    "vispruner-llava15": (
        "llava-hf/llava-1.5-7b-hf",
        ("gqa", "scienceqa_img", "textvqa", "pope", "mme"),
        [("576 (none)", None, {})]
        + [(f"{k} vispruner", "vispruner", dict(num_keep=k, important_ratio=0.5)) for k in (128, 64, 32)],
        {},
    ),
    "hired-llava15": (
        "llava-hf/llava-1.5-7b-hf",
        ("scienceqa_img", "textvqa"),
        [
            ("Full", None, {}),
            ("HiRED 40%", "hired", dict(budget_rate=0.4)),
            ("HiRED 20%", "hired", dict(budget_rate=0.2)),
        ],
        {"ocr": False},
    ),
    "hired-llava-next-7b": (
        "llava-hf/llava-v1.6-vicuna-7b-hf",
        ("scienceqa_img", "textvqa", "mme", "pope"),
        [
            ("Full", None, {}),
            ("HiRED 20%", "hired", dict(budget_rate=0.2, alpha=0.5)),
            ("HiRED 40%", "hired", dict(budget_rate=0.4, alpha=0.5)),
        ],
        {"ocr": False},
    ),
}

NAMES = {"gqa": "GQA", "scienceqa_img": "SQA-IMG", "textvqa": "TextVQA", "pope": "POPE-F1", "mme": "MME-P"}


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}"


def format_table(table: str, results: dict, tasks=None) -> str:
    """Markdown: one row per run, ``ours (paper)`` per task; ``results[label][task]`` = our headline (or absent)."""
    _, all_tasks, runs, _ = TABLES[table]
    tasks = tasks or all_tasks
    pub, rep = PUBLISHED.get(table, {}), REPRODUCED.get(table, {})
    lines = ["| run | " + " | ".join(NAMES[t] for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for label, _, _ in runs:
        cells = []
        for t in tasks:
            ours = results.get(label, {}).get(t)
            cell = f"{_fmt(ours)} ({_fmt(pub.get(label, {}).get(t))})"
            if t in rep.get(label, {}):
                cell += f" [{_fmt(rep[label][t], 2)}]"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    note = "cells: ours (paper)" + (" [independent reproduction with the original code]" if rep else "")
    return "\n".join(lines) + f"\n\n{note}; – = not run / not published.\n"


def kept_tokens(table: str, label: str, method, settings: dict) -> float | None:
    """Visual tokens a run keeps per image (LLaVA-1.5: 576 patches), for the x axis; None for the unpruned run."""
    if method is None:
        return None
    if "num_keep" in settings:
        return float(settings["num_keep"])
    if "budget_rate" in settings:
        return 576.0 * settings["budget_rate"]  # HiRED's budget is a share of the (per-tile) tokens
    if "keep_ratio" in settings:
        return 576.0 * settings["keep_ratio"]
    return None


def plot_table(table: str, results: dict, out_dir: str, tasks=None) -> list[str]:
    """One PNG per task, ``<out_dir>/<table>_<task>.png``: accuracy against kept visual tokens, one line per
    method (ours solid with dots, the paper's published points dashed with crosses), the unpruned model as
    horizontal lines (ours solid, paper dotted). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, all_tasks, runs, _ = TABLES[table]
    pub = PUBLISHED.get(table, {})
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for task in tasks or all_tasks:
        fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
        by_method: dict[str, list] = {}
        for label, method, settings in runs:
            x = kept_tokens(table, label, method, settings)
            ours, paper = results.get(label, {}).get(task), pub.get(label, {}).get(task)
            if method is None:
                if ours is not None:
                    ax.axhline(ours, color="black", lw=1.2, label="unpruned (ours)")
                if paper is not None:
                    ax.axhline(paper, color="black", lw=1.0, ls=":", label="unpruned (paper)")
                continue
            if x is not None:
                by_method.setdefault(method, []).append((x, ours, paper))
        for i, (method, pts) in enumerate(sorted(by_method.items())):
            pts.sort()
            colour = f"C{i}"
            mine = [(x, y) for x, y, _ in pts if y is not None]
            theirs = [(x, p) for x, _, p in pts if p is not None]
            if mine:
                ax.plot(*zip(*mine), "o-", color=colour, label=f"{method} (ours)")
            if theirs:
                ax.plot(*zip(*theirs), "x--", color=colour, label=f"{method} (paper)")
        ax.set_xlabel("visual tokens kept per image")
        ax.set_ylabel(NAMES.get(task, task))
        ax.set_title(f"{table}: {NAMES.get(task, task)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{table}_{task}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", choices=sorted(TABLES), default="vispruner-llava15")
    p.add_argument("--list", action="store_true", help="print the tables with the published numbers and exit")
    p.add_argument("--model", help="checkpoint directory (default for the table: see --list)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the table's benchmarks")
    p.add_argument("--runs", default=None, help="comma-separated subset of run labels")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help="where a benchmark's data lives (save_to_disk dir, hub-layout dir or hub id)",
    )
    p.add_argument("--images", default=None, help="GQA image table (id, image) if separate")
    p.add_argument("--limit", type=int, default=None, help="first N samples of each benchmark (smoke runs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--image-aspect",
        default=None,
        choices=["pad", "crop"],
        help="preprocessing (default: the paper's own, see IMAGE_ASPECT)",
    )
    p.add_argument("--out-dir", default=os.path.join("experiments", "results", "accuracy"))
    args = p.parse_args(argv)

    if args.list:
        for name, (model, _, _, _) in TABLES.items():
            print(f"## {name} ({model})\n\n{format_table(name, {})}")
        return 0
    model_id, tasks, runs, options = TABLES[args.table]
    if args.tasks:
        tasks = tuple(t for t in args.tasks.split(",") if t)
        bad = sorted(set(tasks) - set(TABLES[args.table][1]))
        if bad:
            raise SystemExit(f"error: {bad} not in table {args.table} ({TABLES[args.table][1]})")
    if args.runs:
        keep = set(args.runs.split(","))
        runs = [r for r in runs if r[0] in keep]
    data = dict(d.split("=", 1) for d in args.data)
    if not args.model:
        raise SystemExit(f"error: --model is required (table {args.table} was measured on {model_id})")

    import vlmprune
    from vlmprune import prune
    from vlmprune.evaluation import run_eval

    aspect = args.image_aspect or IMAGE_ASPECT.get(args.table)
    model = vlmprune.load(args.model, dtype=args.dtype, **({} if aspect is None else dict(image_aspect=aspect)))
    results: dict = {}
    for label, method, settings in runs:
        pruner = None if method is None else prune.get(method, **settings)
        for task in tasks:
            out = os.path.join(args.out_dir, args.table, task, label.replace(" ", "_").replace("%", "pct"))
            s = run_eval(
                task,
                out,
                model=model,
                pruner=pruner,
                data=data.get(task),
                limit=args.limit,
                images=args.images if task == "gqa" else None,
                batch_size=args.batch_size,
                run_info=dict(model=os.path.abspath(args.model), dtype=args.dtype, image_aspect=aspect),
                **options,
            )
            results.setdefault(label, {})[task] = s["headline"]
            print(f"[accuracy] {label} {task}: {s['headline']:.2f} ({s['num_samples']} samples)", file=sys.stderr)
    text = format_table(args.table, results, tasks)
    print(text)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, f"{args.table}.md"), "w") as f:
        f.write(f"# {args.table} ({args.model}, {args.dtype}, image aspect {aspect}, limit={args.limit})\n\n{text}")
    for path in plot_table(args.table, results, args.out_dir, tasks):
        print(f"[accuracy] wrote {path}", file=sys.stderr)
    with open(os.path.join(args.out_dir, f"{args.table}.json"), "w") as f:
        json.dump(
            dict(
                table=args.table,
                model=args.model,
                dtype=args.dtype,
                image_aspect=aspect,
                limit=args.limit,
                results=results,
                published=PUBLISHED.get(args.table),
                reproduced=REPRODUCED.get(args.table),
            ),
            f,
            indent=2,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
