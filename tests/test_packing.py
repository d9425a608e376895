"""Packed micro-batches (protege/packing.py): equal to one forward per row, and a packed step equals a padded one."""

from __future__ import annotations

import pytest
import torch

from protege.config import load_config
from protege.forward import HiddenStates
from protege.packing import forward_packed_hidden, token_batches
from protege.trainer import Distiller


def _rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(6, 100, (n,), generator=g) for n in (5, 11, 2, 8)]
    lengths = (7, 2, 9, 4)
    comp = torch.randint(6, 100, (4, 9), generator=g)
    mask = torch.zeros(4, 9, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    comp[~mask] = 0  # padding after each completion
    return prompts, comp, mask


def _separate(model, prompts, comp, mask) -> torch.Tensor:
    """The reference: each row alone through the decoder (no padding, no other row), hidden states at the
    positions P-1 ... P+n-2 that predict its completion tokens."""
    out = torch.zeros((*comp.shape, model.config.hidden_size))
    for i, p in enumerate(prompts):
        n = int(mask[i].sum())
        row = torch.cat([p, comp[i, :n]])[None]
        h = model.model(input_ids=row).last_hidden_state[0]  # (S, H)
        out[i, :n] = h[len(p) - 1: len(p) - 1 + n]
    return out


def test_packed_forward_and_gradients_equal_one_forward_per_row():
    from tiny import make_model

    model = make_model(2, 3)
    prompts, comp, mask = _rows()
    probe = torch.randn(*comp.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (lambda: _separate(model, prompts, comp, mask),
               lambda: forward_packed_hidden(HiddenStates(model), prompts, comp, mask)):
        model.zero_grad()
        hidden = fn()
        (hidden[mask] * probe[mask]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        grads[-1]["hidden"] = hidden.detach()[mask]
    ref, got = grads
    assert ref.keys() == got.keys() and len(ref) > 10
    for k in ref:
        scale = ref[k].abs().max().clamp_min(1e-6)
        assert (got[k] - ref[k]).abs().max() <= 1e-5 * scale, k


def test_token_batches_keep_order_and_budget():
    lengths = [3, 5, 9, 2, 20, 4]
    order = [3, 0, 5, 1, 2, 4]
    batches = token_batches(order, lengths, 12)
    assert [i for b in batches for i in b] == order
    assert batches == [[3, 0, 5], [1], [2], [4]]  # 2+3+4 = 9 (+5 > 12); 5 (+9 > 12); 9; 20 alone (over budget)
    assert all(sum(lengths[i] for i in b) <= 12 for b in batches if len(b) > 1)


@pytest.mark.parametrize("loss", [[], ["loss.support=teacher", "loss.top_k=4"]])
def test_packed_step_equals_padded_step(tiny_paths, tmp_path, loss):
    """One optimizer step on the same buffer: packed micro-batches (by a token budget that splits the buffer
    into several) give the padded path's loss and weights."""
    params, losses = [], []
    for pack in (False, True):
        cfg = load_config(None, [f"student.path={tiny_paths['student']}", f"teacher.path={tiny_paths['teacher']}",
                                 f"data.path={tiny_paths['data']}", "rollout.max_new_tokens=8",
                                 "train.prompts_per_step=6", "train.micro_batch_size=2", "optim.lr=3e-3",
                                 f"output.dir={tmp_path / str(pack)}", "output.progress=false", "train.num_threads=1",
                                 "data.eval_prompts=0", "mix.lmbda=0", f"train.pack={pack}",
                                 "train.micro_batch_tokens=60", *loss])
        d = Distiller(cfg)
        m = d.train_step()
        losses.append((m["loss"], m["grad_norm"]))
        params.append(torch.cat([p.detach().flatten() for p in d.student.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)  # the loss and the gradient's norm
    # same math, other matmul shapes: fp32 rounding. AdamW's first step, lr * g / (|g| + 1e-8), scales a
    # rounding difference of a gradient below 1e-8 by lr / 1e-8; attention leaking across rows (or a
    # misplaced row) moves most weights by O(lr) = 3e-3
    assert torch.allclose(params[0], params[1], atol=1e-4, rtol=0), (params[0] - params[1]).abs().max()
