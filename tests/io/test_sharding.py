"""Sharded runs on 8 virtual CPU devices (a subprocess, so XLA sees the device count before jax starts) give the
same logits and generations as one device, with and without pruning."""

import os
import subprocess
import sys
import textwrap

import pytest

from reference.paths import REPO_DIR

SCRIPT = textwrap.dedent("""
    import sys
    import tempfile
    import jax
    import numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, "tests")
    import vlmprune
    from vlmprune import prune
    from vlmprune.models.llava import sharding_rules
    from vlmprune.sharding import check_mesh, param_spec
    from reference.hf_builders import demo_inputs
    from flax.traverse_util import flatten_dict
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    path = sys.argv[1]
    assert len(jax.devices()) == 8, jax.devices()
    auto = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    default = jax.make_mesh((2, 4), ("data", "model"))  # this jax's default: explicit axis types
    assert all(t == AxisType.Explicit for t in default.axis_types), default.axis_types
    one = vlmprune.load(path)
    x = demo_inputs(path, prompts=("What is in the image?", "How many objects are there?"))

    def check_placed(model, mesh):
        # every leaf arrives with the NamedSharding its family's rule gives (on the Auto form of the mesh)
        rules, mesh = sharding_rules(model.config), check_mesh(mesh)
        split = 0
        for k, leaf in flatten_dict(model.params).items():
            spec = param_spec("/".join(k), leaf.shape, mesh, rules)
            assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh, k
            assert leaf.sharding.spec == spec, (k, leaf.sharding.spec, spec)
            n = int(np.prod([mesh.shape[a] for a in spec if a is not None]))
            assert leaf.addressable_shards[0].data.size * n == leaf.size, k
            split += n > 1
        assert split >= 2 * model.config.text.num_hidden_layers, split  # at least q/k/v/... of every layer
        q = model.params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
        assert q.sharding.spec == PartitionSpec(None, "model")
        assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 4)

    def check_same(many, pruners, generate=True):
        for pruner in pruners:
            a = one(x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"], pruner=pruner)
            b = many(x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"], pruner=pruner)
            m = np.asarray(a.mask)
            # fp32, different reduction order across shards: ~1e-6 relative on O(1) logits
            np.testing.assert_allclose(np.asarray(b.logits)[m], np.asarray(a.logits)[m], atol=1e-4, rtol=0)
            if generate:
                ga = one.generate(x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"],
                                  pruner=pruner, max_new_tokens=8)
                gb = many.generate(x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"],
                                   pruner=pruner, max_new_tokens=8)
                np.testing.assert_array_equal(ga, gb)

    many = vlmprune.load(path, mesh=auto)
    check_placed(many, auto)
    check_same(many, (None, prune.VisPruner(num_keep=8, important_ratio=0.5)))
    print("AUTO-OK")

    many = vlmprune.load(path, mesh=default)
    check_placed(many, default)
    check_same(many, (None,))
    print("DEFAULT-MESH-OK")

    with tempfile.TemporaryDirectory() as d:  # orbax: saved from shards, restored straight into shards
        many.save(d)
        again = vlmprune.load(d, mesh=auto)
        check_placed(again, auto)
        for k, leaf in flatten_dict(again.params).items():
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flatten_dict(many.params)[k]))
        print("ORBAX-OK")

        # bfloat16 from the float32 files (safetensors: cast on the host then split; orbax: cast while restoring
        # into the shards): the same bits as the cast on one device
        for src in (path, d):
            b1, b8 = vlmprune.load(src, dtype="bfloat16"), vlmprune.load(src, dtype="bfloat16", mesh=auto)
            check_placed(b8, auto)
            for k, leaf in flatten_dict(b8.params).items():
                want = np.asarray(flatten_dict(b1.params)[k])
                assert leaf.dtype == want.dtype, k
                np.testing.assert_array_equal(np.asarray(leaf).view(np.uint16), want.view(np.uint16))
    print("SHARDED-OK")
""")


@pytest.mark.slow
def test_sharded_forward_and_generation_match_single_device(mha_dir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = REPO_DIR
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, mha_dir], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "SHARDED-OK" in res.stdout


def test_mesh_is_validated():
    import jax
    import numpy as np
    import pytest
    from jax.sharding import AxisType, Mesh

    from vlmprune.models.llava import PROJECTOR_SHARDING
    from vlmprune.sharding import check_mesh, param_spec, shard_params

    with pytest.raises(ValueError, match="must be a jax.sharding.Mesh"):
        shard_params({}, "mesh", [])
    dev = np.array(jax.devices()[:1]).reshape(1, 1)
    with pytest.raises(ValueError, match="named 'data' and/or 'model'"):
        shard_params({}, Mesh(dev, ("rows", "cols"), axis_types=(AxisType.Auto,) * 2), [])
    explicit = Mesh(dev, ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    auto = check_mesh(explicit)
    assert auto.axis_types == (AxisType.Auto,) * 2 and auto.axis_names == explicit.axis_names
    assert (auto.devices == explicit.devices).all()
    assert check_mesh(auto) is auto
    mesh = Mesh(dev, ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    rules = PROJECTOR_SHARDING
    spec = param_spec("multi_modal_projector/linear_2/kernel", (8, 4), mesh, rules)
    assert spec == jax.sharding.PartitionSpec("model", None)
    assert param_spec("multi_modal_projector/linear_2/bias", (4,), mesh, rules) == jax.sharding.PartitionSpec()
