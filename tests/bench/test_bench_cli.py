"""``vlmprune bench`` on tiny checkpoints of both families (issue 13): every method that runs on LLaVA-NeXT runs in
the benchmark (HERO with ``--clip-path``), a method that cannot run is reported by name, and a command whose
requested runs failed exits non-zero."""

import json
import os

import pytest

from reference.hf_builders import build_hf_clip
from vlmprune import bench
from vlmprune.cli import main

pytestmark = pytest.mark.slow  # end-to-end runs of the commands: skipped by make test-fast

#: the methods with a LLaVA-NeXT form (``supports_next``), tiny budgets for 16-token tiles
NEXT_SPECS = (
    "none",
    "vispruner:4",
    "fastervlm:4",
    "hired:0.25",
    "divprune:4",
    "visionzip:8",
    "hero:0.3:low_layers=(0,1),high_layers=(1,2)",
)
FAST = ["--repeats", "1", "--warmup", "0", "--batch", "1", "--max-new-tokens", "2", "--no-plots"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_hf_clip(
        tmp_path_factory.mktemp("bench_clip"),
        image_size=bench.PRESETS["tiny-next"].overrides["vision_image_size"],
        seed=3,
    )


def _runs(out_dir, tag):
    with open(os.path.join(out_dir, f"efficiency_{tag}.json")) as f:
        return {r["label"]: r for r in json.load(f)["runs"]}


def test_every_next_method_runs_and_unsupported_ones_are_named(tmp_path, clip_dir, capsys):
    out = str(tmp_path / "out")
    rc = main(
        [
            "bench",
            "--preset",
            "tiny-next",
            "--methods",
            *NEXT_SPECS,
            "random:4",
            "--clip-path",
            clip_dir,
            "--out-dir",
            out,
            "--tag",
            "next",
            *FAST,
        ]
    )
    runs = _runs(out, "next")
    assert rc == 1  # random has no LLaVA-NeXT form: the run is reported and the command says so
    assert "random@4" in capsys.readouterr().err
    assert "not implemented" in runs["random@4"]["error"] and "llava_next" in runs["random@4"]["error"]
    full = runs["none"]["visual_tokens"]
    for label, r in runs.items():
        if label == "random@4":
            continue
        assert "error" not in r, (label, r.get("error"))
        assert r["jax"]["ttft_ms"]["median"] > 0 and r["jax"]["decode_tok_s_b1"]["median"] > 0, label
        if label != "none":
            assert 0 < r["visual_tokens"] < full, label  # every method kept fewer tokens than the full layout
            assert r["jax"]["selection_ms"]["median"] > 0, label
    hero = runs["hero@0.3(low_layers=(0, 1),high_layers=(1, 2))"]
    assert hero["settings"]["clip_path"] == clip_dir


def test_onevision_unsupported_specs_are_named(tmp_path, capsys):
    """On LLaVA-OneVision the methods without an official-layout form there (HiRED, VisionZip) fail by name with
    their default layout (before any compile), the runnable ones still run, and the command exits 1."""
    out = str(tmp_path / "out")
    rc = main(
        [
            "bench",
            "--preset",
            "tiny-ov",
            "--methods",
            "uniform:4",
            "visionzip:4",
            "hired:0.2",
            "--checkpoint-root",
            str(tmp_path / "ckpt"),
            "--out-dir",
            out,
            "--tag",
            "ov",
            *FAST,
        ]
    )
    assert rc == 1
    assert "2 of 3 runs failed" in capsys.readouterr().err
    runs = _runs(out, "ov")
    assert "error" not in runs["uniform@4"] and runs["uniform@4"]["visual_tokens"] > 0
    assert "layout='reference'" in runs["visionzip@4"]["error"]
    assert "layout='official' on LLaVA-OneVision is not implemented" in runs["hired@0.2"]["error"]


def test_hero_without_clip_path_fails_by_name_and_exits_nonzero(tmp_path, capsys):
    rc = main(
        ["bench", "--preset", "tiny-next", "--methods", "hero:0.2", "--out-dir", str(tmp_path), "--tag", "h", *FAST]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "every requested method failed" in err and "clip_path" in err
    assert "clip_path" in _runs(str(tmp_path), "h")["hero@0.2"]["error"]


def test_llava_checkpoint_dir_and_failed_run_exit_code(tmp_path, capsys):
    """``--model DIR`` benchmarks a user's checkpoint; HERO on LLaVA-1.5 fails with its reason; exit 1."""
    d = bench.ensure_checkpoint("tiny", root=str(tmp_path / "ckpt"))
    out = str(tmp_path / "out")
    rc = main(
        [
            "bench",
            "--model",
            d,
            "--methods",
            "fastervlm:4",
            "hero:0.2",
            "--clip-path",
            str(tmp_path),
            "--out-dir",
            out,
            "--tag",
            "m",
            *FAST,
        ]
    )
    assert rc == 1
    runs = _runs(out, "m")
    assert "error" not in runs["fastervlm@4"] and runs["fastervlm@4"]["visual_tokens"] == 4
    assert "LLaVA-NeXT" in runs["hero@0.2"]["error"]
    assert "1 of 2 runs failed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--methods", "nope:3"], "unknown pruning method 'nope'"),
        (
            ["--methods", "vispruner:64:important_ratio=abc"],
            "vispruner: setting important_ratio='abc' must be a number",
        ),
        (["--methods", "prumerge_plus:8"], "takes no budget"),
        (["--model", "/nonexistent/dir"], "model directory '/nonexistent/dir' not found"),
        (["--repeats", "0"], "--repeats >= 1"),
        (["--merge", "a.json"], "--merge needs --tag"),
    ],
)
def test_refusals_exit_2_with_a_clean_message(tmp_path, capsys, argv, message):
    assert main(["bench", "--preset", "tiny", "--out-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "efficiency_cpu-tiny-float32.json")


def test_merge_names_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["bench", "--merge", str(bad), "--tag", "x", "--out-dir", str(tmp_path)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert main(["bench", "--merge", str(tmp_path / "missing.json"), "--tag", "x", "--out-dir", str(tmp_path)]) == 2
    assert "missing.json" in capsys.readouterr().err
