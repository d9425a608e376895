"""Rollouts of both HF-model engines (protege.rollout.hf.generate, protege.rollout.lean.generate) against an independent reference: a plain forward of the
sampled tokens.

For a generated row (prompt P of length p, completion C of length L) the reference, written here,
is one unpadded forward of P + C:

    ref = log_softmax(model(P + C).logits / T, -1)[p - 1 : p - 1 + L]          (L, V)

Contract checked (T = the sampling temperature; T = 0 means greedy and logprobs at T = 1):
- sampling_logprobs[i, t] = ref[t, C[t]]: the logprob under the FULL tempered distribution, also
  when top_k > 0 or top_p < 1 (not under the truncated, renormalised one the token was drawn from).
  That is what the losses recompute for the student (log_softmax(z / T) over the whole vocabulary),
  so sampled_pg's importance ratio is exactly 1 on-policy.
- the token itself lies in the top-k / top-p nucleus of ref when those are set;
- student_topk_ids/logprobs = ref[t].topk(k), student_entropy = entropy of ref[t];
- a row is cut right after its first EOS (the EOS kept, finish reason "stop"); a row without EOS
  has max_new_tokens tokens and finish reason "length"; padding: ids 0, mask False, logprob 0,
  top-k logprobs -inf.
The model has an lm_head bias on EOS (generate does not need a bias-free head), so some rows stop
early and others hit the cap; prompts of different lengths share left-padded generate batches.
"""

from __future__ import annotations

import pytest
import torch
from tiny import make_model

from protege.rollout import hf, lean

ENGINES = {"hf": hf.generate, "lean": lean.generate}  # the same contract, checked on each

EOS = 1
PAD = 0
MAX_NEW = 10
K = 4
ATOL = 5e-5  # KV-cached, left-padded batch vs one unpadded forward, float32


@pytest.fixture(scope="module")
def model():
    """A tiny Llama whose lm_head has a bias of 6 on EOS: P(EOS) is sizeable at some positions only."""
    m = make_model(2, seed=3).eval()
    weight = m.get_output_embeddings().weight
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.zero_()
        head.bias[EOS] = 6.0
    m.lm_head = head
    return m


@pytest.fixture(params=sorted(ENGINES))
def generate(request):
    return ENGINES[request.param]


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, 128, (n,), generator=g) for n in (3, 9, 1, 6, 12, 4, 7, 2, 5, 10, 8, 11)]


@torch.no_grad()
def reference(model, prompt: torch.Tensor, completion: torch.Tensor, temperature: float) -> torch.Tensor:
    """(L, V) float64 log_softmax(logits / T) at the positions that predicted each completion token."""
    logits = model(input_ids=torch.cat([prompt, completion])[None]).logits[0].double()  # (p + L, V)
    p, n = len(prompt), len(completion)
    return torch.log_softmax(logits / (temperature or 1.0), dim=-1)[p - 1: p - 1 + n]


def check_rows(model, prompts, out, temperature, k_record):
    """Trimming, finish reasons, padding, and every recorded number against the reference.
    Returns the per-row reference logprobs (L_i, V) for further checks."""
    assert out.completion_ids.shape[1] == int(out.completion_mask.sum(1).max()), "padded past the longest row"
    refs = []
    for i, prompt in enumerate(prompts):
        n = int(out.completion_mask[i].sum())
        assert out.completion_mask[i, :n].all() and not out.completion_mask[i, n:].any(), f"row {i}: mask not a prefix"
        tokens = out.completion_ids[i, :n]
        eos_at = (tokens == EOS).nonzero().flatten().tolist()
        if out.finish_reasons[i] == "stop":
            assert eos_at == [n - 1], f"row {i}: a 'stop' row must end with its only EOS, got EOS at {eos_at}"
        else:
            assert out.finish_reasons[i] == "length" and n == MAX_NEW and not eos_at, f"row {i}"
        assert torch.all(out.completion_ids[i, n:] == 0) and torch.all(out.sampling_logprobs[i, n:] == 0)
        ref = reference(model, prompt, tokens, temperature)
        refs.append(ref)
        want = ref.gather(-1, tokens[:, None])[:, 0]
        torch.testing.assert_close(out.sampling_logprobs[i, :n].double(), want, atol=ATOL, rtol=0,
                                   msg=f"sampling logprobs, row {i}")
        if k_record:
            top = ref.topk(k_record, dim=-1)
            assert torch.equal(out.student_topk_ids[i, :n], top.indices), f"student top-k ids, row {i}"
            torch.testing.assert_close(out.student_topk_logprobs[i, :n].double(), top.values, atol=ATOL, rtol=0)
            entropy = -(ref.exp() * ref).sum(-1)
            torch.testing.assert_close(out.student_entropy[i, :n].double(), entropy, atol=1e-4, rtol=0)
            assert torch.all(out.student_topk_ids[i, n:] == 0)
            assert torch.all(out.student_topk_logprobs[i, n:] == float("-inf"))
    return refs


@pytest.mark.parametrize("temperature", [0.7, 1.5])
@pytest.mark.parametrize("batch_tokens", [16384, 48])
def test_sampling_logprobs_topk_and_eos_match_forward(generate, model, prompts, temperature, batch_tokens):
    """batch_tokens=48: prompts go to several generate calls (rows x (prompt + 10) <= 48)."""
    torch.manual_seed(0)
    out = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=temperature, eos_ids=[EOS], pad_id=PAD,
                   batch_tokens=batch_tokens, record_topk=K)
    check_rows(model, prompts, out, temperature, K)
    reasons = set(out.finish_reasons)
    assert reasons == {"stop", "length"}, f"the test needs both kinds of rows, got {out.finish_reasons}"
    lengths = out.completion_mask.sum(1)
    assert int(lengths.min()) < MAX_NEW, "no row was trimmed after an early EOS"
    assert out.sources == ["student"] * len(prompts)


def test_greedy_takes_the_argmax_and_records_logprobs_at_t1(generate, model, prompts):
    out = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=0.0, eos_ids=[EOS], pad_id=PAD, record_topk=K)
    refs = check_rows(model, prompts, out, 0.0, K)
    for i, ref in enumerate(refs):
        n = len(ref)
        assert torch.equal(out.completion_ids[i, :n], ref.argmax(-1)), f"row {i} is not greedy"


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.6)])
def test_truncated_sampling_records_the_full_distribution(generate, model, prompts, top_k, top_p):
    """Tokens come from the top-k / nucleus of the tempered distribution; the recorded logprob is the
    untruncated log_softmax(z / T), which differs from the renormalised one wherever the truncation
    dropped mass (asserted, so the check can tell the two apart)."""
    temperature = 1.5
    torch.manual_seed(2)
    out = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_ids=[EOS], pad_id=PAD, record_topk=0)
    refs = check_rows(model, prompts, out, temperature, 0)
    largest_gap = 0.0
    for i, ref in enumerate(refs):
        tokens = out.completion_ids[i, : len(ref)]
        lp = ref.gather(-1, tokens[:, None])[:, 0]  # (L,)
        if top_k:
            kept = ref >= ref.topk(top_k, dim=-1).values[:, -1:]  # (L, V)
        else:  # nucleus: the most likely tokens until their mass reaches top_p (the one crossing it included)
            higher = (ref.exp()[:, None, :] * (ref[:, None, :] > ref[:, :, None])).sum(-1)  # (L, V) mass above v
            kept = higher < top_p
        assert kept.gather(-1, tokens[:, None]).all(), f"row {i}: a token outside the top-k/top-p set was sampled"
        renormalised = lp - torch.logsumexp(torch.where(kept, ref, float("-inf")), dim=-1)
        largest_gap = max(largest_gap, float((renormalised - lp).abs().max()))
    assert largest_gap > 0.05, "truncation removed no mass: this test cannot tell full from truncated logprobs"
