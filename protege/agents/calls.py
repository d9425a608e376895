"""Environment calls of many episodes at once, in a thread pool, each with its own time limit.

A call that raises returns its exception; one still running `timeout_s` after it STARTED returns a
TimeoutError and is abandoned (Python cannot stop a thread: a hung call keeps its worker until it returns,
so a pool of `concurrency` threads loses one worker per hung call; the run goes on).
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable

_POLL_S = 0.02


class EnvCalls:
    """A thread pool for environment calls: `run(fns)` -> one (ok, value or exception) per function, in order."""

    def __init__(self, concurrency: int, timeout_s: float):
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="protege-env")
        self.timeout_s = timeout_s

    def run(self, fns: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
        started: dict[int, float] = {}

        def timed(i: int, fn: Callable[[], Any]):
            started[i] = time.monotonic()
            return fn()

        futures: dict[Future, int] = {self.pool.submit(timed, i, fn): i for i, fn in enumerate(fns)}
        out: list[tuple[bool, Any]] = [(False, None)] * len(fns)
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=_POLL_S, return_when=FIRST_COMPLETED)
            for f in done:
                e = f.exception()
                out[futures[f]] = (False, e) if e is not None else (True, f.result())
            now = time.monotonic()
            for f in list(pending):
                i = futures[f]
                if i in started and now - started[i] > self.timeout_s:
                    out[i] = (False, TimeoutError(f"the environment call took longer than {self.timeout_s:g} s"))
                    pending.discard(f)
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
