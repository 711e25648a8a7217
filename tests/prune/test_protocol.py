"""The stage boundaries: typed taps, the two pruner protocols, and a model with no method-specific branch."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vlmprune
from reference.paths import REPO_DIR
from vlmprune import prune
from vlmprune.demo import prepare_inputs
from vlmprune.tiny import demo_image, write_random_llava
from vlmprune.types import PruneResult, TapRequest, VisionTaps

ROOT = pathlib.Path(REPO_DIR) / "vlmprune"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return vlmprune.load(write_random_llava(str(tmp_path_factory.mktemp("protocol") / "tiny")))


@pytest.fixture(scope="module")
def inputs(model):
    return prepare_inputs(model, [demo_image()], ["What is in the image?"])


def test_model_and_pipeline_know_no_method():
    builtin = [c for c in prune.REGISTRY.values() if c.__module__.startswith("vlmprune.")]
    names = (
        [f'"{c.name}"' for c in builtin]
        + [f"'{c.name}'" for c in builtin]
        + [c.__name__ for c in builtin]
        + ["inside_llm", "next_layout_style", "hasattr(pruner", "auxiliary_clip(", "fastv", "hero"]
    )
    files = [ROOT / "model.py", *sorted((ROOT / "pipeline").glob("*.py")), ROOT / "models" / "text" / "llama.py"]
    for f in files:
        text = f.read_text()
        for name in names:
            if f.name == "model.py" and name == "auxiliary_clip(":
                continue  # the model offers the loader; it never calls it for a method
            assert name not in text, f"{f.name} mentions {name!r}"


def test_taps_name_the_missing_layer():
    taps = VisionTaps(features=jnp.zeros((1, 4, 2)), cls_attn={3: jnp.zeros((1, 2, 4))})
    assert taps.cls_attention(3).shape == (1, 2, 4) and taps.cls_attention().shape == (1, 2, 4)
    with pytest.raises(KeyError, match="CLS attention of layer 5 was not requested"):
        taps.cls_attention(5)
    with pytest.raises(KeyError, match="keys of layer 1"):
        taps.key(1)
    two = taps.replace(cls_attn={1: jnp.zeros((1, 2, 4)), 3: jnp.zeros((1, 2, 4))})
    with pytest.raises(ValueError, match="name the layer"):
        two.cls_attention()


def test_request_union_is_sorted_and_hashable():
    a = TapRequest(cls_attention_layers=(3, 1), projected=True)
    b = TapRequest(cls_attention_layers=(1, 2), key_layers=(0,))
    u = a.union(b)
    assert u.cls_attention_layers == (1, 2, 3) and u.key_layers == (0,) and u.projected
    assert hash(u) == hash(a.union(b)) and jax.tree.leaves(u) == []


def test_received_attention_refused_before_compile(model, inputs):
    @dataclasses.dataclass(frozen=True)
    class ColumnMean(prune.VisualPruner):
        name: ClassVar[str] = "column_mean_user"

        def request(self, cfg):
            return TapRequest(column_mean_layers=(0,))

        def budget(self, cfg, num_tiles):
            return prune.Budget(4)

    before = model.compile_counts()
    with pytest.raises(ValueError, match="column means are not provided by the CLIPVisionConfig tower"):
        model(inputs["input_ids"], inputs["pixel_values"], pruner=ColumnMean())
    assert model.compile_counts() == before


@flax.struct.dataclass
class _KeepEverySlot:
    """A decoder hook that keeps every slot: the generic path must then change nothing."""

    layer: int = flax.struct.field(pytree_node=False, default=1)

    def __call__(self, q, k, key_mask):
        b, t = key_mask.shape
        assert q.shape[:2] == (b, t) and k.shape[:2] == (b, t)
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


@dataclasses.dataclass(frozen=True)
class _IdentityInLLM(prune.LLMPruner):
    name: ClassVar[str] = "identity_in_llm"

    def decoder_hook(self, cfg, visual, images_per_row):
        return _KeepEverySlot()


def test_generic_decoder_hook_and_merged_tokens(model, inputs):
    ids, pix, am = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
    full = model(ids, pix, attention_mask=am)
    hooked = model(ids, pix, attention_mask=am, pruner=_IdentityInLLM())
    # the later layers rerun on gathered (identical) rows: fp32, same kernels, so equal up to summation order
    np.testing.assert_allclose(np.asarray(hooked.logits), np.asarray(full.logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(model.generate(ids, pix, attention_mask=am, max_new_tokens=3)),
        np.asarray(model.generate(ids, pix, attention_mask=am, max_new_tokens=3, pruner=_IdentityInLLM())),
    )

    @dataclasses.dataclass(frozen=True)
    class MeanToken(prune.VisualPruner):
        """One merged token per image: the mean of all patch features (a merging method's result)."""

        name: ClassVar[str] = "mean_token_user"

        def budget(self, cfg, num_tiles):
            return prune.Budget(1)

        def prune(self, taps, ctx):
            b = taps.features.shape[0]
            sel = prune.Selection(indices=jnp.zeros((b, 1), jnp.int32), valid=jnp.ones((b, 1), bool))
            mean = jnp.mean(taps.features, axis=1, keepdims=True)
            return PruneResult(selection=sel, tokens=mean, tokens_valid=jnp.ones((b, 1), bool))

    out = model(ids, pix, attention_mask=am, pruner=MeanToken())
    n = model.config.tokens_per_image
    assert int(out.mask.sum()) == int(full.mask.sum()) - n + 1
