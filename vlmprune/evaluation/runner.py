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
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from tqdm import tqdm

import vlmprune
from vlmprune.evaluation.metrics import score_task
from vlmprune.evaluation.tasks import (
    TASKS,
    Task,
    TaskData,
    check_data_path,
    default_system_prompt,
    get_task,
    load_task_data,
)
from vlmprune.preprocess import ASPECTS, image_aspect
from vlmprune.prune.base import PruneContext, VisualPruner, tokens_for_llm

PREDICTIONS = "predictions.jsonl"
SUMMARY = "summary.json"
RUN = "run.json"

PredictFn = Callable[[Sequence[str], Sequence, Sequence[dict]], Sequence[str]]


class FamilyDefault:
    """The type of :data:`FAMILY_DEFAULT`."""

    def __repr__(self) -> str:
        return "FAMILY_DEFAULT"


#: ``system_prompt`` default: the model family's own (``tasks.default_system_prompt``): LLaVA-1.5's vicuna_v1
#: prompt for LLaVA-1.5 / NeXT, Qwen2's "You are a helpful assistant." for LLaVA-OneVision
FAMILY_DEFAULT = FamilyDefault()


def resolve_system_prompt(system_prompt, model) -> str | None:
    """``system_prompt`` as given, or the family default of ``model`` (LLaVA-1.5's without a model)."""
    if isinstance(system_prompt, FamilyDefault):
        return default_system_prompt(None if model is None else model.config.model_type)
    return system_prompt


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
    ids[:, target - length :] = input_ids
    mask[:, target - length :] = attention_mask
    return ids, mask


def decode_outputs(tokenizer, out: np.ndarray, eos_ids: Sequence[int]) -> list[str]:
    """Text of each generated row up to its first EOS."""
    texts = []
    for row in np.asarray(out):
        stop = np.nonzero(np.isin(row, np.asarray(eos_ids)))[0]
        row = row[: stop[0]] if stop.size else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def check_options(*, batch_size=1, limit=None, max_new_tokens=None, pad_multiple=1) -> None:
    """Range checks of the run options (before any data or model is loaded); ValueError names the option."""
    for name, v, lo, optional in (
        ("batch_size", batch_size, 1, False),
        ("limit", limit, 1, True),
        ("max_new_tokens", max_new_tokens, 1, True),
        ("pad_multiple", pad_multiple, 1, False),
    ):
        if v is None and optional:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")


def time_selection(model, pruner, pixel_values, repeats: int = 3) -> float | None:
    """Seconds one call of ``pruner``'s selection takes on these images' encoder outputs (jitted, after a warm-up
    call; the fastest of ``repeats``). None where the selection is not a separate step: no pruner, FastV (inside
    the LLM) and LLaVA-NeXT (selection fused with the tile packing)."""
    if not isinstance(pruner, VisualPruner) or model.config.model_type != "llava":
        return None
    request = pruner.request(model.config)
    taps = model.taps(pixel_values, request.replace(projected=False))
    if request.projected:  # the selection alone: the features stand in for the projected embeddings
        taps = taps.replace(embeddings=taps.features)
    ctx = PruneContext(config=model.config)
    sel = jax.jit(lambda t: tokens_for_llm(pruner.prune(t, ctx), t, lambda f: f))
    jax.block_until_ready(sel(taps))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(sel(taps))
        best = min(best, time.perf_counter() - t)
    return best


def throughput(generated: int, seconds: float, timing: dict) -> dict:
    """summary.json's speed fields: samples/s over this run's wall time (data reading and compiles included),
    and the share of the model's time spent selecting tokens (the selection timed alone on the first batch,
    times the number of batches, over the time inside ``generate``)."""
    out = dict(
        samples_per_second=round(generated / seconds, 4) if generated and seconds > 0 else None, selection_share=None
    )
    sel, gen, batches = timing.get("selection_s"), timing.get("generate_s", 0.0), timing.get("batches", 0)
    if sel is not None and gen > 0 and batches:
        out["selection_share"] = round(min(sel * batches / gen, 1.0), 6)
        out["selection_ms_per_batch"] = round(1e3 * sel, 4)
    return out


def model_predict_fn(
    model,
    *,
    pruner=None,
    max_new_tokens: int = 16,
    batch_size: int = 1,
    system_prompt: str | None | FamilyDefault = FAMILY_DEFAULT,
    pad_multiple: int = 64,
    timing: dict | None = None,
) -> PredictFn:
    """Greedy generation with ``model`` (a ``LlavaModel`` with a processor).

    Batches are left padded (as the model expects) to a multiple of ``pad_multiple`` tokens and short final
    batches are filled up to ``batch_size`` with copies of their last sample, so a whole benchmark compiles
    only a few programs. ``timing`` (a dict), when given, collects ``generate_s`` (seconds inside generate),
    ``batches`` and ``selection_s`` (``time_selection`` on the first batch).
    """
    check_options(batch_size=batch_size, max_new_tokens=max_new_tokens, pad_multiple=pad_multiple)
    if model.processor is None:
        raise ValueError("this checkpoint has no processor/tokenizer files; evaluation needs them")
    proc = model.processor
    system_prompt = resolve_system_prompt(system_prompt, model)
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
        t = time.perf_counter()
        out = np.asarray(
            model.generate(
                ids,
                x["pixel_values"],
                attention_mask=mask,
                image_sizes=x.get("image_sizes"),
                pruner=pruner,
                max_new_tokens=max_new_tokens,
            )
        )
        if timing is not None:
            timing["generate_s"] = timing.get("generate_s", 0.0) + time.perf_counter() - t
            timing["batches"] = timing.get("batches", 0) + 1
            if "selection_s" not in timing:
                timing["selection_s"] = time_selection(model, pruner, x["pixel_values"])
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


def settings_fingerprint(settings: dict) -> str:
    """A short digest of a run's settings, stored in every prediction record it writes."""
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def _check_run(out_dir: str, settings: dict, done: dict[str, dict], overwrite: bool) -> dict[str, dict]:
    """Refuse to resume predictions made with other settings; returns the records to keep.

    The settings of a record are its ``settings`` fingerprint, so the check holds without run.json too; run.json
    (when present and matching the records) names what changed. A directory without records (e.g. a run that
    failed on its first batch) accepts any settings."""
    path = os.path.join(out_dir, RUN)
    if overwrite:
        for name in (PREDICTIONS, SUMMARY, RUN):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        done = {}
    fp = settings_fingerprint(settings)
    seen = sorted({str(r.get("settings")) for r in done.values()})
    if done and seen != [fp]:
        old = None
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
        if old is not None and seen == [settings_fingerprint(old)]:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            details = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
        else:
            details = f"fingerprint(s) {', '.join(seen)} in the records, {fp} now" + (
                "" if old is not None else f"; {RUN} is missing, so what differed is unknown"
            )
        raise ValueError(
            f"{out_dir} holds {len(done)} predictions of a run with other settings ({details}); use "
            "another output directory or overwrite=True (--overwrite)"
        )
    with open(path, "w") as f:
        json.dump(settings, f, indent=2, sort_keys=True)
    return done


# ------------------------------------------------------------------------------------------- the runner


def _predict_batches(
    task: Task,
    td: TaskData,
    ids,
    todo,
    done: dict,
    predict_fn,
    pred_path: str,
    fingerprint: str,
    *,
    batch_size: int,
    ocr: bool,
    progress: bool,
    total: int,
) -> int:
    """Predict the ``todo`` rows batch by batch, appending each record to ``pred_path`` (and ``done``) as soon as
    its batch returns; the number of predictions made."""
    generated = 0
    with (
        open(pred_path, "a", encoding="utf-8") as f,
        tqdm(total=total, initial=total - len(todo), desc=task.name, unit="sample", disable=not progress) as bar,
    ):
        for start in range(0, len(todo), batch_size):
            rows = [td.row(i) for i in todo[start : start + batch_size]]
            prompts = [task.prompt(r, ocr=ocr) for r in rows]
            samples = [
                dict(id=ids[i], index=i, reference=task.reference(r, ids[i]), row=r)
                for i, r in zip(todo[start : start + batch_size], rows)
            ]
            texts = list(predict_fn(prompts, [r["image"] for r in rows], samples))
            if len(texts) != len(rows):
                raise ValueError(f"predict_fn returned {len(texts)} predictions for {len(rows)} samples")
            for s, p, t in zip(samples, prompts, texts):
                rec = dict(id=s["id"], prompt=p, prediction=str(t), reference=s["reference"], settings=fingerprint)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                done[s["id"]] = rec
            f.flush()
            generated += len(rows)
            bar.update(len(rows))
    return generated


def run_eval(
    task: Task | str,
    output_dir: str,
    *,
    model=None,
    pruner=None,
    data: str | None = None,
    split: str | None = None,
    config: str | None = None,
    images: str | None = None,
    dataset=None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    system_prompt: str | None | FamilyDefault = FAMILY_DEFAULT,
    ocr: bool = True,
    predict_fn: PredictFn | None = None,
    pad_multiple: int = 64,
    progress: bool = True,
    overwrite: bool = False,
    cache_dir: str | None = None,
    run_info: dict | None = None,
    data_key: str | None = None,
) -> dict:
    """Evaluate ``model`` (with ``pruner``) or ``predict_fn`` on a task; resumable. Returns the summary dict.

    Args:
      task: "pope", "textvqa", "gqa", "mme" or "scienceqa_img" (or a ``Task``).
      output_dir: where predictions.jsonl, run.json and summary.json go; rerunning into it resumes.
      data / split / config / images / dataset: see ``tasks.load_task_data`` (default: the lmms-lab hub data).
      limit: only the first ``limit`` rows.
      batch_size: samples per ``generate`` call (left padded).
      max_new_tokens: default the task's (16; answers are a word or a letter).
      system_prompt: by default the model family's (``FAMILY_DEFAULT``: LLaVA-1.5's vicuna_v1 prompt, Qwen2's
        for LLaVA-OneVision); None or "" for none.
      ocr: TextVQA: add LLaVA's "Reference OCR token: ..." line when the data has OCR tokens.
      predict_fn: ``(prompts, images, samples) -> texts`` instead of the model.
      run_info: extra settings recorded in run.json / summary.json (e.g. the model path); they take part in the
        resume check.
      data_key: how run.json names the data when ``data`` is an open ``TaskData`` (default: its path).

    Raises:
      ValueError / FileNotFoundError for bad options, data or labels (naming the sample), and for a resume
      into predictions made with other settings.
    """
    task = get_task(task) if isinstance(task, str) else task
    if predict_fn is None and model is None:
        raise ValueError("pass model=... (a LlavaModel) or predict_fn=...")
    check_options(batch_size=batch_size, limit=limit, max_new_tokens=max_new_tokens, pad_multiple=pad_multiple)
    system_prompt = resolve_system_prompt(system_prompt, model)
    max_new_tokens = task.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    td = (
        data
        if isinstance(data, TaskData)
        else load_task_data(task, data, split=split, config=config, images=images, cache_dir=cache_dir, dataset=dataset)
    )
    n = len(td) if limit is None else min(int(limit), len(td))
    td.check_labels(n)
    if isinstance(data, str):
        data_key = os.path.abspath(data) if os.path.isdir(data) else data
    settings = dict(
        task=task.name,
        data=data_key,
        split=split or task.split,
        pruner=pruner_label(pruner),
        max_new_tokens=max_new_tokens,
        system_prompt=system_prompt or "",
        ocr=bool(ocr),
        **(run_info or {}),
    )
    if model is not None and predict_fn is None and "image_aspect" not in settings:
        settings["image_aspect"] = image_aspect(model.processor)
    fingerprint = settings_fingerprint(settings)
    os.makedirs(output_dir, exist_ok=True)
    pred_path = os.path.join(output_dir, PREDICTIONS)
    done = _check_run(output_dir, settings, read_predictions(pred_path), overwrite)
    ids = td.ids[:n]
    todo = [i for i in range(n) if ids[i] not in done]
    timing = {}
    if predict_fn is None:
        predict_fn = model_predict_fn(
            model,
            pruner=pruner,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            system_prompt=system_prompt,
            pad_multiple=pad_multiple,
            timing=timing,
        )
    t0 = time.perf_counter()
    generated = _predict_batches(
        task,
        td,
        ids,
        todo,
        done,
        predict_fn,
        pred_path,
        fingerprint,
        batch_size=batch_size,
        ocr=ocr,
        progress=progress,
        total=n,
    )
    elapsed = time.perf_counter() - t0
    metrics = score_task(task.name, [done[i] for i in ids])
    summary = dict(
        settings,
        **metrics,
        generated_this_run=generated,
        seconds_this_run=round(elapsed, 3),
        predictions=pred_path,
        settings_fingerprint=fingerprint,
        **throughput(generated, elapsed, timing),
    )
    with open(os.path.join(output_dir, SUMMARY), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary


# ------------------------------------------------------------------------------------------- CLI glue


def add_eval_args(p) -> None:
    """Arguments of ``vlmprune eval`` (the pruning flags are added by the CLI's ``_add_method_args``)."""
    p.add_argument("--model", required=True, help="HF LLaVA directory or vlmprune checkpoint")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument(
        "--data",
        default=None,
        help="save_to_disk directory, local hub-layout directory or hub id (default: the task's lmms-lab dataset)",
    )
    p.add_argument("--split", default=None, help="default: the task's (test / validation / testdev)")
    p.add_argument("--config", default=None, help="dataset config (default: the task's, e.g. ScienceQA-IMG)")
    p.add_argument("--images", default=None, help="GQA: image table (id, image) when the questions carry imageId")
    p.add_argument(
        "--output-dir", default=None, help="default: results/eval/<model>/<task>/<method>; rerunning into it resumes"
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (16)")
    p.add_argument(
        "--pad-multiple",
        type=int,
        default=64,
        help="left-pad prompts to a multiple of N tokens (fewer distinct shapes to compile)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--image-aspect",
        default=None,
        choices=list(ASPECTS),
        help="pad: the original LLaVA pipeline (mean-colour square, then CLIP); crop: the HF llava-hf "
        "processor's centre crop (default: the checkpoint's processor, i.e. crop)",
    )
    p.add_argument(
        "--system-prompt",
        default=None,
        help="system prompt before the user turn (default: the model family's: LLaVA-1.5's vicuna_v1 one, "
        "\"You are a helpful assistant.\" on LLaVA-OneVision as its qwen_1_5 template; '' for none)",
    )
    p.add_argument("--no-ocr", action="store_true", help="TextVQA: leave out the 'Reference OCR token' line")
    p.add_argument("--overwrite", action="store_true", help="discard earlier predictions in --output-dir")
    p.add_argument("--no-progress", action="store_true")


def check_args(args) -> None:
    """Validate ``vlmprune eval``'s flags before anything is loaded (ValueError / FileNotFoundError)."""
    check_options(
        batch_size=args.batch_size, limit=args.limit, max_new_tokens=args.max_new_tokens, pad_multiple=args.pad_multiple
    )
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model!r}: no such directory")
    if args.data is not None:
        check_data_path(args.data, "--data")
    if args.images is not None:
        check_data_path(args.images, "--images")
    clip_path = getattr(args, "clip_path", None)
    if clip_path is not None and not os.path.isdir(clip_path):
        raise FileNotFoundError(f"--clip-path {clip_path!r}: no such directory")


def run_from_args(args, pruner) -> dict:
    """``vlmprune eval``: check the flags, open the data (labels validated), load the model, run."""
    check_args(args)
    out_dir = args.output_dir or os.path.join(
        "results", "eval", os.path.basename(os.path.normpath(args.model)), args.task, pruner_label(pruner)
    )
    td = load_task_data(args.task, args.data, split=args.split, config=args.config, images=args.images)
    td.check_labels(len(td) if args.limit is None else min(args.limit, len(td)))
    log(f"loading {args.model} ...")
    kw = {} if args.image_aspect is None else dict(image_aspect=args.image_aspect)
    model = vlmprune.load(args.model, dtype=args.dtype, **kw)
    if pruner is not None:
        pruner.validate(model.config)
    data_key = os.path.abspath(args.data) if args.data and os.path.isdir(args.data) else args.data
    summary = run_eval(
        args.task,
        out_dir,
        model=model,
        pruner=pruner,
        data=td,
        split=args.split,
        config=args.config,
        images=args.images,
        limit=args.limit,
        data_key=data_key,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        system_prompt=FAMILY_DEFAULT if args.system_prompt is None else args.system_prompt,
        ocr=not args.no_ocr,
        pad_multiple=args.pad_multiple,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        run_info=dict(model=os.path.abspath(args.model), dtype=args.dtype),
    )
    print(
        f"{summary['task']} {summary['pruner']}: {summary['headline_metric']} = {summary['headline']:.2f} "
        f"({summary['num_samples']} samples; {summary['generated_this_run']} generated now)"
    )
    print(f"[vlmprune] wrote {os.path.join(out_dir, SUMMARY)}", file=sys.stderr)
    return summary
