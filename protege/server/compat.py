"""Replies in the formats TRL already speaks: vLLM's /v1/completions prompt_logprobs, and TRL 1.3-1.8's
/get_sequence_logprobs/ (nested JSON lists, or base64 arrays: `encode_trl_binary` / `decode_trl_binary`).
protege's own wire format is protege.wire; the formats of others live here.

vLLM's prompt_logprobs, which TRL 1.16's VLLMClient.get_sequence_logprobs parses: one entry per
prompt position, None for the first, else {"<token id>": {"logprob", "rank", "decoded_token"}}
holding the top-k and the actual token (first, as vLLM orders it). Ranks are 1-based; inside the
top-k they are exact, an actual token outside the top-k gets rank k+1 (vLLM reports its true rank,
which needs the full vocabulary sorted; every client we know only orders by rank). Logprobs in JSON
are clamped at -9999.0 as vLLM does (JSON has no -inf).
"""

from __future__ import annotations

import base64
import math
import time
import uuid

import numpy as np
import orjson
import torch

from protege.server.batch import Batch, ScoreResult
from protege.wire import WireError

JSON_FLOOR = -9999.0


def _actual_ids(batch: Batch, t: int) -> np.ndarray:
    """(N, t) int32 completion token ids, 0-padded."""
    out = np.zeros((len(batch.sequences), t), dtype=np.int32)
    for i, (s, p) in enumerate(zip(batch.sequences, batch.prompt_lengths)):
        out[i, : len(s) - p] = s[p:]
    return out


def _ranks(topk_ids: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """(N, T) 1-based rank of each actual token within the top-k, k+1 when outside."""
    hit = topk_ids == actual[..., None]  # (N, T, K)
    k = topk_ids.shape[-1]
    return np.where(hit.any(-1), hit.argmax(-1) + 1, k + 1)


class Decoder:
    """Token id -> text for `decoded_token` (None without a tokenizer), cached per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids) -> dict[int, str | None]:
        if self.tokenizer is None:
            return {}
        missing = [int(i) for i in np.unique(np.asarray(ids)) if int(i) not in self.cache]
        if missing:
            texts = self.tokenizer.batch_decode([[i] for i in missing])
            self.cache.update(zip(missing, texts))
        return self.cache


def openai_completion(result: ScoreResult, batch: Batch, k: int | None, model_name: str,
                      decoder: Decoder) -> dict:
    """The /v1/completions reply for a batch built by parse.openai_batch_from_json (prompt length 1
    and one dummy position at the end, whose top-1 is the generated token)."""
    lengths = result["completion_lengths"]  # L_i: positions 1..L_i-1 of the prompt + the next token
    t = int(lengths.max())
    actual = _actual_ids(batch, t)  # (N, T), last real column is the dummy
    topk_ids, topk_lp = result["topk_ids"], np.maximum(result["topk_logprobs"], JSON_FLOOR)
    token_lp = np.maximum(result["token_logprobs"], JSON_FLOOR)
    names = decoder(topk_ids if k is None else np.concatenate([topk_ids.reshape(-1), actual.reshape(-1)]))
    choices, prompt_tokens = [], 0
    for i, n in enumerate(lengths.tolist()):
        prompt_tokens += n
        next_id = int(topk_ids[i, n - 1, 0])
        choice = {"index": i, "text": names.get(next_id, "") or "", "logprobs": None, "finish_reason": "length",
                  "stop_reason": None, "prompt_logprobs": None}
        if k is not None:
            ids, lps = topk_ids[i, : n - 1, :k].tolist(), topk_lp[i, : n - 1, :k].tolist()
            acts, act_lps = actual[i, : n - 1].tolist(), token_lp[i, : n - 1].tolist()
            ranks = _ranks(topk_ids[i, : n - 1, :k], actual[i, : n - 1]).tolist() if k else [1] * (n - 1)
            entries = [None]
            for a, alp, rank, row_ids, row_lps in zip(acts, act_lps, ranks, ids, lps):
                entry = {str(a): {"logprob": alp, "rank": rank, "decoded_token": names.get(a)}}
                for r, (tid, lp) in enumerate(zip(row_ids, row_lps), start=1):
                    if tid != a:
                        entry[str(tid)] = {"logprob": lp, "rank": r, "decoded_token": names.get(tid)}
                entries.append(entry)
            choice["prompt_logprobs"] = entries
        choices.append(choice)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(choices),
                      "total_tokens": prompt_tokens + len(choices)}}


def trl_lists(result: ScoreResult, batch: Batch) -> dict:
    """TRL's response_format="json": per position the top-k sorted by rank, plus the actual token
    last when it is outside the top-k (as vLLM returned it)."""
    lengths = result["completion_lengths"].tolist()
    t = max(lengths) if lengths else 0
    actual = _actual_ids(batch, t)
    k = batch.topk
    ids = result.get("topk_ids", np.zeros((len(lengths), t, 0), np.int32))
    lps = np.maximum(result.get("topk_logprobs", np.zeros((len(lengths), t, 0), np.float32)), JSON_FLOOR)
    token_lp = np.maximum(result["token_logprobs"], JSON_FLOOR)
    inside = (ids == actual[..., None]).any(-1) if k else np.zeros(actual.shape, bool)  # (N, T)
    all_lps, all_ids = [], []
    for i, n in enumerate(lengths):
        row_lps, row_ids = lps[i, :n].tolist(), ids[i, :n].tolist()
        for pos in np.flatnonzero(~inside[i, :n]).tolist():
            row_lps[pos].append(float(token_lp[i, pos]))
            row_ids[pos].append(int(actual[i, pos]))
        all_lps.append(row_lps)
        all_ids.append(row_ids)
    return {"logprobs": all_lps, "logprob_token_ids": all_ids}


def trl_binary(result: ScoreResult, batch: Batch) -> bytes:
    """TRL's response_format="binary" body (-inf / id 0 padding)."""
    lengths = result["completion_lengths"]
    n, t = result["token_logprobs"].shape
    k = batch.topk
    valid = np.arange(t)[None, :] < lengths[:, None]  # (N, T)
    topk_lp = np.where(valid[..., None], result["topk_logprobs"], -np.inf) if k else np.zeros((n, t, 0), np.float32)
    topk_ids = result["topk_ids"] if k else np.zeros((n, t, 0), np.int32)
    token_lp = np.where(valid, result["token_logprobs"], -np.inf)
    return encode_trl_binary(topk_lp, topk_ids, token_lp[..., None], _actual_ids(batch, t)[..., None],
                             lengths.tolist())


# ---------------------------------------------------------------------------------------------
# TRL 1.3-1.8 `/get_sequence_logprobs/` reply, response_format="binary".
# ---------------------------------------------------------------------------------------------
# {"logprobs_b64": f32 (B, T, K), "token_ids_b64": i32 (B, T, K), "actual_logprobs_b64": f32 (B, T, 1),
#  "actual_token_ids_b64": i32 (B, T, 1), "shape": [B, T, K], "completion_lengths": [...]}
# Padding: -inf logprobs and id 0, as TRL's server wrote them.

def encode_trl_binary(topk_logprobs: np.ndarray, topk_ids: np.ndarray, token_logprobs: np.ndarray,
                      token_ids: np.ndarray, completion_lengths: list[int]) -> bytes:
    """JSON body of TRL's binary reply from (B, T, K) top-k and (B, T, 1) actual-token arrays."""
    b, t, k = topk_logprobs.shape
    b64 = lambda a, dt: base64.b64encode(np.ascontiguousarray(a, dtype=dt).data).decode("ascii")  # noqa: E731
    return orjson.dumps({
        "logprobs_b64": b64(topk_logprobs, "<f4"),
        "token_ids_b64": b64(topk_ids, "<i4"),
        "actual_logprobs_b64": b64(token_logprobs, "<f4"),
        "actual_token_ids_b64": b64(token_ids, "<i4"),
        "shape": [b, t, k],
        "completion_lengths": [int(n) for n in completion_lengths],
    })


def decode_trl_binary(obj: dict | bytes) -> dict[str, torch.Tensor]:
    """Tensors from TRL's binary reply: topk_logprobs/topk_ids (B, T, K), token_logprobs/token_ids
    (B, T) (when the reply has them), completion_lengths (B,). ids are int64."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        obj = orjson.loads(obj)
    try:
        shape = [int(d) for d in obj["shape"]]
        lengths = torch.tensor(obj["completion_lengths"], dtype=torch.long)
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError("shape", f"TRL binary reply needs 'shape' and 'completion_lengths' ({exc})") from None
    if len(shape) != 3 or lengths.shape != (shape[0],):
        raise WireError("shape", f"expected [B, T, K] and B completion lengths, got {shape} and {len(lengths)}")

    def field(key: str, dtype: str, dims: list[int]) -> torch.Tensor:
        """float32 as sent (a view); int32 ids widened to int64 in numpy."""
        raw = bytearray(base64.b64decode(obj[key]))
        if len(raw) != math.prod(dims) * 4:
            raise WireError(key, f"holds {len(raw)} bytes, shape {dims} needs {math.prod(dims) * 4}")
        array = np.frombuffer(raw, dtype="<f4" if dtype == "<f4" else "<i4").reshape(dims)
        return torch.from_numpy(array if dtype == "<f4" else array.astype(np.int64))

    out = {"topk_logprobs": field("logprobs_b64", "<f4", shape),
           "topk_ids": field("token_ids_b64", "<i8", shape), "completion_lengths": lengths}
    if "actual_logprobs_b64" in obj:
        out["token_logprobs"] = field("actual_logprobs_b64", "<f4", shape[:2] + [1])[..., 0]
        out["token_ids"] = field("actual_token_ids_b64", "<i8", shape[:2] + [1])[..., 0]
    return out
