"""API-teacher client throughput against protege's own OpenAI-compatible route, at 1-16 concurrent requests.

    nice -n 5 python bench/bench_api.py            # ~3-6 minutes on 2 busy CPU cores; writes bench/results/api.md

The server (a subprocess, 1 torch thread) serves a randomly initialised Llama (hidden 256, 4 layers,
vocabulary 49152 = SmolLM2's, fp32) on /v1/completions twice: with request merging (the default) and
with `batching=False` (every request its own generate call). The client is protege.teacher.api.APITeacher
(teacher.protocol=openai-completions, top_logprobs=5, token ids back), with max_concurrency = the level:
it generates one completion of exactly `--new-tokens` tokens (no EOS in the sampling) for each of
`--requests` prompts of `--prompt-tokens` random ids, temperature 1, into an empty store (nothing cached).
Per level and seed: requests/s, completion tokens/s (what the API bills as completion_tokens), and the
p50/p95 latency of one request (the client's HTTP call, retries included; none happened).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 49152
MODEL = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=2048)
LEVELS = (1, 2, 4, 8, 16)


def serve() -> None:
    """Subprocess role: the two apps (merging on, off) over one model; prints their URLs, runs until killed."""
    import threading

    from transformers import LlamaConfig, LlamaForCausalLM

    from protege.server import HFBackend, create_app
    from protege.server.background import serve_in_thread

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).eval()
    on = serve_in_thread(create_app(HFBackend(model, model_name="bench"), max_k=32, batching=True))
    off = serve_in_thread(create_app(HFBackend(model, model_name="bench"), max_k=32, batching=False))
    print(json.dumps({"on": on.url, "off": off.url}), flush=True)
    threading.Event().wait()


def run_level(url: str, concurrency: int, seed: int, args) -> dict:
    from protege.rollout.base import Sampling
    from protege.teacher.api import APITeacher

    g = torch.Generator().manual_seed(seed * 1000 + concurrency)
    prompts = [torch.randint(0, VOCAB, (args.prompt_tokens,), generator=g) for _ in range(args.requests)]
    latencies = []
    with tempfile.TemporaryDirectory() as store:
        teacher = APITeacher("openai-completions", url, store_dir=store, topk=5, max_concurrency=concurrency)
        call = teacher.http.request

        def timed(*a, **k):
            start = time.perf_counter()
            out = call(*a, **k)
            latencies.append(time.perf_counter() - start)
            return out

        teacher.http.request = timed
        teacher.generate(prompts[:1], Sampling(max_new_tokens=2, temperature=1.0))  # warm-up, not counted
        latencies.clear()
        teacher.usage_since_last()
        start = time.perf_counter()
        rows = teacher.generate(prompts, Sampling(max_new_tokens=args.new_tokens, temperature=1.0))
        wall = time.perf_counter() - start
        usage = teacher.usage_since_last()
        teacher.close()
    assert usage["teacher_api_requests"] == args.requests and rows.num_tokens == usage["teacher_api_completion_tokens"]
    lat = sorted(latencies)
    return {"concurrency": concurrency, "seed": seed, "requests": args.requests, "wall_s": wall,
            "req_per_s": args.requests / wall, "tok_per_s": usage["teacher_api_completion_tokens"] / wall,
            "p50_ms": 1000 * lat[len(lat) // 2], "p95_ms": 1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))]}


def write(rows: list[dict], args, loads: tuple, out: Path) -> None:
    cmd = "nice -n 5 python bench/bench_api.py " + " ".join(sys.argv[1:])
    lines = ["# API teacher client vs protege's OpenAI-compatible route", "",
             f"Date: {datetime.date.today()}. Machine: {platform.machine()}, {os.cpu_count()} CPU cores "
             f"({platform.platform()}), shared with other jobs: load average {loads[0]:.1f} at the start, "
             f"{loads[1]:.1f} at the end. Command: `{cmd}`.", "",
             f"Server: random Llama (hidden 256, 4 layers, vocabulary {VOCAB}), fp32, 1 torch thread, on "
             "/v1/completions. Client: APITeacher(openai-completions, top_logprobs=5), max_concurrency = the level; "
             f"{args.requests} prompts of {args.prompt_tokens} tokens, {args.new_tokens} new tokens each, "
             "temperature 1, empty store. merge = the server merges concurrent requests into one generate call "
             "(default); alone = `batching=False`, one call per request.", "",
             "| server | concurrency | seed | requests/s | completion tokens/s | p50 latency ms | p95 latency ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['seed']} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} "
                     f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} |")
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": cmd, "load": loads, "rows": rows}, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--modes", default="merge,alone")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "api.md"))
    args = parser.parse_args()
    if args.serve:
        return serve()
    torch.set_num_threads(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, env=env, text=True)
    loads = [os.getloadavg()[0]]
    try:
        urls = json.loads(proc.stdout.readline())
        rows = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            for mode in args.modes.split(","):
                for c in LEVELS:
                    row = {"mode": mode, **run_level(urls["on" if mode == "merge" else "off"], c, seed, args)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    finally:
        proc.terminate()
        proc.wait(30)
    loads.append(os.getloadavg()[0])
    write(rows, args, tuple(loads), Path(args.out))


if __name__ == "__main__":
    main()
