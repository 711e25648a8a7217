"""vlmprune as an lmms-eval model: ``lmms-eval --model vlmprune --model_args pretrained=DIR,method=vispruner,...``.

Installed with the ``lmms`` extra; lmms-eval finds it through the ``lmms_eval.models`` entry point (see
``vlmprune.evaluation.lmms_manifest``). Model args (comma separated ``key=value``):

* ``pretrained``: HF LLaVA-1.5 / NeXT directory or vlmprune checkpoint (required).
* ``method``: a ``vlmprune.prune.REGISTRY`` name (default none); any other key is a setting of that method, by its
  field name (``num_keep``, ``important_ratio``, ``budget_rate``, ``alpha``, ``clip_path`` ...); ``keep`` is
  short for ``num_keep``.
* ``dtype`` (float32 | bfloat16 | float16), ``image_aspect`` (pad | crop; default the checkpoint's processor),
  ``system_prompt`` (default LLaVA-1.5's; ``none`` for none), ``pad_multiple`` (left-pad prompts to a multiple
  of this many tokens, default 64). ``device`` is accepted and ignored (JAX places the model).

Requests run as in ``vlmprune eval``: the checkpoint's chat template, one image per request, greedy decoding,
batches of ``--batch_size`` left padded to a few compiled shapes (the last batch filled up with copies). So the
predictions on the same data, model and pruner are those of ``vlmprune eval``. Tasks whose requests need
log-likelihoods, sampling, beams, several images or no image are refused with the task named.
"""

from __future__ import annotations

import json

from lmms_eval.api.model import lmms

import vlmprune
from vlmprune import prune
from vlmprune.evaluation.runner import model_predict_fn
from vlmprune.evaluation.tasks import LLAVA_SYSTEM_PROMPT

_OWN_ARGS = (
    "pretrained",
    "method",
    "dtype",
    "image_aspect",
    "system_prompt",
    "pad_multiple",
    "batch_size",
    "max_batch_size",
    "device",
)


def pruner_from_model_args(method, settings: dict):
    """A pruner from lmms-eval model args (``keep`` = ``num_keep``); ValueError naming a setting that does not
    apply to the method."""
    if method in (None, "", "none"):
        if settings:
            raise ValueError(f"vlmprune: model args {sorted(settings)} need a method=...")
        return None
    settings = dict(settings)
    if "keep" in settings:
        settings["num_keep"] = settings.pop("keep")
    return prune.get(str(method), **settings)


def _task_of(req) -> str:
    args = req.args
    return str(args[4]) if len(args) > 4 else "?"


class VlmpruneLMM(lmms):
    """lmms-eval simple model over ``vlmprune.load`` + a pruner."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = None,
        method: str = "none",
        dtype: str = "float32",
        image_aspect: str | None = None,
        system_prompt: str = LLAVA_SYSTEM_PROMPT,
        pad_multiple: int = 64,
        batch_size: int | str = 1,
        max_batch_size=None,
        device=None,
        **settings,
    ) -> None:
        super().__init__()

        if not pretrained:
            raise ValueError("vlmprune: model_args need pretrained=<checkpoint directory>")
        if isinstance(batch_size, str):
            if not batch_size.isdigit():
                raise ValueError(f"vlmprune: batch_size must be a positive integer, got {batch_size!r}")
            batch_size = int(batch_size)
        self.pruner = pruner_from_model_args(method, settings)
        kw = {} if image_aspect in (None, "") else dict(image_aspect=str(image_aspect))
        self.model = vlmprune.load(str(pretrained), dtype=dtype, **kw)
        if self.pruner is not None:
            self.pruner.validate(self.model.config)
        self.batch_size = int(batch_size)
        self.system_prompt = None if str(system_prompt).lower() == "none" else str(system_prompt)
        self.pad_multiple = int(pad_multiple)
        self._predict = {}  # max_new_tokens -> predict fn

    # ----------------------------------------------------------------------------------------- requests

    def _check_generation(self, task: str, gen_kwargs: dict) -> tuple[int, tuple[str, ...]]:
        gk = dict(gen_kwargs or {})
        until = gk.pop("until", None)
        until = (until,) if isinstance(until, str) else tuple(until or ())
        max_new = int(gk.pop("max_new_tokens", 128))
        if max_new < 1:
            raise ValueError(f"vlmprune: task {task}: max_new_tokens must be >= 1, got {max_new}")
        temperature = gk.pop("temperature", 0) or 0
        do_sample = bool(gk.pop("do_sample", False))
        beams = int(gk.pop("num_beams", 1) or 1)
        gk.pop("top_p", None)  # irrelevant for greedy decoding
        if do_sample or float(temperature) > 0 or beams != 1:
            raise NotImplementedError(
                f"vlmprune: task {task} asks for sampling or beam search (temperature="
                f"{temperature}, do_sample={do_sample}, num_beams={beams}); only greedy "
                "decoding is implemented"
            )
        return max_new, until

    def _predictor(self, max_new: int):
        if max_new not in self._predict:
            self._predict[max_new] = model_predict_fn(
                self.model,
                pruner=self.pruner,
                max_new_tokens=max_new,
                batch_size=self.batch_size,
                system_prompt=self.system_prompt,
                pad_multiple=self.pad_multiple,
            )
        return self._predict[max_new]

    def _image(self, req):
        context, _, doc_to_visual, doc_id, task, split = req.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) != 1 or not hasattr(visuals[0], "convert"):
            raise NotImplementedError(
                f"vlmprune: task {task} (doc {doc_id}) gives {len(visuals)} visual(s); "
                "LLaVA-1.5 / NeXT here take exactly one image per request"
            )
        return visuals[0]

    def generate_until(self, requests) -> list[str]:
        """Greedy answers in request order; requests with the same generation settings batched together."""
        from tqdm import tqdm

        groups: dict[str, list[int]] = {}
        plans = []
        for i, req in enumerate(requests):
            plan = self._check_generation(_task_of(req), req.args[1])
            plans.append(plan)
            groups.setdefault(json.dumps([plan[0], list(plan[1])]), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="vlmprune", disable=self.rank != 0)
        for idx in groups.values():
            max_new, until = plans[idx[0]]
            predict = self._predictor(max_new)
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                prompts = [str(requests[i].args[0]) for i in chunk]
                images = [self._image(requests[i]) for i in chunk]
                for i, text in zip(chunk, predict(prompts, images, [{} for _ in chunk])):
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out

    def loglikelihood(self, requests):
        tasks = sorted({_task_of(r) for r in requests})
        raise NotImplementedError(
            f"vlmprune: task(s) {', '.join(tasks)} need log-likelihoods (multiple-choice "
            "scoring), which this model does not implement; use generate_until tasks"
        )

    def generate_until_multi_round(self, requests):
        tasks = sorted({_task_of(r) for r in requests})
        raise NotImplementedError(f"vlmprune: task(s) {', '.join(tasks)} are multi-round; not implemented")
