"""Where on-policy distillation should win: a task where the student's own mistakes can be recovered from.

    python bench/bench_recovery.py                # writes bench/results/recovery.md (+ .json)
    python bench/bench_recovery.py --quick        # a smaller version, for trying the script

Task (issue 30): 4-digit addition with a column-by-column scratchpad in which a column may be written wrong
and then corrected, e.g. for 34712+58919:

    prompt      34712+58919=
    completion  2+9=11|1+1+1=3|7+9=15!16|4+8+1=13|3+5+1=9|93631<eos>

`15!16` is a mistake and its correction: `!` says "the value before me is wrong" and the right value
follows. The answer after the last `|` is always right in the data. The teacher is trained here on such
scratchpads (a share `--error-rate` of columns written wrong, then corrected), so at temperature 1 it makes
and repairs mistakes, and it knows what to do after a wrong value: emit `!` and the right sum. A student with
8x fewer weights makes mistakes of its own, on prefixes the teacher's samples rarely hold (a wrong carry
propagated into the next column, a wrong value followed by more columns). Off-policy methods train only on
the teacher's or the dataset's prefixes; on-policy methods get the teacher's target exactly on the student's
own prefixes, including the `!` after the student's own wrong value. Foster, Block and Misra (arXiv
2407.15007) predict a gap only in such a regime (the student cannot represent the teacher exactly and can
recover from its errors); GKD found it largest for small students, at temperature-1 evaluation and with
little data. bench/bench_quality.py (3-digit addition, no recovery possible) is the control.

Rows (all from the same student start, the same steps x prompts per step, one completion per prompt: about
the same tokens and the same optimizer steps; the teacher's generation for off-policy rows is extra compute
that on-policy rows do not spend, the student's generation the other way round):
    SFT on teacher samples (seq-KD)           loss=sft          mix.lmbda=0 mix.seq_kd=true
    SFT on the dataset (errors + corrections) loss=sft          mix.lmbda=0  (the fair off-policy baseline)
    supervised KD (forward KL, dataset)       loss=forward_kl   mix.lmbda=0
    forward KL on teacher samples             loss=forward_kl   mix.lmbda=0 mix.seq_kd=true
    on-policy reverse KL                      loss=reverse_kl   mix.lmbda=1
    on-policy JSD(0.5)                        loss=jsd          mix.lmbda=1
    GKD lambda 0.5 (JSD(0.5), half dataset)   loss=jsd          mix.lmbda=0.5
Measured per run on held-out problems: exact match greedy and at temperature 1 (one sample per problem), and
the mechanism on the student's own temperature-1 samples: the share of columns first written wrong, the share
of those the student corrects (`!` then the right value), and the error rate by column position.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_quality import distiller, load, machine, make_model, make_tokenizer, run_parallel, run_steps  # noqa: E402
from bench_quality import problems as quality_problems  # noqa: E402

CHARS = list("0123456789+=|!")
METHODS = {
    "SFT on teacher samples (seq-KD)": ["loss.name=sft", "mix.lmbda=0", "mix.seq_kd=true"],
    "SFT on the dataset (errors + corrections)": ["loss.name=sft", "mix.lmbda=0"],
    "supervised KD (forward KL, dataset)": ["loss.name=forward_kl", "mix.lmbda=0"],
    "forward KL on teacher samples": ["loss.name=forward_kl", "mix.lmbda=0", "mix.seq_kd=true"],
    "on-policy reverse KL": ["loss.name=reverse_kl", "mix.lmbda=1"],
    "on-policy JSD(0.5)": ["loss.name=jsd", "loss.beta=0.5", "mix.lmbda=1"],
    "GKD lambda 0.5 (JSD(0.5), half dataset)": ["loss.name=jsd", "loss.beta=0.5", "mix.lmbda=0.5"],
}
ON_POLICY = {"on-policy reverse KL", "on-policy JSD(0.5)", "GKD lambda 0.5 (JSD(0.5), half dataset)"}
MAX_NEW = 72


# ----------------------------------------------------------------------------------------- task
def columns(a: int, b: int) -> list[tuple[str, int]]:
    """[(left side 'x+y' or 'x+y+1', right sum)] per column, right to left, with the carry."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    carry, out = 0, []
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        s = x + y + carry
        out.append((f"{x}+{y}{'+1' if carry else ''}", s))
        carry = s // 10
    return out


def scratchpad(a: int, b: int, rng: random.Random, error_rate: float) -> str:
    """The worked answer; each column written wrong (then `!` and the right sum) with probability error_rate."""
    parts = []
    for left, s in columns(a, b):
        if rng.random() < error_rate:
            wrong = s + rng.choice([-2, -1, 1, 2]) if s >= 2 else s + rng.choice([1, 2])
            parts.append(f"{left}={wrong}!{s}")
        else:
            parts.append(f"{left}={s}")
    return "|".join(parts) + f"|{a + b}"


def problems(n: int, seed: int, exclude: set | None = None) -> list[tuple[int, int]]:
    """n distinct 4-digit problems (bench_quality.problems over 1000..9999)."""
    return quality_problems(n, seed, exclude, low=1000, high=9999)


def write_rows(path: Path, probs: list[tuple[int, int]], error_rate: float, seed: int) -> None:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": scratchpad(a, b, rng, error_rate)})
                            + "\n" for a, b in probs))


def read_columns(text: str, a: int, b: int) -> list[dict]:
    """Per column of a completion: was its first value right, and if wrong, was it corrected (`!` + the right
    value before the next `|`). Columns are matched by position against the true ones."""
    truth = columns(a, b)
    out = []
    for i, chunk in enumerate(text.split("|")[: len(truth)]):
        if "=" not in chunk:
            break
        values = chunk.split("=", 1)[1].split("!")
        first_ok = values[0] == str(truth[i][1])
        fixed = (not first_ok) and len(values) > 1 and values[-1] == str(truth[i][1])
        out.append({"position": i, "first_ok": first_ok, "corrected": fixed})
    return out


# ----------------------------------------------------------------------------------- evaluation
def evaluate(model, tok, probs: list[tuple[int, int]], seed: int) -> dict:
    """Greedy and temperature-1 exact match, and the mechanism on the temperature-1 samples."""
    import torch

    from protege.data import Example, PromptTokenizer
    from protege.rollout import hf as hf_rollout

    pt = PromptTokenizer(tok, 64)
    ids = [pt.prompt_ids(Example(messages=[{"role": "user", "content": f"{a}+{b}="}])) for a, b in probs]
    out = {}
    for name, temperature in (("greedy", 0.0), ("t1", 1.0)):
        torch.manual_seed(seed)
        r = hf_rollout.generate(model, ids, max_new_tokens=MAX_NEW, temperature=temperature,
                                eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, source="student")
        texts = [tok.decode(r.completion_ids[i, : int(r.completion_mask[i].sum())], skip_special_tokens=True)
                 for i in range(len(probs))]
        out[f"exact_{name}"] = sum(t.rsplit("|", 1)[-1] == str(a + b) for t, (a, b) in zip(texts, probs)) / len(probs)
        if name == "t1":
            cols = [c for t, (a, b) in zip(texts, probs) for c in read_columns(t, a, b)]
            wrong = [c for c in cols if not c["first_ok"]]
            out["column_error_rate"] = len(wrong) / max(1, len(cols))
            out["corrected_share"] = sum(c["corrected"] for c in wrong) / max(1, len(wrong))
            out["error_by_position"] = [
                sum(not c["first_ok"] for c in cols if c["position"] == p) / max(1, sum(c["position"] == p
                                                                                        for c in cols))
                for p in range(6)]
    return out


# ----------------------------------------------------------------------------------- the stages
def prepare(args, work: Path) -> dict:
    """Data, the teacher and the student start (reused from --work when made with the same settings)."""
    import torch

    torch.set_num_threads(1)
    tok = make_tokenizer(CHARS)
    key = {k: getattr(args, k) for k in ("teacher_steps", "student_steps", "train_problems", "heldout",
                                          "error_rate", "teacher_problems")}
    saved = work / "prepared.json"
    if saved.exists() and json.loads(saved.read_text()).get("key") == key:
        print(f"reusing the teacher and student start in {work}", flush=True)
        return json.loads(saved.read_text())["info"]
    held = problems(args.heldout, seed=12345)
    teach = problems(args.teacher_problems, seed=7, exclude=set(held))
    train = teach[: args.train_problems]  # the distillation prompts: a small share of what the teacher saw
    write_rows(work / "teacher_data.jsonl", teach, args.error_rate, seed=1)
    write_rows(work / "train.jsonl", train, args.error_rate, seed=2)
    (work / "heldout.json").write_text(json.dumps(held))
    teacher_key = {k: key[k] for k in ("teacher_steps", "teacher_problems", "heldout", "error_rate")}
    teacher_saved = work / "teacher.json"
    if teacher_saved.exists() and json.loads(teacher_saved.read_text()).get("key") == teacher_key:
        print(f"reusing the teacher in {work} (same settings)", flush=True)
        info = {"teacher": json.loads(teacher_saved.read_text())["info"]}
        teacher = load(work / "teacher")
    else:
        t = time.perf_counter()
        teacher = make_model(4, 128, seed=0, chars=CHARS)
        d = distiller(teacher, make_model(1, 16, seed=9, chars=CHARS), tok, work / "teacher_data.jsonl",
                      work / "teacher_run", ["loss.name=sft", "mix.lmbda=0", f"train.max_steps={args.teacher_steps}",
                                             "train.prompts_per_step=64", "train.micro_batch_size=64",
                                             "optim.lr=2e-3", "optim.warmup_steps=50", "optim.schedule=cosine",
                                             "train.seed=0", f"rollout.max_new_tokens={MAX_NEW}"])
        run_steps(d, "teacher SFT")
        teacher.save_pretrained(work / "teacher")
        info = {"teacher": {"params": sum(p.numel() for p in teacher.parameters()),
                            "seconds": time.perf_counter() - t, **evaluate(teacher, tok, held, seed=0)}}
        teacher_saved.write_text(json.dumps({"key": teacher_key, "info": info["teacher"]}))
    print(f"teacher: {info['teacher']}", flush=True)
    t = time.perf_counter()
    student = make_model(2, 64, seed=0, chars=CHARS)
    d = distiller(student, teacher, tok, work / "train.jsonl", work / "student_run",
                  ["loss.name=sft", "mix.lmbda=0", f"train.max_steps={args.student_steps}",
                   "train.prompts_per_step=64", "train.micro_batch_size=64", "optim.lr=2e-3",
                   "optim.warmup_steps=20", "optim.schedule=constant", "train.seed=0",
                   f"rollout.max_new_tokens={MAX_NEW}"])
    run_steps(d, "student start SFT")
    student.save_pretrained(work / "student_start")
    info["student"] = {"params": sum(p.numel() for p in student.parameters()), "seconds": time.perf_counter() - t,
                       **evaluate(student, tok, held, seed=0)}
    print(f"student start: {info['student']}", flush=True)
    saved.write_text(json.dumps({"key": key, "info": info}))
    return info


def job(args) -> None:
    """Subprocess: one method x one seed from the student start; prints a RESULT json line."""
    import torch

    torch.set_num_threads(1)
    work = Path(args.work)
    tok = make_tokenizer(CHARS)
    held = [tuple(p) for p in json.loads((work / "heldout.json").read_text())]
    student, teacher = load(work / "student_start"), load(work / "teacher")
    t = time.perf_counter()
    d = distiller(student, teacher, tok, work / "train.jsonl", work / f"run_{args.job_index}",
                  [*METHODS[args.method], f"train.seed={args.seed}", f"train.max_steps={args.steps}",
                   f"train.prompts_per_step={args.prompts_per_step}", f"train.micro_batch_size={args.prompts_per_step}",
                   f"optim.lr={args.lr}", "optim.schedule=constant", f"rollout.max_new_tokens={MAX_NEW}"])
    hist = run_steps(d, f"{args.method} seed {args.seed}")
    res = {"method": args.method, "seed": args.seed, "seconds": time.perf_counter() - t, "steps": len(hist),
           "tokens": sum(m["tokens"] for m in hist), **evaluate(student, tok, held, seed=1000 + args.seed)}
    print("RESULT " + json.dumps(res), flush=True)


def mean_se(xs: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) over seeds."""
    m = statistics.mean(xs)
    return m, (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0)


def report(args, info: dict, results: list[dict], seconds: float) -> tuple[str, dict]:
    rows, summary = [], {}
    for m in METHODS:
        rs = [r for r in results if r["method"] == m]
        if not rs:
            continue
        s = {k: mean_se([r[k] for r in rs]) for k in ("exact_greedy", "exact_t1", "column_error_rate",
                                                       "corrected_share")}
        s["seeds"], s["tokens"] = len(rs), statistics.mean(r["tokens"] for r in rs)
        s["seconds"] = statistics.mean(r["seconds"] for r in rs)
        s["error_by_position"] = [statistics.mean(r["error_by_position"][p] for r in rs) for p in range(6)]
        summary[m] = s
        f = lambda k: f"{s[k][0]:.3f} +- {s[k][1]:.3f}"  # noqa: E731
        rows.append(f"| {m} | {f('exact_t1')} | {f('exact_greedy')} | {f('column_error_rate')} | "
                    f"{f('corrected_share')} | {s['seeds']} | {s['tokens']:.0f} | {s['seconds']:.0f} |")
    verdicts = []
    for metric in ("exact_t1", "exact_greedy"):
        on = max((m for m in summary if m in ON_POLICY), key=lambda m: summary[m][metric][0], default=None)
        off = max((m for m in summary if m not in ON_POLICY), key=lambda m: summary[m][metric][0], default=None)
        if on and off:
            (a, sa), (b, sb) = summary[on][metric], summary[off][metric]
            gap, se = a - b, (sa ** 2 + sb ** 2) ** 0.5
            verdicts.append({"metric": metric, "best_on_policy": on, "best_off_policy": off, "gap": gap, "se": se,
                             "beyond_2se": gap > 2 * se})
    t, st = info["teacher"], info["student"]
    lines = [
        "# Where on-policy distillation wins: 4-digit addition with mistakes and corrections", "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; machine: {machine()}",
        f"- command: `python bench/bench_recovery.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` "
        f"(total {seconds / 60:.1f} min)",
        f"- task: a+b, a and b in 1000..9999, scratchpad column by column; in the data each column is written "
        f"wrong then corrected (`15!16`) with probability {args.error_rate}; the answer after the last `|` is "
        f"always right. Held-out: {args.heldout} problems never trained on.",
        f"- teacher: Llama 4 layers, hidden 128, {t['params'] / 1e6:.2f} M parameters, {args.teacher_steps} SFT "
        f"steps on {args.teacher_problems} problems: exact match {t['exact_t1']:.3f} at temperature 1, "
        f"{t['exact_greedy']:.3f} greedy; it writes {t['column_error_rate']:.3f} of its columns wrong at "
        f"temperature 1 and corrects {t['corrected_share']:.3f} of those.",
        f"- student start: Llama 2 layers, hidden 64, {st['params'] / 1e6:.2f} M parameters, {args.student_steps} "
        f"SFT steps on the {args.train_problems} distillation problems: exact match {st['exact_t1']:.3f} at "
        f"temperature 1, {st['exact_greedy']:.3f} greedy; columns wrong {st['column_error_rate']:.3f}, corrected "
        f"{st['corrected_share']:.3f}.",
        f"- every row: {args.steps} optimizer steps x {args.prompts_per_step} prompts from the same "
        f"{args.train_problems} problems (little data), one completion each, AdamW lr {args.lr} constant, grad clip "
        f"1, full-vocabulary losses, in-process teacher, sampling at temperature 1, fp32; seeds "
        f"0..{args.seeds - 1}. Equal compute: the same steps and prompts, about the same trained tokens (column).",
        "",
        "| row | exact match, temperature 1 | exact match, greedy | columns first written wrong (own samples) | "
        "share of those the student corrects | seeds | tokens trained | s per run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
        "Means +- standard error over seeds. Mechanism columns are measured on the student's own temperature-1 "
        "samples of the held-out problems.", "", "## Verdict (computed from the table)", ""]
    for v in verdicts:
        lines.append(f"- {v['metric']}: best on-policy `{v['best_on_policy']}` minus best off-policy "
                     f"`{v['best_off_policy']}` = {v['gap']:+.3f} (SE {v['se']:.3f}): "
                     f"{'beyond' if v['beyond_2se'] else 'NOT beyond'} 2 standard errors.")
    lines += ["", "## Error rate by column position (temperature 1, own samples, mean over seeds)", "",
              "| row | " + " | ".join(f"col {p + 1}" for p in range(6)) + " |", "|---|" + "---:|" * 6]
    for m, s in summary.items():
        lines.append(f"| {m} | " + " | ".join(f"{x:.3f}" for x in s["error_by_position"]) + " |")
    return "\n".join(lines) + "\n", {"summary": summary, "verdicts": verdicts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--teacher-problems", type=int, default=50000)
    ap.add_argument("--student-steps", type=int, default=800)
    ap.add_argument("--train-problems", type=int, default=1000)
    ap.add_argument("--error-rate", type=float, default=0.15)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--prompts-per-step", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--heldout", type=int, default=300)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--methods", default="", help="only methods whose names contain one of these comma-separated words")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "recovery.md"))
    ap.add_argument("--job-index", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job_index is not None:
        return job(args)
    if args.quick:
        args.teacher_steps, args.teacher_problems, args.student_steps, args.steps = 300, 20000, 40, 30
        args.seeds, args.heldout = 2, 100
    work = Path(args.work or ROOT / "outputs" / ("bench_recovery_quick" if args.quick else "bench_recovery"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = prepare(args, work)
    methods = [m for m in METHODS if not args.methods or any(x in m for x in args.methods.split(","))]
    jobs = [(f"{m}, seed {s}", [sys.executable, __file__, "--job-index", str(i), "--method", m, "--seed", str(s),
                                "--work", str(work), "--steps", str(args.steps), "--prompts-per-step",
                                str(args.prompts_per_step), "--lr", str(args.lr)])
            for i, (m, s) in enumerate((m, s) for s in range(args.seeds) for m in methods)]
    results = run_parallel(jobs, work, args.parallel, lambda r: f"{r['method']} seed {r['seed']}: exact t1 "
                           f"{r['exact_t1']:.3f} greedy {r['exact_greedy']:.3f} corrected {r['corrected_share']:.3f}")
    text, data = report(args, info, results, time.perf_counter() - t0)
    out = Path(args.out)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "results": results, **data}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
