"""RemoteTeacher against a forged or hostile server (issue 32, items 2, 5 and 6): no silent step down
from the checksummed wire, Retry-After values that are absurd, bad replies that a retry replaced.
Real servers on 127.0.0.1 (protege's own app, wrapped to misbehave); every wait is bounded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from test_remote_teacher import assert_signal_close, make_rollouts  # noqa: E402
from tiny import make_plain_model  # noqa: E402

from protege import wire  # noqa: E402
from protege.server import HFBackend, create_app  # noqa: E402
from protege.server.background import serve_in_thread  # noqa: E402
from protege.teacher.base import ScoreRequest  # noqa: E402
from protege.teacher.local import LocalTeacher  # noqa: E402
from protege.teacher.remote import RemoteTeacher, TeacherRefused, TeacherUnavailable  # noqa: E402

VOCAB = 160


@pytest.fixture(scope="module")
def model():
    return make_plain_model(VOCAB)


def _wrapped(app, misbehave):
    """An ASGI app that answers /v1/score with `misbehave(n, send)` while it returns True (n counts calls)."""
    calls = {"n": 0}

    async def wrapper(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/score":
            calls["n"] += 1
            if await misbehave(calls["n"], scope, receive, send, app):
                return
        await app(scope, receive, send)

    return wrapper, calls


async def _answer(send, status: int, body: bytes, headers=()):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *headers]})
    await send({"type": "http.response.body", "body": body})


def test_a_forged_version_refusal_does_not_switch_the_checksum_off(model, caplog):
    """A 400 "wire version 3 is not supported" to every request: the default client (min_wire_version
    3) stops naming teacher.min_wire_version and never sends version 2; a client that allows 2 steps
    down once, logs it and counts it in its step metrics. Before: a silent step down to no crc."""
    forged = b'{"error": "wire version 3 is not supported; this side speaks 2"}'
    seen = []  # wire versions of the requests the server got

    async def refuse_v3(n, scope, receive, send, app):
        body = (await receive())["body"]
        seen.append(wire.read_binary(body)[0])
        if seen[-1] == 3:
            await _answer(send, 400, forged)
            return True

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}
        await app(scope, replay, send)
        return True

    rollouts, request = make_rollouts(n=4, seed=3), ScoreRequest(topk=3)
    app, calls = _wrapped(create_app(HFBackend(model)), refuse_v3)
    with serve_in_thread(app) as server:
        with RemoteTeacher(server.url, concurrency=1) as teacher:
            with pytest.raises(TeacherRefused, match="teacher.min_wire_version") as err:
                teacher.score(rollouts, request)
            assert teacher._wire_version == 3 and teacher.step_metrics()["teacher_wire_downgrades"] == 0
        assert "wire version 3 is not supported" in str(err.value) and seen == [3]
        with caplog.at_level(logging.WARNING, "protege.teacher"), \
                RemoteTeacher(server.url, concurrency=1, min_wire_version=2) as teacher:
            got = teacher.score(rollouts, request)
            metrics = teacher.step_metrics()
    assert metrics["teacher_wire_downgrades"] == 1 and metrics["teacher_wire_version"] == 2, metrics
    assert any("wire version <= 2" in r.getMessage() and "no crc32" in r.getMessage() for r in caplog.records)
    assert_signal_close(got, LocalTeacher(model, pad_id=0).score(rollouts, request), rollouts.completion_mask)


@pytest.mark.parametrize("asked", ["inf", "1e9", "nan", "-5"])
def test_an_absurd_retry_after_is_capped_and_the_run_goes_on(model, caplog, asked):
    """503 + Retry-After: `asked` to the first score call, then answers: the client waits at most
    max_wait_s (1.5 s) in all (inf and 1e9 capped; nan and -5 ignored: backoff), retries, gets the
    scores, and the warning says what the server asked. Before: inf and 1e9 ended the run after
    1 attempt in 0.0 s ('no answer'), though the server had answered."""
    async def busy_once(n, scope, receive, send, app):
        if n == 1:
            await _answer(send, 503, b'{"error": "busy"}', [(b"retry-after", asked.encode())])
            return True
        return False

    rollouts, request = make_rollouts(n=3, seed=5), ScoreRequest(topk=2)
    app, calls = _wrapped(create_app(HFBackend(model)), busy_once)
    with caplog.at_level(logging.WARNING, "protege.teacher"), serve_in_thread(app) as server, \
            RemoteTeacher(server.url, max_wait_s=1.5, concurrency=1) as teacher:
        start = time.monotonic()
        got = teacher.score(rollouts, request)
        took = time.monotonic() - start
    assert calls["n"] == 2 and took < 3.0, (calls, took)
    assert any(f"asked for Retry-After: {float(asked):g} s" in r.getMessage() for r in caplog.records)
    assert_signal_close(got, LocalTeacher(model, pad_id=0).score(rollouts, request), rollouts.completion_mask)


def test_a_server_that_always_asks_for_an_infinite_wait_is_retried_until_the_budget_and_named(model):
    async def always_busy(n, scope, receive, send, app):
        await _answer(send, 503, b'{"error": "busy"}', [(b"retry-after", b"inf")])
        return True

    app, calls = _wrapped(create_app(HFBackend(model)), always_busy)
    with serve_in_thread(app) as server, RemoteTeacher(server.url, max_wait_s=1.0, concurrency=1) as teacher:
        start = time.monotonic()
        with pytest.raises(TeacherUnavailable, match=r"asked for Retry-After: inf s") as err:
            teacher.score(make_rollouts(n=2, seed=1), ScoreRequest(topk=2))
        took = time.monotonic() - start
    assert calls["n"] >= 2 and 0.9 < took < 3.0, (calls, took, str(err.value))


def test_a_damaged_reply_replaced_by_a_retry_is_logged_and_counted(model, caplog):
    """The first reply has one byte flipped (the wire v3 crc32 catches it): the retry's scores are
    returned, a warning names the damage and step_metrics counts it. Before: no trace."""
    async def flip_once(n, scope, receive, send, app):
        if n != 1:
            return False

        async def flipping_send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                body = bytearray(message["body"])
                body[len(body) // 2] ^= 0x10
                message = {**message, "body": bytes(body)}
            await send(message)
        await app(scope, receive, flipping_send)
        return True

    rollouts, request = make_rollouts(n=4, seed=6), ScoreRequest(topk=3)
    app, calls = _wrapped(create_app(HFBackend(model)), flip_once)
    with caplog.at_level(logging.WARNING, "protege.teacher"), serve_in_thread(app) as server, \
            RemoteTeacher(server.url, concurrency=1) as teacher:
        got = teacher.score(rollouts, request)
        metrics = teacher.step_metrics()
        assert teacher.step_metrics()["teacher_invalid_replies_retried"] == 0  # per step: reset after reading
    assert calls["n"] == 2 and metrics["teacher_invalid_replies_retried"] == 1, (calls, metrics)
    assert any("damaged 1 time" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(got.topk_logprobs[rollouts.completion_mask]).all()
    assert_signal_close(got, LocalTeacher(model, pad_id=0).score(rollouts, request), rollouts.completion_mask)
