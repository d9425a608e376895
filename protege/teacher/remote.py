"""Remote teacher: the HTTP client of `protege serve-teacher` (or of a stock vLLM/OpenAI server).

The whole rollout buffer is scored in one `score` call: rows are cut into chunks of about
`chunk_tokens` tokens, the chunks are sent concurrently (`concurrency` threads sharing one httpx
client) to the least-busy replica in `urls`, and the replies are decoded straight into the
buffer's (N, T, ...) tensors (numpy views of the body, no Python lists).

Failures: connection errors, timeouts, 5xx and 429 are retried with exponential backoff
(0.25 s doubling up to 10 s, or the server's Retry-After), on another replica when there is one,
until `max_retries` attempts or `max_wait_s` seconds have passed for that chunk (default 600 s:
long enough for a restarted teacher to load). A 4xx is the caller's mistake: it is raised at once
as ValueError with the server's message.

protocol="protege": binary POST /v1/score (top-k, logprobs at query ids, actual-token logprobs),
    wire version 2: ids come as uint16 when the teacher's vocabulary fits (lossless), logprobs as
    float32, or float16 with `logprob_dtype="float16"` (half the logprob bytes, <= 4.9e-4 relative
    error, max 0.0078 absolute for logprobs in [-30, 0]; see protege.wire). A server that only reads
    wire version 1 (an older protege) is detected from its 400 and spoken to in version 1 from then on
    (float32 logprobs only).
protocol="openai":  POST /v1/completions with prompt_logprobs, what vLLM serves. vLLM must run with
    `--logprobs-mode processed_logprobs` for temperature to apply, and `--max-logprobs` >= k; it
    cannot return logprobs at ids the client picks, so query_ids raise a ValueError.

    >>> teacher = RemoteTeacher(["http://10.0.0.5:8000", "http://10.0.0.6:8000"], api_key="...")
    >>> signal = teacher.score(rollouts, ScoreRequest(topk=16))   # TeacherSignal
"""

from __future__ import annotations

import concurrent.futures
import math
import random
import threading
import time

import httpx
import numpy as np
import orjson
import torch

from protege import wire
from protege.teacher.base import ScoreRequest
from protege.types import Rollouts, TeacherSignal


class TeacherUnavailable(ConnectionError):
    """No replica answered within the retry budget."""


class RemoteTeacher:
    def __init__(self, urls: str | list[str], *, api_key: str | None = None, timeout: float = 300.0,
                 max_retries: int = 100, max_wait_s: float = 600.0, chunk_tokens: int = 32768,
                 concurrency: int = 4, protocol: str = "protege", vocab_size: int | None = None,
                 model: str | None = None, logprob_dtype: str = "float32"):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("RemoteTeacher needs at least one server URL")
        if protocol not in ("protege", "openai"):
            raise ValueError(f"protocol={protocol!r}: use 'protege' (protege serve-teacher) or 'openai' (vLLM)")
        if chunk_tokens < 1 or concurrency < 1:
            raise ValueError("chunk_tokens and concurrency must be >= 1")
        if logprob_dtype not in wire.LOGPROB_DTYPES:
            raise ValueError(f"logprob_dtype={logprob_dtype!r}: use 'float32' (exact) or 'float16' (half the bytes, "
                             "~1e-3 relative error)")
        if logprob_dtype != "float32" and protocol != "protege":
            raise ValueError(f"logprob_dtype={logprob_dtype!r} applies to protocol='protege' only "
                             "(an OpenAI-compatible server answers JSON text)")
        self.logprob_dtype = logprob_dtype
        self._wire_version = wire.VERSION  # lowered to 1 when a server turns version 2 down
        self.urls = [u.rstrip("/") for u in urls]
        self.protocol = protocol
        self.chunk_tokens = chunk_tokens
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.max_wait_s = max_wait_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                                    limits=httpx.Limits(max_connections=concurrency * len(self.urls) + 4))
        self._busy = [0] * len(self.urls)  # requests in flight per replica
        self._lock = threading.Lock()
        self._next = 0
        self._vocab_size = vocab_size
        self._model = model

    # -- server facts --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """The teacher's vocabulary size (from /v1/info, or /v1/models; waits for the server)."""
        if self._vocab_size is None:
            if self.protocol == "protege":
                self._vocab_size = int(self._get("/v1/info")["vocab_size"])
            else:
                entry = self._get("/v1/models")["data"][0]
                if "vocab_size" not in entry:
                    raise ValueError("this OpenAI-compatible server does not report its vocabulary size; "
                                     "pass RemoteTeacher(..., vocab_size=V)")
                self._vocab_size = int(entry["vocab_size"])
        return self._vocab_size

    def info(self) -> dict:
        """The server's /v1/info (protege servers only)."""
        return self._get("/v1/info")

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self._get("/v1/models")["data"][0]["id"]
        return self._model

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RemoteTeacher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- scoring -------------------------------------------------------------------------------

    def score(self, rollouts: Rollouts, request: ScoreRequest) -> TeacherSignal:
        if request.hidden:
            raise ValueError("a remote teacher cannot give hidden states (ScoreRequest.hidden=True); "
                             "use a top-k support (topk=K or query_ids) with a remote teacher, or a LocalTeacher")
        if not (request.temperature > 0 and math.isfinite(request.temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {request.temperature}")
        if self.protocol == "openai" and request.query_ids is not None:
            raise ValueError("protocol='openai' cannot return logprobs at ids the client picks (query_ids, e.g. the "
                             "student's top-k for reverse KL): a stock vLLM server only gives its own top-k and the "
                             "actual token. Serve the teacher with `protege serve-teacher` and use protocol='protege', "
                             "or use the teacher's top-k support (ScoreRequest(topk=K)).")
        mask = rollouts.completion_mask.bool()
        n, t = mask.shape
        k = request.topk
        query = request.query_ids
        if query is not None and tuple(query.shape[:2]) != (n, t):
            raise ValueError(f"query_ids has shape {list(query.shape)}; expected [{n}, {t}, M] (rollouts' "
                             "completion_ids shape plus the number of ids per position)")
        out = TeacherSignal(
            token_logprobs=torch.zeros((n, t), dtype=torch.float32),  # (N, T)
            topk_ids=torch.zeros((n, t, k), dtype=torch.long) if k else None,  # (N, T, K)
            topk_logprobs=torch.zeros((n, t, k), dtype=torch.float32) if k else None,  # (N, T, K)
            query_logprobs=torch.zeros((n, t, query.shape[2]), dtype=torch.float32) if query is not None else None,
            temperature=request.temperature)
        comp_lens = mask.sum(1).tolist()
        rows = [i for i in range(n) if comp_lens[i] > 0]
        if not rows:
            return out
        sequences = {}
        completion = rollouts.completion_ids.cpu()
        query = query.cpu() if query is not None else None
        for i in rows:
            seq = torch.cat([rollouts.prompt_ids[i].reshape(-1).cpu(), completion[i, : comp_lens[i]].cpu()])
            sequences[i] = seq.to(torch.int32).numpy()
        chunks = self._chunks(rows, sequences)
        send = self._score_protege if self.protocol == "protege" else self._score_openai
        jobs = [(chunk, sequences, [len(rollouts.prompt_ids[i]) for i in chunk], comp_lens, query, request)
                for chunk in chunks]
        if len(jobs) == 1:
            results = [send(*jobs[0])]
        else:
            with concurrent.futures.ThreadPoolExecutor(min(self.concurrency, len(jobs))) as pool:
                results = list(pool.map(lambda job: send(*job), jobs))
        for chunk, result in zip(chunks, results):
            idx = torch.as_tensor(chunk, dtype=torch.long)
            tc = result["token_logprobs"].shape[1]
            out.token_logprobs[idx, :tc] = result["token_logprobs"]
            if k:
                out.topk_ids[idx, :tc] = result["topk_ids"]
                out.topk_logprobs[idx, :tc] = result["topk_logprobs"]
            if query is not None:
                out.query_logprobs[idx, :tc] = result["query_logprobs"]
        return out

    def _chunks(self, rows: list[int], sequences: dict[int, np.ndarray]) -> list[list[int]]:
        chunks, current, tokens = [], [], 0
        for i in rows:
            if current and tokens + len(sequences[i]) > self.chunk_tokens:
                chunks.append(current)
                current, tokens = [], 0
            current.append(i)
            tokens += len(sequences[i])
        chunks.append(current)
        return chunks

    def _score_protege(self, chunk, sequences, prompt_lengths, comp_lens, query, request) -> dict[str, torch.Tensor]:
        """One chunk (row indices `chunk`, their prompt lengths) via binary /v1/score."""
        query_ids = None
        if query is not None:  # (C, M): completion positions of the chunk's rows, in order
            query_ids = torch.cat([query[i, : comp_lens[i]] for i in chunk]).to(torch.int32).numpy()
        headers = {"Content-Type": wire.BINARY_MEDIA_TYPE, "Accept": wire.BINARY_MEDIA_TYPE}
        while True:
            version = self._wire_version
            body = wire.encode_score_request([sequences[i] for i in chunk], prompt_lengths, topk=request.topk,
                                             temperature=request.temperature, query_ids=query_ids,
                                             logprob_dtype=self.logprob_dtype, version=version)
            try:
                response = self._post("/v1/score", content=body, headers=headers)
                break
            except ValueError as exc:  # an older server: "wire version 2 is not supported; this side speaks 1"
                if version < 2 or f"wire version {version} is not supported" not in str(exc):
                    raise
                if self.logprob_dtype != "float32":
                    raise ValueError(f"logprob_dtype={self.logprob_dtype!r} needs a teacher server that reads wire "
                                     f"version 2; this one does not ({exc})") from None
                self._wire_version = 1
        _, tensors = wire.decode_score_response(response.content, response.headers.get("content-type", ""))
        expected = torch.tensor([comp_lens[i] for i in chunk])
        if not torch.equal(tensors["completion_lengths"], expected):
            raise RuntimeError(f"teacher server answered completion lengths {tensors['completion_lengths'].tolist()} "
                               f"for {expected.tolist()}: client and server disagree on the layout")
        return tensors

    def _score_openai(self, chunk, sequences, prompt_lengths, comp_lens, query, request) -> dict[str, torch.Tensor]:
        """One chunk via vLLM's /v1/completions prompt_logprobs (parsed from JSON: Python loops)."""
        k = request.topk
        payload = {"model": self.model, "prompt": [sequences[i].tolist() for i in chunk], "max_tokens": 1,
                   "temperature": request.temperature, "prompt_logprobs": k}
        response = self._post("/v1/completions", content=orjson.dumps(payload),
                              headers={"Content-Type": "application/json"})
        choices = orjson.loads(response.content)["choices"]
        t = max(comp_lens[i] for i in chunk)
        token_lp = np.zeros((len(chunk), t), np.float32)  # (n, t)
        topk_ids = np.zeros((len(chunk), t, k), np.int64)  # (n, t, K)
        topk_lp = np.zeros((len(chunk), t, k), np.float32)
        for r, (i, choice) in enumerate(zip(chunk, choices)):
            seq, p = sequences[i], prompt_lengths[r]
            for pos in range(p, len(seq)):
                entry = choice["prompt_logprobs"][pos] or {}
                actual = entry.get(str(int(seq[pos])))
                token_lp[r, pos - p] = _finite(actual["logprob"]) if actual else -math.inf
                if k:
                    best = sorted(entry.items(), key=lambda item: item[1]["rank"])[:k]
                    topk_ids[r, pos - p, : len(best)] = [int(tid) for tid, _ in best]
                    topk_lp[r, pos - p, : len(best)] = [_finite(v["logprob"]) for _, v in best]
                    topk_lp[r, pos - p, len(best):] = -math.inf  # fewer than k returned (vLLM --max-logprobs)
        out = {"token_logprobs": torch.from_numpy(token_lp)}
        if k:
            out["topk_ids"], out["topk_logprobs"] = torch.from_numpy(topk_ids), torch.from_numpy(topk_lp)
        return out

    # -- HTTP with retries ---------------------------------------------------------------------

    def _get(self, path: str) -> dict:
        return orjson.loads(self._request("GET", path).content)

    def _post(self, path: str, *, content: bytes, headers: dict) -> httpx.Response:
        return self._request("POST", path, content=content, headers=headers)

    def _pick(self, avoid: int | None) -> int:
        with self._lock:
            order = sorted(range(len(self.urls)), key=lambda j: (self._busy[j], (j - self._next) % len(self.urls)))
            if avoid is not None and len(order) > 1 and order[0] == avoid:
                order = order[1:] + order[:1]
            j = order[0]
            self._busy[j] += 1
            self._next = (j + 1) % len(self.urls)
            return j

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        start = time.monotonic()
        failed, attempt, last = None, 0, "no attempt made"
        while True:
            j = self._pick(failed)
            url = self.urls[j] + path
            retry_after = None
            try:
                response = self._client.request(method, url, **kwargs)
            except httpx.TransportError as exc:  # refused, reset, timed out: the server may be (re)starting
                last = f"{url}: {type(exc).__name__}: {exc}"
            else:
                if response.status_code < 400:
                    return response
                message = _error_message(response)
                if response.status_code >= 500 or response.status_code == 429:
                    last = f"{url}: HTTP {response.status_code}: {message}"
                    retry_after = _retry_after(response.headers.get("retry-after"))
                else:
                    raise ValueError(f"teacher server refused the request ({url}, HTTP {response.status_code}): "
                                     f"{message}")
            finally:
                with self._lock:
                    self._busy[j] -= 1
            failed, attempt = j, attempt + 1
            delay = retry_after if retry_after is not None else min(10.0, 0.25 * 2 ** (attempt - 1))
            delay *= 1.0 if retry_after is not None else random.uniform(0.8, 1.2)
            elapsed = time.monotonic() - start
            if attempt > self.max_retries or elapsed + delay > self.max_wait_s:
                raise TeacherUnavailable(f"teacher server unavailable after {attempt} attempts in {elapsed:.1f} s "
                                         f"(max_retries={self.max_retries}, max_wait_s={self.max_wait_s}); "
                                         f"last error: {last}")
            time.sleep(delay)


def _finite(x) -> float:
    return -math.inf if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _error_message(response: httpx.Response) -> str:
    try:
        body = orjson.loads(response.content)
        if isinstance(body, dict) and "error" in body:
            error = body["error"]
            return error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except orjson.JSONDecodeError:
        pass
    return response.text[:500]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
