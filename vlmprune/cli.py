"""Command line: ``vlmprune demo | generate | convert``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time


def _add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning (see vlmprune.prune.REGISTRY)")
    g.add_argument("--method", default="none", help="none, vispruner, fastervlm, hired, divprune, visionzip, "
                                                     "prumerge_plus, random, uniform")
    g.add_argument("--keep", type=int, help="visual tokens kept per image (num_keep)")
    g.add_argument("--important-ratio", type=float, help="VisPruner: share of tokens chosen by CLS attention")
    g.add_argument("--budget-rate", type=float, help="HiRED: token budget rate")
    g.add_argument("--alpha", type=float, help="HiRED/HERO: alpha")
    g.add_argument("--layer", type=int, help="vision layer whose CLS attention scores tokens (default: feature layer)")
    g.add_argument("--dominant", type=int, help="VisionZip: dominant tokens")
    g.add_argument("--contextual", type=int, help="VisionZip: contextual tokens")


def pruner_from_args(args):
    from vlmprune import prune

    if args.method in (None, "none"):
        return None
    names = {"keep": "num_keep", "important_ratio": "important_ratio", "budget_rate": "budget_rate",
             "alpha": "alpha", "layer": "layer", "dominant": "dominant", "contextual": "contextual"}
    cls = prune.REGISTRY.get(args.method.replace("-", "_"))
    if cls is None:
        raise SystemExit(f"error: unknown --method {args.method!r}; choose from none, {', '.join(sorted(prune.REGISTRY))}")
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for flag, field in names.items():
        v = getattr(args, flag, None)
        if v is None:
            continue
        if field not in fields:
            raise SystemExit(f"error: --{flag.replace('_', '-')} does not apply to --method {args.method}")
        kw[field] = v
    return prune.get(args.method, **kw)


def cmd_demo(args) -> int:
    from vlmprune.demo import run_demo

    run_demo(args.checkpoint, max_new_tokens=args.max_new_tokens)
    return 0


def cmd_generate(args) -> int:
    from PIL import Image

    import vlmprune
    from vlmprune.demo import prepare_inputs

    pruner = pruner_from_args(args)
    if not os.path.isfile(args.image):
        raise SystemExit(f"error: image {args.image!r} not found")
    print(f"[vlmprune] loading {args.model} ...", file=sys.stderr, flush=True)
    model = vlmprune.load(args.model, dtype=args.dtype)
    image = Image.open(args.image).convert("RGB")
    x = prepare_inputs(model, [image], [args.prompt])
    t = time.perf_counter()
    out = model.generate(x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"], pruner=pruner,
                         max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed)
    dt = time.perf_counter() - t
    text = model.processor.tokenizer.decode(out[0], skip_special_tokens=True)
    kept = model.config.tokens_per_image if pruner is None else pruner.num_slots(model.config)
    print(text)
    print(f"[vlmprune] visual tokens: {kept}/{model.config.tokens_per_image}, {dt:.2f}s incl. compilation",
          file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from vlmprune.evaluation.runner import eval_pruner, run_from_args

    try:  # user errors (flags, data, labels, checkpoint files, resume conflicts): a message, no traceback
        run_from_args(args, eval_pruner(pruner_from_args(args), args))
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}")
    return 0


def cmd_bench(args) -> int:
    from vlmprune.bench import main_from_args

    return main_from_args(args)


def cmd_convert(args) -> int:
    import vlmprune

    print(f"[vlmprune] reading {args.hf_dir} ...", file=sys.stderr, flush=True)
    model = vlmprune.load(args.hf_dir, dtype=args.dtype)
    model.save(args.out_dir)
    print(f"[vlmprune] wrote {args.out_dir} (load it with vlmprune.load)", file=sys.stderr)
    return 0


def cmd_visualize(args) -> int:
    import vlmprune
    from vlmprune import prune, viz

    if not os.path.isfile(args.image):
        raise SystemExit(f"error: image {args.image!r} not found")
    if not os.path.isdir(args.model):
        raise SystemExit(f"error: model directory {args.model!r} not found")
    specs = pruner = None
    if args.compare:
        if args.method not in (None, "none") or args.keep is not None:
            raise SystemExit("error: give either --method/--keep or --compare, not both")
        try:
            specs = viz.parse_specs(args.compare)
        except ValueError as e:
            raise SystemExit(f"error: --compare: {e}")
        bad = [n for n, _ in specs if n not in ("none", "full") and n not in prune.REGISTRY]
        if bad:
            raise SystemExit(f"error: unknown method(s) {bad} in --compare; choose from none, "
                             f"{', '.join(sorted(prune.REGISTRY))}")
    else:
        pruner = pruner_from_args(args)
    print(f"[vlmprune] loading {args.model} ...", file=sys.stderr, flush=True)
    model = vlmprune.load(args.model, dtype=args.dtype)
    kw = dict(out=args.out, grid_lines=not args.no_grid, dpi=args.dpi)
    try:
        if specs is not None:
            viz.compare(model, args.image, specs, args.prompt, **kw)
        else:
            viz.plot_kept(model, args.image, pruner, args.prompt, **kw)
    except (ValueError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}")
    print(f"[vlmprune] wrote {args.out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmprune", description="Training-free visual-token pruning for LLaVA in JAX")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="offline end-to-end run on a tiny random LLaVA-1.5 (built once)")
    d.add_argument("--checkpoint", default=None, help="directory for the tiny checkpoint (default checkpoints/tiny-llava-1.5)")
    d.add_argument("--max-new-tokens", type=int, default=16)
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="answer a prompt about an image")
    g.add_argument("--model", required=True, help="HF LLaVA directory or vlmprune checkpoint")
    g.add_argument("--image", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    _add_method_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="convert a HF LLaVA directory into a vlmprune (orbax) checkpoint")
    c.add_argument("hf_dir")
    c.add_argument("out_dir")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.set_defaults(func=cmd_convert)

    v = sub.add_parser("visualize", help="draw the visual tokens a pruning method keeps over the image (PNG)")
    v.add_argument("--model", required=True, help="HF LLaVA directory or vlmprune checkpoint")
    v.add_argument("--image", required=True)
    v.add_argument("--prompt", default="What is in the image?", help="instruction (read by text-guided pruners)")
    v.add_argument("--out", default="kept.png", help="PNG to write (default kept.png)")
    v.add_argument("--compare", default=None, metavar="SPECS",
                   help="one panel per method:budget, e.g. vispruner:64,fastervlm:64,hired:0.2,none")
    v.add_argument("--no-grid", action="store_true", help="no patch grid lines")
    v.add_argument("--dpi", type=int, default=100)
    v.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    _add_method_args(v)
    v.set_defaults(func=cmd_visualize)

    from vlmprune.evaluation.runner import add_eval_args

    e = sub.add_parser("eval", help="run a benchmark (pope, textvqa, gqa, mme, scienceqa_img); resumable")
    add_eval_args(e)
    _add_method_args(e)
    try:
        e.add_argument("--clip-path", default=None, help="HERO: a full HF CLIP checkpoint (both towers)")
    except argparse.ArgumentError:  # already among the shared pruning flags
        pass
    e.set_defaults(func=cmd_eval)

    from vlmprune.bench import add_arguments as add_bench_args

    b = sub.add_parser("bench", help="efficiency benchmark: FLOPs, encoder/selection/prefill time, TTFT, decode "
                                     "tokens/s, KV cache and memory per method (JSON, markdown, PNG)")
    add_bench_args(b)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
