"""No command loses a user's files: convert, demo, visualize and the save APIs refuse foreign destinations,
replace only their own earlier output, and never leave a partial write behind."""

import hashlib
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import vlmprune
from reference.hf_builders import sharded_copy
from vlmprune.cli import main
from vlmprune.io.safe_output import OutputExistsError
from vlmprune.tiny import demo_image


def snapshot(path):
    """{relative path: sha256} of every file under path (or of the file itself)."""
    if os.path.isfile(path):
        return {"": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def no_temp_siblings(path):
    parent, name = os.path.split(os.path.abspath(path))
    return [f for f in os.listdir(parent) if f.startswith(f".{name}.")] == []


@pytest.fixture
def forbid_load(monkeypatch):
    """Fail the test if a command gets as far as loading the weights."""

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the flags/destination were checked")

    monkeypatch.setattr(vlmprune, "load", boom)


def foreign_targets(tmp_path, mha_dir):
    """Destinations that hold somebody else's files (name -> path)."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("years of work")
    other = tmp_path / "other_hf"
    shutil.copytree(mha_dir, other)
    plain = tmp_path / "a_file"
    plain.write_text("not a directory")
    return {
        "user files": str(notes),
        "another HF checkpoint": str(other),
        "sharded HF checkpoint": sharded_copy(mha_dir, tmp_path / "sharded"),
        "a regular file": str(plain),
    }


def test_convert_refuses_foreign_destinations_and_keeps_them(mha_dir, tmp_path, forbid_load):
    targets = foreign_targets(tmp_path, mha_dir)
    for name, dst in targets.items():
        before = snapshot(dst)
        with pytest.raises(SystemExit, match=r"error: .*(not empty|not a directory)"):
            main(["convert", mha_dir, dst])
        assert snapshot(dst) == before, name
        assert no_temp_siblings(dst), name
    # the source itself, or a directory holding it, is refused even with --overwrite
    src = tmp_path / "src"
    shutil.copytree(mha_dir, src)
    before = snapshot(src)
    for dst in (str(src), str(tmp_path)):
        with pytest.raises(SystemExit, match="being read"):
            main(["convert", str(src), dst, "--overwrite"])
    assert snapshot(src) == before


def test_convert_writes_new_empty_and_own_dirs_and_overwrite_replaces(mha_dir, tmp_path):
    new = tmp_path / "deep" / "new"
    assert main(["convert", mha_dir, str(new)]) == 0
    assert json.load(open(new / "vlmprune.json"))["format"] == "vlmprune-orbax"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", mha_dir, str(empty)]) == 0
    assert main(["convert", mha_dir, str(new), "--dtype", "bfloat16"]) == 0  # its own earlier output: replaced
    k = np.asarray(vlmprune.load(str(new)).params["multi_modal_projector"]["linear_1"]["kernel"])
    orig = np.asarray(vlmprune.load(mha_dir).params["multi_modal_projector"]["linear_1"]["kernel"])
    assert not np.array_equal(k, orig)  # the new (bfloat16) conversion replaced the float32 one
    np.testing.assert_array_equal(k, orig.astype(jnp.bfloat16).astype(np.float32))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "x.txt").write_text("x")
    assert main(["convert", mha_dir, str(notes), "--overwrite"]) == 0
    assert not (notes / "x.txt").exists() and (notes / "vlmprune.json").exists()  # replaced whole, not mixed
    assert no_temp_siblings(new) and no_temp_siblings(notes)


def test_failed_save_leaves_the_previous_checkpoint(mha_dir, tmp_path, monkeypatch):
    model = vlmprune.load(mha_dir)
    out = tmp_path / "ckpt"
    model.save(str(out))
    before = snapshot(out)

    def fail(*a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(model.processor, "save_pretrained", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        model.save(str(out))
    assert snapshot(out) == before and no_temp_siblings(out)
    with pytest.raises(RuntimeError, match="simulated"):
        model.save(str(tmp_path / "fresh"))
    assert not (tmp_path / "fresh").exists() and no_temp_siblings(tmp_path / "fresh")
    monkeypatch.undo()
    assert vlmprune.load(str(out)) is not None


def test_save_api_refuses_foreign_dirs(mha_dir, tmp_path):
    model = vlmprune.load(mha_dir)
    for name, dst in foreign_targets(tmp_path, mha_dir).items():
        before = snapshot(dst)
        with pytest.raises(OutputExistsError):
            model.save(dst)
        assert snapshot(dst) == before, name


def test_demo_never_writes_into_an_existing_checkpoint(mha_dir, tmp_path, forbid_load):
    targets = foreign_targets(tmp_path, mha_dir)
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(os.path.join(mha_dir, "config.json"), only_config)
    targets["config.json only"] = str(only_config)
    for name, dst in targets.items():
        before = snapshot(dst)
        with pytest.raises(SystemExit, match=r"error: .*(not empty|not a directory)"):
            main(["demo", "--checkpoint", dst, "--max-new-tokens", "2"])
        assert snapshot(dst) == before, name
        assert no_temp_siblings(dst), name


def test_tiny_checkpoint_is_built_once_and_reused(tmp_path):
    from vlmprune.demo import ensure_tiny_checkpoint
    from vlmprune.tiny import write_random_llava

    d = str(tmp_path / "tiny")
    ensure_tiny_checkpoint(d)
    before = snapshot(d)
    ensure_tiny_checkpoint(d)
    assert snapshot(d) == before  # reused, not rebuilt
    os.remove(os.path.join(d, "model.safetensors"))  # its own, incomplete: rebuilt
    ensure_tiny_checkpoint(d)
    assert snapshot(d) == before
    os.remove(os.path.join(d, "vlmprune-tiny.json"))  # built by an older vlmprune: only its README marks it
    ensure_tiny_checkpoint(d)
    assert snapshot(d) == {k: v for k, v in before.items() if k != "vlmprune-tiny.json"}
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        write_random_llava(str(user))
    assert (user / "keep.txt").read_text() == "mine"
    ensure_tiny_checkpoint(str(user), overwrite=True)  # explicit: replaced whole
    assert not (user / "keep.txt").exists() and os.path.isfile(user / "vlmprune-tiny.json")


@pytest.fixture(scope="module")
def img(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "img.png"
    demo_image().save(p)
    return str(p)


def test_visualize_out_is_never_replaced_without_overwrite(mha_dir, tmp_path, img, forbid_load):
    existing = tmp_path / "kept.png"
    existing.write_bytes(b"my own picture")
    a_dir = tmp_path / "adir"
    a_dir.mkdir()
    for out, msg in [
        (existing, "file exists"),
        (a_dir, "unsupported image suffix"),
        (tmp_path / "x.gif", "unsupported image suffix '.gif'"),
        (tmp_path / "noext", "unsupported image suffix '\\(none\\)'"),
        (tmp_path / "x.PNG.txt", "unsupported image suffix '.txt'"),
    ]:
        with pytest.raises(SystemExit, match=msg):
            main(
                [
                    "visualize",
                    "--model",
                    mha_dir,
                    "--image",
                    img,
                    "--method",
                    "vispruner",
                    "--keep",
                    "4",
                    "--out",
                    str(out),
                ]
            )
    assert existing.read_bytes() == b"my own picture" and os.listdir(a_dir) == []
    d2 = tmp_path / "d2.png"
    d2.mkdir()
    with pytest.raises(SystemExit, match="is a directory"):
        main(["visualize", "--model", mha_dir, "--image", img, "--out", str(d2), "--overwrite"])


def test_visualize_formats_and_overwrite(mha_dir, tmp_path, img):
    jpg = tmp_path / "kept.jpg"
    assert (
        main(
            [
                "visualize",
                "--model",
                mha_dir,
                "--image",
                img,
                "--method",
                "fastervlm",
                "--keep",
                "4",
                "--out",
                str(jpg),
                "--dpi",
                "40",
            ]
        )
        == 0
    )
    assert jpg.read_bytes()[:3] == b"\xff\xd8\xff" and Image.open(jpg).format == "JPEG"
    png = tmp_path / "kept.png"
    png.write_bytes(b"old")
    assert main(["visualize", "--model", mha_dir, "--image", img, "--out", str(png), "--overwrite", "--dpi", "40"]) == 0
    assert Image.open(png).format == "PNG" and no_temp_siblings(png)
    pdf = tmp_path / "kept.pdf"
    assert main(["visualize", "--model", mha_dir, "--image", img, "--out", str(pdf), "--dpi", "40"]) == 0
    assert pdf.read_bytes()[:4] == b"%PDF"


def test_viz_save_api_keeps_existing_files(tmp_path):
    from matplotlib.figure import Figure

    from vlmprune import viz

    fig = Figure(figsize=(1, 1))
    p = tmp_path / "f.png"
    viz.save(fig, str(p), dpi=20)
    before = p.read_bytes()
    with pytest.raises(OutputExistsError):
        viz.save(fig, str(p), dpi=30)
    assert p.read_bytes() == before
    viz.save(fig, str(p), dpi=30, overwrite=True)
    assert Image.open(p).size == (30, 30)
    assert np.array_equal(sorted(os.listdir(tmp_path)), ["f.png"])
