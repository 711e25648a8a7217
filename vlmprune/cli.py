"""Command line: ``vlmprune demo | generate | convert | visualize | eval | bench``.

Every subcommand checks its flags, files and the checkpoint's config before loading any weights, and reports a
user error as one ``error: ...`` line with a non-zero exit status (``--traceback`` shows the Python traceback).
No subcommand replaces a file or directory it did not write unless ``--overwrite`` is given (see the README).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import vlmprune
from vlmprune import checks, prune, viz
from vlmprune.bench import add_arguments as add_bench_args
from vlmprune.bench import main_from_args
from vlmprune.demo import prepare_inputs, run_demo
from vlmprune.evaluation.runner import add_eval_args, run_from_args
from vlmprune.io.checkpoint import ORBAX_CHECKPOINT, read_hf_config, save_model
from vlmprune.io.safe_output import check_dir_target, check_file_target
from vlmprune.models.llava import load_config
from vlmprune.models.vision.clip import clip_configs
from vlmprune.prune.base import slot_count
from vlmprune.video_input import read_frames, video_prompt_inputs

#: what the CLI calls each LLaVA model type in its messages
FAMILY_NAMES = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "llava_onevision": "LLaVA-OneVision"}


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def int_list(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> (0, 1, 2)."""
    try:
        out = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not out:
        raise argparse.ArgumentTypeError("empty list")
    return out


#: CLI flag (argparse dest) -> pruner field
METHOD_FLAGS = {
    "keep": "num_keep",
    "important_ratio": "important_ratio",
    "budget_rate": "budget_rate",
    "alpha": "alpha",
    "layer": "layer",
    "dominant": "dominant",
    "contextual": "contextual",
    "keep_ratio": "keep_ratio",
    "low_layers": "low_layers",
    "high_layers": "high_layers",
    "clip_path": "clip_path",
}
#: flags that set a budget (the --compare specs carry their own)
BUDGET_FLAGS = ("keep", "keep_ratio", "budget_rate", "dominant", "contextual")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning (see vlmprune.prune.REGISTRY)")
    g.add_argument(
        "--method",
        default="none",
        help="none, vispruner, fastervlm, hired, hero, divprune, visionzip, "
        "prumerge_plus, random, uniform, fastv; or a spec such as "
        "vispruner:64:important_ratio=0.25",
    )
    g.add_argument("--keep", type=positive_int, help="visual tokens kept per image (num_keep)")
    g.add_argument("--important-ratio", type=float, help="VisPruner: share of tokens chosen by CLS attention")
    g.add_argument("--budget-rate", type=float, help="HiRED: token budget rate")
    g.add_argument("--keep-ratio", type=float, help="HERO / FastV: share of visual tokens kept")
    g.add_argument("--alpha", type=float, help="HiRED/HERO: alpha")
    g.add_argument(
        "--layer",
        type=int,
        help="vision layer whose CLS attention scores tokens (default: feature "
        "layer); FastV: the LLM layer after which it prunes",
    )
    g.add_argument("--low-layers", type=int_list, metavar="I,J,...", help="HERO: vision layers scoring the tiles")
    g.add_argument("--high-layers", type=int_list, metavar="I,J,...", help="HERO: vision layers scoring the thumbnail")
    g.add_argument("--clip-path", default=None, help="HERO: local directory of a full HF CLIP checkpoint (both towers)")
    g.add_argument("--dominant", type=positive_int, help="VisionZip: dominant tokens")
    g.add_argument("--contextual", type=positive_int, help="VisionZip: contextual tokens")


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--no-weight-scan",
        action="store_true",
        help="skip the NaN/inf scan of the weights (faster load; a broken weight then goes unnoticed)",
    )


def _given(args, dests) -> dict:
    return {d: getattr(args, d) for d in dests if getattr(args, d, None) is not None}


def pruner_from_args(args):
    """The pruner the method flags describe, or None. Raises SystemExit for a flag that does not fit."""
    given = _given(args, METHOD_FLAGS)
    if args.method in (None, "none"):
        if given:
            raise SystemExit(
                f"error: {', '.join(_flag(d) for d in given)} given without --method; add --method "
                f"(one of {', '.join(sorted(prune.REGISTRY))})"
            )
        return None
    if ":" in args.method:  # a spec, e.g. vispruner:64:important_ratio=0.25 (vlmprune.prune.parse_spec)
        if given:
            raise SystemExit(
                f"error: give the settings in the --method spec or as flags, not both "
                f"({', '.join(_flag(d) for d in given)})"
            )
        try:
            return prune.parse_spec(args.method)
        except ValueError as e:
            raise SystemExit(f"error: --method: {e}") from None
    cls = prune.REGISTRY.get(args.method.lower().replace("-", "_"))
    if cls is None:
        raise SystemExit(
            f"error: unknown --method {args.method!r}; choose from none, {', '.join(sorted(prune.REGISTRY))}"
        )
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for flag, v in given.items():
        field = METHOD_FLAGS[flag]
        if field not in fields:
            raise SystemExit(f"error: {_flag(flag)} does not apply to --method {args.method}")
        kw[field] = v
    return prune.get(cls.name, **kw)


def compare_pruners(args, num_tokens: int) -> list:
    """The ``--compare`` panels: one pruner (or None) per spec; the non-budget method flags (e.g. --clip-path)
    go to every listed method that has the setting."""

    if args.method not in (None, "none"):
        raise SystemExit("error: give either --method or --compare, not both")
    budget = _given(args, BUDGET_FLAGS)
    if budget:
        raise SystemExit(
            f"error: {', '.join(_flag(d) for d in budget)} cannot be combined with --compare (write the "
            "budget in the spec, e.g. vispruner:64)"
        )
    try:
        specs = viz.parse_specs(args.compare)
    except ValueError as e:
        raise SystemExit(f"error: --compare: {e}") from None
    bad = [n for n, _ in specs if n not in ("none", "full") and n not in prune.REGISTRY]
    if bad:
        raise SystemExit(
            f"error: unknown method(s) {bad} in --compare; choose from none, {', '.join(sorted(prune.REGISTRY))}"
        )
    settings = _given(args, set(METHOD_FLAGS) - set(BUDGET_FLAGS))
    used, out = set(), []
    for name, b in specs:
        fields = set() if name in ("none", "full") else {f.name for f in dataclasses.fields(prune.REGISTRY[name])}
        kw = {METHOD_FLAGS[d]: v for d, v in settings.items() if METHOD_FLAGS[d] in fields}
        used |= {d for d in settings if METHOD_FLAGS[d] in fields}
        try:
            out.append(viz.make_pruner(name, b, num_tokens=num_tokens, **kw))
        except ValueError as e:
            raise SystemExit(f"error: --compare: {e}") from None
    unused = sorted(set(settings) - used)
    if unused:
        raise SystemExit(f"error: {', '.join(_flag(d) for d in unused)} applies to none of the --compare methods")
    return out


def _read_config(model_dir: str):
    """The checkpoint's range-checked config (no weights are read)."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} not found")
    return load_config(model_dir)[1]


def _validate_pruner(pruner, cfg) -> None:
    """Everything about a pruner that can be checked from the config, before the weights are loaded."""
    if pruner is None:
        return
    pruner.validate(cfg)
    clip = getattr(pruner, "clip_path", None)
    if clip is not None:
        if not os.path.isdir(clip):
            raise FileNotFoundError(f"--clip-path {clip!r} is not a directory")
        vis, _, _ = clip_configs(read_hf_config(clip))
        if (vis.image_size, vis.patch_size) != (cfg.vision.image_size, cfg.vision.patch_size):
            raise ValueError(
                f"--clip-path {clip}: its image tower takes {vis.image_size}px images in "
                f"{vis.patch_size}px patches; the model's tiles are {cfg.vision.image_size}px in "
                f"{cfg.vision.patch_size}px patches"
            )


def _open_image(path: str):
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} not found")
    with Image.open(path) as im:  # PIL's error names the file
        return im.convert("RGB")


def cmd_demo(args) -> int:

    run_demo(args.checkpoint, max_new_tokens=args.max_new_tokens, overwrite=args.overwrite, flag="--overwrite")
    return 0


def cmd_generate(args) -> int:

    pruner = pruner_from_args(args)
    checks.check_float("--temperature", args.temperature, lo=0.0, lo_open=True)
    checks.check_float("--top-p", args.top_p, lo=0.0, hi=1.0, lo_open=True)
    video = None if args.video is None else read_frames(args.video)
    image = _open_image(args.image) if video is None else None
    cfg = _read_config(args.model)
    if video is not None and cfg.model_type != "llava_onevision":
        raise ValueError(f"--video needs a LLaVA-OneVision checkpoint; {args.model} is {cfg.model_type}")
    _validate_pruner(pruner, cfg)
    print(f"[vlmprune] loading {args.model} ...", file=sys.stderr, flush=True)
    model = vlmprune.load(args.model, dtype=args.dtype, check_finite=not args.no_weight_scan)
    if video is None:
        x = prepare_inputs(model, [image], [args.prompt])
    else:
        x = video_prompt_inputs(model, video, args.prompt)
    t = time.perf_counter()
    out = model.generate(
        x["input_ids"],
        x.get("pixel_values"),
        pixel_values_videos=x.get("pixel_values_videos"),
        attention_mask=x["attention_mask"],
        image_sizes=x.get("image_sizes"),
        pruner=pruner,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        text=[args.prompt],
    )
    dt = time.perf_counter() - t
    text = model.processor.tokenizer.decode(out[0], skip_special_tokens=True)
    print(text)
    label = "none" if pruner is None else pruner.name
    if cfg.model_type == "llava":
        kept = slot_count(pruner, cfg, None, cfg.tokens_per_image, 0)
        print(
            f"[vlmprune] {label}: visual tokens: {kept}/{cfg.tokens_per_image}, {dt:.2f}s incl. compilation",
            file=sys.stderr,
        )
    elif video is not None:
        frames = x["pixel_values_videos"].shape[1]
        print(
            f"[vlmprune] {label}: LLaVA-OneVision video of {frames} frames, {dt:.2f}s incl. compilation",
            file=sys.stderr,
        )
    else:
        print(
            f"[vlmprune] {label}: {FAMILY_NAMES.get(cfg.model_type, cfg.model_type)} image "
            f"{tuple(int(v) for v in x['image_sizes'][0])}, {dt:.2f}s incl. compilation",
            file=sys.stderr,
        )
    return 0


def cmd_eval(args) -> int:

    try:  # user errors (flags, data, labels, checkpoint files, resume conflicts): a message, no traceback
        run_from_args(args, pruner_from_args(args))
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


def cmd_bench(args) -> int:

    return main_from_args(args)


def cmd_convert(args) -> int:

    if not os.path.isdir(args.hf_dir):
        raise FileNotFoundError(f"source directory {args.hf_dir!r} not found")
    check_dir_target(
        args.out_dir, ORBAX_CHECKPOINT, overwrite=args.overwrite, protect=(args.hf_dir,), flag="--overwrite"
    )
    _read_config(args.hf_dir)
    print(f"[vlmprune] reading {args.hf_dir} ...", file=sys.stderr, flush=True)
    model = vlmprune.load(args.hf_dir, dtype=args.dtype, check_finite=not args.no_weight_scan)
    save_model(model, args.out_dir, overwrite=args.overwrite, protect=(args.hf_dir,), flag="--overwrite")
    print(f"[vlmprune] wrote {args.out_dir} (load it with vlmprune.load)", file=sys.stderr)
    return 0


def cmd_visualize(args) -> int:

    viz.image_format(args.out)
    check_file_target(args.out, overwrite=args.overwrite, flag="--overwrite")
    image = _open_image(args.image)
    cfg = _read_config(args.model)
    if args.compare:
        pruners = compare_pruners(args, cfg.tokens_per_image)
    else:
        pruners = [pruner_from_args(args)]
    for p in pruners:
        if isinstance(p, prune.LLMPruner):
            raise ValueError(f"{p.name} prunes inside the LLM; visualize shows pruning before the LLM only")
        _validate_pruner(p, cfg)
    print(f"[vlmprune] loading {args.model} ...", file=sys.stderr, flush=True)
    model = vlmprune.load(args.model, dtype=args.dtype, check_finite=not args.no_weight_scan)
    kw = dict(grid_lines=not args.no_grid)
    try:
        if args.compare:
            fig = viz.compare(model, image, pruners, args.prompt, **kw)
        else:
            fig = viz.plot_kept(model, image, pruners[0], args.prompt, **kw)
    except NotImplementedError as e:
        raise ValueError(str(e)) from e
    viz.save(fig, args.out, dpi=args.dpi, overwrite=args.overwrite, flag="--overwrite")
    print(f"[vlmprune] wrote {args.out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmprune", description="Training-free visual-token pruning for LLaVA in JAX")
    p.add_argument(
        "--traceback", action="store_true", help="show the Python traceback of an error (also VLMPRUNE_TRACEBACK=1)"
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="offline end-to-end run on a tiny random LLaVA-1.5 (built once)")
    d.add_argument(
        "--checkpoint",
        default=None,
        help="directory for the tiny checkpoint (default "
        "checkpoints/tiny-llava-1.5); reused if it is one, built if absent or empty, refused otherwise",
    )
    d.add_argument("--max-new-tokens", type=positive_int, default=16)
    d.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild the tiny checkpoint, replacing the whole --checkpoint directory whatever it holds",
    )
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="answer a prompt about an image")
    g.add_argument("--model", required=True, help="HF LLaVA directory or vlmprune checkpoint")
    media = g.add_mutually_exclusive_group(required=True)
    media.add_argument("--image")
    media.add_argument(
        "--video",
        nargs="+",
        metavar="FRAMES",
        help="LLaVA-OneVision: a video as frame image files, a directory of frames or a uint8 (F, H, W, 3) .npy",
    )
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=positive_int, default=64)
    _add_load_args(g)
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    _add_method_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="convert a HF LLaVA directory into a vlmprune (orbax) checkpoint")
    c.add_argument("hf_dir")
    c.add_argument("out_dir", help="absent or empty directory, or an earlier vlmprune checkpoint (replaced)")
    c.add_argument("--overwrite", action="store_true", help="replace out_dir whatever it holds (never the source)")
    _add_load_args(c)
    c.set_defaults(func=cmd_convert)

    v = sub.add_parser("visualize", help="draw the visual tokens a pruning method keeps over the image")
    v.add_argument("--model", required=True, help="HF LLaVA directory or vlmprune checkpoint")
    v.add_argument("--image", required=True)
    v.add_argument("--prompt", default="What is in the image?", help="instruction (read by text-guided pruners)")
    v.add_argument(
        "--out",
        default="kept.png",
        help="image to write, format by suffix: .png, .jpg/.jpeg, .pdf, "
        ".svg (default kept.png); an existing file is kept",
    )
    v.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    v.add_argument(
        "--compare",
        default=None,
        metavar="SPECS",
        help="one panel per method:budget, e.g. vispruner:64,fastervlm:64,hired:0.2,none",
    )
    v.add_argument("--no-grid", action="store_true", help="no patch grid lines")
    v.add_argument("--dpi", type=positive_int, default=100)
    _add_load_args(v)
    _add_method_args(v)
    v.set_defaults(func=cmd_visualize)

    e = sub.add_parser("eval", help="run a benchmark (pope, textvqa, gqa, mme, scienceqa_img); resumable")
    add_eval_args(e)
    _add_method_args(e)  # the pruning flags, --clip-path included
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser(
        "bench",
        help="efficiency benchmark: FLOPs, encoder/selection/prefill time, TTFT, decode "
        "tokens/s, KV cache and memory per method (JSON, markdown, PNG)",
    )
    add_bench_args(b)
    b.set_defaults(func=cmd_bench)
    return p


#: what a user's bad flag, file or input raises (NotImplementedError: a method/model pairing not implemented);
#: anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, OSError, NotImplementedError)


def main(argv=None) -> int:
    """Run one subcommand. A user error (bad flag, file, checkpoint or input) ends in ``error: ...`` and exit
    status 1 (argparse's own usage errors: 2); other exceptions are bugs and show their traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if args.traceback or os.environ.get("VLMPRUNE_TRACEBACK"):
            raise
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    raise SystemExit(main())
