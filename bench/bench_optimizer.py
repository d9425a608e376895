"""AdamW implementations on this CPU: time per step and peak memory for SmolLM2-135M's parameter shapes.

    python bench/bench_optimizer.py        # writes bench/results/optimizer.md (about 1 min)

protege builds torch's fused AdamW where it applies (protege.build.build_optimizer). This measures why:
each implementation runs in a fresh subprocess, 1 thread, over fp32 parameters shaped like the 24-layer
SmolLM2 student of bench_vs_trl.py (tied 49152 x 576 embedding + 24 x 7 projection matrices, 113 M
parameters) with random gradients: 1 warm-up step (allocates the state), then 3 timed steps. Peak RSS is
the process's high-water mark after the timed steps; 'transient' is that minus the RSS before them (the
full-size temporaries an implementation allocates inside a step).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def child(kind: str, steps: int) -> dict:
    import resource
    import time

    import torch

    torch.set_num_threads(1)
    shapes = [(49152, 576)] + [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
                               (576, 1536)] * 24
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-4, **KINDS[kind])
    opt.step()

    def rss() -> float:
        return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmRSS")).split()[1]) / 1024

    before = rss()
    t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    seconds = (time.perf_counter() - t) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "params_m": sum(p.numel() for p in params) / 1e6, "step_s": seconds, "rss_before": before,
            "peak": peak, "transient": max(0.0, peak - before), "checksum": float(sum(p.double().sum() for p in params))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "optimizer.md"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = [json.loads(subprocess.run([sys.executable, __file__, "--child", k, "--steps", str(args.steps)], env=env,
                                      check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            for k in KINDS]
    import torch

    base = rows[0]
    lines = ["# AdamW on this CPU: default vs foreach vs fused", "",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- machine: {platform.platform()}, {os.cpu_count()} cores, 1 thread; torch {torch.__version__}",
             f"- command: `python bench/bench_optimizer.py {' '.join(sys.argv[1:])}`",
             f"- parameters: {base['params_m']:.1f} M fp32 in SmolLM2-135M's 24-layer shapes, random gradients; "
             f"1 warm-up step, {args.steps} timed steps, each implementation in a fresh process",
             "", "| AdamW | s per step | vs default | RSS before (MB) | peak RSS (MB) | transient (MB) | "
             "sum of all weights minus default's after the steps |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['step_s']:.3f} | {base['step_s'] / r['step_s']:.2f}x | {r['rss_before']:.0f} | "
                     f"{r['peak']:.0f} | {r['transient']:.0f} | {r['checksum'] - base['checksum']:.2e} |")
    lines += ["", "protege uses `fused` (protege.build.build_optimizer) except under FSDP, whose sharded parameters "
              "are swapped in after the optimizer is built."]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
