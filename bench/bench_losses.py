"""Benchmark: dense vs chunked-from-hidden distillation loss (vs TRL's generalized_jsd_loss), CPU.

Each variant computes loss + backward for a student lm_head (V, H) on N positions against a
teacher given as hidden states + lm_head, and runs in a fresh subprocess so that its peak resident
memory (ru_maxrss after minus before the measured step) is its own:

    dense    full student and teacher logits (N, V), protege dense_divergence, reduce_tokens
    chunked  protege chunked_dense_divergence from hidden states (no (N, V) tensor ever exists),
             gradients by recomputing each chunk in the backward (torch.utils.checkpoint)
    fused    the same with fused=True: each chunk's gradients computed in the forward pass
             (loss.fused, the trainer's default)
    trl      full logits as in "dense", then TRL GKDTrainer.generalized_jsd_loss (labels mask)

    python bench/bench_losses.py                              # N = 8 x 512, H = 576, V = 49152
    python bench/bench_losses.py --positions 1024 --vocab 8192   # quick
Writes bench/results/losses.md.
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

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("dense", "chunked", "fused", "trl")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=4096, help="N = batch x completion length (default 8 x 512)")
    ap.add_argument("--batch", type=int, default=8, help="rows the N positions are split into (TRL's (B, T, V) view)")
    ap.add_argument("--hidden", type=int, default=576, help="student hidden size H (SmolLM2-135M: 576)")
    ap.add_argument("--teacher-hidden", type=int, default=576, help="teacher hidden size")
    ap.add_argument("--vocab", type=int, default=49152, help="vocabulary size V (SmolLM2: 49152)")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--name", default="jsd", help="divergence for the protege variants (TRL is always jsd)")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "losses.md"))
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_child(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from protege.losses import chunked_dense_divergence, dense_divergence, reduce_tokens

    torch.set_num_threads(args.threads)
    n, v, b = args.positions, args.vocab, args.batch
    t = n // b

    def make(num: int):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(num, args.hidden, generator=g).requires_grad_(True)  # (N, H)
        w = (torch.randn(v, args.hidden, generator=g) * 0.05).requires_grad_(True)  # (V, H)
        th = torch.randn(num, args.teacher_hidden, generator=g)  # (N, Ht)
        tw = torch.randn(v, args.teacher_hidden, generator=g) * 0.05  # (V, Ht)
        return h, w, th, tw

    def step(h, w, th, tw) -> torch.Tensor:
        num, rows = h.shape[0], max(1, min(b, h.shape[0]))
        if args.child in ("chunked", "fused"):
            per_token = chunked_dense_divergence(
                h, w, teacher_hidden=th, teacher_weight=tw, name=args.name, beta=args.beta, chunk_size=args.chunk_size,
                fused=args.child == "fused")  # (N,)
            return reduce_tokens(per_token, torch.ones(num, dtype=torch.bool), num)
        student_logits = (h @ w.T).view(rows, num // rows, v)  # (B, T, V)
        with torch.no_grad():
            teacher_logits = (th @ tw.T).view(rows, num // rows, v)  # (B, T, V)
        if args.child == "dense":
            per_token = dense_divergence(student_logits, teacher_logits, name=args.name, beta=args.beta)  # (B, T)
            return reduce_tokens(per_token, torch.ones(per_token.shape, dtype=torch.bool), num)
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer

        labels = torch.zeros(rows, num // rows, dtype=torch.long)  # every position is a completion token
        return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=args.beta)

    step(*make(2 * b)).backward()  # warm-up: thread pool, kernels, lazy imports
    inputs = make(n)
    base = max_rss_mb()
    start = time.perf_counter()
    loss = step(*inputs)
    loss.backward()
    elapsed = time.perf_counter() - start
    peak = max_rss_mb()
    assert t * b == n
    return {"variant": args.child, "time_s": elapsed, "peak_mb": peak - base, "loss": float(loss)}


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return
    try:
        import trl  # noqa: F401

        variants = VARIANTS
    except ImportError:
        variants = ("dense", "chunked", "fused")
    results = {}
    for variant in variants:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"variant {variant} failed")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:8s} time {r['time_s']:7.2f} s   peak +{r['peak_mb']:8.0f} MiB   loss {r['loss']:.6f}", flush=True)

    import torch

    ref = results.get("trl", results["dense"])
    ref_name = "trl" if "trl" in results else "dense"
    lines = [
        "# Loss benchmark: dense vs chunked-from-hidden (recomputed or fused)",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"os.cpu_count()={os.cpu_count()}, torch threads={args.threads}, "
        f"load average at the end {os.getloadavg()[0]:.1f} (the machine is shared: times are noisy)",
        f"- torch {torch.__version__}" + (f", trl {__import__('trl').__version__}" if "trl" in results else ""),
        f"- shape: N={args.positions} positions (B={args.batch}), H={args.hidden}, teacher H={args.teacher_hidden}, "
        f"V={args.vocab}, chunk_size={args.chunk_size}, divergence={args.name}, beta={args.beta}, fp32, "
        "loss + backward (student hidden and lm_head grads)",
        "- peak: ru_maxrss of a fresh process after the step minus before it (inputs excluded)",
        "",
        f"| variant | time (s) | peak extra memory (MiB) | time / {ref_name} | memory / {ref_name} | loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for variant, r in results.items():
        lines.append(
            f"| {variant} | {r['time_s']:.2f} | {r['peak_mb']:.0f} | {r['time_s'] / ref['time_s']:.2f} | "
            f"{r['peak_mb'] / ref['peak_mb']:.2f} | {r['loss']:.6f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
