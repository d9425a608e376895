"""Several teachers: two experts (addition, subtraction), one student routed to both vs each alone vs a mixture.

    nice -n 5 python bench/bench_multi_teacher.py          # writes bench/results/multi_teacher.md
    python bench/bench_multi_teacher.py --quick            # a smaller version, for trying the script

Task (bench/bench_quality.py's, plus subtraction): a+b and a-b (a >= b, --digits digits) with worked answers,
one column at a time from the right, e.g.

    347+589=   7+9=16|4+8+1=13|3+5+1=9|936
    834-589=   14-9=5|13-8-1=4|8-5-1=2|245        (a borrowed column shows x+10, the borrow as -1)

1. Two teachers (Llama, --teacher-layers x --teacher-hidden), each trained from scratch with protege SFT
   on ONE operation only: the addition expert never sees a '-' prompt, the subtraction expert never a '+'.
2. A student (2 layers, hidden 64) with --student-steps of SFT on both operations: a weak start.
3. From that start, the same on-policy distillation (full-vocabulary reverse KL, mix.lmbda=1, in-process
   teachers) on the same rows (half addition, half subtraction, a `teacher` column naming the expert):
   - routed:   teachers: [add, sub], each row scored by the teacher its column names
   - add only: the addition expert scores every row (one teacher: teacher.path)
   - sub only: the subtraction expert scores every row
   - mixture:  teachers_mode=mixture, weights 1:1, every row scored by both (the geometric mixture,
               docs/teachers.md: log p_w = (log p_add + log p_sub) / 2 - log Z)
   x --seeds seeds (prompt order, sampling).
4. Held-out exact match (greedy) per operation on problems never seen in training.

Runs go --parallel at a time in subprocesses with one thread each.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import bench_quality as bq  # noqa: E402  (the task, training loop helpers and report helpers)

CHARS = list("0123456789+=|-")
OPS = ("add", "sub")
METHODS = ("routed", "add only", "sub only", "mixture")
MAX_NEW = 40  # new tokens at most (a 3-digit worked answer is ~27 characters + EOS)


# ----------------------------------------------------------------------------------------- task
def worked_sub(a: int, b: int) -> str:
    """'14-9=5|13-8-1=4|8-5-1=2|245' for 834-589 (a >= b): each column right to left, with the borrow."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    borrow, steps = 0, []
    for i in range(len(xs)):
        x, y = int(xs[i]), int(ys[i]) if i < len(ys) else 0
        s = x - y - borrow
        top = x + 10 if s < 0 else x
        steps.append(f"{top}-{y}{'-1' if borrow else ''}={s + 10 if s < 0 else s}")
        borrow = int(s < 0)
    return "|".join(steps) + f"|{a - b}"


def prompt_of(op: str, a: int, b: int) -> str:
    return f"{a}+{b}=" if op == "add" else f"{a}-{b}="


def completion_of(op: str, a: int, b: int) -> str:
    return bq.worked(a, b) if op == "add" else worked_sub(a, b)


def result_of(op: str, a: int, b: int) -> int:
    return a + b if op == "add" else a - b


def op_problems(n: int, seed: int, digits: int, exclude: set | None = None) -> list[tuple[int, int]]:
    """n distinct pairs (a, b), a >= b (so a-b >= 0), of `digits` digits each, none in `exclude`."""
    rng, out, seen = random.Random(seed), [], set(exclude or ())
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    while len(out) < n:
        x, y = rng.randint(lo, hi), rng.randint(lo, hi)
        p = (max(x, y), min(x, y))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def write_rows(path: Path, rows: list[tuple[str, int, int]]) -> None:
    path.write_text("".join(json.dumps({"prompt": prompt_of(op, a, b), "completion": completion_of(op, a, b),
                                        "teacher": op}) + "\n" for op, a, b in rows))


def make_tokenizer():
    return bq.make_tokenizer(CHARS)  # bench_quality's, with "-"


def make_model(layers: int, hidden: int, seed: int):
    return bq.make_model(layers, hidden, seed, CHARS)


def exact_match(model, tok, op: str, probs: list[tuple[int, int]]) -> float:
    from protege.data import Example, PromptTokenizer
    from protege.rollout import hf as hf_rollout

    pt = PromptTokenizer(tok, 64)
    ids = [pt.prompt_ids(Example(messages=[{"role": "user", "content": prompt_of(op, a, b)}])) for a, b in probs]
    r = hf_rollout.generate(model, ids, max_new_tokens=MAX_NEW, temperature=0.0, eos_ids=[tok.eos_token_id],
                            pad_id=tok.pad_token_id, source="student")
    right = 0
    for i, (a, b) in enumerate(probs):
        text = tok.decode(r.completion_ids[i, : int(r.completion_mask[i].sum())], skip_special_tokens=True)
        right += bq.answer_of(text) == str(result_of(op, a, b))
    return right / len(probs)


def per_op(model, tok, held: dict) -> dict:
    return {op: exact_match(model, tok, op, held[op]) for op in OPS}


# ----------------------------------------------------------------------------------- training
def distiller(student, teachers: dict, tok, data: Path, out: Path, overrides: list[str], mode: str | None = None):
    """A Distiller over in-memory models: one teacher (teacher.path) or several (teachers:, routed or mixture)."""
    from protege.config import load_config
    from protege.trainer import Distiller

    if len(teachers) == 1:
        names, models = ["teacher.path=in-memory"], next(iter(teachers.values()))
    else:
        entries = [{"name": n, "path": f"in-memory-{n}"} for n in teachers]
        names, models = [f"teachers={json.dumps(entries)}", f"teachers_mode={mode or 'routed'}"], teachers
    cfg = load_config(None, ["student.path=in-memory", *names, f"data.path={data}", "data.eval_prompts=0",
                             "output.diagnostics_top_k=0", "output.report_to=none", f"output.dir={out}",
                             "output.save_every=0", "train.num_threads=1", f"rollout.max_new_tokens={MAX_NEW}",
                             "optim.max_grad_norm=1.0", *overrides])
    return Distiller(cfg, student=student, teacher_model=models, tokenizer=tok)


def sft(model, tok, rows: Path, out: Path, steps: int, lr: float, label: str, at: dict | None = None):
    d = distiller(model, {"x": make_model(1, 16, seed=9)}, tok, rows, out,
                  ["loss.name=sft", "mix.lmbda=0", f"train.max_steps={steps}", "train.prompts_per_step=64",
                   "train.micro_batch_size=64", f"optim.lr={lr}", "optim.warmup_steps=20",
                   "optim.schedule=cosine" if at is None else "optim.schedule=constant", "train.seed=0"])
    return bq.run_steps(d, label, at=at)


def prepare_teacher(args) -> None:
    """Subprocess: train one expert (--op) and save it with its held-out exact match per operation."""
    import torch

    torch.set_num_threads(1)
    work, tok = Path(args.work), make_tokenizer()
    held = {op: [tuple(p) for p in v] for op, v in json.loads((work / "heldout.json").read_text()).items()}
    t, model = time.perf_counter(), make_model(args.teacher_layers, args.teacher_hidden, seed=0)
    sft(model, tok, work / f"train_{args.op}.jsonl", work / f"teacher_{args.op}_run", args.teacher_steps, args.teacher_lr,
        f"{args.op} teacher SFT")
    model.save_pretrained(work / f"teacher_{args.op}")
    info = {"params": sum(p.numel() for p in model.parameters()), "exact_match": per_op(model, tok, held),
            "seconds": time.perf_counter() - t}
    (work / f"teacher_{args.op}.json").write_text(json.dumps(info))
    print(f"{args.op} teacher: exact match {info['exact_match']}", flush=True)


def prepare(args, work: Path) -> dict:
    """Data, two experts (in parallel subprocesses) and the student start; reused when the settings match."""
    import torch

    torch.set_num_threads(1)
    saved = work / "prepared.json"
    key = {k: getattr(args, k) for k in ("teacher_steps", "teacher_layers", "teacher_hidden", "student_steps",
                                         "train_problems", "heldout", "digits", "teacher_lr", "student_lr")}
    if saved.exists() and json.loads(saved.read_text()).get("key") == key:
        print(f"reusing the teachers and the student start in {work} (same settings)", flush=True)
        return json.loads(saved.read_text())["info"]
    held = {op: op_problems(args.heldout, 12345 + i, args.digits) for i, op in enumerate(OPS)}
    train = {op: op_problems(args.train_problems, 1 + i, args.digits, exclude=set(held[op])) for i, op in enumerate(OPS)}
    (work / "heldout.json").write_text(json.dumps(held))
    for op in OPS:
        write_rows(work / f"train_{op}.jsonl", [(op, a, b) for a, b in train[op]])
    both = [(op, a, b) for op in OPS for a, b in train[op]]
    random.Random(0).shuffle(both)
    write_rows(work / "train.jsonl", both)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    teacher_key = {k: key[k] for k in key if k != "student_steps" and k != "student_lr"}
    procs = {op: subprocess.Popen([sys.executable, __file__, "--teacher-op", op, *_shared_args(args)], env=env,
                                  stdout=open(work / f"teacher_{op}.log", "w"), stderr=subprocess.STDOUT)
             for op in OPS if not _saved_teacher(work, op, teacher_key)}
    t, tok = time.perf_counter(), make_tokenizer()
    student = make_model(2, 64, seed=0)
    sft(student, tok, work / "train.jsonl", work / "student_run", args.student_steps, args.student_lr,
        "student SFT (both ops)")
    student.save_pretrained(work / "student_start")
    info = {"student_params": sum(p.numel() for p in student.parameters()),
            "start": per_op(student, tok, held), "student_seconds": time.perf_counter() - t}
    for op in OPS:
        if op in procs and procs[op].wait() != 0:
            raise RuntimeError(f"the {op} teacher failed: {(work / f'teacher_{op}.log').read_text()[-3000:]}")
        info[f"teacher_{op}"] = json.loads((work / f"teacher_{op}.json").read_text())
        info[f"teacher_{op}"]["key"] = teacher_key
        (work / f"teacher_{op}.json").write_text(json.dumps(info[f"teacher_{op}"]))
    saved.write_text(json.dumps({"key": key, "info": info}))
    return info


def _saved_teacher(work: Path, op: str, key: dict) -> bool:
    """An expert trained earlier in `work` with the same settings (reused: the student start can change alone)."""
    saved = work / f"teacher_{op}.json"
    ok = saved.exists() and (work / f"teacher_{op}").exists() and json.loads(saved.read_text()).get("key") == key
    if ok:
        print(f"reusing the {op} teacher in {work} (same settings)", flush=True)
    return ok


def job(args) -> None:
    """Subprocess: one method x one seed from the student start; prints a JSON line."""
    import torch

    torch.set_num_threads(1)
    work, tok = Path(args.work), make_tokenizer()
    held = {op: [tuple(p) for p in v] for op, v in json.loads((work / "heldout.json").read_text()).items()}
    student = bq.load(work / "student_start")
    experts = {op: bq.load(work / f"teacher_{op}") for op in OPS}
    teachers = {"add only": {"add": experts["add"]}, "sub only": {"sub": experts["sub"]}}.get(args.method, experts)
    mode = "mixture" if args.method == "mixture" else "routed"
    t = time.perf_counter()
    d = distiller(student, teachers, tok, work / "train.jsonl", work / f"run_{args.job_index}",
                  ["loss.name=reverse_kl", "mix.lmbda=1", f"train.seed={args.seed}", f"train.max_steps={args.steps}",
                   f"train.prompts_per_step={args.prompts_per_step}",
                   f"train.micro_batch_size={args.prompts_per_step}", f"optim.lr={args.lr}",
                   "optim.schedule=constant"], mode=mode)
    hist = bq.run_steps(d, f"{args.method} seed {args.seed}")
    last = hist[-10:]
    per_teacher = {k: statistics.mean(m[k] for m in last if k in m) for k in sorted({k for m in last for k in m})
                   if k.startswith("teacher/") and k.endswith(("sampled_rkl", "loss"))}
    res = {"method": args.method, "seed": args.seed, "exact_match": per_op(student, tok, held),
           "seconds": time.perf_counter() - t, "steps": len(hist), "tokens": sum(m["tokens"] for m in hist),
           "final_loss": statistics.mean(m["loss"] for m in last),
           "sampled_rkl_last10": statistics.mean(m["sampled_rkl"] for m in last), "per_teacher_last10": per_teacher}
    print("RESULT " + json.dumps(res), flush=True)


def _shared_args(args) -> list[str]:
    return ["--work", str(args.work), "--steps", str(args.steps), "--prompts-per-step", str(args.prompts_per_step),
            "--lr", str(args.lr), "--teacher-steps", str(args.teacher_steps), "--teacher-lr", str(args.teacher_lr),
            "--digits", str(args.digits), "--teacher-layers",
            str(args.teacher_layers), "--teacher-hidden", str(args.teacher_hidden)]


def run_jobs(args, work: Path) -> list[dict]:
    jobs = [(f"{m}, seed {s}", [sys.executable, __file__, "--job-index", str(i), "--method", m, "--seed", str(s),
                                *_shared_args(args)])
            for i, (m, s) in enumerate((m, s) for s in range(args.seeds) for m in METHODS)]
    return bq.run_parallel(jobs, work, args.parallel, lambda r: f"{r['method']}, seed {r['seed']}: exact match "
                           f"{r['exact_match']} ({r['seconds']:.0f} s)")


# -------------------------------------------------------------------------------------- report
def report(args, info: dict, results: list[dict], seconds: float) -> str:
    def cell(xs):
        mean, sd = statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{mean:.3f} +- {sd:.3f}"

    t_add, t_sub = info["teacher_add"], info["teacher_sub"]
    argv = " ".join(a for a in sys.argv[1:] if a != "--render-only")
    lines = [
        "# Several teachers: two experts (addition, subtraction), one student routed to both",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {bq.machine()} (shared with other jobs while it ran: times are not speed measurements)",
        f"- command: `nice -n 5 python bench/bench_multi_teacher.py{' ' + argv if argv else ''}`"
        f" (total {seconds / 60:.1f} min)",
        f"- task: {args.digits}-digit a+b and a-b (a >= b), worked answers column by column (`47+58=` -> "
        f"`{bq.worked(47, 58)}`, `84-59=` -> `{worked_sub(84, 59)}`); {args.train_problems} training problems per operation, "
        f"{args.heldout} held-out problems per operation (disjoint); exact match of the text after the last '|' of a "
        f"greedy completion ({MAX_NEW} new tokens max)",
        f"- teachers: Llama, {args.teacher_layers} layers, hidden {args.teacher_hidden}, {t_add['params'] / 1e6:.2f} M "
        f"parameters each, {args.teacher_steps} steps of protege SFT (64 problems/step) from scratch "
        f"on ONE operation each (lr {args.teacher_lr} cosine)",
        f"- student: Llama, 2 layers, hidden 64, {info['student_params'] / 1e6:.2f} M parameters, {args.student_steps} "
        f"steps of SFT on both operations (64 problems/step, lr {args.student_lr} cosine): the start of every method",
        f"- every method: {args.steps} optimizer steps x {args.prompts_per_step} prompts (half addition, half "
        f"subtraction on average), on-policy (mix.lmbda=1) full-vocabulary reverse KL, AdamW lr {args.lr} constant, "
        f"grad clip 1, in-process teachers, sampling at temperature 1, fp32, 1 thread per run; seeds "
        f"0..{args.seeds - 1}",
        "",
        "| row | exact match on a+b (mean +- std) | exact match on a-b (mean +- std) | mean of both | seeds | s per run |",
        "|---|---:|---:|---:|---:|---:|",
        f"| addition teacher (reference) | {t_add['exact_match']['add']:.3f} | {t_add['exact_match']['sub']:.3f} | - | - | - |",
        f"| subtraction teacher (reference) | {t_sub['exact_match']['add']:.3f} | {t_sub['exact_match']['sub']:.3f} | - | - "
        "| - |",
        f"| student before distillation | {info['start']['add']:.3f} | {info['start']['sub']:.3f} | "
        f"{(info['start']['add'] + info['start']['sub']) / 2:.3f} | - | - |",
    ]
    names = {"routed": "routed: each row to its expert (teachers_mode=routed)",
             "add only": "addition teacher alone on every row", "sub only": "subtraction teacher alone on every row",
             "mixture": "mixture of both on every row (teachers_mode=mixture, 1:1)"}
    for m in METHODS:
        rs = [r for r in results if r["method"] == m]
        if rs:
            both = [(r["exact_match"]["add"] + r["exact_match"]["sub"]) / 2 for r in rs]
            lines.append(f"| {names[m]} | {cell([r['exact_match']['add'] for r in rs])} | "
                         f"{cell([r['exact_match']['sub'] for r in rs])} | {cell(both)} | {len(rs)} | "
                         f"{statistics.mean(r['seconds'] for r in rs):.0f} |")
    lines += ["", "## Per run", "", "| method | seed | a+b | a-b | final loss (last 10 steps) | sampled reverse KL "
              "(last 10) | per teacher, last 10 steps (teacher/<name>/...) |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted(results, key=lambda r: (METHODS.index(r["method"]), r["seed"])):
        pt = ", ".join(f"{k[8:]} {v:.3f}" for k, v in r["per_teacher_last10"].items()) or "-"
        lines.append(f"| {r['method']} | {r['seed']} | {r['exact_match']['add']:.3f} | {r['exact_match']['sub']:.3f} "
                     f"| {r['final_loss']:.4f} | {r['sampled_rkl_last10']:.4f} | {pt} |")
    lines += ["", "- Differences smaller than the seeds' spread (std) are not evidence either way.",
              "- Mixture rows: `sampled reverse KL` is log q(y) - sum_i w_i log p_i(y), against the unnormalised "
              "geometric mixture (what sampled_pg's advantage uses), so it exceeds the reverse KL to the "
              "normalised mixture p_w by -log Z >= 0; the per-teacher columns are against each teacher alone."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, to try the script")
    ap.add_argument("--digits", type=int, default=2, help="digits of each operand")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--teacher-lr", type=float, default=3e-3)
    ap.add_argument("--teacher-layers", type=int, default=2)
    ap.add_argument("--teacher-hidden", type=int, default=64)
    ap.add_argument("--student-steps", type=int, default=240)
    ap.add_argument("--student-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps of every method")
    ap.add_argument("--prompts-per-step", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-problems", type=int, default=3000, help="per operation")
    ap.add_argument("--heldout", type=int, default=150, help="per operation")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "multi_teacher.md"))
    ap.add_argument("--render-only", action="store_true", help="only rewrite --out from <work>/results.json")
    ap.add_argument("--job-index", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--teacher-op", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.teacher_steps, args.student_steps, args.steps, args.seeds, args.heldout = 60, 20, 6, 1, 30
        args.train_problems = 2000
    if args.work is None:
        args.work = str(ROOT / "outputs" / ("bench_multi_teacher_quick" if args.quick else "bench_multi_teacher"))
    if args.teacher_op is not None:
        args.op = args.teacher_op
        return prepare_teacher(args)
    if args.job_index is not None:
        return job(args)
    work = Path(args.work)
    if args.render_only:
        saved = json.loads((work / "results.json").read_text())
        Path(args.out).write_text(report(args, saved["info"], saved["results"], saved.get("seconds", 0.0)))
        return
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = prepare(args, work)
    print(f"teachers: add {info['teacher_add']['exact_match']}, sub {info['teacher_sub']['exact_match']}; "
          f"student start {info['start']}", flush=True)
    results = run_jobs(args, work)
    seconds = time.perf_counter() - t0
    (work / "results.json").write_text(json.dumps({"info": info, "results": results, "seconds": seconds}, indent=1))
    text = report(args, info, results, seconds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
