"""Remote teacher: the HTTP client of `protege serve-teacher` (or of a stock vLLM/OpenAI server).

The whole rollout buffer is scored in one `score` call: rows are cut into chunks of about
`chunk_tokens` tokens, the chunks are sent concurrently (`concurrency` threads sharing one httpx
client) to the least-busy replica in `urls`, and the replies are decoded straight into the
buffer's (N, T, ...) tensors (numpy views of the body, no Python lists).

Failures: connection errors, timeouts, 5xx and 429 are retried with exponential backoff
(0.25 s doubling up to 10 s, or the server's Retry-After), on another replica when there is one,
until `max_retries` attempts or `max_wait_s` seconds have passed for that chunk (default 600 s:
long enough for a restarted teacher to load); then TeacherUnavailable names the URLs and
teacher.max_wait_s. A Retry-After wait is capped at min(60 s, max_wait_s) and the budget left (inf,
1e9: capped; nan, negative: ignored), and the warning and the final error say what the server asked. A 4xx is the caller's mistake: it is raised at once as TeacherRefused (a
ValueError) with the server's message. A URL without http:// or https:// is refused at once.

Every reply is checked before it is returned (protege.teacher.replies: shapes and lengths as
asked, logprobs finite or -inf and <= 0, ids inside the vocabulary, top-k mass <= 1, and the wire
version-3 crc32). A reply that fails is retried like a 5xx, at most `max_invalid_replies` times
per chunk, then TeacherReplyError (a ValueError naming the URL and the field) stops the caller:
a wrong reply is never returned, so never trained on. A bad reply that a retry replaced is logged
and counted (step metric teacher_invalid_replies_retried).

protocol="protege": binary POST /v1/score (top-k, logprobs at query ids, actual-token logprobs),
    wire version 3: ids come as uint16 when the teacher's vocabulary fits (lossless), logprobs as
    float32, or float16 with `logprob_dtype="float16"` (half the logprob bytes, <= 4.9e-4 relative
    error, max 0.0078 absolute for logprobs in [-30, 0]; see protege.wire), the whole body under a
    crc32. A server that answers 400 "wire version 3 is not supported" (an older protege) is spoken
    to in version 2 (no checksum), or 1 (float32 logprobs only), from then on, only when
    `min_wire_version` (teacher.min_wire_version, default 3) allows it: by default the request
    fails naming the setting, so a forged 400 cannot switch the checksum off. A step down is
    logged and counted (step metrics teacher_wire_version, teacher_wire_downgrades). With
    ScoreRequest(hidden=True) (loss.support=full) it sends the teacher's final hidden states in
    `hidden_dtype`, and `output_weight` is the teacher's projection (protege.teacher.projection).
protocol="openai":  POST /v1/completions with prompt_logprobs, what vLLM serves (`--max-logprobs` >= k).
    It cannot return logprobs at ids the client picks, so query_ids raise a ValueError. Its prompt
    logprobs are log_softmax(logits) whatever the request's temperature (vLLM 0.32, even with
    `--logprobs-mode processed_logprobs`; tests/test_vllm.py shows it), so a temperature other than 1
    is refused unless /v1/models says the server is protege's own route ("owned_by": "protege",
    which applies it). Its /v1/models
    carries no vocabulary size: `vocab_size` comes from the caller (teacher.vocab_size), else the
    server's "vocab_size" (protege's own route has one), else the config.json of the model it
    serves ("root" or "id") when that is a local directory or in the local Hugging Face cache.

    >>> teacher = RemoteTeacher(["http://10.0.0.5:8000", "http://10.0.0.6:8000"], api_key="...")
    >>> signal = teacher.score(rollouts, ScoreRequest(topk=16))   # TeacherSignal
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import urllib.parse

import httpx
import numpy as np
import orjson
import torch

from protege import wire
from protege.teacher.base import Capabilities, ScoreRequest, Teacher
from protege.teacher.projection import RemoteProjection
from protege.teacher.replicas import Replicas, TeacherRefused, TeacherUnavailable  # noqa: F401  (re-exported)
from protege.teacher.replies import (TeacherReplyError, check_score_reply, decode_score_reply, json_object,
                                     local_vocab_size, parse_completions_reply)
from protege.records import Rollouts, TeacherSignal

__all__ = ["RemoteTeacher", "TeacherRefused", "TeacherReplyError", "TeacherUnavailable"]

log = logging.getLogger("protege.teacher")


def check_url(url: str) -> str:
    """`url` without a trailing slash; ValueError naming it when it is not http(s)://host[:port][/path]."""
    if not isinstance(url, str):
        raise ValueError(f"teacher URL {url!r} must be a string such as 'http://127.0.0.1:8000' (teacher.urls)")
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        fix = f"write it as 'http://{url.strip()}'" if "://" not in url else "use http:// or https://"
        raise ValueError(f"teacher URL {url!r} is not an http(s) URL: {fix} (teacher.urls)")
    return url.strip().rstrip("/")


class RemoteTeacher(Teacher):
    def __init__(self, urls: str | list[str], *, api_key: str | None = None, timeout: float = 300.0,
                 max_retries: int = 100, max_wait_s: float = 600.0, chunk_tokens: int = 32768,
                 concurrency: int = 4, protocol: str = "protege", vocab_size: int | None = None,
                 model: str | None = None, logprob_dtype: str = "float32", max_invalid_replies: int = 3,
                 hidden_dtype: str = "float16", projection_cache: str | None = None, min_wire_version: int = wire.VERSION):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("RemoteTeacher needs at least one server URL (teacher.urls)")
        if protocol not in ("protege", "openai"):
            raise ValueError(f"protocol={protocol!r}: use 'protege' (protege serve-teacher) or 'openai' (vLLM)")
        if chunk_tokens < 1 or concurrency < 1 or max_invalid_replies < 0:
            raise ValueError("chunk_tokens and concurrency must be >= 1, max_invalid_replies >= 0")
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                       or vocab_size < 1):
            raise ValueError(f"vocab_size={vocab_size!r} must be a positive integer (teacher.vocab_size)")
        if min_wire_version not in range(1, wire.VERSION + 1):
            raise ValueError(f"min_wire_version={min_wire_version!r} must be 1..{wire.VERSION} (teacher.min_wire_version)")
        if logprob_dtype not in wire.LOGPROB_DTYPES:
            raise ValueError(f"logprob_dtype={logprob_dtype!r}: use 'float32' (exact) or 'float16' (half the bytes, "
                             "~1e-3 relative error)")
        if logprob_dtype != "float32" and protocol != "protege":
            raise ValueError(f"logprob_dtype={logprob_dtype!r} applies to protocol='protege' only "
                             "(an OpenAI-compatible server answers JSON text)")
        self.urls = [check_url(u) for u in urls]
        self.logprob_dtype, self.hidden_dtype = logprob_dtype, hidden_dtype
        self.projection = RemoteProjection(self.urls, projection_cache, hidden_dtype)
        self._wire_version = wire.VERSION  # lowered when a server turns the newer versions down
        self.min_wire_version = min_wire_version  # never lowered below this
        self._counts = {"wire_downgrades": 0}  # since the last step_metrics()
        self.protocol = protocol
        self.chunk_tokens = chunk_tokens
        self.concurrency = concurrency
        self.replicas = Replicas(self.urls, api_key=api_key, timeout=timeout, concurrency=concurrency,
                                 max_retries=max_retries, max_wait_s=max_wait_s,
                                 max_invalid_replies=max_invalid_replies)
        self._lock = threading.Lock()
        self._given_vocab = vocab_size
        self._vocab_size = None
        self._model = model
        self._model_entry = None

    # -- server facts --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """The teacher's vocabulary size. protocol "protege": the server's /v1/info (which must agree with
        a given vocab_size). "openai": the given vocab_size, else /v1/models' "vocab_size", else the
        served model's config.json when readable here; else ValueError naming teacher.vocab_size."""
        if self._vocab_size is None:
            self._vocab_size = self._find_vocab_size()
        return self._vocab_size

    def _find_vocab_size(self) -> int:
        if self.protocol == "protege":
            served = self._get("/v1/info").get("vocab_size")
            if not isinstance(served, int) or isinstance(served, bool) or served < 1:
                raise ValueError(f"teacher server {self.urls[0]}: /v1/info has no vocab_size ({served!r})")
            if self._given_vocab is not None and self._given_vocab != served:
                raise ValueError(f"teacher.vocab_size={self._given_vocab} but the teacher server {self.urls[0]} "
                                 f"reports vocab_size {served}: remove teacher.vocab_size or correct it")
            return served
        if self._given_vocab is not None:
            return self._given_vocab
        entry = self._models_entry()
        served = entry.get("vocab_size")
        if isinstance(served, int) and not isinstance(served, bool) and served > 0:
            return served
        for name in dict.fromkeys(n for n in (entry.get("root"), entry.get("id")) if isinstance(n, str)):
            found = local_vocab_size(name)
            if found is not None:
                return found
        raise ValueError(
            f"the OpenAI-compatible teacher server {self.urls[0]} (model {entry.get('id')!r}) does not report its "
            f"vocabulary size, and no config.json of {entry.get('root') or entry.get('id')!r} is readable here. "
            "Set teacher.vocab_size to the teacher's vocabulary size (the 'vocab_size' of its config.json, the "
            "width of its logits), or pass RemoteTeacher(..., vocab_size=V).")

    def info(self) -> dict:
        """The server's /v1/info (protege servers only)."""
        return self._get("/v1/info")

    @property
    def output_weight(self) -> torch.Tensor:
        """(V, H) the teacher's output projection (fetched once, verified by its sha256; see hidden=True)."""
        if self.projection.weight is None:
            self.projection.load(self.info(), lambda path, check: self._request("GET", path, check=check))
        return self.projection.weight

    def _models_entry(self) -> dict:
        """The first model of the server's /v1/models (cached)."""
        if self._model_entry is None:
            data = self._get("/v1/models").get("data")
            if not isinstance(data, list) or not data or not isinstance(data[0], dict) or "id" not in data[0]:
                raise ValueError(f"teacher server {self.urls[0]}: /v1/models lists no model ({str(data)[:100]})")
            self._model_entry = data[0]
        return self._model_entry

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = str(self._models_entry()["id"])
        return self._model

    def close(self) -> None:
        self.replicas.close()

    def __enter__(self) -> "RemoteTeacher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- scoring -------------------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        """Remote; hidden states from a protege server only; identity: the protocol, its servers and model name."""
        identity = {"kind": "server", "protocol": self.protocol, "urls": list(self.urls),
                    **({"model": self._model} if self._model else {})}
        return Capabilities(remote=True, hidden=self.protocol == "protege", identity=identity)

    def score(self, rollouts: Rollouts, request: ScoreRequest) -> TeacherSignal:
        """The teacher's signal for every completion position of `rollouts`; each reply checked first."""
        if request.hidden and self.protocol != "protege":
            raise ValueError("protocol='openai' cannot give hidden states (ScoreRequest.hidden=True, "
                             "loss.support=full); serve the teacher with `protege serve-teacher` or a top-k support")
        if not (request.temperature > 0 and math.isfinite(request.temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {request.temperature}")
        if self.protocol == "openai" and request.query_ids is not None:
            raise ValueError("protocol='openai' cannot return logprobs at ids the client picks (query_ids, e.g. the "
                             "student's top-k for reverse KL): a stock vLLM server only gives its own top-k and the "
                             "actual token. Serve the teacher with `protege serve-teacher` and use protocol='protege', "
                             "or use the teacher's top-k support (ScoreRequest(topk=K)).")
        if (self.protocol == "openai" and request.temperature != 1.0
                and self._models_entry().get("owned_by") != "protege"):
            raise ValueError(f"temperature {request.temperature:g} (loss.temperature) with protocol='openai': a stock "
                             "vLLM server's prompt logprobs ignore the request's temperature and would come back "
                             "at temperature 1. Use loss.temperature=1, or serve the teacher with `protege "
                             "serve-teacher` (teacher.protocol=protege).")
        mask = rollouts.completion_mask.bool()
        n, t = mask.shape
        k = request.topk
        query = request.query_ids
        if query is not None and (query.dim() != 3 or tuple(query.shape[:2]) != (n, t)):
            raise ValueError(f"query_ids has shape {list(query.shape)}; expected [{n}, {t}, M] (rollouts' "
                             "completion_ids shape plus the number of ids per position)")
        out = TeacherSignal(
            token_logprobs=torch.zeros((n, t), dtype=torch.float32),  # (N, T)
            topk_ids=torch.zeros((n, t, k), dtype=torch.long) if k else None,  # (N, T, K)
            topk_logprobs=torch.zeros((n, t, k), dtype=torch.float32) if k else None,  # (N, T, K)
            query_logprobs=torch.zeros((n, t, query.shape[2]), dtype=torch.float32) if query is not None else None,
            hidden_states=torch.zeros((n, t, self.output_weight.shape[1]), dtype=self.projection.hidden_torch_dtype)
            if request.hidden else None)  # (N, T, H) in the wire dtype
        comp_lens = mask.sum(1).tolist()
        rows = [i for i in range(n) if comp_lens[i] > 0]
        if not rows:
            return out
        vocab = self.vocab_size  # what every reply's ids are checked against (fetched once)
        sequences = {}
        completion = rollouts.completion_ids.cpu()
        query = query.cpu() if query is not None else None
        for i in rows:
            seq = torch.cat([rollouts.prompt_ids[i].reshape(-1).cpu(), completion[i, : comp_lens[i]].cpu()])
            sequences[i] = seq.to(torch.int32).numpy()
        chunks = self._chunks(rows, sequences)
        send = self._score_protege if self.protocol == "protege" else self._score_openai
        jobs = [(chunk, sequences, [len(rollouts.prompt_ids[i]) for i in chunk], comp_lens, query, request, vocab)
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
            if request.hidden:
                out.hidden_states[idx, :tc] = result["hidden_states"]
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

    def _score_protege(self, chunk, sequences, prompt_lengths, comp_lens, query, request,
                       vocab) -> dict[str, torch.Tensor]:
        """One chunk (row indices `chunk`, their prompt lengths) via binary /v1/score, checked."""
        query_ids = None
        if query is not None:  # (C, M): completion positions of the chunk's rows, in order
            query_ids = torch.cat([query[i, : comp_lens[i]] for i in chunk]).to(torch.int32).numpy()
        lengths = [comp_lens[i] for i in chunk]
        m = None if query is None else int(query.shape[2])
        hidden = (self.hidden_dtype, self.projection.hidden_spec()) if request.hidden else (None, None)
        headers = {"Content-Type": wire.BINARY_MEDIA_TYPE, "Accept": wire.BINARY_MEDIA_TYPE}
        while True:
            version = self._wire_version
            body = wire.encode_score_request([sequences[i] for i in chunk], prompt_lengths, topk=request.topk,
                                             temperature=request.temperature, query_ids=query_ids,
                                             logprob_dtype=self.logprob_dtype, version=version, hidden_dtype=hidden[0])

            def check(response: httpx.Response, version=version) -> dict[str, torch.Tensor]:
                got, meta, tensors = decode_score_reply(response.content, response.headers.get("content-type", ""),
                                                        with_meta=True)
                if hidden[0]:
                    self.projection.check_reply(meta, str(response.url))
                return check_score_reply(got, tensors, asked_version=version, lengths=lengths, k=request.topk,
                                         m=m, vocab_size=vocab, logprob_dtype=self.logprob_dtype, hidden=hidden[1])

            try:
                return self._request("POST", "/v1/score", check=check, content=body, headers=headers)
            except TeacherRefused as exc:  # an older server: "wire version 3 is not supported; ..."
                if exc.status != 400 or version < 2 or f"wire version {version} is not supported" not in str(exc):
                    raise
                self._step_down(version, exc)

    def _step_down(self, version: int, exc: TeacherRefused) -> None:
        """Speak wire version - 1 from now on, when teacher.min_wire_version allows it (logged, counted)."""
        if version - 1 < self.min_wire_version:
            raise TeacherRefused(f"{exc}. The client keeps wire version {version} (teacher.min_wire_version="
                                 f"{self.min_wire_version}): version {version - 1} has no crc32 check, so a reply's "
                                 "flipped bits would be trained on. Upgrade the server (protege serve-teacher), or "
                                 f"set teacher.min_wire_version={version - 1} to accept it", exc.status) from None
        if self.logprob_dtype != "float32" and version <= 2:
            raise ValueError(f"logprob_dtype={self.logprob_dtype!r} needs a teacher server that reads wire "
                             f"version 2; this one does not ({exc})") from None
        with self._lock:
            if version - 1 < self._wire_version:
                self._counts["wire_downgrades"] += 1
                log.warning("teacher server speaks only wire version <= %d (%s): using it from now on%s", version - 1,
                            exc, " (no crc32 check of replies)" if version - 1 < 3 else "")
            self._wire_version = min(self._wire_version, version - 1)

    def step_metrics(self) -> dict[str, int]:
        """The trainer's per-step hook: the wire version in use, and since the last call: wire steps down
        and bad replies that a retry replaced."""
        with self._lock:
            out = {f"teacher_{k}": v for k, v in self._counts.items()}
            self._counts = dict.fromkeys(self._counts, 0)
        out["teacher_invalid_replies_retried"] = self.replicas.take_retried()
        if self.protocol == "protege":
            out["teacher_wire_version"] = self._wire_version
        return out

    def _score_openai(self, chunk, sequences, prompt_lengths, comp_lens, query, request,
                      vocab) -> dict[str, torch.Tensor]:
        """One chunk via vLLM's /v1/completions prompt_logprobs (parsed from JSON: Python loops), checked."""
        k = request.topk
        seqs = [sequences[i] for i in chunk]
        payload = {"model": self.model, "prompt": [s.tolist() for s in seqs], "max_tokens": 1,
                   "temperature": request.temperature, "prompt_logprobs": k}
        return self._request("POST", "/v1/completions", content=orjson.dumps(payload),
                             headers={"Content-Type": "application/json"},
                             check=lambda response: parse_completions_reply(response.content, seqs, prompt_lengths,
                                                                            k, vocab))

    # -- HTTP with retries ---------------------------------------------------------------------

    def _get(self, path: str) -> dict:
        return self._request("GET", path, check=lambda response: json_object(response.content))

    def request(self, method: str, path: str, *, check=None, **kwargs):
        """check(response) of the first good reply from one of the servers, with this client's retries
        (protege.teacher.replicas): for other clients of the same servers (protege.teacher.api)."""
        return self.replicas.request(method, path, check=check, **kwargs)

    _request = request
