"""The on-disk store of the teacher-score cache: checksummed shards of per-row arrays, content-addressed.

One directory per teacher (protege.teacher.cache names it after the teacher's manifest hash); in it
`manifest.json` (what the hash was computed from, for people) and shard files `<sha256[:32]>.ptc`,
each holding the rows of one scoring call (many rows per file). A row is found by its key (32
bytes, sha256 of the teacher request and the row's token ids; see protege.teacher.cache.row_key).

Shard layout (all integers little-endian):

    offset  size  field
    0       8     magic b"PTGCACHE"
    8       2     version (1)
    10      2     flags (0)
    12      4     header length H
    16      8     payload length P
    24      32    sha256 over header + payload (every byte after this field)
    56      H     header, UTF-8 JSON, space-padded to a multiple of 8:
                  {"manifest": hex, "keys": [hex, ...], "lengths": [L_0, ...],
                   "fields": {name: {"code": c, "torch": dtype, "tail": [...], "offset": o}}}
    56+H    P     payload: one array per field, (sum of L_i, *tail) in C order, each at its `offset`
                  (from the payload start, a multiple of 8); row i is rows [sum L_<i, sum L_<=i) of it

Codes: "f4" float32, "f2" float16, "u2" uint16, "i4" int32, "i8" int64, "bf16" bfloat16 (raw 16-bit).
Each field is stored in the smallest code that gives back every value bit for bit (float32 logprobs
that all round-trip through float16, e.g. a float16 wire's, are stored as f2; ids under 65536 as u2),
and read back into its `torch` dtype; nothing is ever rounded. Never pickle: numpy views of raw bytes.

Reading: opening the store reads every shard's header (to index the keys); a shard's payload is
read, and its sha256 checked, the first time one of its rows is asked for. A shard that is short,
truncated, unparsable, fails its sha256 or holds a NaN or +inf (a logprob is finite or -inf;
a valid sha256 over a NaN only says the NaN was written so) is damaged: a warning names the file, the file is removed,
and its rows are misses (scored again by the teacher and written to a new shard), never used. A
shard whose header names another manifest (another teacher's) is never read (a warning names it).
Writing: a new shard goes to a temporary file in the same directory, is flushed and fsynced, and
is renamed into place (os.replace): a reader sees a complete shard or none.
"""

from __future__ import annotations

import hashlib
import math
import json
import logging
import os
import struct
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("protege")

MAGIC = b"PTGCACHE"
VERSION = 1
SUFFIX = ".ptc"
_PREFIX = struct.Struct("<8sHHIQ32s")  # magic, version, flags, header length, payload length, sha256
_NP = {"f4": np.dtype("<f4"), "f2": np.dtype("<f2"), "u2": np.dtype("<u2"), "i4": np.dtype("<i4"),
       "i8": np.dtype("<i8"), "bf16": np.dtype("<u2")}
_NUMPY_OF = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}  # torch dtype name


class DamagedShard(ValueError):
    """A shard file that cannot be trusted (short, truncated, bad header, or its sha256 does not match)."""


def encode_field(x: torch.Tensor) -> tuple[str, np.ndarray]:
    """(code, little-endian array) of the smallest lossless code for tensor `x` (see the module docstring)."""
    x = x.detach().cpu().contiguous()
    if x.dtype == torch.bfloat16:
        return "bf16", x.view(torch.int16).numpy().view("<u2")
    a = x.numpy()
    if a.dtype == np.float32:
        small = a.astype("<f2")
        if np.array_equal(small.astype("<f4").view("<u4"), a.view("<u4")):  # every bit back, -inf included
            return "f2", small
        return "f4", a.astype("<f4")
    if a.dtype == np.float16:
        return "f2", a.astype("<f2")
    if a.dtype.kind in "iu":
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if 0 <= lo and hi < 1 << 16:
            return "u2", a.astype("<u2")
        if -(1 << 31) <= lo and hi < 1 << 31:
            return "i4", a.astype("<i4")
        return "i8", a.astype("<i8")
    raise TypeError(f"teacher cache: cannot store a {x.dtype} tensor")


def decode_field(raw: np.ndarray, code: str, torch_dtype: str) -> torch.Tensor:
    """The tensor `encode_field` was given, from its stored array."""
    if code == "bf16":
        return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(raw.astype(_NUMPY_OF[torch_dtype]))


def pack_shard(manifest: str, keys: list[bytes], rows: list[dict[str, torch.Tensor]]) -> bytes:
    """The bytes of one shard holding `rows` (each {field: (L_i, *tail) tensor}, the same fields in every row)."""
    names = sorted(rows[0]) if rows else []
    fields, parts, offset = {}, [], 0
    for name in names:
        tensor = torch.cat([r[name] for r in rows])
        code, array = encode_field(tensor)
        fields[name] = {"code": code, "torch": str(tensor.dtype).replace("torch.", ""),
                        "tail": list(tensor.shape[1:]), "offset": offset}
        data = array.tobytes()
        pad = -len(data) % 8
        parts.append(data + b"\0" * pad)
        offset += len(data) + pad
    header = json.dumps({"manifest": manifest, "keys": [k.hex() for k in keys],
                         "lengths": [int(next(iter(r.values())).shape[0]) if r else 0 for r in rows],
                         "fields": fields}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    payload = b"".join(parts)
    digest = hashlib.sha256(header + payload).digest()
    return _PREFIX.pack(MAGIC, VERSION, 0, len(header), len(payload), digest) + header + payload


def read_header(path: Path) -> tuple[dict, int, int, bytes]:
    """(header, header length, payload length, sha256) of a shard, reading only its prefix and header."""
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise DamagedShard(f"{len(prefix)} bytes, shorter than the {_PREFIX.size}-byte prefix")
        magic, version, _flags, hlen, plen, digest = _PREFIX.unpack(prefix)
        if magic != MAGIC or version != VERSION:
            raise DamagedShard(f"not a version-{VERSION} teacher-cache shard (magic {magic!r}, version {version})")
        raw = f.read(hlen)
    if len(raw) < hlen:
        raise DamagedShard(f"truncated in its header ({len(raw)} of {hlen} bytes)")
    try:
        header = json.loads(raw)
        if len(header["keys"]) != len(header["lengths"]) or not isinstance(header["fields"], dict):
            raise ValueError("keys and lengths differ")
    except (ValueError, KeyError, TypeError) as e:
        raise DamagedShard(f"unreadable header ({type(e).__name__}: {e})") from None
    return header, hlen, plen, digest


def read_shard(path: Path) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """(header, rows) of a shard whose length and sha256 are checked first; DamagedShard otherwise."""
    header, hlen, plen, digest = read_header(path)
    body = Path(path).read_bytes()
    want = _PREFIX.size + hlen + plen
    if len(body) != want:
        raise DamagedShard(f"{len(body)} bytes where its prefix says {want} (truncated or appended to)")
    if hashlib.sha256(memoryview(body)[_PREFIX.size:]).digest() != digest:
        raise DamagedShard("its sha256 does not match its contents")
    payload = memoryview(body)[_PREFIX.size + hlen:]
    total = sum(header["lengths"])
    columns = {}
    for name, f in header["fields"].items():
        count = total * int(np.prod(f["tail"], dtype=np.int64))
        raw = np.frombuffer(payload, dtype=_NP[f["code"]], count=count, offset=f["offset"])
        columns[name] = decode_field(raw.reshape(total, *f["tail"]), f["code"], f["torch"])
        if columns[name].is_floating_point() and (bad := int((columns[name].isnan() | (columns[name] == math.inf))
                                                             .sum())):
            raise DamagedShard(f"its field {name} holds {bad} NaN or +inf value(s) under a valid sha256 (written so "
                               "by a faulty teacher or on purpose)")
    rows, start = [], 0
    for length in header["lengths"]:
        rows.append({name: col[start:start + length] for name, col in columns.items()})
        start += length
    return header, rows


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, fsynced, then os.replace."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class ShardStore:
    """The shards of one teacher's cache directory: get(key) -> row or None, put(keys, rows) -> bytes written.

    `manifest` is the teacher's manifest hash; shards naming another are skipped. Loaded (checked)
    shards are kept in memory up to `max_loaded_bytes`, least recently used dropped first."""

    def __init__(self, folder: str | Path, manifest: str, *, max_loaded_bytes: int = 256 << 20):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest = manifest
        self.max_loaded_bytes = max_loaded_bytes
        self._index: dict[bytes, tuple[str, int]] = {}  # key -> (shard file name, row in it)
        self._loaded: OrderedDict[str, tuple[list[dict], int]] = OrderedDict()  # name -> (rows, bytes)
        self._loaded_bytes = 0
        for path in sorted(self.folder.glob("*" + SUFFIX)):
            self._index_shard(path)

    def __len__(self) -> int:
        return len(self._index)

    def _index_shard(self, path: Path) -> None:
        try:
            header = read_header(path)[0]
        except DamagedShard as e:
            self._damaged(path, str(e))
            return
        except OSError:  # removed by another process meanwhile
            return
        if header.get("manifest") != self.manifest:
            log.warning("teacher cache: %s was written for another teacher (manifest %s, this teacher's is %s): "
                        "not read", path, str(header.get("manifest"))[:16], self.manifest[:16])
            return
        for i, key in enumerate(header["keys"]):
            self._index.setdefault(bytes.fromhex(key), (path.name, i))

    def _damaged(self, path: Path, why: str) -> None:
        log.warning("teacher cache: %s is damaged (%s): not used; its rows are scored again by the teacher and the "
                    "file is removed", path, why)
        self._index = {k: v for k, v in self._index.items() if v[0] != path.name}
        try:
            path.unlink()
        except OSError:
            pass

    def get(self, key: bytes) -> dict[str, torch.Tensor] | None:
        """The row stored under `key` (its fields as tensors), or None when absent or its shard is damaged."""
        where = self._index.get(key)
        if where is None:
            return None
        rows = self._rows(where[0])
        return None if rows is None else rows[where[1]]

    def _rows(self, name: str) -> list[dict] | None:
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return self._loaded[name][0]
        path = self.folder / name
        try:
            header, rows = read_shard(path)
        except DamagedShard as e:
            self._damaged(path, str(e))
            return None
        except OSError:  # removed meanwhile (another process found it damaged)
            self._index = {k: v for k, v in self._index.items() if v[0] != name}
            return None
        if header.get("manifest") != self.manifest:  # rewritten under our name by someone else: never used
            self._damaged(path, "its header names another teacher's manifest")
            return None
        self._remember(name, rows, path.stat().st_size)
        return rows

    def _remember(self, name: str, rows: list[dict], size: int) -> None:
        self._loaded[name] = (rows, size)
        self._loaded_bytes += size
        while self._loaded_bytes > self.max_loaded_bytes and len(self._loaded) > 1:
            _, (_, dropped) = self._loaded.popitem(last=False)
            self._loaded_bytes -= dropped

    def put(self, keys: list[bytes], rows: list[dict[str, torch.Tensor]]) -> int:
        """Write one shard holding `rows` under `keys`; returns its size in bytes (0 for no rows)."""
        if not rows:
            return 0
        data = pack_shard(self.manifest, keys, rows)
        name = hashlib.sha256(data).hexdigest()[:32] + SUFFIX
        write_atomic(self.folder / name, data)
        for i, key in enumerate(keys):
            self._index.setdefault(key, (name, i))
        self._remember(name, [{k: v.clone() for k, v in r.items()} for r in rows], len(data))
        return len(data)
