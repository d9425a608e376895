"""The wire container under protege.wire: meta + named arrays, in binary or base64-JSON form.

protege.wire re-exports every public name here (callers use `protege.wire`); this module holds the
layout, its versions and checks, protege.wire the documents built on it (score requests/replies,
TRL's reply).

Two forms carry the same thing, a small JSON header (`meta`) plus named little-endian arrays whose
dtype the header names, so a decoder never guesses:

Binary (`Content-Type: application/octet-stream`):

    offset  size  field
    0       4     magic b"PRTG"
    4       2     version, uint16 LE (3; 1 and 2 are still read, see below)
    6       2     flags, uint16 LE (0, reserved)
    8       4     header length H, uint32 LE
    12      4     crc32, uint32 LE (version 3 only; versions 1-2 have no such field: P = 12, else P = 16)
    P       H     header, UTF-8 JSON {"meta": {...}, "arrays": [[name, dtype, shape, offset], ...]},
                  space-padded so that the data section starts on an 8-byte boundary
    P+H     ...   data: the arrays back to back, C order, each at its `offset` (from the start of
                  the data section, a multiple of 8)

The crc32 (zlib.crc32, the IEEE polynomial) covers every byte of the body but its own four: bytes
0..12 then P..end. A body whose crc32 does not match is refused with WireError("checksum", ...),
so a reply corrupted in transit (a flipped bit, a proxy rewriting bytes) is never decoded into
numbers. Cost: ~10 ms per 20 MB here (one pass, no copy).

JSON (`Content-Type: application/json`): {"protege_wire": 3, "meta": {...},
"arrays": {name: {"dtype": "u2", "shape": [...], "b64": "<base64 of the raw bytes>", "crc32": int}}}
("crc32" of the raw bytes, version 3 only; `meta` is not covered in this form).

Versions and dtypes (both forms; a version outside these is refused with a WireError naming it):

    version 1   "f4" float32, "i4" int32
    version 2   adds "u2" uint16 and "f2" float16; the layout is otherwise the same
    version 3   the dtypes of version 2, plus the crc32 (binary: a prefix field; JSON: per array), and
                "b2" bfloat16 (the upper 16 bits of a float32, round to nearest even; numpy has no
                bfloat16, so a b2 array reads as numpy's 2-byte void dtype `BF16`, made a float32 copy
                by `bfloat16_to_float32` or a torch.bfloat16 view by `to_tensor`). b2 is an optional
                extension of version 3: only hidden states and an output projection use it, and a
                peer receives them only after asking for them (a client that never asks never sees b2)

The server answers in the version the request came in (a v1 client gets f4/i4 replies, as before;
a v2 client gets replies without a checksum, which it could not read otherwise). The client asks in
version 3 and steps down to 2, then 1, only when a server refuses the newer version with its 400.
In a version-2/3 score reply the token ids (`topk_ids`) are uint16 whenever the vocabulary fits
(vocab_size <= 65536; lossless, the default) and int32 otherwise. Logprobs are float32 unless the
request asks for float16 (meta "logprob_dtype": "float16"; `RemoteTeacher(..., logprob_dtype="float16")`).
Bytes per (logprob, id) entry: 8 (v1), 6 (v2/v3 default), 4 (v2/v3 float16).

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
"""

from __future__ import annotations

import base64
import math
import struct
import zlib

import numpy as np
import orjson
import torch

MAGIC = b"PRTG"
VERSION = 3  # what this side writes
BINARY_MEDIA_TYPE = "application/octet-stream"
JSON_MEDIA_TYPE = "application/json"
_PREFIX = struct.Struct("<4sHHI")  # magic, version, flags, header length
_CRC = struct.Struct("<I")  # version 3: crc32 right after the prefix
CHECKSUM_VERSION = 3  # the first version whose payloads carry a crc32
BF16 = np.dtype("V2")  # how a b2 (bfloat16) array reads: raw 2-byte items (see `to_tensor`, `bfloat16_to_float32`)
_DTYPES = {"f4": np.dtype("<f4"), "i4": np.dtype("<i4"), "f2": np.dtype("<f2"), "u2": np.dtype("<u2"), "b2": BF16}
# every version this side reads -> its dtypes
VERSION_DTYPES = {1: ("f4", "i4"), 2: ("f4", "i4", "f2", "u2"), 3: ("f4", "i4", "f2", "u2", "b2")}
READ_VERSIONS = tuple(sorted(VERSION_DTYPES))
LOGPROB_DTYPES = {"float32": "f4", "float16": "f2"}  # request meta "logprob_dtype" -> wire dtype
FP16_MAX = 65504.0  # largest finite float16
UINT16_VOCAB = 65536  # vocabularies up to this size send uint16 ids
_MAX_NDIM = 4


class WireError(ValueError):
    """A payload that does not follow the layout; `field` names the part that is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _check_version(version, field: str) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or version not in VERSION_DTYPES:
        raise WireError(field, f"wire version {version!r} is not supported; this side reads versions "
                               f"{', '.join(map(str, READ_VERSIONS))} and writes {VERSION} (a newer peer? "
                               "upgrade protege here)"[:300])
    return version


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


def to_bfloat16(array) -> np.ndarray:
    """bfloat16 bits (numpy `BF16`) of a float array or tensor: round to nearest even (torch's cast), inf/NaN kept."""
    if isinstance(array, np.ndarray) and array.dtype == BF16:
        return np.ascontiguousarray(array)
    if isinstance(array, torch.Tensor):
        tensor = array.detach().cpu()
    else:
        tensor = torch.from_numpy(np.asarray(array, np.float32))
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"bfloat16 needs a float array, got {tensor.dtype}")
    bits = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return bits.view(np.uint16).astype("<u2", copy=False).view(BF16)


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 copy of a b2 (`BF16`) array: exact (a bfloat16 is the upper half of a float32)."""
    return (np.ascontiguousarray(bits).view("<u2").astype(np.uint32) << 16).view(np.float32)


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a decoded array; b2 (`BF16`) arrays become torch.bfloat16 (no copy)."""
    if array.dtype == BF16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _as_wire_array(name: str, array, code: str | None = None) -> tuple[str, np.ndarray]:
    """(dtype code, little-endian C-contiguous array). code None: floats -> f4, ints -> i4 (bfloat16 tensors
    and `BF16` arrays -> b2)."""
    if code == "b2" or (isinstance(array, torch.Tensor) and array.dtype == torch.bfloat16) or (
            isinstance(array, np.ndarray) and array.dtype == BF16):
        if code not in (None, "b2"):
            raise TypeError(f"array {name!r}: bfloat16 values go on the wire as b2, not {code}")
        try:
            return "b2", to_bfloat16(array)
        except TypeError as exc:
            raise TypeError(f"array {name!r}: {exc}") from None
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
            first = min(v for v, codes in VERSION_DTYPES.items() if code in codes)
            raise ValueError(f"array {name!r}: dtype {code} needs wire version {first} (writing version {version})")
        yield name, code, array


def _prefix_size(version: int) -> int:
    return _PREFIX.size + (_CRC.size if version >= CHECKSUM_VERSION else 0)


def _body_crc32(body, prefix: int) -> int:
    """crc32 of every byte of a version-3 body but its own field (bytes 0..12, then `prefix`..end)."""
    view = memoryview(body)
    return zlib.crc32(view[prefix:], zlib.crc32(view[:_PREFIX.size]))


def pack(meta: dict, arrays: dict[str, object], *, dtypes: dict[str, str] | None = None,
         version: int = VERSION) -> bytes:
    """Binary form of `meta` plus `arrays` (numpy arrays or tensors; None entries are skipped).
    dtypes: wire dtype per array name ("f4", "i4", "f2", "u2"); the rest go floats -> f4, ints -> i4.
    Version 3 writes the crc32 of the finished body into its prefix."""
    entries, blobs, offset = [], [], 0
    for name, code, array in _wire_arrays(arrays, dtypes, version, "version"):
        entries.append([name, code, list(array.shape), offset])
        blobs.append((offset, array))
        offset += -(-array.nbytes // 8) * 8
    prefix = _prefix_size(version)
    header = orjson.dumps({"meta": meta, "arrays": entries})
    header += b" " * ((-(prefix + len(header))) % 8)
    start = prefix + len(header)
    out = bytearray(start + offset)
    out[:_PREFIX.size] = _PREFIX.pack(MAGIC, version, 0, len(header))
    out[prefix:start] = header
    view = np.frombuffer(out, dtype=np.uint8)
    for off, array in blobs:
        view[start + off: start + off + array.nbytes] = array.reshape(-1).view(np.uint8)
    if version >= CHECKSUM_VERSION:
        _CRC.pack_into(out, _PREFIX.size, _body_crc32(out, prefix))
    return bytes(out)


def pack_parts(meta: dict, arrays: dict[str, object], *, dtypes: dict[str, str] | None = None,
               version: int = VERSION) -> list[memoryview]:
    """`pack`'s body as pieces to stream: b"".join(pack_parts(...)) == pack(...), but the arrays' bytes
    are views, never copied (a 1 GB output projection is sent without a second 1 GB buffer)."""
    entries, blobs, offset = [], [], 0
    for name, code, array in _wire_arrays(arrays, dtypes, version, "version"):
        entries.append([name, code, list(array.shape), offset])
        padded = -(-array.nbytes // 8) * 8
        blobs += [memoryview(array.reshape(-1).view(np.uint8)), memoryview(bytes(padded - array.nbytes))]
        offset += padded
    prefix = _prefix_size(version)
    header = orjson.dumps({"meta": meta, "arrays": entries})
    header += b" " * ((-(prefix + len(header))) % 8)
    head = bytearray(prefix + len(header))
    head[:_PREFIX.size] = _PREFIX.pack(MAGIC, version, 0, len(header))
    head[prefix:] = header
    if version >= CHECKSUM_VERSION:
        crc = zlib.crc32(memoryview(head)[prefix:], zlib.crc32(memoryview(head)[:_PREFIX.size]))
        for blob in blobs:
            crc = zlib.crc32(blob, crc)
        _CRC.pack_into(head, _PREFIX.size, crc)
    return [memoryview(bytes(head))] + [blob for blob in blobs if len(blob)]


def _read_prefix(body) -> tuple[int, int, int]:
    """(version, start of the header, header length) of a binary body; verifies a version-3 body's crc32."""
    size = len(body)
    if size < _PREFIX.size:
        raise WireError("body", f"{size} bytes is shorter than the {_PREFIX.size}-byte binary prefix")
    magic, version, _flags, header_len = _PREFIX.unpack_from(body, 0)
    if magic != MAGIC:
        raise WireError("magic", f"expected {MAGIC!r}, got {bytes(magic)!r} (not a protege binary payload)")
    _check_version(version, "version")
    prefix = _prefix_size(version)
    if size < prefix:
        raise WireError("body", f"{size} bytes is shorter than the {prefix}-byte version-{version} prefix")
    if version >= CHECKSUM_VERSION:
        stored, actual = _CRC.unpack_from(body, _PREFIX.size)[0], _body_crc32(body, prefix)
        if stored != actual:
            raise WireError("checksum", f"the body's crc32 is {actual:#010x} but its prefix says {stored:#010x}: "
                                        f"the {size}-byte payload was corrupted or truncated on the way")
    if prefix + header_len > size:
        raise WireError("header", f"header length {header_len} runs past the end of the {size}-byte body")
    return version, prefix, header_len


def read_binary(body: bytes | bytearray | memoryview) -> tuple[int, dict, dict[str, np.ndarray]]:
    """(version, meta, arrays) from the binary form. Arrays are views of `body` (writable if it is).
    Raises WireError naming the field that is wrong (a version-3 body whose crc32 differs: "checksum")."""
    version, prefix, header_len = _read_prefix(body)
    start = prefix + header_len
    try:
        header = orjson.loads(bytes(body[prefix:start]))
    except orjson.JSONDecodeError as exc:
        raise WireError("header", f"not valid JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
        raise WireError("header", "must be a JSON object with an 'arrays' list")
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise WireError("meta", "must be a JSON object")
    data_len = len(body) - start
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
    """The base64-in-JSON form (a dict ready for orjson.dumps); dtypes as in `pack`. Version 3 adds
    each array's "crc32" (of its raw bytes)."""
    out = {}
    for name, code, array in _wire_arrays(arrays, dtypes, version, "protege_wire"):
        out[name] = {"dtype": code, "shape": list(array.shape), "b64": base64.b64encode(array.data).decode("ascii")}
        if version >= CHECKSUM_VERSION:
            out[name]["crc32"] = zlib.crc32(array.data)
    return {"protege_wire": version, "meta": meta, "arrays": out}


def read_json_dict(obj: dict) -> tuple[int, dict, dict[str, np.ndarray]]:
    """(version, meta, arrays) from the base64-in-JSON form. Arrays are writable (each owns its bytes)."""
    if not isinstance(obj, dict):
        raise WireError("body", f"must be a JSON object, got {type(obj).__name__} (not a protege wire payload)")
    if "protege_wire" not in obj:
        raise WireError("protege_wire", f"missing: this JSON object (keys {sorted(map(str, obj))[:8]}) is not a "
                                        "protege wire payload; is the URL a protege teacher server?"[:300])
    version = _check_version(obj["protege_wire"], "protege_wire")
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
        if version >= CHECKSUM_VERSION:
            _check_crc32(name, entry.get("crc32"), raw)
        arrays[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return version, meta, arrays


def _check_crc32(name: str, stored, raw: bytearray) -> None:
    if not isinstance(stored, int) or isinstance(stored, bool):
        raise WireError(f"arrays.{name}.crc32", f"version {CHECKSUM_VERSION} needs each array's crc32 (an integer), "
                                                f"got {stored!r}"[:200])
    if stored != zlib.crc32(raw):
        raise WireError("checksum", f"array {name!r}: its bytes' crc32 is {zlib.crc32(raw):#010x} but the payload "
                                    f"says {stored:#010x}: corrupted on the way")


def from_json_dict(obj: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) from the base64-in-JSON form (any readable version)."""
    _, meta, arrays = read_json_dict(obj)
    return meta, arrays


def _check_entry(name, code, shape, version: int) -> tuple[np.dtype, tuple[int, ...], int]:
    if not isinstance(name, str) or not name:
        raise WireError("arrays", f"array name must be a non-empty string, got {name!r}"[:200])
    allowed = VERSION_DTYPES[version]
    if code not in allowed:
        extra = (f" (dtype {code}: need wire version {min(v for v, c in VERSION_DTYPES.items() if code in c)})"
                 if isinstance(code, str) and code in _DTYPES else "")
        raise WireError(f"arrays.{name}.dtype", f"must be one of {list(allowed)} in wire version {version}, "
                                                f"got {code!r}{extra}"[:200])
    if (not isinstance(shape, list) or len(shape) > _MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise WireError(f"arrays.{name}.shape", f"must be a list of at most {_MAX_NDIM} non-negative ints, "
                                                f"got {shape!r}"[:200])
    return _DTYPES[code], tuple(shape), math.prod(shape)


def read(body: bytes | bytearray | memoryview, content_type: str) -> tuple[int, dict, dict[str, np.ndarray]]:
    """(version, meta, arrays) from either form, picked by the media type."""
    if content_type.split(";")[0].strip().lower() == BINARY_MEDIA_TYPE:
        return read_binary(body)
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise WireError("body", f"not valid JSON ({exc})") from None
    return read_json_dict(obj)


def decode(body: bytes | bytearray | memoryview, content_type: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) from either form, picked by the media type."""
    _, meta, arrays = read(body, content_type)
    return meta, arrays
