"""End to end with pruning: our pruned LLaVA-1.5 against the HF PyTorch language model fed the same pruned
sequence (kept projected features in raster order at the <image> position, contiguous positions)."""

import chex
import numpy as np
import pytest
import torch

import vlmprune
from reference.batch_calls import hf_greedy
from reference.hf_builders import build_hf_llava, demo_inputs
from vlmprune import prune
from vlmprune.prune.base import slot_count

LOGITS_ATOL = 1e-4  # fp32 through the whole stack, as the unpruned parity test


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = build_hf_llava(tmp_path_factory.mktemp("llava112"), seed=5, vision_image_size=112)
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
    return d, vlmprune.load(d), hf


def _hf_reference_embeds(hf, x, choose):
    """HF features/attention -> our pure selection function -> pruned inputs_embeds (torch)."""
    pix = torch.from_numpy(x["pixel_values"])
    with torch.no_grad():
        vo = hf.model.vision_tower(pix, output_hidden_states=True, output_attentions=True)
        feats = vo.hidden_states[-2][:, 1:]
        attn = vo.attentions[-2][:, :, 0, 1:]
        proj = hf.model.multi_modal_projector(feats)
        idx = np.asarray(choose(feats.numpy(), attn.numpy(), proj.numpy()))  # (1, K) ascending
        kept = proj[0, torch.from_numpy(idx[0]).long()]
        ids = torch.from_numpy(x["input_ids"][0])
        img = (ids == hf.config.image_token_id).nonzero()[:, 0]
        text = hf.get_input_embeddings()(ids)
        embeds = torch.cat([text[: img[0]], kept, text[img[-1] + 1 :]])[None]
    return embeds, idx


CASES = {
    "vispruner": (
        prune.VisPruner(num_keep=16, important_ratio=0.5),
        lambda f, a, p: prune.vispruner(f, a, num_keep=16, important_ratio=0.5).indices,
    ),
    "fastervlm": (prune.FasterVLM(num_keep=12), lambda f, a, p: prune.fastervlm(a, num_keep=12).indices),
    "hired": (prune.HiRED(budget_rate=0.25), lambda f, a, p: prune.hired_single(a, budget_rate=0.25).indices),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_pruned_logits_and_generation_match_hf_language_model(setup, method):
    d, model, hf = setup
    pruner, choose = CASES[method]
    x = demo_inputs(d)
    embeds, idx = _hf_reference_embeds(hf, x, choose)
    out = model(x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"], pruner=pruner)
    assert out.logits.shape[1] == embeds.shape[1] == x["input_ids"].shape[1] - 64 + idx.shape[1]
    assert bool(np.asarray(out.mask).all())
    with torch.no_grad():
        ref = hf(inputs_embeds=embeds).logits.numpy()
    print(method, "max |logits - HF|:", np.abs(np.asarray(out.logits) - ref).max())
    chex.assert_trees_all_close(np.asarray(out.logits), ref, atol=LOGITS_ATOL, rtol=0)

    ours = model.generate(x["input_ids"], x["pixel_values"], pruner=pruner, max_new_tokens=12)
    ones = torch.ones(embeds.shape[:2], dtype=torch.long)
    gen = hf_greedy(hf, 12, model.config.pad_token_id, inputs_embeds=embeds, attention_mask=ones)
    np.testing.assert_array_equal(ours, gen)


def test_pruned_batch_with_left_padding_matches_rows_run_alone(setup):
    d, model, _ = setup
    pruner = prune.VisPruner(num_keep=16, important_ratio=0.5)
    x = demo_inputs(d, prompts=("What is in the image?", "How many objects are there in the picture?"))
    both = model(x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"], pruner=pruner)
    for r in range(2):
        m = x["attention_mask"][r].astype(bool)
        alone = model(x["input_ids"][r : r + 1, m], x["pixel_values"][r : r + 1], pruner=pruner)
        got = np.asarray(both.logits[r])[np.asarray(both.mask[r])]
        chex.assert_trees_all_close(got, np.asarray(alone.logits[0]), atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(prune.REGISTRY))
def test_every_registered_method_runs_or_refuses_clearly(setup, name):
    d, model, _ = setup
    x = demo_inputs(d)
    kw = {"num_keep": 16} if "num_keep" in {f for f in prune.REGISTRY[name].__dataclass_fields__} else {}
    if name == "visionzip":
        kw = dict(dominant=12, contextual=4)
    if name == "fastv":
        kw = dict(layer=1, keep_ratio=0.25)
    pruner = prune.get(name, **kw)
    if name == "hero":
        with pytest.raises(ValueError, match="LLaVA-NeXT"):
            model(x["input_ids"], x["pixel_values"], pruner=pruner)
        return
    out = model(x["input_ids"], x["pixel_values"], pruner=pruner)
    k = pruner.kept_per_image(model.config) if name == "fastv" else slot_count(pruner, model.config, None, 64, 0)
    assert out.logits.shape[1] == x["input_ids"].shape[1] - 64 + k
    assert np.isfinite(np.asarray(out.logits)).all()


def test_pruner_compiles_once_per_config(setup):
    d, model, _ = setup
    x = demo_inputs(d)
    for s in range(3):
        model(x["input_ids"], x["pixel_values"] + 0.1 * s, pruner=prune.VisPruner(num_keep=16, important_ratio=0.5))
    before = model.compile_counts()["forward"]
    model(x["input_ids"], x["pixel_values"], pruner=prune.VisPruner(num_keep=16, important_ratio=0.5))
    assert model.compile_counts()["forward"] == before
    model(x["input_ids"], x["pixel_values"], pruner=prune.VisPruner(num_keep=8, important_ratio=0.5))
    assert model.compile_counts()["forward"] == before + 1


def test_bad_pruner_settings_raise_before_compiling(setup):
    d, model, _ = setup
    x = demo_inputs(d)
    before = model.compile_counts()["forward"]
    with pytest.raises(ValueError, match=r"num_keep must be <= 64"):
        model(x["input_ids"], x["pixel_values"], pruner=prune.VisPruner(num_keep=65))
    with pytest.raises(ValueError, match=r"num_keep must be >= 1"):
        model(x["input_ids"], x["pixel_values"], pruner=prune.FasterVLM(num_keep=0))
    with pytest.raises(ValueError, match="important_ratio must be <= 1"):
        model(x["input_ids"], x["pixel_values"], pruner=prune.VisPruner(num_keep=8, important_ratio=1.5))
    with pytest.raises(ValueError, match="budget_rate must be > 0"):
        model(x["input_ids"], x["pixel_values"], pruner=prune.HiRED(budget_rate=0.0))
    with pytest.raises(ValueError, match="layer=7 is out of range"):
        model(x["input_ids"], x["pixel_values"], pruner=prune.VisPruner(num_keep=8, layer=7))
    with pytest.raises(ValueError, match="vispruner: exact_similarity must be a bool"):
        model(x["input_ids"], x["pixel_values"], pruner=prune.VisPruner(num_keep=8, exact_similarity=1))
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune.get("nope")
    assert model.compile_counts()["forward"] == before
