"""Parsing of OpenAI-compatible generation requests (/v1/completions, /v1/chat/completions) into a `GenSpec`.

Every field is checked before anything reaches the engine; a bad one is a 400 naming it (an unknown
model 404). Served: prompt (text, texts, token ids, lists of token ids) or messages, max_tokens
(chat: also max_completion_tokens; default 16 for completions, the rest of the context for chat),
temperature (0 = greedy), top_p, top_k (vLLM's extension), seed, stop (strings), n, logprobs
(completions: top-k per token; chat: true + top_logprobs), echo, prompt_logprobs (vLLM's
extension) and return_tokens_as_token_ids (vLLM's: tokens reported as "token_id:<id>"). Accepted
at their no-op values only: stream=false, frequency/presence_penalty=0, logit_bias={}, best_of=1,
suffix=null; `user` and `stream_options` are ignored. Anything else is an unknown field (400).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protege.server import parse
from protege.server.batch import RequestError
from protege.server.openai_generate import SamplingKey
from protege.server.parse import Limits, bad

COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "stream_options",
          "user", "frequency_penalty", "presence_penalty", "logit_bias", "return_tokens_as_token_ids", "logprobs"}
COMPLETIONS = COMMON | {"prompt", "echo", "prompt_logprobs", "best_of", "suffix"}
CHAT = COMMON | {"messages", "top_logprobs", "max_completion_tokens"}
MAX_STOP = 16


@dataclass
class GenSpec:
    """One generation request, checked: prompts as token ids, and how to sample and report."""

    prompts: list[list[int]]
    max_tokens: int  # 0 only with echo: nothing is generated
    key: SamplingKey
    n: int = 1
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top-k per generated token, None: no logprobs
    echo: bool = False
    prompt_logprobs: int | None = None
    ids_as_tokens: bool = False
    chat: bool = False


def completions_spec(obj: dict, *, tokenizer, vocab: int, limits: Limits, model_name: str) -> GenSpec:
    """POST /v1/completions (the legacy shape) -> GenSpec."""
    parse.check_keys(obj, COMPLETIONS, "the completions request")
    _common_checks(obj, model_name)
    for key, ok, why in (("best_of", lambda v: v in (None, 1), "only best_of=1 is served"),
                         ("suffix", lambda v: v is None, "suffix (insertion) is not served")):
        if not ok(obj.get(key)):
            raise bad(f"{key}={str(obj.get(key))[:40]}: {why}")
    prompts = _prompts(obj.get("prompt"), tokenizer, vocab)
    echo = _bool(obj, "echo")
    logprobs = None if obj.get("logprobs") is None else _k(obj, "logprobs", limits, vocab)
    prompt_logprobs = None if obj.get("prompt_logprobs") is None else _k(obj, "prompt_logprobs", limits, vocab)
    max_tokens = _max_tokens(obj, "max_tokens", 16, prompts, limits, allow_zero=echo)
    return _spec(obj, prompts, max_tokens, tokenizer, limits, logprobs=logprobs, echo=echo,
                 prompt_logprobs=prompt_logprobs, chat=False)


def chat_spec(obj: dict, *, tokenizer, vocab: int, limits: Limits, model_name: str) -> GenSpec:
    """POST /v1/chat/completions -> GenSpec (the server's chat template renders the messages)."""
    parse.check_keys(obj, CHAT, "the chat completions request")
    _common_checks(obj, model_name)
    prompt = _chat_prompt(obj.get("messages"), tokenizer)
    parse.check_ids(np.asarray(prompt, dtype=np.int64), "messages (as rendered by the chat template)", vocab)
    logprobs = None
    if _bool(obj, "logprobs"):
        logprobs = 0 if obj.get("top_logprobs") is None else _k(obj, "top_logprobs", limits, vocab)
    elif obj.get("top_logprobs") not in (None, 0):
        raise bad("top_logprobs needs logprobs=true")
    field = "max_completion_tokens" if obj.get("max_completion_tokens") is not None else "max_tokens"
    room = limits.max_seq_tokens - len(prompt)
    max_tokens = _max_tokens(obj, field, max(room, 1), [prompt], limits)
    return _spec(obj, [prompt], max_tokens, tokenizer, limits, logprobs=logprobs, chat=True)


def _spec(obj: dict, prompts: list[list[int]], max_tokens: int, tokenizer, limits: Limits, **kwargs) -> GenSpec:
    n = parse.get_int(obj, "n", 1, 1, limits.max_request_seqs, " (--max-request-seqs)") if obj.get("n") is not None \
        else 1
    if len(prompts) * n > limits.max_request_seqs:
        raise RequestError(413, f"{len(prompts)} prompts x n={n} exceed the per-request limit of "
                                f"{limits.max_request_seqs} sequences (--max-request-seqs); split the request")
    total = sum(len(p) + max_tokens for p in prompts) * n
    if total > limits.max_request_tokens:
        raise RequestError(413, f"{total} tokens (prompts + max_tokens, x n) exceed the per-request limit of "
                                f"{limits.max_request_tokens} (--max-request-tokens); split the request")
    stop = _stop(obj.get("stop"))
    if stop and tokenizer is None:
        raise bad("stop: this server has no tokenizer to find stop strings with; leave stop out")
    temperature = parse.get_temperature(obj, allow_zero=True)
    top_p = obj.get("top_p", 1.0)
    if top_p is None:
        top_p = 1.0
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise bad(f"top_p must be a number in (0, 1], got {str(top_p)[:40]}")
    top_k = obj.get("top_k")
    top_k = 0 if top_k in (None, -1) else parse.get_int(obj, "top_k", 0, 0, 1 << 30, " (-1 or 0: off)")
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad(f"seed must be an integer, got {type(seed).__name__} {str(seed)[:40]}")
    key = SamplingKey(temperature=temperature, top_p=float(top_p) if temperature else 1.0,
                      top_k=top_k if temperature else 0, seed=None if seed is None else seed % (1 << 63))
    return GenSpec(prompts=prompts, max_tokens=max_tokens, key=key, n=n, stop=stop,
                   ids_as_tokens=_bool(obj, "return_tokens_as_token_ids"), **kwargs)


def _common_checks(obj: dict, model_name: str) -> None:
    model = obj.get("model")
    if model is not None and model != model_name:
        raise RequestError(404, f"model {str(model)[:80]!r} is not served here; this server serves {model_name!r}")
    for key, ok, why in (("stream", lambda v: not v, "streaming is not served; send stream=false"),
                         ("frequency_penalty", lambda v: v in (None, 0), "penalties are not served"),
                         ("presence_penalty", lambda v: v in (None, 0), "penalties are not served"),
                         ("logit_bias", lambda v: not v, "logit_bias is not served")):
        if not ok(obj.get(key)):
            raise bad(f"{key}={str(obj.get(key))[:40]}: {why}")


def _bool(obj: dict, key: str) -> bool:
    value = obj.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{key} must be true or false, got {str(value)[:40]}")
    return value


def _k(obj: dict, key: str, limits: Limits, vocab: int) -> int:
    return parse.get_int(obj, key, None, 0, min(limits.max_k, vocab), " (--max-k)")


def _max_tokens(obj: dict, key: str, default: int, prompts, limits: Limits, allow_zero: bool = False) -> int:
    longest = max(len(p) for p in prompts)
    room = limits.max_seq_tokens - longest
    value = obj.get(key)
    if value is None:
        value = min(default, max(room, 0 if allow_zero else 1))
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise bad(f"{key} must be an integer >= {0 if allow_zero else 1}"
                  f"{' (0 only with echo)' if not allow_zero and key == 'max_tokens' else ''}, got {str(value)[:40]}")
    if value > room:
        raise bad(f"{key}={value}: the longest prompt has {longest} tokens, so at most {max(room, 0)} more fit the "
                  f"server's {limits.max_seq_tokens} tokens per sequence (--max-batch-tokens / model length)")
    return value


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise bad(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings, "
                  f"got {str(value)[:60]}")
    return tuple(stops)


def _prompts(prompt, tokenizer, vocab: int) -> list[list[int]]:
    """prompt: "text", ["text", ...], [id, ...] or [[id, ...], ...] -> token-id lists (each checked)."""
    if prompt is None:
        raise bad("missing field 'prompt' (text, a list of texts, token ids or a list of token-id lists)")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)):
        texts = [prompt] if isinstance(prompt, str) else prompt
        if tokenizer is None:
            raise bad("prompt: this server has no tokenizer, so text prompts cannot be read; send token ids")
        if not all(texts):
            raise bad("prompt holds an empty text")
        return [list(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad("prompt must be text, a list of texts, token ids or a list of token-id lists")
    rows = []
    for i, row in enumerate(prompt):
        if not isinstance(row, list) or not row:
            raise bad(f"prompt[{i}] must be a non-empty list of token ids")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in row):
            raise bad(f"prompt[{i}] must hold integer token ids in [0, {vocab}) (no booleans, floats or strings)")
        parse.check_ids(np.asarray(row, dtype=np.int64), f"prompt[{i}]", vocab)
        rows.append(row)
    return rows


def _chat_prompt(messages, tokenizer) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string 'role' and a 'content'")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are served")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts")
        clean.append({"role": m["role"], "content": content})
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise bad("messages: this server's tokenizer has no chat template; use /v1/completions with a prompt")
    ids = tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)
