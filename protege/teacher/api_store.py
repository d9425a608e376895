"""Teacher completions stored on disk, so an API teacher generates each one once (across steps, epochs, reruns).

An entry is keyed by everything that decides the completion: the endpoint kind, the model name, the
prompt (messages or token ids), the sampling settings (temperature, top_p, top_k, max_tokens, the
top_logprobs asked for, the seed) and the sample's index among equal prompts. The file name is the
SHA-256 of the key (canonical JSON); the file holds the key, the value and the SHA-256 of both:

    <root>/<hash[:2]>/<hash>.json   {"format": 1, "key": {...}, "value": {...}, "sha256": "..."}

Writes go to a temporary file that is renamed into place (a crash leaves no half entry under the
real name). A damaged entry (unreadable, bad JSON, wrong checksum, another key) is reported with a
warning, deleted and treated as missing, so it is generated again and never used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import orjson

log = logging.getLogger("protege")
FORMAT = 1


def _canonical(obj) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


class CompletionStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.damaged = 0  # entries found damaged (and regenerated) since this store was opened

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(_canonical(key)).hexdigest()
        return self.root / digest[:2] / f"{digest}.json"

    def get(self, key: dict) -> dict | None:
        """The stored value for `key`, or None when there is none or it is damaged (then it is deleted)."""
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._damaged(path, f"unreadable ({exc})")
        try:
            entry = orjson.loads(raw)
            ok = (isinstance(entry, dict) and entry.get("format") == FORMAT and entry.get("key") == key
                  and entry.get("sha256") == hashlib.sha256(_canonical([entry["key"], entry["value"]])).hexdigest())
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            return self._damaged(path, f"not a store entry ({type(exc).__name__})")
        if not ok:
            return self._damaged(path, "checksum or key mismatch")
        return entry["value"]

    def put(self, key: dict, value: dict) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = _canonical({"format": FORMAT, "key": key, "value": value,
                           "sha256": hashlib.sha256(_canonical([key, value])).hexdigest()})
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _damaged(self, path: Path, why: str) -> None:
        self.damaged += 1
        log.warning("teacher API store: %s is damaged (%s); generating it again", path, why)
        path.unlink(missing_ok=True)
        return None
