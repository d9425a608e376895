"""The lean rollout engine (protege.rollout.lean) samples the same distribution as HF generate.

Its recorded numbers (logprobs, top-k, entropy, trimming, finish reasons) are checked against a plain
forward in tests/test_sampling_reference.py (parametrized over both engines). Here:
- frequencies: N rows of one prompt, the token at each of the first positions; a one-sample chi-square
  against the exact first-position distribution (softmax of a forward, truncated by top-k / top-p as
  the tests write it), and a two-sample chi-square against HF generate's rows at every position, each
  below the chi-square quantile at p = 1e-4 (Wilson-Hilferty), with bins of < 10 expected pooled;
- greedy: token for token HF generate's output, on a model where some rows stop early;
- its own generator: the same seed gives the same rows, another seed other rows.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny import make_model

from protege.rollout import hf, lean
from protege.rollout.base import Sampling

N = 3000  # rows per engine: a chi-square over ~10-40 bins then detects a 2-3% shift of a common token
STEPS = 3
Z = 3.72  # standard normal quantile at 1 - 1e-4


@pytest.fixture(scope="module")
def model():
    m = make_model(2, seed=3).eval()
    with torch.no_grad():  # flatter than the tiny default: many tokens have sizeable probability
        m.get_output_embeddings().weight.mul_(0.5)
    return m


def chi2_bound(df: int) -> float:
    """Upper 1e-4 quantile of chi-square(df), Wilson-Hilferty approximation."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + Z * math.sqrt(a)) ** 3


def pooled(expected: torch.Tensor, *observed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Bins with expected count >= 10 kept, the rest summed into one bin."""
    big = expected >= 10
    return tuple(torch.cat([x[big], x[~big].sum()[None]]) for x in (expected, *observed))


def one_sample(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    exp, obs = pooled(probs * counts.sum(), counts)
    keep = exp > 0
    return float(((obs - exp)[keep] ** 2 / exp[keep]).sum()), chi2_bound(int(keep.sum()) - 1)


def two_sample(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Equal-size two-sample chi-square: sum (a - b)^2 / (a + b) over pooled bins, df = bins - 1."""
    tot, a, b = pooled((a + b) / 2, a, b)
    keep = tot > 0
    return float(((a - b)[keep] ** 2 / (a + b)[keep]).sum()), chi2_bound(int(keep.sum()) - 1)


def truncated_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(V,) the distribution a token is drawn from: softmax(z / T), top-k, then the nucleus, renormalised."""
    p = torch.softmax(logits.double() / temperature, -1)
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k:
        keep &= p >= p.topk(top_k).values[-1]
    q = torch.where(keep, p, 0.0) / torch.where(keep, p, 0.0).sum()
    if top_p < 1:
        above = (q[None, :] * (q[None, :] > q[:, None])).sum(-1)  # mass of the strictly more likely tokens
        keep &= above < top_p
    q = torch.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.5, 0, 1.0), (1.5, 8, 0.9)])
def test_token_frequencies_match_the_distribution_and_hf_generate(model, temperature, top_k, top_p):
    prompt = torch.tensor([5, 17, 42, 9])
    prompts = [prompt] * N
    kw = dict(max_new_tokens=STEPS, temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=[1], pad_id=0,
              batch_tokens=N * (len(prompt) + STEPS))
    ours = lean.generate(model, prompts, generator=torch.Generator().manual_seed(0), **kw)
    torch.manual_seed(1)
    theirs = hf.generate(model, prompts, **kw)
    with torch.no_grad():
        first = truncated_probs(model(input_ids=prompt[None]).logits[0, -1], temperature, top_k, top_p)
    assert int((first * N >= 10).sum()) >= 5, "the first position is too peaked for the test to have power"
    counts = torch.bincount(ours.completion_ids[:, 0], minlength=first.numel()).double()
    stat, bound = one_sample(counts, first)
    assert stat < bound, f"position 0 vs the exact distribution: chi2 {stat:.1f} >= {bound:.1f}"
    for t in range(STEPS):  # marginal frequencies at position t (rows that stopped count as id 0)
        a = torch.bincount(ours.completion_ids[:, t], minlength=first.numel()).double()
        b = torch.bincount(theirs.completion_ids[:, t], minlength=first.numel()).double()
        stat, bound = two_sample(a, b)
        assert stat < bound, f"position {t} vs HF generate: chi2 {stat:.1f} >= {bound:.1f}"


def test_greedy_equals_hf_generate_token_for_token():
    """EOS = a token greedy emits on some rows only: rows stop at different steps and leave the lean batch.
    An untied random lm_head: the tied tiny model repeats the last prompt token greedily."""
    model = make_model(2, seed=3).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        model.lm_head = torch.nn.Linear(48, 128, bias=False)
        model.lm_head.weight.copy_(torch.randn(128, 48, generator=g))
    prompts = [torch.randint(2, 128, (n,), generator=g) for n in (3, 9, 1, 6, 12, 4, 7, 2, 5, 10, 8, 11)]
    kw = dict(max_new_tokens=12, temperature=0.0, pad_id=0, record_topk=3)
    free = hf.generate(model, prompts, eos_ids=[1], **kw).completion_ids  # (rows, 12)
    rows_with = torch.stack([(free == v).any(1) for v in range(128)]).sum(1)  # rows that emit each id
    eos = int(torch.where((rows_with >= 2) & (rows_with <= len(prompts) - 2), rows_with, 0).argmax())
    want = hf.generate(model, prompts, eos_ids=[eos], **kw)
    assert set(want.finish_reasons) == {"stop", "length"}, "the test needs rows that stop and rows that do not"
    got = lean.generate(model, prompts, eos_ids=[eos], **kw)
    assert torch.equal(got.completion_ids, want.completion_ids)
    assert torch.equal(got.completion_mask, want.completion_mask)
    assert got.finish_reasons == want.finish_reasons
    torch.testing.assert_close(got.sampling_logprobs, want.sampling_logprobs, atol=5e-5, rtol=0)
    assert torch.equal(got.student_topk_ids, want.student_topk_ids)
    torch.testing.assert_close(got.student_entropy, want.student_entropy, atol=1e-4, rtol=0)


def test_engine_seed_reproduces_its_rows(model):
    prompts = [torch.tensor([5, 17, 42, 9]), torch.tensor([3, 8])]
    sampling = Sampling(max_new_tokens=8, eos_ids=(1,), temperature=1.0, record_topk=2)
    a = lean.LeanEngine(model, pad_id=0, seed=7).generate(prompts, sampling)
    b = lean.LeanEngine(model, pad_id=0, seed=7).generate(prompts, sampling)
    c = lean.LeanEngine(model, pad_id=0, seed=8).generate(prompts, sampling)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.sampling_logprobs, b.sampling_logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)


@pytest.mark.parametrize("engine, sharded, device, want", [
    ("auto", False, "cpu", "lean"), ("auto", True, "cpu", "hf"), ("auto", False, "cuda", "hf"),
    ("hf", False, "cpu", "hf"), ("lean", False, "cuda", "lean"), ("vllm", True, "cpu", "vllm")])
def test_auto_engine_is_lean_for_a_cpu_student_not_sharded(engine, sharded, device, want):
    """rollout.engine=auto (the default): lean on the CPU, hf on a GPU and when FSDP2 shards the student
    (tests/test_fsdp.py runs that path with the default config: the lean loop would fail there, its ranks do not
    decode in step); an explicit name is kept."""
    from protege.config import load_config

    cfg = load_config(None, ["student.path=s", "teacher.path=t", f"rollout.engine={engine}"])
    assert cfg.rollout.engine_for(sharded, device) == want
    assert load_config(None, ["student.path=s", "teacher.path=t"]).rollout.engine == "auto"


def test_default_distiller_samples_with_the_lean_engine(tiny_paths, tmp_path):
    from protege.config import load_config
    from protege.trainer import Distiller

    d = Distiller(load_config(None, [f"student.path={tiny_paths['student']}", f"teacher.path={tiny_paths['teacher']}",
                                     f"data.path={tiny_paths['data']}", f"output.dir={tmp_path}",
                                     "output.progress=false", "train.num_threads=1", "data.eval_prompts=0"]))
    assert isinstance(d.student_engine(), lean.LeanEngine)
