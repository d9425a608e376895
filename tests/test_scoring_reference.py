"""Teacher scoring against an independent reference: one plain HF forward per row, unpadded.

The reference, written here and nowhere else: for a row of prompt P (length p) and completion C
(length L), run the model on P + C alone (no padding, no batching) and take

    ref = log_softmax(model(P + C).logits / T, -1)[p - 1 : p - 1 + L]          (L, V)

(the logits at position i predict token i + 1). The teacher must return, at completion position t:
token logprob ref[t, C[t]], its own top-k = ref[t].topk(k), and ref[t, q] at each caller-given id q
(in process also the entropy of ref[t], and hidden states h_t with lm_head W such that
log_softmax(h_t W^T / T) = ref[t], what the exact full-vocabulary losses rebuild).
Checked at T = 0.7 and 1.5 (a teacher that ignores T, or divides twice, fails) for three paths:
LocalTeacher in process, the real server (HTTP on 127.0.0.1, a hand-written JSON request whose
base64 reply is decoded here with numpy), and RemoteTeacher through that server. Rows have
different prompt and completion lengths, so padding, length bucketing, chunking and the server's
merging of concurrent requests are all on the path.
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch
from tiny import make_model

from protege.server import HFBackend, create_app
from protege.server.background import serve_in_thread
from protege.teacher.base import ScoreRequest
from protege.teacher.local import LocalTeacher
from protege.teacher.remote import RemoteTeacher
from protege.records import Rollouts

VOCAB = 128
K = 5  # top-k asked for
M = 3  # caller-given ids per position
ATOL = 2e-5  # float32 forwards of different batch shapes agree to ~1e-6 here


@pytest.fixture(scope="module")
def model():
    return make_model(2, seed=11).eval()


@pytest.fixture(scope="module")
def rows():
    """Nine rows: prompt lengths 1..13, completion lengths 1..9 (one row per length pair), ids include 0 (= pad)."""
    g = torch.Generator().manual_seed(5)
    plens = [1, 13, 4, 7, 2, 10, 5, 3, 8]
    clens = [9, 1, 5, 3, 8, 2, 6, 7, 4]
    prompts = [torch.randint(0, VOCAB, (p,), generator=g) for p in plens]
    t = max(clens)
    mask = torch.arange(t)[None] < torch.tensor(clens)[:, None]  # (N, T)
    completion = torch.randint(0, VOCAB, (len(plens), t), generator=g) * mask  # (N, T), 0 past each length
    query = torch.randint(0, VOCAB, (len(plens), t, M), generator=g) * mask[..., None]  # (N, T, M)
    query[0, :, 1] = query[0, :, 0]  # a repeated id in one row
    return Rollouts(prompt_ids=prompts, completion_ids=completion, completion_mask=mask), query


@torch.no_grad()
def reference(model, prompt: torch.Tensor, completion: torch.Tensor, temperature: float) -> torch.Tensor:
    """(L, V) float64 log_softmax(logits / T) at the positions predicting each completion token."""
    seq = torch.cat([prompt, completion])[None]  # (1, p + L), nothing padded
    logits = model(input_ids=seq).logits[0].double()  # (p + L, V)
    p, n = len(prompt), len(completion)
    return torch.log_softmax(logits / temperature, dim=-1)[p - 1: p - 1 + n]


def check_against_reference(model, rollouts, query, temperature, token_lp, topk_ids, topk_lp, query_lp):
    """Every masked position of every row equals the reference; padding positions hold 0."""
    mask = rollouts.completion_mask
    for i in range(len(rollouts)):
        n = int(mask[i].sum())
        ref = reference(model, rollouts.prompt_ids[i], rollouts.completion_ids[i, :n], temperature)  # (n, V)
        want_tok = ref.gather(-1, rollouts.completion_ids[i, :n, None])[:, 0]
        torch.testing.assert_close(token_lp[i, :n].double(), want_tok, atol=ATOL, rtol=0, msg=f"token lp, row {i}")
        want = ref.topk(K, dim=-1)
        assert torch.equal(topk_ids[i, :n].long(), want.indices), f"top-{K} ids, row {i}"
        torch.testing.assert_close(topk_lp[i, :n].double(), want.values, atol=ATOL, rtol=0, msg=f"top-k lp, row {i}")
        want_q = ref.gather(-1, query[i, :n])
        torch.testing.assert_close(query_lp[i, :n].double(), want_q, atol=ATOL, rtol=0, msg=f"query lp, row {i}")
    assert torch.all(token_lp[~mask] == 0) and torch.all(query_lp[~mask] == 0)


@pytest.fixture(scope="module")
def server(model):
    backend = HFBackend(model, model_name="tiny", pad_id=0, token_budget=48, chunk_positions=7)
    with serve_in_thread(create_app(backend, max_k=16, max_query_ids=8)) as s:
        yield s


@pytest.mark.parametrize("temperature", [0.7, 1.5])
@pytest.mark.parametrize("token_budget, chunk_positions", [(16384, 2048), (30, 4)])
def test_local_teacher_matches_plain_forward(model, rows, temperature, token_budget, chunk_positions):
    """(16384, 2048): all rows in one padded batch, one logits chunk; (30, 4): several length buckets
    and logits chunks of 4 positions."""
    rollouts, query = rows
    teacher = LocalTeacher(model, pad_id=0, token_budget=token_budget, chunk_positions=chunk_positions)
    sig = teacher.score(rollouts, ScoreRequest(topk=K, query_ids=query, temperature=temperature, entropy=True,
                                               hidden=True))
    check_against_reference(model, rollouts, query, temperature, sig.token_logprobs, sig.topk_ids,
                            sig.topk_logprobs, sig.query_logprobs)
    for i in range(len(rollouts)):  # entropy, and the hidden states + weight that exact losses rebuild logits from
        n = int(rollouts.completion_mask[i].sum())
        ref = reference(model, rollouts.prompt_ids[i], rollouts.completion_ids[i, :n], temperature)  # (n, V)
        torch.testing.assert_close(sig.entropy[i, :n].double(), -(ref.exp() * ref).sum(-1), atol=1e-4, rtol=0)
        rebuilt = torch.log_softmax((sig.hidden_states[i, :n] @ teacher.output_weight.T).double() / temperature, -1)
        torch.testing.assert_close(rebuilt, ref, atol=ATOL, rtol=0, msg=f"hidden states, row {i}")


def _decode_b64_array(entry: dict) -> torch.Tensor:
    """One {"dtype": "<code>", "shape": [...], "b64": "..."} array of a JSON reply, decoded with numpy."""
    array = np.frombuffer(base64.b64decode(entry["b64"]), dtype=np.dtype("<" + entry["dtype"]))
    return torch.from_numpy(array.reshape(entry["shape"]).astype(np.float64 if entry["dtype"][0] == "f" else np.int64))


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_server_matches_plain_forward(model, rows, server, temperature):
    """A plain JSON request to /v1/score; the reply's base64 arrays are decoded here."""
    rollouts, query = rows
    mask = rollouts.completion_mask
    lens = mask.sum(1).tolist()
    body = {"sequences": [torch.cat([p, c[:n]]).tolist() for p, c, n in zip(rollouts.prompt_ids,
                                                                           rollouts.completion_ids, lens)],
            "prompt_lengths": [len(p) for p in rollouts.prompt_ids], "topk": K, "temperature": temperature,
            "query_ids": [q[:n].tolist() for q, n in zip(query, lens)]}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    arrays = {name: _decode_b64_array(entry) for name, entry in r.json()["arrays"].items()}
    assert arrays["completion_lengths"].tolist() == lens
    t = mask.shape[1]
    assert arrays["token_logprobs"].shape == (len(lens), t)
    check_against_reference(model, rollouts, query, temperature, arrays["token_logprobs"], arrays["topk_ids"],
                            arrays["topk_logprobs"], arrays["query_logprobs"])


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_remote_teacher_matches_plain_forward(model, rows, server, temperature):
    """chunk_tokens=20: the rows go out as several concurrent requests that the server may merge."""
    rollouts, query = rows
    with RemoteTeacher(server.url, chunk_tokens=20, concurrency=4, max_wait_s=30) as teacher:
        assert teacher.vocab_size == VOCAB
        sig = teacher.score(rollouts, ScoreRequest(topk=K, query_ids=query, temperature=temperature))
    check_against_reference(model, rollouts, query, temperature, sig.token_logprobs, sig.topk_ids,
                            sig.topk_logprobs, sig.query_logprobs)
