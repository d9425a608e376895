"""RemoteTeacher against real servers on 127.0.0.1: equal to LocalTeacher, chunked and load-balanced,
the openai protocol, retries (late server, 503 + Retry-After), bounded waits, clear errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import threading  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import make_plain_model  # noqa: E402

from protege import wire  # noqa: E402
from protege.server import HFBackend, create_app, parse  # noqa: E402
from protege.server.background import reserve_port, serve_in_thread  # noqa: E402
from protege.teacher.base import ScoreRequest  # noqa: E402
from protege.teacher.local import LocalTeacher  # noqa: E402
from protege.teacher.remote import RemoteTeacher, TeacherUnavailable  # noqa: E402
from protege.records import Rollouts  # noqa: E402

VOCAB = 160
ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return make_plain_model(VOCAB)


@pytest.fixture(scope="module")
def servers(model):
    """Two replicas of the same teacher."""
    a = serve_in_thread(create_app(HFBackend(model, model_name="tiny"), max_k=32))
    b = serve_in_thread(create_app(HFBackend(model, model_name="tiny"), max_k=32))
    yield a, b
    a.stop()
    b.stop()


def make_rollouts(n: int = 9, seed: int = 0) -> Rollouts:
    g = torch.Generator().manual_seed(seed)
    comp_lens = torch.randint(1, 20, (n,), generator=g)
    comp_lens[min(3, n - 1)] = 0  # a row without completion tokens
    t = int(comp_lens.max())
    mask = torch.arange(t)[None] < comp_lens[:, None]  # (N, T)
    completion = torch.randint(0, VOCAB, (n, t), generator=g) * mask
    prompts = [torch.randint(0, VOCAB, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g) for _ in range(n)]
    return Rollouts(prompt_ids=prompts, completion_ids=completion, completion_mask=mask)


def assert_signal_close(got, ref, mask, rtol=0.0):
    """ids exact; logprobs float32 to ATOL (+ rtol, 2^-11 when they travelled as float16)."""
    assert got.token_logprobs.dtype == torch.float32
    torch.testing.assert_close(got.token_logprobs[mask], ref.token_logprobs[mask], atol=ATOL, rtol=rtol)
    assert torch.all(got.token_logprobs[~mask] == 0)
    for name in ("topk_logprobs", "query_logprobs"):
        if getattr(ref, name) is not None:
            torch.testing.assert_close(getattr(got, name)[mask], getattr(ref, name)[mask], atol=ATOL, rtol=rtol)
    if ref.topk_ids is not None:
        assert got.topk_ids.dtype == torch.long and torch.equal(got.topk_ids[mask], ref.topk_ids[mask])


def test_remote_equals_local_chunked_over_two_replicas(model, servers):
    rollouts = make_rollouts()
    g = torch.Generator().manual_seed(1)
    query = torch.randint(0, VOCAB, (*rollouts.completion_ids.shape, 6), generator=g)  # (N, T, M) student top-k
    request = ScoreRequest(topk=7, query_ids=query, temperature=0.9)
    ref = LocalTeacher(model, pad_id=0).score(rollouts, request)
    with RemoteTeacher([s.url for s in servers], chunk_tokens=40, concurrency=3) as teacher:
        assert teacher.vocab_size == VOCAB
        got = teacher.score(rollouts, request)
    assert_signal_close(got, ref, rollouts.completion_mask)
    assert got.hidden_states is None
    served = [s.server.config.app.state.batcher.stats.scored_sequences for s in servers]
    assert all(n > 0 for n in served), served  # both replicas took chunks


def test_remote_float16_logprobs_within_documented_tolerance(model, servers):
    rollouts = make_rollouts(seed=5)
    g = torch.Generator().manual_seed(6)
    query = torch.randint(0, VOCAB, (*rollouts.completion_ids.shape, 3), generator=g)
    request = ScoreRequest(topk=5, query_ids=query, temperature=1.1)
    ref = LocalTeacher(model, pad_id=0).score(rollouts, request)
    with RemoteTeacher(servers[0].url, logprob_dtype="float16", chunk_tokens=50) as teacher:
        got = teacher.score(rollouts, request)
    assert_signal_close(got, ref, rollouts.completion_mask, rtol=2.0 ** -11)
    mask = rollouts.completion_mask
    err = (got.topk_logprobs[mask] - ref.topk_logprobs[mask]).abs()
    assert err.max() > 0  # it really went as float16 (float32 would match to ~1e-7 here)
    with pytest.raises(ValueError, match="logprob_dtype"):
        RemoteTeacher(servers[0].url, logprob_dtype="bfloat16")
    with pytest.raises(ValueError, match="protocol='protege' only"):
        RemoteTeacher(servers[0].url, protocol="openai", logprob_dtype="float16")


@pytest.mark.parametrize("newest", [1, 2])
def test_steps_down_the_wire_version_for_an_older_server(model, monkeypatch, newest):
    """A server that reads only versions <= `newest` answers newer bodies with its 400; a client that
    allows it (min_wire_version) steps down one version per refusal (3 -> 2 -> 1) and stays there."""
    seen = []

    def read_old_only(body):
        version, meta, arrays = wire.read_binary(body)
        seen.append(version)
        if version > newest:  # what an older protege server said
            raise wire.WireError("version", f"wire version {version} is not supported; this side speaks {newest}")
        return version, meta, arrays

    monkeypatch.setattr(parse, "read_binary", read_old_only)
    rollouts = make_rollouts(n=5, seed=7)
    request = ScoreRequest(topk=4)
    with serve_in_thread(create_app(HFBackend(model))) as server:
        with RemoteTeacher(server.url, chunk_tokens=30, concurrency=1, min_wire_version=newest) as teacher:
            got = teacher.score(rollouts, request)
            assert teacher._wire_version == newest
        assert seen[: 4 - newest] == list(range(3, newest - 1, -1)) and set(seen[4 - newest:]) == {newest}
        with RemoteTeacher(server.url, logprob_dtype="float16", min_wire_version=newest) as teacher:
            if newest == 1:
                with pytest.raises(ValueError, match="needs a teacher server that reads wire version 2"):
                    teacher.score(rollouts, request)
            else:
                assert teacher.score(rollouts, request).topk_ids.shape[-1] == 4
    assert_signal_close(got, LocalTeacher(model, pad_id=0).score(rollouts, request), rollouts.completion_mask)


def test_openai_protocol_against_our_completions_route(model, servers):
    rollouts = make_rollouts(seed=2)
    ref = LocalTeacher(model, pad_id=0).score(rollouts, ScoreRequest(topk=4, temperature=1.3))
    with RemoteTeacher(servers[0].url, protocol="openai", chunk_tokens=64) as teacher:
        got = teacher.score(rollouts, ScoreRequest(topk=4, temperature=1.3))
        assert_signal_close(got, ref, rollouts.completion_mask)
        assert teacher.vocab_size == VOCAB  # our /v1/models carries it; stock vLLM's would not
        with pytest.raises(ValueError, match="cannot return logprobs at ids the client picks"):
            teacher.score(rollouts, ScoreRequest(query_ids=torch.zeros((*rollouts.completion_ids.shape, 2),
                                                                       dtype=torch.long)))


def test_clear_errors_without_retrying(servers):
    rollouts = make_rollouts()
    with RemoteTeacher(servers[0].url, protocol="openai", max_wait_s=5) as teacher:  # protege's: test_remote_hidden
        with pytest.raises(ValueError, match="cannot give hidden states"):
            teacher.score(rollouts, ScoreRequest(hidden=True))
    with RemoteTeacher(servers[0].url, max_wait_s=5) as teacher:
        start = time.monotonic()
        with pytest.raises(ValueError, match=r"HTTP 400.*topk=999"):
            teacher.score(rollouts, ScoreRequest(topk=999))
        assert time.monotonic() - start < 3  # a 4xx is not retried
        with pytest.raises(ValueError, match="query_ids has shape"):
            teacher.score(rollouts, ScoreRequest(query_ids=torch.zeros((2, 2, 2), dtype=torch.long)))


def test_waits_for_a_server_that_starts_late(model):
    sock = reserve_port()  # bound, not listening: connections are refused until the server starts
    url = "http://127.0.0.1:%d" % sock.getsockname()[1]
    rollouts = make_rollouts(n=4, seed=3)
    result, started = {}, threading.Event()

    def call():
        with RemoteTeacher(url, max_wait_s=30, timeout=20) as teacher:
            started.set()
            result["signal"] = teacher.score(rollouts, ScoreRequest(topk=3))

    worker = threading.Thread(target=call)
    worker.start()
    started.wait(5)
    time.sleep(1.0)  # the client meets refused connections and backs off
    assert "signal" not in result
    server = serve_in_thread(create_app(HFBackend(model)), sock=sock)
    try:
        worker.join(30)
        assert not worker.is_alive()
    finally:
        server.stop()
    ref = LocalTeacher(model, pad_id=0).score(rollouts, ScoreRequest(topk=3))
    assert_signal_close(result["signal"], ref, rollouts.completion_mask)


def test_retries_503_with_retry_after_and_bounds_the_wait(model):
    app = create_app(HFBackend(model), api_key="key")
    refusals = {"left": 2, "seen": 0}

    async def flaky(scope, receive, send):  # the first two score calls get 503 + Retry-After: 1
        if scope["type"] == "http" and scope["path"] == "/v1/score" and refusals["left"] > 0:
            refusals["left"] -= 1
            refusals["seen"] += 1
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": b'{"error": "warming up"}'})
            return
        await app(scope, receive, send)

    rollouts = make_rollouts(n=3, seed=4)
    with serve_in_thread(flaky) as server, RemoteTeacher(server.url, api_key="key", max_wait_s=20) as teacher:
        start = time.monotonic()
        got = teacher.score(rollouts, ScoreRequest(topk=2))
        assert refusals["seen"] == 2 and time.monotonic() - start >= 2.0  # Retry-After honoured
    assert_signal_close(got, LocalTeacher(model, pad_id=0).score(rollouts, ScoreRequest(topk=2)),
                        rollouts.completion_mask)

    sock = reserve_port()  # nobody will ever listen here
    dead = "http://127.0.0.1:%d" % sock.getsockname()[1]
    with RemoteTeacher(dead, max_wait_s=1.5) as teacher:
        start = time.monotonic()
        with pytest.raises(TeacherUnavailable, match="max_wait_s=1.5"):
            teacher.score(rollouts, ScoreRequest())
        assert time.monotonic() - start < 3.0
    sock.close()
