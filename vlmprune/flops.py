"""Analytic LLM prefill cost, the convention of this literature (``docs/methods.md`` §6).

Per decoder layer with ``n`` tokens, hidden size ``d`` and FFN width ``m`` (FastV's estimate, used verbatim by
DivPrune's ``tflops.py``):

    F_layer(n) = 4·n·d² + 2·n²·d + k·n·d·m        (k = 2: "2ndm", FastV/DivPrune; k = 3: "3ndm", SwiGLU's 3 matrices)

These are multiply-accumulate counts; norms, softmax, RoPE, embeddings and the LM head are ignored. Pre-LLM
pruning sets ``n = n_text + n_visual_kept`` for every layer; FastV-style pruning after layer K uses
``K·F(n) + (L−K)·F(n − dropped)``.
"""

from __future__ import annotations


def layer_macs(n: int, d: int, m: int, *, ffn: str = "2ndm") -> int:
    """One decoder layer's multiply-accumulates for n tokens."""
    if ffn not in ("2ndm", "3ndm"):
        raise ValueError(f"ffn must be '2ndm' or '3ndm', got {ffn!r}")
    k = 2 if ffn == "2ndm" else 3
    return 4 * n * d * d + 2 * n * n * d + k * n * d * m


def prefill_macs(
    n_tokens: int,
    d: int,
    m: int,
    num_layers: int,
    *,
    ffn: str = "2ndm",
    drop_after_layer: int | None = None,
    dropped: int = 0,
) -> int:
    """Whole-prefill MACs: every layer sees n_tokens, or (FastV) layers >= drop_after_layer see n - dropped."""
    if n_tokens < 0 or dropped < 0 or dropped > n_tokens:
        raise ValueError(f"invalid token counts: n_tokens={n_tokens}, dropped={dropped}")
    if drop_after_layer is None:
        return num_layers * layer_macs(n_tokens, d, m, ffn=ffn)
    k = drop_after_layer
    return k * layer_macs(n_tokens, d, m, ffn=ffn) + (num_layers - k) * layer_macs(n_tokens - dropped, d, m, ffn=ffn)


def reduction(kept_macs: int, full_macs: int) -> float:
    """Fractional FLOPs reduction 1 - kept/full."""
    return 1.0 - kept_macs / full_macs
