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


def _vocab_allocations_in_backward(sparse_embedding: bool, micro_batches: int = 1) -> tuple[list[str], torch.Tensor]:
    """The ops that create a NEW (V, H) tensor during the backward of a tied tiny Llama's fused loss, and the
    tied weight's gradient. In-place ops (their output is an input) are not creations."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    import protege.forward as fwd
    from tests.tiny import make_model

    model = make_model(2, seed=3).double()
    weight = model.get_output_embeddings().weight
    shape = tuple(weight.shape)
    ids = torch.randint(2, 128, (3, 9), generator=torch.Generator().manual_seed(4))
    found = []

    class NewVocabTensors(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)
                      and a.layout == torch.strided}
            for o in tree_leaves(out):
                if isinstance(o, torch.Tensor) and o.layout == torch.strided and tuple(o.shape) == shape \
                        and o.data_ptr() not in inputs:
                    found.append(str(func))
            return out

    teacher = torch.log_softmax(torch.randn(27, 128, dtype=F64, generator=torch.Generator().manual_seed(5)), -1)
    for mb in range(micro_batches):
        with L.grad_into(weight if sparse_embedding else None):  # as the trainer does: forward, loss, backward
            hidden = fwd.HiddenStates(model)(ids + mb, torch.ones_like(ids))  # (B, S, H)
            values = L.chunked_dense_divergence(hidden.reshape(-1, hidden.shape[-1]), weight, teacher_logprobs=teacher,
                                                name="reverse_kl", chunk_size=8, fused=True)
            loss = values.sum() / 27
            with NewVocabTensors():
                loss.backward()
    fwd.dense_grads(model)
    return found, weight.grad


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_tied_embedding_backward_creates_no_vocab_matrix(micro_batches):
    """protege.forward.tied_input_embedding + losses.grad_into: the tied weight's gradient equals the dense
    embedding path's, and the backward creates no (V, H) tensor, where the dense path creates two (the embedding's
    dense gradient, then autograd's sum with the loss's). Two micro-batches: the second adds into .grad."""
    dense_ops, dense_grad = _vocab_allocations_in_backward(False, micro_batches)
    sparse_ops, sparse_grad = _vocab_allocations_in_backward(True, micro_batches)
    assert any("embedding_dense_backward" in op for op in dense_ops) and len(dense_ops) >= 2, dense_ops
    assert sparse_ops == [], sparse_ops
    assert not sparse_grad.is_sparse
    assert torch.allclose(sparse_grad, dense_grad, atol=1e-12, rtol=1e-10), (sparse_grad - dense_grad).abs().max()


def test_grad_into_is_only_for_that_weight():
    """grad_into(w) leaves another weight's fused gradient to autograd (the same gradient, `w` gets none), and is
    off again after the block."""
    grads = []
    for into in (None, "other"):
        hidden, weight, t_hidden, t_weight = _inputs()
        other = weight.detach().clone().requires_grad_()
        with L.grad_into(other if into else None):
            values = L.chunked_dense_divergence(hidden, weight, teacher_hidden=t_hidden, teacher_weight=t_weight,
                                                name="reverse_kl", chunk_size=8, fused=True)
        values.sum().backward()
        assert weight.grad is not None and other.grad is None
        grads.append(weight.grad)
    assert torch.equal(grads[0], grads[1])
    with L.grad_into(weight):
        pass
    values = L.chunked_dense_divergence(hidden, weight, teacher_hidden=t_hidden, teacher_weight=t_weight,
                                        name="reverse_kl", chunk_size=8, fused=True)
    weight.grad = None
    values.sum().backward()  # after the block: through autograd again
    assert torch.equal(weight.grad, grads[0])


def test_tied_input_embedding_only_for_a_trained_plain_tied_weight():
    import protege.forward as fwd
    from tests.tiny import make_model, make_plain_model

    tied = make_model(1, seed=0)
    assert fwd.tied_input_embedding(tied) is tied.get_input_embeddings()
    assert fwd.tied_input_embedding(make_plain_model(64)) is None  # untied: AdamW would get a sparse gradient
    tied.get_input_embeddings().weight.requires_grad_(False)
    assert fwd.tied_input_embedding(tied) is None
