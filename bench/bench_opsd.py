"""On-policy self-distillation (OPSD) on the arithmetic task: the student, shown the worked answer, teaches itself.

    python bench/bench_opsd.py --start-steps 1000 --steps 30 --lr 2e-4 --out bench/results/opsd_lr2e-4.md
                                           # ~10 min on 2 quiet cores (the start ~8 min, each run ~1 min)
    python bench/bench_opsd.py --quick     # a smaller version, for trying the script

Task and models: bench_quality.py's (3-digit addition with a worked answer, character tokenizer,
tiny Llama built from a config; its task/model/training helpers are imported, not copied).

1. Student start (2 layers, hidden 64): SFT from scratch with protege (loss.name=sft) on a 50/50 mix
   of plain rows (`347+589=` -> worked answer) and rows whose prompt already holds the worked answer
   (`347+589=` + <sep> + worked answer -> worked answer), so that, like a pretrained LLM, it can read
   a solution in its context. <sep> is the template's "\\n\\n", one <unk> token for this tokenizer.
2. From that start, each method runs the same optimizer steps, prompts per step, lr and schedule:
   - SFT on the worked answers     loss=sft mix.lmbda=0 (the dataset's worked answers)
   - OPSD, base teacher            teacher.self=base, reverse KL (full vocabulary), mix.lmbda=1, the
                                   privileged_context column = the worked answer (teacher prompt:
                                   data.privileged_template's default "{prompt}\\n\\n{privileged_context}")
   - OPSD, EMA teacher             the same with teacher.self=ema, teacher.ema_rate=0.05 (TRL's default)
   x 3 seeds; held-out exact match (greedy, problems never trained on) of the plain prompt, and for the
   start the exact match when the worked answer is in the prompt (how good the self-teacher's view is).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_quality as bq  # noqa: E402  (the task, the tiny models and the training helpers)

SEP = "\n\n"  # data.privileged_template's default separator; one <unk> token here
METHODS = {
    "SFT on the worked answers": ["loss.name=sft", "mix.lmbda=0"],
    "OPSD, teacher.self=base": ["teacher.self=base", "loss.name=reverse_kl", "mix.lmbda=1"],
    "OPSD, teacher.self=ema (rate 0.05)": ["teacher.self=ema", "teacher.ema_rate=0.05", "loss.name=reverse_kl",
                                           "mix.lmbda=1"],
}


def write_rows(path: Path, probs, mix_context: bool = False) -> None:
    """Rows with prompt, completion (the worked answer) and privileged_context (the same worked answer);
    mix_context: every other row instead shows the worked answer in the prompt itself (the start's SFT)."""
    rows = []
    for i, (a, b) in enumerate(probs):
        w = bq.worked(a, b)
        prompt = f"{a}+{b}=" + (SEP + w if mix_context and i % 2 else "")
        rows.append({"prompt": prompt, "completion": w, "privileged_context": w})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def distiller(student, tok, data: Path, out: Path, overrides: list[str]):
    from protege.config import load_config
    from protege.trainer import Distiller

    teacher = [] if any(o.startswith("teacher.self=") for o in overrides) else ["teacher.path=in-memory"]
    cfg = load_config(None, ["student.path=in-memory", *teacher, f"data.path={data}", "data.eval_prompts=0",
                             "output.diagnostics_top_k=0", "output.report_to=none", f"output.dir={out}",
                             "output.save_every=0", "train.num_threads=1", "rollout.max_new_tokens=40",
                             "optim.max_grad_norm=1.0", *overrides])
    return Distiller(cfg, student=student, teacher_model=None if not teacher else bq.make_model(1, 16, 9),
                     tokenizer=tok)


def exact_match(model, tok, probs, with_context: bool = False) -> float:
    from protege.data import Example, PromptTokenizer
    from protege.rollout import hf as hf_rollout

    pt = PromptTokenizer(tok, 128)
    text = [f"{a}+{b}=" + (SEP + bq.worked(a, b) if with_context else "") for a, b in probs]
    ids = [pt.prompt_ids(Example(messages=[{"role": "user", "content": t}])) for t in text]
    r = hf_rollout.generate(model, ids, max_new_tokens=40, temperature=0.0, eos_ids=[tok.eos_token_id],
                            pad_id=tok.pad_token_id, source="student")
    right = sum(bq.answer_of(tok.decode(r.completion_ids[i, : int(r.completion_mask[i].sum())],
                                        skip_special_tokens=True)) == str(a + b) for i, (a, b) in enumerate(probs))
    return right / len(probs)


def prepare(args, work: Path) -> dict:
    """Data and the student start (reused from an earlier run in --work with the same settings)."""
    import torch

    torch.set_num_threads(1)
    key = {k: getattr(args, k) for k in ("start_steps", "train_problems", "heldout")}
    saved = work / "prepared.json"
    if saved.exists() and json.loads(saved.read_text()).get("key") == key:
        print(f"reusing the student start in {work}", flush=True)
        return json.loads(saved.read_text())["info"]
    held = bq.problems(args.heldout, seed=12345)
    train = bq.problems(args.train_problems, seed=1, exclude=set(held))
    write_rows(work / "train.jsonl", train)
    write_rows(work / "start.jsonl", train, mix_context=True)
    (work / "heldout.json").write_text(json.dumps(held))
    tok, t = bq.make_tokenizer(), time.perf_counter()
    student = bq.make_model(2, 64, seed=0)
    d = distiller(student, tok, work / "start.jsonl", work / "start_run",
                  ["loss.name=sft", "mix.lmbda=0", f"train.max_steps={args.start_steps}", "train.prompts_per_step=64",
                   "train.micro_batch_size=64", "optim.lr=2e-3", "optim.warmup_steps=20", "train.seed=0"])
    bq.run_steps(d, "student start SFT (plain + worked answer in the prompt)")
    student.save_pretrained(work / "start")
    info = {"params": sum(p.numel() for p in student.parameters()), "steps": args.start_steps,
            "seconds": time.perf_counter() - t, "exact_match": exact_match(student, tok, held),
            "exact_match_with_context": exact_match(student, tok, held, with_context=True)}
    print(f"start: exact match {info['exact_match']:.3f}, with the worked answer in the prompt "
          f"{info['exact_match_with_context']:.3f}", flush=True)
    saved.write_text(json.dumps({"key": key, "info": info}))
    return info


def job(args) -> None:
    """Subprocess: one method x one seed from the student start; prints a RESULT line."""
    import torch

    torch.set_num_threads(1)
    work, tok = Path(args.work), bq.make_tokenizer()
    held = [tuple(p) for p in json.loads((work / "heldout.json").read_text())]
    student, t = bq.load(work / "start"), time.perf_counter()
    d = distiller(student, tok, work / "train.jsonl", work / f"run_{args.job_index}",
                  [*METHODS[args.method], f"train.seed={args.seed}", f"train.max_steps={args.steps}",
                   f"train.prompts_per_step={args.prompts_per_step}", f"train.micro_batch_size={args.prompts_per_step}",
                   f"optim.lr={args.lr}", "optim.schedule=constant"])
    hist = bq.run_steps(d, f"{args.method} seed {args.seed}")
    leak = [m["privileged_leak"] for m in hist[-10:] if "privileged_leak" in m]
    res = {"method": args.method, "seed": args.seed, "exact_match": exact_match(student, tok, held),
           "seconds": time.perf_counter() - t, "tokens": sum(m["tokens"] for m in hist),
           "final_loss": statistics.mean(m["loss"] for m in hist[-10:]),
           "privileged_leak_last10": statistics.mean(leak) if leak else None}
    print("RESULT " + json.dumps(res), flush=True)


def run_jobs(args, work: Path) -> list[dict]:
    jobs = [(f"{m}, seed {s}", ["nice", "-n", "5", sys.executable, __file__, "--job-index", str(i), "--method", m,
                                "--seed", str(s), "--work", str(work), "--steps", str(args.steps),
                                "--prompts-per-step", str(args.prompts_per_step), "--lr", str(args.lr)])
            for i, (m, s) in enumerate((m, s) for s in range(args.seeds) for m in METHODS)]
    return bq.run_parallel(jobs, work, args.parallel, lambda r: f"{r['method']}, seed {r['seed']}: exact match "
                           f"{r['exact_match']:.3f} ({r['seconds']:.0f} s)")


def report(args, info: dict, results: list[dict], seconds: float) -> str:
    argv = " ".join(sys.argv[1:])
    lines = ["# On-policy self-distillation (OPSD) vs SFT on the same worked answers: held-out exact match", "",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- machine: {bq.machine()}",
             f"- command: `nice -n 5 python bench/bench_opsd.py{' ' + argv if argv else ''}` (total "
             f"{seconds / 60:.1f} min; runs {args.parallel} at a time, 1 thread each: the seconds are not "
             "speed measurements)",
             f"- task: bench_quality.py's (a+b, 3-digit, worked answer column by column, e.g. `347+589=` -> "
             f"`{bq.worked(347, 589)}`); {args.train_problems} training problems, {args.heldout} held-out problems "
             "(disjoint); exact match of the text after the last '|' of a greedy completion of the plain prompt",
             f"- student start: Llama, 2 layers, hidden 64, {info['params'] / 1e6:.2f} M parameters, {info['steps']} "
             "steps of protege SFT from scratch (64 rows/step, lr 2e-3) on a 50/50 mix of plain rows and rows whose "
             "prompt holds the worked answer after the template's separator (an in-context reading skill, as a "
             "pretrained LLM has)",
             f"- every method: {args.steps} optimizer steps x {args.prompts_per_step} prompts, AdamW lr {args.lr} "
             "constant, grad clip 1, fp32; OPSD: student rollouts at temperature 1 scored by the student itself "
             "under the privileged prompt `a+b=` + separator + worked answer, reverse KL over the full vocabulary; "
             f"seeds 0..{args.seeds - 1}", "",
             "| row | exact match (mean) | std | min | max | seeds | completion tokens trained (mean) | s per run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| student start, worked answer in the prompt (the self-teacher's view) | "
             f"{info['exact_match_with_context']:.3f} | - | - | - | - | - | - |",
             f"| student start (untouched) | {info['exact_match']:.3f} | - | - | - | - | - | - |"]
    summary = {}
    for m in METHODS:
        rs = [r for r in results if r["method"] == m]
        if not rs:
            continue
        xs = [r["exact_match"] for r in rs]
        mean, sd = statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0
        summary[m] = (mean, sd)
        lines.append(f"| {m} | {mean:.3f} | {sd:.3f} | {min(xs):.3f} | {max(xs):.3f} | {len(rs)} | "
                     f"{statistics.mean(r['tokens'] for r in rs):.0f} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    lines += ["", "## Per run", "", "| method | seed | exact match | final loss (mean of last 10 steps) | "
              "privileged_leak (mean of last 10 steps) |", "|---|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (list(METHODS).index(r["method"]), r["seed"])):
        leak = "-" if r["privileged_leak_last10"] is None else f"{r['privileged_leak_last10']:.3f}"
        lines.append(f"| {r['method']} | {r['seed']} | {r['exact_match']:.3f} | {r['final_loss']:.4f} | {leak} |")
    ranked = sorted(summary.items(), key=lambda kv: -kv[1][0])
    lines += ["", "## Ranking (computed from the table above)", "",
              f"- start {info['exact_match']:.3f}: " + " > ".join(f"{m} {a:.3f}+-{b:.3f}" for m, (a, b) in ranked),
              "- Differences smaller than the seeds' spread (std) are not evidence either way."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, to try the script")
    ap.add_argument("--start-steps", type=int, default=1000, help="SFT steps of the student start")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps of every method")
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-problems", type=int, default=50000)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--work", default=None, help="folder for models, data and logs (default outputs/bench_opsd)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "opsd.md"))
    ap.add_argument("--job-index", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job_index is not None:
        return job(args)
    if args.quick:
        args.start_steps, args.steps, args.seeds, args.heldout, args.train_problems = 60, 10, 2, 50, 2000
    work = Path(args.work or ROOT / "outputs" / ("bench_opsd_quick" if args.quick else "bench_opsd"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = prepare(args, work)
    results = run_jobs(args, work)
    seconds = time.perf_counter() - t0
    text = report(args, info, results, seconds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "results": results, "seconds": seconds}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
