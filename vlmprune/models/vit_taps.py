"""The part of a vision tower's forward that CLIP and SigLIP share: reading the tap requests and running the
encoder layers while collecting what was asked for.

A request names layers by HF's numbering (negative allowed): ``hidden_state_layers`` index HF's
``hidden_states`` tuple (0 = embeddings, i = output of encoder layer i-1), every other request indexes the
encoder layers (0-based). :func:`resolve_requests` turns them into sorted 0-based indices and the number of
layers the forward has to run; :func:`run_layers` runs them, passing each layer one boolean keyword per
request (``layer(x, keys=True, ...)``) and keeping its non-None extra outputs.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping

import jax

Array = jax.Array


def resolve_layer(where: str, name: str, layer, num_layers: int) -> int:
    """A (possibly negative) Python int layer index -> 0-based index in ``[0, num_layers)``, or a ValueError
    naming the tower (``where``), the request (``name``) and the valid range."""
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise ValueError(f"{where}: {name} must hold Python ints, got {layer!r}")
    idx = int(layer) + num_layers if layer < 0 else int(layer)
    if not 0 <= idx < num_layers:
        raise ValueError(f"{where}: {name} index {layer} is out of range [-{num_layers}, {num_layers - 1}]")
    return idx


def resolve_requests(
    where: str,
    num_hidden_layers: int,
    hidden_state_layers,
    layer_requests: Mapping[str, tuple],
    num_layers,
    *,
    run_all: bool,
) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]], int]:
    """A tower's requests -> ``(hidden-state indices, {request: encoder-layer indices}, layers to run)``.

    Args:
      where: the tower's name, for the messages.
      num_hidden_layers: L, the tower's encoder layers.
      hidden_state_layers: indices into HF's ``hidden_states`` (L + 1 entries).
      layer_requests: request name -> encoder layer indices (L entries), e.g. ``{"key_layers": (-2,)}``.
      num_layers: None (run as many layers as the requests need) or a Python int in ``[needed, L]``.
      run_all: run every layer whatever the requests (all hidden states, post-layernorm outputs).

    Every index tuple comes back sorted, without repeats. Raises ValueError naming a bad index or num_layers.
    """
    L = num_hidden_layers
    hs_idx = tuple(sorted({resolve_layer(where, "hidden_state_layers", i, L + 1) for i in hidden_state_layers}))
    idx = {
        name: tuple(sorted({resolve_layer(where, name, i, L) for i in layers}))
        for name, layers in layer_requests.items()
    }
    need = L if run_all else max([0, *hs_idx] + [i + 1 for layers in idx.values() for i in layers])
    if num_layers is None:
        return hs_idx, idx, need
    if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral):
        raise ValueError(f"{where}: num_layers must be a Python int, got {num_layers!r}")
    if not need <= num_layers <= L:
        raise ValueError(
            f"{where}: num_layers {num_layers} must be in [{need}, {L}] (the requested outputs need {need} layers)"
        )
    return hs_idx, idx, int(num_layers)


def run_layers(
    tower,
    x: Array,
    make_layer: Callable[[int], Callable],
    num_hidden_layers: int,
    n_run: int,
    hs_idx: tuple[int, ...],
    flags: Mapping[str, tuple[int, ...]],
    *,
    output_hidden_states: bool,
) -> tuple[Array, dict[int, Array], dict[str, dict[int, object]]]:
    """Run the first ``n_run`` encoder layers of ``tower`` (a flax module, inside its compact ``__call__``).

    Args:
      x: (B, N, D) embeddings (HF's ``hidden_states[0]``).
      make_layer: i -> the encoder layer module named ``layers_{i}``, built by the caller inside its compact
        method; called ``layer(x, **{flag: i in flags[flag]})`` it returns ``(x, *extras)``, one extra (or None)
        per flag in the order of ``flags``.
      hs_idx: HF hidden-state indices to keep (all of them with ``output_hidden_states``).
      flags: layer keyword -> the encoder layers where it is True.

    Returns ``(x after layer n_run - 1, {hf_index: (B, N, D)}, {flag: {layer: extra}})``, the extras that were
    not None. At init every layer is built (so the param tree is complete), the ones past ``n_run`` without
    being part of the result.
    """
    hidden: dict[int, Array] = {}
    extras: dict[str, dict[int, object]] = {flag: {} for flag in flags}
    if output_hidden_states or 0 in hs_idx:
        hidden[0] = x
    for i in range(num_hidden_layers):
        layer = make_layer(i)
        if i >= n_run:
            if tower.is_initializing():  # build the full param tree without running the layer
                layer(x)
            continue
        x, *outs = layer(x, **{flag: i in idx for flag, idx in flags.items()})
        for flag, out in zip(flags, outs, strict=True):
            if out is not None:
                extras[flag][i] = out
        if output_hidden_states or (i + 1) in hs_idx:
            hidden[i + 1] = x
    return x, hidden, extras
