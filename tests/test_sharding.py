"""Sharded runs on 8 virtual CPU devices (a subprocess, so XLA sees the device count before jax starts) give the
same logits and generations as one device, with and without pruning."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import sys
    import jax
    import numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, "tests")
    import vlmprune
    from vlmprune import prune
    from conftest import demo_inputs
    from jax.sharding import NamedSharding

    path = sys.argv[1]
    assert len(jax.devices()) == 8, jax.devices()
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    one = vlmprune.load(path)
    many = vlmprune.load(path, mesh=mesh)
    q = many.params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q.sharding, NamedSharding) and q.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 4)
    x = demo_inputs(path, prompts=("What is in the image?", "How many objects are there?"))
    for pruner in (None, prune.VisPruner(num_keep=8, important_ratio=0.5)):
        a = one(x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"], pruner=pruner)
        b = many(x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"], pruner=pruner)
        m = np.asarray(a.mask)
        # fp32, different reduction order across shards: ~1e-6 relative
        np.testing.assert_allclose(np.asarray(b.logits)[m], np.asarray(a.logits)[m], atol=1e-4, rtol=0)
        ga = one.generate(x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"], pruner=pruner,
                          max_new_tokens=8)
        gb = many.generate(x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"], pruner=pruner,
                           max_new_tokens=8)
        np.testing.assert_array_equal(ga, gb)
    print("SHARDED-OK")
''')


def test_sharded_forward_and_generation_match_single_device(mha_dir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", SCRIPT, mha_dir], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "SHARDED-OK" in res.stdout


def test_mesh_is_validated():
    import jax
    import numpy as np
    import pytest
    from jax.sharding import AxisType, Mesh

    from vlmprune.sharding import param_spec, shard_params

    with pytest.raises(ValueError, match="must be a jax.sharding.Mesh"):
        shard_params({}, "mesh")
    dev = np.array(jax.devices()[:1]).reshape(1, 1)
    with pytest.raises(ValueError, match="named 'data' and/or 'model'"):
        shard_params({}, Mesh(dev, ("rows", "cols"), axis_types=(AxisType.Auto,) * 2))
    with pytest.raises(ValueError, match="AxisType.Auto"):
        shard_params({}, Mesh(dev, ("data", "model"), axis_types=(AxisType.Explicit,) * 2))
    mesh = Mesh(dev, ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    assert param_spec("language_model/layers_0/mlp/down_proj/kernel", (8, 4), mesh) == jax.sharding.PartitionSpec("model", None)
    assert param_spec("language_model/norm/weight", (4,), mesh) == jax.sharding.PartitionSpec()
