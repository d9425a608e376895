"""Connection guards for the teacher server on uvicorn: slow or idle clients cannot lock others out.

uvicorn (0.54, h11) closes a kept-alive connection that stays idle for `timeout_keep_alive`, but it
has no deadline for a request head: a client that connects and sends half a header holds its
socket forever, and a thousand such clients exhaust the process's open files, after which asyncio
can accept nobody (/health and scoring time out) and logs "socket.accept() out of system resource"
with a traceback hundreds of times a second. `limit_concurrency` does not help: it counts those
stalled connections too and answers everybody else 503. What this module adds:

- a request-head deadline (`header_timeout_s`): a connection that has not delivered a complete
  request head within it, counted from connect or from the first byte after its previous
  response, is closed;
- a request-body deadline scaled by its size: a body must be complete within
  `header_timeout_s + Content-Length / min_body_rate` seconds of its head (a body without a
  Content-Length gets `header_timeout_s + max_body_bytes / min_body_rate`), else the connection is
  closed; a client that trickles one byte every few seconds cannot hold a socket for minutes;
- a connection cap (`max_connections`): one more connection closes the oldest connection that
  has waited over `evict_grace_s` for a request head (stalled or idle); when there is none, the
  one whose request body is furthest behind `min_body_rate`, else the oldest waiting for a head;
  when every connection is being answered or sends its body fast enough, the new one is refused;
  the cap is lowered at start to what the open-file limit allows;
- when accept fails anyway for lack of file descriptors (EMFILE, ENFILE, ENOBUFS, ENOMEM), the
  connections that have waited longest for a head are closed so that accepting can resume, and
  the error is logged once per `log_interval_s` with a count, never per attempt.

The body of a request has its own idle timeout in the app (ServerSettings.body_timeout_s).

    >>> server = build_server(app, settings, host="127.0.0.1", port=8000)   # a uvicorn.Server
    >>> server.run()
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("protege.server")

ACCEPT_ERROR = "socket.accept() out of system resource"  # asyncio's message for EMFILE & co
FD_RESERVE = 64  # descriptors kept free for everything but client sockets (model files, logs, pipes)


class ConnectionGuard:
    """Open connections oldest first, their deadlines, and counters read by /metrics."""

    def __init__(self, *, header_timeout_s: float, max_connections: int, log_interval_s: float = 60.0,
                 evict_grace_s: float = 0.5, min_body_rate: float = 65536.0, max_body_bytes: int = 64 << 20):
        if header_timeout_s <= 0 or max_connections < 1 or min_body_rate <= 0:
            raise ValueError("header_timeout_s and min_body_rate must be > 0 and max_connections >= 1")
        self.header_timeout_s = header_timeout_s
        self.min_body_rate = min_body_rate  # bytes/s a request body must average (its deadline's slope)
        self.max_body_bytes = max_body_bytes  # the deadline of a body of unknown size
        self.max_connections = max_connections
        self.log_interval_s = log_interval_s
        self.evict_grace_s = evict_grace_s  # a just-accepted connection is not closed by an accept error
        self.open: dict[GuardedH11Protocol, None] = {}  # insertion order = oldest first
        self.closed = {"header_timeout": 0, "body_timeout": 0, "evicted": 0, "evicted_slow_body": 0, "refused": 0}
        self.accept_errors = 0
        self._unlogged = 0
        self._last_log: dict[str, float] = {}

    def protocol_class(self) -> type:
        """An H11Protocol subclass bound to this guard (uvicorn's `http` setting)."""
        return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": self})

    def admit(self, protocol: GuardedH11Protocol) -> bool:
        """Register a new connection; at the cap close the oldest one waiting for a head, else the body
        furthest behind min_body_rate, else refuse the new one (see evictable)."""
        if len(self.open) >= self.max_connections:
            victim, reason = self.evictable(time.monotonic())
            if victim is None:
                self.closed["refused"] += 1
                self._warn("cap", "%d connections open (--max-connections), all mid-request: refusing new ones",
                           len(self.open))
                return False
            self.closed[reason] += 1
            self._warn(reason, "%d connections open (--max-connections): closing the %s", len(self.open),
                       "oldest ones still waiting for a request head" if reason == "evicted" else
                       "ones whose request body arrives slowest (under --min-body-rate)")
            victim.close()
        self.open[protocol] = None
        return True

    def evictable(self, now: float) -> tuple[GuardedH11Protocol | None, str]:
        """The connection to close for a newcomer, and the reason counted for it.

        First the oldest one that has waited over evict_grace_s for a request head; else the one
        whose request body is furthest behind the schedule size(t) = min_body_rate * t since its
        head: deficit = min_body_rate * t - body_bytes > 0; else the oldest one waiting for a head
        however young. A connection being answered, or whose body keeps up with min_body_rate, is
        never closed (a newcomer is then refused). While slow bodies hold the cap, a client that
        has just connected and is about to send its head is not pushed out by the slow-body
        clients' reconnects: they push out each other.
        """
        oldest = next((p for p in self.open if p.waiting_since is not None), None)
        if oldest is not None and now - oldest.waiting_since >= self.evict_grace_s:
            return oldest, "evicted"
        deficits = [(self.min_body_rate * (now - p.body_since) - p.body_bytes, p) for p in self.open
                    if p.body_since is not None]
        worst = max(deficits, key=lambda dp: dp[0], default=(0.0, None))
        if worst[0] > 0:
            return worst[1], "evicted_slow_body"
        return oldest, "evicted" if oldest is not None else "refused"

    def body_deadline_s(self, content_length: int | None) -> float:
        """Seconds a request body may take: header_timeout_s + size / min_body_rate."""
        size = self.max_body_bytes if content_length is None else min(content_length, self.max_body_bytes)
        return self.header_timeout_s + size / self.min_body_rate

    def forget(self, protocol: GuardedH11Protocol) -> None:
        self.open.pop(protocol, None)

    def evict_waiting(self, now: float) -> int:
        """Close every connection that has waited over evict_grace_s for a request head."""
        stale = [p for p in self.open if p.waiting_since is not None and now - p.waiting_since >= self.evict_grace_s]
        for p in stale:
            p.close()
        self.closed["evicted"] += len(stale)
        return len(stale)

    def handle_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """The event loop's exception handler: accept errors free descriptors and are logged once per interval."""
        if context.get("message") != ACCEPT_ERROR:
            loop.default_exception_handler(context)
            return
        self.accept_errors += 1
        self._unlogged += 1
        freed = self.evict_waiting(time.monotonic())
        if self._warn("accept", "cannot accept connections: %s (%d times since the last report); closed %d "
                      "connections waiting for a request head. Raise the open-file limit (ulimit -n) or lower "
                      "--max-connections", context.get("exception"), self._unlogged, freed):
            self._unlogged = 0

    def install(self) -> None:
        """Use handle_loop_exception on the running loop (call from inside it, at server start)."""
        asyncio.get_running_loop().set_exception_handler(self.handle_loop_exception)

    def _warn(self, kind: str, message: str, *args) -> bool:
        now = time.monotonic()
        if now - self._last_log.get(kind, -float("inf")) < self.log_interval_s:
            return False
        self._last_log[kind] = now
        log.warning(message, *args)
        return True


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and a place under the guard's cap.

    `waiting_since` is the monotonic time since which the connection waits for a request head
    (None while a request is being answered): set at connect and at the first byte after a
    response; the deadline timer runs while it is set. `body_since` is the time its current
    request's head arrived while that request's body is still arriving (None otherwise), and
    `body_bytes` how much of the body has come; the body deadline timer runs while it is set.
    """

    guard: ConnectionGuard

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.waiting_since: float | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self.body_since: float | None = None
        self.body_bytes = 0
        self._body_timer: asyncio.TimerHandle | None = None
        if not self.guard.admit(self):
            self.transport.close()
            return
        self._start_waiting()

    def data_received(self, data: bytes) -> None:
        cycle_before = self.cycle
        buffered_before = len(cycle_before.body) if cycle_before is not None else 0
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            if self.waiting_since is not None:  # a complete head arrived: the request is the app's now
                self._stop_waiting()
                self._start_body()
            if self.body_since is not None:  # body bytes h11 appended to the cycle's buffer (the app drains it)
                self.body_bytes += len(self.cycle.body) - (buffered_before if self.cycle is cycle_before else 0)
                if not self.cycle.more_body:
                    self._stop_body()
        elif self.waiting_since is None:
            self._stop_body()
            self._start_waiting()  # first bytes of a next request (or of a body after the response)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        self._stop_body()
        self.guard.forget(self)
        super().connection_lost(exc)

    def close(self) -> None:
        self._stop_waiting()
        self._stop_body()
        self.guard.forget(self)  # at once: a second new connection in this loop step must not count it
        if not self.transport.is_closing():
            self.transport.close()

    def _start_waiting(self) -> None:
        self.waiting_since = time.monotonic()
        self._head_timer = self.loop.call_later(self.guard.header_timeout_s, self._head_timeout)

    def _stop_waiting(self) -> None:
        self.waiting_since = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _start_body(self) -> None:
        if not self.cycle.more_body:
            return  # the whole body came with the head (or there is none)
        declared = dict(self.cycle.scope["headers"]).get(b"content-length", b"")
        self.body_since, self.body_bytes = time.monotonic(), 0
        deadline = self.guard.body_deadline_s(int(declared) if declared.isdigit() else None)
        self._body_timer = self.loop.call_later(deadline, self._body_timeout)

    def _stop_body(self) -> None:
        self.body_since = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self.body_since is not None:
            self.guard.closed["body_timeout"] += 1
            self.close()

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.waiting_since is not None:
            self.guard.closed["header_timeout"] += 1
            self.close()


def fd_budget(requested: int) -> int:
    """`requested` connections, or fewer when the open-file limit cannot hold them (FD_RESERVE kept)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: assume a small process
        in_use = 32
    budget = max(1, soft - in_use - FD_RESERVE)
    if budget < requested:
        log.warning("max_connections %d lowered to %d: the open-file limit is %d and %d are in use "
                    "(raise it with ulimit -n)", requested, budget, soft, in_use)
    return min(requested, budget)


def raise_open_file_limit(target: int = 65536) -> int:
    """Raise the soft open-file limit toward the hard one (at most `target`); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(hard, target)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want
        except (ValueError, OSError):
            pass
    return soft


class GuardedServer(uvicorn.Server):
    """uvicorn.Server that installs its guard's loop exception handler before listening."""

    def __init__(self, config: uvicorn.Config, guard: ConnectionGuard):
        super().__init__(config)
        self.guard = guard

    async def startup(self, sockets=None) -> None:
        self.guard.install()
        await super().startup(sockets=sockets)


def build_server(app, settings=None, **config_kwargs) -> GuardedServer:
    """A uvicorn server for `app` with the guards of `settings` (ServerSettings; default: the app's own,
    app.state.settings as create_app stores it). config_kwargs go to uvicorn.Config (host, port, log_level;
    they win over the settings')."""
    if settings is None:
        settings = getattr(getattr(app, "state", None), "settings", None)
    if settings is None:
        from protege.server.app import ServerSettings

        settings = ServerSettings()
    guard = ConnectionGuard(header_timeout_s=settings.header_timeout_s,
                            max_connections=fd_budget(settings.max_connections),
                            log_interval_s=settings.log_interval_s, min_body_rate=settings.min_body_rate,
                            max_body_bytes=settings.max_body_bytes)
    if hasattr(app, "state"):
        app.state.connection_guard = guard  # read by /metrics
    kwargs = {"http": guard.protocol_class(), "timeout_keep_alive": settings.keep_alive_s,
              "timeout_graceful_shutdown": settings.graceful_shutdown_s, **config_kwargs}
    return GuardedServer(uvicorn.Config(app, **kwargs), guard)
