"""The teacher server's payload codec: the one place that knows how arrays travel on the wire.

The container (a JSON `meta` plus named little-endian arrays, binary or base64-JSON, wire versions
1-3, version 3 under a crc32) is documented and implemented in protege.wire_container and re-exported
here. This module adds the documents built on it: the /v1/score request and reply (`encode_score_request`,
`encode_score_response`, `read_score_response` ...). Only protege's own format lives here; the formats
of others (TRL's base64 reply, vLLM's JSON) are in protege.server.compat.
"""

from __future__ import annotations

import hashlib

import numpy as np
import orjson
import torch

from protege.wire_container import (BF16, BINARY_MEDIA_TYPE, CHECKSUM_VERSION, FP16_MAX, JSON_MEDIA_TYPE,
                                    LOGPROB_DTYPES, MAGIC, READ_VERSIONS, UINT16_VOCAB, VERSION, VERSION_DTYPES,
                                    WireError, bfloat16_to_float32, decode, from_json_dict, pack, pack_parts, read,
                                    read_binary, read_json_dict, to_bfloat16, to_float16, to_json_dict, to_tensor,
                                    unpack)

__all__ = [  # the container's names, re-exported, and this module's documents
    "BF16", "BINARY_MEDIA_TYPE", "CHECKSUM_VERSION", "FP16_MAX", "JSON_MEDIA_TYPE", "LOGPROB_DTYPES", "MAGIC",
    "READ_VERSIONS", "UINT16_VOCAB", "VERSION", "VERSION_DTYPES", "WireError", "bfloat16_to_float32", "decode",
    "from_json_dict", "pack", "pack_parts", "read", "read_binary", "read_json_dict", "to_bfloat16", "to_float16",
    "to_json_dict", "to_tensor", "unpack",
    "HIDDEN_DTYPES", "HIDDEN_VERSION", "encode_score_request", "score_response_dtypes", "encode_score_response",
    "read_score_response", "decode_score_response", "projection_sha256", "encode_projection", "read_projection"]

# ---------------------------------------------------------------------------------------------
# Score documents (POST /v1/score).
# ---------------------------------------------------------------------------------------------
# Request arrays, ragged rows packed without padding:
#   tokens           (S,) u2|i4   all sequences (prompt + completion) concatenated
#   sequence_lengths (N,) i4
#   prompt_lengths   (N,) i4      completion of row i = its tokens after prompt_lengths[i]
#   query_ids        (C, M) u2|i4 optional; C = sum of completion lengths, rows in order
# Request meta: {"topk": int, "temperature": float, "logprob_dtype": "float32"|"float16" (v2, optional),
#                "hidden_dtype": "float32"|"float16"|"bfloat16" (v3, optional: ask for hidden states)}
# (ids go as u2 when they all fit, i4 otherwise; version 1 requests are i4 only)
# Response arrays, padded to T = longest completion (padding is 0), in the request's version:
#   completion_lengths (N,) i4, token_logprobs (N, T) f4|f2,
#   topk_ids (N, T, K) u2|i4, topk_logprobs (N, T, K) f4|f2, query_logprobs (N, T, M) f4|f2 (when asked)
#   hidden_states (N, T, H) f4|f2|b2 (when hidden_dtype is asked): the teacher's final hidden states
#     (after the final norm) at the positions that predict each completion token; with them the meta
#     holds "projection_sha256", the hash of the output projection that turns them into logits
#     (GET /v1/output_projection, protege.server.projection).

_LOGPROB_ARRAYS = ("token_logprobs", "topk_logprobs", "query_logprobs")
HIDDEN_DTYPES = {"float32": "f4", "float16": "f2", "bfloat16": "b2"}  # request meta "hidden_dtype" -> wire dtype
HIDDEN_VERSION = 3  # hidden states travel only under the crc32


def _ids_code(ids: np.ndarray, version: int) -> str:
    return "u2" if version >= 2 and (ids.size == 0 or (ids.min() >= 0 and ids.max() <= 0xFFFF)) else "i4"


def encode_score_request(sequences: list[np.ndarray], prompt_lengths: list[int], *, topk: int = 0,
                         temperature: float = 1.0, query_ids: np.ndarray | None = None,
                         logprob_dtype: str = "float32", version: int = VERSION,
                         hidden_dtype: str | None = None) -> bytes:
    """Binary body of a score request. query_ids: (sum of completion lengths, M) or None.
    The reply comes in `version`; logprob_dtype "float16" (version 2) halves its logprob bytes;
    hidden_dtype (version 3) asks for the teacher's hidden states in that dtype."""
    _check_hidden_dtype(hidden_dtype, version)
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
    if hidden_dtype is not None:
        meta["hidden_dtype"] = hidden_dtype
    return pack(meta, arrays, dtypes=dtypes, version=version)


def _check_hidden_dtype(hidden_dtype: str | None, version: int) -> None:
    if hidden_dtype is None:
        return
    if hidden_dtype not in HIDDEN_DTYPES:
        raise ValueError(f"hidden_dtype={hidden_dtype!r}: use one of {sorted(HIDDEN_DTYPES)}")
    if version < HIDDEN_VERSION:
        raise ValueError(f"hidden_dtype={hidden_dtype!r} needs wire version {HIDDEN_VERSION} "
                         f"(writing version {version})")


def score_response_dtypes(vocab_size: int | None, logprob_dtype: str = "float32",
                          version: int = VERSION, hidden_dtype: str | None = None) -> dict[str, str]:
    """Wire dtype of each score-response array: ids u2 when the vocabulary fits 16 bits (v2), else i4;
    logprobs f4, or f2 for logprob_dtype="float16" (v2 only); hidden states in `hidden_dtype` (v3 only)."""
    _check_hidden_dtype(hidden_dtype, version)
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"logprob_dtype={logprob_dtype!r}: use one of {sorted(LOGPROB_DTYPES)}")
    if version < 2:
        if logprob_dtype != "float32":
            raise ValueError(f"logprob_dtype={logprob_dtype!r} needs wire version 2")
        return {}
    lp = LOGPROB_DTYPES[logprob_dtype]
    ids = "u2" if vocab_size is not None and 0 < vocab_size <= UINT16_VOCAB else "i4"
    hidden = {"hidden_states": HIDDEN_DTYPES[hidden_dtype]} if hidden_dtype else {}
    return {"completion_lengths": "i4", "topk_ids": ids, **{name: lp for name in _LOGPROB_ARRAYS}, **hidden}


def encode_score_response(result: dict[str, np.ndarray], meta: dict, *, binary: bool, vocab_size: int | None = None,
                          logprob_dtype: str = "float32", version: int = VERSION,
                          hidden_dtype: str | None = None) -> bytes:
    """Binary or base64-JSON body of a score response from the padded result arrays.
    vocab_size: the model's; ids travel as uint16 when it is <= 65536 (None: int32)."""
    dtypes = score_response_dtypes(vocab_size, logprob_dtype, version, hidden_dtype)
    if binary:
        return pack(meta, result, dtypes=dtypes, version=version)
    return orjson.dumps(to_json_dict(meta, result, dtypes=dtypes, version=version))


def read_score_response(body: bytes | bytearray, content_type: str) -> tuple[int, dict, dict[str, torch.Tensor]]:
    """(version, meta, tensors) of a score response (any readable version): float32 logprobs (float16
    widened), int64 ids and completion_lengths (uint16 / int32 widened); hidden_states stay in their
    wire dtype (float32, float16 or bfloat16: the loss widens them chunk by chunk)."""
    if content_type.split(";")[0].strip().lower() == BINARY_MEDIA_TYPE and isinstance(body, bytes):
        body = bytearray(body)  # one memcpy, so torch gets writable memory (no read-only warning)
    version, meta, arrays = read(body, content_type)
    # widened in numpy: single-threaded, so no thread-pool wake-up for a small copy
    tensors = {name: to_tensor(a) if name == "hidden_states" else torch.from_numpy(_widen(a))
               for name, a in arrays.items()}
    return version, meta, tensors


def decode_score_response(body: bytes | bytearray, content_type: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of a score response; see `read_score_response`."""
    _, meta, tensors = read_score_response(body, content_type)
    return meta, tensors


def _widen(array: np.ndarray) -> np.ndarray:
    if array.dtype == BF16:
        return bfloat16_to_float32(array)
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    if array.dtype.itemsize < 4:
        return array.astype(np.float32)
    return array


# ---------------------------------------------------------------------------------------------
# The output projection document (GET /v1/output_projection).
# ---------------------------------------------------------------------------------------------
# One array "weight" (V, H): the teacher's lm_head weight in its own dtype (f4 float32, f2 float16,
# b2 bfloat16; other float dtypes go as f4), meta {"sha256": projection_sha256(...), "dtype": code,
# "shape": [V, H]}, wire version 3 (under the crc32). Every hidden-state score reply names the
# sha256 of the projection its hidden states belong to, so a client never mixes two teachers.

_PROJECTION_CODES = {torch.float32: "f4", torch.float16: "f2", torch.bfloat16: "b2"}


def projection_sha256(code: str, shape, data) -> str:
    """Hex sha256 of an output projection: of b"protege-output-projection\0", then f"{code} {V} {H}\0"
    (wire dtype code and shape, ASCII), then the weight's little-endian C-order bytes (`data`)."""
    digest = hashlib.sha256(b"protege-output-projection\0")
    digest.update(f"{code} {' '.join(map(str, shape))}\0".encode("ascii"))
    digest.update(memoryview(data).cast("B"))
    return digest.hexdigest()


def encode_projection(weight: torch.Tensor) -> tuple[list[memoryview], str]:
    """(body pieces to stream, sha256) of the projection document for `weight` (V, H); see `pack_parts`."""
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"an output projection is a 2-D float tensor, got {weight.dtype} {list(weight.shape)}")
    code = _PROJECTION_CODES.get(weight.dtype, "f4")
    tensor = weight.detach().cpu()
    array = to_bfloat16(tensor) if code == "b2" else tensor.to(torch.float32 if code == "f4" else torch.float16).numpy()
    array = np.ascontiguousarray(array)
    sha = projection_sha256(code, array.shape, array)
    meta = {"sha256": sha, "dtype": code, "shape": list(array.shape)}
    return pack_parts(meta, {"weight": array}, dtypes={"weight": code}, version=HIDDEN_VERSION), sha


def read_projection(body: bytes | bytearray) -> tuple[str, torch.Tensor]:
    """(sha256, weight (V, H) in its wire dtype) of a projection document; WireError when the crc32, the
    layout or the sha256 (recomputed from the bytes) is wrong."""
    version, meta, arrays = read_binary(body)
    weight = arrays.get("weight")
    if version < HIDDEN_VERSION or weight is None or weight.ndim != 2:
        raise WireError("weight", f"a version-{HIDDEN_VERSION} body with one 2-D array 'weight' is expected, got "
                                  f"version {version} with {sorted(arrays)}")
    code = {np.dtype("<f4"): "f4", np.dtype("<f2"): "f2", BF16: "b2"}.get(weight.dtype)
    sha, actual = meta.get("sha256"), projection_sha256(code or "?", weight.shape, weight)
    if code is None or actual != sha:
        raise WireError("sha256", f"the projection's bytes hash to {actual} but its meta says {str(sha)[:80]}")
    return sha, to_tensor(weight)
