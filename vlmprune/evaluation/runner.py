"""Run a benchmark: batched greedy generation (left padding), resumable predictions, a scored summary.

Output directory layout:

* ``predictions.jsonl``: one JSON object per sample, appended after every batch:
  ``{"id", "prompt", "prediction", "reference"}``. A rerun reads it, skips the ids already there and only
  generates the rest; ``reference`` holds what the metric needs, so scoring never reopens the data.
* ``run.json``: the settings of the run (task, data, model, pruner, prompt options). Resuming with different
  settings is refused: the predictions would mix two runs.
* ``summary.json``: the metrics (``metrics.score_task``) over the selected samples, plus the settings.

``predict_fn(prompts, images, samples) -> list[str]`` replaces the model (tests, external models); by default
``model_predict_fn`` runs ``LlavaModel.generate`` with the checkpoint's processor and chat template.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np

from vlmprune.evaluation.metrics import score_task
from vlmprune.evaluation.tasks import LLAVA_SYSTEM_PROMPT, Task, TaskData, get_task, load_task_data

PREDICTIONS = "predictions.jsonl"
SUMMARY = "summary.json"
RUN = "run.json"

PredictFn = Callable[[Sequence[str], Sequence, Sequence[dict]], Sequence[str]]


def log(msg: str) -> None:
    print(f"[vlmprune] {msg}", file=sys.stderr, flush=True)


def pruner_label(pruner) -> str:
    """``none`` or ``name-field=value-...`` (the pruner's settings), for directory names and tables."""
    if pruner is None:
        return "none"
    parts = [pruner.name]
    for f in dataclasses.fields(pruner):
        parts.append(f"{f.name}={getattr(pruner, f.name)}")
    return "-".join(parts)


# ------------------------------------------------------------------------------------------- model path


def chat_prompts(processor, prompts: Sequence[str], system_prompt: str | None) -> list[str]:
    """The checkpoint's chat template around ``<image>\\n{prompt}``, with LLaVA's system prompt first."""
    out = []
    for p in prompts:
        msgs = []
        if system_prompt:
            msgs.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        msgs.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]})
        out.append(processor.apply_chat_template(msgs, add_generation_prompt=True))
    return out


def left_pad(input_ids: np.ndarray, attention_mask: np.ndarray, multiple: int, pad_id: int):
    """Left-pad (B, L) to a multiple of ``multiple`` columns so batches of similar prompts share one compile."""
    b, length = input_ids.shape
    target = -(-length // multiple) * multiple if multiple > 1 else length
    if target == length:
        return input_ids, attention_mask
    ids = np.full((b, target), pad_id, input_ids.dtype)
    mask = np.zeros((b, target), attention_mask.dtype)
    ids[:, target - length:] = input_ids
    mask[:, target - length:] = attention_mask
    return ids, mask


def decode_outputs(tokenizer, out: np.ndarray, eos_ids: Sequence[int]) -> list[str]:
    """Text of each generated row up to its first EOS."""
    texts = []
    for row in np.asarray(out):
        stop = np.nonzero(np.isin(row, np.asarray(eos_ids)))[0]
        row = row[: stop[0]] if stop.size else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def model_predict_fn(model, *, pruner=None, max_new_tokens: int = 16, batch_size: int = 1,
                     system_prompt: str | None = LLAVA_SYSTEM_PROMPT, pad_multiple: int = 64) -> PredictFn:
    """Greedy generation with ``model`` (a ``LlavaModel`` with a processor).

    Batches are left padded (as the model expects) to a multiple of ``pad_multiple`` tokens and short final
    batches are filled up to ``batch_size`` with copies of their last sample, so a whole benchmark compiles
    only a few programs.
    """
    if model.processor is None:
        raise ValueError("this checkpoint has no processor/tokenizer files; evaluation needs them")
    proc = model.processor
    tok = proc.tokenizer
    tok.padding_side = "left"
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else model.config.pad_token_id

    def predict(prompts, images, samples):
        n = len(prompts)
        prompts, images = list(prompts), [im.convert("RGB") for im in images]
        if n < batch_size:
            prompts += [prompts[-1]] * (batch_size - n)
            images += [images[-1]] * (batch_size - n)
        x = proc(images=images, text=chat_prompts(proc, prompts, system_prompt), return_tensors="np", padding=True)
        ids, mask = left_pad(np.asarray(x["input_ids"]), np.asarray(x["attention_mask"]), pad_multiple, pad_id)
        out = model.generate(ids, x["pixel_values"], attention_mask=mask, image_sizes=x.get("image_sizes"),
                             pruner=pruner, max_new_tokens=max_new_tokens)
        return decode_outputs(tok, out[:n], model.config.eos_token_ids)

    return predict


# ------------------------------------------------------------------------------------------- predictions file


def read_predictions(path: str) -> dict[str, dict]:
    """Records by id (the last one wins). A torn last line (a crash mid-write) is cut off the file."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        raw = f.read()
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        log(f"{path}: dropping an incomplete last line ({len(raw) - cut} bytes)")
        raw = raw[:cut]
        with open(path, "wb") as f:
            f.write(raw)
    out = {}
    for i, line in enumerate(raw.decode("utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1} is not valid JSON ({e}); fix or delete the line to resume") from e
        out[str(rec["id"])] = rec
    return out


def _check_run(out_dir: str, settings: dict, overwrite: bool) -> None:
    path = os.path.join(out_dir, RUN)
    if overwrite:
        for name in (PREDICTIONS, SUMMARY, RUN):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    elif os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff and os.path.exists(os.path.join(out_dir, PREDICTIONS)):
            details = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ValueError(f"{out_dir} holds predictions of a run with other settings ({details}); use another "
                             "output directory or overwrite=True (--overwrite)")
    with open(path, "w") as f:
        json.dump(settings, f, indent=2, sort_keys=True)


# ------------------------------------------------------------------------------------------- the runner


def run_eval(task: Task | str, output_dir: str, *, model=None, pruner=None, data: str | None = None,
             split: str | None = None, config: str | None = None, images: str | None = None, dataset=None,
             limit: int | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
             system_prompt: str | None = LLAVA_SYSTEM_PROMPT, ocr: bool = True, predict_fn: PredictFn | None = None,
             pad_multiple: int = 64, progress: bool = True, overwrite: bool = False, cache_dir: str | None = None,
             run_info: dict | None = None) -> dict:
    """Evaluate ``model`` (with ``pruner``) or ``predict_fn`` on a task; resumable. Returns the summary dict.

    Args:
      task: "pope", "textvqa", "gqa", "mme" or "scienceqa_img" (or a ``Task``).
      output_dir: where predictions.jsonl, run.json and summary.json go; rerunning into it resumes.
      data / split / config / images / dataset: see ``tasks.load_task_data`` (default: the lmms-lab hub data).
      limit: only the first ``limit`` rows.
      batch_size: samples per ``generate`` call (left padded).
      max_new_tokens: default the task's (16; answers are a word or a letter).
      system_prompt: LLaVA-1.5's vicuna_v1 system prompt by default; None or "" for none.
      ocr: TextVQA: add LLaVA's "Reference OCR token: ..." line when the data has OCR tokens.
      predict_fn: ``(prompts, images, samples) -> texts`` instead of the model.
      run_info: extra settings recorded in run.json / summary.json (e.g. the model path); they take part in the
        resume check.
    """
    task = get_task(task) if isinstance(task, str) else task
    if predict_fn is None and model is None:
        raise ValueError("pass model=... (a LlavaModel) or predict_fn=...")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_new_tokens = int(max_new_tokens or task.max_new_tokens)
    td = data if isinstance(data, TaskData) else load_task_data(
        task, data, split=split, config=config, images=images, cache_dir=cache_dir, dataset=dataset)
    n = len(td) if limit is None else min(int(limit), len(td))
    data_key = (os.path.abspath(data) if os.path.isdir(data) else data) if isinstance(data, str) else None
    settings = dict(task=task.name, data=data_key, split=split or task.split,
                    pruner=pruner_label(pruner), max_new_tokens=max_new_tokens, system_prompt=system_prompt or "",
                    ocr=bool(ocr), **(run_info or {}))
    os.makedirs(output_dir, exist_ok=True)
    _check_run(output_dir, settings, overwrite)
    pred_path = os.path.join(output_dir, PREDICTIONS)
    done = read_predictions(pred_path)
    ids = td.ids[:n]
    todo = [i for i in range(n) if ids[i] not in done]
    if predict_fn is None:
        predict_fn = model_predict_fn(model, pruner=pruner, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                      system_prompt=system_prompt, pad_multiple=pad_multiple)
    from tqdm import tqdm

    t0 = time.perf_counter()
    generated = 0
    with open(pred_path, "a", encoding="utf-8") as f, \
            tqdm(total=n, initial=n - len(todo), desc=task.name, unit="sample", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            rows = [td.row(i) for i in todo[start:start + batch_size]]
            prompts = [task.prompt(r, ocr=ocr) for r in rows]
            samples = [dict(id=ids[i], index=i, reference=task.reference(r), row=r)
                       for i, r in zip(todo[start:start + batch_size], rows)]
            texts = list(predict_fn(prompts, [r["image"] for r in rows], samples))
            if len(texts) != len(rows):
                raise ValueError(f"predict_fn returned {len(texts)} predictions for {len(rows)} samples")
            for s, p, t in zip(samples, prompts, texts):
                rec = dict(id=s["id"], prompt=p, prediction=str(t), reference=s["reference"])
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                done[s["id"]] = rec
            f.flush()
            generated += len(rows)
            bar.update(len(rows))
    elapsed = time.perf_counter() - t0
    metrics = score_task(task.name, [done[i] for i in ids])
    summary = dict(settings, **metrics, generated_this_run=generated,
                   seconds_this_run=round(elapsed, 3), predictions=pred_path)
    with open(os.path.join(output_dir, SUMMARY), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary


# ------------------------------------------------------------------------------------------- CLI glue


def add_eval_args(p) -> None:
    """Arguments of ``vlmprune eval`` (the pruning flags are added by the CLI's ``_add_method_args``)."""
    from vlmprune.evaluation.tasks import TASKS

    p.add_argument("--model", required=True, help="HF LLaVA directory or vlmprune checkpoint")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--data", default=None, help="save_to_disk directory, local hub-layout directory or hub id "
                                                "(default: the task's lmms-lab dataset)")
    p.add_argument("--split", default=None, help="default: the task's (test / validation / testdev)")
    p.add_argument("--config", default=None, help="dataset config (default: the task's, e.g. ScienceQA-IMG)")
    p.add_argument("--images", default=None, help="GQA: image table (id, image) when the questions carry imageId")
    p.add_argument("--output-dir", default=None,
                   help="default: results/eval/<model>/<task>/<method>; rerunning into it resumes")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (16)")
    p.add_argument("--pad-multiple", type=int, default=64,
                   help="left-pad prompts to a multiple of N tokens (fewer distinct shapes to compile)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--system-prompt", default=LLAVA_SYSTEM_PROMPT,
                   help="system prompt before USER: (default LLaVA-1.5's vicuna_v1 one; '' for none)")
    p.add_argument("--no-ocr", action="store_true", help="TextVQA: leave out the 'Reference OCR token' line")
    p.add_argument("--overwrite", action="store_true", help="discard earlier predictions in --output-dir")
    p.add_argument("--no-progress", action="store_true")


def run_from_args(args, pruner) -> dict:
    import vlmprune

    out_dir = args.output_dir or os.path.join(
        "results", "eval", os.path.basename(os.path.normpath(args.model)), args.task, pruner_label(pruner))
    log(f"loading {args.model} ...")
    model = vlmprune.load(args.model, dtype=args.dtype)
    summary = run_eval(
        args.task, out_dir, model=model, pruner=pruner, data=args.data, split=args.split, config=args.config,
        images=args.images, limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        system_prompt=args.system_prompt, ocr=not args.no_ocr, pad_multiple=args.pad_multiple,
        progress=not args.no_progress,
        overwrite=args.overwrite, run_info=dict(model=os.path.abspath(args.model), dtype=args.dtype),
    )
    print(f"{summary['task']} {summary['pruner']}: {summary['headline_metric']} = {summary['headline']:.2f} "
          f"({summary['num_samples']} samples; {summary['generated_this_run']} generated now)")
    print(f"[vlmprune] wrote {os.path.join(out_dir, SUMMARY)}", file=sys.stderr)
    return summary
