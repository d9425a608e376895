"""Request parsing and validation for the teacher server: bodies in, `Batch` out, or a 4xx naming the field.

Every check here runs before anything reaches the engine, so a hostile or broken request costs a
4xx and nothing else: body size (413), content type (415), JSON shape and types (400), token ids
inside the vocabulary (integers, not booleans), 1 <= prompt length < sequence length, k and query
width within `--max-k` and `--max-query-ids`, a finite temperature >= MIN_TEMPERATURE, strings where
strings are expected, sequences/tokens within the request limits (413). Token ids are checked
vectorised (numpy min/max per row, a C-level type scan for booleans), never id by id in Python.

/v1/score parsing also yields the `ReplyFormat`: the reply goes out in the wire version the request
came in (binary or base64-JSON; plain JSON requests may name one with "wire_version", default the
current), with the logprob dtype the request asks for ("logprob_dtype", version 2 only) and, when it
asks for them, the teacher's hidden states in "hidden_dtype" (version 3 only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import orjson

from protege.server.batch import Batch, RequestError
from protege.wire import (HIDDEN_DTYPES, HIDDEN_VERSION, LOGPROB_DTYPES, READ_VERSIONS, VERSION, WireError, read_binary,
                          read_json_dict)


MIN_TEMPERATURE = 1e-3  # below this logits / T overflow float32 for real models (1e-300 gave NaN logprobs)


@dataclass
class Limits:
    """What one request may ask for (built from ServerSettings, where the defaults live)."""

    max_body_bytes: int
    max_k: int
    max_query_ids: int
    max_request_seqs: int
    max_request_tokens: int
    max_seq_tokens: int  # one sequence must fit one engine call


@dataclass(frozen=True)
class ReplyFormat:
    """How a /v1/score reply is encoded (protege.wire.encode_score_response's options)."""

    version: int = VERSION
    logprob_dtype: str = "float32"
    hidden_dtype: str | None = None  # hidden states asked for, in this dtype


def get_reply_format(obj: dict, version: int) -> ReplyFormat:
    """The optional "logprob_dtype" and "hidden_dtype" of a request (meta or plain JSON body), in wire `version`."""
    value = obj.get("logprob_dtype", "float32")
    if value is None:
        value = "float32"
    if not isinstance(value, str) or value not in LOGPROB_DTYPES:
        raise bad(f"logprob_dtype must be one of {', '.join(repr(k) for k in LOGPROB_DTYPES)}, "
                  f"got {str(value)[:40]!r}")
    if value != "float32" and version < 2:
        raise bad(f"logprob_dtype={value!r} needs wire version 2; this request is version {version}")
    hidden = obj.get("hidden_dtype")
    if hidden is not None and (not isinstance(hidden, str) or hidden not in HIDDEN_DTYPES):
        raise bad(f"hidden_dtype must be one of {', '.join(repr(k) for k in HIDDEN_DTYPES)}, got {str(hidden)[:40]!r}")
    if hidden is not None and version < HIDDEN_VERSION:
        raise bad(f"hidden_dtype={hidden!r} needs wire version {HIDDEN_VERSION}; this request is version {version}")
    return ReplyFormat(version=version, logprob_dtype=value, hidden_dtype=hidden)


def bad(message: str) -> RequestError:
    return RequestError(400, message)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def require_json(content_type: str | None) -> None:
    mt = media_type(content_type)
    if mt != "application/json" and not mt.endswith("+json"):
        raise RequestError(415, f"Content-Type must be application/json, got {content_type!r}")


def load_json(body: bytes) -> dict:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad(f"body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise bad(f"body must be a JSON object, got {type(obj).__name__}")
    return obj


def check_keys(obj: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(obj) - known)
    if unknown:
        raise bad(f"unknown field {unknown[0]!r} in {where}; known fields: {', '.join(sorted(known))}")


def get_int(obj: dict, key: str, default: int | None, lo: int, hi: int, hint: str = "") -> int:
    value = obj.get(key, default)
    if value is None and default is None:
        raise bad(f"missing field {key!r}")
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad(f"{key} must be an integer, got {type(value).__name__} {str(value)[:40]}")
    if not lo <= value <= hi:
        raise bad(f"{key}={value} is out of range [{lo}, {hi}]{hint}")
    return value


def get_temperature(obj: dict, key: str = "temperature", *, allow_zero: bool = False) -> float:
    value = obj.get(key, 1.0)
    if value is None:
        value = 1.0
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise bad(f"{key} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise bad(f"{key} must be a finite number > 0, got {value}")
    if 0 < value < MIN_TEMPERATURE:
        raise bad(f"{key}={value:g} is below the server's floor of {MIN_TEMPERATURE:g} (logits / {key} would "
                  f"overflow); use a {key} >= {MIN_TEMPERATURE:g}")
    return value


def _id_row(row, field: str, vocab: int, ndim: int = 1) -> np.ndarray:
    if not isinstance(row, list):
        raise bad(f"{field} must be a list of token ids, got {type(row).__name__}")
    if not row:
        raise bad(f"{field} is empty")
    try:
        arr = np.array(row)
    except (ValueError, OverflowError, TypeError):
        raise bad(f"{field} must be a {'rectangular ' if ndim > 1 else ''}list of integer token ids") from None
    if arr.ndim != ndim or arr.dtype.kind not in "iu":
        shape = "a list of lists of" if ndim == 2 else "a list of"
        raise bad(f"{field} must be {shape} integer token ids in [0, {vocab}) (got {arr.ndim} levels of {arr.dtype})")
    if _holds_bool(row, ndim):  # numpy turns [1, true, 3] into integers
        raise bad(f"{field} holds a boolean (true/false); token ids must be integers in [0, {vocab})")
    check_ids(arr, field, vocab)
    return arr.astype(np.int32)


def _holds_bool(row: list, ndim: int) -> bool:
    """Whether a JSON list (of lists when ndim == 2) holds true/false (map/set run in C, not per id in Python)."""
    if ndim == 1:
        return bool in set(map(type, row))
    return any(bool in set(map(type, r)) for r in row)


def check_ids(arr: np.ndarray, field: str, vocab: int) -> None:
    if arr.size and (arr.min() < 0 or arr.max() >= vocab):
        flat = arr.reshape(-1)
        i = int(np.flatnonzero((flat < 0) | (flat >= vocab))[0])
        raise bad(f"{field}: token id {int(flat[i])} (flat index {i}) is outside the vocabulary [0, {vocab})")


def check_rows(sequences: list[np.ndarray], prompt_lengths: list[int], limits: Limits, *,
               allow_empty_completion: bool = False) -> None:
    """Counts, lengths and prompt lengths of already-typed rows."""
    n = len(sequences)
    if n == 0:
        raise bad("sequences is empty: send at least one sequence")
    if n > limits.max_request_seqs:
        raise RequestError(413, f"{n} sequences exceed the per-request limit of {limits.max_request_seqs} "
                                "(--max-request-seqs); split the request")
    if len(prompt_lengths) != n:
        raise bad(f"prompt_lengths has {len(prompt_lengths)} entries for {n} sequences")
    total = 0
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        length = len(seq)
        if length > limits.max_seq_tokens:
            raise RequestError(413, f"sequences[{i}] has {length} tokens, more than the server's "
                                    f"{limits.max_seq_tokens} per sequence (--max-batch-tokens / model length)")
        top = length if allow_empty_completion else length - 1
        if not 1 <= p <= top:
            raise bad(f"prompt_lengths[{i}]={p} must be in [1, {top}] for a sequence of {length} tokens "
                      f"(at least one prompt token{'' if allow_empty_completion else ' and one completion token'})")
        total += length
    if total > limits.max_request_tokens:
        raise RequestError(413, f"{total} tokens exceed the per-request limit of {limits.max_request_tokens} "
                                "(--max-request-tokens); split the request")


def _prompt_lengths(value) -> list[int]:
    if not isinstance(value, list):
        raise bad(f"prompt_lengths must be a list of integers, got {type(value).__name__}")
    for i, p in enumerate(value):
        if not isinstance(p, int) or isinstance(p, bool):
            raise bad(f"prompt_lengths[{i}] must be an integer, got {type(p).__name__}")
    return value


def _sequences(value, vocab: int, limits: Limits, name: str = "sequences") -> list[np.ndarray]:
    if not isinstance(value, list):
        raise bad(f"{name} must be a list of token-id lists, got {type(value).__name__}")
    if len(value) > limits.max_request_seqs:
        raise RequestError(413, f"{len(value)} sequences exceed the per-request limit of {limits.max_request_seqs}")
    return [_id_row(row, f"{name}[{i}]", vocab) for i, row in enumerate(value)]


SCORE_FIELDS = {"sequences", "prompt_lengths", "topk", "query_ids", "temperature", "logprob_dtype", "wire_version",
                "hidden_dtype"}


def score_batch_from_json(obj: dict, vocab: int, limits: Limits) -> tuple[Batch, ReplyFormat]:
    """/v1/score JSON body: {sequences, prompt_lengths, topk?, query_ids?, temperature?, logprob_dtype?,
    hidden_dtype?, wire_version?}, or the base64 wire form (an object with "protege_wire")."""
    if "protege_wire" in obj:
        if not isinstance(obj["protege_wire"], int) or isinstance(obj["protege_wire"], bool):
            raise bad(f"protege_wire must be an integer wire version ({', '.join(map(str, READ_VERSIONS))}), "
                      f"got {type(obj['protege_wire']).__name__} {str(obj['protege_wire'])[:40]}")
        try:
            version, meta, arrays = read_json_dict(obj)
        except WireError as exc:
            raise bad(str(exc)) from None
        return score_batch_from_wire(meta, arrays, vocab, limits, version)
    check_keys(obj, SCORE_FIELDS, "the score request")
    version = obj.get("wire_version", VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version not in READ_VERSIONS:
        raise bad(f"wire_version must be one of {', '.join(map(str, READ_VERSIONS))}, got {str(version)[:40]}")
    reply = get_reply_format(obj, version)
    for key in ("sequences", "prompt_lengths"):
        if key not in obj:
            raise bad(f"missing field {key!r}")
    sequences = _sequences(obj["sequences"], vocab, limits)
    prompt_lengths = _prompt_lengths(obj["prompt_lengths"])
    check_rows(sequences, prompt_lengths, limits)
    topk = get_int(obj, "topk", 0, 0, min(limits.max_k, vocab), " (--max-k)")
    temperature = get_temperature(obj)
    query = None
    if obj.get("query_ids") is not None:
        rows = obj["query_ids"]
        if not isinstance(rows, list) or len(rows) != len(sequences):
            raise bad(f"query_ids must be a list with one entry per sequence ({len(sequences)})")
        query = [_id_row(r, f"query_ids[{i}]", vocab, ndim=2) for i, r in enumerate(rows)]
        _check_query_shapes(query, sequences, prompt_lengths, limits)
    return Batch(sequences=sequences, prompt_lengths=prompt_lengths, topk=topk, query_ids=query,
                 temperature=temperature, hidden=reply.hidden_dtype is not None), reply


def _check_query_shapes(query: list[np.ndarray], sequences, prompt_lengths, limits: Limits) -> None:
    m = query[0].shape[1]
    if not 1 <= m <= limits.max_query_ids:
        raise bad(f"query_ids width {m} is out of range [1, {limits.max_query_ids}] (--max-query-ids)")
    for i, (q, s, p) in enumerate(zip(query, sequences, prompt_lengths)):
        if q.shape != (len(s) - p, m):
            raise bad(f"query_ids[{i}] has shape {list(q.shape)}; expected [{len(s) - p}, {m}] "
                      "(one list of M ids per completion position, the same M for every row)")


def score_batch_from_binary(body: bytes, vocab: int, limits: Limits) -> tuple[Batch, ReplyFormat]:
    try:
        version, meta, arrays = read_binary(body)
    except WireError as exc:
        raise bad(str(exc)) from None
    return score_batch_from_wire(meta, arrays, vocab, limits, version)


def score_batch_from_wire(meta: dict, arrays: dict[str, np.ndarray], vocab: int, limits: Limits,
                          version: int = VERSION) -> tuple[Batch, ReplyFormat]:
    """Arrays tokens (S,), sequence_lengths (N,), prompt_lengths (N,), query_ids (C, M)?; meta topk,
    temperature, logprob_dtype?, hidden_dtype? (integer arrays: i4, or u2 from version 2)."""
    check_keys(meta, {"topk", "temperature", "logprob_dtype", "hidden_dtype"}, "the request meta")
    check_keys(arrays, {"tokens", "sequence_lengths", "prompt_lengths", "query_ids"}, "the request arrays")
    reply = get_reply_format(meta, version)
    for key in ("tokens", "sequence_lengths", "prompt_lengths"):
        if key not in arrays:
            raise bad(f"missing array {key!r}")
        if arrays[key].dtype.kind not in "iu" or arrays[key].ndim != 1:
            raise bad(f"array {key} must be 1-D integers (i4, or u2), got {arrays[key].dtype} with shape "
                      f"{list(arrays[key].shape)}")
    tokens, lengths, plens = (arrays[k].astype(np.int32, copy=False)
                              for k in ("tokens", "sequence_lengths", "prompt_lengths"))
    if len(lengths) > limits.max_request_seqs:
        raise RequestError(413, f"{len(lengths)} sequences exceed the per-request limit of {limits.max_request_seqs}")
    if len(lengths) and lengths.min() < 1:
        raise bad("sequence_lengths must all be >= 1")
    if int(lengths.sum(dtype=np.int64)) != len(tokens):
        raise bad(f"sequence_lengths sum to {int(lengths.sum(dtype=np.int64))} but tokens holds {len(tokens)}")
    check_ids(tokens, "tokens", vocab)
    sequences = np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else []
    prompt_lengths = plens.tolist()
    check_rows(sequences, prompt_lengths, limits)
    topk = get_int(meta, "topk", 0, 0, min(limits.max_k, vocab), " (--max-k)")
    temperature = get_temperature(meta)
    query = None
    if "query_ids" in arrays:
        q = arrays["query_ids"]
        completion = int((lengths - plens).sum(dtype=np.int64))
        if q.dtype.kind not in "iu" or q.ndim != 2 or q.shape[0] != completion:
            raise bad(f"array query_ids must be integers (i4, or u2) of shape [{completion}, M] (one row per "
                      f"completion position), got {q.dtype} {list(q.shape)}")
        if not 1 <= q.shape[1] <= limits.max_query_ids:
            raise bad(f"query_ids width {q.shape[1]} is out of range [1, {limits.max_query_ids}] (--max-query-ids)")
        check_ids(q, "query_ids", vocab)
        query = np.split(q.astype(np.int32, copy=False), np.cumsum(lengths - plens)[:-1])
    return Batch(sequences=sequences, prompt_lengths=prompt_lengths, topk=topk, query_ids=query,
                 temperature=temperature, hidden=reply.hidden_dtype is not None), reply


TRL_FIELDS = {"sequences", "prompt_lengths", "top_logprobs", "temperature", "response_format"}


def trl_batch_from_json(obj: dict, vocab: int, limits: Limits) -> tuple[Batch, str]:
    """TRL 1.3-1.8 /get_sequence_logprobs/: {sequences, prompt_lengths, top_logprobs=100,
    temperature=1.0, response_format="json"|"binary"}. A prompt may take the whole sequence there."""
    check_keys(obj, TRL_FIELDS, "the get_sequence_logprobs request")
    for key in ("sequences", "prompt_lengths"):
        if key not in obj:
            raise bad(f"missing field {key!r}")
    sequences = _sequences(obj["sequences"], vocab, limits)
    prompt_lengths = _prompt_lengths(obj["prompt_lengths"])
    check_rows(sequences, prompt_lengths, limits, allow_empty_completion=True)
    topk = get_int(obj, "top_logprobs", 100, 0, min(limits.max_k, vocab), " (--max-k)")
    fmt = obj.get("response_format", "json")
    if fmt not in ("json", "binary"):
        raise bad(f"response_format must be 'json' or 'binary', got {str(fmt)[:40]!r}")
    return Batch(sequences=sequences, prompt_lengths=prompt_lengths, topk=topk,
                 temperature=get_temperature(obj)), fmt


def openai_batch_from_json(obj: dict, vocab: int, limits: Limits, model_name: str) -> tuple[Batch, int | None]:
    """vLLM's POST /v1/completions, the scoring subset TRL 1.16 uses: token-id prompts, max_tokens <= 1,
    prompt_logprobs k. Every position after the first is scored (prompt length 1), plus one extra
    position after the end that gives the (greedy) generated token. Returns (batch, k or None)."""
    model = obj.get("model")
    if model is not None and model != model_name:
        raise RequestError(404, f"model {str(model)[:80]!r} is not served here; this server serves {model_name!r}")
    for key, ok, why in (("n", lambda v: v in (None, 1), "only n=1 is served"),
                         ("stream", lambda v: not v, "streaming is not served"),
                         ("logprobs", lambda v: v in (None, 0), "use prompt_logprobs; generated-token "
                                                                "logprobs are not served")):
        if not ok(obj.get(key)):
            raise bad(f"{key}={str(obj.get(key))[:40]}: {why}")
    max_tokens = obj.get("max_tokens", 1)
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens != 1):
        raise bad(f"max_tokens={str(max_tokens)[:40]}: this server scores sequences and generates exactly one "
                  "(greedy) token; send max_tokens=1")
    prompt = obj.get("prompt")
    if prompt is None:
        raise bad("missing field 'prompt' (a list of token-id lists)")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
        raise bad("prompt must be token ids (a list of token-id lists); text prompts are not served")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    rows = _sequences(prompt, vocab, limits, "prompt")
    k = obj.get("prompt_logprobs")
    if k is not None:
        k = get_int(obj, "prompt_logprobs", None, 0, min(limits.max_k, vocab),
                    " (--max-k; -1, the full vocabulary, is not served)")
    temperature = get_temperature(obj, allow_zero=True) or 1.0  # 0 = greedy: logprobs at temperature 1
    sequences = [np.append(r, np.int32(0)) for r in rows]  # one dummy position: the next-token distribution
    check_rows(sequences, [1] * len(sequences), limits)
    return Batch(sequences=sequences, prompt_lengths=[1] * len(sequences), topk=max(k or 0, 1),
                 temperature=temperature), k
