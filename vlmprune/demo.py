"""The embedded default: an offline end-to-end run on a tiny random-weight LLaVA-1.5.

Builds (once) a small random LLaVA-1.5 in the real HF format under ``checkpoints/``, runs the whole pipeline
(processor -> CLIP -> pruning -> projector -> LLaMA prefill -> KV-cache decode) on the image that ships with the
package, with and without pruning, and prints visual tokens, analytic prefill FLOPs, time to first token and
decode throughput.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np

import vlmprune
from vlmprune import prune
from vlmprune.flops import prefill_macs
from vlmprune.model import sample_token
from vlmprune.prune.base import slot_count
from vlmprune.tiny import demo_image, is_tiny_checkpoint, write_random_llava

DEFAULT_DIR = os.path.join("checkpoints", "tiny-llava-1.5")
DEMO_PROMPT = "What is in the image?"


def log(msg: str) -> None:
    print(f"[vlmprune] {msg}", file=sys.stderr, flush=True)


def ensure_tiny_checkpoint(
    directory: str = DEFAULT_DIR, *, overwrite: bool = False, flag: str = "overwrite=True"
) -> str:
    """Build the tiny random checkpoint once; reuse it afterwards.

    A directory is reused only when it is a complete tiny checkpoint written by vlmprune; it is built only into
    an absent or empty directory (or over an incomplete tiny checkpoint). Any other directory (a real
    checkpoint, sharded or not) is refused with ``OutputExistsError`` and left untouched unless ``overwrite``.
    """

    if not overwrite and is_tiny_checkpoint(directory):
        return directory
    log(f"building a tiny random-weight LLaVA-1.5 (HF format) in {directory} ...")
    t = time.perf_counter()
    write_random_llava(
        directory,
        seed=0,
        overwrite=overwrite,
        flag=flag,
        vision_image_size=112,
        vision_num_hidden_layers=4,
        text_num_hidden_layers=4,
        text_hidden_size=128,
        text_intermediate_size=256,
    )
    log(f"built in {time.perf_counter() - t:.1f}s")
    return directory


def prepare_inputs(model, images, prompts):
    """Processor outputs (numpy) for (image, prompt) pairs using the checkpoint's chat template."""
    if model.processor is None:
        raise ValueError("this checkpoint has no processor/tokenizer files; pass input_ids and pixel_values yourself")
    proc = model.processor
    texts = [
        proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True
        )
        for p in prompts
    ]
    return dict(proc(images=list(images), text=texts, return_tensors="np", padding=True))


def timed_generate(model, x, *, pruner=None, max_new_tokens=16, repeats=3):
    """Median time to first token (prefill + first sample) and decode tokens/s, after one warm-up run."""
    ttft, tps, out = [], [], None
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        logits, cache, pos, plan = model.prefill(
            x["input_ids"],
            x["pixel_values"],
            attention_mask=x["attention_mask"],
            pruner=pruner,
            max_new_tokens=max_new_tokens,
        )
        first = sample_token(logits, None, do_sample=False, temperature=1.0, top_p=1.0)
        jax.block_until_ready(first)
        t1 = time.perf_counter()
        out = model.decode(
            logits, cache, pos, plan, max_new_tokens=max_new_tokens, stop_at_eos=False
        )  # no EOS stop: time a fixed number of steps
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        if i:  # the first run compiles
            ttft.append(t1 - t0)
            tps.append((max_new_tokens - 1) / (t2 - t1))
    return float(np.median(ttft)), float(np.median(tps)), np.asarray(out), plan


def run_demo(
    directory: str | None = None,
    *,
    methods=None,
    max_new_tokens: int = 16,
    overwrite: bool = False,
    flag: str = "overwrite=True",
) -> list[dict]:

    directory = ensure_tiny_checkpoint(directory or DEFAULT_DIR, overwrite=overwrite, flag=flag)
    log(f"loading {directory} ...")
    model = vlmprune.load(directory)
    x = prepare_inputs(model, [demo_image()], [DEMO_PROMPT])
    n_text = int((x["input_ids"][0] != model.config.image_token_id).sum())
    methods = methods if methods is not None else demo_methods(model)
    rows = []
    for label, pruner in methods:
        log(f"running {label} (compile + {3} timed runs) ...")
        kept = slot_count(pruner, model.config, None, model.config.tokens_per_image, 0)
        ttft, tps, out, _ = timed_generate(model, x, pruner=pruner, max_new_tokens=max_new_tokens)
        t = model.config.text
        macs = prefill_macs(n_text + kept, t.hidden_size, t.intermediate_size, t.num_hidden_layers)
        text = model.processor.tokenizer.decode(out[0], skip_special_tokens=True)
        rows.append(
            dict(method=label, visual_tokens=kept, prefill_macs=macs, ttft_ms=ttft * 1e3, decode_tok_s=tps, text=text)
        )
    print_table(rows)
    print(
        "\nNote: this checkpoint has random weights, so the generated text is meaningless. To run a real model,\n"
        "convert or point at a llava-hf checkpoint directory, e.g.\n"
        "  vlmprune generate --model /path/to/llava-1.5-7b-hf --image photo.jpg --prompt 'Describe it.' "
        "--method vispruner --keep 64"
    )
    return rows


def demo_methods(model):

    n = model.config.tokens_per_image
    out = [("none", None)]
    for name, kw in prune.demo_settings(n):
        out.append((f"{name}({', '.join(f'{k}={v}' for k, v in kw.items())})", prune.get(name, **kw)))
    return out


def print_table(rows):
    head = f"{'method':<44} {'visual tokens':>13} {'prefill MACs':>13} {'TTFT ms':>9} {'decode tok/s':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['method']:<44} {r['visual_tokens']:>13} {r['prefill_macs'] / 1e6:>11.2f} M {r['ttft_ms']:>9.2f} "
            f"{r['decode_tok_s']:>12.1f}"
        )
    print(f"\nsample output ({rows[0]['method']}): {rows[0]['text']!r}")
