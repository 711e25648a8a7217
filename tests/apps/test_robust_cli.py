"""The CLI on tiny checkpoints of both families (LLaVA-1.5 and LLaVA-NeXT): generate and visualize for every
registered method (HERO with a tiny CLIP via --clip-path), one error style (``error: ...``, non-zero exit, no
traceback) for user errors, and flags checked before any weights are loaded."""

import os
import subprocess
import sys

import pytest
from PIL import Image

import vlmprune
from reference.hf_builders import build_hf_clip, build_hf_llava_next
from reference.onevision_builders import build_hf_onevision_with_processor
from vlmprune import prune
from vlmprune.cli import main
from vlmprune.tiny import demo_image

pytestmark = pytest.mark.slow  # end-to-end runs of the commands: skipped by make test-fast

PROMPT = "What is in the image?"


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    return build_hf_llava_next(tmp_path_factory.mktemp("cli_next"), seed=5)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_hf_clip(tmp_path_factory.mktemp("cli_clip"), image_size=56, seed=4)


@pytest.fixture(scope="module")
def img(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli_img") / "img.png"
    demo_image().resize((120, 80)).save(p)  # 3:2, a 1x2-ish grid on NeXT
    return str(p)


@pytest.fixture
def forbid_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the weights were loaded before the flags were checked")

    monkeypatch.setattr(vlmprune, "load", boom)


HERO = ["--keep-ratio", "0.3", "--low-layers", "0,1", "--high-layers", "1,2"]
METHOD_FLAGS = {
    "none": [],
    "vispruner": ["--keep", "4", "--important-ratio", "0.5"],
    "fastervlm": ["--keep", "4"],
    "hired": ["--budget-rate", "0.25"],
    "divprune": ["--keep", "4"],
    "visionzip": ["--dominant", "3", "--contextual", "1"],
    "prumerge_plus": [],
    "random": ["--keep", "4"],
    "uniform": ["--keep", "4"],
    "fastv": ["--layer", "1", "--keep-ratio", "0.5"],
    "hero": HERO,
}
assert set(METHOD_FLAGS) == set(prune.REGISTRY) | {"none"}  # every registered method is exercised


def _supported(method, family):
    if method == "none":
        return True
    cls = prune.REGISTRY[method]
    return cls.supports_next if family == "next" else method != "hero"


_LOADED = {}


@pytest.fixture
def load_once(monkeypatch):
    """``vlmprune.load`` as the CLI calls it, but each checkpoint is read (and its programs compiled) once per
    module, so that the method matrix below runs in seconds per case."""
    real = vlmprune.load

    def load(path, **kw):
        k = (path, tuple(sorted(kw.items())))
        if k not in _LOADED:
            _LOADED[k] = real(path, **kw)
        return _LOADED[k]

    monkeypatch.setattr(vlmprune, "load", load)


@pytest.mark.parametrize("family", ["llava", "next"])
@pytest.mark.parametrize("method", sorted(METHOD_FLAGS))
def test_generate_every_method_both_families(family, method, mha_dir, next_dir, clip_dir, img, capsys, load_once):
    model = mha_dir if family == "llava" else next_dir
    flags = METHOD_FLAGS[method] + (["--clip-path", clip_dir] if method == "hero" else [])
    argv = ["generate", "--model", model, "--image", img, "--prompt", PROMPT, "--max-new-tokens", "3"]
    argv += ([] if method == "none" else ["--method", method]) + flags
    if not _supported(method, family):
        with pytest.raises(SystemExit, match=r"^error: .*(LLaVA-NeXT|llava_next)") as e:
            main(argv)
        assert "Traceback" not in str(e.value)
        return
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert f"[vlmprune] {method}:" in err
    if family == "llava":
        kept = {
            "none": 16,
            "vispruner": 4,
            "fastervlm": 4,
            "divprune": 4,
            "random": 4,
            "uniform": 4,
            "hired": 4,
            "visionzip": 4,
            "fastv": 16,
        }.get(method)
        if kept is not None:
            assert f"visual tokens: {kept}/16" in err
    else:
        assert "LLaVA-NeXT image (80, 120)" in err


@pytest.mark.parametrize(
    "family,flags",
    [
        ("llava", ["--method", "vispruner", "--keep", "4"]),
        ("llava", ["--compare", "vispruner:4,hired:4,visionzip:5,none"]),
        ("next", ["--method", "hero"] + HERO),
        ("next", ["--method", "fastervlm", "--keep", "4"]),
        ("next", ["--compare", "hero:0.3,divprune:4,none", "--low-layers", "0,1", "--high-layers", "1,2"]),
    ],
)
def test_visualize_both_families(family, flags, mha_dir, next_dir, clip_dir, img, tmp_path, load_once):
    model = mha_dir if family == "llava" else next_dir
    out = tmp_path / "v.png"
    if "hero" in " ".join(flags):
        flags = flags + ["--clip-path", clip_dir]
    assert main(["visualize", "--model", model, "--image", img, "--out", str(out), "--dpi", "30"] + flags) == 0
    panels = len(flags[flags.index("--compare") + 1].split(",")) if "--compare" in flags else 1
    assert Image.open(out).size[0] == panels * 90  # PANEL_INCHES (3) x dpi per panel


BAD_FLAGS = [
    (["--keep", "4"], "--keep given without --method"),
    (["--keep-ratio", "0.3", "--clip-path", "x"], "--keep-ratio, --clip-path given without --method"),
    (["--method", "vispruner", "--keep-ratio", "0.5"], "--keep-ratio does not apply to --method vispruner"),
    (["--method", "hired", "--layer", "1"], "--layer does not apply to --method hired"),
    (["--method", "bogus"], "unknown --method 'bogus'"),
    (["--method", "vispruner", "--keep", "17"], "num_keep must be <= 16"),
    (["--method", "fastervlm", "--keep", "4", "--layer", "7"], "layer=7 is out of range"),
    (["--method", "hero"] + HERO, "HERO allocates budgets across LLaVA-NeXT tiles"),
    (["--method", "fastv", "--layer", "5"], "layer must be <= 1"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--top-p", "1.5"], "--top-p must be <= 1"),
]


@pytest.mark.parametrize("flags,msg", BAD_FLAGS, ids=[m for _, m in BAD_FLAGS])
def test_bad_generate_flags_fail_before_loading(flags, msg, mha_dir, img, forbid_load):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", mha_dir, "--image", img, "--prompt", PROMPT] + flags)
    assert str(e.value).startswith("error: ") and msg in str(e.value)


NEXT_BAD = [
    (["--method", "hero", "--low-layers", "0", "--high-layers", "1"], "clip_path"),
    (
        ["--method", "hero", "--clip-path", "/nonexistent/clip"] + HERO,
        "--clip-path '/nonexistent/clip' is not a directory",
    ),
    (
        ["--method", "hero", "--low-layers", "0,9", "--high-layers", "1", "--clip-path", "CLIP"],
        "low_layers=9 is out of range",
    ),
    (["--method", "random", "--keep", "4"], "random on llava_next (anyres tiles) is not implemented"),
    (["--method", "hero", "--clip-path", "MODEL"] + HERO, "expected a full CLIP checkpoint"),
]


@pytest.mark.parametrize("flags,msg", NEXT_BAD, ids=[m for _, m in NEXT_BAD])
def test_bad_hero_and_next_flags_fail_before_loading(flags, msg, next_dir, clip_dir, img, forbid_load):
    flags = [clip_dir if f == "CLIP" else next_dir if f == "MODEL" else f for f in flags]
    for cmd in ("generate", "visualize"):
        argv = [cmd, "--model", next_dir, "--image", img] + (["--prompt", PROMPT] if cmd == "generate" else [])
        with pytest.raises(SystemExit) as e:
            main(argv + flags)
        assert str(e.value).startswith("error: ") and msg in str(e.value), str(e.value)


def test_bad_files_fail_before_loading(mha_dir, img, tmp_path, forbid_load):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    cases = [
        (["--image", str(tmp_path / "missing.png")], "image '" + str(tmp_path / "missing.png") + "' not found"),
        (["--image", str(not_image)], "cannot identify image file"),
        (["--model", str(tmp_path / "nomodel")], "model directory"),
        (["--model", str(empty)], "no config.json"),
    ]
    for over, msg in cases:
        args = {"--model": mha_dir, "--image": img}
        args.update(dict(zip(over[::2], over[1::2])))
        for cmd in ("generate", "visualize"):
            argv = [cmd, "--model", args["--model"], "--image", args["--image"], "--out", str(tmp_path / "o.png")]
            if cmd == "generate":
                argv = argv[:-2] + ["--prompt", PROMPT]
            with pytest.raises(SystemExit) as e:
                main(argv)
            assert str(e.value).startswith("error: ") and msg in str(e.value), (cmd, str(e.value))
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path / "nosrc"), str(tmp_path / "dst")])
    assert str(e.value).startswith("error: source directory")


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--keep", "0"],
        ["generate", "--max-new-tokens", "-1"],
        ["visualize", "--dpi", "0"],
        ["generate", "--low-layers", "a,b"],
    ],
)
def test_argparse_rejects_bad_numbers(argv, mha_dir, img, capsys):
    base = [argv[0], "--model", mha_dir, "--image", img] + (["--prompt", "x"] if argv[0] == "generate" else [])
    with pytest.raises(SystemExit) as e:
        main(base + argv[1:])
    assert e.value.code == 2 and "error: argument" in capsys.readouterr().err


def test_visualize_compare_flag_rules(mha_dir, img, tmp_path, forbid_load):
    for flags, msg in [
        (["--compare", "vispruner:4", "--keep", "4"], "--keep cannot be combined with --compare"),
        (["--compare", "vispruner:4", "--method", "fastervlm"], "either --method or --compare"),
        (["--compare", "vispruner:4", "--clip-path", "x"], "--clip-path applies to none"),
        (["--method", "fastv"], "prunes inside the LLM"),
        (["--compare", "vispruner:99"], "larger than the 16"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["visualize", "--model", mha_dir, "--image", img, "--out", str(tmp_path / "o.png")] + flags)
        assert str(e.value).startswith("error: ") and msg in str(e.value), str(e.value)


def test_errors_and_bugs_from_a_real_process(mha_dir, img, tmp_path):
    """A user error: one clean line on stderr and exit 1; --traceback shows it in full."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "vlmprune", *a], capture_output=True, text=True, env=env, timeout=300
        )

    r = run("convert", mha_dir, mha_dir)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: ") and "Traceback" not in r.stderr
    assert "being read" in r.stderr
    r = run("--traceback", "generate", "--model", str(tmp_path / "none"), "--image", img, "--prompt", "x")
    assert r.returncode == 1 and "Traceback" in r.stderr and "FileNotFoundError" in r.stderr


def test_a_bug_keeps_its_traceback(mha_dir, img, monkeypatch):
    from vlmprune import cli

    def broken(*a, **k):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(cli, "_read_config", broken)
    with pytest.raises(KeyError):
        main(["generate", "--model", mha_dir, "--image", img, "--prompt", "x"])


def test_convert_next_and_generate_from_the_conversion(next_dir, img, tmp_path, capsys):
    out = tmp_path / "next_conv"
    assert main(["convert", next_dir, str(out)]) == 0
    before = sorted(os.listdir(out))
    with pytest.raises(SystemExit, match="being read"):
        main(["convert", str(out), str(out)])
    assert sorted(os.listdir(out)) == before
    assert (
        main(
            [
                "generate",
                "--model",
                str(out),
                "--image",
                img,
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                "2",
                "--method",
                "vispruner",
                "--keep",
                "4",
            ]
        )
        == 0
    )
    assert "LLaVA-NeXT image" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ov_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_ov")
    build_hf_onevision_with_processor(d, seed=3)
    return str(d)


# LLaVA-OneVision: what runs there (per-tile pruners in the official layout by default, or the spatial-compat one
# given by a spec) and what is refused with a message naming the family, before the weights load
OV_RUNS = {
    "none": [],
    "divprune": ["--method", "divprune", "--keep", "4"],
    "fastv": ["--method", "fastv", "--layer", "1", "--keep-ratio", "0.5"],
    "vispruner": ["--method", "vispruner", "--keep", "4"],
    "fastervlm": ["--method", "fastervlm:4:layout=reference"],
    "uniform": ["--method", "uniform", "--keep", "4"],
    "uniform (spatial-compat)": ["--method", "uniform:4:layout=reference"],
    "visionzip": ["--method", "visionzip:6:layout=reference"],
    "prumerge_plus": ["--method", "prumerge_plus"],
    "hired": ["--method", "hired:0.25:layout=reference"],
}
OV_REFUSED = {
    "hired (official layout)": ["--method", "hired", "--budget-rate", "0.25"],
    "hero": ["--method", "hero", "--clip-path", "/nonexistent/clip"],
    "visionzip (official layout)": ["--method", "visionzip"],
}


@pytest.mark.parametrize("method", sorted(OV_RUNS) + sorted(OV_REFUSED))
def test_generate_on_onevision(method, ov_dir, img, capsys, load_once):
    argv = ["generate", "--model", ov_dir, "--image", img, "--prompt", PROMPT, "--max-new-tokens", "3"]
    if method in OV_REFUSED:
        with pytest.raises(SystemExit, match=r"^error: .*(OneVision|onevision)") as e:
            main(argv + OV_REFUSED[method])
        assert "Traceback" not in str(e.value)
        return
    assert main(argv + OV_RUNS[method]) == 0
    _, err = capsys.readouterr()
    assert f"[vlmprune] {method.split(' (')[0]}: LLaVA-OneVision image (80, 120)" in err
