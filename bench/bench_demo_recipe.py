"""Recipe study for `protege demo` (issue 16): which recipe makes the pruned SmolLM2 student's greedy
answers end and stop looping, not only lower its reverse KL, within the demo's ~10-minute budget.

    python bench/bench_demo_recipe.py                  # every row; writes bench/results/demo_recipe.md (+ .json)
    python bench/bench_demo_recipe.py --rows 0 3       # some rows (results of earlier rows in --work are kept)
    python bench/bench_demo_recipe.py --list           # the rows and their overrides

Every row starts from the same pruned student (SmolLM2-135M-Instruct keeping 24 of its 30 decoder layers,
`protege prune`, strategy even or similarity) and runs protege/recipes/demo_smollm2.yaml with the row's
overrides, in this process, exactly as `protege demo` does. After training, on two prompt sets:
- held-out: the first 16 held-out prompts of builtin:everyday (never trained on);
- unseen: builtin:unseen, 16 questions written apart from the training set (no train/held-out prompt is a
  rewording of one, tests/test_demo.py);
we measure (protege.eval.evaluate_models) the per-token reverse KL on student samples (exact over the
vocabulary, rollout cap), and for greedy answers up to twice the demo's training cap (96 tokens):
distinct-2, repetition rate (share of repeated 4-grams), EOS rate, teacher NLL and length, with the
teacher's own greedy values beside them. The bar of issue 16 is checked per set: reverse KL at least 50%
below the pruned start, distinct-2 >= 0.8x the teacher's, repetition <= 1.5x the teacher's, EOS rate
>= 0.5x the teacher's. The pruned start and the teacher's side are evaluated once per strategy.

Wall times are of this process alone on the machine it ran on (2 threads); the demo adds model loading
and the before-training evaluation to a row's training time.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BAR = {"rkl_drop": 0.5, "distinct_2": 0.8, "repetition": 1.5, "eos": 0.5}
COLD128 = ["stages.cold_start.rollout.max_new_tokens=128"]
# (name, layer strategy, overrides of protege/recipes/demo_smollm2.yaml); the first is the shipped recipe
ROWS: list[tuple[str, str, list[str]]] = [
    ("demo recipe (cold start: 6 steps forward KL on 48-token teacher samples; 20 on-policy reverse KL, "
     "lr 1e-4)", "even", []),
    ("on-policy forward KL", "even", ["stages.on_policy.loss.name=forward_kl"]),
    ("on-policy JSD(0.5)", "even", ["stages.on_policy.loss.name=jsd"]),
    ("longer cold start: 14 steps, then 12 on-policy reverse KL", "even",
     ["stages.cold_start.train.max_steps=14", "stages.on_policy.train.max_steps=12"]),
    ("cold start on 128-token teacher samples (more of them end)", "even", COLD128),
    ("layers by similarity", "similarity", []),
    ("lr 3e-4", "even", ["optim.lr=3e-4"]),
    ("lr 1e-3", "even", ["optim.lr=1e-3"]),
    ("on-policy rollouts at temperature 0.5 (the states greedy decoding visits)", "even",
     ["stages.on_policy.rollout.temperature=0.5"]),
    ("lr 1e-3 + on-policy rollouts at temperature 0.5", "even",
     ["optim.lr=1e-3", "stages.on_policy.rollout.temperature=0.5"]),
    ("lr 3e-4 + on-policy rollouts at temperature 0.5", "even",
     ["optim.lr=3e-4", "stages.on_policy.rollout.temperature=0.5"]),
]


def met(after: dict, before: dict) -> dict:
    """Issue 16's bar on one prompt set: {criterion: (value, ok)}."""
    t = lambda k: after[f"teacher_greedy_{k}"]  # noqa: E731
    drop = 1 - after["rkl"] / before["rkl"]
    return {"rkl_drop": (drop, drop >= BAR["rkl_drop"]),
            "distinct_2": (after["greedy_distinct_2"] / t("distinct_2"),
                           after["greedy_distinct_2"] >= BAR["distinct_2"] * t("distinct_2")),
            "repetition": (after["greedy_repetition_rate"] / max(t("repetition_rate"), 1e-9),
                           after["greedy_repetition_rate"] <= BAR["repetition"] * t("repetition_rate")),
            "eos": (after["greedy_eos_rate"] / max(t("eos_rate"), 1e-9),
                    after["greedy_eos_rate"] >= BAR["eos"] * t("eos_rate"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", default=None, help="row indices (default: all)")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    ap.add_argument("--work", default=str(ROOT / "outputs" / "demo_recipe"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "demo_recipe.md"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.list:
        for i, (name, strategy, ov) in enumerate(ROWS):
            print(f"{i}: {name} [{strategy}] {' '.join(ov)}")
        return
    import torch

    from protege.data import PromptTokenizer, load_rows, to_examples
    from protege.demo import pruned_pair, snapshot
    from protege.modeling import eos_ids, resolve_model
    from protege.prompts import load_builtin_prompts
    from protege.recipe import load_recipe, run_recipe
    from protege.recipes import recipe_path

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "results.json"
    results = json.loads(saved.read_text()) if saved.exists() else {"rows": {}, "start": {}}
    teacher_path = resolve_model("smollm2")
    rows = range(len(ROWS)) if args.rows is None else args.rows
    starts: dict = {}
    caches: dict = {}
    for i in rows:
        name, strategy, overrides = ROWS[i]
        if strategy not in starts:
            tok, teacher, student, kept = pruned_pair(teacher_path, 24, strategy)
            base = {"student": {"path": "in-memory:pruned"}, "teacher": {"path": teacher_path}}
            cfg0 = load_recipe(recipe_path("demo_smollm2"), [], base=base)[0][1]
            pt = PromptTokenizer(tok, cfg0.data.max_prompt_tokens)
            ids = lambda rows_: [pt.prompt_ids(e) for e in to_examples(rows_).examples]  # noqa: E731
            sets = {"heldout": ids(load_rows("builtin:everyday", "heldout"))[:16],
                    "unseen": ids([{"prompt": p} for p in load_builtin_prompts("unseen")])}
            cap = cfg0.rollout.max_new_tokens
            ev = dict(max_new_tokens=cap, greedy_max_new_tokens=2 * cap, eos_ids=eos_ids(tok), bf16=False)
            caches = caches or {k: {} for k in sets}
            t = time.time()
            before = snapshot(student, tok, sets, [], ev, teacher=teacher, caches=caches)
            print(f"[{strategy}] pruned start evaluated in {time.time() - t:.0f} s: " + "; ".join(
                f"{k} rkl {before[k]['rkl']:.3f} distinct-2 {before[k]['greedy_distinct_2']:.2f}" for k in sets),
                flush=True)
            results["start"][strategy] = {"kept": kept, **{k: before[k] for k in sets}}
            starts[strategy] = (student, sets, ev)
        pruned, sets, ev = starts[strategy]
        student = copy.deepcopy(pruned)
        stages = load_recipe(recipe_path("demo_smollm2"), [*overrides, f"output.dir={work}/row{i}", "output.overwrite=true"],
                             base={"student": {"path": "in-memory:pruned"}, "teacher": {"path": teacher_path}})
        t = time.time()
        histories = run_recipe(stages, student=student, teacher_model=teacher, tokenizer=tok)
        train_s = time.time() - t
        t = time.time()
        after = snapshot(student, tok, sets, [], ev, teacher=teacher, caches=caches)
        eval_s = time.time() - t
        results["rows"][str(i)] = {"name": name, "strategy": strategy, "overrides": overrides, "train_s": train_s,
                                   "eval_s": eval_s, "steps": {n: len(h) for n, h in histories.items()},
                                   "truncation_rate_last": {n: h[-1].get("truncation_rate") for n, h in histories.items()
                                                            if h},
                                   **{k: after[k] for k in sets}}
        b = results["start"][strategy]
        print(f"row {i} ({name}): train {train_s:.0f} s, eval {eval_s:.0f} s; " + "; ".join(
            f"{k}: rkl {after[k]['rkl']:.3f} (start {b[k]['rkl']:.3f}) distinct-2 {after[k]['greedy_distinct_2']:.2f} "
            f"rep {after[k]['greedy_repetition_rate']:.2f} eos {after[k]['greedy_eos_rate']:.2f}" for k in sets),
            flush=True)
        saved.write_text(json.dumps(results, indent=1))
        Path(args.out).write_text(report(results))
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


def report(results: dict) -> str:
    import platform

    import torch
    import transformers

    lines = ["# Recipe study for `protege demo`: greedy answers that end and do not loop", "",
             f"- written: {datetime.datetime.now().isoformat(timespec='seconds')}; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
             f"transformers {transformers.__version__}",
             "- command: `python bench/bench_demo_recipe.py` (bench/bench_demo_recipe.py's docstring says what "
             "every column is); each row = protege/recipes/demo_smollm2.yaml + the row's overrides, from the same "
             "pruned start (24 of 30 layers)",
             f"- bar (issue 16), per prompt set: reverse KL >= {BAR['rkl_drop']:.0%} below the start, distinct-2 >= "
             f"{BAR['distinct_2']}x the teacher's, repetition <= {BAR['repetition']}x the teacher's, EOS rate >= "
             f"{BAR['eos']}x the teacher's; greedy answers up to 96 tokens (2x the training cap)", ""]
    sets = ("heldout", "unseen")
    any_start = next(iter(results["start"].values()))
    lines += ["| set | teacher distinct-2 | teacher repetition | teacher EOS rate | teacher greedy length |",
              "|---|---:|---:|---:|---:|"]
    for k in sets:
        s = any_start[k]
        lines.append(f"| {k} | {s['teacher_greedy_distinct_2']:.3f} | {s['teacher_greedy_repetition_rate']:.3f} | "
                     f"{s['teacher_greedy_eos_rate']:.3f} | {s['teacher_greedy_length']:.1f} |")
    lines += ["", "| row | set | reverse KL (start -> after) | distinct-2 | repetition | EOS rate | teacher NLL of "
              "greedy | greedy length | bar met | train s | eval s |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for strategy, s in results["start"].items():
        for k in sets:
            lines.append(f"| pruned start ({strategy}) | {k} | {s[k]['rkl']:.3f} | {s[k]['greedy_distinct_2']:.3f} | "
                         f"{s[k]['greedy_repetition_rate']:.3f} | {s[k]['greedy_eos_rate']:.3f} | "
                         f"{s[k]['greedy_teacher_nll']:.3f} | {s[k]['greedy_length']:.1f} | - | - | - |")
    for i, r in sorted(results["rows"].items(), key=lambda kv: int(kv[0])):
        b = results["start"][r["strategy"]]
        for k in sets:
            a, checks = r[k], met(r[k], b[k])
            ok = "yes" if all(v[1] for v in checks.values()) else "no: " + ", ".join(
                f"{c} {v[0]:.2f}" for c, v in checks.items() if not v[1])
            lines.append(f"| {i}. {r['name']} | {k} | {b[k]['rkl']:.3f} -> {a['rkl']:.3f} ({-100 * checks['rkl_drop'][0]:.0f}%) | "
                         f"{a['greedy_distinct_2']:.3f} | {a['greedy_repetition_rate']:.3f} | {a['greedy_eos_rate']:.3f} | "
                         f"{a['greedy_teacher_nll']:.3f} | {a['greedy_length']:.1f} | {ok} | {r['train_s']:.0f} | "
                         f"{r['eval_s']:.0f} |")
    lines += ["", "Overrides per row (a row's note, when it has one, says what else ran on the machine):", ""]
    for i, r in sorted(results["rows"].items(), key=lambda kv: int(kv[0])):
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"- {i}: [{r['strategy']}] `{' '.join(r['overrides']) or '(none)'}`{note}")
    missing = [f"{i}. {name}" for i, (name, _, _) in enumerate(ROWS) if str(i) not in results["rows"]]
    if missing:
        lines += ["", "Rows of the script not run yet (no numbers): " + "; ".join(missing) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
