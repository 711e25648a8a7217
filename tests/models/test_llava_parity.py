"""LLaVA-1.5 parity against HF transformers' PyTorch model (CPU, float32, highest matmul precision)."""

import chex
import numpy as np
import torch

import vlmprune
from reference.batch_calls import hf_greedy, torch_batch
from reference.hf_builders import demo_inputs

# fp32 tolerances: components see one or a few layers of fp32 rounding (~1e-6 relative) -> 1e-5;
# logits accumulate rounding over the whole vision + LLM stack -> 1e-4.
COMPONENT_ATOL = 1e-5
LOGITS_ATOL = 1e-4


def _hf(directory):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation="eager").eval()


def test_logits_match_hf(hf_llava_dir):
    model = vlmprune.load(hf_llava_dir)
    x = demo_inputs(hf_llava_dir, prompts=("What is in the image?", "Describe the picture in detail please."))
    out = model(x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"])
    with torch.no_grad():
        ref = _hf(hf_llava_dir)(**{k: torch.from_numpy(v) for k, v in x.items()}).logits.numpy()
    mask = np.asarray(out.mask)
    np.testing.assert_array_equal(mask, x["attention_mask"].astype(bool))
    diff = np.abs(np.asarray(out.logits) - ref)[mask]
    print("max |logits - HF|:", diff.max())
    chex.assert_trees_all_close(np.asarray(out.logits)[mask], ref[mask], atol=LOGITS_ATOL, rtol=0)


def test_vision_hidden_states_and_cls_attention_match_hf(hf_llava_dir):
    model = vlmprune.load(hf_llava_dir)
    x = demo_inputs(hf_llava_dir)
    n_layers = model.config.vision.num_hidden_layers
    ours = model.vision(x["pixel_values"], cls_attention_layers=tuple(range(n_layers)), output_hidden_states=True)
    hf = _hf(hf_llava_dir)
    with torch.no_grad():
        ref = hf.model.vision_tower(
            torch.from_numpy(x["pixel_values"]), output_hidden_states=True, output_attentions=True
        )
    assert len(ours["hidden_states"]) == len(ref.hidden_states) == n_layers + 1
    for i, h in enumerate(ref.hidden_states):
        chex.assert_trees_all_close(np.asarray(ours["hidden_states"][i]), h.numpy(), atol=COMPONENT_ATOL, rtol=0)
    for layer, a in enumerate(ref.attentions):
        chex.assert_trees_all_close(
            np.asarray(ours["cls_attn"][layer]), a[:, :, 0, 1:].numpy(), atol=COMPONENT_ATOL, rtol=0
        )


def test_greedy_generation_token_identical_to_hf(hf_llava_dir):
    model = vlmprune.load(hf_llava_dir)
    x = demo_inputs(hf_llava_dir, prompts=("What is in the image?", "How many objects are there in the picture?"))
    assert (x["attention_mask"] == 0).any(), "prompts of different lengths must be left padded"
    ours = model.generate(x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"], max_new_tokens=16)
    hf = _hf(hf_llava_dir)
    np.testing.assert_array_equal(ours, hf_greedy(hf, 16, model.config.pad_token_id, **torch_batch(x)))


def test_prefill_and_decode_compile_once_per_shape(mha_dir):
    model = vlmprune.load(mha_dir)
    x = demo_inputs(mha_dir, prompts=("What is in the image?", "Is there a cat on the table?"))
    for seed in range(3):  # different pixels and sampling seeds, same shapes
        pix = x["pixel_values"] + 0.01 * seed
        model.generate(
            x["input_ids"],
            pix,
            attention_mask=x["attention_mask"],
            max_new_tokens=6,
            do_sample=True,
            temperature=0.7 + 0.1 * seed,
            top_p=0.9,
            seed=seed,
        )
    counts = model.compile_counts()
    assert counts["prefill"] == 1 and counts["decode"] == 1, counts
