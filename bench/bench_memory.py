"""Benchmark: where protege's peak memory comes from on the bench_vs_trl workload, and what the defaults cost.

Same workload as bench/bench_vs_trl.py (SmolLM2-135M teacher, 24-layer pruned student, 8 prompts x
64 new tokens per step, full-vocabulary reverse KL, fp32, one thread), protege only (TRL's peak is
in bench/results/vs_trl*.md, or `--trl` runs one TRL child here, the bench_vs_trl child as is).
Each variant runs in a fresh subprocess: 1 warm-up step, then --steps measured steps, each phase
(collect = generation, score = teacher, learn = forward/backward/optimizer) called alone. Recorded:

  peak RSS      the child's ru_maxrss (model loading included), as bench_vs_trl reports it
  by phase      the largest resident set a thread polling /proc/self/status every 5 ms saw while
                each labelled part ran (learn split into student forward, loss, backward, optimizer)
  CPU s         process CPU seconds of each phase in the measured steps (one thread: robust to the
                other jobs on this shared machine, unlike wall time)

    python bench/bench_memory.py                 # the default variants, writes bench/results/memory.md
    python bench/bench_memory.py --variants "defaults,old mb8" --steps 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

OLD = ["train.gradient_checkpointing=false", "loss.chunk_size=1024", "train.pack=false"]
VARIANTS = {  # name: (micro-batch size or None = the default, overrides)
    "defaults": (None, []),
    "old defaults (mb 4)": (4, OLD),
    "old mb8": (8, OLD),
    "old mb1": (1, OLD),
    "gc": (None, ["train.gradient_checkpointing=true", "loss.chunk_size=1024"]),
    "gc chunk256": (None, ["train.gradient_checkpointing=true", "loss.chunk_size=256"]),
    "gc chunk256 mb8": (8, ["train.gradient_checkpointing=true", "loss.chunk_size=256"]),
    "pack 512 gc chunk256": (None, ["train.gradient_checkpointing=true", "loss.chunk_size=256", "train.pack=true",
                                    "train.micro_batch_tokens=512"]),
}


def _cur_mb() -> float:
    for ln in open("/proc/self/status"):
        if ln.startswith("VmRSS"):
            return int(ln.split()[1]) / 1024
    return 0.0


class Poller:
    """The largest VmRSS seen while each label was set (a daemon thread, every 5 ms)."""

    def __init__(self):
        self.label, self.peaks = "load", {}
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            r, k = _cur_mb(), self.label
            self.peaks[k] = max(self.peaks.get(k, 0.0), r)
            time.sleep(0.005)

    def wrap(self, obj, name: str, label: str):
        f = getattr(obj, name)

        def g(*a, **k):
            prev, self.label = self.label, label
            try:
                return f(*a, **k)
            finally:
                self.label = prev
        setattr(obj, name, g)


def child(spec: dict) -> dict:
    import tempfile

    import torch

    from bench_vs_trl import LR, MAX_NEW_TOKENS, SEED
    from protege.config import load_config
    from protege.trainer import Distiller

    torch.set_num_threads(1)
    cache = Path(spec["cache"])
    poller = Poller()
    mb = [] if spec["mb"] is None else [f"train.micro_batch_size={spec['mb']}"]
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [f"student.path={cache / 'student24'}", f"teacher.path={cache / 'teacher'}",
                                 f"data.path={cache / 'prompts_protege.jsonl'}", "train.prompts_per_step=8",
                                 f"rollout.max_new_tokens={MAX_NEW_TOKENS}", "loss.name=reverse_kl",
                                 "loss.support=full", "data.eval_prompts=0", "output.progress=false", f"optim.lr={LR}",
                                 f"train.seed={SEED}", "train.precision=fp32", f"output.dir={out}", *mb,
                                 *spec["overrides"]])
        d = Distiller(cfg)
        poller.wrap(d.model, "forward", "learn: student forward")
        poller.wrap(type(d.objective), "per_token_loss", "learn: loss (fused: + its gradients)")
        poller.wrap(d.acc, "backward", "learn: backward")
        poller.wrap(d.optimizer, "step", "learn: optimizer step")
        steps = []
        for s in range(1 + spec["steps"]):
            row = {}
            for phase in ("collect", "score", "learn"):
                poller.label = phase
                c0 = time.process_time()
                if phase == "collect":
                    buffer = d.collect(d.state.step)
                elif phase == "score":
                    signal = d.score(buffer)
                else:
                    row["loss"] = d.learn(buffer, signal)["loss"]
                row[phase] = time.process_time() - c0
                poller.label = "between phases"
            d.state.step += 1
            row["tokens"] = buffer.num_tokens
            steps.append(row)
        time.sleep(0.01)
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "steps": steps,
            "peaks": {k: round(v) for k, v in poller.peaks.items()}, "config": {
                "micro_batch_size": cfg.train.micro_batch_size, "gradient_checkpointing": cfg.train.gradient_checkpointing,
                "chunk_size": cfg.loss.chunk_size, "pack": cfg.train.pack}}


def run(kind: str, spec: dict) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore", TQDM_DISABLE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TRL_EXPERIMENTAL_SILENCE="1", PYTHONPATH=str(ROOT))
    if kind == "trl":
        cmd = [sys.executable, str(ROOT / "bench" / "bench_vs_trl.py"), "--child", "trl", "--spec", json.dumps(spec)]
    else:
        cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"child {kind} {spec} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def report(args, results: dict, trl: dict | None, total_s: float) -> str:
    import torch
    import transformers

    lines = ["# protege peak memory on the bench_vs_trl workload", "",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- machine: {platform.platform()}, {os.cpu_count()} cores (shared with other jobs: load average "
             f"{os.getloadavg()[0]:.1f} at the end), torch threads 1",
             f"- torch {torch.__version__}, transformers {transformers.__version__}",
             f"- command: `python bench/bench_memory.py {' '.join(sys.argv[1:])}` (total {total_s / 60:.1f} min)",
             "- workload: bench_vs_trl's (SmolLM2-135M teacher, 24-layer student, 8 prompts x 64 new tokens, full "
             "reverse KL, fp32); 1 warm-up step + "
             f"{args.steps} measured step(s) per fresh child; CPU s = process CPU seconds per measured step "
             "(robust to the machine's load, wall time is not)", "",
             "| variant | mb | gc | chunk | pack | peak RSS (MB) | collect CPU s | score CPU s | learn CPU s | "
             "step CPU s | tokens/CPU-s | loss (last) |", "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        c = r["config"]
        m = r["steps"][1:]
        cs, ss, ls = (sum(x[k] for x in m) / len(m) for k in ("collect", "score", "learn"))
        tok = sum(x["tokens"] for x in m) / len(m)
        lines.append(f"| {name} | {c['micro_batch_size']} | {c['gradient_checkpointing']} | {c['chunk_size']} | "
                     f"{c['pack']} | {r['peak_rss_mb']:.0f} | {cs:.1f} | {ss:.1f} | {ls:.1f} | {cs + ss + ls:.1f} | "
                     f"{tok / (cs + ss + ls):.1f} | {m[-1]['loss']:.4f} |")
    if trl:
        cpu = [s["cpu"] for s in trl["steps"] if not s["warmup"]]
        tok = [s["tokens"] for s in trl["steps"] if not s["warmup"]]
        lines.append(f"| TRL 1.16 (bench_vs_trl child, its defaults: gc, GA 8 x mb 1) | 1 | True | - | - | "
                     f"{trl['peak_rss_mb']:.0f} | - | - | - | {sum(cpu) / len(cpu):.1f} | "
                     f"{sum(tok) / sum(cpu):.1f} | - |")
    lines += ["", "Largest resident set (MB) seen while each part ran (all steps):", "",
              "| variant | " + " | ".join(PARTS) + " |", "|---|" + "---:|" * len(PARTS)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(str(r["peaks"].get(p, "-")) for p in PARTS) + " |")
    return "\n".join(lines) + "\n"


PARTS = ["load", "collect", "score", "learn", "learn: student forward", "learn: loss (fused: + its gradients)",
         "learn: backward", "learn: optimizer step"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    ap.add_argument("--steps", type=int, default=1, help="measured steps after 1 warm-up step (default 1)")
    ap.add_argument("--trl", action="store_true", help="also run one TRL child (bench_vs_trl's)")
    ap.add_argument("--cache", default="/tmp/protege_bench", help="bench_vs_trl's model cache (its prepare step)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory.md"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    t0 = time.perf_counter()
    results = {}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        mb, overrides = VARIANTS[name]
        results[name] = run("protege", {"cache": args.cache, "mb": mb, "overrides": overrides, "steps": args.steps})
        print(f"{name}: peak {results[name]['peak_rss_mb']:.0f} MB", flush=True)
    trl = run("trl", {"cache": args.cache, "warmup": 1, "steps": args.steps, "threads": 1}) if args.trl else None
    text = report(args, results, trl, time.perf_counter() - t0)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"results": results, "trl": trl}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
