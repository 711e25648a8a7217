#!/usr/bin/env python
"""Speed of the token-selection functions on CPU: JAX (jit) against straightforward PyTorch loops (issue 3).

A thin driver of ``vlmprune.bench.selection`` (see its docstring for what is timed and checked). Writes
``experiments/results/selection_cpu.{md,json}`` and prints the table and the targets' verdicts.

Usage::

    python experiments/bench_selection.py                 # full run (~10 min on 2 shared cores)
    python experiments/bench_selection.py --quick         # smoke run
    python experiments/bench_selection.py --methods vispruner,fastervlm --budgets 64
    python experiments/bench_selection.py --methods vispruner:important_ratio=0.25 --budgets 64
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vlmprune.bench.selection import main  # noqa: E402

if __name__ == "__main__":
    main()
