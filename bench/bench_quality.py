"""Quality table: on- vs off-policy distillation on a task with checkable answers (GKD / seed 000).

    python bench/bench_quality.py                 # writes bench/results/quality.md (~35 min on 2 cores)
    python bench/bench_quality.py --quick         # a smaller version, for trying the script

Task: 3-digit addition with a worked answer, one column at a time from the right, e.g.

    prompt      347+589=
    completion  7+9=16|4+8+1=13|3+5+1=9|936<eos>

Exact match = the text after the last '|' of a greedy completion equals a+b. Character-level
tokenizer (17 tokens), tiny Llama models built from configs (nothing downloaded).

1. Teacher (4 layers, hidden 128): trained from scratch with protege itself (loss.name=sft,
   mix.lmbda=0: the dataset's worked answers).
2. Student (2 layers, hidden 64, ~8x fewer weights): from scratch, SFT on the worked answers, saved
   at two points (--student-steps, default 300 and 420 steps): a weak and a stronger start
   ('student before distillation' rows); every method below runs from each.
3. From that start, each method runs the same number of optimizer steps with the same prompts per
   step (one completion per prompt, so about the same tokens), lr and schedule:
   - SFT on teacher samples         loss=sft          mix.lmbda=0 mix.seq_kd=true
   - supervised KD                  loss=forward_kl   mix.lmbda=0 mix.seq_kd=true
   - on-policy reverse KL           loss=reverse_kl   mix.lmbda=1
   - on-policy generalized JSD(0.5) loss=jsd beta=0.5 mix.lmbda=1
   - lmbda=0.5 mixing (reverse KL)  loss=reverse_kl   mix.lmbda=0.5 mix.seq_kd=true (the other half:
                                    teacher samples)
   - off-policy cold start          supervised KD for the first half of the steps, then on-policy
                                    reverse KL (a fresh optimizer, as protege recipes do) for the
                                    second half; and the same with 20 warm-up steps in stage 2
   x 3 seeds (train.seed: prompt order, sampling, mixing coins). Full-vocabulary losses, in-process
   teacher, temperature 1 sampling, fp32.
4. Held-out exact match (greedy) on problems never seen in training; mean and spread over seeds.

Runs go two at a time in subprocesses with one thread each (this machine has 2 cores; two
2-thread processes slow each other down several times).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
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

CHARS = list("0123456789+=|")
METHODS = {  # name: stages of (share of the steps, config overrides on top of the distillation base)
    "SFT on teacher samples": [(1.0, ["loss.name=sft", "mix.lmbda=0", "mix.seq_kd=true"])],
    "supervised KD (forward KL, teacher samples)": [(1.0, ["loss.name=forward_kl", "mix.lmbda=0",
                                                           "mix.seq_kd=true"])],
    "on-policy reverse KL": [(1.0, ["loss.name=reverse_kl", "mix.lmbda=1"])],
    "on-policy JSD(0.5)": [(1.0, ["loss.name=jsd", "loss.beta=0.5", "mix.lmbda=1"])],
    "lmbda=0.5 mixing (reverse KL, half teacher samples)": [(1.0, ["loss.name=reverse_kl", "mix.lmbda=0.5",
                                                                   "mix.seq_kd=true"])],
    "off-policy cold start: supervised KD, then on-policy reverse KL (half the steps each)": [
        (0.5, ["loss.name=forward_kl", "mix.lmbda=0", "mix.seq_kd=true"]),
        (0.5, ["loss.name=reverse_kl", "mix.lmbda=1"])],
    "the same cold start, 20 warm-up steps for the second stage's fresh optimizer": [
        (0.5, ["loss.name=forward_kl", "mix.lmbda=0", "mix.seq_kd=true"]),
        (0.5, ["loss.name=reverse_kl", "mix.lmbda=1", "optim.warmup_steps=20"])],
}


# ----------------------------------------------------------------------------------------- task
def worked(a: int, b: int) -> str:
    """'7+9=16|4+8+1=13|3+5+1=9|936' for 347+589: each column right to left, with the carry."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    carry, steps = 0, []
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        carry = s // 10
    return "|".join(steps) + f"|{a + b}"


def answer_of(text: str) -> str:
    return text.rsplit("|", 1)[-1].strip()


def problems(n: int, seed: int, exclude: set | None = None, low: int = 100, high: int = 999) -> list[tuple[int, int]]:
    """n distinct (a, b) pairs, a and b uniform in low..high, none in `exclude`."""
    rng, out, seen = random.Random(seed), [], set(exclude or ())
    while len(out) < n:
        p = (rng.randint(low, high), rng.randint(low, high))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def write_rows(path: Path, probs: list[tuple[int, int]]) -> None:
    path.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": worked(a, b)}) + "\n"
                            for a, b in probs))


def make_tokenizer(chars: list[str] = CHARS):
    """A character-level tokenizer over `chars` (ids 0-2: pad, eos, unk)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    out.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return out


def make_model(layers: int, hidden: int, seed: int, chars: list[str] = CHARS):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(chars) + 3, hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      tie_word_embeddings=True, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                      bos_token_id=None)
    return LlamaForCausalLM(cfg)


# ----------------------------------------------------------------------------------- training
def distiller(student, teacher, tok, data: Path, out: Path, overrides: list[str]):
    from protege.config import load_config
    from protege.trainer import Distiller

    cfg = load_config(None, ["student.path=in-memory", "teacher.path=in-memory", f"data.path={data}",
                             "data.eval_prompts=0", "output.diagnostics_top_k=0", "output.report_to=none",
                             f"output.dir={out}", "output.save_every=0", "output.overwrite=true", "train.num_threads=1",
                             "rollout.max_new_tokens=40", "optim.max_grad_norm=1.0", *overrides])
    return Distiller(cfg, student=student, teacher_model=teacher, tokenizer=tok)


def run_steps(d, label: str, at: dict | None = None) -> list[dict]:
    """d.cfg.train.max_steps optimizer steps; at = {step: fn()} runs fn after that step."""
    hist, t0 = [], time.perf_counter()
    for i in range(d.cfg.train.max_steps):
        m = d.train_step()
        hist.append(m)
        if at and i + 1 in at:
            at[i + 1]()
        if (i + 1) % max(1, d.cfg.train.max_steps // 5) == 0:
            print(f"  [{label}] step {i + 1}/{d.cfg.train.max_steps} loss {m['loss']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return hist


def exact_match(model, tok, probs: list[tuple[int, int]]) -> float:
    from protege.data import Example, PromptTokenizer
    from protege.rollout import hf as hf_rollout

    pt = PromptTokenizer(tok, 64)
    ids = [pt.prompt_ids(Example(messages=[{"role": "user", "content": f"{a}+{b}="}])) for a, b in probs]
    r = hf_rollout.generate(model, ids, max_new_tokens=40, temperature=0.0, eos_ids=[tok.eos_token_id],
                            pad_id=tok.pad_token_id, source="student")
    right = 0
    for i, (a, b) in enumerate(probs):
        text = tok.decode(r.completion_ids[i, : int(r.completion_mask[i].sum())], skip_special_tokens=True)
        right += answer_of(text) == str(a + b)
    return right / len(probs)


def load(path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path)


# ----------------------------------------------------------------------------------- the stages
def prepare(args, work: Path) -> dict:
    """Data, teacher and student starts; returns their held-out exact match. An earlier run's teacher and
    student starts in the same --work folder are reused when they were made with the same settings."""
    import torch

    torch.set_num_threads(1)
    tok = make_tokenizer()
    saved = work / "prepared.json"
    key = {k: getattr(args, k) for k in ("teacher_steps", "student_steps", "train_problems", "heldout")}
    if saved.exists() and json.loads(saved.read_text()).get("key") == key:
        print(f"reusing the teacher and student starts in {work} (same settings)", flush=True)
        return json.loads(saved.read_text())["info"]
    held = problems(args.heldout, seed=12345)
    train = problems(args.train_problems, seed=1, exclude=set(held))
    write_rows(work / "train.jsonl", train)
    (work / "heldout.json").write_text(json.dumps(held))
    info = {"starts": {}}
    teacher_key = {k: key[k] for k in ("teacher_steps", "train_problems", "heldout")}
    teacher_saved = work / "teacher.json"
    if teacher_saved.exists() and json.loads(teacher_saved.read_text()).get("key") == teacher_key:
        print(f"reusing the teacher in {work} (same settings)", flush=True)
        info["teacher"] = json.loads(teacher_saved.read_text())["info"]
        teacher = load(work / "teacher")
    else:
        t = time.perf_counter()
        teacher = make_model(4, 128, seed=0)
        d = distiller(teacher, make_model(1, 16, seed=9), tok, work / "train.jsonl", work / "teacher_run",
                      ["loss.name=sft", "mix.lmbda=0", f"train.max_steps={args.teacher_steps}",
                       "train.prompts_per_step=64", "train.micro_batch_size=64", "optim.lr=2e-3",
                       "optim.warmup_steps=50", "optim.schedule=cosine", "train.seed=0"])
        run_steps(d, "teacher SFT")
        teacher.save_pretrained(work / "teacher")
        info["teacher"] = {"params": sum(p.numel() for p in teacher.parameters()), "steps": args.teacher_steps,
                           "exact_match": exact_match(teacher, tok, held), "seconds": time.perf_counter() - t}
        teacher_saved.write_text(json.dumps({"key": teacher_key, "info": info["teacher"]}))
    print(f"teacher: exact match {info['teacher']['exact_match']:.3f}", flush=True)
    t = time.perf_counter()
    student = make_model(2, 64, seed=0)
    info["student_params"] = sum(p.numel() for p in student.parameters())
    d = distiller(student, teacher, tok, work / "train.jsonl", work / "student_run",
                  ["loss.name=sft", "mix.lmbda=0", f"train.max_steps={max(args.student_steps)}",
                   "train.prompts_per_step=64", "train.micro_batch_size=64", "optim.lr=2e-3",
                   "optim.warmup_steps=20", "optim.schedule=constant", "train.seed=0"])

    def snapshot(steps: int):
        def fn():
            student.save_pretrained(work / f"student_start_{steps}")
            info["starts"][str(steps)] = {"exact_match": exact_match(student, tok, held),
                                          "seconds": time.perf_counter() - t}
            print(f"student start after {steps} SFT steps: exact match "
                  f"{info['starts'][str(steps)]['exact_match']:.3f}", flush=True)
        return fn

    run_steps(d, "student SFT starts", at={s: snapshot(s) for s in args.student_steps})
    saved.write_text(json.dumps({"key": key, "info": info}))
    return info


def job(args) -> None:
    """Subprocess: one method x one seed from the student start; prints a JSON line."""
    import torch

    torch.set_num_threads(1)
    work = Path(args.work)
    tok = make_tokenizer()
    held = [tuple(p) for p in json.loads((work / "heldout.json").read_text())]
    student, teacher = load(work / f"student_start_{args.start}"), load(work / "teacher")
    t, hist = time.perf_counter(), []
    stages = METHODS[args.method]
    for k, (share, overrides) in enumerate(stages):
        steps = round(args.steps * share) if k < len(stages) - 1 else args.steps - len(hist)
        d = distiller(student, teacher, tok, work / "train.jsonl", work / f"run_{args.job_index}_{k}",
                      [*overrides, f"train.seed={args.seed + 1000 * k}", f"train.max_steps={steps}",
                       f"train.prompts_per_step={args.prompts_per_step}",
                       f"train.micro_batch_size={args.prompts_per_step}", f"optim.lr={args.lr}",
                       "optim.schedule=constant"])
        hist += run_steps(d, f"{args.method} start {args.start} seed {args.seed} stage {k + 1}/{len(stages)}")
    rkl = [m["sampled_rkl"] for m in hist[-10:] if "sampled_rkl" in m]
    res = {"method": args.method, "start": args.start, "seed": args.seed,
           "exact_match": exact_match(student, tok, held), "seconds": time.perf_counter() - t,
           "steps": len(hist), "tokens": sum(m["tokens"] for m in hist),
           "final_loss": statistics.mean(m["loss"] for m in hist[-10:]),
           "sampled_rkl_last10": statistics.mean(rkl) if rkl else None}
    print("RESULT " + json.dumps(res), flush=True)


def run_parallel(jobs: list[tuple[str, list[str]]], work: Path, parallel: int, show) -> list[dict]:
    """Run the (label, argv) jobs as subprocesses, `parallel` at a time, 1 thread each, logs in work/job_<i>.log;
    each job prints a `RESULT {json}` line. Returns those results in finishing order; a job that fails stops the
    run with its log. show(result) -> the line printed when a job finishes."""
    pending, running, results = list(enumerate(jobs)), [], []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while pending or running:
        while pending and len(running) < parallel:
            i, (label, argv) = pending.pop(0)
            log = open(work / f"job_{i}.log", "w")
            running.append((i, label, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), log))
            print(f"started job {i + 1}/{len(jobs)}: {label}", flush=True)
        time.sleep(1.0)
        for item in list(running):
            i, label, p, log = item
            if p.poll() is None:
                continue
            running.remove(item)
            log.close()
            text = (work / f"job_{i}.log").read_text()
            lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
            if p.returncode != 0 or not lines:
                raise RuntimeError(f"job {i} ({label}) failed (exit {p.returncode}); its log:\n{text[-3000:]}")
            results.append(json.loads(lines[-1][7:]))
            print("  " + show(results[-1]), flush=True)
    return results


def run_jobs(args, work: Path) -> list[dict]:
    methods = [m for m in METHODS if not args.methods or any(x in m for x in args.methods.split(","))]
    jobs = [(f"start {st}, {m}, seed {s}",
             [sys.executable, __file__, "--job-index", str(i), "--method", m, "--seed", str(s), "--work", str(work),
              "--start", str(st), "--steps", str(args.steps), "--prompts-per-step", str(args.prompts_per_step),
              "--lr", str(args.lr)])
            for i, (st, m, s) in enumerate((st, m, s) for st in args.student_steps for s in range(args.seeds)
                                           for m in methods)]
    return run_parallel(jobs, work, args.parallel, lambda r: f"start {r['start']} {r['method']}, seed {r['seed']}: "
                        f"exact match {r['exact_match']:.3f} ({r['seconds']:.0f} s)")


def machine() -> str:
    import torch
    import transformers

    from protege.hardware import cpu_model

    return (f"{platform.platform()}, {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def report(args, info: dict, results: list[dict], seconds: float) -> str:
    def ms(xs):
        mean = statistics.mean(xs)
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return mean, sd, min(xs), max(xs)

    argv = " ".join(a for a in sys.argv[1:] if a != "--render-only")
    lines = [
        "# On- vs off-policy distillation: held-out exact match on 3-digit addition",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {machine()}",
        f"- command: `python bench/bench_quality.py` then `python bench/bench_quality.py {argv}` for those methods' "
        f"rows (total {seconds / 60:.1f} min)" if args.methods else
        f"- command: `python bench/bench_quality.py{' ' + argv if argv else ''}` (total {seconds / 60:.1f} min; "
        "the teacher and student starts are made once per --work folder and reused by later runs with the same "
        "settings)",
        f"- task: a+b, a and b uniform in 100..999, worked answer column by column (e.g. `347+589=` -> "
        f"`{worked(347, 589)}`); {args.train_problems} training problems, {args.heldout} held-out problems "
        "(disjoint); exact match of the text after the last '|' of a greedy completion (40 new tokens max)",
        f"- teacher: Llama, 4 layers, hidden 128, {info['teacher']['params'] / 1e6:.2f} M parameters, "
        f"{args.teacher_steps} steps of protege SFT (64 problems/step, lr 2e-3 cosine) from scratch "
        f"({info['teacher']['seconds'] / 60:.1f} min)",
        f"- student: Llama, 2 layers, hidden 64, {info['student_params'] / 1e6:.2f} M parameters, SFT on the worked "
        f"answers from scratch (64 problems/step, lr 2e-3 constant), saved after "
        f"{' and '.join(str(x) for x in args.student_steps)} steps: the starts of every method",
        f"- every method: {args.steps} optimizer steps x {args.prompts_per_step} prompts (one completion each), "
        f"AdamW lr {args.lr} constant, grad clip 1, full-vocabulary losses, in-process teacher, sampling at "
        f"temperature 1, fp32, 1 thread per run; seeds 0..{args.seeds - 1} (prompt order, sampling, mixing)",
        "",
    ]
    summaries = {}
    for st in args.student_steps:
        start = info["starts"][str(st)]["exact_match"]
        lines += [f"## Start: student after {st} SFT steps (exact match {start:.3f})", "",
                  "| row | exact match (mean) | std | min | max | seeds | completion tokens trained (mean) | "
                  "s per run |", "|---|---:|---:|---:|---:|---:|---:|---:|",
                  f"| teacher (reference) | {info['teacher']['exact_match']:.3f} | - | - | - | - | - | - |",
                  f"| student before distillation | {start:.3f} | - | - | - | - | - | - |"]
        summary = summaries[st] = {}
        for m in METHODS:
            rs = [r for r in results if r["method"] == m and r["start"] == st]
            if not rs:
                continue
            mean, sd, lo, hi = ms([r["exact_match"] for r in rs])
            summary[m] = (mean, sd)
            toks = statistics.mean(r["tokens"] for r in rs)
            secs = statistics.mean(r["seconds"] for r in rs)
            lines.append(f"| {m} | {mean:.3f} | {sd:.3f} | {lo:.3f} | {hi:.3f} | {len(rs)} | {toks:.0f} | "
                         f"{secs:.0f} |")
        lines.append("")
    lines += ["## Per run", "", "| start | method | seed | exact match | final loss (mean of last 10 steps) | "
              "sampled reverse KL on student rows (last 10 steps) |", "|---:|---|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["start"], list(METHODS).index(r["method"]), r["seed"])):
        rkl = "-" if r["sampled_rkl_last10"] is None else f"{r['sampled_rkl_last10']:.4f}"
        lines.append(f"| {r['start']} | {r['method']} | {r['seed']} | {r['exact_match']:.3f} | "
                     f"{r['final_loss']:.4f} | {rkl} |")
    lines += ["", "## Ranking (computed from the table above)", ""]
    for st, summary in summaries.items():
        ranked = sorted(summary.items(), key=lambda kv: -kv[1][0])
        lines.append(f"- start {st} ({info['starts'][str(st)]['exact_match']:.3f}): " + " > ".join(
            f"{m} {mean:.3f}+-{sd:.3f}" for m, (mean, sd) in ranked))
    lines.append("- Differences smaller than the seeds' spread (std) are not evidence either way.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, to try the script (a few minutes)")
    ap.add_argument("--teacher-steps", type=int, default=1000)
    ap.add_argument("--student-steps", default="300,420",
                    help="SFT steps of the student starts, comma-separated (default 300,420)")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps of every method")
    ap.add_argument("--prompts-per-step", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-problems", type=int, default=50000)
    ap.add_argument("--heldout", type=int, default=300)
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--work", default=None, help="folder for models, data and logs (default outputs/bench_quality, "
                    "outputs/bench_quality_quick with --quick)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.md"))
    ap.add_argument("--render-only", action="store_true", help="only rewrite --out from <work>/results.json")
    ap.add_argument("--methods", default="", help="only the methods whose names contain one of these comma-separated "
                    "words; their rows replace those of the earlier run in --work, the others are kept")
    # internal: one job in a subprocess
    ap.add_argument("--job-index", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.student_steps = sorted(int(x) for x in str(args.student_steps).split(","))
    if args.job_index is not None:
        return job(args)
    if args.work is None:
        args.work = str(ROOT / "outputs" / ("bench_quality_quick" if args.quick else "bench_quality"))
    if args.render_only:  # re-render the markdown from an earlier run's results in --work
        saved = json.loads((Path(args.work) / "results.json").read_text())
        Path(args.out).write_text(report(args, saved["info"], saved["results"], saved.get("seconds", 0.0)))
        print(f"wrote {args.out}")
        return
    if args.quick:
        args.teacher_steps, args.student_steps, args.steps, args.seeds, args.heldout = 200, [30, 60], 20, 2, 100
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = prepare(args, work)
    results = run_jobs(args, work)
    seconds = time.perf_counter() - t0
    previous = work / "results.json"
    old = json.loads(previous.read_text()) if args.methods and previous.exists() else None
    if old is not None and old.get("info") != info:
        print(f"not merging the rows in {previous}: they were made with another teacher or student start", flush=True)
        old = None
    if old is not None:  # keep the earlier run's other rows (same teacher and starts)
        done = {(r["method"], r["start"], r["seed"]) for r in results}
        results = [r for r in old["results"] if (r["method"], r["start"], r["seed"]) not in done] + results
        seconds += old.get("seconds", 0.0)
    text = report(args, info, results, seconds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    previous.write_text(json.dumps({"info": info, "results": results, "seconds": seconds}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
