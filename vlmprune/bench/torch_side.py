"""The PyTorch side of the efficiency suite: HF ``LlavaForConditionalGeneration`` (SDPA) with the same weights as
the JAX model, fed the tokens JAX kept (HF's own projected features at the kept indices; JAX's tokens for methods
that merge), timed under ``torch.inference_mode()``. torch is imported here only (an optional dependency).
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np

from vlmprune.bench.config import BenchError
from vlmprune.bench.model_access import kept_indices
from vlmprune.io.weights import iter_export
from vlmprune.models.llava import LLAVA_RENAMES, LLAVA_RULES


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
        from transformers import LlavaForConditionalGeneration

        self.torch = torch
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if directory is not None:
            self.model = (
                LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation="sdpa", dtype=self.dtype)
                .to(self.device)
                .eval()
            )
        else:
            self.model = self._from_params(model)
        cfg = self.model.config
        self.feature_layer = cfg.vision_feature_layer
        self.strategy = cfg.vision_feature_select_strategy

    def _from_params(self, model):
        """The HF LLaVA of ``model.hf_config`` holding ``model.params``, copied tensor by tensor (DLPack on the
        same device, else through the host) so the weights are never held twice over."""
        torch = self.torch
        from transformers import LlavaForConditionalGeneration

        if model.hf_config is None or model.config.model_type != "llava":
            raise BenchError("the PyTorch comparison supports LLaVA-1.5 models with an HF config")
        with torch.device(self.device):
            # HF's way to build a model from a config without loading weights
            tm = LlavaForConditionalGeneration._from_config(
                model.hf_config,
                attn_implementation="sdpa",  # noqa: SLF001
                dtype=self.dtype,
            )
        state = tm.state_dict()

        def convert(x):
            if self.device == "cuda" and x.devices().pop().platform == "gpu":
                return torch.from_dlpack(x)
            a = np.array(x)  # a writable host copy
            if a.dtype.name == "bfloat16":  # numpy has no bf16 for torch.from_numpy: go through its bits
                return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
            return torch.from_numpy(a)

        with torch.no_grad():
            for key, value in iter_export(
                model.params,
                {k: tuple(v.shape) for k, v in state.items()},
                LLAVA_RULES,
                renames=LLAVA_RENAMES,
                convert=convert,
            ):
                state[key].copy_(value)
        return tm.eval()

    def t(self, x, dtype=None):
        return self.torch.as_tensor(np.array(x), device=self.device, dtype=dtype)  # a writable copy

    # pieces -------------------------------------------------------------------------------------
    def features(self, pix):
        hs = self.model.model.vision_tower(pix, output_hidden_states=True).hidden_states[self.feature_layer]
        return hs[:, 1:] if self.strategy == "default" else hs

    def visual_tokens(self, pix, sel):
        """HF projected visual tokens for the kept selection ``sel`` (dict from ``_torch_selection``)."""
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


def torch_mode(ts: TorchSide | None):
    """``torch.inference_mode()`` when a PyTorch side exists, else nothing."""
    return ts.torch.inference_mode() if ts is not None else contextlib.nullcontext()
