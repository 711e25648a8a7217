"""Tiny random HF checkpoints and processor inputs shared by the tests (written with transformers' own
``save_pretrained``, loaded through the same code path as a real checkpoint)."""

import json
import os
import shutil


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


def demo_inputs(directory, prompts=("What is in the image?",), images=None):
    """Processor outputs (numpy) for a batch of prompts, one demo image each, left padded."""
    from transformers import AutoProcessor

    from vlmprune.tiny import demo_image

    proc = AutoProcessor.from_pretrained(directory)
    texts = [
        proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True
        )
        for p in prompts
    ]
    if images is None:
        base = demo_image()
        images = [base.rotate(17 * i) for i in range(len(prompts))]
    return dict(proc(images=images, text=texts, return_tensors="np", padding=True))


def sharded_copy(src, dst):
    """A copy of a HF checkpoint re-saved as two shards with an index (what a real 7B directory looks like)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    t = load_file(os.path.join(dst, "model.safetensors"))
    os.remove(os.path.join(dst, "model.safetensors"))
    keys = sorted(t)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for fn, ks in halves.items():
        save_file({k: t[k] for k in ks}, os.path.join(dst, fn), metadata={"format": "pt"})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: fn for fn, ks in halves.items() for k in ks}}, f)
    return str(dst)


def build_hf_llava_next(directory, seed=0):
    """Random HF LlavaNextForConditionalGeneration (tiles of 56 px, 16 tokens each, 3 vision layers), saved with
    save_pretrained, plus processor files."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    from vlmprune.tiny import build_next_processor, build_tokenizer, tiny_llava_next_config

    tok = build_tokenizer()
    cfg = tiny_llava_next_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF's init leaves norms at 1/0: perturb every parameter so each one is tested
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(directory)
    build_next_processor(tok, cfg).save_pretrained(directory)
    return str(directory)


def build_hf_clip(directory, image_size=56, seed=0):
    """A tiny full HF CLIP (both towers, patch 14) with the demo tokenizer, as HERO's ``clip_path``."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from vlmprune.tiny import build_tokenizer

    tok = build_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            eos_token_id=2,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=14,
        ),
        projection_dim=24,
    )
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)
