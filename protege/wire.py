"""The teacher server's payload codec: the one place that knows how arrays travel on the wire.

Two forms carry the same thing, a small JSON header (`meta`) plus named little-endian arrays whose
dtype the header names, so a decoder never guesses:

Binary (`Content-Type: application/octet-stream`):

    offset  size  field
    0       4     magic b"PRTG"
    4       2     version, uint16 LE (2; 1 is still read, see below)
    6       2     flags, uint16 LE (0, reserved)
    8       4     header length H, uint32 LE
    12      H     header, UTF-8 JSON {"meta": {...}, "arrays": [[name, dtype, shape, offset], ...]},
                  space-padded so that the data section starts on an 8-byte boundary
    12+H    ...   data: the arrays back to back, C order, each at its `offset` (from the start of
                  the data section, a multiple of 8)

JSON (`Content-Type: application/json`): {"protege_wire": 2, "meta": {...},
"arrays": {name: {"dtype": "u2", "shape": [...], "b64": "<base64 of the raw bytes>"}}}.

Versions and dtypes (both forms; a version outside these is refused with a WireError naming it):

    version 1   "f4" float32, "i4" int32
    version 2   adds "u2" uint16 and "f2" float16; the layout is otherwise the same

The server answers in the version the request came in (a v1 client gets f4/i4 replies, as before).
In a version-2 score reply the token ids (`topk_ids`) are uint16 whenever the vocabulary fits
(vocab_size <= 65536; lossless, the default) and int32 otherwise. Logprobs are float32 unless the
request asks for float16 (meta "logprob_dtype": "float16"; `RemoteTeacher(..., logprob_dtype="float16")`).
Bytes per (logprob, id) entry: 8 (v1), 6 (v2 default), 4 (v2 float16).

float16 logprobs, the precision trade: fp16 keeps 11 significant bits (~3.3 decimal digits), so each
value is off by at most 2^-11 ~ 4.9e-4 of itself (|x| >= 6.1e-5; below that, fp16 subnormals, at most
3e-8 absolute). Measured over every float32 in [-30, 0] (numpy's round-to-nearest-even cast): max
abs error 0.0078125 (2^-7, half an fp16 step for |x| in [16, 32)), max relative error 4.88e-4, and
for |x| < 1 max abs error 2.4e-4 (2^-12). -inf (impossible tokens) stays -inf, NaN stays NaN, and
finite values beyond fp16's range (|x| > 65504, e.g. a logprob of -1e5 at a very low temperature)
are clamped to -65504 / 65504 instead of becoming infinite. Decoding widens float16 to float32 (and
u2/i4 ids to int64). Padding stays 0 in every dtype.

Decoding never loops over elements: `np.frombuffer` views the body and `torch.from_numpy` wraps
the views, so a (B, T, K) reply becomes tensors in one memcpy (plus one widening copy for ids and
float16 logprobs).

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
VERSION = 2  # what this side writes
BINARY_MEDIA_TYPE = "application/octet-stream"
JSON_MEDIA_TYPE = "application/json"
_PREFIX = struct.Struct("<4sHHI")  # magic, version, flags, header length
_DTYPES = {"f4": np.dtype("<f4"), "i4": np.dtype("<i4"), "f2": np.dtype("<f2"), "u2": np.dtype("<u2")}
VERSION_DTYPES = {1: ("f4", "i4"), 2: ("f4", "i4", "f2", "u2")}  # every version this side reads
READ_VERSIONS = tuple(sorted(VERSION_DTYPES))
LOGPROB_DTYPES = {"float32": "f4", "float16": "f2"}  # request meta "logprob_dtype" -> wire dtype
FP16_MAX = 65504.0  # largest finite float16
UINT16_VOCAB = 65536  # vocabularies up to this size send uint16 ids
_MAX_NDIM = 4


class WireError(ValueError):
    """A payload that does not follow the layout; `field` names the part that is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _check_version(version, field: str) -> int:
    if isinstance(version, bool) or version not in VERSION_DTYPES:
        raise WireError(field, f"wire version {version!r} is not supported; this side reads versions "
                               f"{', '.join(map(str, READ_VERSIONS))} and writes {VERSION} (a newer peer? "
                               "upgrade protege here)"[:300])
    return version


# ---------------------------------------------------------------------------------------------
# Container: meta + named arrays, in binary or base64-JSON form.
# ---------------------------------------------------------------------------------------------

def to_float16(array: np.ndarray) -> np.ndarray:
    """float16 copy of `array`: round to nearest, finite values beyond +-65504 clamped, +-inf and NaN kept."""
    array = np.asarray(array)
    with np.errstate(over="ignore"):
        out = array.astype(np.float16)
    overflow = np.isinf(out)
    if overflow.any():
        overflow &= np.isfinite(array)
        out[overflow] = np.copysign(FP16_MAX, array[overflow])
    return out


def _as_wire_array(name: str, array, code: str | None = None) -> tuple[str, np.ndarray]:
    """(dtype code, little-endian C-contiguous array). code None: floats -> f4, ints -> i4."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    kind = array.dtype.kind
    if kind not in "fiub":
        raise TypeError(f"array {name!r}: dtype {array.dtype} cannot go on the wire (float or int only)")
    code = code or ("f4" if kind == "f" else "i4")
    if code not in _DTYPES:
        raise ValueError(f"array {name!r}: wire dtype {code!r} is not one of {sorted(_DTYPES)}")
    if code[0] == "f" and kind != "f":
        raise TypeError(f"array {name!r}: integer dtype {array.dtype} cannot go on the wire as {code}")
    if code == "u2":
        if kind == "f":
            raise TypeError(f"array {name!r}: float dtype {array.dtype} cannot go on the wire as u2")
        if array.size and (array.min() < 0 or array.max() > 0xFFFF):
            raise ValueError(f"array {name!r}: values in [{array.min()}, {array.max()}] do not fit uint16 "
                             "(send it as i4)")
    if code == "f2":
        array = to_float16(array)
    return code, np.ascontiguousarray(array, dtype=_DTYPES[code])


def _wire_arrays(arrays: dict, dtypes: dict | None, version: int, field: str):
    """(name, wire dtype code, numpy array) for each non-None array, checked against the wire version."""
    allowed = VERSION_DTYPES[_check_version(version, field)]
    for name, array in arrays.items():
        if array is None:
            continue
        code, array = _as_wire_array(name, array, (dtypes or {}).get(name))
        if code not in allowed:
            raise ValueError(f"array {name!r}: dtype {code} needs wire version 2 (writing version {version})")
        yield name, code, array


def pack(meta: dict, arrays: dict[str, object], *, dtypes: dict[str, str] | None = None,
         version: int = VERSION) -> bytes:
    """Binary form of `meta` plus `arrays` (numpy arrays or tensors; None entries are skipped).
    dtypes: wire dtype per array name ("f4", "i4", "f2", "u2"); the rest go floats -> f4, ints -> i4."""
    entries, blobs, offset = [], [], 0
    for name, code, array in _wire_arrays(arrays, dtypes, version, "version"):
        entries.append([name, code, list(array.shape), offset])
        blobs.append((offset, array))
        offset += -(-array.nbytes // 8) * 8
    header = orjson.dumps({"meta": meta, "arrays": entries})
    header += b" " * ((-(_PREFIX.size + len(header))) % 8)
    start = _PREFIX.size + len(header)
    out = bytearray(start + offset)
    out[:start] = _PREFIX.pack(MAGIC, version, 0, len(header)) + header
    view = np.frombuffer(out, dtype=np.uint8)
    for off, array in blobs:
        view[start + off: start + off + array.nbytes] = array.reshape(-1).view(np.uint8)
    return bytes(out)


def read_binary(body: bytes | bytearray | memoryview) -> tuple[int, dict, dict[str, np.ndarray]]:
    """(version, meta, arrays) from the binary form. Arrays are views of `body` (writable if it is)."""
    size = len(body)
    if size < _PREFIX.size:
        raise WireError("body", f"{size} bytes is shorter than the {_PREFIX.size}-byte binary prefix")
    magic, version, _flags, header_len = _PREFIX.unpack_from(body, 0)
    if magic != MAGIC:
        raise WireError("magic", f"expected {MAGIC!r}, got {bytes(magic)!r} (not a protege binary payload)")
    _check_version(version, "version")
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
        dtype, shape, count = _check_entry(name, code, shape, version)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0 or offset % 8:
            raise WireError(f"arrays.{name}.offset", f"must be a non-negative multiple of 8, got {offset!r}")
        if offset + count * dtype.itemsize > data_len:
            raise WireError(f"arrays.{name}", f"truncated: needs bytes {offset}..{offset + count * dtype.itemsize} "
                                              f"of a {data_len}-byte data section")
        arrays[name] = np.frombuffer(body, dtype=dtype, count=count, offset=start + offset).reshape(shape)
    return version, meta, arrays


def unpack(body: bytes | bytearray | memoryview) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) from the binary form (any readable version). Arrays are views of `body`."""
    _, meta, arrays = read_binary(body)
    return meta, arrays


def to_json_dict(meta: dict, arrays: dict[str, object], *, dtypes: dict[str, str] | None = None,
                 version: int = VERSION) -> dict:
    """The base64-in-JSON form (a dict ready for orjson.dumps); dtypes as in `pack`."""
    out = {}
    for name, code, array in _wire_arrays(arrays, dtypes, version, "protege_wire"):
        out[name] = {"dtype": code, "shape": list(array.shape), "b64": base64.b64encode(array.data).decode("ascii")}
    return {"protege_wire": version, "meta": meta, "arrays": out}


def read_json_dict(obj: dict) -> tuple[int, dict, dict[str, np.ndarray]]:
    """(version, meta, arrays) from the base64-in-JSON form. Arrays are writable (each owns its bytes)."""
    if not isinstance(obj, dict):
        raise WireError("body", "must be a JSON object")
    version = _check_version(obj.get("protege_wire"), "protege_wire")
    meta, entries = obj.get("meta", {}), obj.get("arrays")
    if not isinstance(meta, dict):
        raise WireError("meta", "must be a JSON object")
    if not isinstance(entries, dict):
        raise WireError("arrays", "must be a JSON object {name: {dtype, shape, b64}}")
    arrays = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("b64"), str):
            raise WireError(f"arrays.{name}", "must be an object with 'dtype', 'shape' and a 'b64' string")
        dtype, shape, count = _check_entry(name, entry.get("dtype"), entry.get("shape"), version)
        try:
            raw = bytearray(base64.b64decode(entry["b64"], validate=True))
        except ValueError:
            raise WireError(f"arrays.{name}.b64", "not valid base64") from None
        if len(raw) != count * dtype.itemsize:
            raise WireError(f"arrays.{name}", f"holds {len(raw)} bytes, shape {shape} of {entry['dtype']} "
                                              f"needs {count * dtype.itemsize}")
        arrays[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return version, meta, arrays


def from_json_dict(obj: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) from the base64-in-JSON form (any readable version)."""
    _, meta, arrays = read_json_dict(obj)
    return meta, arrays


def _check_entry(name, code, shape, version: int) -> tuple[np.dtype, tuple[int, ...], int]:
    if not isinstance(name, str) or not name:
        raise WireError("arrays", f"array name must be a non-empty string, got {name!r}"[:200])
    allowed = VERSION_DTYPES[version]
    if code not in allowed:
        extra = " (f2/u2 need wire version 2)" if code in _DTYPES else ""
        raise WireError(f"arrays.{name}.dtype", f"must be one of {list(allowed)} in wire version {version}, "
                                                f"got {code!r}{extra}"[:200])
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


def decode_score_response(body: bytes | bytearray, content_type: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of a score response (any readable version): float32 logprobs (float16 widened),
    int64 ids and completion_lengths (uint16 / int32 widened)."""
    if content_type.split(";")[0].strip().lower() == BINARY_MEDIA_TYPE and isinstance(body, bytes):
        body = bytearray(body)  # one memcpy, so torch gets writable memory (no read-only warning)
    meta, arrays = decode(body, content_type)
    # widened in numpy: single-threaded, so no thread-pool wake-up for a small copy
    tensors = {name: torch.from_numpy(_widen(a)) for name, a in arrays.items()}
    return meta, tensors


def _widen(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    if array.dtype.itemsize < 4:
        return array.astype(np.float32)
    return array


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
