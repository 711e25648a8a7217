"""The PyTorch side of the efficiency suite: HF ``LlavaForConditionalGeneration`` or
``LlavaOnevisionForConditionalGeneration`` (SDPA) with the same weights as the JAX model, fed the tokens JAX kept
(HF's own projected features at the kept indices; JAX's tokens for methods that merge), timed under
``torch.inference_mode()``. torch is imported here only (an optional dependency).

LLaVA-OneVision: HF encodes each image's own tiles (its processor's output, no padding tiles) and packs them with
its ``get_image_features``, where JAX's tower runs the static tile axis (the largest grid + base: 37 tiles for the
llava-hf pinpoints, zero tiles past an image's own; ``vlmprune.anyres.onevision.onevision_batch``), so the vision
times differ by that ratio unless the image fills the largest grid. A method that selects per tile is fed HF's
projected tile tokens at JAX's kept tile indices (in JAX's spatial-compat order), one that selects on the packed
block HF's packed block at JAX's kept slots.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os

import numpy as np

from vlmprune.bench.config import BenchError
from vlmprune.bench.model_access import kept_indices
from vlmprune.io.weights import iter_export
from vlmprune.models.llava import LLAVA_RENAMES, weight_rules

#: the HF class the PyTorch side builds per model type
HF_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_onevision": "LlavaOnevisionForConditionalGeneration"}


def recover_indices(tokens, valid, projected_all, rtol: float = 1e-3):
    """Indices (NI, K) of the kept tokens among the projected features, or None when the method merged tokens."""
    t = np.asarray(tokens, np.float64)
    p = np.asarray(projected_all, np.float64)
    v = np.asarray(valid, bool)
    idx = np.zeros(v.shape, np.int64)
    for i in range(t.shape[0]):
        d2 = (t[i] ** 2).sum(-1)[:, None] - 2 * t[i] @ p[i].T + (p[i] ** 2).sum(-1)[None, :]
        j = d2.argmin(-1)
        err = np.sqrt(np.maximum(d2[np.arange(len(j)), j], 0)) / (np.linalg.norm(t[i], axis=-1) + 1e-12)
        if np.any(err[v[i]] > rtol):
            return None
        idx[i] = np.where(v[i], j, 0)
    return idx


# ----------------------------------------------------------------------------------------------- PyTorch side


class TorchSide:
    """The HF PyTorch model with the same weights, fed the tokens JAX kept."""

    def __init__(self, directory: str | None, dtype: str, *, model=None):
        """Load the HF model from ``directory``, or (``directory=None``) build it from ``model``'s HF config and
        copy ``model``'s params into it (the real-shape presets, whose random weights live only on the device)."""
        import torch
        import transformers

        self.torch = torch
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model_type = model.config.model_type if model is not None else _model_type(directory)
        if model_type not in HF_CLASSES:
            raise BenchError(
                f"the PyTorch comparison supports {', '.join(HF_CLASSES)} models; this one is {model_type}"
            )
        self.model_type = model_type
        self.hf_class = HF_CLASSES[model_type]
        cls = getattr(transformers, self.hf_class)
        if directory is not None:
            self.model = (
                cls.from_pretrained(directory, attn_implementation="sdpa", dtype=self.dtype).to(self.device).eval()
            )
        else:
            self.model = self._from_params(cls, model)
        cfg = self.model.config
        self.feature_layer = cfg.vision_feature_layer
        self.strategy = cfg.vision_feature_select_strategy

    @property
    def onevision(self) -> bool:
        return self.model_type == "llava_onevision"

    def _from_params(self, cls, model):
        """The HF model of ``model.hf_config`` holding ``model.params``, copied tensor by tensor (DLPack on the
        same device, else through the host) so the weights are never held twice over."""
        torch = self.torch

        if model.hf_config is None:
            raise BenchError("the PyTorch comparison needs the model's HF config")
        with torch.device(self.device):
            # HF's way to build a model from a config without loading weights
            tm = cls._from_config(
                model.hf_config,
                attn_implementation="sdpa",  # noqa: SLF001
                dtype=self.dtype,
            )
        state = tm.state_dict()
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if getattr(model.config.text, "tie_word_embeddings", False):
            shapes.pop("lm_head.weight", None)  # tied: HF's head shares the embedding, which is copied

        def convert(x):
            if self.device == "cuda" and x.devices().pop().platform == "gpu":
                return torch.from_dlpack(x)
            a = np.array(x)  # a writable host copy
            if a.dtype.name == "bfloat16":  # numpy has no bf16 for torch.from_numpy: go through its bits
                return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
            return torch.from_numpy(a)

        with torch.no_grad():
            for key, value in iter_export(
                model.params, shapes, weight_rules(model.config), renames=LLAVA_RENAMES, convert=convert
            ):
                state[key].copy_(value)
        return tm.eval()

    def t(self, x, dtype=None):
        return self.torch.as_tensor(np.array(x), device=self.device, dtype=dtype)  # a writable copy

    # pieces -------------------------------------------------------------------------------------
    def tiles_per_image(self, image_sizes) -> list[int]:
        """OneVision: the tiles HF's processor made for each image (base + grid), by HF's own rule."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        cfg = self.model.config
        return [
            int(image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size))
            for s in image_sizes
        ]

    def features(self, pix, image_sizes=None):
        """The tower's feature layer: (NI, N, C) (LLaVA-1.5), or on OneVision (ΣT_i, N, C) over each image's own
        tiles of pix (NI, T, C, S, S)."""
        if self.onevision:
            pix = self.torch.cat([p[:t] for p, t in zip(pix, self.tiles_per_image(image_sizes))])
        hs = self.model.model.vision_tower(pix, output_hidden_states=True).hidden_states[self.feature_layer]
        return hs[:, 1:] if self.strategy == "default" else hs

    def visual_tokens(self, pix, sel, image_sizes=None):
        """HF projected visual tokens for the kept selection ``sel`` (dict from ``torch_selection`` /
        ``torch_selection_onevision``)."""
        if self.onevision:
            return self._onevision_tokens(pix, sel, image_sizes)
        f = self.features(pix)
        proj = self.model.model.multi_modal_projector
        if sel is None:
            return proj(f)
        if sel["tokens"] is not None:  # merging method: JAX's merged tokens
            return sel["tokens"]
        rows = self.torch.arange(f.shape[0], device=self.device)[:, None]
        if sel["project_first"]:
            return proj(f)[rows, sel["idx"]]
        return proj(f[rows, sel["idx"]])

    def _onevision_tokens(self, pix, sel, image_sizes):
        """(NI, slots, D): HF's packed block (padded to ``sel["slots"]``), its slots at JAX's kept indices, or
        the projected tile tokens at JAX's kept tile indices."""
        torch = self.torch
        m = self.model.model
        if sel["where"] == "tiles":
            tiles = self.tiles_per_image(image_sizes)
            f = self.features(pix, image_sizes)
            n = f.shape[1]
            out = []
            for i, flat in enumerate(torch.split(f, tiles)):
                flat = flat.reshape(-1, f.shape[-1])
                out.append(m.multi_modal_projector(flat[sel["idx"][i].clamp(max=tiles[i] * n - 1)]))
            return torch.stack(out)
        blocks = m.get_image_features(
            pix, image_sizes, vision_aspect_ratio=self.model.config.vision_aspect_ratio
        ).pooler_output
        if sel["idx"] is not None:
            return torch.stack([b[i.clamp(max=b.shape[0] - 1)] for b, i in zip(blocks, sel["idx"])])
        slots = sel["slots"]
        return torch.stack([torch.nn.functional.pad(b, (0, 0, 0, slots - b.shape[0])) for b in blocks])

    def assemble(self, input_ids, vis, plan_t):
        torch = self.torch
        text_src, vis_src, text_mask, valid = plan_t
        emb = self.model.get_input_embeddings()(input_ids)
        rows = torch.arange(input_ids.shape[0], device=self.device)[:, None]
        t_emb = emb[rows, text_src.clamp(min=0)]
        flat = vis.reshape(-1, vis.shape[-1]).to(t_emb.dtype)
        is_vis = vis_src >= 0
        v_emb = flat[vis_src.clamp(min=0)]
        embeds = torch.where(is_vis[..., None], v_emb, t_emb)
        mask = torch.where(is_vis, valid.reshape(-1)[vis_src.clamp(min=0)], text_mask)
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)
        return embeds, mask.long(), pos

    def prefill(self, embeds, mask, pos, logits_to_keep=0):
        return self.model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=logits_to_keep
        )

    def decode(self, first_tok, cache, mask, next_pos, n_new: int):
        """A closure that greedily decodes ``n_new - 1`` tokens after ``first_tok`` with HF's KV cache.

        Every call starts from the same prefill state: the cache (a private copy) is cut back to its prefill
        length at the end of each call (a view, no copy).
        """
        torch = self.torch
        cache = copy.deepcopy(cache)
        start_len = cache.get_seq_length()
        b = first_tok.shape[0]
        ones = torch.ones((b, 1), dtype=mask.dtype, device=self.device)

        def run():
            tok, m = first_tok, mask
            for t in range(n_new - 1):
                m = torch.cat([m, ones], dim=1)
                out = self.model(
                    input_ids=tok[:, None],
                    attention_mask=m,
                    position_ids=(next_pos + t)[:, None],
                    past_key_values=cache,
                    use_cache=True,
                )
                tok = out.logits[:, -1].argmax(-1)
            for layer in cache.layers:
                layer.keys = layer.keys[..., :start_len, :]
                layer.values = layer.values[..., :start_len, :]
            return tok

        return run

    @staticmethod
    def cache_bytes(cache) -> int:
        return int(sum(lyr.keys.nbytes + lyr.values.nbytes for lyr in cache.layers))

    def peak_bytes(self) -> int | None:
        if self.device == "cuda":
            return int(self.torch.cuda.max_memory_allocated())
        return None

    def flops(self, fn) -> int | None:
        try:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                fn()
            return int(fc.get_total_flops())
        except Exception:  # noqa: BLE001
            return None


def compare_logits(jax_logits, torch_logits) -> dict:
    """Last-token logits of the two LLM prefills on the same sequence: relative L2 error and top-1 agreement.

    The check that both sides compute the same model (bf16: expect ~1e-2; float32: ~1e-6)."""
    a = np.asarray(jax_logits, np.float32)
    b = torch_logits.float().cpu().numpy()
    return {
        "rel_l2": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)),
        "top1_agree": float((a.argmax(-1) == b.argmax(-1)).mean()),
    }


def torch_selection(ts: TorchSide, result, tokens, project_first: bool):
    """What the PyTorch side feeds its LLM for a LLaVA-1.5 method: HF's own projected features at the indices
    the method kept (``result``: its ``PruneResult``), or, for a method that merges or appends tokens, JAX's
    ``tokens`` (NI, K, D_llm); None without a visual pruner."""
    if result is None:
        return None
    idx = kept_indices(result)
    if idx is None:
        return {"idx": None, "tokens": ts.t(np.asarray(tokens, np.float32), ts.dtype), "project_first": False}
    return {"idx": ts.t(np.asarray(idx), ts.torch.long), "tokens": None, "project_first": project_first}


def torch_selection_onevision(ts: TorchSide, kept, slots: int) -> dict:
    """What the PyTorch side feeds its LLM on LLaVA-OneVision: ``kept`` None (no visual pruner: HF's whole packed
    block, padded to ``slots``) or ``{"where": "tiles" | "packed", "idx": (NI, K), "valid": (NI, K)}``, JAX's kept
    indices into the tile tokens or the packed block, in the LLM's order."""
    if kept is None:
        return {"where": "packed", "idx": None, "slots": slots}
    idx = np.where(np.asarray(kept["valid"]), np.asarray(kept["idx"]), 0)
    return {"where": kept["where"], "idx": ts.t(idx, ts.torch.long), "slots": slots}


def compare_tokens(jax_tokens, torch_tokens, valid) -> dict:
    """The visual tokens both LLMs receive, at the valid slots: relative L2 error and the largest absolute
    difference (the check that both sides feed the same kept tokens)."""
    a = np.asarray(jax_tokens, np.float32)
    b = torch_tokens.float().cpu().numpy()
    v = np.asarray(valid, bool)
    a, b = a[v], b[v]
    return {
        "rel_l2": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)),
        "max_abs": float(np.abs(a - b).max()) if a.size else 0.0,
    }


def _model_type(directory: str) -> str:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f).get("model_type", "")


def torch_mode(ts: TorchSide | None):
    """``torch.inference_mode()`` when a PyTorch side exists, else nothing."""
    return ts.torch.inference_mode() if ts is not None else contextlib.nullcontext()
