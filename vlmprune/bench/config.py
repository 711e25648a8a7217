"""What a benchmark run is asked to do: its settings, its method runs, and its error type."""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from vlmprune.prune import spec

DEFAULT_METHODS = ("none", "vispruner:64,128,192", "fastervlm:64", "hired:0.2", "divprune:64")
PROMPT = "What is in the image? Describe the picture in detail."


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked (unknown preset, not enough device memory, ...)."""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class BenchConfig:
    preset: str = "cpu-small"
    methods: tuple = DEFAULT_METHODS
    dtype: str = "float32"
    batch: int = 4  # the larger decode batch
    repeats: int = 3
    warmup: int = 1
    max_new_tokens: int = 16
    compare_torch: bool = False
    out_dir: str = os.path.join("experiments", "results")
    tag: str | None = None
    checkpoint_root: str = "checkpoints"
    seed: int = 0
    plots: bool = True
    threads: int | None = None  # 1: single-threaded JAX (XLA flags) and PyTorch; None: each framework's default
    clip_path: str | None = None  # HERO's CLIP checkpoint, for runs whose spec names none
    model: str | None = None  # a checkpoint directory (HF LLaVA / LLaVA-NeXT or vlmprune) instead of a preset


@dataclasses.dataclass(frozen=True)
class MethodRun:
    label: str
    method: str
    budget: Any
    settings: dict
    pruner: Any  # a vlmprune pruner or None


def _label(name: str, budget, extra: dict) -> str:
    label = name if budget is None else f"{name}@{budget}"
    if extra:
        label += "(" + ",".join(f"{k}={v}" for k, v in extra.items()) + ")"
    return label


def parse_methods(specs, *, clip_path: str | None = None) -> list[MethodRun]:
    """Method specs (``vlmprune.prune.parse_spec`` syntax, budget lists allowed) -> runs; ``none`` = no pruning.

    Examples: ``vispruner:64,128,192``, ``hired:0.2``, ``fastv:0.25``, ``vispruner:64:important_ratio=0.25``,
    ``prumerge_plus::plus=false``. ``clip_path`` fills HERO's ``clip_path`` where its spec leaves it out.
    LLaVA-NeXT: per-tile budgets, as the methods define them.
    """
    runs: list[MethodRun] = []
    try:
        for parts in spec.split_specs(specs):
            if parts.name in spec.NO_PRUNING:
                spec.build(parts)  # refuses a budget or settings
                runs.append(MethodRun("none", "none", None, {}, None))
                continue
            extra = spec.typed_settings(parts.name, parts.settings)
            if clip_path is not None and "clip_path" in spec.field_names(parts.name) and "clip_path" not in extra:
                extra["clip_path"] = clip_path
            for raw in parts.budgets or (None,):
                kw = dict(extra)
                budget = None
                if raw is not None:
                    kw.update(spec.budget_settings(parts.name, raw))
                    budget = spec.as_number(raw)
                pruner = spec.make(parts.name, **kw)
                shown = {k: v for k, v in extra.items() if k != "clip_path" or k in dict(parts.settings)}
                runs.append(MethodRun(_label(pruner.name, budget, shown), pruner.name, budget, kw, pruner))
    except ValueError as e:
        raise BenchError(str(e)) from e
    if not runs:
        raise BenchError("no methods given")
    return runs
