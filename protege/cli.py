"""The `protege` command line: a thin shell over the Python API.

    protege train config.yaml --train.max_steps 20 --loss.name jsd --loss.beta 0.5
    protege demo                       # the embedded SmolLM2 distillation, with a report
    protege prune --model M --keep 24 --out student/
    protege eval --student student/ --teacher smollm2   # held-out KL and greedy-answer metrics
    protege serve-teacher --model M --port 8000
    protege cache-teacher config.yaml --teacher.cache_dir cache/ --data.path completions.jsonl
    protege config                     # every config field with its default
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

EPILOG_TRAIN = """examples:
  protege train run.yaml
  protege train run.yaml --train.max_steps 100 --loss.name jsd --loss.beta 0.5
  protege train --student.path HuggingFaceTB/SmolLM2-135M-Instruct --teacher.path Qwen/Qwen3-4B \\
                --data.path prompts.jsonl --mix.lmbda 1.0 --loss.support student --loss.top_k 16
  protege train run.yaml --resume true        # continue from the newest checkpoint in output.dir

Overrides are --section.key VALUE or section.key=VALUE (values parsed as YAML).
Run `protege config` for every field, its default and its meaning.
A mistake in the config, a missing file or an unreachable teacher ends in one `error:` line;
--debug (or PROTEGE_DEBUG=1) shows the traceback instead."""

# What a user can cause and fix: bad values and files (ValueError, incl. config and checkpoint errors,
# pydantic's ValidationError), files and network (OSError, incl. FileNotFoundError and the teacher's
# TeacherUnavailable, a ConnectionError). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PROTEGE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    argv, rest = _split_overrides([a for a in argv if a != "--debug"])
    if argv and argv[0] == "demo":  # demo has its own flags; the rest are recipe overrides
        args, rest = parser.parse_known_args(argv)
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()
    try:
        return args.func(args, rest) or 0
    except USER_ERRORS as e:  # errors for people: one line, no traceback
        if debug:
            raise
        print(f"protege {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2


def quiet_libraries() -> None:
    """What the libraries print that tells a user nothing: httpx's INFO line per teacher request, and the
    transformers / hub progress bars of every model load and save (GGUF de-quantisation, weight loading, shard
    writing). protege's own step bar and log stay; PROTEGE_DEBUG=1 keeps everything."""
    if os.environ.get("PROTEGE_DEBUG", "").strip().lower() not in ("", "0", "false", "no"):
        return
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def build_parser() -> argparse.ArgumentParser:
    """The `protege` parser: each command's arguments, with `func(args, rest)` to run it."""
    parser = argparse.ArgumentParser(prog="protege", description="On-policy distillation of language models.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or PROTEGE_DEBUG=1); "
                        "may also follow the command")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="distil a student from a teacher (YAML config + overrides)",
                       description="Distil a student from a teacher on its own samples.", epilog=EPILOG_TRAIN,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML config file (optional if every required field is overridden)")
    p.set_defaults(func=_train)

    p = sub.add_parser("config", help="list every config field with its default",
                       description="Every config field with its default and meaning.")
    p.set_defaults(func=_config)
    _add_prune(sub)
    _add_eval(sub)
    from protege import cache_teacher

    cache_teacher.add_parser(sub)  # protege cache-teacher

    try:
        from protege.server import cli as server_cli
    except ImportError:  # pragma: no cover - the server is part of the package; keep the CLI usable regardless
        server_cli = None
    if server_cli is not None:
        p = sub.add_parser("serve-teacher", help="serve a teacher's logprobs over HTTP (batched, binary top-k)",
                           description="Serve teacher logprobs over HTTP with request batching.")
        server_cli.add_arguments(p)
        p.set_defaults(func=lambda a, rest: server_cli.run(a))

    try:
        from protege import demo
    except ImportError:  # pragma: no cover
        demo = None
    if demo is not None:
        demo.add_parser(sub)
    return parser


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="make a smaller student by dropping decoder layers",
                       description="Make a student from a llama/qwen-style model by dropping decoder layers.",
                       epilog="examples:\n  protege prune --model teacher/ --keep 24 --strategy similarity --out student/"
                       "\n  protege prune --model smollm2 --keep 24 --out student/",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF hub id, HF folder, .gguf file, or smollm2 (embedded)")
    p.add_argument("--keep", type=int, required=True, help="number of decoder layers to keep")
    p.add_argument("--strategy", choices=["even", "similarity"], default="even",
                   help="evenly spaced layers, or the layers that change their input most on sample prompts")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", required=True, help="folder for the pruned HF checkpoint")
    p.set_defaults(func=_prune)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="held-out metrics of a student against an in-process teacher",
                       description="Student vs teacher on held-out prompts: reverse KL on student samples, forward "
                       "KL on teacher samples, teacher NLL / distinct-2 / length / EOS rate of greedy answers.",
                       epilog="example:\n  protege eval --student outputs/demo/student --teacher smollm2",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="student: HF folder, hub id, .gguf, or 'smollm2'")
    p.add_argument("--teacher", required=True, help="teacher: HF folder, hub id, .gguf, or 'smollm2'")
    p.add_argument("--prompts", default="builtin:everyday", help="held-out prompts (file or builtin:everyday)")
    p.add_argument("--n", type=int, default=16, help="number of prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for generation")
    p.set_defaults(func=_eval)


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """The config overrides of `train` and `cache-teacher` are not argparse options: (argv for argparse, them)."""
    if not argv or argv[0] not in ("train", "cache-teacher"):
        return argv, []
    head = [a for a in argv[1:2] if not a.startswith("-") and "=" not in a]
    tail = argv[1 + len(head):]
    flags = [a for a in tail if a in ("-h", "--help")]
    return [argv[0], *head, *flags], [a for a in tail if a not in ("-h", "--help")]


def one_line(e: BaseException) -> str:
    """The error's message on one line (a multi-line message, e.g. YAML's, is joined with spaces)."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return text or type(e).__name__


def _train(args, rest) -> int:
    from protege.recipe import load_recipe, run_recipe

    stages = load_recipe(args.config, rest)
    t0 = time.time()
    histories = run_recipe(stages)
    for name, history in histories.items():
        evals = [h for h in history if "eval/rkl" in h]
        if len(evals) >= 2:
            print(f"{name}: held-out reverse KL {evals[0]['eval/rkl']:.4f} -> {evals[-1]['eval/rkl']:.4f}")
    print(f"done in {time.time() - t0:.0f} s; student saved to {stages[-1][1].output.dir}/student")
    return 0


def _config(args, rest) -> int:
    from protege.config import describe_config

    print("protege config fields (YAML sections; override with --section.key VALUE):\n")
    print(describe_config())
    return 0


def _prune(args, rest) -> int:
    from protege.prune import prune_checkpoint

    summary = prune_checkpoint(args.model, args.out, args.keep, strategy=args.strategy, dtype=args.dtype)
    print(summary)
    return 0


def _eval(args, rest) -> int:
    from protege.eval import evaluate_paths

    metrics = evaluate_paths(args.student, args.teacher, prompts=args.prompts, n=args.n,
                             max_new_tokens=args.max_new_tokens, bf16=args.bf16)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
