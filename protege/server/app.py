"""The teacher server's ASGI app: routes that translate HTTP into `Batch`es for the micro-batcher.

Routes (JSON errors {"error": "..."} everywhere, never a dead server):
    GET  /health                  200 {"status": "ok"} (no auth: load balancers and TRL poll it)
    GET  /v1/models               vLLM/OpenAI model list (TRL reads data[0].id)
    GET  /v1/info                 model, vocab size, backend, dtype, limits, wire versions
    GET  /metrics                 Prometheus text
    POST /v1/score                protege's own: binary (application/octet-stream) or JSON body;
                                  top-k, logprobs at query ids, logprob of each actual token;
                                  replies in the request's wire version (v2: uint16 ids when the
                                  vocabulary fits, float16 logprobs on request; see protege.wire)
    POST /v1/completions          vLLM's scoring subset used by TRL 1.16 (prompt_logprobs)
    POST /get_sequence_logprobs/  TRL 1.3-1.8's endpoint (JSON lists or base64 reply)

Every malformed field is a 4xx naming it; a client that goes away mid-request is counted as 499
(never as a server error); a body that stalls for body_timeout_s gets 408. Connection-level guards
(request-head deadline, connection cap, accept errors) live in protege.server.connections.

Run it with `protege serve-teacher --model PATH` (protege/server/cli.py), or in-process:

    >>> app = create_app(HFBackend(model), max_k=32)
    >>> server = serve_in_thread(app)          # protege.server.background; server.url
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time
from dataclasses import dataclass, replace

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from protege.server import compat, parse
from protege.server.backends import Backend
from protege.server.batcher import Batcher, Overloaded
from protege.server.metrics import Metrics
from protege.server.parse import Limits, RequestError
from protege.wire import BINARY_MEDIA_TYPE, READ_VERSIONS, VERSION, encode_score_response

log = logging.getLogger("protege.server")


@dataclass
class ServerSettings:
    """Every knob of the server, with its default (the CLI flags are built from these)."""

    api_key: str | None = None  # bearer token required on every route but /health
    max_batch_seqs: int = 64  # sequences per engine call
    max_batch_tokens: int = 16384  # tokens per engine call; also the longest sequence accepted
    batch_wait_ms: float = 5.0  # how long the batcher waits for more requests
    max_queue: int = 256  # score requests in the server at once; more get 503 + Retry-After
    batching: bool = True  # False: one engine call per request (the baseline)
    max_k: int = 128  # largest top-k / prompt_logprobs
    max_query_ids: int = 256  # widest query_ids (M)
    max_body_bytes: int = 64 << 20
    max_request_seqs: int = 4096
    max_request_tokens: int = 1 << 20
    # connections (protege.server.connections; uvicorn settings where uvicorn has them)
    header_timeout_s: float = 10.0  # a request head must arrive within this, from connect / first byte
    body_timeout_s: float = 30.0  # longest wait for the next piece of a request body (then 408)
    keep_alive_s: float = 5.0  # idle kept-alive connections are closed after this (uvicorn timeout_keep_alive)
    max_connections: int = 1000  # more closes the oldest one waiting for a head (lowered to the open-file limit)
    graceful_shutdown_s: float = 5.0  # in-flight requests get this long at shutdown (uvicorn)
    log_interval_s: float = 60.0  # accept errors / connection-cap warnings: at most one line per interval

    def __post_init__(self):
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s", "max_connections", "graceful_shutdown_s",
                     "log_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                flag = "--timeout-graceful-shutdown" if name == "graceful_shutdown_s" else "--" + name.replace("_", "-")
                raise ValueError(f"{name} ({flag}) must be a number > 0, got {value!r}")


CLIENT_CLOSED = 499  # nginx's "client closed request": counted in /metrics (the client is gone, hears nothing)


def _json(obj, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json", headers=headers)


def _error(status: int, message: str, headers: dict | None = None) -> Response:
    return _json({"error": message}, status, headers)


def create_app(backend: Backend, settings: ServerSettings | None = None, *, tokenizer=None, **overrides) -> Starlette:
    """The ASGI app around an already-built backend; keyword overrides replace ServerSettings fields."""
    settings = replace(settings or ServerSettings(), **overrides)
    model_len = getattr(backend, "max_model_len", None) or settings.max_batch_tokens
    limits = Limits(max_body_bytes=settings.max_body_bytes, max_k=settings.max_k,
                    max_query_ids=settings.max_query_ids, max_request_seqs=settings.max_request_seqs,
                    max_request_tokens=settings.max_request_tokens,
                    max_seq_tokens=min(settings.max_batch_tokens, model_len))
    batcher = Batcher(backend, max_batch_seqs=settings.max_batch_seqs, max_batch_tokens=settings.max_batch_tokens,
                      batch_wait_ms=settings.batch_wait_ms, max_queue=settings.max_queue, batching=settings.batching)
    metrics = Metrics()
    decoder = compat.Decoder(tokenizer if tokenizer is not None else getattr(backend, "tokenizer", None))
    vocab, model_name = backend.vocab_size, backend.model_name

    async def read_body(request: Request) -> bytes:
        return await _read_body(request, limits.max_body_bytes, settings.body_timeout_s)

    async def score(request: Request) -> Response:
        body = await read_body(request)
        kind = parse.media_type(request.headers.get("content-type"))
        if kind == BINARY_MEDIA_TYPE:
            batch, reply = await asyncio.to_thread(parse.score_batch_from_binary, body, vocab, limits)
        else:
            parse.require_json(request.headers.get("content-type"))
            batch, reply = await asyncio.to_thread(
                lambda: parse.score_batch_from_json(parse.load_json(body), vocab, limits))
        result = await batcher.score(batch)
        accept = request.headers.get("accept", "")
        binary = BINARY_MEDIA_TYPE in accept or (kind == BINARY_MEDIA_TYPE and "json" not in accept)
        meta = {"model": model_name, "topk": batch.topk, "temperature": batch.temperature}
        content = encode_score_response(result, meta, binary=binary, vocab_size=vocab,
                                        logprob_dtype=reply.logprob_dtype, version=reply.version)
        return Response(content, media_type=BINARY_MEDIA_TYPE if binary else "application/json")

    async def completions(request: Request) -> Response:
        body = await read_body(request)
        parse.require_json(request.headers.get("content-type"))
        batch, k = await asyncio.to_thread(
            lambda: parse.openai_batch_from_json(parse.load_json(body), vocab, limits, model_name))
        result = await batcher.score(batch)
        reply = await asyncio.to_thread(
            lambda: orjson.dumps(compat.openai_completion(result, batch, k, model_name, decoder)))
        return Response(reply, media_type="application/json")

    async def trl_sequence_logprobs(request: Request) -> Response:
        body = await read_body(request)
        parse.require_json(request.headers.get("content-type"))
        batch, fmt = await asyncio.to_thread(lambda: parse.trl_batch_from_json(parse.load_json(body), vocab, limits))
        result = await batcher.score(batch)
        if fmt == "binary":
            reply = await asyncio.to_thread(compat.trl_binary, result, batch)
        else:
            reply = await asyncio.to_thread(lambda: orjson.dumps(compat.trl_lists(result, batch)))
        return Response(reply, media_type="application/json")

    async def health(request: Request) -> Response:
        if batcher._task is None or batcher._task.done():
            return _error(503, "batcher is not running")
        return _json({"status": "ok"})

    async def models(request: Request) -> Response:
        return _json({"object": "list", "data": [{
            "id": model_name, "object": "model", "created": int(start_time), "owned_by": "protege",
            "root": model_name, "parent": None, "max_model_len": model_len, "vocab_size": vocab}]})

    async def info(request: Request) -> Response:
        return _json({
            "model": model_name, "vocab_size": vocab, "backend": backend.name,
            "dtype": getattr(backend, "dtype", None), "max_model_len": model_len, "wire_version": VERSION,
            "wire_versions": list(READ_VERSIONS),
            "max_k": limits.max_k, "max_query_ids": limits.max_query_ids, "max_seq_tokens": limits.max_seq_tokens,
            "max_body_bytes": limits.max_body_bytes, "max_request_seqs": limits.max_request_seqs,
            "max_request_tokens": limits.max_request_tokens, "max_batch_seqs": settings.max_batch_seqs,
            "max_batch_tokens": settings.max_batch_tokens, "batching": settings.batching})

    async def prometheus(request: Request) -> Response:
        guard = getattr(request.app.state, "connection_guard", None)
        return Response(metrics.render(batcher, guard), media_type="text/plain; version=0.0.4")

    def route(path: str, handler, methods: list[str], *, auth: bool = True) -> Route:
        name = path.rstrip("/") or "/"

        async def endpoint(request: Request) -> Response:
            start = time.perf_counter()
            request.state.bytes_in = 0
            try:
                if auth and settings.api_key:
                    _check_auth(request, settings.api_key)
                response = await handler(request)
            except RequestError as exc:
                response = _error(exc.status, exc.message, exc.headers)
            except Overloaded as exc:
                response = _error(503, str(exc), {"Retry-After": str(math.ceil(exc.retry_after))})
            except ClientDisconnect:  # the client went away mid-body: nobody to answer, not a server error
                log.debug("%s: client disconnected before sending the whole body", path)
                response = _error(CLIENT_CLOSED, "client closed the connection before sending the whole body")
            except Exception as exc:  # noqa: BLE001 - one request's failure never takes the server down
                log.exception("%s failed", path)
                response = _error(500, f"internal error: {type(exc).__name__}: {exc}"[:2000])
            metrics.observe_request(name, response.status_code, time.perf_counter() - start,
                                    request.state.bytes_in, len(response.body))
            return response

        return Route(path, endpoint, methods=methods)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    start_time = time.time()
    routes = [
        route("/health", health, ["GET"], auth=False),
        route("/v1/models", models, ["GET"]),
        route("/v1/info", info, ["GET"]),
        route("/metrics", prometheus, ["GET"]),
        route("/v1/score", score, ["POST"]),
        route("/v1/completions", completions, ["POST"]),
        route("/get_sequence_logprobs/", trl_sequence_logprobs, ["POST"]),
        route("/get_sequence_logprobs", trl_sequence_logprobs, ["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.batcher, app.state.metrics, app.state.settings, app.state.limits = batcher, metrics, settings, limits
    return app


async def _read_body(request: Request, max_bytes: int, idle_timeout_s: float) -> bytes:
    """The whole body: 413 past `max_bytes` (declared or streamed), 408 when no data comes for
    `idle_timeout_s`; ClientDisconnect when the client goes away first."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise parse.bad(f"Content-Length {declared[:20]!r} is not a number")
        if int(declared) > max_bytes:
            raise RequestError(413, f"body of {declared} bytes exceeds --max-body-bytes {max_bytes}")
    chunks, size = [], 0
    stream = request.stream()
    while True:
        try:
            chunk = await asyncio.wait_for(anext(stream), idle_timeout_s)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise RequestError(408, f"request body stalled: no data for {idle_timeout_s:g} s after {size} bytes "
                                    "(--body-timeout-s)", {"Connection": "close"}) from None
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, f"body exceeds --max-body-bytes {max_bytes}")
        chunks.append(chunk)
    request.state.bytes_in = size
    return b"".join(chunks)


def _check_auth(request: Request, api_key: str) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' "
                                "(the server's --api-key / PROTEGE_API_KEY)", {"WWW-Authenticate": "Bearer"})
