"""FastV inside the LLM against a PyTorch reference built from HF's own decoder layers (in-place variant:
layers >= K run on the kept tokens with their original positions; with a KV cache the selection is fixed at
prefill and later tokens attend to the kept set in layers >= K)."""

import chex
import numpy as np
import pytest
import torch

import vlmprune
from reference.hf_builders import build_hf_llava, demo_inputs
from vlmprune import prune

LOGITS_ATOL = 1e-4  # fp32 through the whole stack


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = build_hf_llava(tmp_path_factory.mktemp("fastv"), seed=7, vision_image_size=112, text_num_hidden_layers=4)
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
    return d, vlmprune.load(d), hf


def _fastv_reference(hf, embeds, img_slots, layer, keep, fixed=None):
    """Full-sequence in-place FastV forward in torch. Returns (logits of the kept sequence, kept slots)."""
    lm = hf.model.language_model
    n = embeds.shape[1]
    pos = torch.arange(n)[None]
    with torch.no_grad():
        out = lm(inputs_embeds=embeds, output_attentions=True, output_hidden_states=True)
        if fixed is None:
            scores = out.attentions[layer - 1][0, :, -1, :].mean(0)[img_slots]
            top = torch.topk(scores, keep).indices
            kept_img = img_slots[top]
            others = torch.tensor([s for s in range(n) if s not in set(img_slots.tolist())])
            slots = torch.sort(torch.cat([others, kept_img])).values
        else:
            slots = torch.cat([fixed, torch.arange(int(fixed.max()) + 1, n)])
        h = out.hidden_states[layer][:, slots]
        p = pos[:, slots]
        t = h.shape[1]
        causal = torch.full((t, t), float("-inf")).triu(1)[None, None]
        pe = lm.rotary_emb(h, p)
        for blk in lm.layers[layer:]:
            h = blk(h, attention_mask=causal, position_ids=p, position_embeddings=pe)
            h = h[0] if isinstance(h, tuple) else h
        return hf.lm_head(lm.norm(h)), slots


def test_fastv_logits_and_generation_match_reference(setup):
    d, model, hf = setup
    pruner = prune.FastV(layer=2, keep_ratio=0.25)
    x = demo_inputs(d)
    ids = torch.from_numpy(x["input_ids"])
    with torch.no_grad():
        embeds = hf.model.get_input_embeddings()(ids)
        feats = hf.model.get_image_features(pixel_values=torch.from_numpy(x["pixel_values"])).pooler_output[0]
        img_slots = (ids[0] == hf.config.image_token_id).nonzero()[:, 0]
        embeds[0, img_slots] = feats
    keep = pruner.kept_per_image(model.config)
    ref, slots = _fastv_reference(hf, embeds, img_slots, 2, keep)
    out = model(x["input_ids"], x["pixel_values"], pruner=pruner)
    assert out.logits.shape[1] == ids.shape[1] - 64 + keep == ref.shape[1]
    print("fastv max |logits - ref|:", np.abs(np.asarray(out.logits) - ref.detach().numpy()).max())
    chex.assert_trees_all_close(np.asarray(out.logits), ref.detach().numpy(), atol=LOGITS_ATOL, rtol=0)

    # Greedy decoding with the KV cache: the selection made at prefill stays fixed.
    ours = model.generate(x["input_ids"], x["pixel_values"], pruner=pruner, max_new_tokens=8)
    seq, toks = embeds, []
    for _ in range(8):
        logits, _ = _fastv_reference(hf, seq, img_slots, 2, keep, fixed=slots)
        tok = int(logits[0, -1].argmax())
        toks.append(tok)
        with torch.no_grad():
            seq = torch.cat([seq, hf.model.get_input_embeddings()(torch.tensor([[tok]]))], dim=1)
    np.testing.assert_array_equal(ours[0], np.array(toks))


def test_fastv_bad_settings(setup):
    d, model, _ = setup
    x = demo_inputs(d)
    with pytest.raises(ValueError, match="layer must be >= 1"):
        model(x["input_ids"], x["pixel_values"], pruner=prune.FastV(layer=0))
    with pytest.raises(ValueError, match="layer must be <= 3"):
        model(x["input_ids"], x["pixel_values"], pruner=prune.FastV(layer=4))
    with pytest.raises(ValueError, match="keep_ratio must be > 0"):
        model(x["input_ids"], x["pixel_values"], pruner=prune.FastV(keep_ratio=0.0))
