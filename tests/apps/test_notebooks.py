"""The Colab notebooks in colab/ run top to bottom (nbclient) on the tiny demo checkpoint without a cell error.

Environment the notebooks read: VLMPRUNE_SKIP_INSTALL (no pip), VLMPRUNE_CHECKPOINT_ROOT (where the tiny
checkpoints live: a temp dir here), VLMPRUNE_MODEL unset (-> tiny model), VLMPRUNE_NOTEBOOK_OUT (benchmark files),
VLMPRUNE_USE_BENCH=0 (benchmark.ipynb's timed_generate fallback).
"""

import os
import sys
import time

import pytest

from reference.paths import REPO_DIR

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

COLAB = os.path.join(REPO_DIR, "colab")
CELL_TIMEOUT_S = 600  # a guard against hangs; each notebook takes well under a minute on an idle 2-core CPU


@pytest.fixture(scope="module")
def checkpoint_root(tmp_path_factory):
    """Tiny checkpoints built once, outside the notebooks' own timing."""
    from vlmprune.demo import ensure_tiny_checkpoint

    root = tmp_path_factory.mktemp("nb_checkpoints")
    ensure_tiny_checkpoint(str(root / "tiny-llava-1.5"))
    try:
        from vlmprune import bench

        bench.ensure_checkpoint("tiny", str(root))
    except (ImportError, AttributeError):  # no benchmark module: the notebook falls back
        pass
    return str(root)


def _tree_listing() -> set[str]:
    """Files directly in the repo root and under colab/ (where a notebook runs), as relative paths."""
    root = os.path.dirname(COLAB)
    names = {n for n in os.listdir(root)}
    for dirpath, _, files in os.walk(COLAB):
        names |= {os.path.relpath(os.path.join(dirpath, f), root) for f in files}
    return names


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _errors(nb) -> list[str]:
    return [
        f"{o.get('ename')}: {o.get('evalue')}"
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "error"
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,env,min_images",
    [
        # the input image, plot_kept, compare; with the default checkpoint root (under $HOME, never the repo)
        ("quickstart.ipynb", {"VLMPRUNE_CHECKPOINT_ROOT": None}, 3),
        ("method_comparison.ipynb", {}, 4),  # input image, TTFT/FLOPs plot, one picture row per budget
        ("benchmark.ipynb", {}, 0),
        ("benchmark.ipynb", {"VLMPRUNE_USE_BENCH": "0"}, 0),
        ("onevision.ipynb", {}, 1),  # builds its tiny OneVision checkpoint under the checkpoint root; the image
    ],
    ids=["quickstart", "method_comparison", "benchmark", "benchmark_fallback", "onevision"],
)
def test_notebook_runs(name, env, min_images, checkpoint_root, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMPRUNE_SKIP_INSTALL", "1")
    monkeypatch.setenv("VLMPRUNE_CHECKPOINT_ROOT", checkpoint_root)
    monkeypatch.setenv("VLMPRUNE_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("VLMPRUNE_MODEL", raising=False)
    monkeypatch.delenv("VLMPRUNE_IMAGE", raising=False)
    monkeypatch.delenv("VLMPRUNE_BENCH_PRESET", raising=False)
    monkeypatch.delenv("VLMPRUNE_OV_MODEL", raising=False)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    for k, v in env.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    # Run from colab/ itself, as a user opening the notebook would: nothing may appear there or in the repo root.
    before = _tree_listing()
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": COLAB}}
    )
    t = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    print(f"{name} {env or ''}: {time.perf_counter() - t:.1f}s")
    assert not _errors(nb)
    assert _tree_listing() == before, "the notebook wrote into the repository"
    assert _images(nb) >= min_images
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "backend: cpu" in text
    if name == "benchmark.ipynb" and env.get("VLMPRUNE_USE_BENCH") == "0":
        assert "falling back" in text and "vispruner@16" in text
    if name == "onevision.ipynb":  # every method ran and pruned: fewer kept than packed visual tokens
        assert os.path.isdir(os.path.join(checkpoint_root, "tiny-llava-onevision"))
        for spec in ("vispruner:4:layout=reference", "divprune:4", "fastv:0.5:layer=1", "random:4"):
            assert f"{spec:<32}" in text and "% pruned)" in text, spec
        assert "(0% pruned)" in text  # the unpruned baseline


def test_notebooks_are_clean():
    """Committed without outputs, with an install cell that is skipped when vlmprune is importable."""
    names = sorted(f for f in os.listdir(COLAB) if f.endswith(".ipynb"))
    assert names == ["benchmark.ipynb", "method_comparison.ipynb", "onevision.ipynb", "quickstart.ipynb"]
    for name in names:
        nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), name
        install = code[0].source
        assert 'find_spec("vlmprune") is None' in install and "VLMPRUNE_SKIP_INSTALL" in install
        assert "vlmprune[cuda" in install and "git+" in install
        assert "jax.devices()" in code[1].source
