"""One processor batch through a loaded vlmprune model, and HF's greedy generation, as the parity tests call them.

A batch ``x`` is a dict of numpy arrays: ``input_ids`` and ``attention_mask`` (B, T), ``pixel_values`` and
``image_sizes`` (B, 2), what the HF processor returns with ``return_tensors="np"``.
"""

import numpy as np
import torch


def torch_batch(x: dict) -> dict:
    """The batch as torch tensors (contiguous copies where numpy's layout is not)."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in x.items()}


def model_call(model, x: dict, **kw):
    """``model(...)`` on the whole batch, attention mask included; ``kw``: pruner, text, ..."""
    return model(
        x["input_ids"], x["pixel_values"], image_sizes=x["image_sizes"], attention_mask=x["attention_mask"], **kw
    )


def model_generate(model, x: dict, **kw):
    """``model.generate(...)`` on the whole batch, attention mask included; ``kw``: max_new_tokens, pruner, ..."""
    return model.generate(
        x["input_ids"], x["pixel_values"], image_sizes=x["image_sizes"], attention_mask=x["attention_mask"], **kw
    )


def hf_greedy(hf, max_new_tokens: int, pad_token_id: int, **inputs) -> np.ndarray:
    """HF's greedy ``generate`` of exactly ``max_new_tokens`` tokens per row from ``inputs`` (torch tensors:
    ``input_ids`` or ``inputs_embeds``, ``attention_mask``, pixels, ... and any other generate option): the new
    tokens as numpy (B, max_new_tokens)."""
    with torch.no_grad():
        gen = hf.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
        )
    return gen[:, -max_new_tokens:].numpy()
