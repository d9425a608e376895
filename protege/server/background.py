"""Run an ASGI app on uvicorn in a background thread (tests, notebooks, benchmarks).

    >>> server = serve_in_thread(create_app(backend))       # a free port on 127.0.0.1
    >>> server.url                                          # 'http://127.0.0.1:41234'
    >>> server.stop()

The server runs under the connection guards of the app's ServerSettings (protege.server.connections:
request-head deadline, connection cap, rate-limited accept errors), as `protege serve-teacher` does.

`sock` lets a caller reserve the port first: a bound socket that is not listening refuses
connections until the server starts on it (how the client-retry test simulates a late server).
"""

from __future__ import annotations

import socket
import threading
import time

from protege.server.connections import build_server


def reserve_port(host: str = "127.0.0.1") -> socket.socket:
    """A socket bound to a free port, not yet listening (connections to it are refused)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


class ServerThread:
    def __init__(self, app, *, sock: socket.socket | None = None, host: str = "127.0.0.1",
                 startup_timeout: float = 30.0, log_level: str = "warning"):
        self.sock = sock or reserve_port(host)
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self.server = build_server(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"uvicorn-{port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start within {startup_timeout} s")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_thread(app, **kwargs) -> ServerThread:
    return ServerThread(app, **kwargs)
