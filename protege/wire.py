"""The teacher server's payload codec: the one place that knows how arrays travel on the wire.

Two forms carry the same thing, a small JSON header (`meta`) plus named little-endian arrays
(float32 logprobs, int32 token ids):

Binary (`Content-Type: application/octet-stream`), version 1:

    offset  size  field
    0       4     magic b"PRTG"
    4       2     version, uint16 LE (1)
    6       2     flags, uint16 LE (0, reserved)
    8       4     header length H, uint32 LE
    12      H     header, UTF-8 JSON {"meta": {...}, "arrays": [[name, dtype, shape, offset], ...]},
                  space-padded so that the data section starts on an 8-byte boundary
    12+H    ...   data: the arrays back to back, C order, each at its `offset` (from the start of
                  the data section, a multiple of 8); dtype is "f4" (float32) or "i4" (int32)

JSON (`Content-Type: application/json`): {"protege_wire": 1, "meta": {...},
"arrays": {name: {"dtype": "f4", "shape": [...], "b64": "<base64 of the raw bytes>"}}}.

Decoding never loops over elements: `np.frombuffer` views the body and `torch.from_numpy` wraps
the views, so a (B, T, K) reply becomes tensors in one memcpy.

The score request/response documents built on top (`encode_score_request` ...), and TRL 1.3-1.8's
base64 reply of `/get_sequence_logprobs/` (`encode_trl_binary` / `decode_trl_binary`), live here too.
"""

from __future__ import annotations

import base64
import math
import struct

import numpy as np
import orjson
import torch

MAGIC = b"PRTG"
VERSION = 1
BINARY_MEDIA_TYPE = "application/octet-stream"
JSON_MEDIA_TYPE = "application/json"
_PREFIX = struct.Struct("<4sHHI")  # magic, version, flags, header length
_DTYPES = {"f4": np.dtype("<f4"), "i4": np.dtype("<i4")}
_MAX_NDIM = 4


class WireError(ValueError):
    """A payload that does not follow the layout; `field` names the part that is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


# ---------------------------------------------------------------------------------------------
# Container: meta + named arrays, in binary or base64-JSON form.
# ---------------------------------------------------------------------------------------------

def _as_wire_array(name: str, array) -> tuple[str, np.ndarray]:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype.kind == "f":
        code = "f4"
    elif array.dtype.kind in "iub":
        code = "i4"
    else:
        raise TypeError(f"array {name!r}: dtype {array.dtype} cannot go on the wire (float or int only)")
    return code, np.ascontiguousarray(array, dtype=_DTYPES[code])


def pack(meta: dict, arrays: dict[str, object]) -> bytes:
    """Binary form of `meta` plus `arrays` (numpy arrays or tensors; floats -> f4, ints -> i4)."""
    entries, blobs, offset = [], [], 0
    for name, array in arrays.items():
        if array is None:
            continue
        code, array = _as_wire_array(name, array)
        entries.append([name, code, list(array.shape), offset])
        blobs.append((offset, array))
        offset += -(-array.nbytes // 8) * 8
    header = orjson.dumps({"meta": meta, "arrays": entries})
    header += b" " * ((-(_PREFIX.size + len(header))) % 8)
    start = _PREFIX.size + len(header)
    out = bytearray(start + offset)
    out[:start] = _PREFIX.pack(MAGIC, VERSION, 0, len(header)) + header
    view = np.frombuffer(out, dtype=np.uint8)
    for off, array in blobs:
        view[start + off: start + off + array.nbytes] = array.reshape(-1).view(np.uint8)
    return bytes(out)


def unpack(body: bytes | bytearray | memoryview) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) from the binary form. Arrays are views of `body` (writable if it is)."""
    size = len(body)
    if size < _PREFIX.size:
        raise WireError("body", f"{size} bytes is shorter than the {_PREFIX.size}-byte binary prefix")
    magic, version, _flags, header_len = _PREFIX.unpack_from(body, 0)
    if magic != MAGIC:
        raise WireError("magic", f"expected {MAGIC!r}, got {bytes(magic)!r} (not a protege binary payload)")
    if version != VERSION:
        raise WireError("version", f"wire version {version} is not supported; this side speaks {VERSION}")
    start = _PREFIX.size + header_len
    if start > size:
        raise WireError("header", f"header length {header_len} runs past the end of the {size}-byte body")
    try:
        header = orjson.loads(bytes(body[_PREFIX.size:start]))
    except orjson.JSONDecodeError as exc:
        raise WireError("header", f"not valid JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
        raise WireError("header", "must be a JSON object with an 'arrays' list")
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise WireError("meta", "must be a JSON object")
    data_len = size - start
    arrays = {}
    for entry in header["arrays"]:
        if not (isinstance(entry, list) and len(entry) == 4):
            raise WireError("arrays", f"each entry must be [name, dtype, shape, offset], got {entry!r}"[:200])
        name, code, shape, offset = entry
        dtype, shape, count = _check_entry(name, code, shape)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0 or offset % 8:
            raise WireError(f"arrays.{name}.offset", f"must be a non-negative multiple of 8, got {offset!r}")
        if offset + count * dtype.itemsize > data_len:
            raise WireError(f"arrays.{name}", f"truncated: needs bytes {offset}..{offset + count * dtype.itemsize} "
                                              f"of a {data_len}-byte data section")
        arrays[name] = np.frombuffer(body, dtype=dtype, count=count, offset=start + offset).reshape(shape)
    return meta, arrays


def to_json_dict(meta: dict, arrays: dict[str, object]) -> dict:
    """The base64-in-JSON form (a dict ready for orjson.dumps)."""
    out = {}
    for name, array in arrays.items():
        if array is None:
            continue
        code, array = _as_wire_array(name, array)
        out[name] = {"dtype": code, "shape": list(array.shape), "b64": base64.b64encode(array.data).decode("ascii")}
    return {"protege_wire": VERSION, "meta": meta, "arrays": out}


def from_json_dict(obj: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) from the base64-in-JSON form. Arrays are writable (each owns its bytes)."""
    if not isinstance(obj, dict):
        raise WireError("body", "must be a JSON object")
    version = obj.get("protege_wire")
    if version != VERSION:
        raise WireError("protege_wire", f"wire version {version!r} is not supported; this side speaks {VERSION}")
    meta, entries = obj.get("meta", {}), obj.get("arrays")
    if not isinstance(meta, dict):
        raise WireError("meta", "must be a JSON object")
    if not isinstance(entries, dict):
        raise WireError("arrays", "must be a JSON object {name: {dtype, shape, b64}}")
    arrays = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("b64"), str):
            raise WireError(f"arrays.{name}", "must be an object with 'dtype', 'shape' and a 'b64' string")
        dtype, shape, count = _check_entry(name, entry.get("dtype"), entry.get("shape"))
        try:
            raw = bytearray(base64.b64decode(entry["b64"], validate=True))
        except ValueError:
            raise WireError(f"arrays.{name}.b64", "not valid base64") from None
        if len(raw) != count * dtype.itemsize:
            raise WireError(f"arrays.{name}", f"holds {len(raw)} bytes, shape {shape} of {entry['dtype']} "
                                              f"needs {count * dtype.itemsize}")
        arrays[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return meta, arrays


def _check_entry(name, code, shape) -> tuple[np.dtype, tuple[int, ...], int]:
    if not isinstance(name, str) or not name:
        raise WireError("arrays", f"array name must be a non-empty string, got {name!r}"[:200])
    if code not in _DTYPES:
        raise WireError(f"arrays.{name}.dtype", f"must be one of {sorted(_DTYPES)}, got {code!r}"[:200])
    if (not isinstance(shape, list) or len(shape) > _MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise WireError(f"arrays.{name}.shape", f"must be a list of at most {_MAX_NDIM} non-negative ints, "
                                                f"got {shape!r}"[:200])
    return _DTYPES[code], tuple(shape), math.prod(shape)


def decode(body: bytes | bytearray | memoryview, content_type: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Either form, picked by the media type."""
    if content_type.split(";")[0].strip().lower() == BINARY_MEDIA_TYPE:
        return unpack(body)
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise WireError("body", f"not valid JSON ({exc})") from None
    return from_json_dict(obj)


# ---------------------------------------------------------------------------------------------
# Score documents (POST /v1/score).
# ---------------------------------------------------------------------------------------------
# Request arrays, ragged rows packed without padding:
#   tokens           (S,) i4   all sequences (prompt + completion) concatenated
#   sequence_lengths (N,) i4
#   prompt_lengths   (N,) i4   completion of row i = its tokens after prompt_lengths[i]
#   query_ids        (C, M) i4 optional; C = sum of completion lengths, rows in order
# Request meta: {"topk": int, "temperature": float}
# Response arrays, padded to T = longest completion (padding is 0):
#   completion_lengths (N,) i4, token_logprobs (N, T) f4,
#   topk_ids (N, T, K) i4, topk_logprobs (N, T, K) f4, query_logprobs (N, T, M) f4 (when asked)

def encode_score_request(sequences: list[np.ndarray], prompt_lengths: list[int], *, topk: int = 0,
                         temperature: float = 1.0, query_ids: np.ndarray | None = None) -> bytes:
    """Binary body of a score request. query_ids: (sum of completion lengths, M) or None."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int32, count=len(sequences))
    tokens = np.concatenate(sequences) if sequences else np.zeros(0, np.int32)  # (S,)
    arrays = {"tokens": tokens, "sequence_lengths": lengths, "prompt_lengths": np.asarray(prompt_lengths),
              "query_ids": query_ids}
    return pack({"topk": int(topk), "temperature": float(temperature)}, arrays)


def encode_score_response(result: dict[str, np.ndarray], meta: dict, *, binary: bool) -> bytes:
    """Binary or base64-JSON body of a score response from the padded result arrays."""
    if binary:
        return pack(meta, result)
    return orjson.dumps(to_json_dict(meta, result))


def decode_score_response(body: bytes | bytearray, content_type: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of a score response: float32 logprobs, int64 ids, int64 completion_lengths."""
    if content_type.split(";")[0].strip().lower() == BINARY_MEDIA_TYPE and isinstance(body, bytes):
        body = bytearray(body)  # one memcpy, so torch gets writable memory (no read-only warning)
    meta, arrays = decode(body, content_type)
    # int32 -> int64 in numpy: single-threaded, so no thread-pool wake-up for a small copy
    tensors = {name: torch.from_numpy(a.astype(np.int64) if a.dtype.kind == "i" else a) for name, a in arrays.items()}
    return meta, tensors


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
