"""Shared fixtures: tiny random HF LLaVA checkpoints written with transformers' own ``save_pretrained``.

Every model is seeded, saved in the real HF format, and loaded by ``vlmprune.load`` through the same code path a
real ``llava-hf/*`` directory takes. Parity runs on CPU in float32 with the highest matmul precision.
"""



import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# Config variants exercised by the parity tests: multi-head vs grouped-query attention, feature layer -2 / -1,
# select strategy "default" / "full".
CONFIGS = {
    "mha_default": dict(),
    "gqa_full": dict(text_num_key_value_heads=2, vision_feature_layer=-1, vision_feature_select_strategy="full",
                     text_rope_theta=5000.0),
}


def build_hf_llava(directory, seed=0, **overrides):
    """Random HF LlavaForConditionalGeneration (torch), saved with save_pretrained, plus processor files."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from vlmprune.tiny import build_processor, build_tokenizer, tiny_llava_config

    tok = build_tokenizer()
    cfg = tiny_llava_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, **overrides)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF's init leaves norms at 1/0: perturb every parameter so each one is tested
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(directory)
    build_processor(tok, cfg).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def hf_llava_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return build_hf_llava(d, seed=1, **CONFIGS[request.param])


@pytest.fixture(scope="session")
def mha_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mha")
    return build_hf_llava(d, seed=3)


def demo_inputs(directory, prompts=("What is in the image?",), images=None):
    """Processor outputs (numpy) for a batch of prompts, one demo image each, left padded."""
    from transformers import AutoProcessor

    from vlmprune.tiny import demo_image

    proc = AutoProcessor.from_pretrained(directory)
    texts = [
        proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                                 add_generation_prompt=True)
        for p in prompts
    ]
    if images is None:
        base = demo_image()
        images = [base.rotate(17 * i) for i in range(len(prompts))]
    return dict(proc(images=images, text=texts, return_tensors="np", padding=True))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
