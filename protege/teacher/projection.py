"""A remote teacher's output projection on the client: fetched once, verified, cached, and the hash every
hidden-state reply must name.

With loss.support=full and a remote teacher (teacher.urls, protocol "protege"), the server sends the
teacher's final hidden states h (N, T, H) instead of logits, and the client rebuilds the exact
teacher logits z = h W^T chunk by chunk with the teacher's output projection W (V, H), exactly as
for an in-process teacher (RemoteTeacher.output_weight is W, so the objective and trainer keep one
path). W comes from GET /v1/output_projection once per run:

- its sha256 is read from /v1/info first, the downloaded bytes are hashed again here and must give
  it (protege.wire.read_projection; the body's crc32 is checked too), else the download is retried
  like a bad reply;
- with a cache directory (teacher.projection_cache), W is kept on disk as `<sha256>.prtg` (the
  wire body as served) and read from there on the next run, again verified by its hash;
- every hidden-state reply carries "projection_sha256"; one that differs from the W in use (the
  teacher server was restarted with other weights, or one replica runs another teacher) raises
  TeacherChanged at once: hidden states of one teacher are never multiplied by another's W.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import torch

from protege import wire
from protege.teacher.replies import InvalidReply

SUFFIX = ".prtg"
HIDDEN_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # teacher.hidden_dtype


class TeacherChanged(ValueError):
    """A hidden-state reply belongs to another output projection than the one this run uses."""


class RemoteProjection:
    """The output projection of the teacher behind `get` (RemoteTeacher._get / _request), loaded on first use."""

    def __init__(self, urls: list[str], cache_dir: str | None = None, hidden_dtype: str = "float16"):
        if hidden_dtype not in HIDDEN_TORCH:
            raise ValueError(f"hidden_dtype={hidden_dtype!r}: use one of {sorted(HIDDEN_TORCH)} (teacher.hidden_dtype)")
        self.hidden_torch_dtype = HIDDEN_TORCH[hidden_dtype]  # what hidden states arrive as
        self.urls = urls
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self._lock = threading.Lock()
        self.sha256: str | None = None
        self.weight: torch.Tensor | None = None
        self.downloads = 0  # how many times W came over the network (tests, logs)

    def hidden_spec(self) -> tuple[int, torch.dtype]:
        """(H, dtype) every hidden-state reply must have (the projection must be loaded)."""
        return int(self.weight.shape[1]), self.hidden_torch_dtype

    def load(self, info: dict, request) -> torch.Tensor:
        """W (V, H) in the teacher's dtype. info: the server's /v1/info; request(path, check): a checked GET."""
        with self._lock:
            if self.weight is None:
                self.sha256, self.weight = self._fetch(info, request)
            return self.weight

    def _fetch(self, info: dict, request) -> tuple[str, torch.Tensor]:
        entry = info.get("output_projection")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise ValueError(f"teacher server {self.urls[0]} does not serve an output projection (its /v1/info has "
                             f"no output_projection: {str(entry)[:80]}), so loss.support=full cannot run remotely. "
                             "Serve the teacher with a protege that has GET /v1/output_projection and --backend hf, "
                             "or use loss.support=teacher|student|union|sampled.")
        sha = entry["sha256"]
        cached = self._read_cache(sha)
        if cached is not None:
            return sha, cached
        body, (got, weight) = request("/v1/output_projection", _check)
        self.downloads += 1
        if got != sha:
            raise TeacherChanged(f"teacher server {self.urls[0]}: /v1/info names output projection {sha[:16]}... but "
                                 f"/v1/output_projection sent {got[:16]}...: the teacher changed in between; restart "
                                 "the run against one teacher")
        self._write_cache(sha, body)
        return sha, weight

    def _path(self, sha: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{sha}{SUFFIX}"

    def _read_cache(self, sha: str) -> torch.Tensor | None:
        path = self._path(sha)
        if path is None or not path.is_file():
            return None
        try:
            got, weight = wire.read_projection(bytearray(path.read_bytes()))
        except wire.WireError:
            return None  # damaged: fetched again and rewritten
        return weight if got == sha else None

    def _write_cache(self, sha: str, body: bytes) -> None:
        path = self._path(sha)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=SUFFIX)
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.replace(tmp, path)

    def check_reply(self, meta: dict, url: str) -> None:
        """A hidden-state reply must name the projection in use (TeacherChanged otherwise: never retried)."""
        got = meta.get("projection_sha256")
        if got != self.sha256:
            raise TeacherChanged(
                f"teacher server {url} sent hidden states for output projection {str(got)[:16]}..., but this run "
                f"uses {str(self.sha256)[:16]}...: the teacher changed (restarted with other weights, or a replica "
                "serves another model). Hidden states of one teacher are never used with another's projection; "
                "restart the run (or its resume) against one teacher.")


def _check(response) -> tuple[bytes, tuple[str, torch.Tensor]]:
    """(body, (sha256, W)) of a /v1/output_projection reply; InvalidReply (retried) when it does not verify."""
    body = response.content
    try:
        return body, wire.read_projection(bytearray(body))
    except wire.WireError as exc:
        raise InvalidReply(f"output_projection.{exc.field}", exc.message) from None
