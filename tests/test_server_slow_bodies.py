"""The teacher server against slow request bodies (issue 32, item 1): clients that send a whole
request head with a large Content-Length, then one body byte every second. A real uvicorn on
127.0.0.1 with a tiny model; the attack is bounded in clients and seconds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import asyncio  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from tiny import make_model  # noqa: E402

from protege import wire  # noqa: E402
from protege.server import HFBackend, create_app  # noqa: E402
from protege.server.background import serve_in_thread  # noqa: E402

VOCAB = 128
CAP = 40  # --max-connections of the attacked server
SLOW_CLIENTS = 3 * CAP
SLOW_HEAD = (b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
             b"Content-Length: 1000000\r\n\r\n")


def _app(**settings):
    return create_app(HFBackend(make_model(1, seed=0, hidden=32, vocab=VOCAB), model_name="tiny"), max_k=8,
                      **settings)


class SlowBodies:
    """`n` clients, each sending SLOW_HEAD then one body byte per `interval_s`, reconnecting
    `reconnect_s` after the server closes them (the attacker keeps the pressure on) until stop().
    (A flood that reconnects with no pause is a connection flood: what the cap can do then is
    share the slots among everybody, which this test does not measure.)"""

    def __init__(self, url: str, n: int, interval_s: float = 1.0, reconnect_s: float = 0.5):
        host, port = url.removeprefix("http://").split(":")
        self.addr, self.n, self.interval_s, self.reconnect_s = (host, int(port)), n, interval_s, reconnect_s
        self.connects = self.closed_by_server = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _one(self) -> None:
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(*self.addr)
                self.connects += 1
                writer.write(SLOW_HEAD)
                while not self._stop.is_set():
                    await writer.drain()
                    try:  # the server's answer or close ends this connection
                        if await asyncio.wait_for(reader.read(1 << 16), self.interval_s) == b"":
                            break
                    except asyncio.TimeoutError:
                        writer.write(b" ")
                self.closed_by_server += not self._stop.is_set()
                writer.close()
            except OSError:
                pass
            await asyncio.sleep(self.reconnect_s)

    async def _main(self) -> None:
        await asyncio.gather(*(self._one() for _ in range(self.n)))

    def __enter__(self) -> "SlowBodies":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def _probe(url: str, path: str, headers: dict) -> float | None:
    """Seconds a fresh connection took to get a 200 for `path`, or None (no answer within 5 s)."""
    start = time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=5, headers=headers) as fresh:
            if path == "/health":
                ok = fresh.get(path).status_code == 200
            else:
                body = wire.encode_score_request([np.array([5, 6, 7, 8], np.int32)], [2], topk=3)
                ok = fresh.post(path, content=body, headers={"Content-Type": wire.BINARY_MEDIA_TYPE}).status_code == 200
    except httpx.HTTPError:
        return None
    return time.monotonic() - start if ok else None


@pytest.mark.parametrize("api_key", [None, "k3y"])
def test_slow_bodies_at_the_connection_cap_do_not_lock_out_health_and_scoring(api_key):
    """120 slow-body clients against a 40-connection cap (the body deadline is 1 MB / 64 KiB/s + 2 s
    = 17 s, longer than the test): every /health and /v1/score probe on a fresh connection is
    answered, because a newcomer at the cap closes the slowest body. Before: the cap refused every
    newcomer while all 40 connections were mid-body, and no probe was answered."""
    app = _app(header_timeout_s=2.0, body_timeout_s=30.0, max_connections=CAP, api_key=api_key)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with serve_in_thread(app) as server, SlowBodies(server.url, SLOW_CLIENTS) as attack:
        guard = app.state.connection_guard
        deadline = time.monotonic() + 10
        while len(guard.open) < CAP and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # the slow bodies are past the eviction grace and have sent a byte or two
        if api_key is None:
            assert len(guard.open) == CAP, "the slow clients did not fill the connection cap"
        waits = [_probe(server.url, path, headers) for _ in range(6) for path in ("/health", "/v1/score")]
        answered = [w for w in waits if w is not None]
        print(f"api_key={api_key}: {len(answered)}/{len(waits)} probes answered, slowest {max(answered or [0]):.2f} s, "
              f"{attack.connects} attacker connections, {attack.closed_by_server} closed by the server, "
              f"guard closed {guard.closed}")
        assert len(answered) == len(waits), f"only {len(answered)} of {len(waits)} probes answered"
        assert max(answered) < 5.0
        if api_key is None:
            assert guard.closed["evicted_slow_body"] >= len(waits)


def test_a_trickled_body_is_closed_at_its_size_scaled_deadline():
    """One byte every 0.5 s never trips the 1 s body idle timeout; the body deadline of
    header_timeout_s + Content-Length / min_body_rate = 1 + 1e6 / 5e5 = 3 s closes it (before: open
    for as long as the client kept trickling)."""
    app = _app(header_timeout_s=1.0, body_timeout_s=1.0, min_body_rate=5e5)
    with serve_in_thread(app) as server, SlowBodies(server.url, 1, interval_s=0.5) as attack:
        deadline = time.monotonic() + 12
        while attack.closed_by_server == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        lifetime = time.monotonic() - (deadline - 12)
        assert attack.closed_by_server >= 1, "a trickled body was still open after 12 s"
        assert 2.5 < lifetime < 6.0, lifetime
        assert app.state.connection_guard.closed["body_timeout"] >= 1
