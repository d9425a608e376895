"""The teacher server's payload codec: the one place that knows how arrays travel on the wire.

The container (a JSON `meta` plus named little-endian arrays, binary or base64-JSON, wire versions
1-3, version 3 under a crc32) is documented and implemented in protege.wire_container and re-exported
here. This module adds the documents built on it: the /v1/score request and reply (`encode_score_request`,
`encode_score_response`, `read_score_response` ...). Only protege's own format lives here; the formats
of others (TRL's base64 reply, vLLM's JSON) are in protege.server.compat.
"""

from __future__ import annotations

import numpy as np
import orjson
import torch

from protege.wire_container import (BINARY_MEDIA_TYPE, CHECKSUM_VERSION, FP16_MAX, JSON_MEDIA_TYPE,
                                    LOGPROB_DTYPES, MAGIC, READ_VERSIONS, UINT16_VOCAB, VERSION, VERSION_DTYPES,
                                    WireError, decode, from_json_dict, pack, read, read_binary, read_json_dict,
                                    to_float16, to_json_dict, unpack)

__all__ = [  # the container's names, re-exported, and this module's documents
    "BINARY_MEDIA_TYPE", "CHECKSUM_VERSION", "FP16_MAX", "JSON_MEDIA_TYPE", "LOGPROB_DTYPES", "MAGIC", "READ_VERSIONS",
    "UINT16_VOCAB", "VERSION", "VERSION_DTYPES", "WireError", "decode", "from_json_dict", "pack", "read",
    "read_binary", "read_json_dict", "to_float16", "to_json_dict", "unpack",
    "encode_score_request", "score_response_dtypes", "encode_score_response", "read_score_response",
    "decode_score_response"]

# ---------------------------------------------------------------------------------------------
# Score documents (POST /v1/score).
# ---------------------------------------------------------------------------------------------
# Request arrays, ragged rows packed without padding:
#   tokens           (S,) u2|i4   all sequences (prompt + completion) concatenated
#   sequence_lengths (N,) i4
#   prompt_lengths   (N,) i4      completion of row i = its tokens after prompt_lengths[i]
#   query_ids        (C, M) u2|i4 optional; C = sum of completion lengths, rows in order
# Request meta: {"topk": int, "temperature": float, "logprob_dtype": "float32"|"float16" (v2, optional)}
# (ids go as u2 when they all fit, i4 otherwise; version 1 requests are i4 only)
# Response arrays, padded to T = longest completion (padding is 0), in the request's version:
#   completion_lengths (N,) i4, token_logprobs (N, T) f4|f2,
#   topk_ids (N, T, K) u2|i4, topk_logprobs (N, T, K) f4|f2, query_logprobs (N, T, M) f4|f2 (when asked)

_LOGPROB_ARRAYS = ("token_logprobs", "topk_logprobs", "query_logprobs")


def _ids_code(ids: np.ndarray, version: int) -> str:
    return "u2" if version >= 2 and (ids.size == 0 or (ids.min() >= 0 and ids.max() <= 0xFFFF)) else "i4"


def encode_score_request(sequences: list[np.ndarray], prompt_lengths: list[int], *, topk: int = 0,
                         temperature: float = 1.0, query_ids: np.ndarray | None = None,
                         logprob_dtype: str = "float32", version: int = VERSION) -> bytes:
    """Binary body of a score request. query_ids: (sum of completion lengths, M) or None.
    The reply comes in `version`; logprob_dtype "float16" (version 2) halves its logprob bytes."""
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"logprob_dtype={logprob_dtype!r}: use one of {sorted(LOGPROB_DTYPES)}")
    if logprob_dtype != "float32" and version < 2:
        raise ValueError(f"logprob_dtype={logprob_dtype!r} needs wire version 2 (writing version {version})")
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int32, count=len(sequences))
    tokens = np.concatenate(sequences) if sequences else np.zeros(0, np.int32)  # (S,)
    arrays = {"tokens": tokens, "sequence_lengths": lengths, "prompt_lengths": np.asarray(prompt_lengths),
              "query_ids": query_ids}
    dtypes = {"tokens": _ids_code(tokens, version)}
    if query_ids is not None:
        dtypes["query_ids"] = _ids_code(np.asarray(query_ids), version)
    meta = {"topk": int(topk), "temperature": float(temperature)}
    if logprob_dtype != "float32":
        meta["logprob_dtype"] = logprob_dtype
    return pack(meta, arrays, dtypes=dtypes, version=version)


def score_response_dtypes(vocab_size: int | None, logprob_dtype: str = "float32",
                          version: int = VERSION) -> dict[str, str]:
    """Wire dtype of each score-response array: ids u2 when the vocabulary fits 16 bits (v2), else i4;
    logprobs f4, or f2 for logprob_dtype="float16" (v2 only)."""
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"logprob_dtype={logprob_dtype!r}: use one of {sorted(LOGPROB_DTYPES)}")
    if version < 2:
        if logprob_dtype != "float32":
            raise ValueError(f"logprob_dtype={logprob_dtype!r} needs wire version 2")
        return {}
    lp = LOGPROB_DTYPES[logprob_dtype]
    ids = "u2" if vocab_size is not None and 0 < vocab_size <= UINT16_VOCAB else "i4"
    return {"completion_lengths": "i4", "topk_ids": ids, **{name: lp for name in _LOGPROB_ARRAYS}}


def encode_score_response(result: dict[str, np.ndarray], meta: dict, *, binary: bool, vocab_size: int | None = None,
                          logprob_dtype: str = "float32", version: int = VERSION) -> bytes:
    """Binary or base64-JSON body of a score response from the padded result arrays.
    vocab_size: the model's; ids travel as uint16 when it is <= 65536 (None: int32)."""
    dtypes = score_response_dtypes(vocab_size, logprob_dtype, version)
    if binary:
        return pack(meta, result, dtypes=dtypes, version=version)
    return orjson.dumps(to_json_dict(meta, result, dtypes=dtypes, version=version))


def read_score_response(body: bytes | bytearray, content_type: str) -> tuple[int, dict, dict[str, torch.Tensor]]:
    """(version, meta, tensors) of a score response (any readable version): float32 logprobs (float16
    widened), int64 ids and completion_lengths (uint16 / int32 widened)."""
    if content_type.split(";")[0].strip().lower() == BINARY_MEDIA_TYPE and isinstance(body, bytes):
        body = bytearray(body)  # one memcpy, so torch gets writable memory (no read-only warning)
    version, meta, arrays = read(body, content_type)
    # widened in numpy: single-threaded, so no thread-pool wake-up for a small copy
    tensors = {name: torch.from_numpy(_widen(a)) for name, a in arrays.items()}
    return version, meta, tensors


def decode_score_response(body: bytes | bytearray, content_type: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of a score response; see `read_score_response`."""
    _, meta, tensors = read_score_response(body, content_type)
    return meta, tensors


def _widen(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    if array.dtype.itemsize < 4:
        return array.astype(np.float32)
    return array
