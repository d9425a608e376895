"""`protege serve-teacher`: serve a teacher model's logprobs over HTTP for on-policy distillation.

    protege serve-teacher --model HuggingFaceTB/SmolLM2-135M-Instruct --port 8000
    python -m protege.server.cli --model path/to/model.gguf --dtype bfloat16 --max-k 64

Clients: protege.teacher.remote.RemoteTeacher (binary /v1/score), TRL 1.16's VLLMClient
(/v1/completions with prompt_logprobs), TRL 1.3-1.8 (/get_sequence_logprobs/). See app.py for routes.
"""

from __future__ import annotations

import argparse
import logging
import os

from protege.server.app import ServerSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServerSettings()
    parser.add_argument("--model", required=True, help="teacher: HF hub id, local HF folder, .gguf file, or smollm2 (embedded)")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="scoring engine (default: hf)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="teacher weights dtype (default: float32; bfloat16 is fast on AMX CPUs and GPUs)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is often best on a busy CPU)")
    parser.add_argument("--served-model-name", default=None, help="name in /v1/models (default: --model)")
    parser.add_argument("--api-key", default=os.environ.get("PROTEGE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default: env PROTEGE_API_KEY; unset = open)")
    parser.add_argument("--max-batch-seqs", type=int, default=d.max_batch_seqs,
                        help=f"sequences per engine call (default: {d.max_batch_seqs})")
    parser.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                        help=f"tokens per engine call, also the longest sequence (default: {d.max_batch_tokens})")
    parser.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                        help=f"how long to gather requests into one call (default: {d.batch_wait_ms})")
    parser.add_argument("--no-batching", action="store_true",
                        help="score each request on its own (the baseline the batcher is measured against)")
    parser.add_argument("--max-queue", type=int, default=d.max_queue,
                        help=f"requests in the server at once before 503 + Retry-After (default: {d.max_queue})")
    parser.add_argument("--max-k", type=int, default=d.max_k, help=f"largest top-k (default: {d.max_k})")
    parser.add_argument("--max-query-ids", type=int, default=d.max_query_ids,
                        help=f"widest query_ids per position (default: {d.max_query_ids})")
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                        help=f"largest request body (default: {d.max_body_bytes})")
    parser.add_argument("--max-request-seqs", type=int, default=d.max_request_seqs,
                        help=f"sequences per request (default: {d.max_request_seqs})")
    parser.add_argument("--max-request-tokens", type=int, default=d.max_request_tokens,
                        help=f"tokens per request (default: {d.max_request_tokens})")
    parser.add_argument("--header-timeout-s", type=float, default=d.header_timeout_s,
                        help="close a connection whose request head has not arrived within this many seconds "
                             f"of connecting (or of its first byte after a response) (default: {d.header_timeout_s:g})")
    parser.add_argument("--body-timeout-s", type=float, default=d.body_timeout_s,
                        help=f"answer 408 when a request body stalls this long (default: {d.body_timeout_s:g})")
    parser.add_argument("--min-body-rate", type=float, default=d.min_body_rate,
                        help="bytes per second a request body must average: the connection is closed when the body "
                             "is not whole within --header-timeout-s + Content-Length / this, and at the connection "
                             f"cap the slowest bodies are closed first (default: {d.min_body_rate:g})")
    parser.add_argument("--keep-alive-s", type=float, default=d.keep_alive_s,
                        help=f"close kept-alive connections idle this long (default: {d.keep_alive_s:g})")
    parser.add_argument("--max-connections", type=int, default=d.max_connections,
                        help="open connections; one more closes the oldest still waiting for a request head, else "
                             "the one whose request body arrives slowest "
                             f"(lowered to fit the open-file limit) (default: {d.max_connections})")
    parser.add_argument("--timeout-graceful-shutdown", type=float, default=d.graceful_shutdown_s,
                        help=f"seconds in-flight requests get at shutdown (default: {d.graceful_shutdown_s:g})")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(api_key=args.api_key or None, max_batch_seqs=args.max_batch_seqs,
                          max_batch_tokens=args.max_batch_tokens, batch_wait_ms=args.batch_wait_ms,
                          max_queue=args.max_queue, batching=not args.no_batching, max_k=args.max_k,
                          max_query_ids=args.max_query_ids, max_body_bytes=args.max_body_bytes,
                          max_request_seqs=args.max_request_seqs, max_request_tokens=args.max_request_tokens,
                          header_timeout_s=args.header_timeout_s, body_timeout_s=args.body_timeout_s,
                          min_body_rate=args.min_body_rate,
                          keep_alive_s=args.keep_alive_s, max_connections=args.max_connections,
                          graceful_shutdown_s=args.timeout_graceful_shutdown)


def run(args: argparse.Namespace) -> None:
    from protege.server.app import create_app
    from protege.server.backends import load_backend
    from protege.server.connections import build_server, raise_open_file_limit

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)  # ValueError naming the flag of a bad value, before the model loads
    backend = load_backend(args.backend, args.model, dtype=args.dtype, device=args.device,
                           model_name=args.served_model_name, token_budget=settings.max_batch_tokens)
    logging.getLogger("protege.server").info(
        "serving %s (%s, %s, vocab %d) on http://%s:%d%s", backend.model_name, backend.name, backend.dtype,
        backend.vocab_size, args.host, args.port, " with API key" if settings.api_key else "")
    raise_open_file_limit()  # room for --max-connections sockets (the soft limit is often 1024)
    app = create_app(backend, settings)
    build_server(app, settings, host=args.host, port=args.port, log_level=args.log_level).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="protege serve-teacher", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    run(args)


if __name__ == "__main__":
    main()
