"""The HTTP side of a remote teacher: several replicas of one server, load-balanced, with retries.

`Replicas.request(method, path, check=...)` returns check(response) of the first good reply. It picks the
least busy replica (round robin among equals) and moves to another after a failure; it retries with
jittered exponential backoff on network errors, 5xx and 429 (honouring Retry-After up to the budget,
protege.teacher.replies.retry_wait) and on replies that fail `check` (InvalidReply, at most
max_invalid_replies times); a 4xx raises TeacherRefused at once. Out of budget (max_retries attempts or
max_wait_s seconds) it raises TeacherUnavailable naming the URLs, or TeacherReplyError for bad replies.
"""

from __future__ import annotations

import logging
import random
import threading
import time

import httpx

from protege.teacher.replies import (InvalidReply, TeacherReplyError, error_message, retry_after_seconds,
                                     retry_wait)

log = logging.getLogger("protege")


class TeacherUnavailable(ConnectionError):
    """No teacher server answered within teacher.max_wait_s."""


class TeacherRefused(ValueError):
    """A teacher server refused a request (HTTP 4xx): retrying cannot help."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Replicas:
    """The servers behind teacher.urls, one httpx client, and the retry policy."""

    def __init__(self, urls: list[str], *, api_key: str | None, timeout: float, concurrency: int, max_retries: int,
                 max_wait_s: float, max_invalid_replies: int):
        self.urls, self.max_retries, self.max_wait_s = urls, max_retries, max_wait_s
        self.max_invalid_replies = max_invalid_replies
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                                    limits=httpx.Limits(max_connections=concurrency * len(urls) + 4))
        self._busy = [0] * len(urls)  # requests in flight per replica
        self._lock = threading.Lock()
        self._next = 0
        self.invalid_replies_retried = 0  # damaged replies a retry replaced, since take_retried()

    def take_retried(self) -> int:
        """Damaged replies that a retry replaced since the last call (then reset)."""
        with self._lock:
            n, self.invalid_replies_retried = self.invalid_replies_retried, 0
        return n

    def close(self) -> None:
        self._client.close()

    def _pick(self, avoid: int | None) -> int:
        with self._lock:
            order = sorted(range(len(self.urls)), key=lambda j: (self._busy[j], (j - self._next) % len(self.urls)))
            if avoid is not None and len(order) > 1 and order[0] == avoid:
                order = order[1:] + order[:1]
            j = order[0]
            self._busy[j] += 1
            self._next = (j + 1) % len(self.urls)
            return j

    def request(self, method: str, path: str, *, check=None, **kwargs):
        """check(response) of the first good reply: retried with backoff on network errors, 5xx, 429 and
        replies that fail `check` (InvalidReply, at most max_invalid_replies times); a 4xx raises at once."""
        start = time.monotonic()
        failed, attempt, invalid, last = None, 0, 0, "no attempt made"
        while True:
            j = self._pick(failed)
            url = self.urls[j] + path
            try:
                ok, result, retry_after = self._attempt(method, url, check, kwargs)
            finally:
                with self._lock:
                    self._busy[j] -= 1
            if ok:
                if invalid:
                    with self._lock:
                        self.invalid_replies_retried += invalid
                    log.warning("teacher reply from %s was damaged %d time(s), retried and answered well (%s)", url,
                                invalid, last)
                return result
            bad_reply = isinstance(result, InvalidReply)
            invalid += bad_reply
            last = (f"{url}: invalid reply: {result}" if bad_reply else result).replace("\n", " ")
            failed, attempt = j, attempt + 1
            elapsed = time.monotonic() - start
            backoff = min(10.0, 0.25 * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
            delay, note = retry_wait(retry_after, backoff, self.max_wait_s - elapsed, self.max_wait_s)
            if note:
                last = f"{last} ({note})"
                log.warning("teacher server %s: %s", url, note)
            out_of_budget = attempt > self.max_retries or elapsed + delay > self.max_wait_s or (
                retry_after is not None and elapsed >= self.max_wait_s)
            if bad_reply and (invalid > self.max_invalid_replies or out_of_budget):
                raise TeacherReplyError(url, result, invalid)
            if out_of_budget:
                raise TeacherUnavailable(
                    f"no answer from the teacher server{'s' if len(self.urls) > 1 else ''} {', '.join(self.urls)} "
                    f"after {attempt} attempts in {elapsed:.1f} s (last error: {last}). Start the server (protege "
                    "serve-teacher, or vllm serve) or fix teacher.urls; a run waits for it up to "
                    f"teacher.max_wait_s={self.max_wait_s:g} s (max_retries={self.max_retries}).")
            time.sleep(delay)

    def _attempt(self, method: str, url: str, check, kwargs) -> tuple[bool, object, float | None]:
        """(True, check(response), None), or (False, what went wrong: str or InvalidReply, Retry-After)."""
        try:
            response = self._client.request(method, url, **kwargs)
        except httpx.TransportError as exc:  # refused, reset, timed out: the server may be (re)starting
            return False, f"{url}: {type(exc).__name__}: {exc}", None
        status = response.status_code
        if status >= 500 or status == 429:
            return False, f"{url}: HTTP {status}: {error_message(response)}", retry_after_seconds(
                response.headers.get("retry-after"))
        if status >= 400:
            raise TeacherRefused(f"teacher server refused the request ({url}, HTTP {status}): "
                                 f"{error_message(response)}", status)
        try:
            return True, check(response) if check is not None else response, None
        except InvalidReply as exc:
            return False, exc, None

