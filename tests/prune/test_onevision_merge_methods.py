"""VisionZip and PruMerge(+) on LLaVA-OneVision [PROPOSED] (docs/methods.md §9.3): per tile, no CLS slot, the
received attention of the tower's last layer in place of the CLS row, merged tiles packed tile by tile (base tile
first, the spatial-compat layout of §9.4 mode A).

* ``visionzip_no_cls`` against a literal NumPy transcription of the rule (float64) on random inputs;
* end to end on tiny random HF OneVision checkpoints: the pruned model's logits equal HF's language model fed the
  same pruned sequence built from HF's own tower outputs (hidden states, eager attentions, a ``k_proj`` hook) and
  HF's projector, and greedy generation equals HF's generate on it, for a batch of two image sizes;
* bad settings are refused, by name, before anything compiles.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import vlmprune
from reference.batch_calls import hf_greedy
from reference.onevision_builders import IMAGE, PAD, TILE, build_hf_onevision
from vlmprune import prune
from vlmprune.anyres.onevision import geometry, image_layout
from vlmprune.prune.baselines import prumerge_plus, visionzip_no_cls

jax.config.update("jax_default_matmul_precision", "highest")

LOGITS_ATOL = 1e-4  # fp32 end to end (tower, merge, projector, decoder) vs torch fp32 on CPU
RECEIVED_ATOL = 1e-6  # fp32 received attention vs HF eager: entries up to ~0.3 here, each probability a few fp32 ulps
# (~3e-8) off after exp and normalisation in another order; test_siglip holds the tap to the same 1e-6
SIZES = [(40, 90), (110, 35)]  # a 1x2 and a 3x1 grid at the 28-px tile


# ----------------------------------------------------------------------------------------------- the pure rule


def ref_visionzip_no_cls(hidden, received, keys, dominant, contextual):
    """VisionZip without CLS on one tile, in float64: hidden (N, C), received (H, N), keys (N, H, dh) ->
    (tokens (dominant + contextual, C), sorted anchor ids)."""
    hidden, received, keys = (np.asarray(a, np.float64) for a in (hidden, received, keys))
    n = hidden.shape[0]
    score = received.mean(axis=0)
    dom = sorted(np.argsort(-score, kind="stable")[:dominant].tolist())
    rest = [i for i in range(n) if i not in dom]
    out = [hidden[i] for i in dom]
    anchors = list(dom)
    if contextual:
        r = len(rest)
        step = max(1, r // contextual)
        targets = list(range(0, r, step))[:contextual]
        others = [i for i in range(r) if i not in targets]
        metric = keys.mean(axis=1)[rest]
        metric = metric / np.linalg.norm(metric, axis=1, keepdims=True)
        groups = {t: [] for t in range(contextual)}
        for o in others:
            sims = [metric[o] @ metric[targets[t]] for t in range(contextual)]
            groups[int(np.argmax(sims))].append(rest[o])
        for t in range(contextual):
            members = groups[t]
            merged = np.mean([hidden[m] for m in members], axis=0) if members else 0.0
            out.append(hidden[rest[targets[t]]] + merged)
            anchors.append(rest[targets[t]])
    return np.stack(out), sorted(anchors)


@pytest.mark.parametrize(
    "n, dominant, contextual, seed",
    [(16, 5, 3, 0), (16, 1, 15, 1), (16, 16, 0, 2), (49, 10, 4, 3), (49, 30, 19, 4), (729, 54, 10, 5)],
)
def test_visionzip_no_cls_matches_numpy_transcription(n, dominant, contextual, seed):
    rng = np.random.default_rng(seed)
    b, c, heads, dh = 3, 6, 4, 5
    hidden = rng.normal(size=(b, n, c)).astype(np.float32)
    logits = 2.0 * rng.standard_t(3, size=(b, heads, 32, n))  # 32 query rows are enough for a test input
    p = np.exp(logits - logits.max(-1, keepdims=True))
    received = (p / p.sum(-1, keepdims=True)).mean(axis=2).astype(np.float32)  # (B, H, N), mean over queries
    keys = rng.normal(size=(b, n, heads, dh)).astype(np.float32)
    res = visionzip_no_cls(
        jnp.asarray(hidden), jnp.asarray(received), jnp.asarray(keys), dominant=dominant, contextual=contextual
    )
    assert res.tokens.shape == (b, dominant + contextual, c) and np.asarray(res.valid).all()
    # A merged token is a float32 sum of at most N - dominant rows divided by their count, plus the target: the
    # recursive-sum error is at most (N - 1)·eps·max|x| (the division and the addition add one rounding each).
    bound = (n + 1) * np.finfo(np.float32).eps * np.abs(hidden).max()
    for i in range(b):
        tokens, anchors = ref_visionzip_no_cls(hidden[i], received[i], keys[i], dominant, contextual)
        assert np.asarray(res.selection.indices[i]).tolist() == anchors  # exact selection
        np.testing.assert_array_equal(res.tokens[i, :dominant], tokens[:dominant].astype(np.float32))  # copies
        chex.assert_trees_all_close(np.asarray(res.tokens[i]), tokens.astype(np.float32), atol=bound, rtol=0)


def test_visionzip_no_cls_refuses_bad_arguments():
    h, a, k = jnp.zeros((1, 16, 4)), jnp.full((1, 2, 16), 1 / 16), jnp.ones((1, 16, 2, 3))
    with pytest.raises(ValueError, match="dominant"):
        visionzip_no_cls(h, a, k, dominant=0, contextual=1)
    with pytest.raises(ValueError, match="contextual"):
        visionzip_no_cls(h, a, k, dominant=16, contextual=1)  # no CLS slot: at most N - dominant
    with pytest.raises(ValueError, match="keys tokens N"):
        visionzip_no_cls(h, a, k[:, :15], dominant=4, contextual=1)


# ----------------------------------------------------------------------------------------------- end to end

# one checkpoint: the spatial-compat layout never downsamples, so the anyres_max variant does not matter here
VARIANTS = {"max2_tied": ("anyres_max_2", True)}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def models(request, tmp_path_factory):
    aspect, tied = VARIANTS[request.param]
    d = tmp_path_factory.mktemp(request.param)
    hf = build_hf_onevision(d, aspect, tied, seed=2)
    return request.param, vlmprune.load(str(d)), hf


def _batch(model, seed):
    """Left-padded batch of two images with different grids (HF's placeholder convention), tiles padded."""
    rng = np.random.default_rng(seed)
    geom = geometry(model.config)
    lays = [image_layout(s, geom) for s in SIZES]
    t_max = max(lay.num_tiles for lay in lays)
    pix = np.zeros((2, t_max, 3, TILE, TILE), np.float32)
    for i, lay in enumerate(lays):
        pix[i, : lay.num_tiles] = rng.standard_normal((lay.num_tiles, 3, TILE, TILE))
    rows = [[5, 6] + [IMAGE] * lays[0].num_tokens + [7, 8, 9], [11] + [IMAGE] * lays[1].num_tokens + [12, 13]]
    length = max(map(len, rows))
    ids = np.full((2, length), PAD, np.int64)
    mask = np.zeros((2, length), np.int64)
    for r, row in enumerate(rows):
        ids[r, length - len(row) :] = row
        mask[r, length - len(row) :] = 1
    sizes = np.array(SIZES, np.int64)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pix, image_sizes=sizes), lays


def _hf_tower(hf, pix):
    """HF's eager tower on one image's tiles: features = hidden_states[-1] (T, N, C), the last layer's received
    attention (T, H, N) and its raw k_proj keys (T, N, C) (forward hook)."""
    keys = {}
    attn = hf.model.vision_tower.encoder.layers[-1].self_attn
    handle = attn.k_proj.register_forward_hook(lambda m, i, o: keys.setdefault("k", o.detach()))
    try:
        with torch.no_grad():
            out = hf.model.vision_tower(torch.from_numpy(pix), output_hidden_states=True, output_attentions=True)
    finally:
        handle.remove()
    return out.hidden_states[-1].numpy(), out.attentions[-1].mean(-2).numpy(), keys["k"].numpy()


def _hf_blocks(hf, method, settings, pix):
    """(T·K', C) pre-projector tokens of one image's tiles, tile by tile, computed from HF's tower outputs:
    VisionZip by the NumPy transcription, PruMerge(+) by the project's pure function (whose CLIP form is checked
    against the authors' outputs, tests/prune/test_prune_golden_baselines.py). Also returns HF's received attn."""
    feats, received, keys = _hf_tower(hf, pix)
    heads = received.shape[1]
    blocks = []
    for t in range(feats.shape[0]):
        if method == "visionzip":
            k4 = keys[t].reshape(keys.shape[1], heads, -1)
            tok, _ = ref_visionzip_no_cls(feats[t], received[t], k4, settings["dominant"], settings["contextual"])
            blocks.append(tok.astype(np.float32))
        else:
            res = prumerge_plus(
                feats[t : t + 1], received[t : t + 1].mean(axis=1), keys[t : t + 1], plus=settings.get("plus", True)
            )
            blocks.append(np.asarray(res.tokens[0])[np.asarray(res.valid[0])])
    return np.concatenate(blocks), received


def _pruned_hf_embeds(hf, x, r, block):
    """Row r's prompt embeddings (HF's embedding table) with its image placeholders replaced by HF's projector
    applied to ``block`` (K, C): (1, L', D)."""
    m = x["attention_mask"][r].astype(bool)
    ids = torch.from_numpy(x["input_ids"][r][m])[None]
    with torch.no_grad():
        embeds = hf.model.get_input_embeddings()(ids)
        vis = hf.model.multi_modal_projector(torch.from_numpy(block))
    slots = (ids[0] == IMAGE).nonzero()[:, 0]
    start, end = int(slots[0]), int(slots[-1]) + 1
    return torch.cat([embeds[:, :start], vis[None], embeds[:, end:]], dim=1)


METHODS = {
    "visionzip": dict(dominant=5, contextual=3, layout="reference"),
    "prumerge_plus": dict(plus=True),
    "prumerge": dict(plus=False),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_merge_method_matches_hf_language_model(models, method):
    """Logits of the pruned model equal HF's language model on the same pruned sequence (per tile, tile by tile),
    and greedy tokens equal HF's generate on it, row by row of a batch of two grids."""
    name, model, hf = models
    settings = METHODS[method]
    pruner = prune.get("visionzip" if method == "visionzip" else "prumerge_plus", **settings)
    x, lays = _batch(model, seed=7)
    plan = model.plan(
        x["input_ids"],
        x["pixel_values"],
        image_sizes=x["image_sizes"],
        attention_mask=x["attention_mask"],
        pruner=pruner,
    )
    taps = model.taps(plan.pixel_values, pruner.request(model.config))
    t_max = plan.pixel_values.shape[1]
    out = model(
        x["input_ids"],
        x["pixel_values"],
        image_sizes=x["image_sizes"],
        attention_mask=x["attention_mask"],
        pruner=pruner,
    )
    greedy = method != "prumerge"  # the same packing path as PruMerge+; its generation is not run twice
    if greedy:
        gen = model.generate(
            x["input_ids"],
            x["pixel_values"],
            image_sizes=x["image_sizes"],
            attention_mask=x["attention_mask"],
            pruner=pruner,
            max_new_tokens=6,
        )
    logits, valid = np.asarray(out.logits), np.asarray(out.mask)
    for r, lay in enumerate(lays):
        pix = np.asarray(plan.pixel_values[r, : lay.num_tiles], np.float32)
        block, hf_received = _hf_blocks(hf, method, settings, pix)
        ours_received = np.asarray(taps.received_attention())[r * t_max : r * t_max + lay.num_tiles]
        chex.assert_trees_all_close(ours_received, hf_received, atol=RECEIVED_ATOL, rtol=0)
        if method == "visionzip":
            assert block.shape[0] == lay.num_tiles * (settings["dominant"] + settings["contextual"])
        pruned = _pruned_hf_embeds(hf, x, r, block)
        with torch.no_grad():
            ref = hf(inputs_embeds=pruned, attention_mask=torch.ones(pruned.shape[:2], dtype=torch.long)).logits[0]
        ours = logits[r][valid[r]]
        assert ours.shape == tuple(ref.shape)
        print(
            name, method, "row", r, "visual", block.shape[0], "max |logits - HF LM|:", np.abs(ours - ref.numpy()).max()
        )
        chex.assert_trees_all_close(ours, ref.numpy(), atol=LOGITS_ATOL, rtol=0)  # fp32, as the unpruned test
        if not greedy:
            continue
        want = hf_greedy(
            hf, 6, PAD, inputs_embeds=pruned, attention_mask=torch.ones(pruned.shape[:2], dtype=torch.long)
        )
        np.testing.assert_array_equal(np.asarray(gen[r]), want[0])


@pytest.mark.parametrize(
    "method, settings, error, match",
    [
        ("visionzip", dict(), NotImplementedError, "layout='official'"),  # mode B not implemented on OneVision
        ("visionzip", dict(layout="spatial"), ValueError, "layout"),
        ("visionzip", dict(dominant=0, contextual=2, layout="reference"), ValueError, "dominant"),
        ("visionzip", dict(dominant=17, contextual=0, layout="reference"), ValueError, "dominant"),
        ("visionzip", dict(dominant=16, contextual=1, layout="reference"), ValueError, "contextual"),  # no CLS slot
        ("visionzip", dict(dominant=4, contextual=2, layer=3, layout="reference"), ValueError, "layer"),
        ("prumerge_plus", dict(plus="yes"), ValueError, "plus"),
        ("prumerge_plus", dict(layer=-4), ValueError, "layer"),
    ],
)
def test_bad_settings_refused_before_compile(models, method, settings, error, match):
    _, model, _ = models
    x, _ = _batch(model, seed=0)
    before = model.compile_counts()
    with pytest.raises(error, match=match):
        model(
            x["input_ids"],
            x["pixel_values"],
            image_sizes=x["image_sizes"],
            attention_mask=x["attention_mask"],
            pruner=prune.get(method, **settings),
        )
    assert model.compile_counts() == before
