"""experiments/accuracy.py's plots: one PNG per task from a small results fixture, ours beside the paper's."""

import importlib.util
import os

import numpy as np
import pytest

from reference.paths import REPO_DIR

pytest.importorskip("matplotlib")


def _accuracy_module():
    path = os.path.join(REPO_DIR, "experiments", "accuracy.py")
    spec = importlib.util.spec_from_file_location("accuracy_experiment_plots", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plot_per_task(tmp_path):
    acc = _accuracy_module()
    results = {
        "576 (none)": {"pope": 85.5, "gqa": 61.8},
        "128 vispruner": {"pope": 84.0, "gqa": 58.0},
        "64 vispruner": {"pope": 80.0},  # a run not finished for GQA: a shorter line
        "32 vispruner": {"pope": 73.5, "gqa": 52.0},
    }
    paths = acc.plot_table("vispruner-llava15", results, str(tmp_path), tasks=("pope", "gqa", "mme"))
    assert [os.path.basename(p) for p in paths] == [
        "vispruner-llava15_pope.png",
        "vispruner-llava15_gqa.png",
        "vispruner-llava15_mme.png",
    ]
    from PIL import Image

    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        im = np.asarray(Image.open(p).convert("RGB"))
        assert im.shape == (380, 550, 3) and im.std() > 5  # something is drawn on the white canvas
    assert acc.kept_tokens("hired-llava15", "HiRED 20%", "hired", dict(budget_rate=0.2)) == pytest.approx(115.2)
    assert acc.kept_tokens("vispruner-llava15", "576 (none)", None, {}) is None
    assert acc.IMAGE_ASPECT == {"vispruner-llava15": "pad", "hired-llava15": "crop", "hired-llava-next-7b": "crop"}
    # the figure's lines: ours and the paper's per method, plus the unpruned model as horizontal lines
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = {}
    orig = plt.Figure.savefig

    def spy(fig, path, *a, **k):
        seen[os.path.basename(str(path))] = [
            (ln.get_label(), list(map(float, ln.get_ydata()))) for ln in fig.axes[0].get_lines()
        ]
        return orig(fig, path, *a, **k)

    plt.Figure.savefig = spy
    try:
        acc.plot_table("vispruner-llava15", results, str(tmp_path), tasks=("pope",))
    finally:
        plt.Figure.savefig = orig
    lines = dict(seen["vispruner-llava15_pope.png"])
    assert lines["unpruned (ours)"] == [85.5, 85.5] and lines["unpruned (paper)"] == [85.9, 85.9]
    assert lines["vispruner (ours)"] == [73.5, 80.0, 84.0]  # x = 32, 64, 128
    assert lines["vispruner (paper)"] == [72.7, 80.4, 84.6]
