"""A teacher that is only an OpenAI-compatible generation API (teacher.protocol=openai-chat|openai-completions).

Such an endpoint gives text, and with logprobs the top_logprobs (<= 20) of the tokens IT generates,
nothing about tokens it did not choose (protege.api_kinds has the table and the start-up check). So
it is used as the teacher of teacher-sampled rows only (mix.lmbda=0, mix.seq_kd=true): the trainer
calls `generate` for the rows' completions (it is the run's teacher engine) and then `score` on the
same rows, which returns what the API said about its own tokens:

    text only (loss.name=sft)      completion = the student's tokenizer on the text, + EOS when the API
                                   stopped (finish_reason "stop"); token_logprobs are 0 (unknown)
    top_logprobs (top_k = loss.top_k <= 20)   completion = the API's own token ids (sent back as
                                   "token_id:<id>" with vLLM's return_tokens_as_token_ids, which vLLM and
                                   protege serve-teacher honour; the teacher must share the student's
                                   vocabulary); token_logprobs and the top-k per position, as the API
                                   sent them (log_softmax at temperature 1)

openai-completions sends the student's prompt token ids (exactly what the student sees);
openai-chat sends the row's messages (protege.data.Example.messages), rendered by the server's own
chat template. Requests carry the sampling settings of the run (rollout.temperature, top_p,
max_new_tokens; top_k only when set, as vLLM's extension) and a seed derived from the entry's key.

Every completion is stored (protege.teacher.api_store) under the model, the prompt, the sampling
settings and the sample's index among equal prompts: generated once, reused across steps, epochs and
reruns; a damaged entry is generated again. Requests run `max_concurrency` at a time through
RemoteTeacher's HTTP client (its retries: connection errors, timeouts, 5xx and 429, with the
server's Retry-After honoured; a 4xx stops the run with the server's message). `usage_since_last()`
gives what the API billed since the last call (prompt and completion tokens from its `usage`), which
the trainer logs in each step's metrics.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading

import orjson
import torch

from protege.records import Rollouts, TeacherSignal
from protege.rollout.base import Sampling
from protege.teacher.api_replies import parse_generation_reply
from protege.teacher.api_store import CompletionStore
from protege.teacher.base import Capabilities, ScoreRequest, Teacher
from protege.teacher.remote import RemoteTeacher

PATHS = {"openai-chat": "/v1/chat/completions", "openai-completions": "/v1/completions"}


class APITeacher(Teacher):
    """The teacher engine and teacher of teacher-sampled rows from an OpenAI-compatible API (see module doc)."""

    def __init__(self, kind: str, urls: str | list[str], *, store_dir: str, topk: int = 0, api_key: str | None = None,
                 model: str | None = None, timeout: float = 300.0, max_wait_s: float = 600.0,
                 max_concurrency: int = 8, vocab_size: int | None = None, tokenizer=None):
        if kind not in PATHS:
            raise ValueError(f"teacher.protocol={kind!r}: the API kinds are {', '.join(PATHS)}")
        urls = [urls] if isinstance(urls, str) else list(urls)
        urls = [u.rstrip("/").removesuffix("/v1") for u in urls]  # an OpenAI base_url ends in /v1
        api_key = api_key or os.environ.get("PROTEGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.http = RemoteTeacher(urls, api_key=api_key, timeout=timeout, max_wait_s=max_wait_s,
                                  concurrency=max_concurrency, protocol="openai", vocab_size=vocab_size, model=model)
        self.kind, self.topk, self.max_concurrency = kind, topk, max_concurrency
        self.store = CompletionStore(store_dir)
        self.tokenizer = tokenizer
        self._signals: dict[tuple, dict] = {}  # (prompt ids, completion ids) -> what the API said, latest buffer
        self._lock = threading.Lock()
        self._usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "stored": 0}

    @property
    def vocab_size(self) -> int | None:
        """The teacher's vocabulary (top_logprobs mode: ids are checked against it); None for text only."""
        return self.http.vocab_size if self.topk else None

    @property
    def model(self) -> str:
        return self.http.model

    def close(self) -> None:
        self.http.close()

    @property
    def capabilities(self) -> Capabilities:
        """Remote, text or top-k logprobs only; reads the rows (chat messages) and samples them itself; knows only its
        own samples (the trainer skips held-out teacher metrics)."""
        return Capabilities(remote=True, hidden=False, reads_rows=True, generates=True, scores_student_rows=False,
                            identity={"kind": f"api:{self.kind}", "urls": list(self.http.urls),
                                      "model": self.http.capabilities.identity.get("model", "")})

    def generator(self, *, pad_id: int, batch_tokens: int, tokenizer=None):
        """Itself: it samples through the API, rendering token ids with the student's `tokenizer`."""
        self.tokenizer = tokenizer
        return self

    def step_metrics(self) -> dict[str, int]:
        """The trainer's per-step hook: usage_since_last()."""
        return self.usage_since_last()

    def usage_since_last(self) -> dict[str, int]:
        """What the API was asked since the last call: requests, prompt/completion tokens (its `usage`), and the
        rows served from the store instead; as step metrics (teacher_api_*)."""
        with self._lock:
            out = {f"teacher_api_{k}": v for k, v in self._usage.items()}
            self._usage = dict.fromkeys(self._usage, 0)
        return out

    # ------------------------------------------------------------------------------ generate
    def generate(self, prompt_ids: list[torch.Tensor], sampling: Sampling, *, source: str = "teacher",
                 examples: list | None = None) -> Rollouts:
        """One teacher completion per prompt (repeat prompts for several), from the store or the API."""
        if self.tokenizer is None and not self.topk:
            raise ValueError("a text-only APITeacher needs the student's tokenizer (APITeacher(..., tokenizer=tok))")
        if self.kind == "openai-chat" and (examples is None or len(examples) != len(prompt_ids)):
            raise ValueError("teacher.protocol=openai-chat sends each row's messages: pass examples= (the data rows)")
        keys, counts = [], {}
        for i, ids in enumerate(prompt_ids):
            prompt = examples[i].messages if self.kind == "openai-chat" else [int(t) for t in ids]
            base = _key_base(self.kind, self.model, prompt, sampling, self.topk)
            tag = orjson.dumps(base, option=orjson.OPT_SORT_KEYS)
            counts[tag] = counts.get(tag, -1) + 1  # the sample's index among equal prompts
            key = {**base, "sample": counts[tag]}
            keys.append({**key, "seed": seed_of(key)})
        values = self._values(keys, sampling)
        completions, finish = [], []
        self._signals = {}
        for ids, value in zip(prompt_ids, values):
            completion, signal = self._completion(value, sampling)
            completions.append(completion)
            finish.append(value["finish_reason"])
            self._signals[(tuple(ids.tolist()), tuple(completion.tolist()))] = signal
        rollouts = Rollouts.from_references(list(prompt_ids), completions, source=source)
        rollouts.finish_reasons = finish
        return rollouts

    def _values(self, keys: list[dict], sampling: Sampling) -> list[dict]:
        """Stored values, the missing ones requested `max_concurrency` at a time (and stored)."""
        values = [self.store.get(k) for k in keys]
        missing = [i for i, v in enumerate(values) if v is None]
        with self._lock:
            self._usage["stored"] += len(keys) - len(missing)
        if missing:
            with concurrent.futures.ThreadPoolExecutor(min(self.max_concurrency, len(missing))) as pool:
                for i, value in zip(missing, pool.map(lambda i: self._ask(keys[i], sampling), missing)):
                    values[i] = value
        return values

    def _ask(self, key: dict, sampling: Sampling) -> dict:
        body = {"model": key["model"], "max_tokens": key["max_tokens"], "temperature": key["temperature"],
                "top_p": key["top_p"], "seed": key["seed"]}
        if key["top_k"]:
            body["top_k"] = key["top_k"]
        if self.kind == "openai-chat":
            body["messages"] = key["prompt"]
            if self.topk:
                body.update(logprobs=True, top_logprobs=self.topk, return_tokens_as_token_ids=True)
        else:
            body["prompt"] = key["prompt"]
            if self.topk:
                body.update(logprobs=self.topk, return_tokens_as_token_ids=True)
        vocab = self.vocab_size
        value = self.http.request(
            "POST", PATHS[self.kind], content=orjson.dumps(body), headers={"Content-Type": "application/json"},
            check=lambda r: parse_generation_reply(r.content, chat=self.kind == "openai-chat", topk=self.topk,
                                                   vocab_size=vocab, url=self.http.urls[0]))
        with self._lock:
            self._usage["requests"] += 1
            self._usage["prompt_tokens"] += value["usage"]["prompt_tokens"]
            self._usage["completion_tokens"] += value["usage"]["completion_tokens"]
        self.store.put(key, value)
        return value

    def _completion(self, value: dict, sampling: Sampling) -> tuple[torch.Tensor, dict]:
        """The row's completion ids (the student's) and what the API said about each of its positions."""
        eos = list(sampling.eos_ids)
        if not self.topk:  # text only: the student's tokens for the text, EOS when the API stopped
            ids = self.tokenizer(value["text"], add_special_tokens=False)["input_ids"][: sampling.max_new_tokens]
            if value["finish_reason"] == "stop" and eos and len(ids) < sampling.max_new_tokens:
                ids = ids + [eos[0]]
            return torch.tensor(ids, dtype=torch.long), {}
        ids, lps = value["token_ids"], value["logprobs"]
        top_ids, top_lps = value["top_ids"], value["top_logprobs"]
        if not ids:
            raise ValueError(f"the teacher API ({self.http.urls[0]}) returned an empty completion with logprobs; "
                             "a top-k loss needs at least one teacher token per row")
        signal = {"token_logprobs": torch.tensor(lps, dtype=torch.float32),
                  "topk_ids": torch.tensor(top_ids, dtype=torch.long),
                  "topk_logprobs": torch.tensor(top_lps, dtype=torch.float32)}
        return torch.tensor(ids, dtype=torch.long), signal

    # --------------------------------------------------------------------------------- score
    def score(self, rollouts: Rollouts, request: ScoreRequest) -> TeacherSignal:
        """What the API said about the rows it generated in the latest `generate` call (ValueError for others)."""
        if request.hidden or request.query_ids is not None:
            raise ValueError("an API teacher cannot give hidden states or logprobs at ids it did not choose "
                             "(loss.support=full|student|union); see protege.api_kinds for what works")
        if request.topk > self.topk or (self.topk == 0 and request.topk):
            raise ValueError(f"top-{request.topk} teacher logprobs asked for; this API teacher requests "
                             f"top_logprobs={self.topk} (loss.top_k)")
        mask = rollouts.completion_mask
        n, t = mask.shape
        k = request.topk
        out = TeacherSignal(token_logprobs=torch.zeros((n, t)),
                            topk_ids=torch.zeros((n, t, k), dtype=torch.long) if k else None,
                            topk_logprobs=torch.zeros((n, t, k)) if k else None)
        for i in range(n):
            c = int(mask[i].sum())
            row = (tuple(rollouts.prompt_ids[i].tolist()), tuple(rollouts.completion_ids[i, :c].tolist()))
            if row not in self._signals:
                raise ValueError(f"row {i} ({rollouts.sources[i] if rollouts.sources else '?'}) was not generated by "
                                 "this API teacher in the latest step: an API can only describe its own samples. Use "
                                 "mix.lmbda=0 and mix.seq_kd=true (protege.api_kinds lists what works)")
            signal = self._signals[row]
            if signal:
                out.token_logprobs[i, :c] = signal["token_logprobs"]
                if k:
                    out.topk_ids[i, :c] = signal["topk_ids"][:, :k]
                    out.topk_logprobs[i, :c] = signal["topk_logprobs"][:, :k]
        return out


def _key_base(kind: str, model: str, prompt, sampling: Sampling, topk: int) -> dict:
    """Everything that decides a completion but the sample index; the seed is derived from the rest."""
    return {"kind": kind, "model": model, "prompt": prompt, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "top_k": sampling.top_k, "max_tokens": sampling.max_new_tokens,
            "top_logprobs": topk}


def seed_of(key: dict) -> int:
    """A request seed from the entry's key (the same entry asks with the same seed)."""
    return int.from_bytes(hashlib.sha256(orjson.dumps(key, option=orjson.OPT_SORT_KEYS)).digest()[:4], "little")
