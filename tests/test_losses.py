"""protege.losses against brute-force float64 references written straight from the math."""

from __future__ import annotations

import math
import os

import pytest
import torch

from protege import losses as L

NAMES = L.DIVERGENCES
INF = float("inf")


# ---------------------------------------------------------------- brute-force references (python floats)


def ref_log_softmax(z: list[float], tau: float = 1.0) -> list[float]:
    top = max(z) / tau
    log_norm = top + math.log(sum(0.0 if v == -INF else math.exp(v / tau - top) for v in z))
    return [v / tau - log_norm for v in z]


def log(x: float) -> float:
    return -INF if x <= 0 else math.log(x)


def ref_kl(la: list[float], lb: list[float]) -> float:
    """KL(a||b) from log-probabilities; 0 * log 0 = 0, mass against no mass = +inf."""
    total = 0.0
    for a, b in zip(la, lb):
        if math.exp(a) == 0.0:
            continue
        if b == -INF:
            return INF
        total += math.exp(a) * (a - b)
    return total


def ref_mix(w: float, la: list[float], lb: list[float]) -> list[float]:
    """log(w * a + (1 - w) * b)."""
    out = []
    for a, b in zip(la, lb):
        m = max(a, b)
        out.append(-INF if m == -INF else m + log(w * math.exp(a - m) + (1 - w) * math.exp(b - m)))
    return out


def ref_div(lp: list[float], lq: list[float], name: str, beta: float = 0.5, alpha: float = 0.1) -> float:
    if name == "forward_kl" or (name == "jsd" and beta == 0):
        return ref_kl(lp, lq)
    if name == "reverse_kl" or (name == "jsd" and beta == 1):
        return ref_kl(lq, lp)
    if name == "jsd":
        lm = ref_mix(beta, lp, lq)
        return beta * ref_kl(lp, lm) + (1 - beta) * ref_kl(lq, lm)
    if name == "tvd":
        return 0.5 * sum(abs(math.exp(a) - math.exp(b)) for a, b in zip(lp, lq))
    if name == "skew_forward_kl":
        return ref_kl(lp, ref_mix(alpha, lp, lq))
    return ref_kl(lq, ref_mix(alpha, lq, lp))


def ref_dense(zs: torch.Tensor, zt: torch.Tensor, name: str, tau: float = 1.0, **kw) -> torch.Tensor:
    flat_s, flat_t = zs.reshape(-1, zs.shape[-1]).tolist(), zt.reshape(-1, zt.shape[-1]).tolist()
    out = [ref_div(ref_log_softmax(t, tau), ref_log_softmax(s, tau), name, **kw) for s, t in zip(flat_s, flat_t)]
    return torch.tensor(out, dtype=torch.float64).reshape(zs.shape[:-1])


def ref_topk(zs, ids, zt, mask, name, tail, tau=1.0, **kw) -> torch.Tensor:
    """zt: teacher *logits*; the reference gathers the teacher's full-vocab probabilities itself."""
    B, T, K = ids.shape
    out = torch.empty(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            q_full = [math.exp(v) for v in ref_log_softmax(zs[b, t].tolist(), tau)]
            p_full = [math.exp(v) for v in ref_log_softmax(zt[b, t].tolist(), tau)]
            keep = [int(ids[b, t, j]) for j in range(K) if mask[b, t, j]]
            q, p = [q_full[v] for v in keep], [p_full[v] for v in keep]
            if tail == "bucket":
                q, p = q + [1 - sum(q)], p + [1 - sum(p)]
            else:
                q, p = [x / sum(q) for x in q], [x / sum(p) for x in p]
            out[b, t] = ref_div([log(x) for x in p], [log(x) for x in q], name, **kw)
    return out


def ref_pg(lq, lq_old, lp, mask, scale=1.0, clip=None, gamma=None) -> torch.Tensor:
    B, T = lq.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        a = [scale * (float(lp[b, t]) - float(lq_old[b, t])) if mask[b, t] else 0.0 for t in range(T)]
        for t in range(T):
            if not mask[b, t]:
                continue
            adv = a[t] if gamma is None else sum(gamma ** (u - t) * a[u] for u in range(t, T) if mask[b, u])
            rho = math.exp(float(lq[b, t]) - float(lq_old[b, t]))
            out[b, t] = -(rho if clip is None else min(rho, clip)) * adv
    return out


def logits(*shape, scale=2.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------- divergences, dense


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("beta,alpha", [(0.0, 0.0), (0.25, 0.1), (0.5, 0.5), (1.0, 0.9)])
def test_dense_matches_bruteforce(name, beta, alpha):
    zs, zt = logits(2, 3, 7, seed=1), logits(2, 3, 7, seed=2)
    close(L.dense_divergence(zs, zt, name=name, beta=beta, alpha=alpha), ref_dense(zs, zt, name, beta=beta, alpha=alpha))


@pytest.mark.parametrize("name", NAMES)
def test_dense_temperature_scaling_and_teacher_logprobs(name):
    zs, zt = logits(2, 2, 6, seed=3), logits(2, 2, 6, seed=4)
    ref = ref_dense(zs, zt, name, tau=2.0)
    close(L.dense_divergence(zs, zt, name=name, temperature=2.0), ref)
    close(L.dense_divergence(zs, zt, name=name, temperature=2.0, scale_by_temperature_squared=True), 4 * ref)
    teacher_lp = torch.log_softmax(zt, -1)  # tau = 1 logprobs, re-normalised at tau inside
    close(L.dense_divergence(zs, teacher_lp, name=name, temperature=2.0, teacher_is_logprobs=True), ref)


def test_divergence_category_mask_is_zero_mass():
    lq, lp = torch.log_softmax(logits(3, 5, seed=5), -1), torch.log_softmax(logits(3, 5, seed=6), -1)
    mask = torch.tensor([True, False, True, True, False]).expand(3, 5)
    for name in NAMES:
        got = L.divergence(lq, lp, name=name, category_mask=mask)
        want = [ref_div([lp[i, c].item() for c in (0, 2, 3)], [lq[i, c].item() for c in (0, 2, 3)], name)
                for i in range(3)]
        close(got, torch.tensor(want, dtype=torch.float64))


# ---------------------------------------------------------------- hard cases


@pytest.mark.parametrize("name", NAMES)
def test_huge_logits(name):
    zs, zt = logits(2, 3, 8, seed=7, scale=1e4), logits(2, 3, 8, seed=8, scale=1e4)
    zs[0, 0, 0], zt[0, 0, 1] = 1e4, -1e4
    zs.requires_grad_(True)
    got = L.dense_divergence(zs, zt, name=name)
    close(got, ref_dense(zs.detach(), zt, name), tol=1e-8)
    got.sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(zs.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_masked_vocabulary(dtype):
    """-inf in the same columns of both models = the divergence over the other columns."""
    zs, zt = logits(2, 3, 8, seed=9, dtype=dtype), logits(2, 3, 8, seed=10, dtype=dtype)
    zs[..., 5:], zt[..., 5:] = -INF, -INF
    for name in NAMES:
        x = zs.clone().requires_grad_(True)
        got = L.dense_divergence(x, zt, name=name)
        close(got, ref_dense(zs[..., :5].double(), zt[..., :5].double(), name), tol=1e-5 if dtype == torch.float32 else 1e-10)
        got.sum().backward()
        assert torch.isfinite(x.grad).all() and (x.grad[..., 5:] == 0).all()


def test_student_or_teacher_only_zero_mass():
    """Zero mass on one side only: KL is +inf exactly where the math says, everything else finite."""
    zs, zt = logits(1, 2, 6, seed=11), logits(1, 2, 6, seed=12)
    zs[..., 0] = -INF  # student gives token 0 no mass, teacher does
    zt[..., 1] = -INF  # teacher gives token 1 no mass, student does
    for name in NAMES:
        x = zs.clone().requires_grad_(True)
        got = L.dense_divergence(x, zt, name=name)
        close(got, ref_dense(zs, zt, name))
        if name in ("forward_kl", "reverse_kl"):
            assert torch.isinf(got).all()
        else:
            got.sum().backward()
            assert torch.isfinite(got).all() and torch.isfinite(x.grad).all()


def test_one_hot_teacher():
    zs = logits(2, 3, 6, seed=13).requires_grad_(True)
    zt = torch.full((2, 3, 6), -INF, dtype=torch.float64)
    zt[..., 2] = 0.0
    fkl = L.dense_divergence(zs, zt, name="forward_kl")
    close(fkl, -torch.log_softmax(zs.detach(), -1)[..., 2])  # cross-entropy on the teacher's token
    for name in ("forward_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"):
        zs.grad = None
        got = L.dense_divergence(zs, zt, name=name)
        close(got, ref_dense(zs.detach(), zt, name))
        got.sum().backward()
        assert torch.isfinite(zs.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_identical_distributions_give_zero(name):
    z = logits(2, 3, 9, seed=14)
    for beta in (0.0, 0.5, 1.0):
        assert L.dense_divergence(z, z.clone(), name=name, beta=beta).abs().max() < 1e-12
    ids = z.topk(4, -1).indices
    lp = torch.log_softmax(z, -1).gather(-1, ids)
    for tail in L.TAIL_MODES:
        assert L.topk_divergence(z, ids, lp, name=name, tail=tail).abs().max() < 1e-12


# ---------------------------------------------------------------- top-k


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_topk_matches_bruteforce(name, tail):
    zs, zt = logits(2, 3, 10, seed=15), logits(2, 3, 10, seed=16)
    ids_t, ids_s = zt.topk(3, -1).indices, zs.topk(3, -1).indices
    ids, mask = L.union_support(ids_t, ids_s)
    mask[0, 0, 1] = False  # drop one more entry by hand
    lp = torch.log_softmax(zt, -1).gather(-1, ids)
    lp[0, 0, 1] = float("nan")  # masked-out entries may hold anything
    for tau in (1.0, 2.0):
        lp_tau = torch.log_softmax(zt / tau, -1).gather(-1, ids).masked_fill(~mask, float("nan"))
        got = L.topk_divergence(zs, ids, lp_tau, name=name, tail=tail, support_mask=mask, temperature=tau, beta=0.3)
        close(got, ref_topk(zs, ids, zt, mask, name, tail, tau=tau, beta=0.3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_full_support_bucket_equals_dense(dtype):
    zs, zt = logits(2, 3, 12, seed=17, dtype=dtype), logits(2, 3, 12, seed=18, dtype=dtype)
    ids = zt.topk(12, -1).indices
    lp = torch.log_softmax(zt, -1).gather(-1, ids)
    for name in NAMES:
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        close(L.topk_divergence(zs, ids, lp, name=name), L.dense_divergence(zs, zt, name=name), tol=tol)


def test_topk_k1_bucket_is_binary_divergence():
    zs, zt = logits(2, 3, 10, seed=19), logits(2, 3, 10, seed=20)
    ids = L.sampled_token_support(torch.randint(0, 10, (2, 3), generator=torch.Generator().manual_seed(0)))
    lp = torch.log_softmax(zt, -1).gather(-1, ids)
    ones = torch.ones_like(ids, dtype=torch.bool)
    for name in NAMES:
        got = L.topk_divergence(zs, ids, lp, name=name)
        assert (got > 0).all()
        close(got, ref_topk(zs, ids, zt, ones, name, "bucket"))
        assert L.topk_divergence(zs, ids, lp, name=name, tail="renormalize").abs().max() < 1e-15


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_tail_of_exactly_zero_mass_is_finite(dtype):
    """Mass exactly 1 on S makes the tail log 0 = -inf: the floored tail keeps loss and grads finite."""
    ids = torch.tensor([0, 1, 2]).expand(1, 2, 3)
    zt = logits(1, 2, 5, seed=21, dtype=dtype)
    zt[..., 3:] = -INF  # teacher: all mass on S
    lp = torch.log_softmax(zt, -1)[..., :3]
    for student_on_support in (True, False):
        zs = logits(1, 2, 5, seed=22, dtype=dtype)
        if student_on_support:
            zs[..., 3:] = -INF  # both tails are exactly 0: same as the dense divergence
        zs.requires_grad_(True)
        for name in NAMES:
            zs.grad = None
            got = L.topk_divergence(zs, ids, lp, name=name, tail="bucket")
            got.sum().backward()
            assert torch.isfinite(got).all() and torch.isfinite(zs.grad).all(), (name, student_on_support)
            if student_on_support:
                close(got, L.dense_divergence(zs, zt, name=name), tol=1e-5)


def test_union_support_masks_duplicates():
    a = torch.tensor([[[3, 1, 4]]])
    b = torch.tensor([[[1, 5, 3]]])
    ids, mask = L.union_support(a, b)
    assert ids.tolist() == [[[3, 1, 4, 1, 5, 3]]]
    assert mask.tolist() == [[[True, True, True, False, True, False]]]


def test_empty_support_rows_give_zero():
    zs = logits(1, 2, 6, seed=22).requires_grad_(True)
    ids = torch.zeros(1, 2, 3, dtype=torch.long)
    lp = torch.full((1, 2, 3), -1.0, dtype=torch.float64)
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    for tail in L.TAIL_MODES:
        got = L.topk_divergence(zs, ids, lp, name="jsd", tail=tail, support_mask=mask)
        got.sum().backward()
        assert (got == 0).all() and torch.isfinite(zs.grad).all()


# ---------------------------------------------------------------- sampled-token PG loss


def test_token_logprobs_from_logits():
    z, ids = logits(2, 4, 9, seed=23), torch.randint(0, 9, (2, 4))
    for tau in (1.0, 0.7):
        close(L.token_logprobs_from_logits(z, ids, tau), torch.log_softmax(z / tau, -1).gather(-1, ids[..., None])[..., 0])


@pytest.mark.parametrize("clip,gamma,scale", [(None, None, 1.0), (1.1, None, 2.0), (None, 0.9, 1.0), (0.8, 1.0, 1.5)])
def test_pg_loss_matches_bruteforce(clip, gamma, scale):
    lq, lq_old, lp = -logits(3, 5, seed=24).abs(), -logits(3, 5, seed=25).abs(), -logits(3, 5, seed=26).abs()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    got = L.sampled_token_pg_loss(lq, lq_old, lp, mask, reward_scale=scale, ratio_clip=clip, discount=gamma)
    close(got, ref_pg(lq, lq_old, lp, mask, scale, clip, gamma))


def test_pg_ratio_clip_keeps_truncated_gradient():
    lq = torch.tensor([[0.5, -0.5]], dtype=torch.float64, requires_grad=True)
    zeros, mask = torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.bool)
    lp = torch.ones(1, 2, dtype=torch.float64)
    L.sampled_token_pg_loss(lq, zeros, lp, mask, ratio_clip=1.2).sum().backward()
    # d(-w*A)/d lq = -min(rho, c) * A: rho = e^0.5 > 1.2 is truncated to 1.2, e^-0.5 is not
    close(lq.grad, torch.tensor([[-1.2, -math.exp(-0.5)]], dtype=torch.float64))


def test_pg_on_policy_gradient_is_score_function_and_reverse_kl():
    V, T = 5, 3
    z = logits(T, V, seed=27).requires_grad_(True)  # one student distribution per position
    lp = torch.log_softmax(logits(T, V, seed=28), -1)  # teacher
    lq = torch.log_softmax(z, -1)  # (T, V)
    # every token y at every position, as a (V, T) batch: row y = "y was sampled at each t"
    lq_y, lp_y = lq.T, lp.T  # (V, T)
    mask = torch.ones(V, T, dtype=torch.bool)
    pg = L.sampled_token_pg_loss(lq_y, lq_y.detach(), lp_y, mask)  # (V, T), on-policy: rho = 1
    score = lq_y * (lq_y - lp_y).detach()  # score-function form, per sample
    for row in range(V):
        g_pg = torch.autograd.grad(pg[row].sum(), z, retain_graph=True)[0]
        g_sf = torch.autograd.grad(score[row].sum(), z, retain_graph=True)[0]
        close(g_pg, g_sf)
    q = lq_y.exp().detach()  # weight each enumerated sample by its probability
    g_expect = torch.autograd.grad((q * pg).sum(), z, retain_graph=True)[0]
    exact_rkl = sum(lq[t, v].exp() * (lq[t, v] - lp[t, v]) for t in range(T) for v in range(V))  # brute force
    g_exact = torch.autograd.grad(exact_rkl, z)[0]
    close(g_expect, g_exact)


# ---------------------------------------------------------------- gradcheck (float64)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_dense(name):
    zt = logits(1, 2, 5, seed=29)
    zs = logits(1, 2, 5, seed=30).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: L.dense_divergence(x, zt, name=name, temperature=1.5), (zs,))


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_divergence_both_inputs(name):
    """The closed-form backward, w.r.t. student and teacher log-probs, with -inf and masked categories."""
    lq = torch.log_softmax(logits(2, 6, seed=50), -1)
    lp = torch.log_softmax(logits(2, 6, seed=51), -1)
    lq[0, 1], lp[1, 2] = -INF, -INF  # zero mass on one side only
    lq[1, 4], lp[1, 4] = -INF, -INF  # on both sides
    if name in ("forward_kl",):
        lq[0, 1] = -30.0  # forward KL is +inf where q has no mass: keep it finite for gradcheck
    if name in ("reverse_kl",):
        lp[1, 2] = -30.0
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 5] = False
    f = lambda x, y: L.divergence(x, y, name=name, beta=0.3, alpha=0.2, category_mask=mask)  # noqa: E731
    assert torch.autograd.gradcheck(f, (lq.requires_grad_(True), lp.requires_grad_(True)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_gradcheck_topk(name, tail):
    zs, zt = logits(1, 2, 6, seed=31).requires_grad_(True), logits(1, 2, 6, seed=32)
    ids = zt.topk(3, -1).indices
    lp = torch.log_softmax(zt, -1).gather(-1, ids)
    mask = torch.tensor([True, True, False]).expand(1, 2, 3)
    f = lambda x: L.topk_divergence(x, ids, lp, name=name, tail=tail, support_mask=mask)  # noqa: E731
    assert torch.autograd.gradcheck(f, (zs,))


def test_gradcheck_pg_loss():
    lq = -logits(2, 4, seed=33).abs().requires_grad_(True)
    lq_old, lp = -logits(2, 4, seed=34).abs(), -logits(2, 4, seed=35).abs()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    for kw in ({}, {"ratio_clip": 50.0, "discount": 0.9, "reward_scale": 2.0}):  # clip inactive: by design
        # a truncated weight keeps a gradient (min(rho, c) grad log q) that its value does not have
        f = lambda x: L.sampled_token_pg_loss(x, lq_old, lp, mask, **kw)  # noqa: E731
        assert torch.autograd.gradcheck(f, (lq.detach().requires_grad_(True),))


@pytest.mark.parametrize("name", ["reverse_kl", "jsd"])
def test_gradcheck_chunked(name):
    h, w = logits(5, 3, seed=36).requires_grad_(True), logits(6, 3, seed=37).requires_grad_(True)
    th, tw = logits(5, 4, seed=38), logits(6, 4, seed=39)
    f = lambda h, w: L.chunked_dense_divergence(  # noqa: E731
        h, w, teacher_hidden=th, teacher_weight=tw, name=name, temperature=1.3, chunk_size=2
    )
    assert torch.autograd.gradcheck(f, (h, w))


# ---------------------------------------------------------------- TRL parity


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_trl_generalized_jsd(beta, temperature):
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    zs, zt = logits(2, 3, 11, seed=40, dtype=torch.float32), logits(2, 3, 11, seed=41, dtype=torch.float32)
    ours = L.dense_divergence(zs, zt, name="jsd", beta=beta, temperature=temperature)  # (B, T)
    trl_none = GKDTrainer.generalized_jsd_loss(zs, zt, beta=beta, temperature=temperature, reduction="none")
    close(ours, trl_none.sum(-1), tol=1e-5)  # TRL: elementwise (B, T, V), no tau^2 factor
    trl_batchmean = GKDTrainer.generalized_jsd_loss(zs, zt, beta=beta, temperature=temperature)
    close(ours.sum() / zs.shape[0], trl_batchmean, tol=1e-5)  # TRL "batchmean" without labels: sum / B
    labels = torch.tensor([[1, 1, -100], [1, -100, -100]])
    trl_masked = GKDTrainer.generalized_jsd_loss(zs, zt, labels=labels, beta=beta, temperature=temperature)
    close(L.reduce_tokens(ours, labels != -100, 3), trl_masked, tol=1e-5)


# ---------------------------------------------------------------- chunked path, reduction


@pytest.mark.parametrize("teacher_kind", ["hidden", "logprobs"])
def test_chunked_equals_plain(teacher_kind):
    N, H, Ht, V = 37, 8, 6, 50
    h0, w0 = logits(N, H, seed=42, dtype=torch.float32), logits(V, H, seed=43, dtype=torch.float32, scale=0.5)
    th, tw = logits(N, Ht, seed=44, dtype=torch.float32), logits(V, Ht, seed=45, dtype=torch.float32, scale=0.5)
    t_logits = th @ tw.T
    weights = torch.rand(N, generator=torch.Generator().manual_seed(1))
    kw = dict(name="jsd", beta=0.3, temperature=1.5, scale_by_temperature_squared=True)
    teacher = (
        dict(teacher_hidden=th, teacher_weight=tw)
        if teacher_kind == "hidden"
        else dict(teacher_logprobs=torch.log_softmax(t_logits, -1))
    )
    h1, w1 = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    plain = L.dense_divergence(h1 @ w1.T, t_logits, **kw)
    (plain * weights).sum().backward()
    h2, w2 = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    chunked = L.chunked_dense_divergence(h2, w2, **teacher, **kw, chunk_size=8)
    (chunked * weights).sum().backward()
    for a, b in ((chunked, plain), (h2.grad, h1.grad), (w2.grad, w1.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_loss_from_hidden_generic_with_extras():
    N, H, V = 10, 4, 9
    h, w = logits(N, H, seed=46).requires_grad_(True), logits(V, H, seed=47).requires_grad_(True)
    ids = torch.randint(0, V, (N,))
    f = lambda z, ids, none: -torch.log_softmax(z, -1).gather(-1, ids[:, None])[:, 0]  # noqa: E731
    got = L.chunked_loss_from_hidden(h, w, f, ids, None, chunk_size=3)
    close(got, f(h @ w.T, ids, None))


def test_gradient_accumulation_is_exact():
    zs, zt = logits(8, 5, 7, seed=48), logits(8, 5, 7, seed=49)
    mask = torch.rand(8, 5, generator=torch.Generator().manual_seed(2)) > 0.3
    x = zs.clone().requires_grad_(True)
    L.reduce_tokens(L.dense_divergence(x, zt, name="reverse_kl"), mask, mask.sum()).backward()
    full = x.grad.clone()
    x.grad = None
    num_tokens = int(mask.sum())  # of the whole step
    for rows in torch.arange(8).chunk(4):  # 4 micro-batches with different token counts
        L.reduce_tokens(L.dense_divergence(x[rows], zt[rows], name="reverse_kl"), mask[rows], num_tokens).backward()
    close(x.grad, full, tol=1e-12)


def test_reduce_tokens_masks_nan_and_handles_zero_tokens():
    loss = torch.tensor([[1.0, float("nan")], [float("inf"), 3.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [False, True]])
    out = L.reduce_tokens(loss, mask, 4)
    out.backward()
    assert out.item() == 1.0 and loss.grad.tolist() == [[0.25, 0.0], [0.0, 0.25]]
    none = torch.zeros(2, 2, dtype=torch.bool)
    for n in (0, 0.0, torch.tensor(0)):
        loss.grad = None
        out = L.reduce_tokens(loss, none, n)
        out.backward()
        assert out.item() == 0.0 and (loss.grad == 0).all()
    close(L.reduce_tokens(loss, mask, torch.tensor(2)), torch.tensor(2.0))


# ---------------------------------------------------------------- validation


def _z(*shape):
    return torch.zeros(*shape)


BAD_INPUTS = [
    (lambda: L.divergence(_z(2, 3), _z(2, 3), name="kl"), r"name='kl'.*forward_kl, reverse_kl, jsd"),
    (lambda: L.dense_divergence(_z(1, 2, 3), _z(1, 2, 3), name="jsd", beta=1.5), r"beta=1.5.*0 <= beta <= 1"),
    (lambda: L.dense_divergence(_z(1, 2, 3), _z(1, 2, 3), name="skew_forward_kl", alpha=1.0), r"alpha=1.0"),
    (lambda: L.dense_divergence(_z(1, 2, 3), _z(1, 2, 3), name="jsd", temperature=0.0), r"temperature=0.0.*> 0"),
    (lambda: L.dense_divergence(_z(1, 2, 3), _z(1, 2, 4), name="jsd"), r"\(1, 2, 3\).*\(1, 2, 4\)"),
    (
        lambda: L.dense_divergence(_z(1, 2, 3), torch.tensor([[[0.0, float("nan"), 0], [0, 0, 0]]]), name="jsd"),
        r"teacher logits contain NaN at 1 positions",
    ),
    (
        lambda: L.divergence(_z(2, 3), torch.full((2, 3), float("nan")), name="jsd"),
        r"teacher logprobs contain NaN at 2 positions",
    ),
    (
        lambda: L.topk_divergence(_z(1, 2, 5), torch.full((1, 2, 2), 5), _z(1, 2, 2), name="jsd"),
        r"support_ids out of range.*vocab size 5",
    ),
    (
        lambda: L.topk_divergence(_z(1, 2, 5), torch.zeros(1, 2, 2, dtype=torch.long), _z(1, 2, 2), name="jsd", tail="x"),
        r"tail='x'.*bucket, renormalize",
    ),
    (
        lambda: L.topk_divergence(_z(1, 2, 5), torch.zeros(1, 2, 2, dtype=torch.long), _z(1, 2, 3), name="jsd"),
        r"support_ids.*\(1, 2, 2\).*teacher_support_logprobs.*\(1, 2, 3\)",
    ),
    (lambda: L.token_logprobs_from_logits(_z(1, 2, 5), torch.full((1, 2), 7)), r"token_ids out of range"),
    (lambda: L.sampled_token_pg_loss(_z(2, 3), _z(2, 3), _z(2, 4), _z(2, 3)), r"teacher_token_logprobs.*\(2, 4\)"),
    (lambda: L.sampled_token_pg_loss(_z(2, 3), _z(2, 3), _z(2, 3), _z(2, 3), discount=1.5), r"discount=1.5"),
    (lambda: L.sampled_token_pg_loss(_z(2, 3), _z(2, 3), _z(2, 3), _z(2, 3), ratio_clip=0), r"ratio_clip=0"),
    (lambda: L.reduce_tokens(_z(2, 3), _z(2, 3), -1), r"num_tokens=-1"),
    (lambda: L.reduce_tokens(_z(2, 3), _z(3, 2), 1), r"per_token_loss.*\(2, 3\).*mask.*\(3, 2\)"),
    (lambda: L.chunked_loss_from_hidden(_z(4, 3), _z(5, 2), lambda z: z.sum(-1)), r"hidden.*\(4, 3\).*weight.*\(5, 2\)"),
    (lambda: L.chunked_dense_divergence(_z(4, 3), _z(5, 3), name="jsd"), r"teacher: expected either"),
    (
        lambda: L.chunked_dense_divergence(_z(4, 3), _z(5, 3), teacher_hidden=_z(4, 2), teacher_weight=_z(6, 2), name="jsd"),
        r"student_weight.*\(5, 3\).*teacher_weight.*\(6, 2\)",
    ),
    (lambda: L.chunked_dense_divergence(_z(4, 3), _z(5, 3), teacher_logprobs=_z(4, 5), name="jsd", chunk_size=0), r"chunk_size=0"),
]


@pytest.mark.parametrize("call,match", BAD_INPUTS)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
