"""Fused chunked losses (gradients computed in the forward pass) equal the checkpointed ones exactly."""

from __future__ import annotations

import pytest
import torch

from protege import losses as L

F64 = torch.float64


def _inputs(n=37, h=8, ht=6, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64, requires_grad=True)
    weight = (2 * torch.randn(v, h, generator=g, dtype=F64)).requires_grad_()
    t_hidden = torch.randn(n, ht, generator=g, dtype=F64)
    t_weight = 2 * torch.randn(v, ht, generator=g, dtype=F64)
    return hidden, weight, t_hidden, t_weight


def _grads(fused, name, chunk, scale):
    hidden, weight, t_hidden, t_weight = _inputs()
    values = L.chunked_dense_divergence(hidden, weight, teacher_hidden=t_hidden, teacher_weight=t_weight, name=name,
                                        beta=0.3, alpha=0.2, temperature=1.5, chunk_size=chunk, fused=fused)
    (values.sum() * scale).backward()
    return values.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl"])
@pytest.mark.parametrize("chunk", [5, 16, 1024])
def test_fused_dense_divergence_matches_checkpointed(name, chunk):
    ref = _grads(False, name, chunk, 0.37)
    got = _grads(True, name, chunk, 0.37)
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10), (a - b).abs().max()
    assert ref[1].abs().sum() > 0 and ref[2].abs().sum() > 0


def test_fused_generic_loss_with_extras_and_masked_mean():
    hidden, weight, _, _ = _inputs(seed=1)
    tokens = torch.randint(0, 50, (37,), generator=torch.Generator().manual_seed(2))
    fn = lambda z, t: -L.token_logprobs_from_logits(z, t)  # noqa: E731
    out = {}
    for fused in (False, True):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        values = L.chunked_loss_from_hidden(h, w, fn, tokens, chunk_size=8, fused=fused)
        full = torch.zeros(5, 10, dtype=F64).masked_scatter(torch.arange(50).reshape(5, 10) < 37, values)  # like the trainer
        L.reduce_tokens(full, torch.arange(50).reshape(5, 10) < 37, 37).backward()
        out[fused] = (values.detach(), h.grad, w.grad)
    for a, b in zip(out[False], out[True]):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)


def test_unequal_weights_are_refused_not_silently_wrong():
    hidden, weight, t_hidden, t_weight = _inputs()
    values = L.chunked_dense_divergence(hidden, weight, teacher_hidden=t_hidden, teacher_weight=t_weight,
                                        name="reverse_kl", chunk_size=8, fused=True)
    with pytest.raises(RuntimeError, match="loss.fused=false"):
        (values * torch.linspace(0, 1, values.shape[0], dtype=F64)).sum().backward()


def test_fused_without_grad_is_the_plain_path():
    hidden, weight, t_hidden, t_weight = _inputs()
    with torch.no_grad():
        a = L.chunked_dense_divergence(hidden, weight, teacher_hidden=t_hidden, teacher_weight=t_weight,
                                       name="jsd", chunk_size=8, fused=True)
    b = L.chunked_dense_divergence(hidden, weight, teacher_hidden=t_hidden, teacher_weight=t_weight,
                                   name="jsd", chunk_size=8, fused=False)
    assert a.grad_fn is None and torch.allclose(a, b.detach(), atol=1e-12)


def test_frozen_weight_gets_no_gradient_and_hidden_still_does():
    hidden, weight, t_hidden, t_weight = _inputs()
    weight.requires_grad_(False)
    ref = None
    for fused in (False, True):
        h = hidden.detach().clone().requires_grad_()
        L.chunked_dense_divergence(h, weight, teacher_hidden=t_hidden, teacher_weight=t_weight, name="reverse_kl",
                                   chunk_size=8, fused=fused).sum().backward()
        assert weight.grad is None
        ref = h.grad if ref is None else ref
        assert torch.allclose(h.grad, ref, atol=1e-12)


def test_fused_under_bf16_autocast_is_as_accurate_as_checkpointed():
    hidden, weight, t_hidden, t_weight = _inputs()
    out = {}
    for fused, bf16 in ((False, False), (False, True), (True, True)):
        h = hidden.detach().float().clone().requires_grad_()
        w = weight.detach().float().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            values = L.chunked_dense_divergence(h, w, teacher_hidden=t_hidden.float(), teacher_weight=t_weight.float(),
                                                name="reverse_kl", chunk_size=8, fused=fused)
        values.sum().backward()
        out[fused, bf16] = (values.detach(), h.grad, w.grad)
    exact = out[False, False]
    for ref, got, x in zip(out[False, True], out[True, True], exact):
        assert ref.dtype == got.dtype == torch.float32
        assert (got - x).abs().max() <= 2 * (ref - x).abs().max() + 1e-6  # bf16 rounding, not a wrong gradient
        assert (got - x).abs().max() <= 0.05 * x.abs().max()


def test_a_loss_that_ignores_the_logits_has_zero_gradient():
    hidden, weight, _, _ = _inputs()
    values = L.chunked_loss_from_hidden(hidden, weight, lambda z: z.new_zeros(z.shape[0]) + 1.0, chunk_size=8,
                                        fused=True)
    values.sum().backward()
    assert torch.equal(values, torch.ones(37, dtype=F64)) and hidden.grad.abs().max() == 0
