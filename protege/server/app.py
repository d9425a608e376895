"""The teacher server's ASGI app: routes that translate HTTP into `Batch`es for the micro-batcher.

Routes (JSON errors {"error": "..."} everywhere, never a dead server):
    GET  /health                  200 {"status": "ok"} (no auth: load balancers and TRL poll it)
    GET  /v1/models               vLLM/OpenAI model list (TRL reads data[0].id)
    GET  /v1/info                 model, vocab size, backend, dtype, limits, wire versions
    GET  /metrics                 Prometheus text
    GET  /v1/output_projection    the teacher's lm_head weight and its sha256 (protege.server.projection)
    POST /v1/score                protege's own: binary (application/octet-stream) or JSON body;
                                  top-k, logprobs at query ids, logprob of each actual token;
                                  replies in the request's wire version (v2: uint16 ids when the
                                  vocabulary fits, float16 logprobs on request; see protege.wire);
                                  final hidden states on request (hidden_dtype, protege.server.projection)
    POST /v1/completions          vLLM's scoring subset used by TRL 1.16 (prompt_logprobs), else
                                  OpenAI-compatible generation (protege.server.openai_routes)
    POST /v1/chat/completions     OpenAI-compatible chat generation with logprobs (openai_routes)
    POST /get_sequence_logprobs/  TRL 1.3-1.8's endpoint (JSON lists or base64 reply)

Each route is a short module-level handler that reads what it shares (`Served`: backend, batcher,
limits, metrics) from app.state.served; `route` wraps it with the bearer check, the mapping of
exceptions to JSON errors and the request metrics.

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
from dataclasses import dataclass, field, replace

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from protege.server import compat, openai_routes, parse, projection
from protege.server.backends import Backend
from protege.server.batch import RequestError
from protege.server.batcher import Batcher, Overloaded
from protege.server.metrics import Metrics
from protege.server.parse import Limits
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
    min_body_rate: float = 65536.0  # bytes/s: a body must be whole within header_timeout_s + size / this
    keep_alive_s: float = 5.0  # idle kept-alive connections are closed after this (uvicorn timeout_keep_alive)
    max_connections: int = 1000  # more closes the oldest one waiting for a head (lowered to the open-file limit)
    graceful_shutdown_s: float = 5.0  # in-flight requests get this long at shutdown (uvicorn)
    log_interval_s: float = 60.0  # accept errors / connection-cap warnings: at most one line per interval

    def __post_init__(self):
        for name in ("header_timeout_s", "body_timeout_s", "min_body_rate", "keep_alive_s", "max_connections", "graceful_shutdown_s",
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


@dataclass
class Served:
    """What every route reads (app.state.served): the engine behind the batcher, its limits and counters."""

    backend: Backend
    settings: ServerSettings
    limits: Limits
    batcher: Batcher
    metrics: Metrics
    decoder: compat.Decoder
    vocab: int
    model_name: str
    model_len: int
    start_time: float = field(default_factory=time.time)


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
    served = Served(backend, settings, limits, batcher, metrics, decoder, vocab=backend.vocab_size,
                    model_name=backend.model_name, model_len=model_len)
    routes = [
        route("/health", health, ["GET"], auth=False),
        route("/v1/models", models, ["GET"]),
        route("/v1/info", info, ["GET"]),
        route("/metrics", prometheus, ["GET"]),
        route("/v1/score", score, ["POST"]),
        route("/v1/output_projection", projection.output_projection, ["GET"]),
        *openai_routes.routes(route, read_body, completions),  # /v1/completions (scoring or generation), chat
        route("/get_sequence_logprobs/", trl_sequence_logprobs, ["POST"]),
        route("/get_sequence_logprobs", trl_sequence_logprobs, ["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=_lifespan, exception_handlers={HTTPException: _http_error})
    app.state.served = served
    app.state.batcher, app.state.metrics, app.state.settings, app.state.limits = batcher, metrics, settings, limits
    return app


def route(path: str, handler, methods: list[str], *, auth: bool = True) -> Route:
    """`handler` behind the bearer check (when `auth` and an api_key is set), every failure turned into a
    JSON error, and each request counted in /metrics under `path` without its trailing slash."""
    name = path.rstrip("/") or "/"

    async def endpoint(request: Request) -> Response:
        served = _served(request)
        start = time.perf_counter()
        request.state.bytes_in = 0
        try:
            if auth and served.settings.api_key:
                _check_auth(request, served.settings.api_key)
            response = await handler(request)
        except Exception as exc:  # noqa: BLE001 - one request's failure never takes the server down
            response = _error_response(path, exc)
        bytes_out = len(response.body) if hasattr(response, "body") else int(response.headers["content-length"])
        served.metrics.observe_request(name, response.status_code, time.perf_counter() - start,
                                       request.state.bytes_in, bytes_out)
        return response

    return Route(path, endpoint, methods=methods)


def _error_response(path: str, exc: Exception) -> Response:
    """The JSON error for an exception a route raised: its own status for a RequestError, 503 + Retry-After
    when the queue is full, 499 when the client left mid-body, 500 (logged) for anything else."""
    if isinstance(exc, RequestError):
        return _error(exc.status, exc.message, exc.headers)
    if isinstance(exc, Overloaded):
        return _error(503, str(exc), {"Retry-After": str(math.ceil(exc.retry_after))})
    if isinstance(exc, ClientDisconnect):  # the client went away mid-body: nobody to answer, not a server error
        log.debug("%s: client disconnected before sending the whole body", path)
        return _error(CLIENT_CLOSED, "client closed the connection before sending the whole body")
    log.exception("%s failed", path, exc_info=exc)
    return _error(500, f"internal error: {type(exc).__name__}: {exc}"[:2000])


def _served(request: Request) -> Served:
    return request.app.state.served


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette):
    batcher = app.state.served.batcher
    await batcher.start()
    try:
        yield
    finally:
        await batcher.stop()


# ---------------------------------------------------------------------------------------------
# Routes: each reads the body, parses it into a Batch (off the event loop), awaits the batcher and
# encodes the reply; errors are raised (RequestError, Overloaded ...) and answered by `route`.
# ---------------------------------------------------------------------------------------------

async def read_body(request: Request) -> bytes:
    served = _served(request)
    return await _read_body(request, served.limits.max_body_bytes, served.settings.body_timeout_s)


async def score(request: Request) -> Response:
    """POST /v1/score: protege's wire format (binary or JSON), answered in the request's wire version."""
    served, body = _served(request), await read_body(request)
    vocab, limits = served.vocab, served.limits
    kind = parse.media_type(request.headers.get("content-type"))
    if kind == BINARY_MEDIA_TYPE:
        batch, reply = await asyncio.to_thread(parse.score_batch_from_binary, body, vocab, limits)
    else:
        parse.require_json(request.headers.get("content-type"))
        batch, reply = await asyncio.to_thread(
            lambda: parse.score_batch_from_json(parse.load_json(body), vocab, limits))
    result = await served.batcher.score(batch)
    accept = request.headers.get("accept", "")
    binary = BINARY_MEDIA_TYPE in accept or (kind == BINARY_MEDIA_TYPE and "json" not in accept)
    meta = {"model": served.model_name, "topk": batch.topk, "temperature": batch.temperature}
    if reply.hidden_dtype:
        meta.update(await projection.hidden_meta(request, result, reply.hidden_dtype))
    content = encode_score_response(result, meta, binary=binary, vocab_size=vocab, logprob_dtype=reply.logprob_dtype,
                                    version=reply.version, hidden_dtype=reply.hidden_dtype)
    return Response(content, media_type=BINARY_MEDIA_TYPE if binary else "application/json")


async def completions(request: Request) -> Response:
    """POST /v1/completions: vLLM's prompt_logprobs scoring subset (TRL 1.16)."""
    served, body = _served(request), await read_body(request)
    parse.require_json(request.headers.get("content-type"))
    batch, k = await asyncio.to_thread(
        lambda: parse.openai_batch_from_json(parse.load_json(body), served.vocab, served.limits, served.model_name))
    result = await served.batcher.score(batch)
    reply = await asyncio.to_thread(
        lambda: orjson.dumps(compat.openai_completion(result, batch, k, served.model_name, served.decoder)))
    return Response(reply, media_type="application/json")


async def trl_sequence_logprobs(request: Request) -> Response:
    """POST /get_sequence_logprobs/: TRL 1.3-1.8's endpoint (JSON lists or base64 reply)."""
    served, body = _served(request), await read_body(request)
    parse.require_json(request.headers.get("content-type"))
    batch, fmt = await asyncio.to_thread(
        lambda: parse.trl_batch_from_json(parse.load_json(body), served.vocab, served.limits))
    result = await served.batcher.score(batch)
    if fmt == "binary":
        reply = await asyncio.to_thread(compat.trl_binary, result, batch)
    else:
        reply = await asyncio.to_thread(lambda: orjson.dumps(compat.trl_lists(result, batch)))
    return Response(reply, media_type="application/json")


async def health(request: Request) -> Response:
    if not _served(request).batcher.running:
        return _error(503, "batcher is not running")
    return _json({"status": "ok"})


async def models(request: Request) -> Response:
    served = _served(request)
    name = served.model_name
    return _json({"object": "list", "data": [{
        "id": name, "object": "model", "created": int(served.start_time), "owned_by": "protege",
        "root": name, "parent": None, "max_model_len": served.model_len, "vocab_size": served.vocab}]})


async def info(request: Request) -> Response:
    served = _served(request)
    limits, settings = served.limits, served.settings
    return _json({
        "model": served.model_name, "vocab_size": served.vocab, "backend": served.backend.name,
        "dtype": getattr(served.backend, "dtype", None), "max_model_len": served.model_len, "wire_version": VERSION,
        "wire_versions": list(READ_VERSIONS),
        "max_k": limits.max_k, "max_query_ids": limits.max_query_ids, "max_seq_tokens": limits.max_seq_tokens,
        "max_body_bytes": limits.max_body_bytes, "max_request_seqs": limits.max_request_seqs,
        "max_request_tokens": limits.max_request_tokens, "max_batch_seqs": settings.max_batch_seqs,
        "max_batch_tokens": settings.max_batch_tokens, "batching": settings.batching,
        "output_projection": await projection.info(request)})


async def prometheus(request: Request) -> Response:
    served = _served(request)
    guard = getattr(request.app.state, "connection_guard", None)
    return Response(served.metrics.render(served.batcher, guard), media_type="text/plain; version=0.0.4")


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
