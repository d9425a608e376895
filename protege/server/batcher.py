"""Micro-batcher: merges concurrent score requests into few engine calls, off the event loop.

Requests are split into pieces that fit one engine call (at most `max_batch_seqs` rows and
`max_batch_tokens` tokens), and the pieces go into an asyncio.Queue. One task drains it: it takes
the oldest piece, then keeps taking pieces for up to `batch_wait_ms` or until the next piece would
break a cap; a piece that does not fit waits at the head for the next call (FIFO, never starved).
The batch runs in a single worker thread (the engine is not re-entrant, and the event loop stays
free to accept requests meanwhile); rows are grouped by temperature, each group padded to its
largest k and query width, scored in one call and split back. If that call fails, each caller's
piece is scored alone, so an error reaches only the future of the request that caused it (and a
batch too large for the engine's memory still gets through). With `batching=False` every request
is scored on its own (the baseline).

The queue is bounded by `max_queue` requests in the server (queued or running): one more raises
`Overloaded`, which the app answers with 503 and Retry-After.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass, field

import numpy as np

from protege.server.backends import Backend
from protege.server.batch import Batch, ScoreResult
from protege.server.metrics import BATCH_BUCKETS, TOKEN_BUCKETS, Histogram


class Overloaded(Exception):
    """The queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float):
        super().__init__(f"server busy: queue full, retry after {retry_after:.0f} s")
        self.retry_after = retry_after


@dataclass
class _Piece:
    batch: Batch  # rows of one request that fit one engine call
    tokens: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatcherStats:
    """Counters read by /metrics."""

    engine_calls: int = 0
    engine_seconds: float = 0.0
    scored_sequences: int = 0
    scored_tokens: int = 0
    batch_seqs: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))  # sequences per call
    batch_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))  # tokens per call
    queue_wait_seconds: float = 0.0
    recent: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens) for tokens/s

    def record(self, seqs: int, tokens: int, seconds: float) -> None:
        self.engine_calls += 1
        self.engine_seconds += seconds
        self.scored_sequences += seqs
        self.scored_tokens += tokens
        self.batch_seqs.observe(seqs)
        self.batch_tokens.observe(tokens)
        now = time.monotonic()
        self.recent.append((now, tokens))
        self.recent = [(t, n) for t, n in self.recent if now - t <= 60.0]

    def tokens_per_second(self, window: float = 60.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in self.recent if now - t <= window]
        if not recent:
            return 0.0
        return sum(n for _, n in recent) / max(now - recent[0][0], 1.0)


class Batcher:
    def __init__(self, backend: Backend, *, max_batch_seqs: int = 64, max_batch_tokens: int = 16384,
                 batch_wait_ms: float = 5.0, max_queue: int = 256, batching: bool = True):
        if max_batch_seqs < 1 or max_batch_tokens < 1:
            raise ValueError("max_batch_seqs and max_batch_tokens must be >= 1")
        self.backend = backend
        self.max_batch_seqs = max_batch_seqs
        self.max_batch_tokens = max_batch_tokens
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self.batching = batching
        self.stats = BatcherStats()
        self.in_flight = 0  # requests admitted and not answered
        self._queue: asyncio.Queue[_Piece] | None = None
        self._held: _Piece | None = None  # a piece that did not fit the last batch: next batch starts with it
        self._task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="protege-engine")

    @property
    def running(self) -> bool:
        """Whether the task that drains the queue is alive (started and not stopped or crashed)."""
        return self._task is not None and not self._task.done()

    @property
    def queue_depth(self) -> int:
        return (self._queue.qsize() if self._queue else 0) + (self._held is not None)

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="protege-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def score(self, batch: Batch) -> ScoreResult:
        """Score one request's rows (split into pieces as needed); raises Overloaded when full."""
        if self.in_flight >= self.max_queue:
            raise Overloaded(retry_after=max(1.0, self.stats.engine_seconds / max(self.stats.engine_calls, 1)))
        if not self.running:
            raise RuntimeError("batcher is not running (server shutting down?)")
        self.in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            pieces = [_Piece(piece, tokens, loop.create_future()) for piece, tokens in self._split(batch)]
            for piece in pieces:
                self._queue.put_nowait(piece)
            results = await asyncio.gather(*(p.future for p in pieces))
        finally:
            self.in_flight -= 1
        return results[0] if len(results) == 1 else _concat(results)

    async def run_exclusive(self, fn):
        """fn() in the engine thread, between score batches (the engine is not re-entrant): for engine work
        that is not scoring, e.g. the OpenAI routes' generation (protege.server.openai_generate)."""
        if not self.running:
            raise RuntimeError("batcher is not running (server shutting down?)")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _split(self, batch: Batch) -> list[tuple[Batch, int]]:
        """Consecutive row ranges of `batch` within the per-call sequence and token caps."""
        if not self.batching:  # baseline: the request as it came, one engine call
            return [(batch, sum(len(s) for s in batch.sequences))]
        out, start, tokens = [], 0, 0
        for i, seq in enumerate(batch.sequences):
            if i > start and (i - start >= self.max_batch_seqs or tokens + len(seq) > self.max_batch_tokens):
                out.append((_rows(batch, start, i), tokens))
                start, tokens = i, 0
            tokens += len(seq)
        out.append((_rows(batch, start, len(batch.sequences)), tokens))
        return out

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = self._held or await self._queue.get()
            self._held = None
            pieces, seqs, tokens = [first], len(first.batch.sequences), first.tokens
            deadline = loop.time() + self.batch_wait_s
            while self.batching:
                try:
                    if self._queue.empty():
                        remaining = deadline - loop.time()
                        if remaining <= 0:
                            break
                        piece = await asyncio.wait_for(self._queue.get(), remaining)
                    else:
                        piece = self._queue.get_nowait()
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                n = len(piece.batch.sequences)
                if seqs + n > self.max_batch_seqs or tokens + piece.tokens > self.max_batch_tokens:
                    self._held = piece
                    break
                pieces.append(piece)
                seqs, tokens = seqs + n, tokens + piece.tokens
            pieces = [p for p in pieces if not p.future.done()]  # a caller that went away
            if not pieces:
                continue
            now = time.perf_counter()
            self.stats.queue_wait_seconds += sum(now - p.enqueued for p in pieces)
            try:
                outcomes = await loop.run_in_executor(self._executor, self._score_pieces, pieces)
            except Exception as exc:  # the executor itself failed: every caller of this batch hears it
                outcomes = [exc] * len(pieces)
            for piece, outcome in zip(pieces, outcomes):
                if piece.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    piece.future.set_exception(outcome)
                else:
                    piece.future.set_result(outcome)

    def _score_pieces(self, pieces: list[_Piece]) -> list[dict | BaseException]:
        """Worker thread: one engine call per temperature; results (or that call's error) per piece."""
        outcomes: list[dict | BaseException | None] = [None] * len(pieces)
        groups: dict[float, list[int]] = {}
        for i, piece in enumerate(pieces):
            groups.setdefault(piece.batch.temperature, []).append(i)
        for temperature, members in groups.items():
            try:
                results = self._call([pieces[i] for i in members], temperature)
            except Exception:  # noqa: BLE001 - whose rows broke it? score each caller alone
                results = []
                for i in members:
                    try:
                        results.extend(self._call([pieces[i]], temperature))
                    except Exception as exc:  # noqa: BLE001 - this caller's own error
                        results.append(exc)
            for i, outcome in zip(members, results):
                outcomes[i] = outcome
        return outcomes

    def _call(self, pieces: list[_Piece], temperature: float) -> list[ScoreResult]:
        """One engine call over `pieces`, split back per piece."""
        batches = [p.batch for p in pieces]
        merged = _merge(batches, temperature)
        start = time.perf_counter()
        result = self.backend.score(merged)
        self.stats.record(len(merged.sequences), sum(p.tokens for p in pieces), time.perf_counter() - start)
        out, row = [], 0
        for b in batches:
            n = len(b.sequences)
            out.append(_slice(result, row, row + n, b))
            row += n
        return out


def _rows(batch: Batch, start: int, stop: int) -> Batch:
    return Batch(sequences=batch.sequences[start:stop], prompt_lengths=batch.prompt_lengths[start:stop],
                 topk=batch.topk, temperature=batch.temperature, hidden=batch.hidden,
                 query_ids=None if batch.query_ids is None else batch.query_ids[start:stop])


def _merge(batches: list[Batch], temperature: float) -> Batch:
    """One Batch from several: k = the largest k; query widths padded with id 0 to the widest; hidden states
    when any asks."""
    k = max(b.topk for b in batches)
    widths = [b.query_ids[0].shape[1] for b in batches if b.query_ids is not None]
    query = None
    if widths:
        m = max(widths)
        query = []
        for b in batches:
            if b.query_ids is None:
                query.extend(np.zeros((len(s) - p, m), np.int32) for s, p in zip(b.sequences, b.prompt_lengths))
            else:
                query.extend(q if q.shape[1] == m else np.pad(q, ((0, 0), (0, m - q.shape[1]))) for q in b.query_ids)
    return Batch(sequences=[s for b in batches for s in b.sequences],
                 prompt_lengths=[p for b in batches for p in b.prompt_lengths],
                 topk=k, query_ids=query, temperature=temperature, hidden=any(b.hidden for b in batches))


def _slice(result: ScoreResult, start: int, stop: int, batch: Batch) -> ScoreResult:
    """Rows start:stop of a merged result, trimmed back to what `batch` asked for."""
    lengths = result["completion_lengths"][start:stop]
    t = int(lengths.max()) if len(lengths) else 0
    out = {"completion_lengths": lengths, "token_logprobs": result["token_logprobs"][start:stop, :t]}
    if batch.topk:
        out["topk_ids"] = result["topk_ids"][start:stop, :t, :batch.topk]
        out["topk_logprobs"] = result["topk_logprobs"][start:stop, :t, :batch.topk]
    if batch.query_ids is not None:
        out["query_logprobs"] = result["query_logprobs"][start:stop, :t, :batch.query_ids[0].shape[1]]
    if batch.hidden:
        out["hidden_states"] = result["hidden_states"][start:stop, :t]
    return out


def _concat(results: list[ScoreResult]) -> ScoreResult:
    """Row-wise concatenation of piece results, re-padded to the longest completion."""
    t = max(r["token_logprobs"].shape[1] for r in results)
    out = {}
    for name in results[0]:
        parts = [r[name] for r in results]
        if name != "completion_lengths":
            parts = [np.pad(a, [(0, 0), (0, t - a.shape[1])] + [(0, 0)] * (a.ndim - 2)) for a in parts]
        out[name] = np.concatenate(parts)
    return out
