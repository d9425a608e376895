"""Cross-tokenizer OPD on the arithmetic task of bench_quality.py: a character-level teacher, a BPE student.

    nice -n 5 python bench/bench_cross_tokenizer.py          # writes bench/results/cross_tokenizer.md

Task, data and exact match are bench_quality.py's (3-digit addition with a worked answer). The teacher
uses bench_quality's character-level tokenizer (16 ids); the student a ByteLevel BPE trained here on the
task's text (merges such as '+1=' or '|1'), so the two cut the same completion differently.
1. teacher (char-level Llama) and a BPE student start: protege SFT on the worked answers, from scratch;
   a char-level student start the same way (the same-tokenizer pair).
2. From the BPE start, each method runs the same steps / prompts / lr, 3 seeds:
   span (loss.cross_tokenizer=span), shared_topk, uld, next_byte (cross-tokenizer OPD, on-policy, in-process
   teacher; top_k 16 covers the char teacher's vocabulary),
   SFT on teacher samples (the teacher's greedy answers to the training prompts as the dataset's
   completions, loss.name=sft); from the char-level start: on-policy reverse KL with the same teacher
   (the same-tokenizer pair, full vocabulary).
3. Held-out exact match (greedy) and tokens/s (completion tokens trained per second of the run).
GOLD itself (trl's GOLDTrainer) is not run here: see the results file.
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

import bench_quality as bq  # noqa: E402

METHODS = {
    "cross-tokenizer OPD: span estimator": ("bpe", ["loss.cross_tokenizer=span", "mix.lmbda=1"]),
    "cross-tokenizer OPD: shared top-k (reverse KL)": ("bpe", ["loss.cross_tokenizer=shared_topk", "mix.lmbda=1",
                                                               "loss.top_k=8"]),
    "cross-tokenizer OPD: ULD (GOLD's loss)": ("bpe", ["loss.cross_tokenizer=uld", "mix.lmbda=1", "loss.top_k=16"]),
    "cross-tokenizer OPD: next-byte divergence + span estimator": ("bpe", ["loss.cross_tokenizer=next_byte",
                                                                          "mix.lmbda=1", "loss.top_k=16"]),
    "SFT on teacher samples (BPE student)": ("bpe", ["loss.name=sft", "mix.lmbda=0", "data.path=TEACHER_SAMPLES"]),
    "same-tokenizer pair: on-policy reverse KL (char student)": ("char", ["loss.name=reverse_kl", "mix.lmbda=1"]),
    "same-tokenizer pair: sampled_pg, the span estimator's twin (char student)": ("char", ["loss.name=sampled_pg",
                                                                                        "mix.lmbda=1"]),
}


def bpe_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                                     initial_alphabet=list("0123456789+=|"), show_progress=False))
    out = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>")
    out.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return out


def model(vocab: int, layers: int, hidden: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                        tie_word_embeddings=True, max_position_embeddings=128, pad_token_id=0,
                                        eos_token_id=1, bos_token_id=None))


def distiller(student, teacher, tok, t_tok, data: Path, out: Path, overrides: list[str]):
    from protege.config import load_config
    from protege.trainer import Distiller

    cfg = load_config(None, ["student.path=in-memory-student", "teacher.path=in-memory-teacher", f"data.path={data}",
                             "data.eval_prompts=0", "output.diagnostics_top_k=0", "output.report_to=none",
                             f"output.dir={out}", "train.num_threads=1", "rollout.max_new_tokens=40",
                             "optim.max_grad_norm=1.0", *overrides])
    return Distiller(cfg, student=student, teacher_model=teacher, tokenizer=tok, teacher_tokenizer=t_tok)


def exact_match(m, tok, probs) -> float:
    return bq.exact_match(m, tok, probs)


def prepare(args, work: Path) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    key = {k: getattr(args, k) for k in ("teacher_steps", "student_steps", "sft_batch", "sft_lr", "train_problems",
                                         "heldout")}
    if (work / "prepared.json").exists():
        info = json.loads((work / "prepared.json").read_text())
        if info.get("key") != key:
            raise SystemExit(f"{work} holds starts prepared with {info.get('key')}, not {key}: pass another --work "
                             "or delete it")
        return info
    held = bq.problems(args.heldout, seed=12345)
    train = bq.problems(args.train_problems, seed=1, exclude=set(held))
    char = bq.make_tokenizer()
    if not (work / "teacher.json").exists():
        bq.write_rows(work / "train.jsonl", train)
        (work / "heldout.json").write_text(json.dumps(held))
        bpe_tokenizer([bq.worked(a, b) + f"{a}+{b}=" for a, b in train[:3000]]).save_pretrained(work / "bpe_tok")
    from transformers import AutoTokenizer

    bpe = AutoTokenizer.from_pretrained(work / "bpe_tok")
    info, t0 = {}, time.perf_counter()
    sft = ["loss.name=sft", "mix.lmbda=0", f"train.prompts_per_step={args.sft_batch}",
           f"train.micro_batch_size={args.sft_batch}", f"optim.lr={args.sft_lr}", "optim.warmup_steps=20", "train.seed=0"]
    if (work / "teacher.json").exists():  # a killed earlier run's teacher
        teacher = LlamaForCausalLM.from_pretrained(work / "teacher")
        info["teacher"] = json.loads((work / "teacher.json").read_text())
    else:
        teacher = model(len(char), 4, 128, 0)
        bq.run_steps(distiller(teacher, model(len(char), 1, 16, 9), char, None, work / "train.jsonl", work / "t_run",
                               sft + [f"train.max_steps={args.teacher_steps}", "optim.schedule=cosine"]),
                     "teacher SFT")
        teacher.save_pretrained(work / "teacher")
        info["teacher"] = {"exact_match": exact_match(teacher, char, held), "seconds": time.perf_counter() - t0}
        (work / "teacher.json").write_text(json.dumps(info["teacher"]))
    print(f"teacher: {info['teacher']}", flush=True)
    for name, tok in (("bpe", bpe), ("char", char)):
        student = model(len(tok), 2, 64, 0)
        teacher_view = teacher if name == "char" else model(len(tok), 1, 16, 9)  # SFT reads no teacher
        bq.run_steps(distiller(student, teacher_view, tok, None, work / "train.jsonl", work / f"s_{name}",
                               sft + [f"train.max_steps={args.student_steps}"]), f"{name} student SFT")
        student.save_pretrained(work / f"student_{name}")
        info[f"start_{name}"] = exact_match(student, tok, held)
    info["key"] = key
    info["student_params"] = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(work / "student_bpe").parameters())
    (work / "prepared.json").write_text(json.dumps(info))
    return info


def teacher_samples(teacher, tok, probs) -> list[dict]:
    """The teacher's greedy worked answers to training prompts (the SFT-on-teacher-samples dataset)."""
    from protege.data import Example, PromptTokenizer
    from protege.rollout import hf as hf_rollout

    pt = PromptTokenizer(tok, 64)
    rows = []
    for s in range(0, len(probs), 256):
        part = probs[s: s + 256]
        ids = [pt.prompt_ids(Example(messages=[{"role": "user", "content": f"{a}+{b}="}])) for a, b in part]
        r = hf_rollout.generate(teacher, ids, max_new_tokens=40, temperature=0.0, eos_ids=[tok.eos_token_id],
                                pad_id=tok.pad_token_id)
        for i, (a, b) in enumerate(part):
            text = tok.decode(r.completion_ids[i, : int(r.completion_mask[i].sum())], skip_special_tokens=True)
            rows.append({"prompt": f"{a}+{b}=", "completion": text})
    return rows


def job(args) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    work = Path(args.work)
    held = [tuple(p) for p in json.loads((work / "heldout.json").read_text())]
    kind, overrides = METHODS[args.method]
    char = bq.make_tokenizer()
    tok = char if kind == "char" else __import__("transformers").AutoTokenizer.from_pretrained(work / "bpe_tok")
    student = LlamaForCausalLM.from_pretrained(work / f"student_{kind}")
    teacher = LlamaForCausalLM.from_pretrained(work / "teacher")
    data = work / "train.jsonl"
    overrides = [o if "TEACHER_SAMPLES" not in o else f"data.path={work / 'teacher_samples.jsonl'}" for o in overrides]
    d = distiller(student, teacher, tok, None if kind == "char" else char, data, work / f"run_{args.job_index}",
                  [*overrides, f"train.seed={args.seed}", f"train.max_steps={args.steps}",
                   f"train.prompts_per_step={args.prompts_per_step}", f"train.micro_batch_size={args.prompts_per_step}",
                   f"optim.lr={args.lr}", "optim.schedule=constant"])
    kl_before = heldout_kl_per_byte(student, teacher, tok, char, held, args.seed)
    t = time.perf_counter()
    hist = bq.run_steps(d, f"{args.method} seed {args.seed}")
    seconds = time.perf_counter() - t
    res = {"method": args.method, "seed": args.seed, "exact_match": exact_match(student, tok, held),
           "kl_before": kl_before, "kl_after": heldout_kl_per_byte(student, teacher, tok, char, held, args.seed),
           "seconds": seconds, "tokens": sum(m["tokens"] for m in hist),
           "tokens_per_s": sum(m["tokens"] for m in hist) / seconds,
           "one_to_one_share": statistics.mean(m["cross/one_to_one_share"] for m in hist)
           if "cross/one_to_one_share" in hist[-1] else None,
           "span_len_mean": statistics.mean(m["cross/span_len_mean"] for m in hist)
           if "cross/span_len_mean" in hist[-1] else None,
           "noncanonical_first": hist[0].get("cross/noncanonical_rows"),
           "noncanonical_last": hist[-1].get("cross/noncanonical_rows")}
    print("RESULT " + json.dumps(res), flush=True)


def heldout_kl_per_byte(student, teacher, tok, char, held, seed: int) -> float:
    """Held-out text-level reverse KL per byte, sampled: sum over rows of log q(s) - log p(s) for the text s of
    one temperature-1 sample of the student per held-out prompt, over the bytes of those texts (+1 per EOS).
    Each model's log-probability of a text is that of its canonical path (its tokenizer's own encoding: the
    teacher re-tokenizes; the student's by one forward where it sampled another path), as the span estimator
    does (docs/cross_tokenizer.md). The char student has one path per text. So students with different
    tokenizers are compared on the same scale, and spreading mass over tokenizations does not lower it."""
    import torch

    from protege.cross_objective import canonical_student_logprobs
    from protege.data import Example, PromptTokenizer
    from protege.rollout import hf as hf_rollout
    from protege.teacher.base import ScoreRequest
    from protege.teacher.cross_tokenizer import CrossTokenizerTeacher
    from protege.teacher.local import LocalTeacher

    examples = [Example(messages=[{"role": "user", "content": f"{a}+{b}="}]) for a, b in held]
    pt = PromptTokenizer(tok, 64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10_000 + seed)
        r = hf_rollout.generate(student, [pt.prompt_ids(e) for e in examples], max_new_tokens=40, temperature=1.0,
                                eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    r.examples = examples
    ct = CrossTokenizerTeacher(LocalTeacher(teacher, pad_id=0), tok, char, student_vocab_size=student.config.vocab_size,
                               student_eos_ids=[tok.eos_token_id], teacher_eos_ids=[char.eos_token_id])
    sig = ct.score(r, ScoreRequest(canonical=True))
    own = canonical_student_logprobs(student, sig.cross, r, pad_id=tok.pad_token_id, rows=64)
    mask = r.completion_mask
    nbytes = sum(len(tok.decode(r.completion_ids[i, : int(mask[i].sum())], skip_special_tokens=True).encode()) + 1
                 for i in range(len(r)))
    return float((own - sig.token_logprobs)[mask].sum()) / nbytes


def gold_status() -> str:
    """Why GOLD cannot run on this pair, asked of trl itself: its byte-offset encoder on the teacher's tokenizer."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.utils import encode_with_byte_offsets

        encode_with_byte_offsets(bq.make_tokenizer().backend_tokenizer, ["347+589="])
    except NotImplementedError as e:
        return f"its alignment refuses the character-level teacher (trl's encode_with_byte_offsets raised: \"{e}\")"
    except ImportError as e:
        return f"trl's GOLD is not importable here ({e})"
    return "its alignment accepts this pair, but this script does not run GOLDTrainer yet"


def report(args, info, results, seconds, argv: list[str] | None = None) -> str:
    import platform

    lines = ["# Cross-tokenizer OPD: char-level teacher, BPE student, 3-digit addition", "",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- machine: {platform.platform()}, {os.cpu_count()} cores (shared with other jobs), 1 thread per run, "
             f"runs {args.parallel} at a time",
             f"- command: `nice -n 5 python bench/bench_cross_tokenizer.py {' '.join(argv or sys.argv[1:])}` "
             f"(total {seconds / 60:.1f} min)" + ("; the rows of other methods come from the previous run with the "
                                                  "same settings (results.json)" if args.methods else ""),
             f"- task: bench_quality.py's (a+b, worked answer); {args.train_problems} training problems, "
             f"{args.heldout} held-out; exact match of greedy answers",
             f"- teacher: char-level Llama 4x128, {args.teacher_steps} SFT steps x {args.sft_batch} problems (lr {args.sft_lr}, cosine): exact match "
             f"{info['teacher']['exact_match']:.3f}",
             f"- students: Llama 2x64 ({info['student_params'] / 1e6:.2f} M parameters with the BPE vocabulary), "
             f"{args.student_steps} SFT steps x {args.sft_batch} problems from scratch: BPE start {info['start_bpe']:.3f}, char start "
             f"{info['start_char']:.3f}",
             f"- every method: {args.steps} steps x {args.prompts_per_step} prompts, lr {args.lr}, in-process teacher, "
             f"seeds 0..{args.seeds - 1}",
             f"- GOLD (trl's GOLDTrainer) was not run: {gold_status()}",
             "- held-out KL: text-level reverse KL to the teacher per byte of the student's samples (sampled, one "
             "temperature-1 sample per held-out prompt; each model's log-probability of a text is its canonical "
             "path's: the teacher re-tokenizes, the student's by a forward), before -> after",
             "- non-canonical rows: share of the student's samples that are not its tokenizer's own encoding of their "
             "text (cross/noncanonical_rows), first -> last step",
             "", "| method | exact match (mean) | std | min | max | seeds | held-out KL per byte, before -> after "
             "(mean) | tokens/s | 1:1 share | span length | non-canonical rows |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in METHODS:
        rs = [r for r in results if r["method"] == m]
        if not rs:
            continue
        em = [r["exact_match"] for r in rs]
        one = [r["one_to_one_share"] for r in rs if r["one_to_one_share"] is not None]
        sl = [r["span_len_mean"] for r in rs if r["span_len_mean"] is not None]
        kl = f"{statistics.mean(r['kl_before'] for r in rs):.3f} -> {statistics.mean(r['kl_after'] for r in rs):.3f}"
        align_cols = f"{statistics.mean(one):.2f} | {statistics.mean(sl):.2f}" if one else "- | -"
        nc = [(r["noncanonical_first"], r["noncanonical_last"]) for r in rs if r.get("noncanonical_first") is not None]
        align_cols += (f" | {statistics.mean(a for a, _ in nc):.2f} -> {statistics.mean(b for _, b in nc):.2f}"
                       if nc else " | -")
        lines.append(f"| {m} | {statistics.mean(em):.3f} | {statistics.stdev(em) if len(em) > 1 else 0:.3f} | "
                     f"{min(em):.3f} | {max(em):.3f} | {len(rs)} | {kl} | "
                     f"{statistics.mean(r['tokens_per_s'] for r in rs):.0f} | {align_cols} |")
    lines += ["", "## Per run", "", "| method | seed | exact match | held-out KL per byte before | after | s | "
              "tokens/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['seed']} | {r['exact_match']:.3f} | {r['kl_before']:.4f} | "
                     f"{r['kl_after']:.4f} | {r['seconds']:.0f} | {r['tokens_per_s']:.0f} |")
    lines.append("\nDifferences smaller than the seeds' spread are not evidence either way.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-steps", type=int, default=1000)
    ap.add_argument("--sft-batch", type=int, default=64, help="problems per step of the teacher's and starts' SFT")
    ap.add_argument("--sft-lr", type=float, default=2e-3, help="lr of the teacher's and starts' SFT")
    ap.add_argument("--student-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-problems", type=int, default=20000)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "outputs" / "bench_cross_tokenizer"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cross_tokenizer.md"))
    ap.add_argument("--prepare-only", action="store_true", help="train the teacher and the starts, then stop")
    ap.add_argument("--report-only", action="store_true", help="rewrite --out from the last run's results.json")
    ap.add_argument("--methods", default="", help="comma-separated parts of method names: run only those, keeping "
                    "the other methods' rows of the last run (results.json)")
    ap.add_argument("--job-index", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job_index is not None:
        return job(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = prepare(args, work)
    print(f"prepared: {info}", flush=True)
    if args.prepare_only:
        return
    if args.report_only:  # rewrite the report from the last run's results.json (keeps its date and total)
        saved = json.loads((work / "results.json").read_text())
        Path(args.out).write_text(report(args, info, saved["results"], saved.get("seconds", 0.0), saved.get("argv")))
        return
    need, path = args.steps * args.prompts_per_step, work / "teacher_samples.jsonl"
    if not path.exists() or len(path.read_text().splitlines()) < need:  # the SFT row's dataset: one pass, no repeats
        from transformers import LlamaForCausalLM

        train = [tuple(json.loads(line)["prompt"][:-1].split("+")) for line in (work / "train.jsonl").open()][:need]
        samples = teacher_samples(LlamaForCausalLM.from_pretrained(work / "teacher"), bq.make_tokenizer(),
                                  [(int(a), int(b)) for a, b in train])
        path.write_text("".join(json.dumps(r) + "\n" for r in samples))
    def write(results: list[dict]) -> str:  # after every finished run: a killed benchmark leaves its rows
        text = report(args, info, results, time.perf_counter() - t0)
        Path(args.out).write_text(text)
        (work / "results.json").write_text(json.dumps({"info": info, "results": results, "argv": sys.argv[1:],
                                                       "seconds": time.perf_counter() - t0}, indent=1))
        return text
    print(write(run_jobs(args, work, write)))


def run_jobs(args, work: Path, write) -> list[dict]:
    import subprocess

    picked = [m for m in METHODS if not args.methods or any(x in m for x in args.methods.split(","))]
    jobs = [(m, s) for s in range(args.seeds) for m in picked]
    results = []
    if args.methods and (work / "results.json").exists():  # add these methods' rows to the earlier run's
        results = [r for r in json.loads((work / "results.json").read_text())["results"] if r["method"] not in picked]
    pending, running = [(i + 1000 * bool(args.methods), job) for i, job in enumerate(jobs)], []
    while pending or running:
        while pending and len(running) < args.parallel:
            i, (m, s) = pending.pop(0)
            cmd = [sys.executable, __file__, "--job-index", str(i), "--method", m, "--seed", str(s), "--work",
                   str(work), "--steps", str(args.steps), "--prompts-per-step", str(args.prompts_per_step),
                   "--lr", str(args.lr)]
            log = open(work / f"job_{i}.log", "w")
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            running.append((i, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(1.0)
        for item in list(running):
            i, p, log = item
            if p.poll() is None:
                continue
            running.remove(item)
            log.close()
            lines = [ln for ln in (work / f"job_{i}.log").read_text().splitlines() if ln.startswith("RESULT ")]
            if p.returncode != 0 or not lines:
                print(f"job {i} failed (exit {p.returncode}); see {work / f'job_{i}.log'}", flush=True)
                continue
            results.append(json.loads(lines[-1][7:]))
            print(f"  {results[-1]['method']} seed {results[-1]['seed']}: {results[-1]['exact_match']:.3f}", flush=True)
            write(results)
    return results


if __name__ == "__main__":
    main()
