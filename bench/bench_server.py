"""Teacher-server benchmark: micro-batching on vs off under 1-16 concurrent clients, and the payload
size / client decode time of JSON lists vs TRL's base64 format vs protege's binary wire format.

    python bench/bench_server.py                  # ~3-5 minutes on 2 CPU cores; writes bench/results/server.md
    python bench/bench_server.py --duration 2     # quicker, noisier
    python bench/bench_server.py --payload-only   # only the payload/decode part, spliced into server.md

The teacher is a randomly initialised Llama (hidden 256, 4 layers, 4 heads, MLP 1024, vocab 49152 =
SmolLM2's vocabulary size), fp32, so the vocabulary projection, log-softmax and top-k cost what they
cost for a real small teacher. Both servers (batching on / off) run in one subprocess on two ports,
sharing the weights; clients are threads of this process, each a closed loop of binary /v1/score
requests (send, wait, decode, repeat) for `--duration` seconds after one warm-up request.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protege import wire  # noqa: E402

VOCAB = 49152
MODEL = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=2048)


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**MODEL)).eval()


def serve(threads: int) -> None:
    """Subprocess role: two apps (batching on, off) over one model; prints their URLs, runs until killed."""
    from protege.server import HFBackend, create_app
    from protege.server.background import serve_in_thread

    torch.set_num_threads(threads)
    model = build_model()
    on = serve_in_thread(create_app(HFBackend(model, model_name="bench-llama"), max_k=128, batching=True))
    off = serve_in_thread(create_app(HFBackend(model, model_name="bench-llama"), max_k=128, batching=False))
    print(json.dumps({"on": on.url, "off": off.url}), flush=True)
    threading.Event().wait()


# ---------------------------------------------------------------------------------------------
# Part 1: latency and throughput, batching on vs off.
# ---------------------------------------------------------------------------------------------

def request_body(seed: int, n_seqs: int, prompt: int, completion: int, topk: int) -> bytes:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, VOCAB, prompt + completion).astype(np.int32) for _ in range(n_seqs)]
    return wire.encode_score_request(seqs, [prompt] * n_seqs, topk=topk)


def engine_counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    keys = ("protege_engine_calls_total", "protege_engine_seconds_total", "protege_scored_tokens_total")
    return {k: float(line.split()[-1]) for line in text.splitlines() for k in keys if line.startswith(k + " ")}


def load(url: str, clients: int, duration: float, workload: dict) -> dict:
    """`clients` closed-loop clients for `duration` s: latencies, throughput, and the engine's share of it."""
    headers = {"Content-Type": wire.BINARY_MEDIA_TYPE, "Accept": wire.BINARY_MEDIA_TYPE}
    bodies = [request_body(c, **workload) for c in range(clients)]
    before: dict[str, float] = {}
    barrier = threading.Barrier(clients, action=lambda: before.update(engine_counters(url)))  # after warm-ups
    tokens_per_request = workload["n_seqs"] * (workload["prompt"] + workload["completion"])

    start_at: list[float] = []
    ends: list[float] = []

    def client(c: int) -> list[float]:
        latencies = []
        with httpx.Client(base_url=url, timeout=120) as http:
            http.post("/v1/score", content=bodies[c], headers=headers).raise_for_status()  # warm-up
            if barrier.wait() == 0:
                start_at.append(time.perf_counter())
            stop = time.perf_counter() + duration
            while time.perf_counter() < stop:
                start = time.perf_counter()
                r = http.post("/v1/score", content=bodies[c], headers=headers)
                r.raise_for_status()
                wire.decode_score_response(r.content, r.headers["content-type"])
                latencies.append(time.perf_counter() - start)
        ends.append(time.perf_counter())
        return latencies

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        per_client = list(pool.map(client, range(clients)))
    after = engine_counters(url)
    delta = {k: after[k] - before[k] for k in after}
    busy = max(ends) - start_at[0]  # from the start line to the last reply
    latencies = [x for xs in per_client for x in xs]
    return {"latencies": latencies, "req_per_s": len(latencies) / busy,
            "tok_per_s": len(latencies) * tokens_per_request / busy,
            "engine_busy": delta["protege_engine_seconds_total"] / busy,
            "tokens_per_call": delta["protege_scored_tokens_total"] / max(delta["protege_engine_calls_total"], 1)}


def load_point(urls: dict, clients: int, duration: float, workload: dict, reps: int) -> dict[str, dict]:
    """Batching off and on, alternated `reps` times (the machine is shared: drifts hit both alike).
    Throughput: median over reps; latency percentiles: over all requests of all reps."""
    runs = {"off": [], "on": []}
    for _ in range(reps):
        for mode in ("off", "on"):
            runs[mode].append(load(urls[mode], clients, duration, workload))
    out = {}
    for mode, rs in runs.items():
        lat = sorted(x for r in rs for x in r["latencies"])
        out[mode] = {"requests": len(lat), "p50_ms": 1000 * lat[len(lat) // 2],
                     "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                     **{k: statistics.median(r[k] for r in rs)
                        for k in ("req_per_s", "tok_per_s", "engine_busy", "tokens_per_call")}}
    return out


# ---------------------------------------------------------------------------------------------
# Part 2: payload bytes and client decode time.
# ---------------------------------------------------------------------------------------------

def timed(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_json_lists(body: bytes, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a client of TRL's response_format="json" must do to get (B, T, K) tensors."""
    obj = orjson.loads(body)
    b, t = len(obj["logprobs"]), max(len(r) for r in obj["logprobs"])
    lp, ids = torch.zeros((b, t, k)), torch.zeros((b, t, k), dtype=torch.long)
    for i, (rows_lp, rows_id) in enumerate(zip(obj["logprobs"], obj["logprob_token_ids"])):
        n = len(rows_lp)
        lp[i, :n] = torch.tensor([r[:k] for r in rows_lp])
        ids[i, :n] = torch.tensor([r[:k] for r in rows_id])
    return lp, ids


def decode_trl_lists(obj_bytes: bytes) -> list:
    """TRL 1.3-1.8's client decode of its binary reply (np.frombuffer, then .tolist() per row)."""
    obj = orjson.loads(obj_bytes)
    shape = obj["shape"]
    lp = np.frombuffer(__import__("base64").b64decode(obj["logprobs_b64"]), dtype=np.float32).reshape(shape)
    ids = np.frombuffer(__import__("base64").b64decode(obj["token_ids_b64"]), dtype=np.int32).reshape(shape)
    return [(lp[i, :n].tolist(), ids[i, :n].tolist()) for i, n in enumerate(obj["completion_lengths"])]


OURS_V1 = "protege binary /v1/score (tensors): wire v1, fp32 logprobs + int32 ids"
OURS = "ours: wire v2 default, fp32 logprobs + uint16 ids (tensors)"
OURS_FP16 = "ours: wire v2, fp16 logprobs + uint16 ids (logprob_dtype=float16; tensors)"


def payloads(url: str, b: int, prompt: int, completion: int, k: int) -> tuple[list[dict], float]:
    """Rows of (format, bytes, decode_ms), and the max abs error of the float16 reply's top-k logprobs."""
    rng = np.random.default_rng(7)
    seqs = [rng.integers(0, VOCAB, prompt + completion).astype(np.int32) for _ in range(b)]
    plens = [prompt] * b

    def score(**options) -> bytes:
        r = http.post("/v1/score", content=wire.encode_score_request(seqs, plens, topk=k, **options),
                      headers={"Content-Type": wire.BINARY_MEDIA_TYPE})
        r.raise_for_status()
        return r.content

    with httpx.Client(base_url=url, timeout=300) as http:
        ours_v1, ours, ours_fp16 = score(version=1), score(), score(logprob_dtype="float16")
        legacy = {"sequences": [s.tolist() for s in seqs], "prompt_lengths": plens, "top_logprobs": k}
        trl_bin = http.post("/get_sequence_logprobs/", json={**legacy, "response_format": "binary"}).content
        lists = http.post("/get_sequence_logprobs/", json={**legacy, "response_format": "json"}).content
        openai = http.post("/v1/completions", json={"model": "bench-llama", "prompt": [s.tolist() for s in seqs],
                                                    "max_tokens": 1, "temperature": 1.0,
                                                    "prompt_logprobs": k}).content
    from trl.generation.vllm_client import VLLMClient

    from protege.server import compat

    def decode_openai():
        choices = orjson.loads(openai)["choices"]
        return [VLLMClient._format_sequence_logprobs(c, s.tolist(), p, k) for c, s, p in zip(choices, seqs, plens)]

    rows = [
        ("JSON lists (TRL 1.3-1.8 response_format=json), orjson + to tensors", lists,
         lambda: decode_json_lists(lists, k)),
        ("JSON lists, stdlib json.loads only (what requests' .json() does)", lists, lambda: json.loads(lists)),
        ("vLLM prompt_logprobs JSON (TRL 1.16), TRL's own parse", openai, decode_openai),
        ("TRL base64 binary, TRL 1.3-1.8 client decode (.tolist())", trl_bin, lambda: decode_trl_lists(trl_bin)),
        ("TRL base64 binary, protege.server.compat.decode_trl_binary (tensors)", trl_bin,
         lambda: compat.decode_trl_binary(trl_bin)),
        (OURS_V1, ours_v1, lambda: wire.decode_score_response(ours_v1, wire.BINARY_MEDIA_TYPE)),
        (OURS, ours, lambda: wire.decode_score_response(ours, wire.BINARY_MEDIA_TYPE)),
        (OURS_FP16, ours_fp16, lambda: wire.decode_score_response(ours_fp16, wire.BINARY_MEDIA_TYPE)),
    ]
    exact = {v: wire.decode_score_response(body, wire.BINARY_MEDIA_TYPE)[1] for v, body in
             (("v1", ours_v1), ("fp32", ours), ("fp16", ours_fp16))}
    assert torch.equal(exact["v1"]["topk_ids"], exact["fp32"]["topk_ids"])  # uint16 ids are lossless
    assert torch.equal(exact["v1"]["topk_logprobs"], exact["fp32"]["topk_logprobs"])
    assert torch.equal(exact["fp16"]["topk_ids"], exact["fp32"]["topk_ids"])
    fp16_err = float((exact["fp16"]["topk_logprobs"] - exact["fp32"]["topk_logprobs"]).abs().max())
    return [{"format": name, "bytes": len(body), "decode_ms": 1000 * timed(fn)} for name, body, fn in rows], fp16_err


# ---------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", default="bench", choices=["bench", "server"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    parser.add_argument("--duration", type=float, default=1.5, help="seconds per run (each point: reps x off/on)")
    parser.add_argument("--reps", type=int, default=3, help="alternating off/on runs per point")
    parser.add_argument("--clients", default="1,2,4,8,16")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "server.md"))
    parser.add_argument("--payload-only", action="store_true",
                        help="run only the payload/decode part and splice it into the existing --out report")
    args = parser.parse_args()
    if args.role == "server":
        serve(args.threads)
        return

    proc = subprocess.Popen([sys.executable, __file__, "--role", "server", "--threads", str(args.threads)],
                            stdout=subprocess.PIPE, text=True)
    try:
        urls = json.loads(proc.stdout.readline())
        workloads = {
            "small": dict(n_seqs=1, prompt=16, completion=16, topk=16),
            "medium": dict(n_seqs=2, prompt=64, completion=64, topk=16),
        }
        load_rows = []
        for wname, workload in ({} if args.payload_only else workloads).items():
            for clients in [int(c) for c in args.clients.split(",")]:
                for mode, r in load_point(urls, clients, args.duration, workload, args.reps).items():
                    r.update(workload=wname, clients=clients, batching=mode)
                    load_rows.append(r)
                    print(f"{wname:6s} clients={clients:2d} batching={mode:3s} p50={r['p50_ms']:7.1f} ms "
                          f"p99={r['p99_ms']:7.1f} ms {r['req_per_s']:6.1f} req/s {r['tok_per_s']:7.0f} tok/s "
                          f"engine busy {r['engine_busy']:.0%} {r['tokens_per_call']:.0f} tok/call", flush=True)
        payload_setup = dict(b=16, prompt=64, completion=192, k=20)
        pay, fp16_err = payloads(urls["on"], **payload_setup)
        for p in pay:
            print(f"{p['bytes']:>10d} B {p['decode_ms']:9.2f} ms  {p['format']}", flush=True)
        print(f"fp16 reply: max abs error of top-k logprobs vs fp32 {fp16_err:.3g}", flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    if args.payload_only:
        splice_payload(args, pay, payload_setup, fp16_err)
    else:
        write_report(args, load_rows, workloads, pay, payload_setup, fp16_err)


def payload_section(pay, payload_setup) -> list[str]:
    """The payload table, from its heading to its last row."""
    base = next(p for p in pay if p["format"].startswith("JSON lists (TRL"))
    lines = [f"## Payload and client decode: {payload_setup['b']} sequences x {payload_setup['completion']} "
             f"completion tokens (prompt {payload_setup['prompt']}), top-{payload_setup['k']}", "",
             "Bytes are the reply bodies as served. Decode = bytes in hand to usable values (median of 7). "
             "The three protege rows are the same request in wire version 1 and in version 2 (the default, and "
             "with float16 logprobs); all decode to float32 logprobs and int64 ids.", "",
             "| format | bytes | vs JSON lists | decode (ms) | decode speed-up vs JSON lists |",
             "|---|---|---|---|---|"]
    for p in pay:
        lines.append(f"| {p['format']} | {p['bytes']:,} | {p['bytes'] / base['bytes']:.3f} | {p['decode_ms']:.3f} | "
                     f"{base['decode_ms'] / p['decode_ms']:.1f}x |")
    return lines


def payload_targets(pay) -> list[str]:
    row = {p["format"]: p for p in pay}
    base = next(p for p in pay if p["format"].startswith("JSON lists (TRL"))
    ours, fp16, v1 = row[OURS], row[OURS_FP16], row[OURS_V1]

    def share(p):
        return f"{p['bytes'] / base['bytes']:.3f} of it ({base['bytes'] / p['bytes']:.1f}x smaller)"

    def verdict(p):
        return "met" if p["bytes"] * 5 <= base["bytes"] else "missed"

    return [f"- payload <= 1/5 of JSON lists: default (fp32 + uint16 ids, lossless) {share(ours)}: "
            f"{verdict(ours)}; fp16 logprobs + uint16 ids (opt-in, ~5e-4 relative error) {share(fp16)}: "
            f"{verdict(fp16)}; wire v1 (fp32 + int32) {share(v1)}",
            f"- decode >= 50x faster than JSON lists: default {base['decode_ms'] / ours['decode_ms']:.0f}x, "
            f"fp16 {base['decode_ms'] / fp16['decode_ms']:.0f}x, v1 {base['decode_ms'] / v1['decode_ms']:.0f}x"]


def payload_notes(pay, payload_setup, fp16_err) -> list[str]:
    row = {p["format"]: p for p in pay}
    base = next(p for p in pay if p["format"].startswith("JSON lists (TRL"))
    trl = next(p for p in pay if p["format"].startswith("TRL base64 binary, protege"))
    vllm = next(p for p in pay if p["format"].startswith("vLLM"))
    ours, fp16, v1 = row[OURS], row[OURS_FP16], row[OURS_V1]
    entries = payload_setup["b"] * payload_setup["completion"] * payload_setup["k"]
    return [
        f"- Payload: compact JSON lists (orjson, no spaces) cost about {base['bytes'] / entries:.0f} bytes per "
        "(logprob, id) entry here (a ~16-character float, a 5-digit id, separators). The binary forms cost 8 "
        "(v1: float32 + int32), 6 (v2 default: float32 + uint16 ids, lossless because the teacher's vocabulary "
        f"of {VOCAB} fits 16 bits; vocabularies over 65536 get int32) or 4 (v2 with float16 logprobs) bytes per "
        "entry, plus the (B, T) actual-token logprobs and a header of a few hundred bytes. So the lossless "
        f"default is {base['bytes'] / ours['bytes']:.1f}x smaller than lists: 1/5 would need <= "
        f"{base['bytes'] / entries / 5:.1f} bytes per entry, i.e. 16-bit logprobs, which is the opt-in float16 "
        f"row ({base['bytes'] / fp16['bytes']:.1f}x smaller). float16 keeps ~3 significant digits (<= 4.9e-4 "
        "relative error, max 0.0078 absolute for logprobs in [-30, 0]; protege/wire.py); on this reply (a random "
        f"teacher, logprobs near -log {VOCAB} = {-np.log(VOCAB):.1f}) the largest top-k logprob error was "
        f"{fp16_err:.4f}. The default is {trl['bytes'] / ours['bytes']:.2f}x smaller than TRL's base64 form and "
        f"{vllm['bytes'] / ours['bytes']:.0f}x smaller than the vLLM prompt_logprobs JSON that TRL 1.16 actually "
        "receives (which also covers the prompt positions).",
        f"- Decode: ours is one memcpy plus numpy views, then ids (int32 or uint16) widened to int64 and float16 "
        f"logprobs widened to float32 in numpy ({v1['decode_ms']:.3f} ms v1, {ours['decode_ms']:.3f} ms v2 "
        f"default, {fp16['decode_ms']:.3f} ms fp16); a torch .long() on a busy 2-core machine paid ~12 ms of "
        "thread-pool wake-up for a 0.2 MB copy, numpy pays none."]


def splice_payload(args, pay, payload_setup, fp16_err) -> None:
    """--payload-only: replace the payload table, its target lines and its notes in the existing report."""
    path = Path(args.out)
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## Payload and client decode"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
    lines[start:end] = payload_section(pay, payload_setup) + [""]
    targets, notes = payload_targets(pay), payload_notes(pay, payload_setup, fp16_err)
    for prefix, new in (("- payload <=", targets[0]), ("- decode >=", targets[1]), ("- Payload:", notes[0]),
                        ("- Decode:", notes[1])):
        i = next(i for i, line in enumerate(lines) if line.startswith(prefix))
        lines[i] = new
    stamp = (f"- payload section re-run {datetime.datetime.now().isoformat(timespec='minutes')} with "
             "`python bench/bench_server.py --payload-only` (load average "
             + " / ".join(f"{x:.1f}" for x in os.getloadavg()) + "); the micro-batching tables are from the date above")
    lines = [line for line in lines if not line.startswith("- payload section re-run")]
    at = next(i for i, line in enumerate(lines) if line.startswith("- command:"))
    lines.insert(at + 1, stamp)
    path.write_text("\n".join(lines) + "\n")
    print(f"updated the payload section of {path}")


def write_report(args, load_rows, workloads, pay, payload_setup, fp16_err) -> None:
    def find(w, c, m):
        return next(r for r in load_rows if r["workload"] == w and r["clients"] == c and r["batching"] == m)

    load_avg = os.getloadavg()
    lines = [
        "# Teacher server benchmark",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs; load average "
        f"{load_avg[0]:.1f} / {load_avg[1]:.1f} / {load_avg[2]:.1f} at the end), no GPU",
        f"- torch {torch.__version__}, server torch threads {args.threads}, python {platform.python_version()}",
        f"- teacher: random Llama, hidden 256, 4 layers, MLP 1024, vocab {VOCAB}, fp32, hf backend "
        "(SmolLM2-135M was not used: 30 layers at hidden 576 on 2 shared cores would leave too few requests "
        "per load point)",
        f"- command: `python bench/bench_server.py --duration {args.duration} --reps {args.reps} "
        f"--threads {args.threads}`",
        "",
        "## Micro-batching: closed-loop clients, binary /v1/score",
        "",
        "Each client sends the same request again as soon as its reply is decoded. `off` = one engine call per "
        "request (`--no-batching`, the pre-batching TRL server); `on` = the batcher (5 ms wait, 64 seqs, "
        f"16384 tokens per call). Each point alternates off/on {args.reps} times for {args.duration} s each; "
        "throughput is the median run, p50/p99 pool all requests. `busy` = engine seconds per wall second "
        "(1.0 = the engine never waits), `tok/call` = tokens per engine call.",
        "",
    ]
    for wname, w in workloads.items():
        lines += [f"### {wname}: {w['n_seqs']} sequence(s) of {w['prompt']} prompt + {w['completion']} completion "
                  f"tokens per request, top-{w['topk']}", "",
                  "| clients | p50 off (ms) | p50 on (ms) | p99 off (ms) | p99 on (ms) | req/s off | req/s on | "
                  "tokens/s off | tokens/s on | throughput on/off | busy off / on | tok/call off / on |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in sorted({r["clients"] for r in load_rows}):
            off, on = find(wname, c, "off"), find(wname, c, "on")
            lines.append(f"| {c} | {off['p50_ms']:.1f} | {on['p50_ms']:.1f} | {off['p99_ms']:.1f} | "
                         f"{on['p99_ms']:.1f} | {off['req_per_s']:.1f} | {on['req_per_s']:.1f} | "
                         f"{off['tok_per_s']:.0f} | {on['tok_per_s']:.0f} | "
                         f"{on['tok_per_s'] / off['tok_per_s']:.2f}x | {off['engine_busy']:.2f} / "
                         f"{on['engine_busy']:.2f} | {off['tokens_per_call']:.0f} / {on['tokens_per_call']:.0f} |")
        lines.append("")
    lines += payload_section(pay, payload_setup)
    if not {8, 16} <= {r["clients"] for r in load_rows}:  # a partial run: numbers only
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
        return
    lines += ["", "## Targets", ""]
    ratio8 = {w: find(w, 8, "on")["tok_per_s"] / find(w, 8, "off")["tok_per_s"] for w in workloads}
    lines += ["- batching >= 3x throughput at 8 clients: " + ", ".join(f"{w} {r:.2f}x" for w, r in ratio8.items()),
              *payload_targets(pay), ""]
    off8 = {w: find(w, 8, "off")["engine_busy"] for w in workloads}
    gain = {c: find("small", c, "on")["tok_per_s"] / find("small", c, "off")["tok_per_s"] for c in (8, 16)}
    cut = {c: 1 - find("small", c, "on")["p50_ms"] / find("small", c, "off")["p50_ms"] for c in (8, 16)}
    lines += [
        "## Reading the numbers",
        "",
        "- Batching can only remove per-call costs (HTTP handling, validation, the HF forward's Python "
        "overhead, small-matrix inefficiency). On this CPU the hf engine costs about the same per scored "
        "position whatever the batch (the vocabulary projection, 25 MFLOP per position at V=49152, then "
        "log-softmax and top-k over 49152 logits), and without batching the engine is already busy "
        + ", ".join(f"{off8[w]:.0%} ({w})" for w in workloads) + " of the time at 8 clients. Throughput can "
        "rise at most by 1/busy plus the per-token gain of bigger calls, so the 3x target is out of reach "
        "here: it describes GPUs, where a 32-token call occupies a sliver of the device and merging calls "
        "scales nearly linearly until compute-bound. No GPU was lent to this task, so that was not measured.",
        f"- What batching does buy here: small requests at 8 and 16 clients get {gain[8]:.2f}x and "
        f"{gain[16]:.2f}x throughput and {cut[8]:.0%} / {cut[16]:.0%} lower p50 latency. With 1-2 clients it "
        "can cost a little: the clients fall into step (one "
        "merged reply releases both at once), so the engine idles during their round trips instead of "
        "overlapping them as it does when requests are served one by one.",
        *payload_notes(pay, payload_setup, fp16_err),
        ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
