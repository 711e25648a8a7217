"""`vlmprune bench` smoke test on the tiny preset (1 repeat), plus its argument parsing and refusals."""

import json
import os

import numpy as np
import pytest

from vlmprune import bench

pytestmark = pytest.mark.slow  # end-to-end runs of the commands: skipped by make test-fast


def test_bench_tiny_end_to_end(tmp_path):
    cfg = bench.BenchConfig(
        preset="tiny",
        methods=("none", "fastervlm:4"),
        repeats=1,
        warmup=0,
        batch=2,
        max_new_tokens=3,
        compare_torch=True,
        out_dir=str(tmp_path / "out"),
        tag="smoke",
        checkpoint_root=str(tmp_path / "ckpt"),
    )
    out = bench.run_bench(cfg)
    prefix = tmp_path / "out" / "efficiency_smoke"
    for ext in (".json", ".md", "_ttft.png", "_flops.png"):
        assert (tmp_path / "out" / f"efficiency_smoke{ext}").stat().st_size > 0, ext
    assert not os.path.exists(f"{prefix}.partial.json")
    data = json.loads((tmp_path / "out" / "efficiency_smoke.json").read_text())
    assert data["meta"]["preset"] == "tiny" and data["meta"]["tokens_per_image"] == 16
    assert [r["label"] for r in data["runs"]] == ["none", "fastervlm@4"]
    none, vp = data["runs"]
    assert "error" not in none and "error" not in vp
    for r in (none, vp):
        assert r["jax"]["select_project_ms"]["median"] > 0
        for k in ("vision_ms", "llm_prefill_ms", "ttft_ms", "decode_tok_s_b1", "decode_tok_s_b2"):
            assert r["jax"][k]["median"] > 0 and r["jax"][k]["n"] == 1, k
            assert r["torch"][k]["median"] > 0, k
            assert r["ratio"][k] > 0, k
        assert r["jax"]["kv_cache_bytes"] > 0 and r["torch"]["kv_cache_bytes"] > 0
        assert "peak_device_bytes" in r["jax"]  # None on CPU
        assert r["xla_flops_llm_prefill"] > 0 and r["analytic"]["flops_2ndm"] > 0
    assert none["visual_tokens"] == 16 and vp["visual_tokens"] == 4
    assert none["jax"]["selection_ms"] is None and vp["jax"]["selection_ms"]["median"] > 0
    assert vp["torch_tokens"] == "hf-at-kept-indices"
    # analytic cut from the §6 formula; XLA's count of the LLM-prefill program falls with the kept tokens too
    assert 0 < vp["reduction_vs_none"]["analytic_2ndm"] < 1
    assert 0 < vp["reduction_vs_none"]["xla_llm_prefill"] < 1
    assert set(data["targets"]) >= {"jax_llm_prefill_le_torch", "selection_le_2pct_of_vision"}
    md = (tmp_path / "out" / "efficiency_smoke.md").read_text()
    assert "| fastervlm@4 | 4 |" in md and "JAX vs PyTorch" in md
    assert out["files"][0].endswith("efficiency_smoke.json")


#: LLaVA-OneVision methods that run today (per-tile ones in the spatial-compat layout), tiny budgets per 16-token tile
OV_SPECS = ("none", "vispruner:4:layout=reference", "vispruner:4", "divprune:4", "fastv:0.5:layer=1")
#: both sides run float32 on the CPU: the same tower, projector, packing and decoder differ by summation order
#: only (measured ~4e-7 relative)
FP32_REL = 1e-5


def test_bench_tiny_onevision_end_to_end(tmp_path):
    """tiny-ov with the PyTorch side: every figure finite, HF's LLM fed the same kept tokens (tile tokens for
    VisPruner, packed-block slots for DivPrune, the whole packed block unpruned), logits agreeing."""
    import math

    from vlmprune.anyres.onevision import geometry, image_layout

    cfg = bench.BenchConfig(
        preset="tiny-ov",
        methods=OV_SPECS,
        repeats=1,
        warmup=0,
        batch=2,
        max_new_tokens=3,
        compare_torch=True,
        plots=False,
        out_dir=str(tmp_path / "out"),
        tag="ov",
        checkpoint_root=str(tmp_path / "ckpt"),
    )
    out = bench.run_bench(cfg)
    meta = out["meta"]
    assert meta["model_type"] == "llava_onevision" and meta["torch_model"] == "LlavaOnevisionForConditionalGeneration"
    model = bench.build_model("tiny-ov", root=str(tmp_path / "ckpt"))[0]
    lay = image_layout(bench.PRESETS["tiny-ov"].image_hw, geometry(model.config))
    v = lay.num_tokens  # the packed block of the preset's image (base + unpadded grid + newlines)
    assert meta["visual_tokens_unpruned"] == v and meta["image_size_hw"] == list(bench.PRESETS["tiny-ov"].image_hw)
    runs = {r["label"]: r for r in out["runs"]}
    assert list(runs) == ["none", "vispruner@4(layout=reference)", "vispruner@4", "divprune@4", "fastv@0.5(layer=1)"]
    for label, r in runs.items():
        assert "error" not in r, (label, r.get("error"))
        for k in ("vision_ms", "select_project_ms", "llm_prefill_ms", "ttft_ms", "decode_tok_s_b1", "decode_tok_s_b2"):
            assert math.isfinite(r["jax"][k]["median"]) and r["jax"][k]["median"] > 0, (label, k)
    assert runs["none"]["visual_tokens"] == v
    assert runs["vispruner@4(layout=reference)"]["visual_tokens"] == 4 * lay.num_tiles  # per tile, base included
    assert runs["divprune@4"]["visual_tokens"] == min(4 * lay.num_tiles, v)
    oh, ow = lay.out_hw  # mode B: 4 of the base, min(4·K, oh·ow) of the grid, at most one newline per grid row
    grid_kept = 4 + min(4 * (lay.num_tiles - 1), oh * ow)
    assert grid_kept <= runs["vispruner@4"]["visual_tokens"] <= grid_kept + oh
    assert runs["fastv@0.5(layer=1)"]["visual_tokens"] == int(0.5 * v)  # floor(ratio·V) of the packed block
    assert "LlavaOnevision" in runs["fastv@0.5(layer=1)"]["torch_skipped"]
    for label in ("none", "vispruner@4(layout=reference)", "vispruner@4", "divprune@4"):
        r = runs[label]
        for k in ("vision_ms", "llm_prefill_ms", "ttft_ms", "decode_tok_s_b1", "decode_tok_s_b2"):
            assert math.isfinite(r["torch"][k]["median"]) and r["torch"][k]["median"] > 0, (label, k)
            assert math.isfinite(r["ratio"][k]) and r["ratio"][k] > 0, (label, k)
        print(label, "tokens vs torch:", r["tokens_vs_torch"], "logits vs torch:", r["logits_vs_torch"])
        assert r["tokens_vs_torch"]["rel_l2"] < FP32_REL, label  # the same kept tokens reach both LLMs
        assert r["logits_vs_torch"]["rel_l2"] < FP32_REL and r["logits_vs_torch"]["top1_agree"] == 1.0, label
    assert runs["none"]["torch_tokens"] == "hf-packed"
    assert runs["vispruner@4(layout=reference)"]["torch_tokens"] == "hf-at-kept-tiles-indices"
    assert runs["divprune@4"]["torch_tokens"] == "hf-at-kept-packed-indices"
    assert runs["vispruner@4"]["torch_tokens"] == "hf-at-kept-packed-indices"
    assert 0 < runs["vispruner@4(layout=reference)"]["reduction_vs_none"]["analytic_2ndm"] < 1
    md = (tmp_path / "out" / "efficiency_ov.md").read_text()
    assert "LlavaOnevisionForConditionalGeneration" in md and "Same kept tokens on both sides" in md
    assert f"packs into {v}" in md


@pytest.mark.parametrize("preset", ["llava-onevision-0.5b", "llava-onevision-7b"])
def test_onevision_real_presets_build_and_are_refused_on_cpu(tmp_path, preset):
    """The real OneVision shapes: SigLIP so400m at 384 px / patch 14 (27 x 27 tokens per tile), the llava-hf
    anyres_max_9 canvases, Qwen2 tied (0.5B) or untied (7B); refused on CPU with the size they need."""
    from vlmprune.anyres.onevision import CLASS_DEFAULT_PINPOINTS, geometry
    from vlmprune.bench import model_access as access

    p = bench.PRESETS[preset]
    _, hf, proc = bench.hf_config(p)
    cfg = access.LlavaConfig.from_hf(hf)
    g = geometry(cfg)
    assert cfg.model_type == "llava_onevision" and (g.tile_size, g.tokens_per_side, g.max_num) == (384, 27, 9)
    assert g.pinpoints == tuple(CLASS_DEFAULT_PINPOINTS) and cfg.vision.num_hidden_layers == 26
    assert cfg.text.tie_word_embeddings == (preset.endswith("0.5b"))
    assert cfg.text.vocab_size > hf.video_token_index > hf.image_token_index
    assert proc.num_image_tokens(p.image_hw) > cfg.tokens_per_image  # the preset's image is tiled
    with pytest.raises(bench.BenchError, match=rf"{preset} \(\d+\.\d+ B params\) needs about .*GPU/TPU"):
        bench.build_model(preset, "bfloat16", root=str(tmp_path))
    assert not os.listdir(tmp_path)


def test_parse_methods():
    runs = bench.parse_methods(
        ["none", "vispruner:64,128", "hired:0.2", "visionzip:64", "vispruner:32:important_ratio=0.25"]
    )
    assert [r.label for r in runs] == [
        "none",
        "vispruner@64",
        "vispruner@128",
        "hired@0.2",
        "visionzip@64",
        "vispruner@32(important_ratio=0.25)",
    ]
    assert runs[0].pruner is None
    assert runs[2].pruner.num_keep == 128 and runs[3].pruner.budget_rate == 0.2
    assert (runs[4].pruner.dominant, runs[4].pruner.contextual) == (54, 10)
    assert runs[5].pruner.important_ratio == 0.25
    with pytest.raises(bench.BenchError, match="unknown pruning method 'nope'"):
        bench.parse_methods(["nope:3"])
    with pytest.raises(bench.BenchError, match="takes no budget"):
        bench.parse_methods(["prumerge_plus:64"])


def test_real_preset_refused_on_cpu(tmp_path):
    with pytest.raises(bench.BenchError, match=r"llava-1.5-7b \(7\.\d+ B params\) needs about \d+\.\d GiB .*GPU/TPU"):
        bench.build_model("llava-1.5-7b", "bfloat16", root=str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing written to disk


def test_random_params_on_device():
    """The real presets' in-memory init: right tree, dtype and norm/bias constants."""
    import jax
    import jax.numpy as jnp

    from vlmprune.bench import model_access as access

    _, hf, _ = bench.hf_config(bench.PRESETS["tiny"])
    cfg = access.LlavaConfig.from_hf(hf)
    module = access.Llava(cfg, dtype=jnp.bfloat16)
    abstract = access.abstract_params(module)
    params = bench.random_params(abstract, jnp.bfloat16, seed=0)
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    assert all(
        x.dtype == jnp.bfloat16 and x.shape == a.shape
        for x, a in zip(jax.tree.leaves(params), jax.tree.leaves(abstract))
    )
    assert float(params["language_model"]["norm"]["weight"].mean()) == 1.0
    assert 0.01 < float(jnp.std(params["language_model"]["lm_head"]["kernel"].astype(jnp.float32))) < 0.03


def test_recover_indices():
    rng = np.random.default_rng(0)
    proj = rng.standard_normal((2, 10, 6)).astype(np.float32)
    idx = np.array([[1, 4, 7], [0, 2, 9]])
    tokens = np.take_along_axis(proj, idx[..., None], axis=1)
    valid = np.ones(idx.shape, bool)
    assert (bench.recover_indices(tokens, valid, proj) == idx).all()
    assert bench.recover_indices(tokens + 0.5, valid, proj) is None  # merged tokens are not a subset


def test_kept_indices_from_the_typed_selection():
    """The PyTorch side's kept indices come from the method's own PruneResult: a real pruner's selection, 0 at
    invalid slots, and None when it hands the LLM merged or appended tokens."""
    import jax.numpy as jnp

    from vlmprune import prune
    from vlmprune.bench.model_access import kept_indices
    from vlmprune.prune.base import PruneContext
    from vlmprune.types import VisionTaps

    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.standard_normal((2, 9, 6)), jnp.float32)
    res = prune.get("uniform", num_keep=3).prune(VisionTaps(features=feats), PruneContext())
    got = np.asarray(kept_indices(res))
    sel = res.selection
    assert got.shape == (2, 3) and (got == np.where(np.asarray(sel.valid), np.asarray(sel.indices), 0)).all()
    assert len(set(got[0].tolist())) == 3 and got.max() < 9
    masked = res.replace(selection=sel.replace(valid=sel.valid.at[:, -1].set(False)))
    assert (np.asarray(kept_indices(masked))[:, -1] == 0).all()
    assert kept_indices(res.replace(tokens=feats[:, :3], tokens_valid=sel.valid)) is None
    assert kept_indices(res.replace(appended=feats[:, :1], appended_valid=sel.valid[:, :1])) is None


@pytest.mark.parametrize(
    "dtype,kind", [("float32", "llava"), ("bfloat16", "llava"), ("float32", "ov-tied"), ("bfloat16", "ov-untied")]
)
def test_torch_side_from_params_equals_checkpoint(tmp_path, dtype, kind):
    """The real presets' PyTorch side: HF model built from the JAX params holds exactly the checkpoint's tensors
    (bfloat16: both sides round the same float32 file to nearest-even, so still exact); LLaVA-OneVision with a
    tied LM head (0.5B) and an untied one (7B)."""
    import torch

    import vlmprune
    from vlmprune import tiny

    if kind == "llava":
        d = bench.ensure_checkpoint("tiny", root=str(tmp_path))
    else:
        d = tiny.write_random_onevision(str(tmp_path / kind), tie_word_embeddings=kind == "ov-tied")
    model = vlmprune.load(d, dtype=dtype)
    loaded = bench.TorchSide(d, dtype).model.state_dict()
    built = bench.TorchSide(None, dtype, model=model).model.state_dict()
    assert set(built) == set(loaded)
    for k, v in loaded.items():
        assert built[k].dtype == v.dtype and torch.equal(built[k], v), k  # copies of the same numbers: exact


def test_export_reports_every_mismatch():
    from vlmprune.io.weights import CheckpointError, export_params
    from vlmprune.models.llava import LLAVA_RENAMES, LLAVA_RULES

    params = {
        "language_model": {
            "norm": {"weight": np.ones(4, np.float32)},
            "lm_head": {"kernel": np.zeros((4, 10), np.float32)},
        }
    }
    shapes = {"model.language_model.norm.weight": (4,), "lm_head.weight": (10, 4)}
    out = export_params(params, shapes, LLAVA_RULES, renames=LLAVA_RENAMES)
    assert out["lm_head.weight"].shape == (10, 4)
    bad = {
        "model.language_model.norm.weight": (5,),
        "lm_head.weight": (10, 4),
        "mystery.weight": (1,),
        "model.language_model.layers.0.mlp.up_proj.weight": (8, 4),
    }
    with pytest.raises(CheckpointError, match=r"3 problem") as e:
        export_params(params, bad, LLAVA_RULES, renames=LLAVA_RENAMES)
    msg = str(e.value)
    assert "shape mismatch for 'model.language_model.norm.weight'" in msg and "no rule maps HF tensor 'mystery" in msg
    assert "layers_0/mlp/up_proj/kernel" in msg


def test_peak_flops_table(monkeypatch):
    monkeypatch.delenv("VLMPRUNE_PEAK_FLOPS", raising=False)
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert bench.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "float32") is None
    assert bench.peak_flops("cpu", "bfloat16") is None
    monkeypatch.setenv("VLMPRUNE_PEAK_FLOPS", "1e15")
    assert bench.peak_flops("anything", "float32") == 1e15


def test_compare_torch_refuses_next_presets(tmp_path):
    cfg = bench.BenchConfig(preset="tiny-next", compare_torch=True, out_dir=str(tmp_path))
    with pytest.raises(bench.BenchError, match="LLaVA-NeXT"):
        bench.run_bench(cfg)


def test_merge_split_runs(tmp_path):
    """Runs split over two invocations merge into one table with the targets recomputed over both."""
    common = dict(
        preset="tiny",
        repeats=1,
        warmup=0,
        batch=2,
        max_new_tokens=3,
        plots=False,
        out_dir=str(tmp_path / "parts"),
        checkpoint_root=str(tmp_path / "ckpt"),
    )
    bench.run_bench(bench.BenchConfig(methods=("none",), tag="a", **common))
    bench.run_bench(bench.BenchConfig(methods=("vispruner:4",), tag="b", **common))
    parts = [str(tmp_path / "parts" / f"efficiency_{t}.json") for t in "ab"]
    out = bench.merge_outputs(parts, str(tmp_path / "m"), "ab", plots=False)
    assert [r["label"] for r in out["runs"]] == ["none", "vispruner@4"]
    vp = out["runs"][1]
    assert 0 < vp["reduction_vs_none"]["analytic_2ndm"] < 1  # needs the baseline from the other file
    assert "vispruner64_llm_prefill_cut_ge_70pct" not in out["targets"]  # no vispruner@64 here
    assert (tmp_path / "m" / "efficiency_ab.md").read_text().count("| vispruner@4 |") == 2  # JAX + batch tables
    other = json.loads(open(parts[0]).read())
    other["meta"]["dtype"] = "bfloat16"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(other))
    with pytest.raises(bench.BenchError, match="cannot merge"):
        bench.merge_outputs([parts[1], str(bad)], str(tmp_path / "m"), "x")


def test_one_stats_schema_and_timer():
    """Both suites report every timed figure in one schema; measure interleaves JAX and PyTorch calls."""
    from vlmprune.bench import timing

    s = timing.stats([4.0, 1.0, 3.0, 2.0])
    assert s == {"median": 2.5, "min": 1.0, "max": 4.0, "n": 4, "spread": 0.6, "iqr": 1.5}
    assert timing.stats([]) is None and timing.median(s) == 2.5 and timing.median(None) is None
    calls = []
    js, ts = timing.measure(lambda: calls.append("j"), lambda: calls.append("t"), repeats=2, warmup=1)
    assert calls == ["j", "t"] * 3 and js["n"] == ts["n"] == 2
    rate, none = timing.measure(lambda: None, repeats=2, warmup=0, invert=5.0)
    assert none is None and rate["min"] > 5.0  # 5 tokens in far less than a second
