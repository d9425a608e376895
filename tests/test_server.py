"""The teacher server on a real uvicorn (127.0.0.1, free port): exact results, concurrency, TRL's
clients, hostile requests, overload, engine errors, metrics, and the CLI in a subprocess."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import concurrent.futures  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from protege import wire  # noqa: E402
from protege.server import HFBackend, compat, create_app  # noqa: E402
from protege.server.background import serve_in_thread  # noqa: E402
from protege.teacher.base import ScoreRequest  # noqa: E402
from protege.teacher.local import score_rows  # noqa: E402

VOCAB = 128
MAX_LEN = 256
ATOL = 1e-5


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN)
    return LlamaForCausalLM(cfg).eval()


def make_rows(seed: int, n: int = 5, lo: int = 4, hi: int = 30):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, VOCAB, int(rng.integers(lo, hi))).astype(np.int32) for _ in range(n)]
    plens = [int(rng.integers(1, len(s))) for s in seqs]
    return seqs, plens


def local_score(model, seqs, plens, *, topk=0, query=None, temperature=1.0):
    """score_rows on the same model: the reference the server must reproduce (query: list of (C_i, M))."""
    comp_lens = [len(s) - p for s, p in zip(seqs, plens)]
    t = max(comp_lens)
    completion = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, plens)):
        completion[i, : len(s) - p] = torch.from_numpy(s[p:].astype(np.int64))
    mask = torch.arange(t)[None] < torch.tensor(comp_lens)[:, None]
    query_ids = None
    if query is not None:
        query_ids = torch.zeros((len(seqs), t, query[0].shape[1]), dtype=torch.long)
        query_ids[mask] = torch.from_numpy(np.concatenate(query).astype(np.int64))
    prompts = [torch.from_numpy(s[:p].astype(np.int64)) for s, p in zip(seqs, plens)]
    signal = score_rows(model, prompts, completion, mask,
                        ScoreRequest(topk=topk, query_ids=query_ids, temperature=temperature), pad_id=0)
    return signal, mask


def assert_matches(tensors, ref, mask, topk, query, rtol=0.0):
    """ids exact, logprobs to ATOL (+ rtol: 2^-11 for float16 logprobs on the wire)."""
    assert torch.equal(tensors["completion_lengths"], mask.sum(1))
    assert all(t.dtype in (torch.float32, torch.int64) for t in tensors.values())
    torch.testing.assert_close(tensors["token_logprobs"][mask], ref.token_logprobs[mask], atol=ATOL, rtol=rtol)
    assert torch.all(tensors["token_logprobs"][~mask] == 0)
    if topk:
        assert torch.equal(tensors["topk_ids"][mask], ref.topk_ids[mask])
        torch.testing.assert_close(tensors["topk_logprobs"][mask], ref.topk_logprobs[mask], atol=ATOL, rtol=rtol)
    else:
        assert "topk_ids" not in tensors
    if query is not None:
        torch.testing.assert_close(tensors["query_logprobs"][mask], ref.query_logprobs[mask], atol=ATOL, rtol=rtol)


def post_score(client, seqs, plens, *, topk=0, query=None, temperature=1.0):
    q = np.concatenate(query).astype(np.int32) if query is not None else None
    body = wire.encode_score_request(seqs, plens, topk=topk, temperature=temperature, query_ids=q)
    r = client.post("/v1/score", content=body, headers={"Content-Type": wire.BINARY_MEDIA_TYPE})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == wire.BINARY_MEDIA_TYPE
    return wire.decode_score_response(r.content, r.headers["content-type"])[1]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def server(model):
    app = create_app(HFBackend(model, model_name="tiny-llama"), max_k=16, max_query_ids=8,
                     max_body_bytes=1 << 20, max_request_seqs=64, max_request_tokens=8192)
    with serve_in_thread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def test_score_binary_matches_local_forward(model, client):
    seqs, plens = make_rows(0, n=6)
    rng = np.random.default_rng(1)
    query = [rng.integers(0, VOCAB, (len(s) - p, 4)).astype(np.int32) for s, p in zip(seqs, plens)]
    tensors = post_score(client, seqs, plens, topk=5, query=query, temperature=0.8)
    ref, mask = local_score(model, seqs, plens, topk=5, query=query, temperature=0.8)
    assert_matches(tensors, ref, mask, 5, query)


def test_score_json_request_with_base64_reply(model, client):
    seqs, plens = make_rows(2, n=3)
    query = [np.tile(np.arange(3, dtype=np.int32), (len(s) - p, 1)) for s, p in zip(seqs, plens)]
    body = {"sequences": [s.tolist() for s in seqs], "prompt_lengths": plens, "topk": 3,
            "query_ids": [q.tolist() for q in query], "temperature": 1.5}
    r = client.post("/v1/score", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert orjson.loads(r.content)["protege_wire"] == wire.VERSION
    meta, tensors = wire.decode_score_response(r.content, r.headers["content-type"])
    assert meta["topk"] == 3 and meta["temperature"] == 1.5
    ref, mask = local_score(model, seqs, plens, topk=3, query=query, temperature=1.5)
    assert_matches(tensors, ref, mask, 3, query)
    # binary request, JSON reply when the client asks for it
    r = client.post("/v1/score", content=wire.encode_score_request(seqs, plens, topk=2),
                    headers={"Content-Type": wire.BINARY_MEDIA_TYPE, "Accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"


FP16_RTOL = 2.0 ** -11  # protege.wire's documented float16 error (relative)


@pytest.mark.parametrize("version, logprob_dtype, ids_code, lp_code", [
    (2, "float32", "u2", "f4"),  # the default: uint16 ids (VOCAB fits), exact float32 logprobs
    (2, "float16", "u2", "f2"),
    (1, "float32", "i4", "f4"),  # a version-1 client gets the version-1 reply it understands
])
def test_score_reply_dtypes_follow_the_request(model, client, version, logprob_dtype, ids_code, lp_code):
    seqs, plens = make_rows(20, n=4)
    rng = np.random.default_rng(21)
    query = [rng.integers(0, VOCAB, (len(s) - p, 3)).astype(np.int32) for s, p in zip(seqs, plens)]
    body = wire.encode_score_request(seqs, plens, topk=6, temperature=0.7, query_ids=np.concatenate(query),
                                     logprob_dtype=logprob_dtype, version=version)
    r = client.post("/v1/score", content=body, headers={"Content-Type": wire.BINARY_MEDIA_TYPE})
    assert r.status_code == 200, r.text
    got_version, _, raw = wire.read_binary(r.content)
    assert got_version == version
    assert {n: a.dtype.str[1:] for n, a in raw.items()} == {
        "completion_lengths": "i4", "topk_ids": ids_code, "token_logprobs": lp_code, "topk_logprobs": lp_code,
        "query_logprobs": lp_code}
    ref, mask = local_score(model, seqs, plens, topk=6, query=query, temperature=0.7)
    tensors = wire.decode_score_response(r.content, r.headers["content-type"])[1]
    assert_matches(tensors, ref, mask, 6, query, rtol=FP16_RTOL if logprob_dtype == "float16" else 0.0)
    # the same request as plain JSON, base64-JSON reply in the version asked for
    r = client.post("/v1/score", json={"sequences": [x.tolist() for x in seqs], "prompt_lengths": plens, "topk": 6,
                                       "temperature": 0.7, "query_ids": [q.tolist() for q in query],
                                       "logprob_dtype": logprob_dtype, "wire_version": version})
    assert r.status_code == 200, r.text
    obj = orjson.loads(r.content)
    assert obj["protege_wire"] == version and obj["arrays"]["topk_ids"]["dtype"] == ids_code
    tensors = wire.decode_score_response(r.content, r.headers["content-type"])[1]
    assert_matches(tensors, ref, mask, 6, query, rtol=FP16_RTOL if logprob_dtype == "float16" else 0.0)


def test_vocabulary_over_65536_sends_int32_ids():
    class BigVocab:  # a stand-in engine: top-k ids near the top of a 70000-token vocabulary
        name, model_name, vocab_size, dtype = "hf", "big", 70_000, "float32"

        def score(self, batch):
            comp = np.array([len(x) - p for x, p in zip(batch.sequences, batch.prompt_lengths)], np.int32)
            n, t, k = len(comp), int(comp.max()), batch.topk
            ids = np.broadcast_to(np.arange(69_999, 69_999 - k, -1, dtype=np.int32), (n, t, k)).copy()
            lp = np.broadcast_to(-np.arange(1, k + 1, dtype=np.float32), (n, t, k)).copy()
            return {"completion_lengths": comp, "token_logprobs": np.full((n, t), -2.0, np.float32),
                    "topk_ids": ids, "topk_logprobs": lp}

    with serve_in_thread(create_app(BigVocab())) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        body = wire.encode_score_request([np.array([1, 68_000, 3], np.int32)], [1], topk=3)
        r = c.post("/v1/score", content=body, headers={"Content-Type": wire.BINARY_MEDIA_TYPE})
        assert r.status_code == 200, r.text
        assert wire.read_binary(r.content)[2]["topk_ids"].dtype == np.dtype("<i4")
        tensors = wire.decode_score_response(r.content, r.headers["content-type"])[1]
        assert tensors["topk_ids"][0, 0].tolist() == [69_999, 69_998, 69_997]


def test_sixteen_concurrent_clients_get_their_own_answers(model, server):
    barrier = threading.Barrier(16)

    def one_client(cid: int):
        seqs, plens = make_rows(100 + cid, n=1 + cid % 4)
        topk = 1 + cid % 6
        query = None
        if cid % 2:
            rng = np.random.default_rng(cid)
            query = [rng.integers(0, VOCAB, (len(s) - p, 1 + cid % 3)).astype(np.int32) for s, p in zip(seqs, plens)]
        with httpx.Client(base_url=server.url, timeout=60) as c:
            barrier.wait(timeout=30)
            tensors = post_score(c, seqs, plens, topk=topk, query=query, temperature=0.5 + cid % 3 * 0.5)
        return seqs, plens, topk, query, 0.5 + cid % 3 * 0.5, tensors

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(one_client, range(16)))
    for seqs, plens, topk, query, temperature, tensors in outcomes:
        ref, mask = local_score(model, seqs, plens, topk=topk, query=query, temperature=temperature)
        assert_matches(tensors, ref, mask, topk, query)


def _trl_client(url: str, monkeypatch):
    """TRL 1.16's VLLMClient built by its own constructor against our server on 127.0.0.1 (it checks the
    server's /health/ and reads the model name from /v1/models). The constructor refuses to run unless
    the vllm package is importable (an install gate only: scoring needs no vllm and opens no
    communicator); without vllm that one gate is opened here, the vLLM tier runs it as it is."""
    import importlib.util

    import trl.generation.vllm_client as trl_vllm_client

    if importlib.util.find_spec("vllm") is None:
        monkeypatch.setattr(trl_vllm_client, "is_vllm_available", lambda *a, **k: True)
    return trl_vllm_client.VLLMClient(base_url=url, connection_timeout=10)


def test_trl_vllm_client_get_sequence_logprobs(model, server, monkeypatch):
    trl_client = _trl_client(server.url, monkeypatch)
    assert trl_client.model == "tiny-llama"
    seqs, plens = make_rows(7, n=5)
    out = trl_client.get_sequence_logprobs([s.tolist() for s in seqs], plens, top_logprobs=4, temperature=0.7,
                                           chunk_size=2, max_concurrent_requests=2)
    ref, mask = local_score(model, seqs, plens, topk=4, temperature=0.7)
    for i, (s, p) in enumerate(zip(seqs, plens)):
        c = len(s) - p
        np.testing.assert_allclose(out["logprobs"][i], ref.topk_logprobs[i, :c].numpy(), atol=ATOL, rtol=0)
        assert out["logprob_token_ids"][i] == ref.topk_ids[i, :c].tolist()
        np.testing.assert_allclose(np.array(out["actual_logprobs"][i])[:, 0], ref.token_logprobs[i, :c].numpy(),
                                   atol=ATOL, rtol=0)
        assert out["actual_token_ids"][i] == [[int(x)] for x in s[p:]]


def test_openai_completions_shape(model, client):
    seqs, _ = make_rows(8, n=2)
    r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": [s.tolist() for s in seqs],
                                             "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and len(body["choices"]) == 2
    ref, mask = local_score(model, seqs, [1, 1], topk=3)
    for i, (choice, s) in enumerate(zip(body["choices"], seqs)):
        entries = choice["prompt_logprobs"]
        assert len(entries) == len(s) and entries[0] is None
        for pos in range(1, len(s)):
            entry = entries[pos]
            actual = entry[str(s[pos])]
            assert abs(actual["logprob"] - ref.token_logprobs[i, pos - 1].item()) < ATOL
            top = ref.topk_ids[i, pos - 1].tolist()
            assert actual["rank"] == (top.index(int(s[pos])) + 1 if int(s[pos]) in top else 4)
            ranked = sorted(entry.items(), key=lambda kv: kv[1]["rank"])[:3]
            assert [int(t) for t, _ in ranked] == top
        assert choice["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == sum(len(s) for s in seqs)
    # a single flat prompt and no prompt_logprobs
    r = client.post("/v1/completions", json={"prompt": seqs[0].tolist(), "max_tokens": 1})
    assert r.status_code == 200 and r.json()["choices"][0]["prompt_logprobs"] is None


def test_openai_decoded_tokens_with_a_tokenizer(model):
    class Tokenizer:  # what compat.Decoder needs: batch_decode of single-id lists
        def batch_decode(self, rows):
            return [f"<{r[0]}>" for r in rows]

    with serve_in_thread(create_app(HFBackend(model, model_name="m"), tokenizer=Tokenizer())) as s:
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": [[5, 6, 7]], "max_tokens": 1, "prompt_logprobs": 2})
    choice = r.json()["choices"][0]
    assert choice["prompt_logprobs"][1]["6"]["decoded_token"] == "<6>"
    ref, _ = local_score(model, [np.array([5, 6, 7, 0], np.int32)], [1], topk=1)
    assert choice["text"] == f"<{ref.topk_ids[0, 2, 0].item()}>"  # greedy next token after the prompt


def test_trl_legacy_endpoint_json_and_binary(model, client):
    seqs, plens = make_rows(9, n=3)
    plens[0] = len(seqs[0])  # TRL allowed an empty completion
    ref, mask = local_score(model, seqs[1:], plens[1:], topk=4, temperature=0.9)
    req = {"sequences": [s.tolist() for s in seqs], "prompt_lengths": plens, "top_logprobs": 4, "temperature": 0.9}
    r = client.post("/get_sequence_logprobs/", json={**req, "response_format": "binary"})
    assert r.status_code == 200, r.text
    out = compat.decode_trl_binary(r.content)
    assert out["completion_lengths"].tolist() == [0] + mask.sum(1).tolist()
    m = torch.cat([torch.zeros(1, mask.shape[1], dtype=torch.bool), mask])[:, : out["topk_ids"].shape[1]]
    torch.testing.assert_close(out["topk_logprobs"][1:][mask], ref.topk_logprobs[mask], atol=ATOL, rtol=0)
    assert torch.equal(out["topk_ids"][1:][mask], ref.topk_ids[mask])
    torch.testing.assert_close(out["token_logprobs"][1:][mask], ref.token_logprobs[mask], atol=ATOL, rtol=0)
    assert torch.all(torch.isinf(out["topk_logprobs"][~m]))  # TRL's -inf padding
    r = client.post("/get_sequence_logprobs", json=req)  # TRL's client posts without the trailing slash
    lists = r.json()
    assert lists["logprobs"][0] == []
    for i in range(2):
        for pos, (lps, ids) in enumerate(zip(lists["logprobs"][i + 1], lists["logprob_token_ids"][i + 1])):
            assert ids[:4] == ref.topk_ids[i, pos].tolist()
            actual = int(seqs[i + 1][plens[i + 1] + pos])
            assert len(ids) == (4 if actual in ids[:4] else 5)
            assert abs(lps[ids.index(actual)] - ref.token_logprobs[i, pos].item()) < ATOL


def _b(meta=None, **arrays):
    return {"content": wire.pack(meta or {}, arrays), "headers": {"Content-Type": wire.BINARY_MEDIA_TYPE}}


def _j(obj):
    return {"content": orjson.dumps(obj), "headers": JSON}


_OK = {"sequences": [[1, 2, 3]], "prompt_lengths": [1]}
JSON = {"Content-Type": "application/json"}
_BIN_OK = dict(tokens=np.array([1, 2, 3], np.int32), sequence_lengths=np.array([3], np.int32),
               prompt_lengths=np.array([1], np.int32))
_GOOD_BIN = wire.encode_score_request([np.array([1, 2, 3], np.int32)], [1])
_V1_FP16 = wire.pack({"logprob_dtype": "float16"}, _BIN_OK, version=1)
_V1_U2 = bytearray(wire.pack({}, _BIN_OK, dtypes={"tokens": "u2"}, version=2))
_V1_U2[4:6] = b"\x01\x00"  # a version-2 body relabelled as version 1: u2 is not a v1 dtype

BAD_REQUESTS = [  # (id, method, path, request kwargs, status, word the error must name)
    ("bad-json", "POST", "/v1/score", {"content": b"{not json", "headers": JSON}, 400, "JSON"),
    ("json-array-body", "POST", "/v1/score", _j([1, 2]), 400, "object"),
    ("json-null-body", "POST", "/v1/score", _j(None), 400, "object"),
    ("json-deeply-nested", "POST", "/v1/score", {"content": b"[" * 5000 + b"]" * 5000,
                                                 "headers": JSON}, 400, "JSON"),
    ("empty-body", "POST", "/v1/score", {"content": b"", "headers": JSON}, 400, "JSON"),
    ("missing-sequences", "POST", "/v1/score", _j({"prompt_lengths": [1]}), 400, "sequences"),
    ("missing-prompt-lengths", "POST", "/v1/score", _j({"sequences": [[1, 2]]}), 400, "prompt_lengths"),
    ("sequences-not-list", "POST", "/v1/score", _j({**_OK, "sequences": "abc"}), 400, "sequences"),
    ("empty-batch", "POST", "/v1/score", _j({"sequences": [], "prompt_lengths": []}), 400, "empty"),
    ("empty-sequence", "POST", "/v1/score", _j({"sequences": [[]], "prompt_lengths": [1]}), 400, "sequences[0]"),
    ("string-id", "POST", "/v1/score", _j({**_OK, "sequences": [[1, "a", 3]]}), 400, "sequences[0]"),
    ("float-id", "POST", "/v1/score", _j({**_OK, "sequences": [[1, 2.5, 3]]}), 400, "sequences[0]"),
    ("too-deep", "POST", "/v1/score", _j({**_OK, "sequences": [[[1, 2], [3, 4]]]}), 400, "sequences[0]"),
    ("id-too-large", "POST", "/v1/score", _j({**_OK, "sequences": [[1, 2, VOCAB]]}), 400, "vocabulary"),
    ("id-negative", "POST", "/v1/score", _j({**_OK, "sequences": [[1, -1, 3]]}), 400, "vocabulary"),
    ("id-huge-int", "POST", "/v1/score", {"content": b'{"sequences": [[1, 1180591620717411303424, 3]], '
                                                     b'"prompt_lengths": [1]}',
                                          "headers": JSON}, 400, "sequences[0]"),
    ("id-uint64", "POST", "/v1/score", _j({**_OK, "sequences": [[1, 2**64 - 1, 3]]}), 400, "sequences[0]"),
    ("prompt-lengths-count", "POST", "/v1/score", _j({**_OK, "prompt_lengths": [1, 1]}), 400, "prompt_lengths"),
    ("prompt-length-zero", "POST", "/v1/score", _j({**_OK, "prompt_lengths": [0]}), 400, "prompt_lengths[0]"),
    ("prompt-length-negative", "POST", "/v1/score", _j({**_OK, "prompt_lengths": [-2]}), 400, "prompt_lengths[0]"),
    ("prompt-takes-all", "POST", "/v1/score", _j({**_OK, "prompt_lengths": [3]}), 400, "prompt_lengths[0]"),
    ("prompt-length-too-long", "POST", "/v1/score", _j({**_OK, "prompt_lengths": [10**12]}), 400, "prompt_lengths[0]"),
    ("prompt-length-float", "POST", "/v1/score", _j({**_OK, "prompt_lengths": [1.5]}), 400, "prompt_lengths[0]"),
    ("prompt-length-bool", "POST", "/v1/score", _j({**_OK, "prompt_lengths": [True]}), 400, "prompt_lengths[0]"),
    ("topk-huge", "POST", "/v1/score", _j({**_OK, "topk": 10**9}), 400, "topk"),
    ("topk-negative", "POST", "/v1/score", _j({**_OK, "topk": -1}), 400, "topk"),
    ("topk-string", "POST", "/v1/score", _j({**_OK, "topk": "5"}), 400, "topk"),
    ("temperature-nan", "POST", "/v1/score", {"content": b'{"sequences": [[1,2]], "prompt_lengths": [1], '
                                                         b'"temperature": NaN}',
                                              "headers": JSON}, 400, "JSON"),
    ("temperature-zero", "POST", "/v1/score", _j({**_OK, "temperature": 0}), 400, "temperature"),
    ("temperature-negative", "POST", "/v1/score", _j({**_OK, "temperature": -1.0}), 400, "temperature"),
    ("temperature-string", "POST", "/v1/score", _j({**_OK, "temperature": "hot"}), 400, "temperature"),
    ("unknown-field", "POST", "/v1/score", _j({**_OK, "top_k": 5}), 400, "top_k"),
    ("query-count", "POST", "/v1/score", _j({**_OK, "query_ids": []}), 400, "query_ids"),
    ("query-ragged", "POST", "/v1/score", _j({**_OK, "query_ids": [[[1, 2], [3]]]}), 400, "query_ids[0]"),
    ("query-wrong-length", "POST", "/v1/score", _j({**_OK, "query_ids": [[[1, 2]]]}), 400, "query_ids[0]"),
    ("query-out-of-vocab", "POST", "/v1/score", _j({**_OK, "query_ids": [[[1], [VOCAB + 5]]]}), 400, "vocabulary"),
    ("query-too-wide", "POST", "/v1/score", _j({**_OK, "query_ids": [[[1] * 9, [2] * 9]]}), 400, "max-query-ids"),
    ("too-many-sequences", "POST", "/v1/score", _j({"sequences": [[1, 2]] * 65, "prompt_lengths": [1] * 65}), 413,
     "65"),
    ("sequence-too-long", "POST", "/v1/score", _j({"sequences": [[1] * (MAX_LEN + 1)], "prompt_lengths": [1]}), 413,
     "sequences[0]"),
    ("body-too-large", "POST", "/v1/score", {"content": b" " * (2 << 20), "headers": JSON},
     413, "max-body-bytes"),
    ("content-type-text", "POST", "/v1/score",
     {"content": orjson.dumps(_OK), "headers": {"Content-Type": "text/plain"}}, 415, "Content-Type"),
    ("content-type-missing", "POST", "/v1/score", {"content": orjson.dumps(_OK)}, 415, "Content-Type"),
    ("binary-bad-magic", "POST", "/v1/score", {"content": b"NOPE" + _GOOD_BIN[4:],
                                               "headers": {"Content-Type": wire.BINARY_MEDIA_TYPE}}, 400, "magic"),
    ("binary-bad-version", "POST", "/v1/score", {"content": _GOOD_BIN[:4] + b"\x07\x00" + _GOOD_BIN[6:],
                                                 "headers": {"Content-Type": wire.BINARY_MEDIA_TYPE}}, 400, "version"),
    ("binary-truncated", "POST", "/v1/score", {"content": _GOOD_BIN[:-6],
                                               "headers": {"Content-Type": wire.BINARY_MEDIA_TYPE}}, 400, "truncated"),
    ("binary-tiny", "POST", "/v1/score", {"content": b"PR", "headers": {"Content-Type": wire.BINARY_MEDIA_TYPE}}, 400,
     "body"),
    ("binary-length-sum", "POST", "/v1/score", _b(**{**_BIN_OK, "sequence_lengths": np.array([5], np.int32)}), 400,
     "sequence_lengths"),
    ("binary-id-out-of-vocab", "POST", "/v1/score", _b(**{**_BIN_OK, "tokens": np.array([1, 2, 999], np.int32)}), 400,
     "vocabulary"),
    ("binary-missing-tokens", "POST", "/v1/score", _b(sequence_lengths=np.array([3], np.int32),
                                                      prompt_lengths=np.array([1], np.int32)), 400, "tokens"),
    ("binary-float-tokens", "POST", "/v1/score", _b(**{**_BIN_OK, "tokens": np.array([1.0, 2, 3], np.float32)}), 400,
     "tokens"),
    ("binary-query-rows", "POST", "/v1/score", _b(**_BIN_OK, query_ids=np.zeros((5, 2), np.int32)), 400, "query_ids"),
    ("binary-bad-meta", "POST", "/v1/score", _b({"topk": "many"}, **_BIN_OK), 400, "topk"),
    ("binary-version-4", "POST", "/v1/score", {"content": _GOOD_BIN[:4] + b"\x04\x00" + _GOOD_BIN[6:],
                                               "headers": {"Content-Type": wire.BINARY_MEDIA_TYPE}}, 400,
     "wire version 4 is not supported"),
    ("binary-bad-logprob-dtype", "POST", "/v1/score", _b({"logprob_dtype": "int8"}, **_BIN_OK), 400,
     "logprob_dtype"),
    ("binary-v1-float16", "POST", "/v1/score", {"content": _V1_FP16,
                                                "headers": {"Content-Type": wire.BINARY_MEDIA_TYPE}}, 400,
     "needs wire version 2"),
    ("binary-v1-uint16", "POST", "/v1/score", {"content": bytes(_V1_U2),
                                               "headers": {"Content-Type": wire.BINARY_MEDIA_TYPE}}, 400, "dtype"),
    ("logprob-dtype-unknown", "POST", "/v1/score", _j({**_OK, "logprob_dtype": "bfloat16"}), 400, "logprob_dtype"),
    ("wire-version-unknown", "POST", "/v1/score", _j({**_OK, "wire_version": 4}), 400, "wire_version"),
    ("json-v1-float16", "POST", "/v1/score", _j({**_OK, "wire_version": 1, "logprob_dtype": "float16"}), 400,
     "version 2"),
    ("base64-json-version-4", "POST", "/v1/score", _j({**wire.to_json_dict({}, _BIN_OK), "protege_wire": 4}), 400,
     "wire version 4"),
    ("openai-text-prompt", "POST", "/v1/completions", _j({"prompt": "hello", "max_tokens": 1}), 400, "token ids"),
    ("openai-max-tokens", "POST", "/v1/completions", _j({"prompt": [[1, 2]], "max_tokens": -5}), 400, "max_tokens"),
    ("openai-no-prompt", "POST", "/v1/completions", _j({"max_tokens": 1}), 400, "prompt"),
    ("openai-n", "POST", "/v1/completions", _j({"prompt": [[1, 2]], "n": 0}), 400, "n=0"),
    ("openai-full-vocab", "POST", "/v1/completions", _j({"prompt": [[1, 2]], "prompt_logprobs": -1}), 400,
     "prompt_logprobs"),
    ("openai-wrong-model", "POST", "/v1/completions", _j({"model": "gpt-9", "prompt": [[1, 2]]}), 404, "gpt-9"),
    ("openai-stream", "POST", "/v1/completions", _j({"prompt": [[1, 2]], "stream": True}), 400, "stream"),
    ("trl-bad-format", "POST", "/get_sequence_logprobs/", _j({**_OK, "top_logprobs": 2, "response_format": "xml"}),
     400, "response_format"),
    ("trl-huge-k", "POST", "/get_sequence_logprobs/", _j({**_OK, "top_logprobs": 100000}), 400, "top_logprobs"),
    ("wrong-method", "GET", "/v1/score", {}, 405, "Method"),
    ("unknown-route", "POST", "/v2/everything", _j({}), 404, "Not Found"),
]


@pytest.mark.parametrize("method, path, kwargs, status, word", [c[1:] for c in BAD_REQUESTS],
                         ids=[c[0] for c in BAD_REQUESTS])
def test_malformed_request_gets_4xx_and_server_stays_healthy(client, method, path, kwargs, status, word):
    r = client.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert word.lower() in error.lower(), error
    assert client.get("/health").status_code == 200
    assert client.post("/v1/score", json=_OK).status_code == 200


def test_api_key():
    app = create_app(HFBackend(tiny_model(), model_name="locked"), api_key="s3cret")
    with serve_in_thread(app) as s, httpx.Client(base_url=s.url) as c:
        assert c.get("/health").status_code == 200  # open, for load balancers and TRL's check_server
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic s3cret"}):
            r = c.post("/v1/score", json=_OK, headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"]
            assert r.headers["www-authenticate"] == "Bearer"
            assert c.get("/v1/models", headers=headers).status_code == 401
        assert c.post("/v1/score", json=_OK, headers={"Authorization": "Bearer s3cret"}).status_code == 200


class SlowBackend(HFBackend):
    """Sleeps in every engine call; fails any batch holding token 13 (a poisoned request)."""

    delay = 0.0

    def score(self, batch):
        time.sleep(self.delay)
        if any(13 in s for s in batch.sequences):
            raise ValueError("poisoned row (token 13)")
        return super().score(batch)


def test_overload_answers_503_with_retry_after_then_recovers():
    backend = SlowBackend(tiny_model(), model_name="slow")
    backend.delay = 0.3
    with serve_in_thread(create_app(backend, max_queue=2, batching=False)) as s:
        def hit(_):
            with httpx.Client(base_url=s.url, timeout=30) as c:
                return c.post("/v1/score", json=_OK)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(hit, range(6)))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and 503 in codes, codes
        busy = next(r for r in responses if r.status_code == 503)
        assert int(busy.headers["retry-after"]) >= 1 and "busy" in busy.json()["error"]
        with httpx.Client(base_url=s.url) as c:
            assert c.get("/health").status_code == 200
            assert c.post("/v1/score", json=_OK).status_code == 200
            assert 'protege_requests_total{route="/v1/score",status="503"}' in c.get("/metrics").text


def test_engine_error_reaches_only_its_caller(model):
    backend = SlowBackend(model, model_name="poison")
    with serve_in_thread(create_app(backend, batch_wait_ms=200)) as s:
        good_seqs, good_plens = make_rows(11, n=3)
        good_seqs = [np.where(x == 13, 14, x).astype(np.int32) for x in good_seqs]
        barrier = threading.Barrier(3)

        def call(poisoned: bool):
            body = ({"sequences": [[1, 13, 2]], "prompt_lengths": [1]} if poisoned else
                    {"sequences": [x.tolist() for x in good_seqs], "prompt_lengths": good_plens, "topk": 2})
            with httpx.Client(base_url=s.url, timeout=30) as c:
                barrier.wait(timeout=10)
                return c.post("/v1/score", json=body)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            bad, good1, good2 = pool.map(call, [True, False, False])
        assert bad.status_code == 500 and "poisoned" in bad.json()["error"]
        ref, mask = local_score(model, good_seqs, good_plens, topk=2)
        for r in (good1, good2):
            assert r.status_code == 200
            assert_matches(wire.decode_score_response(r.content, r.headers["content-type"])[1], ref, mask, 2, None)


def test_oversize_request_is_split_across_engine_calls(model):
    app = create_app(HFBackend(model), max_batch_seqs=2, max_batch_tokens=64)
    with serve_in_thread(app) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        seqs, plens = make_rows(12, n=7, lo=10, hi=40)
        tensors = post_score(c, seqs, plens, topk=3)
        ref, mask = local_score(model, seqs, plens, topk=3)
        assert_matches(tensors, ref, mask, 3, None)
        calls = app.state.batcher.stats.engine_calls
        assert calls >= 4, calls
        seqs, plens = make_rows(13, n=2, lo=60, hi=64)
        assert post_score(c, seqs, plens)["token_logprobs"].shape[0] == 2  # a row near the token cap alone


def test_no_batching_mode_and_metrics(model):
    app = create_app(HFBackend(model), batching=False)
    with serve_in_thread(app) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        seqs, plens = make_rows(14, n=4)
        assert_matches(post_score(c, seqs, plens, topk=2), *local_score(model, seqs, plens, topk=2), 2, None)
        c.post("/v1/score", json={"sequences": []})
        text = c.get("/metrics").text
        for name in ("protege_queue_depth 0", "protege_batch_sequences_bucket", "protege_request_seconds_bucket",
                     "protege_tokens_per_second", 'route="/v1/score",status="400"', "protege_scored_tokens_total"):
            assert name in text, name
        info = c.get("/v1/info").json()
        assert info["vocab_size"] == VOCAB and info["batching"] is False and info["wire_version"] == wire.VERSION
        assert info["wire_versions"] == [1, 2, 3]


def test_vllm_backend_without_vllm_is_a_clear_error():
    pytest.importorskip("transformers")
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here; tests/test_vllm.py covers the backend")
    from protege.server.backends import load_backend

    with pytest.raises(ValueError, match=r"needs vllm, which is not installed.*--backend hf"):
        load_backend("vllm", "some/model")
    assert "vllm" not in sys.modules


def test_cli_serves_a_saved_model(tmp_path, model):
    model.save_pretrained(tmp_path / "teacher")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PROTEGE_API_KEY": "k"}
    cmd = [sys.executable, "-m", "protege.server.cli", "--model", str(tmp_path / "teacher"), "--port", str(port),
           "--max-k", "8", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "CLI server did not come up in 60 s"
            time.sleep(0.2)
        headers = {"Authorization": "Bearer k"}
        info = httpx.get(f"{url}/v1/info", headers=headers).json()
        assert info["vocab_size"] == VOCAB and info["max_k"] == 8
        seqs, plens = make_rows(15, n=2)
        with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
            assert_matches(post_score(c, seqs, plens, topk=8), *local_score(model, seqs, plens, topk=8), 8, None)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
