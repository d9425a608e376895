"""OpenAI-compatible generation routes of the teacher server, so protege can stand in for an API.

    POST /v1/chat/completions   OpenAI's chat shape; logprobs=true + top_logprobs give
                                choices[i].logprobs.content[j] = {token, logprob, bytes, top_logprobs}
    POST /v1/completions        the legacy shape; logprobs=k gives choices[i].logprobs = {tokens,
                                token_logprobs, top_logprobs, text_offset}; echo puts the prompt first;
                                prompt_logprobs=k (vLLM's extension) adds choices[i].prompt_logprobs.
                                A request of vLLM's scoring form (prompt_logprobs with max_tokens <= 1,
                                no logprobs, no echo: what TRL 1.16 and teacher.protocol=openai send)
                                keeps going to the scoring route (protege.server.app.completions).

Generation runs on the hf backend's model (protege.server.openai_generate), in the batcher's engine
thread, serialised with scoring; concurrent requests that sample alike are merged into one call.
Logprobs are log_softmax(logits) at temperature 1 (vLLM's default raw_logprobs), clamped at -9999 for
JSON; prompt logprobs come from the scoring batcher (the same numbers as /v1/score at temperature 1).
Token strings are the tokenizer's decoding of each id, or "token_id:<id>" with
return_tokens_as_token_ids (vLLM's extension; always without a tokenizer). Stop strings end the text
before the string and keep the tokens up to the one that completed it (vLLM's behaviour); EOS is kept
in the tokens (and logprobs) but not in the text. usage counts each prompt once and every choice's
completion tokens.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response

from protege.server import parse
from protege.server.batch import Batch, RequestError
from protege.server.openai_generate import GeneratedRow, GenerationQueue, clean_logprob
from protege.server.openai_requests import GenSpec, chat_spec, completions_spec


def routes(route, read_body, score_completions) -> list:
    """The two routes, made with protege.server.app's `route` (auth, errors, metrics) and `read_body`;
    `score_completions` is the scoring handler that vLLM-style scoring requests keep going to."""

    async def completions(request: Request) -> Response:
        body = await read_body(request)
        parse.require_json(request.headers.get("content-type"))
        obj = parse.load_json(body)
        if _is_scoring(obj):
            return await score_completions(_Replayed(request, body))
        return await _generate(request, obj, chat=False)

    async def chat_completions(request: Request) -> Response:
        body = await read_body(request)
        parse.require_json(request.headers.get("content-type"))
        return await _generate(request, parse.load_json(body), chat=True)

    return [route("/v1/completions", completions, ["POST"]),
            route("/v1/chat/completions", chat_completions, ["POST"])]


def _is_scoring(obj: dict) -> bool:
    """vLLM's scoring form: prompt_logprobs, at most one token, no generated-token logprobs or echo."""
    return (obj.get("prompt_logprobs") is not None and obj.get("max_tokens", 1) in (None, 1)
            and not obj.get("echo") and obj.get("logprobs") in (None, 0, False))


class _Replayed:
    """The request with its body already read: the scoring handler reads it again through `stream()`."""

    def __init__(self, request: Request, body: bytes):
        self._request, self._body = request, body

    def __getattr__(self, name):
        return getattr(self._request, name)

    async def stream(self):
        yield self._body


async def _generate(request: Request, obj: dict, *, chat: bool) -> Response:
    served = request.app.state.served
    tokenizer = served.decoder.tokenizer
    build = chat_spec if chat else completions_spec
    spec = await asyncio.to_thread(build, obj, tokenizer=tokenizer, vocab=served.vocab, limits=served.limits,
                                   model_name=served.model_name)
    rows: list[GeneratedRow] = []
    if spec.max_tokens > 0:
        queue = _queue(request.app)
        prompts = [p for p in spec.prompts for _ in range(spec.n)]
        rows = await queue.submit(prompts, [spec.max_tokens] * len(prompts), spec.key, spec.logprobs or 0)
    prompt_scores = None
    k_prompt = max(spec.prompt_logprobs or 0, spec.logprobs or 0) if spec.echo else spec.prompt_logprobs
    if k_prompt is not None and (spec.prompt_logprobs is not None or (spec.echo and spec.logprobs is not None)):
        prompt_scores = await _score_prompts(served, spec.prompts, k_prompt)
    reply = await asyncio.to_thread(_reply, spec, rows, prompt_scores, tokenizer, served.model_name)
    return Response(orjson.dumps(reply), media_type="application/json")


def _queue(app) -> GenerationQueue:
    """The app's generation queue, made on first use (the hf backend's model; other backends: 501)."""
    queue = getattr(app.state, "generation", None)
    if queue is None:
        served = app.state.served
        model = getattr(served.backend, "model", None)
        if model is None:
            raise RequestError(501, f"text generation is served by the hf backend only (this server runs "
                                    f"{served.backend.name}); for a vLLM teacher run `vllm serve`, whose routes "
                                    "generate")
        tok = served.decoder.tokenizer
        eos = getattr(tok, "eos_token_id", None) if tok is not None else None
        if eos is None:
            eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]
        s = served.settings
        queue = GenerationQueue(served.batcher, model, eos_ids=eos_ids, pad_id=getattr(served.backend, "pad_id", 0),
                                batch_wait_s=s.batch_wait_ms / 1000.0, max_batch_seqs=s.max_batch_seqs,
                                max_batch_tokens=s.max_batch_tokens, batching=s.batching)
        app.state.generation = queue
    return queue


async def _score_prompts(served, prompts: list[list[int]], k: int) -> list[tuple[list[float], list, list] | None]:
    """Per prompt: (logprob of tokens 1.., top-k ids, top-k logprobs) at temperature 1, or None (1 token)."""
    idx = [i for i, p in enumerate(prompts) if len(p) >= 2]
    out: list = [None] * len(prompts)
    if not idx:
        return out
    batch = Batch(sequences=[np.asarray(prompts[i], np.int32) for i in idx], prompt_lengths=[1] * len(idx),
                  topk=k, temperature=1.0)
    result = await served.batcher.score(batch)
    for row, i in enumerate(idx):
        c = len(prompts[i]) - 1
        ids = result["topk_ids"][row, :c].tolist() if k else [[] for _ in range(c)]
        lps = result["topk_logprobs"][row, :c].tolist() if k else [[] for _ in range(c)]
        out[i] = (result["token_logprobs"][row, :c].tolist(), ids, lps)
    return out


# ------------------------------------------------------------------------------------- replies
class _Tokens:
    """Token id -> the string a reply shows for it (cached)."""

    def __init__(self, tokenizer, as_ids: bool):
        self.tokenizer, self.as_ids = tokenizer, as_ids or tokenizer is None
        self.cache: dict[int, str] = {}

    def __call__(self, i: int) -> str:
        if self.as_ids:
            return f"token_id:{i}"
        if i not in self.cache:
            self.cache[i] = self.tokenizer.decode([i])
        return self.cache[i]

    def text(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)


def _cut_at_stop(row: GeneratedRow, stop: tuple[str, ...], tokens: _Tokens) -> tuple[GeneratedRow, str]:
    """(row cut after the token that completes the first stop string, text before it), else (row, text)."""
    text = tokens.text(row.token_ids)
    if not stop or not any(s in text for s in stop):
        return row, text
    for j in range(1, len(row.token_ids) + 1):
        prefix = tokens.text(row.token_ids[:j])
        hits = [prefix.index(s) for s in stop if s in prefix]
        if hits:
            cut = lambda x: None if x is None else x[:j]  # noqa: E731
            return GeneratedRow(row.token_ids[:j], row.logprobs[:j], cut(row.top_ids), cut(row.top_logprobs),
                                "stop"), prefix[:min(hits)]
    return row, text


def _reply(spec: GenSpec, rows: list[GeneratedRow], prompt_scores, tokenizer, model_name: str) -> dict:
    tokens = _Tokens(tokenizer, spec.ids_as_tokens)
    choices, completion_tokens = [], 0
    for p, prompt in enumerate(spec.prompts):
        for j in range(spec.n):
            index = p * spec.n + j
            row = rows[index] if rows else GeneratedRow([], [], None, None, "length")
            row, text = _cut_at_stop(row, spec.stop, tokens)
            completion_tokens += len(row.token_ids)
            if spec.chat:
                choices.append(_chat_choice(index, row, text, spec, tokens))
            else:
                choices.append(_completion_choice(index, prompt, row, text, spec, tokens,
                                                  prompt_scores[p] if prompt_scores else None))
    prompt_tokens = sum(len(p) for p in spec.prompts)
    return {"id": f"{'chatcmpl' if spec.chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if spec.chat else "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices, "system_fingerprint": None,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _chat_choice(index: int, row: GeneratedRow, text: str, spec: GenSpec, tokens: _Tokens) -> dict:
    logprobs = None
    if spec.logprobs is not None:
        def entry(i: int, lp: float) -> dict:
            s = tokens(i)
            return {"token": s, "logprob": clean_logprob(lp), "bytes": list(s.encode("utf-8"))}

        content = []
        for pos, (i, lp) in enumerate(zip(row.token_ids, row.logprobs)):
            tops = [] if not spec.logprobs else [entry(t, v) for t, v in zip(row.top_ids[pos], row.top_logprobs[pos])]
            content.append({**entry(i, lp), "top_logprobs": tops})
        logprobs = {"content": content, "refusal": None}
    return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": logprobs, "finish_reason": row.finish_reason}


def _completion_choice(index: int, prompt: list[int], row: GeneratedRow, text: str, spec: GenSpec, tokens: _Tokens,
                       scores) -> dict:
    choice = {"index": index, "text": (tokens.text(prompt) + text) if spec.echo else text, "logprobs": None,
              "finish_reason": row.finish_reason, "stop_reason": None, "prompt_logprobs": None}
    if spec.logprobs is not None:
        ids, lps = list(row.token_ids), [clean_logprob(v) for v in row.logprobs]
        tops = [_top_dict(t, v, tokens) for t, v in zip(row.top_ids or [[]] * len(ids),
                                                         row.top_logprobs or [[]] * len(ids))]
        if spec.echo:
            p_lps, p_tops = [None], [None]
            if scores is not None:
                p_lps += [clean_logprob(v) for v in scores[0]]
                p_tops += [_top_dict(t[:spec.logprobs], v[:spec.logprobs], tokens) for t, v in zip(scores[1], scores[2])]
            ids, lps, tops = list(prompt) + ids, p_lps + lps, p_tops + tops
        strings = [tokens(i) for i in ids]
        offsets = np.cumsum([0] + [len(s) for s in strings[:-1]]).tolist() if strings else []
        choice["logprobs"] = {"tokens": strings, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
    if spec.prompt_logprobs is not None:
        choice["prompt_logprobs"] = _prompt_logprobs(prompt, scores, spec.prompt_logprobs, tokens)
    return choice


def _top_dict(ids: list[int], lps: list[float], tokens: _Tokens) -> dict[str, float]:
    return {tokens(i): clean_logprob(v) for i, v in zip(ids, lps)}


def _prompt_logprobs(prompt: list[int], scores, k: int, tokens: _Tokens) -> list:
    """vLLM's shape: None for the first token, then {"<id>": {logprob, rank, decoded_token}} with the actual
    token first, then the top-k (rank k+1 for an actual token outside the top-k)."""
    out: list = [None]
    if scores is None:
        return out
    for pos, (lp, ids, lps) in enumerate(zip(*scores)):
        actual = prompt[pos + 1]
        ids, lps = ids[:k], lps[:k]
        rank = ids.index(actual) + 1 if actual in ids else k + 1
        entry = {str(actual): {"logprob": clean_logprob(lp), "rank": rank, "decoded_token": tokens(actual)}}
        for r, (i, v) in enumerate(zip(ids, lps), start=1):
            if i != actual:
                entry[str(i)] = {"logprob": clean_logprob(v), "rank": r, "decoded_token": tokens(i)}
        out.append(entry)
    return out
