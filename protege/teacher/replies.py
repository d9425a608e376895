"""Checks on a teacher server's reply, before any of it can reach a loss (and the small readers
RemoteTeacher uses for server facts: a JSON object reply, a model's vocab_size from its config.json).

A reply that parses can still be wrong: a proxy that rewrites bytes, a server bug, a server that
runs another model. RemoteTeacher runs every /v1/score (protocol "protege") and /v1/completions
(protocol "openai") reply through these checks; a failed check raises `InvalidReply` naming the
field, which the client treats like a 5xx (retried, on another replica when there is one) and,
when the retries run out, turns into `TeacherReplyError` naming the URL. Nothing unchecked is
returned.

What a reply must be (vectorised checks, no Python loop over elements):

- shapes exactly as asked: completion_lengths equal to the rows' completion lengths (n,),
  token_logprobs (n, T), topk_ids / topk_logprobs (n, T, k), query_logprobs (n, T, M), where T
  is the longest completion of the chunk; the openai reply holds one choice per prompt, one
  prompt_logprobs entry per prompt token, holding the prompt's own token and one token of each
  rank 1..k (k or k + 1 tokens: vLLM's layout);
- logprobs: finite or -inf, and <= LOGPROB_TOL = 1e-4 (a log-probability is <= 0; the slack covers
  float32 rounding of log_softmax, ~1e-7, and float16's rounding near 0, < 6e-8); NaN and +inf fail;
- top-k: ids in [0, vocab_size), and the k probabilities sum to at most 1 + mass_tol (the top k of
  a distribution cannot hold more than all of it; mass_tol 1e-3 for float32, 1e-2 for float16
  logprobs, whose relative error of 2^-11 moves a sum of probabilities by at most 2^-11 * entropy);
- protocol "protege": the reply is in the wire version asked for (version 3 carries a crc32 that
  protege.wire verifies, so flipped or truncated bytes never decode into numbers);
- hidden states (when asked): (n, T, H) with H the teacher projection's width, in the dtype asked
  for (float32, float16 or bfloat16), every value finite (the reply's projection hash is checked by
  protege.teacher.projection).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import orjson
import torch

from protege import wire

LOGPROB_TOL = 1e-4
MASS_TOL = {"float32": 1e-3, "float16": 1e-2}


class InvalidReply(ValueError):
    """One reply failed a check; `field` names the part that is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class TeacherReplyError(ValueError):
    """A teacher server's replies kept failing the checks: the run stops instead of training on them."""

    def __init__(self, url: str, error: InvalidReply, replies: int):
        what = " ".join(str(error).split())  # one line
        super().__init__(
            f"teacher server {url} sent an invalid reply ({what}); {replies} repl{'y' if replies == 1 else 'ies'} "
            "failed the checks, so the run stops instead of training on them. Check that the server runs the "
            "teacher you meant (same vocabulary as the student; teacher.vocab_size if you set it) and what sits "
            "between it and this machine (a proxy, a load balancer).")
        self.url, self.field = url, error.field


def expected_shapes(lengths: list[int], k: int, m: int | None, hidden_size: int | None = None) -> dict[str, tuple]:
    """The arrays a score reply for rows of completion `lengths` must hold, with their shapes."""
    n, t = len(lengths), max(lengths)
    shapes = {"completion_lengths": (n,), "token_logprobs": (n, t)}
    if hidden_size is not None:
        shapes["hidden_states"] = (n, t, hidden_size)
    if k:
        shapes["topk_ids"] = shapes["topk_logprobs"] = (n, t, k)
    if m is not None:
        shapes["query_logprobs"] = (n, t, m)
    return shapes


def check_score_reply(version: int, tensors: dict[str, torch.Tensor], *, asked_version: int, lengths: list[int],
                      k: int, m: int | None, vocab_size: int, logprob_dtype: str,
                      hidden: tuple[int, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """The arrays of a decoded /v1/score reply, after every check above (InvalidReply otherwise).
    hidden: (H, dtype) of the hidden states asked for, or None."""
    if version != asked_version:
        raise InvalidReply("version", f"asked for wire version {asked_version}, the reply is version {version}")
    shapes = expected_shapes(lengths, k, m, None if hidden is None else hidden[0])
    for name, shape in shapes.items():
        if name not in tensors:
            raise InvalidReply(name, f"missing from the reply (it holds {sorted(tensors)})")
        if tuple(tensors[name].shape) != shape:
            raise InvalidReply(name, f"has shape {list(tensors[name].shape)}; asked for {list(shape)}")
    got = tensors["completion_lengths"]
    if not torch.equal(got, torch.tensor(lengths, dtype=got.dtype)):
        raise InvalidReply("completion_lengths", f"{got.tolist()[:8]} for rows of {lengths[:8]} completion tokens")
    out = {name: tensors[name] for name in shapes}
    check_values(out, lengths, vocab_size, MASS_TOL[logprob_dtype])
    if hidden is not None:
        check_hidden(out["hidden_states"], hidden[1])
    return out


def check_hidden(x: torch.Tensor, dtype: torch.dtype) -> None:
    """Hidden states in the dtype asked for, every value finite (NaN or inf: InvalidReply)."""
    if x.dtype != dtype:
        raise InvalidReply("hidden_states", f"came as {x.dtype}; asked for {dtype}")
    _fail_where("hidden_states", ~torch.isfinite(x), x, "not finite (NaN or inf)")


def check_values(arrays: dict[str, torch.Tensor], lengths: list[int], vocab_size: int, mass_tol: float) -> None:
    """Logprobs finite or -inf and <= LOGPROB_TOL and top-k ids in the vocabulary (padding included: it
    is 0); top-k mass <= 1 + mass_tol at the first lengths[i] positions of row i (the real ones)."""
    for name in ("token_logprobs", "topk_logprobs", "query_logprobs"):
        if name in arrays:
            x = arrays[name]
            _fail_where(name, torch.isnan(x) | (x > LOGPROB_TOL), x, "not a log-probability (NaN, +inf or > 0)")
    if "topk_ids" in arrays:
        ids = arrays["topk_ids"]
        _fail_where("topk_ids", (ids < 0) | (ids >= vocab_size), ids, f"outside the vocabulary [0, {vocab_size})")
        mass = torch.logsumexp(arrays["topk_logprobs"].double(), dim=-1).exp()  # (n, T)
        real = torch.arange(mass.shape[1])[None, :] < torch.tensor(lengths)[:, None]  # (n, T)
        _fail_where("topk_logprobs", real & (mass > 1 + mass_tol), mass, "the top-k probabilities sum to more than 1")


def _fail_where(name: str, bad: torch.Tensor, values: torch.Tensor, what: str) -> None:
    if bool(bad.any()):
        where = tuple(bad.nonzero()[0].tolist())
        raise InvalidReply(name, f"{int(bad.sum())} value(s) {what}, e.g. {values[where].item()} at {list(where)}")


def decode_score_reply(body: bytes, content_type: str, *, with_meta: bool = False) -> tuple:
    """(wire version, tensors) of a /v1/score reply body, or (version, meta, tensors) `with_meta`;
    InvalidReply when it is not a readable one."""
    media = content_type.split(";")[0].strip().lower()
    if media not in (wire.BINARY_MEDIA_TYPE, wire.JSON_MEDIA_TYPE):
        raise InvalidReply("content-type", f"{content_type!r} is not a protege score reply (it starts "
                                           f"{bytes(body[:60])!r}); is this a protege teacher server?")
    try:
        version, meta, tensors = wire.read_score_response(body, content_type)
    except wire.WireError as exc:
        raise InvalidReply(exc.field, exc.message) from None
    return (version, meta, tensors) if with_meta else (version, tensors)


def error_message(response) -> str:
    """The message of a server's error reply: {"error": "..."} or {"error": {"message": ...}}, else its text."""
    try:
        body = orjson.loads(response.content)
        if isinstance(body, dict) and "error" in body:
            error = body["error"]
            return error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except orjson.JSONDecodeError:
        pass
    return response.text[:500]


RETRY_AFTER_CAP_S = 60.0  # the longest one Retry-After wait (also at most teacher.max_wait_s and the budget left)


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header as the server wrote them (inf, nan and negatives included:
    `retry_wait` judges them); None when absent or not a number."""
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def retry_wait(asked: float | None, backoff: float, left_s: float, max_wait_s: float) -> tuple[float, str]:
    """(seconds to wait before the next attempt, a note when the server's Retry-After was not obeyed as is).

    No Retry-After: `backoff`. A Retry-After that is not a number >= 0 (nan, negative): `backoff`,
    noted. A finite one: min(asked, cap) with cap = min(RETRY_AFTER_CAP_S, max_wait_s), noted when
    capped (inf and 1e9 included), so a busy server that asks for an absurd wait is retried within
    the budget instead of ending it on the first answer. Never more than `left_s`, the budget left.
    """
    if asked is None:
        return backoff, ""
    if not asked >= 0:  # nan or negative
        return min(backoff, left_s), f"the server asked for Retry-After: {asked:g} s, not a wait: backed off {backoff:.2f} s"
    cap = min(RETRY_AFTER_CAP_S, max_wait_s)
    wait = min(asked, cap, left_s)
    note = "" if asked <= cap else (f"the server asked for Retry-After: {asked:g} s; waited {wait:.1f} s (capped at "
                                     f"min({RETRY_AFTER_CAP_S:g} s, teacher.max_wait_s))")
    return max(0.0, wait), note


def json_object(body: bytes) -> dict:
    """A reply body that must be a JSON object (/v1/info, /v1/models); InvalidReply otherwise."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidReply("body", f"not JSON: it starts {bytes(body[:60])!r}") from None
    if not isinstance(obj, dict):
        raise InvalidReply("body", f"not a JSON object: {str(obj)[:60]}")
    return obj


def local_vocab_size(name: str | None) -> int | None:
    """`vocab_size` (the logits' width) from the config.json of model `name`, when that is a local
    directory or a hub id already in the local Hugging Face cache (nothing is downloaded); else None."""
    if not name:
        return None
    try:
        path = Path(name) / "config.json"
        if not path.is_file():
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
            path = Path(cached) if isinstance(cached, str) else None
        config = json.loads(path.read_text()) if path is not None else {}
    except Exception:  # noqa: BLE001 - any unreadable name simply gives no answer
        return None
    value = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


# ---------------------------------------------------------------------------------------------
# protocol "openai": vLLM's /v1/completions with prompt_logprobs, parsed and checked.
# ---------------------------------------------------------------------------------------------

def parse_completions_reply(body: bytes, sequences: list[np.ndarray], prompt_lengths: list[int], k: int,
                            vocab_size: int) -> dict[str, torch.Tensor]:
    """(n, T) token logprobs and (n, T, k) top-k ids / logprobs of the completion positions, from a
    /v1/completions reply with prompt_logprobs=k for `sequences` (InvalidReply when it is not one).
    JSON has no -inf: vLLM sends -9999.0, kept as is; a null logprob reads as -inf."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidReply("body", f"not JSON ({exc}); it starts {bytes(body[:60])!r}") from None
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or len(choices) != len(sequences):
        got = f"{len(choices)} choices" if isinstance(choices, list) else f"no 'choices' list in {str(obj)[:80]!r}"
        raise InvalidReply("choices", f"{got} for {len(sequences)} prompts")
    lengths = [len(s) - p for s, p in zip(sequences, prompt_lengths)]
    n, t = len(sequences), max(lengths)
    token_lp = np.zeros((n, t), np.float32)  # (n, T)
    topk_ids = np.zeros((n, t, k), np.int64)  # (n, T, K)
    topk_lp = np.zeros((n, t, k), np.float32)
    for r, (choice, seq, p) in enumerate(zip(choices, sequences, prompt_lengths)):
        entries = choice.get("prompt_logprobs") if isinstance(choice, dict) else None
        if not isinstance(entries, list) or len(entries) != len(seq):
            got = f"{len(entries)} entries" if isinstance(entries, list) else f"{str(entries)[:40]!r}"
            raise InvalidReply(f"choices[{r}].prompt_logprobs", f"{got} for a prompt of {len(seq)} tokens")
        for pos in range(p, len(seq)):
            actual, best = _read_position(entries[pos], int(seq[pos]), k, f"choices[{r}].prompt_logprobs[{pos}]")
            token_lp[r, pos - p] = actual
            if k:
                topk_ids[r, pos - p] = [tid for _, tid, _ in best]
                topk_lp[r, pos - p] = [lp for _, _, lp in best]
    out = {"token_logprobs": torch.from_numpy(token_lp)}
    if k:
        out["topk_ids"], out["topk_logprobs"] = torch.from_numpy(topk_ids), torch.from_numpy(topk_lp)
    check_values(out, lengths, vocab_size, MASS_TOL["float32"])
    return out


def _read_position(entry, actual: int, k: int, where: str) -> tuple[float, list[tuple[int, int, float]]]:
    """(logprob of the prompt's token, the k entries of lowest rank as (rank, id, logprob))."""
    if not isinstance(entry, dict) or str(actual) not in entry:
        raise InvalidReply(where, f"holds no logprob for the prompt's token {actual}: {str(entry)[:80]}")
    items = []
    for key, value in entry.items():
        lp, rank = (value.get("logprob"), value.get("rank")) if isinstance(value, dict) else (None, None)
        if (not isinstance(rank, int) or isinstance(rank, bool) or not key.lstrip("-").isdigit()
                or not (lp is None or (isinstance(lp, (int, float)) and not isinstance(lp, bool)))):
            raise InvalidReply(where, f"entry {key!r}: {str(value)[:80]} is not {{token id: {{logprob, rank}}}}")
        items.append((rank, int(key), -math.inf if lp is None else float(lp)))
    if not k <= len(items) <= k + 1:
        raise InvalidReply(where, f"holds {len(items)} tokens; asked for the top {k} (plus the prompt's token)")
    missing = sorted(set(range(1, k + 1)) - {rank for rank, _, _ in items})
    if missing:
        raise InvalidReply(where, f"has no token of rank {missing[0]}; asked for the top {k}")
    return float(items[[tid for _, tid, _ in items].index(actual)][2]), sorted(items)[:k]
