"""Tiny random HF LLaVA-OneVision checkpoints (SigLIP + Qwen2), shared by the OneVision tests."""

import torch

VOCAB, IMAGE, PAD = 120, 100, 0
TILE = 28  # 7-px patches: 4 x 4 tokens per tile


def build_hf_onevision(
    directory, aspect, tied, seed=0, vocab=VOCAB, image=IMAGE, video=101, pad=PAD, tile=TILE, patch=7, kv_heads=2
):
    """Save a seeded random ``LlavaOnevisionForConditionalGeneration`` (eager attention, every weight perturbed)
    to ``directory`` and return it; ``kv_heads`` < 4 makes the Qwen2 attention grouped-query."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    vision = dict(
        model_type="siglip_vision_model",
        image_size=tile,
        patch_size=patch,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        vision_use_head=False,
    )
    text = dict(
        model_type="qwen2",
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rope_theta=1e6,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad,
    )
    cfg = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image,
        video_token_index=video,
        vision_aspect_ratio=aspect,
        tie_word_embeddings=tied,
        image_grid_pinpoints=[[tile * a, tile * b] for a in (1, 2, 3) for b in (1, 2, 3)],
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # HF's init leaves biases at 0, norms at 1 and the newline at 0: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    return model


def build_hf_onevision_with_processor(directory, aspect="anyres_max_2", tied=False, seed=3):
    """``build_hf_onevision`` plus the tokenizer and image processor files (SigLIP's mean/std 0.5, not the class
    defaults), as a real checkpoint ships them. Returns the HF model."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from vlmprune.tiny import CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    tok.chat_template = CHAT_TEMPLATE
    image, video = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<video>")
    hf = build_hf_onevision(
        directory, aspect, tied, seed=seed, vocab=len(tok), image=image, video=video, pad=tok.pad_token_id
    )
    LlavaOnevisionImageProcessorPil(
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"height": TILE, "width": TILE},
        image_grid_pinpoints=hf.config.image_grid_pinpoints,
    ).save_pretrained(directory)
    tok.save_pretrained(directory)
    return hf
