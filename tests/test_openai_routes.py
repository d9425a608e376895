"""protege's OpenAI-compatible generation routes on a real uvicorn (127.0.0.1): reply shapes (OpenAI's chat
and legacy completions schema, checked by hand here; the vLLM tier also validates them with the `openai`
package's types), logprobs equal to a brute-force log_softmax of the model, greedy text equal to
model.generate, echo / prompt_logprobs, seeds, stop strings, merged concurrent requests, bad fields."""

import concurrent.futures

import httpx
import pytest
import torch

from protege.server import HFBackend, create_app
from protege.server.background import serve_in_thread
from tiny import make_model, make_tokenizer

ATOL = 1e-4


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return make_model(2, seed=5).eval()


@pytest.fixture(scope="module")
def server(model, tok):
    app = create_app(HFBackend(model, model_name="tiny", tokenizer=tok, pad_id=0), batch_wait_ms=50, max_k=16)
    with serve_in_thread(app) as s:
        s.app = app
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def brute_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """(len(completion), V) log_softmax of the logits that predict each completion token: one plain forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].double()
    return torch.log_softmax(logits[len(prompt) - 1: len(prompt) + len(completion) - 1], -1)


def ids_of(tokens: list[str]) -> list[int]:
    assert all(t.startswith("token_id:") for t in tokens), tokens
    return [int(t[9:]) for t in tokens]


def check_usage(body: dict, prompt_tokens: int, completion_tokens: int) -> None:
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}


def check_chat_schema(body: dict, n: int, top: int | None) -> None:
    """OpenAI's ChatCompletion, field by field (types as the API reference gives them)."""
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int) and isinstance(body["model"], str) and len(body["choices"]) == n
    for i, choice in enumerate(body["choices"]):
        assert choice["index"] == i and choice["finish_reason"] in ("stop", "length")
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        if top is None:
            assert choice["logprobs"] is None
            continue
        for entry in choice["logprobs"]["content"]:
            assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
            assert isinstance(entry["token"], str) and isinstance(entry["logprob"], float)
            assert entry["bytes"] == list(entry["token"].encode()) and len(entry["top_logprobs"]) == top
            assert all(set(t) == {"token", "logprob", "bytes"} for t in entry["top_logprobs"])


def test_chat_top_logprobs_equal_a_brute_force_log_softmax(model, tok, client):
    messages = [{"role": "user", "content": "what is 2+3?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    for temperature in (1.0, 0.7):  # logprobs are the model's own distribution at temperature 1 either way
        r = client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": messages, "max_tokens": 10, "temperature": temperature, "seed": 3,
            "logprobs": True, "top_logprobs": 5, "return_tokens_as_token_ids": True})
        assert r.status_code == 200, r.text
        body = r.json()
        check_chat_schema(body, 1, 5)
        content = body["choices"][0]["logprobs"]["content"]
        ids = ids_of([e["token"] for e in content])
        ref = brute_logprobs(model, prompt, ids)  # (C, V)
        got = torch.tensor([e["logprob"] for e in content], dtype=torch.float64)
        torch.testing.assert_close(got, ref.gather(-1, torch.tensor(ids)[:, None])[:, 0], atol=ATOL, rtol=0)
        top_ids = torch.tensor([ids_of([t["token"] for t in e["top_logprobs"]]) for e in content])
        top_lps = torch.tensor([[t["logprob"] for t in e["top_logprobs"]] for e in content], dtype=torch.float64)
        torch.testing.assert_close(top_lps, ref.topk(5, -1).values, atol=ATOL, rtol=0)
        torch.testing.assert_close(top_lps, ref.gather(-1, top_ids), atol=ATOL, rtol=0)
        assert body["choices"][0]["message"]["content"] == tok.decode(ids, skip_special_tokens=True)
        finish = body["choices"][0]["finish_reason"]
        assert (finish == "stop") == (ids[-1] == tok.eos_token_id) and (finish == "stop" or len(ids) == 10)
        check_usage(body, len(prompt), len(ids))


def test_greedy_text_equals_model_generate(model, tok, client):
    text = "what is 4+1?"
    prompt = tok(text)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, eos_token_id=1,
                             pad_token_id=0)[0, len(prompt):].tolist()
    expected = out[: out.index(1) + 1] if 1 in out else out
    r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 12, "temperature": 0, "n": 2,
                                             "logprobs": 0, "return_tokens_as_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    for i, choice in enumerate(body["choices"]):
        assert choice["index"] == i and ids_of(choice["logprobs"]["tokens"]) == expected
        assert choice["text"] == tok.decode(expected, skip_special_tokens=True)
        assert choice["logprobs"]["top_logprobs"] == [{}] * len(expected)
    check_usage(body, len(prompt), 2 * len(expected))


def test_echo_and_prompt_logprobs_legacy_shape(model, tok, client):
    prompt = tok("abc+d=")["input_ids"]
    r = client.post("/v1/completions", json={"prompt": [prompt], "max_tokens": 4, "logprobs": 3, "echo": True,
                                             "prompt_logprobs": 2, "seed": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    tokens = lp["tokens"]
    assert tokens[: len(prompt)] == [tok.decode([i]) for i in prompt] and choice["text"].startswith("abc+d=")
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == [sum(len(t) for t in tokens[:j]) for j in range(len(tokens))]
    ref = brute_logprobs(model, prompt[:1], prompt[1:])  # prompt positions 1..P-1
    got = torch.tensor(lp["token_logprobs"][1: len(prompt)], dtype=torch.float64)
    torch.testing.assert_close(got, ref.gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0], atol=ATOL, rtol=0)
    for pos, top in enumerate(lp["top_logprobs"][1: len(prompt)]):
        assert len(top) == len(set(tok.decode([i]) for i in ref[pos].topk(3).indices.tolist()))
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(prompt) and entries[0] is None
    for pos in range(1, len(prompt)):
        entry, actual = entries[pos], prompt[pos]
        assert abs(entry[str(actual)]["logprob"] - ref[pos - 1, actual].item()) < ATOL
        ranked = sorted((v["rank"], int(k)) for k, v in entry.items())
        assert [k for rank, k in ranked if rank <= 2] == ref[pos - 1].topk(2).indices.tolist()


def test_seed_reproduces_and_stop_cuts_the_text(client):
    body = {"prompt": "hello there", "max_tokens": 16, "temperature": 1.0, "seed": 11}
    a, b = (client.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(2))
    c = client.post("/v1/completions", json={**body, "seed": 12}).json()["choices"][0]["text"]
    assert a == b and len(a) > 3, (a, b)
    assert c != a
    greedy = client.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    top1 = client.post("/v1/completions", json={**body, "top_k": 1}).json()["choices"][0]["text"]
    assert top1 == greedy  # the sampler draws from the warped distribution (top_k=1: the argmax)
    stop = a[2]
    r = client.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
    assert r["text"] == a[: a.index(stop)] and r["finish_reason"] == "stop"


def test_concurrent_requests_are_merged_and_each_equals_its_own_run(client, server):
    """Left padding, per-row max_tokens, top-k widths and seeds of a merged call: each reply as if asked alone
    (greedy rows, and sampled rows with a seed: each row draws from its own generator)."""
    prompts = [("a", 3, 2, None), ("what is 1+1?", 6, 0, None), ("zz", 4, 5, None), ("tell me more", 6, None, None),
               ("hello", 8, 1, 7), ("what is 1+1?", 5, None, 8), ("hello", 8, None, 9)]

    def ask(job):
        prompt, max_tokens, logprobs, seed = job
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "logprobs": logprobs,
                                                 "temperature": 0 if seed is None else 1, "seed": seed})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["text"], choice["logprobs"], r.json()["usage"]["completion_tokens"]

    alone = [ask(p) for p in prompts]
    queue = server.app.state.generation
    calls = queue.engine_calls
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    for (text, lp, count), (text_a, lp_a, count_a) in zip(together, alone):
        assert (text, count) == (text_a, count_a)
        assert (lp is None) == (lp_a is None)
        if lp is not None:  # padded rows: the same numbers up to float rounding
            assert lp["tokens"] == lp_a["tokens"] and lp["text_offset"] == lp_a["text_offset"]
            torch.testing.assert_close(lp["token_logprobs"], lp_a["token_logprobs"], atol=ATOL, rtol=0)
            assert [sorted(t) for t in lp["top_logprobs"]] == [sorted(t) for t in lp_a["top_logprobs"]]
            torch.testing.assert_close([sorted(t.values()) for t in lp["top_logprobs"]],
                                       [sorted(t.values()) for t in lp_a["top_logprobs"]], atol=ATOL, rtol=0)
    # 7 requests of 2 sampling keys (greedy; temperature 1 with per-row seeds): merged, fewer calls than
    # requests (no merging makes exactly 7); all in one batch_wait window make 2
    assert 2 <= queue.engine_calls - calls < len(prompts), queue.engine_calls - calls


BAD = [
    ("chat-no-messages", "/v1/chat/completions", {"max_tokens": 2}, 400, "messages"),
    ("chat-top-without-logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat-bad-role", "/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "messages[0]"),
    ("chat-image-part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "content"),
    ("negative-temperature", "/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("top-p-2", "/v1/completions", {"prompt": "x", "top_p": 2}, 400, "top_p"),
    ("n-0", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n="),
    ("max-tokens-too-many", "/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ("max-tokens-0", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("logprobs-huge", "/v1/completions", {"prompt": "x", "logprobs": 1000}, 400, "logprobs"),
    ("unknown-field", "/v1/completions", {"prompt": "x", "best_guess": 1}, 400, "best_guess"),
    ("stream", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True}, 400,
     "stream"),
    ("stop-not-strings", "/v1/completions", {"prompt": "x", "stop": [1]}, 400, "stop"),
    ("prompt-id-out-of-vocab", "/v1/completions", {"prompt": [[1, 500]]}, 400, "prompt[0]"),
    ("seed-float", "/v1/completions", {"prompt": "x", "seed": 1.5}, 400, "seed"),
    ("penalty", "/v1/completions", {"prompt": "x", "presence_penalty": 1}, 400, "presence_penalty"),
    ("wrong-model", "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
     404, "gpt-9"),
]


@pytest.mark.parametrize("path, body, status, word", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_fields_get_a_4xx_naming_them(client, path, body, status, word):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert word in r.json()["error"], r.json()
