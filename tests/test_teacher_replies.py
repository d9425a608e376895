"""A teacher reply that parses but is wrong is never returned (so never trained on).

A real HTTP proxy on 127.0.0.1 sits between RemoteTeacher and a real teacher server and rewrites
replies: logprobs of +3.0 or NaN, ids of 65535 or vocab + 5, top-k mass over 1, a row cut short,
one fewer top-k entry, 2% of the bytes flipped, a truncated body, foreign JSON, an HTML page. For
each, the client either retries and returns exactly what an independent HF forward (written here)
gives, or stops with an error naming the URL and what was wrong. Also: a URL without a scheme
fails at once, a dead teacher's error names the URLs and teacher.max_wait_s, and an OpenAI-style
server without a vocab_size in /v1/models (as stock vLLM) still trains, or names teacher.vocab_size.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import make_plain_model  # noqa: E402

from protege import wire  # noqa: E402
from protege.server import HFBackend, create_app  # noqa: E402
from protege.server.background import reserve_port, serve_in_thread  # noqa: E402
from protege.teacher.base import ScoreRequest  # noqa: E402
from protege.teacher.remote import RemoteTeacher, TeacherUnavailable  # noqa: E402
from protege.records import Rollouts  # noqa: E402

VOCAB, K, TEMP = 160, 4, 0.8


class CorruptingProxy:
    """ASGI app forwarding every request to `upstream`; the first `times` 200 replies on `path` (None:
    all) go back through `corrupt(body, content_type) -> (body, content_type)`."""

    def __init__(self, upstream: str, path: str, corrupt, times: int | None = None):
        self.upstream, self.path, self.corrupt, self.times, self.corrupted = upstream, path, corrupt, times, 0
        self.client = None  # one httpx.AsyncClient, made in the proxy's own event loop

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.shutdown" and self.client is not None:
                    await self.client.aclose()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        headers = {k.decode(): v.decode() for k, v in scope["headers"] if k in (b"content-type", b"accept")}
        self.client = self.client or httpx.AsyncClient(timeout=30)
        r = await self.client.request(scope["method"], self.upstream + scope["path"], content=body, headers=headers)
        content, ctype = r.content, r.headers.get("content-type", "")
        if scope["path"] == self.path and r.status_code == 200 and (self.times is None or self.corrupted < self.times):
            content, ctype = self.corrupt(content, ctype)
            self.corrupted += 1
        await send({"type": "http.response.start", "status": r.status_code,
                    "headers": [(b"content-type", ctype.encode())]})
        await send({"type": "http.response.body", "body": content})


def rewrite_arrays(change):
    """A corruption that re-encodes a binary score reply (valid layout and checksum, wrong values)."""
    def corrupt(body, ctype):
        version, meta, arrays = wire.read_binary(body)
        arrays = {name: np.array(a) for name, a in arrays.items()}
        codes = {name: a.dtype.str[1:] for name, a in arrays.items()}
        arrays = change(arrays)
        return wire.pack(meta, arrays, dtypes=codes, version=version), ctype
    return corrupt


def _set(name, index, value):
    def change(a):
        a[name][index] = value
        return a
    return change


def _cut_last_position(a):
    t = a["token_logprobs"].shape[1] - 1
    a = {name: (x[:, :t] if x.ndim > 1 else np.minimum(x, t)) for name, x in a.items()}
    return a


def _flip_bytes(body, ctype):
    rng = np.random.default_rng(0)
    out = np.frombuffer(body, np.uint8).copy()
    where = rng.choice(len(out), max(1, len(out) // 50), replace=False)  # 2% of the bytes
    out[where] ^= rng.integers(1, 256, len(where)).astype(np.uint8)
    return out.tobytes(), ctype


BINARY_CORRUPTIONS = {  # id: (corrupt, word the final error must name)
    "logprob_plus_3": (rewrite_arrays(_set("topk_logprobs", (0, 0, 0), 3.0)), "topk_logprobs"),
    "token_logprob_nan": (rewrite_arrays(_set("token_logprobs", (1, 0), np.nan)), "token_logprobs"),
    "id_65535": (rewrite_arrays(_set("topk_ids", (0, 1, 2), 65535)), "topk_ids"),
    "id_vocab_plus_5": (rewrite_arrays(_set("topk_ids", (2, 0, 0), VOCAB + 5)), "topk_ids"),
    "mass_over_one": (rewrite_arrays(_set("topk_logprobs", (0, 0), math.log(0.9))), "sum to more than 1"),
    "row_cut_short": (rewrite_arrays(_cut_last_position), "token_logprobs"),
    "k_changed": (rewrite_arrays(lambda a: {n: (x[..., :K - 1] if n.startswith("topk") else x)
                                            for n, x in a.items()}), "topk_ids"),
    "bytes_flipped_2pct": (_flip_bytes, "invalid reply"),
    "body_truncated": (lambda body, ctype: (body[: len(body) // 2], ctype), "invalid reply"),
    "foreign_json": (lambda body, ctype: (b'{"detail": "hello from another service"}', "application/json"),
                     "not a protege wire payload"),
    "html_page": (lambda body, ctype: (b"<html><body>502 Bad Gateway</body></html>", "text/html"), "text/html"),
}


@pytest.fixture(scope="module")
def model():
    return make_plain_model(VOCAB)


@pytest.fixture(scope="module")
def server(model):
    with serve_in_thread(create_app(HFBackend(model, model_name="tiny"), max_k=32)) as s:
        yield s


@pytest.fixture(scope="module")
def rollouts():
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([5, 3, 7, 2])
    mask = torch.arange(int(lens.max()))[None] < lens[:, None]  # (N, T)
    completion = torch.randint(0, VOCAB, mask.shape, generator=g) * mask
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (3, 6, 2, 4)]
    return Rollouts(prompt_ids=prompts, completion_ids=completion, completion_mask=mask)


@pytest.fixture(scope="module")
def reference(model, rollouts):
    """Independent reference: log_softmax(logits / T) of one HF forward per row, its top-K."""
    n, t = rollouts.completion_ids.shape
    token, ids, lps = torch.zeros(n, t), torch.zeros(n, t, K, dtype=torch.long), torch.zeros(n, t, K)
    with torch.no_grad():
        for i, p in enumerate(rollouts.prompt_ids):
            c = rollouts.completion_ids[i, : int(rollouts.completion_mask[i].sum())]
            logits = model(torch.cat([p, c])[None]).logits[0, len(p) - 1: len(p) - 1 + len(c)]
            lp = torch.log_softmax(logits.double() / TEMP, -1)
            token[i, : len(c)] = lp.gather(-1, c[:, None])[:, 0].float()
            top = lp.topk(K, -1)
            ids[i, : len(c)], lps[i, : len(c)] = top.indices, top.values.float()
    return token, ids, lps


def assert_matches_reference(signal, reference, mask):
    token, ids, lps = reference
    torch.testing.assert_close(signal.token_logprobs[mask], token[mask], atol=1e-5, rtol=0)
    assert torch.equal(signal.topk_ids[mask], ids[mask])
    torch.testing.assert_close(signal.topk_logprobs[mask], lps[mask], atol=1e-5, rtol=0)


def teacher_for(urls, **kwargs) -> RemoteTeacher:
    return RemoteTeacher(urls, **{"max_wait_s": 20, "timeout": 20, **kwargs})


def score(urls, rollouts, **kwargs):
    with teacher_for(urls, **kwargs) as teacher:
        return teacher.score(rollouts, ScoreRequest(topk=K, temperature=TEMP))


@pytest.mark.parametrize("kind", list(BINARY_CORRUPTIONS))
def test_a_corrupted_score_reply_is_retried_never_returned(kind, server, rollouts, reference):
    """The first reply is corrupted: the client retries and returns exactly the reference. When every
    reply is: it stops after max_invalid_replies retries, naming the URL and the fault (not max_wait_s)."""
    corrupt, word = BINARY_CORRUPTIONS[kind]
    proxy_app = CorruptingProxy(server.url, "/v1/score", corrupt, times=1)
    with serve_in_thread(proxy_app) as proxy, teacher_for(proxy.url, max_invalid_replies=1) as teacher:
        request = ScoreRequest(topk=K, temperature=TEMP)
        got = teacher.score(rollouts, request)
        assert proxy_app.corrupted == 1
        assert_matches_reference(got, reference, rollouts.completion_mask)
        proxy_app.times = None
        start = time.monotonic()
        with pytest.raises(ValueError, match="sent an invalid reply") as err:
            teacher.score(rollouts, request)
        assert time.monotonic() - start < 10  # a wrong reply is not a server that is down
    message = str(err.value)
    assert proxy.url in message and word in message and "2 replies failed the checks" in message, message
    if kind == "foreign_json":
        assert "version" not in message  # foreign JSON is not blamed on the wire version


def test_the_other_replica_answers_when_one_path_corrupts_everything(server, rollouts, reference):
    proxy_app = CorruptingProxy(server.url, "/v1/score", BINARY_CORRUPTIONS["logprob_plus_3"][0])
    with serve_in_thread(proxy_app) as proxy:
        got = score([proxy.url, server.url], rollouts, chunk_tokens=12, concurrency=1)
    assert proxy_app.corrupted >= 1
    assert_matches_reference(got, reference, rollouts.completion_mask)


def test_a_reply_in_another_wire_version_is_refused(server, rollouts, reference):
    """A version-3 request answered in version 2 (no checksum: a stripped or downgraded reply)."""
    def downgrade(body, ctype):
        _, meta, arrays = wire.read_binary(body)
        return wire.pack(meta, arrays, dtypes={n: a.dtype.str[1:] for n, a in arrays.items()}, version=2), ctype

    proxy_app = CorruptingProxy(server.url, "/v1/score", downgrade, times=1)
    with serve_in_thread(proxy_app) as proxy:
        got = score(proxy.url, rollouts)
        proxy_app.times = None
        with pytest.raises(ValueError, match="asked for wire version 3, the reply is version 2"):
            score(proxy.url, rollouts, max_invalid_replies=0)
    assert_matches_reference(got, reference, rollouts.completion_mask)


# ---------------------------------------------------------------------------------------------
# protocol "openai": the /v1/completions prompt_logprobs JSON, corrupted the same ways.
# ---------------------------------------------------------------------------------------------

def rewrite_choices(change):
    def corrupt(body, ctype):
        obj = orjson.loads(body)
        change(obj["choices"], obj["choices"][0]["prompt_logprobs"][-1])  # the last entry: a completion position
        return orjson.dumps(obj), ctype
    return corrupt


def _first(entry):
    return next(iter(entry.values()))


def _drop_kth(choices, entry):
    del entry[max(entry, key=lambda key: entry[key]["rank"] if entry[key]["rank"] <= K else -1)]


def _rename_to_out_of_vocab(choices, entry):
    key = min(entry, key=lambda k: entry[k]["rank"])
    entry[str(VOCAB + 5)] = entry.pop(key)


OPENAI_CORRUPTIONS = {
    "logprob_plus_3": rewrite_choices(lambda choices, entry: _first(entry).update(logprob=3.0)),
    "mass_over_one": rewrite_choices(lambda choices, entry: [v.update(logprob=math.log(0.9)) for v in entry.values()]),
    "id_vocab_plus_5": rewrite_choices(_rename_to_out_of_vocab),
    "k_changed": rewrite_choices(_drop_kth),
    "row_cut_short": rewrite_choices(lambda choices, entry: choices[0]["prompt_logprobs"].pop()),
    "choice_missing": rewrite_choices(lambda choices, entry: choices.pop()),
    "rank_missing": rewrite_choices(lambda choices, entry: _first(entry).pop("rank")),
}


@pytest.mark.parametrize("kind", list(OPENAI_CORRUPTIONS))
def test_openai_protocol_replies_are_checked_too(kind, server, rollouts, reference):
    proxy_app = CorruptingProxy(server.url, "/v1/completions", OPENAI_CORRUPTIONS[kind], times=1)
    with serve_in_thread(proxy_app) as proxy:
        got = score(proxy.url, rollouts, protocol="openai")
        assert proxy_app.corrupted == 1
        assert_matches_reference(got, reference, rollouts.completion_mask)
        proxy_app.times = None
        with pytest.raises(ValueError, match="sent an invalid reply") as err:
            score(proxy.url, rollouts, protocol="openai", max_invalid_replies=0)
    assert proxy.url in str(err.value), err.value


# ---------------------------------------------------------------------------------------------
# URLs, a dead teacher, and the vocabulary of a server that does not report one.
# ---------------------------------------------------------------------------------------------

def test_a_url_without_a_scheme_fails_at_once():
    for url, fix in (("localhost:8000", "http://localhost:8000"), ("127.0.0.1:8000/", "http://127.0.0.1:8000"),
                     ("ftp://host:21", "http:// or https://")):
        with pytest.raises(ValueError, match="teacher.urls") as err:
            RemoteTeacher(["http://127.0.0.1:1", url], max_wait_s=60)
        assert repr(url) in str(err.value) and fix in str(err.value)


def test_a_teacher_that_stays_down_names_the_urls_and_max_wait(rollouts):
    socks = [reserve_port(), reserve_port()]  # bound, never listening
    urls = ["http://127.0.0.1:%d" % s.getsockname()[1] for s in socks]
    start = time.monotonic()
    with pytest.raises(TeacherUnavailable) as err:
        score(urls, rollouts, max_wait_s=1.0)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert all(u in message for u in urls) and "teacher.max_wait_s=1" in message, message
    assert "\n" not in message  # one line for `protege train: error:`
    for s in socks:
        s.close()


def _strip_vocab_size(body, ctype):
    """/v1/models as stock vLLM serves it: no vocab_size."""
    obj = orjson.loads(body)
    for entry in obj["data"]:
        entry.pop("vocab_size")
    return orjson.dumps(obj), ctype


def test_openai_server_without_vocab_size(model, server, rollouts, reference, tmp_path):
    """Stock vLLM's /v1/models has no vocab_size: the given vocab_size, else the served model's local
    config.json, else an error naming teacher.vocab_size."""
    proxy_app = CorruptingProxy(server.url, "/v1/models", _strip_vocab_size)
    with serve_in_thread(proxy_app) as proxy:
        with RemoteTeacher(proxy.url, protocol="openai", max_wait_s=10) as teacher:
            with pytest.raises(ValueError, match="teacher.vocab_size") as err:
                teacher.vocab_size
            assert proxy.url in str(err.value) and "'tiny'" in str(err.value)
        got = score(proxy.url, rollouts, protocol="openai", vocab_size=VOCAB)
        assert_matches_reference(got, reference, rollouts.completion_mask)
    model.config.save_pretrained(tmp_path / "teacher")  # what `vllm serve /path` reports as the model's root
    with serve_in_thread(create_app(HFBackend(model, model_name=str(tmp_path / "teacher")))) as named:
        proxy_app = CorruptingProxy(named.url, "/v1/models", _strip_vocab_size)
        with serve_in_thread(proxy_app) as proxy, RemoteTeacher(proxy.url, protocol="openai") as teacher:
            assert teacher.vocab_size == VOCAB and proxy_app.corrupted == 1
    with serve_in_thread(create_app(HFBackend(model))) as s, RemoteTeacher(s.url, vocab_size=VOCAB + 1) as teacher:
        with pytest.raises(ValueError, match=f"teacher.vocab_size={VOCAB + 1} but .* reports vocab_size {VOCAB}"):
            teacher.vocab_size


def test_training_against_an_openai_server_without_vocab_size(tiny_paths, tmp_path):
    """The trainer passes teacher.vocab_size: a short run against a vLLM-like /v1/models trains."""
    from transformers import AutoModelForCausalLM

    from protege.config import load_config
    from protege.trainer import Distiller

    teacher = AutoModelForCausalLM.from_pretrained(tiny_paths["teacher"]).eval()
    with serve_in_thread(create_app(HFBackend(teacher, pad_id=0, model_name="teacher"))) as s:
        proxy_app = CorruptingProxy(s.url, "/v1/models", _strip_vocab_size)
        with serve_in_thread(proxy_app) as proxy:
            args = [f"student.path={tiny_paths['student']}", f"teacher.urls=[{proxy.url}]", "teacher.protocol=openai",
                    f"data.path={tiny_paths['data']}", "loss.support=teacher", "loss.top_k=4",
                    "rollout.max_new_tokens=6", "train.prompts_per_step=2", "train.micro_batch_size=2",
                    f"output.dir={tmp_path}", "output.progress=false", "train.num_threads=1",
                    "data.eval_prompts=0", "train.max_steps=1", "teacher.max_wait_s=20"]
            with pytest.raises(ValueError, match="teacher.vocab_size"):
                Distiller(load_config(None, args))
            vocab = teacher.config.vocab_size
            d = Distiller(load_config(None, [*args, f"teacher.vocab_size={vocab}"]))
            m = d.train_step()
    assert d.teacher.vocab_size == vocab and math.isfinite(m["loss"])
