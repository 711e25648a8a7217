"""Smoke test of the selection speed benchmark (experiments/bench_selection.py, issue 3).

Runs the script's ``main`` with ``--quick``, a 2-layer 112-px encoder (N = 64 patches) and two budgets, and
checks that the JSON it writes has VisPruner rows whose PyTorch and JAX selections agree.
"""

import importlib.util
import json
import math
import os
import sys

import pytest

_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "bench_selection.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_selection", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_agreeing_vispruner_rows(bench, tmp_path):
    argv = [
        "--quick", "--encoder-layers", "2", "--image-size", "112", "--budgets", "16,32",
        "--methods", "vispruner,fastervlm", "--single-thread-torch", "", "--out-dir", str(tmp_path),
    ]
    result = bench.main(argv)

    with open(tmp_path / "selection_cpu.json") as fh:
        data = json.load(fh)
    assert (tmp_path / "selection_cpu.md").read_text().count("| vispruner |") == 2
    assert data["encoder"]["num_patches"] == 64 and data["encoder"]["median_ms"] > 0
    assert data["machine"]["cpu_count"] == os.cpu_count()

    vis = [r for r in data["rows"] if r["method"] == "vispruner"]
    assert sorted(r["budget"] for r in vis) == ["16", "32"]
    for r in vis:
        assert r["agree"] is True, r
        assert r["jax_ms"] > 0 and r["torch_ms"] > 0
        assert math.isclose(r["speedup"], r["torch_ms"] / r["jax_ms"])
        assert math.isclose(r["pct_encoder"], 100 * r["jax_ms"] / data["encoder"]["median_ms"])
    assert all(r["agree"] is True for r in data["rows"] if r["method"] == "fastervlm")
    assert result["rows"] == data["rows"]


def test_torch_vispruner_matches_plan_sizes(bench):
    """The PyTorch reference keeps exactly T distinct tokens including the T_imp most attended."""
    import numpy as np
    import torch

    inp = bench.make_inputs(2, 64, 32, 4, 8, seed=3)
    f, a = torch.from_numpy(inp.features), torch.from_numpy(inp.cls_attn)
    kept = bench.torch_vispruner(f, a, 20, 0.5)
    assert kept.shape == (2, 20)
    for b in range(2):
        assert len(set(kept[b].tolist())) == 20
        top = np.argsort(-inp.cls_attn[b].mean(0))[:10]
        assert set(top.tolist()) <= set(kept[b].tolist())
