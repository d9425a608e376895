"""The teacher server's hidden-state path: its output projection, served once, and the hash that ties replies to it.

A /v1/score request may ask for the teacher's final hidden states ("hidden_dtype": float32, float16
or bfloat16; protege.wire). With the teacher's output projection W (V, H) the client rebuilds the
exact teacher logits, z = h W^T, chunk by chunk, so full-vocabulary losses work over the network
while each token costs H numbers on the wire instead of V.

    GET /v1/output_projection   W in its own dtype as a protege wire body (version 3, crc32), streamed
                                piece by piece (no second copy of W), behind the bearer check like
                                every route; header X-Protege-Projection-Sha256 and meta "sha256"
    /v1/info                    "output_projection": {"sha256", "dtype", "shape"} (null: no projection)
    /v1/score with hidden_dtype meta "projection_sha256": the hash of the W these hidden states need

The hash (protege.wire.projection_sha256: dtype code, shape and bytes) is computed once, lazily, on
the first request that needs it. float16 hidden states are refused (422) when a value exceeds
float16's range (65504), instead of being clamped into a wrong loss: ask for bfloat16 or float32.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from protege.server.batch import RequestError, ScoreResult
from protege.wire import BINARY_MEDIA_TYPE, FP16_MAX, encode_projection

SHA_HEADER = "X-Protege-Projection-Sha256"
_PIECE = 8 << 20  # bytes per streamed piece


class Projection:
    """The output projection of a backend (its `model`'s lm_head), encoded and hashed on first use."""

    def __init__(self, weight):
        self._weight = weight  # (V, H) torch tensor, on the backend's device
        self._lock = threading.Lock()
        self._parts: list[memoryview] | None = None
        self.sha256: str | None = None

    def encoded(self) -> tuple[list[memoryview], str]:
        """(body pieces, sha256), built once (thread-safe; run it off the event loop)."""
        with self._lock:
            if self._parts is None:
                self._parts, self.sha256 = encode_projection(self._weight)
            return self._parts, self.sha256

    def describe(self) -> dict:
        """{"sha256", "dtype", "shape"} for /v1/info."""
        parts, sha = self.encoded()
        return {"sha256": sha, "dtype": str(self._weight.dtype).removeprefix("torch."),
                "shape": list(self._weight.shape), "bytes": sum(len(p) for p in parts)}


def of(request: Request) -> Projection | None:
    """The app's Projection (made on first use), or None when the backend has no in-process model (vllm)."""
    state = request.app.state
    if not hasattr(state, "projection"):
        backend = state.served.backend
        state.projection = None
        if getattr(backend, "model", None) is not None and getattr(backend, "name", None) == "hf":
            from protege.forward import output_weight

            state.projection = Projection(output_weight(backend.model))
    return state.projection


async def info(request: Request) -> dict | None:
    """/v1/info's "output_projection" entry (None without one)."""
    projection = of(request)
    return None if projection is None else await asyncio.to_thread(projection.describe)


async def output_projection(request: Request) -> Response:
    """GET /v1/output_projection: the projection document, streamed."""
    projection = of(request)
    if projection is None:
        raise RequestError(404, "this teacher server has no output projection to serve (the vllm backend gives no "
                                "hidden states); serve the teacher with --backend hf for loss.support=full")
    parts, sha = await asyncio.to_thread(projection.encoded)
    size = sum(len(p) for p in parts)

    def pieces():
        for part in parts:
            for start in range(0, len(part), _PIECE):
                yield bytes(part[start:start + _PIECE])

    return StreamingResponse(pieces(), media_type=BINARY_MEDIA_TYPE,
                             headers={"Content-Length": str(size), SHA_HEADER: sha})


async def hidden_meta(request: Request, result: ScoreResult, hidden_dtype: str) -> dict:
    """The reply meta that ties hidden states to a projection; 422 when float16 cannot hold them."""
    projection = of(request)
    if projection is None or "hidden_states" not in result:
        raise RequestError(422, "hidden_dtype: this teacher server cannot give hidden states (no in-process model); "
                                "serve it with --backend hf")
    hidden = result["hidden_states"]
    if hidden_dtype == "float16" and hidden.size:
        top = float(np.abs(hidden).max())
        if not top <= FP16_MAX:
            raise RequestError(422, f"hidden_dtype=float16: the teacher's hidden states reach |h| = {top:g}, beyond "
                                    f"float16's range ({FP16_MAX:g}); ask for bfloat16 or float32 "
                                    "(teacher.hidden_dtype)")
    _, sha = await asyncio.to_thread(projection.encoded)
    return {"projection_sha256": sha}
