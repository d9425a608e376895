"""Exact full-vocabulary losses through a real teacher server on 127.0.0.1 (hidden states + output projection).

The reference is written here: teacher log p = log_softmax(z / T) from a plain unpadded HF forward of the
teacher (z = its logits at the positions that predict each completion token), student log q =
log_softmax(h W_s^T / T), and the divergences of REFERENCE.md section 2 over the whole vocabulary, in
float64; the gradient is torch.autograd's of that. The remote loss and gradient (RemoteTeacher ->
Objective.per_token_loss, the trainer's path) must match it within the wire dtype's rounding, and
equal the in-process teacher's bit for bit with a float32 wire. Also: a teacher that changes mid-run,
corrupted or short hidden payloads, the projection's auth, hash and disk cache.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import socket  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.responses import Response  # noqa: E402
from starlette.routing import Route  # noqa: E402
from tiny import make_plain_model  # noqa: E402

from protege import wire  # noqa: E402
from protege.config import LossConfig  # noqa: E402
from protege.objective import Objective  # noqa: E402
from protege.records import Rollouts  # noqa: E402
from protege.server import HFBackend, create_app  # noqa: E402
from protege.server.background import serve_in_thread  # noqa: E402
from protege.teacher.local import LocalTeacher  # noqa: E402
from protege.teacher.projection import TeacherChanged  # noqa: E402
from protege.teacher.remote import RemoteTeacher, TeacherReplyError  # noqa: E402

VOCAB, HS = 160, 24  # vocabulary; the student's hidden size (the teacher's is 32)
KEY = "s3cret"
DIVERGENCES = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("tvd", {}),
               ("skew_forward_kl", {"alpha": 0.2}), ("skew_reverse_kl", {"alpha": 0.2})]
UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


@pytest.fixture(scope="module")
def teacher_model():
    """The tiny teacher with its output projection scaled x40: logits of std ~4 (at its default init they are
    ~0.1, a near-uniform teacher that would hide a wrong position or temperature)."""
    model = make_plain_model(VOCAB)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


@pytest.fixture(scope="module")
def server(teacher_model):
    with serve_in_thread(create_app(HFBackend(teacher_model, model_name="tiny"), api_key=KEY)) as s:
        yield s


def make_rollouts(n=6, seed=0, empty_row=True) -> Rollouts:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, 12, (n,), generator=g)
    if empty_row:
        lens[2] = 0  # a row without completion tokens
    mask = torch.arange(int(lens.max()))[None] < lens[:, None]  # (N, T)
    completion = torch.randint(0, VOCAB, mask.shape, generator=g) * mask
    prompts = [torch.randint(0, VOCAB, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g) for _ in range(n)]
    return Rollouts(prompt_ids=prompts, completion_ids=completion, completion_mask=mask)


def student_side(rollouts, seed=1):
    """(B, T, HS) student hidden states (leaf, requires grad) and (V, HS) student projection."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn((*rollouts.completion_ids.shape, HS), generator=g).requires_grad_()
    return hidden, torch.randn((VOCAB, HS), generator=g) / HS ** 0.5


# ------------------------------------------------------------------------------- the reference
@torch.no_grad()
def teacher_logits(model, rollouts) -> list[torch.Tensor]:
    """Per row, (L, V) float64 logits predicting each completion token, from one unpadded forward."""
    out = []
    for prompt, tokens, m in zip(rollouts.prompt_ids, rollouts.completion_ids, rollouts.completion_mask):
        tokens = tokens[: int(m.sum())]
        z = model(input_ids=torch.cat([prompt, tokens])[None]).logits[0].double()
        out.append(z[len(prompt) - 1: len(prompt) - 1 + len(tokens)])
    return out


def kl(a_log, b_log):
    return (a_log.exp() * (a_log - b_log)).sum(-1)


def divergence(name, lp, lq, beta=0.5, alpha=0.1):
    """REFERENCE.md section 2 from log-probabilities over the last axis (teacher lp, student lq)."""
    p, q = lp.exp(), lq.exp()
    if name == "forward_kl":
        return kl(lp, lq)
    if name == "reverse_kl":
        return kl(lq, lp)
    if name == "jsd":
        m = (beta * p + (1 - beta) * q).log()
        return beta * kl(lp, m) + (1 - beta) * kl(lq, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skew_forward_kl":
        return kl(lp, (alpha * p + (1 - alpha) * q).log())
    return kl(lq, (alpha * q + (1 - alpha) * p).log())


def reference(z_teacher, rollouts, hidden, w_student, name, tau, **kw):
    """(mean loss over completion tokens, d loss / d hidden) in float64."""
    h = hidden.detach().double().requires_grad_()
    total, count = 0.0, 0
    for i, z in enumerate(z_teacher):
        lq = torch.log_softmax(h[i, : len(z)] @ w_student.double().T / tau, -1)
        total = total + divergence(name, torch.log_softmax(z / tau, -1), lq, **kw).sum()
        count += len(z)
    loss = total / count
    loss.backward()
    return loss.detach(), h.grad


def ours(teacher, rollouts, hidden, w_student, name, tau, **kw):
    """The trainer's path: Objective.teacher_request -> teacher.score -> Objective.per_token_loss (mean, grad)."""
    objective = Objective.build(LossConfig(name=name, support="full", temperature=tau, **kw),
                                teacher_local=isinstance(teacher, LocalTeacher))
    assert objective.teacher_hidden
    signal = teacher.score(rollouts, objective.teacher_request(rollouts))
    h = hidden.detach().clone().requires_grad_()
    per_token = objective.per_token_loss(h, w_student, rollouts, signal, teacher.output_weight)
    loss = per_token.sum() / rollouts.completion_mask.sum()
    loss.backward()
    return loss.detach().double(), h.grad.double(), signal


# ----------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("name, kw", DIVERGENCES, ids=[d[0] for d in DIVERGENCES])
def test_remote_full_vocabulary_loss_and_gradient_match_the_reference(teacher_model, server, name, kw):
    rollouts = make_rollouts(seed=3)
    hidden, w_student = student_side(rollouts)
    tau = 0.8
    ref_loss, ref_grad = reference(teacher_logits(teacher_model, rollouts), rollouts, hidden, w_student, name, tau,
                                   **kw)
    local = ours(LocalTeacher(teacher_model, pad_id=0), rollouts, hidden, w_student, name, tau, **kw)
    torch.testing.assert_close(local[0], ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(local[1], ref_grad, rtol=1e-4, atol=1e-7)
    for dtype, u in UNIT_ROUNDOFF.items():
        with RemoteTeacher(server.url, api_key=KEY, hidden_dtype=dtype, chunk_tokens=40) as teacher:
            loss, grad, signal = ours(teacher, rollouts, hidden, w_student, name, tau, **kw)
        assert signal.hidden_states.dtype == getattr(torch, dtype)
        # each hidden value rounded by <= u relative (u: the dtype's unit roundoff); measured on this buffer:
        # loss within 0.06 u relative, gradient within 2.7 u of its largest entry, so u / 4 and 8 u leave a
        # margin of ~4x (a wrong position, temperature or projection is off by > 1e-1 relative)
        torch.testing.assert_close(loss, ref_loss, rtol=u / 4, atol=1e-7)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=8 * u * float(ref_grad.abs().max()))


def test_float32_wire_equals_the_in_process_teacher_bit_for_bit(teacher_model, server):
    rollouts = make_rollouts(seed=4, empty_row=False)  # one chunk, no skipped row: the same forward batches
    hidden, w_student = student_side(rollouts)
    local = ours(LocalTeacher(teacher_model, pad_id=0), rollouts, hidden, w_student, "jsd", 1.0)
    with RemoteTeacher(server.url, api_key=KEY, hidden_dtype="float32") as teacher:
        remote = ours(teacher, rollouts, hidden, w_student, "jsd", 1.0)
        assert torch.equal(teacher.output_weight, teacher_model.lm_head.weight)
    assert torch.equal(remote[2].hidden_states, local[2].hidden_states)
    assert torch.equal(remote[0], local[0]) and torch.equal(remote[1], local[1])


def test_hidden_states_are_the_positions_that_predict_each_token(teacher_model, server):
    """log_softmax(h W^T) at each actual token == the plain forward's logprob (float32 wire, tight)."""
    rollouts = make_rollouts(seed=5)
    with RemoteTeacher(server.url, api_key=KEY, hidden_dtype="float32") as teacher:
        signal = teacher.score(rollouts, Objective.build(LossConfig(), teacher_local=False).teacher_request(rollouts))
        w = teacher.output_weight.double()
    for i, z in enumerate(teacher_logits(teacher_model, rollouts)):
        got = torch.log_softmax(signal.hidden_states[i, : len(z)].double() @ w.T, -1)
        torch.testing.assert_close(got, torch.log_softmax(z, -1), rtol=0, atol=1e-5)


def test_projection_route_needs_the_key_and_matches_info(server, teacher_model):
    assert httpx.get(server.url + "/v1/output_projection").status_code == 401
    assert httpx.get(server.url + "/v1/output_projection", headers={"Authorization": "Bearer nope"}).status_code == 401
    ok = httpx.get(server.url + "/v1/output_projection", headers={"Authorization": f"Bearer {KEY}"})
    info = httpx.get(server.url + "/v1/info", headers={"Authorization": f"Bearer {KEY}"}).json()["output_projection"]
    sha, weight = wire.read_projection(bytearray(ok.content))
    assert ok.status_code == 200 and int(ok.headers["content-length"]) == len(ok.content)
    assert sha == info["sha256"] == ok.headers["x-protege-projection-sha256"] and info["shape"] == [VOCAB, 32]
    assert torch.equal(weight, teacher_model.lm_head.weight)
    with pytest.raises(Exception, match="401"):
        RemoteTeacher(server.url, max_wait_s=2).output_weight


def test_projection_disk_cache_is_keyed_by_hash_and_verified(server, tmp_path):
    with RemoteTeacher(server.url, api_key=KEY, projection_cache=str(tmp_path)) as first:
        w = first.output_weight
        assert first.projection.downloads == 1
    (path,) = tmp_path.glob("*.prtg")
    assert path.name == f"{first.projection.sha256}.prtg"
    with RemoteTeacher(server.url, api_key=KEY, projection_cache=str(tmp_path)) as second:
        assert torch.equal(second.output_weight, w) and second.projection.downloads == 0
    body = bytearray(path.read_bytes())
    body[-3] ^= 0x10  # a damaged cache file is not used: fetched again and rewritten
    path.write_bytes(bytes(body))
    with RemoteTeacher(server.url, api_key=KEY, projection_cache=str(tmp_path)) as third:
        assert torch.equal(third.output_weight, w) and third.projection.downloads == 1
    assert wire.read_projection(bytearray(path.read_bytes()))[0] == first.projection.sha256


def test_a_teacher_changed_mid_run_is_detected(teacher_model):
    """The server at the teacher's URL restarts with other weights: the next hidden reply names another hash."""
    rollouts = make_rollouts(seed=6)
    request = Objective.build(LossConfig(), teacher_local=False).teacher_request(rollouts)
    first = serve_in_thread(create_app(HFBackend(teacher_model)))
    port = int(first.url.rsplit(":", 1)[1])
    teacher = RemoteTeacher(first.url, max_wait_s=20)
    teacher.score(rollouts, request)
    first.stop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    with serve_in_thread(create_app(HFBackend(make_plain_model(VOCAB, seed=7))), sock=sock):
        with pytest.raises(TeacherChanged, match="teacher changed"):
            teacher.score(rollouts, request)
    teacher.close()


@pytest.fixture(scope="module")
def proxy(server):
    """A server that forwards to the teacher server and passes each /v1/score reply through
    proxy.mutate(body) -> body (set by each test)."""
    async def forward(request):
        body = await request.body()
        async with httpx.AsyncClient() as client:
            r = await client.request(request.method, server.url + request.url.path, content=body,
                                     headers={k: v for k, v in request.headers.items() if k.lower() != "host"})
        ok = request.url.path == "/v1/score" and r.status_code == 200
        content = running.mutate(r.content) if ok else r.content
        return Response(content, r.status_code, media_type=r.headers.get("content-type"))
    paths = ["/v1/info", "/v1/score", "/v1/output_projection"]
    with serve_in_thread(Starlette(routes=[Route(p, forward, methods=["GET", "POST"]) for p in paths])) as running:
        yield running


def _repacked(change):
    """mutate(): decode the reply, change(meta, arrays), re-encode with a valid crc32 (only the checks can tell)."""
    def mutate(body):
        _, meta, arrays = wire.read_binary(bytearray(body))
        arrays = {k: np.array(v) for k, v in arrays.items()}
        change(meta, arrays)
        return wire.pack(meta, arrays, dtypes={k: _code(v) for k, v in arrays.items()})
    return mutate


def _code(a):
    return {np.dtype("<f4"): "f4", np.dtype("<f2"): "f2", np.dtype("<u2"): "u2", wire.BF16: "b2"}.get(a.dtype, "i4")


def _nan(meta, arrays):
    arrays["hidden_states"][0, 0, 5] = np.nan


@pytest.mark.parametrize("mutate, field", [
    (lambda body: body[:-64], "checksum"),  # cut short on the way
    (_repacked(lambda meta, a: a.update(hidden_states=a["hidden_states"][..., :-1])), "hidden_states"),  # short H
    (_repacked(lambda meta, a: a.update(hidden_states=a["hidden_states"][:, :-1])), "hidden_states"),  # short T
    (_repacked(lambda meta, a: a.update(hidden_states=a["hidden_states"].astype(np.float32))), "hidden_states"),
    (_repacked(_nan), "hidden_states"),
    (_repacked(lambda meta, a: a.pop("hidden_states")), "hidden_states"),
], ids=["truncated", "short-hidden", "short-positions", "wrong-dtype", "nan", "missing"])
def test_corrupted_or_short_hidden_payloads_are_rejected(proxy, mutate, field):
    rollouts = make_rollouts(seed=7)
    request = Objective.build(LossConfig(), teacher_local=False).teacher_request(rollouts)
    proxy.mutate = mutate
    with RemoteTeacher(proxy.url, api_key=KEY, max_invalid_replies=0, max_wait_s=10) as teacher:
        with pytest.raises(TeacherReplyError) as err:
            teacher.score(rollouts, request)
    assert err.value.field == field, err.value


def test_a_reply_without_the_projection_hash_is_refused(proxy):
    rollouts = make_rollouts(seed=8)
    request = Objective.build(LossConfig(), teacher_local=False).teacher_request(rollouts)
    proxy.mutate = _repacked(lambda meta, a: meta.pop("projection_sha256"))
    with RemoteTeacher(proxy.url, api_key=KEY) as teacher, pytest.raises(TeacherChanged):
        teacher.score(rollouts, request)


def test_a_server_without_a_projection_is_named_clearly(teacher_model, monkeypatch):
    """A backend without an in-process model (vllm), or an older protege: /v1/info has no output_projection."""
    from protege.server import projection

    monkeypatch.setattr(projection, "of", lambda request: None)
    rollouts = make_rollouts(seed=9)
    request = Objective.build(LossConfig(), teacher_local=False).teacher_request(rollouts)
    with serve_in_thread(create_app(HFBackend(teacher_model))) as s, RemoteTeacher(s.url) as teacher:
        assert httpx.get(s.url + "/v1/output_projection").status_code == 404
        body = wire.encode_score_request([np.arange(6, dtype=np.int32)], [3], hidden_dtype="float16")
        r = httpx.post(s.url + "/v1/score", content=body, headers={"Content-Type": wire.BINARY_MEDIA_TYPE})
        assert r.status_code == 422 and "hidden" in r.json()["error"]
        with pytest.raises(ValueError, match="does not serve an output projection"):
            teacher.score(rollouts, request)


def test_plain_json_and_binary_requests_get_the_same_bfloat16_hidden_states(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    seq = list(range(3, 12))
    as_json = httpx.post(server.url + "/v1/score", headers=headers, json={
        "sequences": [seq], "prompt_lengths": [4], "hidden_dtype": "bfloat16"})
    body = wire.encode_score_request([np.array(seq, np.int32)], [4], hidden_dtype="bfloat16")
    as_binary = httpx.post(server.url + "/v1/score", content=body,
                           headers={**headers, "Content-Type": wire.BINARY_MEDIA_TYPE})
    got = [wire.read_score_response(bytearray(r.content), r.headers["content-type"]) for r in (as_json, as_binary)]
    assert as_json.headers["content-type"].startswith("application/json")
    (_, meta_j, t_j), (_, meta_b, t_b) = got
    assert t_j["hidden_states"].dtype == torch.bfloat16 and t_j["hidden_states"].shape == (1, 5, 32)
    assert torch.equal(t_j["hidden_states"], t_b["hidden_states"])
    assert meta_j["projection_sha256"] == meta_b["projection_sha256"]


def test_bfloat16_wire_dtype_and_streamed_pieces():
    """b2 = the upper half of a float32, rounded to nearest even (reference: bit arithmetic written here)."""
    x = np.array([1.0, -2.5, 3.14159, 1e-20, 65504.0, 1e30, -np.inf, 1 + 2 ** -8, 1 + 3 * 2 ** -8], np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    want = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round half to even (finite values)
    arrays = {"h": x, "ids": np.arange(3, dtype=np.int32)}
    body = wire.pack({"m": 1}, arrays, dtypes={"h": "b2"})
    assert b"".join(wire.pack_parts({"m": 1}, arrays, dtypes={"h": "b2"})) == body
    _, _, got = wire.read_binary(bytearray(body))
    assert np.array_equal(got["h"].view(np.uint16), want)
    assert wire.to_tensor(got["h"]).dtype == torch.bfloat16
    _, _, from_json = wire.read_json_dict(wire.to_json_dict({}, arrays, dtypes={"h": "b2"}))
    assert np.array_equal(from_json["h"].view(np.uint16), want)
    with pytest.raises(ValueError, match="needs wire version 3"):
        wire.pack({}, arrays, dtypes={"h": "b2"}, version=2)
    parts, sha = wire.encode_projection(torch.randn(5, 4).bfloat16())
    damaged = bytearray(b"".join(parts))
    damaged[-9] ^= 1
    with pytest.raises(wire.WireError) as err:
        wire.read_projection(damaged)
    assert err.value.field == "checksum"
