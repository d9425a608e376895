"""How much two busy processes slow each other on this machine, by OpenMP thread count.

    python bench/bench_threads.py            # ~2 min; writes bench/results/threads.md

The workload is a SmolLM2-135M-shaped decoder (hidden 576, 9 heads / 3 KV heads, 49152 vocab,
random weights, fewer layers to keep it short) generating greedily with a KV cache, 8 rows:
the many small ops of decoding are where OpenMP's spinning threads fight. Each setting runs the
same workload in fresh processes, first alone, then two at once, and reports the median seconds
and the slowdown of running together. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
threads, layers, tokens, reps = map(int, sys.argv[1:5])
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048)
model = LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 49152, (8, 32))
kw = dict(attention_mask=torch.ones_like(ids), pad_token_id=0, do_sample=False)
times = []
with torch.no_grad():
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    for _ in range(reps):
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def _run(threads: int, together: int, args) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-c", CHILD, str(threads), str(args.layers), str(args.tokens), str(args.reps)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(together)]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=1800)
        if p.returncode:
            raise SystemExit(f"child failed with {p.returncode}")
        out += json.loads(stdout)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "threads.md"))
    args = ap.parse_args()
    t0 = time.time()
    rows = []
    for threads in (1, 2):
        alone = statistics.median(_run(threads, 1, args))
        both = statistics.median(_run(threads, 2, args))
        rows.append((threads, alone, both, both / alone))
        print(f"threads {threads}: alone {alone:.2f} s, two at once {both:.2f} s, slowdown {both / alone:.2f}x",
              flush=True)
    load = os.getloadavg()[0]
    lines = ["# Two processes on this machine: slowdown by OpenMP thread count", "",
             f"- date: {time.strftime('%Y-%m-%dT%H:%M:%S')}",
             f"- machine: {os.cpu_count()} cores; load average at the end {load:.1f}",
             f"- command: `python bench/bench_threads.py --layers {args.layers} --tokens {args.tokens} "
             f"--reps {args.reps}` (total {time.time() - t0:.0f} s)",
             f"- workload: SmolLM2-135M-shaped decoder with {args.layers} layers (random weights), greedy "
             f"generate of {args.tokens} tokens for 8 rows of 32 prompt tokens; median of {args.reps} timed calls "
             "per process after a warm-up", "",
             "| threads per process | alone (s) | two processes at once (s) | slowdown |", "|---:|---:|---:|---:|"]
    lines += [f"| {t} | {a:.2f} | {b:.2f} | {r:.2f}x |" for t, a, b, r in rows]
    lines += ["", "With 2 threads each, two processes oversubscribe the 2 cores and OpenMP's spin-waiting threads "
              "stall each other; with 1 thread each they share the cores. Hence `train.num_threads: 1` on a shared "
              "machine and one thread per test process."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
