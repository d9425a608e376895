"""The teacher-score cache: a Teacher that answers from disk what its inner teacher already said.

A teacher's answer for a row depends only on (the teacher, the token ids it reads, the request), so
caching it is exact: `CachedTeacher(inner, ...)` keys every row by

    manifest hash   sha256 of the teacher's identity (teacher_manifest): for an in-process teacher the
                    sha256 of every weight tensor (names, dtypes, shapes, bytes) and of its model
                    config; for a server its reported model, backend, dtype, vocabulary size, the
                    wire's logprob and hidden-state dtypes, and teacher.cache_revision (a server reports only a name:
                    bump the revision when the weights behind that name change)
    request tag     topk k, temperature (exact float), entropy flag, hidden flag, number of query ids
    token ids       the row's prompt ids and completion ids (its own length, no padding), and its
                    query ids (e.g. the student's top-k) at those positions

(row_key), and stores what the loss reads: token logprobs, top-k ids and logprobs (the tail is
1 - sum of their probabilities, so exact logprobs give the exact tail), query logprobs, entropy, and
hidden states only with `cache_hidden` (an in-process teacher's hidden states are H floats per
token). The values are the inner teacher's, bit for bit (protege.teacher.cache_store stores each
array in the smallest lossless dtype), so a run answered from the cache computes the same losses
as the run that filled it. Rows not in the cache are scored by the inner teacher in ONE call per
`score` (duplicates once) and written as one new shard.

Where it sits: around the teacher that runs a model (LocalTeacher, RemoteTeacher), inside every
wrapper that changes what that model is shown (a privileged-context or system-prompt teacher that
rewrites prompt_ids, a router that picks a named teacher per row). So the key holds the prompt ids
the model actually reads, and each named teacher has its own manifest. protege.build wraps the base
teacher it builds (`wrap(cfg.teacher, teacher)`); a wrapper keeps its inner teacher(s) in `.inner` /
`.teachers`, which is how `cache_metrics` finds the caches under it. A teacher kind the manifest does
not know (not LocalTeacher / RemoteTeacher) can be cached only if it has `cache_manifest() -> dict`.

The same numbers are not guaranteed between a cached row and the same row scored again in another
batch: an in-process teacher's float sums depend on the batch (padding, kernel blocking) in their
last bits. The cache hands back the answer the run used the first time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import replace
from pathlib import Path

import torch

from protege.records import Rollouts, TeacherSignal
from protege.teacher.base import ScoreRequest, Teacher, Wrapper
from protege.teacher.cache_store import ShardStore

log = logging.getLogger("protege")

FORMAT = 1  # bump when the key or the stored fields change meaning
FIELDS = ("token_logprobs", "topk_ids", "topk_logprobs", "query_logprobs", "entropy", "hidden_states")
COUNTERS = ("hits", "misses", "teacher_calls", "off_policy_rows", "bytes_written", "tokens_written")
_VOLATILE_CONFIG = ("transformers_version", "torch_dtype", "dtype", "name_or_path")  # not what the model computes


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's state dict: each tensor's name, dtype, shape and raw bytes, in order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach()
        h.update(f"{name}|{str(t.dtype)}|{list(t.shape)}|".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _config_sha256(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    d = config.to_dict() if config is not None else {}
    d = {k: v for k, v in d.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def teacher_manifest(teacher, tcfg) -> dict:
    """{"identity": what the answers depend on (hashed), "about": facts for people (not hashed)}."""
    from protege.teacher.local import LocalTeacher
    from protege.teacher.remote import RemoteTeacher

    revision = getattr(tcfg, "cache_revision", None)
    if isinstance(teacher, LocalTeacher):
        identity = {"kind": "in-process", "weights_sha256": weights_sha256(teacher.model),
                    "config_sha256": _config_sha256(teacher.model), "class": type(teacher.model).__name__}
        about = {"path": getattr(tcfg, "path", None)}
    elif isinstance(teacher, RemoteTeacher):
        served = teacher.info() if teacher.protocol == "protege" else {"model": teacher.model}
        identity = {"kind": "server", "protocol": teacher.protocol, "logprob_dtype": teacher.logprob_dtype,
                    "hidden_dtype": getattr(teacher, "hidden_dtype", None),
                    **{k: served.get(k) for k in ("model", "backend", "dtype", "vocab_size")}}
        about = {"urls": list(teacher.urls)}
    elif hasattr(teacher, "cache_manifest"):
        identity, about = dict(teacher.cache_manifest()), {}
    else:
        raise ValueError(f"teacher.cache_dir: a {type(teacher).__name__} teacher cannot be cached (its identity "
                         "is unknown: give it a cache_manifest() method, or unset teacher.cache_dir)")
    identity.update(format=FORMAT, revision=revision)
    return {"identity": identity, "about": about}


def manifest_hash(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest["identity"], sort_keys=True).encode()).hexdigest()


def request_tag(request: ScoreRequest) -> bytes:
    """The parts of a request that change the answer, as bytes (query ids are per row: see row_key)."""
    m = 0 if request.query_ids is None else int(request.query_ids.shape[-1])
    return json.dumps({"topk": int(request.topk), "temperature": float(request.temperature).hex(),
                       "entropy": bool(request.entropy), "hidden": bool(request.hidden), "query": m}).encode()


def row_key(manifest: str, tag: bytes, prompt: torch.Tensor, completion: torch.Tensor,
            query: torch.Tensor | None) -> bytes:
    """32-byte sha256 of (manifest, request tag, prompt ids, completion ids, query ids), each length-prefixed."""
    h = hashlib.sha256(f"protege-teacher-cache/{FORMAT}|{manifest}|".encode())
    h.update(struct.pack("<I", len(tag)) + tag)
    for ids in (prompt, completion, query):
        if ids is None:
            h.update(b"\xff" * 8)
            continue
        raw = ids.detach().cpu().to(torch.int64).contiguous().numpy().astype("<i8").tobytes()
        h.update(struct.pack("<Q", len(raw)) + raw)
    return h.digest()


class CachedTeacher(Wrapper):
    """A Teacher answering from a ShardStore what it holds and asking `inner` (once per call) for the rest.

    Counters since the last `take_counts()`: hits / misses (rows), teacher_calls (calls of the inner
    teacher), off_policy_rows (rows answered from the cache that this run's student did not sample:
    their source is not "student"), bytes_written and tokens_written (completion tokens of the rows
    written). A request for hidden states without cache_hidden goes to the inner teacher untouched
    (counted as misses and a call)."""

    def __init__(self, inner: Teacher, store: ShardStore, manifest: dict, *, cache_hidden: bool = False):
        self.inner = inner
        self.store = store
        self.manifest = manifest
        self.manifest_hash = store.manifest
        self.cache_hidden = cache_hidden
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.warn_off_policy = True  # once per run; protege cache-teacher (which trains nothing) turns it off

    def take_counts(self) -> dict[str, int]:
        out, self.counts = self.counts, dict.fromkeys(COUNTERS, 0)
        return out

    def score(self, rollouts: Rollouts, request: ScoreRequest) -> TeacherSignal:
        n = len(rollouts)
        if n == 0 or (request.hidden and not self.cache_hidden):
            self.counts["misses"] += n
            self.counts["teacher_calls"] += 1
            return self.inner.score(rollouts, request)
        lens = rollouts.completion_mask.sum(1).tolist()
        tag = request_tag(request)
        q = request.query_ids
        keys = [row_key(self.manifest_hash, tag, rollouts.prompt_ids[i], rollouts.completion_ids[i, :lens[i]],
                        None if q is None else q[i, :lens[i]]) for i in range(n)]
        found = [self.store.get(k) for k in keys]
        hit_rows = [i for i in range(n) if found[i] is not None]
        todo: dict[bytes, int] = {}  # key -> first row with it
        for i, k in enumerate(keys):
            if found[i] is None:
                todo.setdefault(k, i)
        if todo:
            fresh = self._ask_inner(rollouts, request, list(todo.values()))
            self.counts["bytes_written"] += self.store.put(list(todo), fresh)
            self.counts["tokens_written"] += sum(lens[i] for i in todo.values())
            got = dict(zip(todo, fresh))
            found = [f if f is not None else got[k] for k, f in zip(keys, found)]
        self._count(rollouts, hit_rows)
        return assemble(found, lens, rollouts.completion_ids.shape[1])

    def _ask_inner(self, rollouts: Rollouts, request: ScoreRequest, rows: list[int]) -> list[dict]:
        """One call of the inner teacher on `rows`; each row's fields cut to its own length."""
        sub = rollouts.select(rows)
        q = request.query_ids
        sub_q = None if q is None else q[torch.as_tensor(rows)][:, : sub.completion_ids.shape[1]]
        signal = self.inner.score(sub, replace(request, query_ids=sub_q))
        self.counts["teacher_calls"] += 1
        lens = sub.completion_mask.sum(1).tolist()
        return [{name: getattr(signal, name)[j, :lens[j]].clone() for name in FIELDS
                 if getattr(signal, name) is not None} for j in range(len(rows))]

    def _count(self, rollouts: Rollouts, hit_rows: list[int]) -> None:
        n, sources = len(rollouts), rollouts.sources
        off = [i for i in hit_rows if sources and sources[i] != "student"]
        self.counts["hits"] += len(hit_rows)
        self.counts["misses"] += n - len(hit_rows)
        self.counts["off_policy_rows"] += len(off)
        if off and self.warn_off_policy:
            self.warn_off_policy = False
            kinds = sorted({sources[i] for i in off})
            log.warning("teacher cache: %d rows of this buffer were answered from the cache and not sampled by this "
                        "run's student (source %s): they are off-policy rows (metric cache/off_policy_rows). "
                        "Precomputed completions (protege cache-teacher) are on-policy only if they were sampled "
                        "from the policy being trained.", len(off), "/".join(kinds))


def assemble(rows: list[dict[str, torch.Tensor]], lens: list[int], t: int) -> TeacherSignal:
    """A TeacherSignal (N, t, ...) from per-row fields, zero past each row's length (as the teachers pad)."""
    names = [f for f in FIELDS if f in rows[0]]
    if any(set(r) != set(names) for r in rows):
        raise ValueError("teacher cache: rows of one request hold different fields; delete the cache folder "
                         "(teacher.cache_dir) and run again")
    out = {}
    for name in names:
        ref = rows[0][name]
        full = torch.zeros((len(rows), t, *ref.shape[1:]), dtype=ref.dtype)
        for i, (r, length) in enumerate(zip(rows, lens)):
            full[i, :length] = r[name]
        out[name] = full
    return TeacherSignal(**out)


def open_cache(inner: Teacher, cache_dir: str | Path, tcfg=None, *, cache_hidden: bool = False) -> CachedTeacher:
    """`inner` behind the cache in cache_dir/<manifest hash[:32]> (manifest.json written there for people)."""
    manifest = teacher_manifest(inner, tcfg)
    digest = manifest_hash(manifest)
    folder = Path(cache_dir) / digest[:32]
    store = ShardStore(folder, digest)
    about = folder / "manifest.json"
    if not about.exists():
        from protege.teacher.cache_store import write_atomic

        write_atomic(about, json.dumps({"manifest_hash": digest, **manifest}, indent=2, default=str).encode())
    log.info("teacher cache: %s (%d rows)", folder, len(store))
    return CachedTeacher(inner, store, manifest, cache_hidden=cache_hidden)


def wrap(tcfg, teacher: Teacher) -> Teacher:
    """`teacher` behind the cache of teacher.cache_dir, or `teacher` itself when it is unset (the default)."""
    if getattr(tcfg, "cache_dir", None) is None:
        return teacher
    return open_cache(teacher, tcfg.cache_dir, tcfg, cache_hidden=tcfg.cache_hidden)


def caches_in(teacher) -> list[CachedTeacher]:
    """Every CachedTeacher in `teacher` and the teachers it wraps (.inner, .teacher, .base, .teachers)."""
    out, todo, seen = [], [teacher], set()
    while todo:
        t = todo.pop()
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, CachedTeacher):
            out.append(t)
            continue
        attrs = vars(t) if hasattr(t, "__dict__") else {}
        todo += [attrs.get(a) for a in ("inner", "teacher", "base")]
        named = attrs.get("teachers")
        todo += list(named.values()) if isinstance(named, dict) else list(named or [])
    return out


def cache_metrics(teacher) -> dict[str, int]:
    """The step's cache/<counter> metrics summed over the caches in `teacher` ({} when it has none)."""
    caches = caches_in(teacher)
    if not caches:
        return {}
    total = dict.fromkeys(COUNTERS, 0)
    for c in caches:
        for k, v in c.take_counts().items():
            total[k] += v
    return {f"cache/{k}": v for k, v in total.items()}
