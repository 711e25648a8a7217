"""Smoke test of the selection speed suite (``vlmprune.bench.selection``, driven by experiments/bench_selection.py).

Runs ``main`` with ``--quick``, a 2-layer 112-px encoder (N = 64 patches) and two budgets, and checks that the JSON
it writes has VisPruner rows whose PyTorch and JAX selections agree, in the benchmarks' one stats schema.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from reference.paths import REPO_DIR
from vlmprune.bench import selection

_ROOT = REPO_DIR


def test_quick_run_writes_agreeing_vispruner_rows(tmp_path):
    argv = [
        "--quick",
        "--encoder-layers",
        "2",
        "--image-size",
        "112",
        "--budgets",
        "16,32",
        "--methods",
        "vispruner,fastervlm,hired:alpha=0.25",
        "--single-thread-torch",
        "",
        "--out-dir",
        str(tmp_path),
    ]
    result = selection.main(argv)

    with open(tmp_path / "selection_cpu.json") as fh:
        data = json.load(fh)
    assert (tmp_path / "selection_cpu.md").read_text().count("| vispruner |") == 2
    assert data["encoder"]["num_patches"] == 64 and data["encoder"]["median"] > 0
    assert data["machine"]["host_cpus"] == os.cpu_count()

    vis = [r for r in data["rows"] if r["method"] == "vispruner"]
    assert sorted(r["budget"] for r in vis) == ["16", "32"]
    for r in vis:
        assert r["agree"] is True, r
        assert set(r["jax"]) == set(r["torch"]) == {"median", "min", "max", "n", "spread", "iqr"}
        assert r["jax"]["n"] == r["torch"]["n"] == 3 and r["jax"]["median"] > 0
        assert math.isclose(r["speedup"], r["torch"]["median"] / r["jax"]["median"])
        assert math.isclose(r["pct_encoder"], 100 * r["jax"]["median"] / data["encoder"]["median"])
    assert all(r["agree"] is True for r in data["rows"] if r["method"] in ("fastervlm", "hired"))
    hired = [r for r in data["rows"] if r["method"] == "hired"]
    assert len(hired) == 2 and all("alpha 0.25" in r["note"] for r in hired)  # the spec's setting reached the row
    assert result["rows"] == data["rows"]


def test_suite_pruner_goes_through_the_spec_parser():
    p = selection.suite_pruner("hired", 16, 64, (("alpha", "0.25"),))
    assert (p.budget_rate, p.alpha) == (selection.rate_for(16, 64), 0.25)
    assert selection.suite_pruner("visionzip", 64, 576) == selection.P.VisionZip(dominant=54, contextual=10)
    assert selection.suite_pruner("random_keep", 8, 64).num_keep == 8
    with pytest.raises(ValueError, match="vispruner: unknown setting 'bogus'"):
        selection.suite_pruner("vispruner", 8, 64, (("bogus", "1"),))


def test_bad_methods_are_named(tmp_path):
    for bad, msg in (("nope", "choose from vispruner"), ("vispruner:64", "without a budget")):
        with pytest.raises(SystemExit, match=msg):
            selection.main(["--methods", bad, "--out-dir", ""])


def test_torch_vispruner_matches_plan_sizes():
    """The PyTorch reference keeps exactly T distinct tokens including the T_imp most attended."""
    inp = selection.make_inputs(2, 64, 32, 4, 8, seed=3)
    f, a = torch.from_numpy(inp.features), torch.from_numpy(inp.cls_attn)
    kept = selection.T.torch_vispruner(f, a, 20, 0.5)
    assert kept.shape == (2, 20)
    for b in range(2):
        assert len(set(kept[b].tolist())) == 20
        top = np.argsort(-inp.cls_attn[b].mean(0))[:10]
        assert set(top.tolist()) <= set(kept[b].tolist())


def test_driver_script_runs():
    out = subprocess.run(
        [sys.executable, os.path.join(_ROOT, "experiments", "bench_selection.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--budgets" in out.stdout
