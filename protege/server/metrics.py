"""Prometheus text metrics of the teacher server (no client library: a few counters and histograms)."""

from __future__ import annotations

import bisect
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536)


class Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, cumulative = [], 0
        sep = "," if labels else ""
        for bound, count in zip(list(self.buckets) + ["+Inf"], self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {cumulative}')
        tail = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{tail} {self.sum:.6f}", f"{name}_count{tail} {self.count}"]
        return out


class Metrics:
    def __init__(self):
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.bytes_in = 0
        self.bytes_out = 0

    def observe_request(self, route: str, status: int, seconds: float, bytes_in: int, bytes_out: int) -> None:
        self.requests[(route, status)] += 1
        self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def render(self, batcher, guard=None) -> str:
        """Exposition text; `batcher` is the server's Batcher (its stats are read, not copied), `guard`
        its protege.server.connections.ConnectionGuard when it runs under one. Status 499 counts
        clients that went away mid-request (never sent)."""
        s = batcher.stats
        lines = ["# HELP protege_requests_total HTTP requests by route and status.",
                 "# TYPE protege_requests_total counter"]
        lines += [f'protege_requests_total{{route="{r}",status="{c}"}} {n}'
                  for (r, c), n in sorted(self.requests.items())]
        lines += ["# HELP protege_request_seconds Request latency, receipt to reply.",
                  "# TYPE protege_request_seconds histogram"]
        for route, hist in sorted(self.latency.items()):
            lines += hist.lines("protege_request_seconds", f'route="{route}"')
        lines += ["# HELP protege_queue_depth Pieces waiting for the engine.", "# TYPE protege_queue_depth gauge",
                  f"protege_queue_depth {batcher.queue_depth}",
                  "# HELP protege_requests_in_flight Score requests admitted and not answered.",
                  "# TYPE protege_requests_in_flight gauge", f"protege_requests_in_flight {batcher.in_flight}",
                  "# HELP protege_batch_sequences Sequences per engine call.",
                  "# TYPE protege_batch_sequences histogram"]
        lines += s.batch_seqs.lines("protege_batch_sequences")
        lines += ["# HELP protege_batch_tokens Tokens per engine call.", "# TYPE protege_batch_tokens histogram"]
        lines += s.batch_tokens.lines("protege_batch_tokens")
        lines += ["# TYPE protege_engine_calls_total counter", f"protege_engine_calls_total {s.engine_calls}",
                  "# TYPE protege_engine_seconds_total counter", f"protege_engine_seconds_total {s.engine_seconds:.6f}",
                  "# TYPE protege_queue_wait_seconds_total counter",
                  f"protege_queue_wait_seconds_total {s.queue_wait_seconds:.6f}",
                  "# TYPE protege_scored_sequences_total counter",
                  f"protege_scored_sequences_total {s.scored_sequences}",
                  "# TYPE protege_scored_tokens_total counter", f"protege_scored_tokens_total {s.scored_tokens}",
                  "# HELP protege_tokens_per_second Tokens scored per second over the last minute.",
                  "# TYPE protege_tokens_per_second gauge",
                  f"protege_tokens_per_second {s.tokens_per_second():.3f}",
                  "# TYPE protege_request_bytes_total counter", f"protege_request_bytes_total {self.bytes_in}",
                  "# TYPE protege_response_bytes_total counter", f"protege_response_bytes_total {self.bytes_out}"]
        if guard is not None:
            lines += ["# HELP protege_connections_open Client connections open.",
                      "# TYPE protege_connections_open gauge", f"protege_connections_open {len(guard.open)}",
                      "# HELP protege_connections_closed_total Connections the server closed, by reason.",
                      "# TYPE protege_connections_closed_total counter"]
            lines += [f'protege_connections_closed_total{{reason="{r}"}} {n}' for r, n in sorted(guard.closed.items())]
            lines += ["# TYPE protege_accept_errors_total counter",
                      f"protege_accept_errors_total {guard.accept_errors}"]
        return "\n".join(lines) + "\n"
