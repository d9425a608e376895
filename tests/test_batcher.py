"""The server's micro-batcher, checked by engine-call counts and an independent reference (issue 17):
concurrent callers are merged into fewer engine calls, each still gets exactly its own rows (a plain
HF forward + log_softmax written here, not protege's score_rows), a poisoned request merged into a
batch fails only its own caller, and bearer auth guards every route but /health."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import concurrent.futures  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from starlette.routing import Route  # noqa: E402
from tiny import make_model  # noqa: E402

from protege import wire  # noqa: E402
from protege.server import HFBackend, create_app  # noqa: E402
from protege.server.background import serve_in_thread  # noqa: E402

VOCAB = 128
POISON = 13  # a token id the counting engine refuses (only batches that hold it fail)
TEMPERATURE = 0.7
ATOL = 1e-5
BIN = {"Content-Type": wire.BINARY_MEDIA_TYPE}


class CountingBackend(HFBackend):
    """The real HFBackend, recording the rows of every engine call. The first call holds until
    `release` is set (an engine busy with an earlier batch, so that later requests queue up), and a
    batch holding the POISON token raises, as an engine would for input it cannot take."""

    def __init__(self, model):
        super().__init__(model, model_name="counting")
        self.calls: list[list[tuple[int, ...]]] = []
        self.release = threading.Event()

    def score(self, batch):
        self.calls.append([tuple(int(t) for t in s) for s in batch.sequences])
        if len(self.calls) == 1:
            self.release.wait(timeout=60)
        if any(POISON in s for s in batch.sequences):
            raise ValueError(f"poisoned input: token {POISON}")
        return super().score(batch)


@pytest.fixture(scope="module")
def model():
    return make_model(2, seed=3, hidden=32, vocab=VOCAB).eval()


def reference(model, seq: np.ndarray, p: int, topk: int, query: np.ndarray | None) -> dict[str, torch.Tensor]:
    """One row alone through the HF model: log_softmax(logits / T) at the positions that predict
    seq[p:], the actual tokens' logprobs, the top-k, and the logprobs at `query` ids (C, M)."""
    with torch.no_grad():
        logits = model(torch.tensor(seq[None].astype(np.int64))).logits[0].float()  # (L, V)
    lp = torch.log_softmax(logits[p - 1:len(seq) - 1] / TEMPERATURE, dim=-1)  # (C, V)
    out = {"token": lp.gather(-1, torch.tensor(seq[p:].astype(np.int64))[:, None])[:, 0]}
    out["topk_logprobs"], out["topk_ids"] = lp.topk(topk, dim=-1)
    if query is not None:
        out["query"] = lp.gather(-1, torch.tensor(query.astype(np.int64)))
    return out


def make_request(cid: int, poisoned: bool = False):
    """Client `cid`'s rows: 1-3 sequences of varied lengths, its own top-k, query ids on odd clients."""
    rng = np.random.default_rng(1000 + cid)
    n = 1 + cid % 3
    seqs = [rng.integers(20, VOCAB, int(rng.integers(5, 24))).astype(np.int32) for _ in range(n)]  # no POISON
    if poisoned:
        seqs[0][2] = POISON
    plens = [int(rng.integers(1, len(s))) for s in seqs]
    query = None
    if cid % 2:
        query = [rng.integers(0, VOCAB, (len(s) - p, 1 + cid % 3)).astype(np.int32) for s, p in zip(seqs, plens)]
    return seqs, plens, 1 + cid % 4, query


def post(url: str, request) -> httpx.Response:
    seqs, plens, topk, query = request
    body = wire.encode_score_request(seqs, plens, topk=topk, temperature=TEMPERATURE,
                                     query_ids=None if query is None else np.concatenate(query))
    with httpx.Client(base_url=url, timeout=60) as c:
        return c.post("/v1/score", content=body, headers=BIN)


def check_rows(model, request, response: httpx.Response) -> None:
    """The reply holds exactly this request's rows, equal to the plain HF reference."""
    assert response.status_code == 200, response.text
    seqs, plens, topk, query = request
    got = wire.decode_score_response(response.content, response.headers["content-type"])[1]
    assert got["completion_lengths"].tolist() == [len(s) - p for s, p in zip(seqs, plens)]
    assert got["topk_ids"].shape[-1] == topk and ("query_logprobs" in got) == (query is not None)
    for i, (s, p) in enumerate(zip(seqs, plens)):
        c = len(s) - p
        ref = reference(model, s, p, topk, None if query is None else query[i])
        torch.testing.assert_close(got["token_logprobs"][i, :c], ref["token"], atol=ATOL, rtol=0)
        assert torch.equal(got["topk_ids"][i, :c], ref["topk_ids"])
        torch.testing.assert_close(got["topk_logprobs"][i, :c], ref["topk_logprobs"], atol=ATOL, rtol=0)
        if query is not None:
            torch.testing.assert_close(got["query_logprobs"][i, :c, :query[i].shape[1]], ref["query"],
                                       atol=ATOL, rtol=0)


def run_behind_a_busy_engine(app, backend: CountingBackend, url: str, requests: list) -> list[httpx.Response]:
    """Send one blocker request, wait until the engine holds it, send `requests` at once, wait until
    the server has admitted all of them (they queue behind the busy engine), then let the engine go."""
    batcher = app.state.batcher
    with concurrent.futures.ThreadPoolExecutor(len(requests) + 1) as pool:
        blocker = pool.submit(post, url, make_request(99))
        deadline = time.monotonic() + 30
        while not backend.calls:
            assert time.monotonic() < deadline, "the blocker never reached the engine"
            time.sleep(0.01)
        futures = [pool.submit(post, url, r) for r in requests]
        while batcher.in_flight < len(requests) + 1:
            assert time.monotonic() < deadline, f"only {batcher.in_flight} requests reached the batcher"
            time.sleep(0.01)
        backend.release.set()
        assert blocker.result().status_code == 200
        return [f.result() for f in futures]


def test_concurrent_callers_share_engine_calls_and_get_their_own_rows(model):
    backend = CountingBackend(model)
    app = create_app(backend, batch_wait_ms=5, max_k=8, max_query_ids=4)
    requests = [make_request(cid) for cid in range(8)]
    with serve_in_thread(app) as s:
        responses = run_behind_a_busy_engine(app, backend, s.url, requests)
    assert len(backend.calls) == 2, [len(c) for c in backend.calls]  # the blocker, then all 8 merged: not 9 calls
    merged = backend.calls[1]
    assert sorted(merged) == sorted(tuple(int(t) for t in x) for r in requests for x in r[0])
    for request, response in zip(requests, responses):
        check_rows(model, request, response)


def test_a_poisoned_request_in_a_merged_batch_fails_only_its_caller(model):
    backend = CountingBackend(model)
    app = create_app(backend, batch_wait_ms=5, max_k=8, max_query_ids=4)
    requests = [make_request(cid, poisoned=cid == 2) for cid in range(4)]
    with serve_in_thread(app) as s:
        responses = run_behind_a_busy_engine(app, backend, s.url, requests)
        assert httpx.get(f"{s.url}/health").status_code == 200
    merged = backend.calls[1]
    assert any(POISON in row for row in merged) and len(merged) == sum(len(r[0]) for r in requests)
    poisoned = responses[2]
    assert poisoned.status_code == 500 and "poisoned input" in poisoned.json()["error"]
    for cid in (0, 1, 3):
        check_rows(model, requests[cid], responses[cid])


def test_bearer_auth_on_every_route_but_health(model):
    """Every route the app serves, enumerated from the app itself (a route added later is covered)."""
    app = create_app(HFBackend(model, model_name="locked"), api_key="s3cret")
    rows = {"sequences": [[1, 2, 3]], "prompt_lengths": [1]}
    trl = {**rows, "top_logprobs": 2}
    bodies = {"/v1/score": rows, "/v1/completions": {"prompt": [[1, 2]]}, "/get_sequence_logprobs/": trl,
              "/get_sequence_logprobs": trl}  # a valid request per POST route: 200 with the key
    assert all(isinstance(r, Route) for r in app.routes), [type(r).__name__ for r in app.routes]
    seen = set()
    with serve_in_thread(app) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        for route in app.routes:
            for method in sorted(route.methods - {"HEAD"}):
                seen.add(route.path)
                kwargs = {"json": bodies.get(route.path, {})} if method == "POST" else {}
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                    r = c.request(method, route.path, headers=headers, **kwargs)
                    if route.path == "/health":
                        assert r.status_code == 200, (route.path, r.status_code)
                    else:
                        assert r.status_code == 401, (method, route.path, headers, r.status_code)
                        assert r.headers["www-authenticate"] == "Bearer"
                r = c.request(method, route.path, headers={"Authorization": "Bearer s3cret"}, **kwargs)
                assert r.status_code != 401, (method, route.path, r.text[:200])
                if method == "GET" or route.path in bodies:
                    assert r.status_code == 200, (method, route.path, r.text[:200])
    assert {"/health", "/v1/models", "/v1/info", "/metrics", "/v1/score", "/v1/completions"} <= seen
