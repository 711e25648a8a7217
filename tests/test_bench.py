"""`vlmprune bench` smoke test on the tiny preset (1 repeat), plus its argument parsing and refusals."""

import json
import os

import numpy as np
import pytest

from vlmprune import bench


def test_bench_tiny_end_to_end(tmp_path):
    cfg = bench.BenchConfig(preset="tiny", methods=("none", "fastervlm:4"), repeats=1, warmup=0, batch=2,
                            max_new_tokens=3, compare_torch=True, out_dir=str(tmp_path / "out"), tag="smoke",
                            checkpoint_root=str(tmp_path / "ckpt"))
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


def test_parse_methods():
    runs = bench.parse_methods(["none", "vispruner:64,128", "hired:0.2", "visionzip:64",
                                "vispruner:32:important_ratio=0.25"])
    assert [r.label for r in runs] == ["none", "vispruner@64", "vispruner@128", "hired@0.2", "visionzip@64",
                                       "vispruner@32(important_ratio=0.25)"]
    assert runs[0].pruner is None
    assert runs[2].pruner.num_keep == 128 and runs[3].pruner.budget_rate == 0.2
    assert (runs[4].pruner.dominant, runs[4].pruner.contextual) == (54, 10)
    assert runs[5].pruner.important_ratio == 0.25
    with pytest.raises(bench.BenchError, match="unknown method 'nope'"):
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

    from vlmprune.checkpoint import _abstract
    from vlmprune.config import LlavaConfig
    from vlmprune.models.llava import Llava

    _, hf, _ = bench._hf_config(bench.PRESETS["tiny"])
    cfg = LlavaConfig.from_hf(hf)
    module = Llava(cfg, dtype=jnp.bfloat16)
    abstract = _abstract(module, cfg)
    params = bench._random_params(abstract, jnp.bfloat16, seed=0)
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    assert all(x.dtype == jnp.bfloat16 and x.shape == a.shape
               for x, a in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)))
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
