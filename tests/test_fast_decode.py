"""The lean engine's CPU decode step (protege/rollout/decode_kernel.c, protege/rollout/fast_decode.py).

- the kernel: y = x @ W^T + b against a float64 product computed by torch, over row counts that are and
  are not multiples of 8, widths with and without a tail, 1-3 threads, with and without bias, within
  float32 rounding of sum |x| |W| (the bound of any summation order);
- decode_linear takes the kernel only where it is valid (few float32 rows, no grad, no autocast) and
  otherwise returns exactly F.linear;
- fast_decode: a left-padded batch decoded step by step (GQA, a padding mask every step) gives the
  model's own logits within float32 rounding, as far from a float64 run as the plain path is; on exit
  the model has no patched forward and its config is back to sdpa;
- without a compiler the kernel says why, and the lean engine still runs (torch's path), in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import make_model

from protege.rollout import decode_kernel, lean
from protege.rollout.fast_decode import decode_linear, fast_decode

needs_kernel = pytest.mark.skipif(not decode_kernel.available(), reason=f"no decode kernel: {decode_kernel.why_not()}")


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_equals_a_float64_product(threads):
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 3, 8, 9, 16, 32):
            for k in (576, 100, 7):
                for n in (1, 5, 200, 1000):
                    x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
                    scale = (x.double().abs() @ w.double().abs().t()).max()
                    for bias in (None, b):
                        with torch.no_grad():
                            got = decode_kernel.linear(x, w, bias)
                        want = x.double() @ w.double().t() + (0 if bias is None else bias.double())
                        assert got.shape == (rows, n) and got.dtype == torch.float32
                        err = float((got.double() - want).abs().max() / scale)
                        assert err < 1e-6, (rows, k, n, bias is None, err)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_kernel_keeps_leading_dims_and_reads_noncontiguous_inputs():
    torch.manual_seed(1)
    w, x = torch.randn(64, 40), torch.randn(4, 2, 80)[..., ::2]  # (4, 2, 40), a strided view
    with torch.no_grad():
        got = decode_kernel.linear(x, w)
    assert got.shape == (4, 2, 64)
    torch.testing.assert_close(got, x @ w.t(), rtol=1e-5, atol=1e-5)


def test_decode_linear_falls_back_where_the_kernel_does_not_apply():
    torch.manual_seed(2)
    layer = torch.nn.Linear(24, 16)
    cases = [torch.randn(decode_kernel.MAX_ROWS + 1, 24), torch.randn(3, 24).double()]
    with torch.no_grad():
        for x in cases:
            assert not decode_kernel.usable(x, layer.weight if x.dtype == torch.float32 else layer.weight.double(),
                                            layer.bias)
        assert torch.equal(decode_linear(layer, cases[0]), torch.nn.functional.linear(cases[0], layer.weight,
                                                                                       layer.bias))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not decode_kernel.usable(torch.randn(2, 24), layer.weight, layer.bias)
    x = torch.randn(2, 24, requires_grad=True)
    assert not decode_kernel.usable(x, layer.weight, layer.bias)  # autograd on: never the kernel
    y = decode_linear(layer, x)
    y.sum().backward()
    assert x.grad is not None and torch.equal(y, torch.nn.functional.linear(x, layer.weight, layer.bias))


def _decode(model, fast: bool, steps: int = 6):
    """Logits of every decode step of a left-padded batch fed fixed tokens (no sampling)."""
    g = torch.Generator().manual_seed(5)
    b, p = 5, 9
    ids = torch.randint(2, 128, (b, p), generator=g)
    feed = torch.randint(2, 128, (b, steps), generator=g)
    attn = torch.ones(b, p + steps, dtype=torch.long)
    for j in range(b):
        attn[j, : 2 * j] = 0  # left padding: a mask every step
    pos = (attn[:, :p].cumsum(-1) - 1).clamp(min=0)
    cache = lean.make_cache(model, p + steps)
    out = []
    with torch.no_grad(), fast_decode(model, fast):
        logits = model(input_ids=ids, attention_mask=attn[:, :p], position_ids=pos, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        out.append(logits.double())
        nxt = pos[:, -1:] + 1
        for s in range(steps - 1):
            logits = model(input_ids=feed[:, s:s + 1], attention_mask=attn[:, : p + s + 1], position_ids=nxt + s,
                           past_key_values=cache, use_cache=True).logits[:, -1]
            out.append(logits.double())
    return torch.stack(out)


def test_fast_decode_gives_the_models_logits():
    model = make_model(2, seed=4).eval()
    assert model.config._attn_implementation == "sdpa" and model.config.num_key_value_heads < \
        model.config.num_attention_heads  # GQA: the path HF pads with repeat_kv copies
    plain, fast = _decode(model, False), _decode(model, True)
    exact = _decode(model.double(), False)
    model.float()
    err_plain, err_fast = (plain - exact).abs().max(), (fast - exact).abs().max()
    assert err_fast <= 4 * err_plain + 1e-5, (float(err_fast), float(err_plain))
    assert (fast - plain).abs().max() < 1e-4 * exact.abs().max()
    assert model.config._attn_implementation == "sdpa"
    assert not any("forward" in vars(m) for m in model.modules())


def test_without_a_compiler_the_lean_engine_uses_torch(tmp_path):
    script = textwrap.dedent("""
        import torch
        from tiny import make_model
        from protege.rollout import decode_kernel, lean
        assert not decode_kernel.available()
        print("WHY", decode_kernel.why_not())
        m = make_model(2, seed=4).eval()
        rows = lean.generate(m, [torch.tensor([3, 4, 5])], max_new_tokens=4, temperature=0.0, eos_ids=[1], pad_id=0)
        print("TOKENS", rows.completion_ids[0].tolist())
    """)
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), PROTEGE_KERNEL_CACHE=str(tmp_path / "kernels"),
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.getcwd()]))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):  # else the CPU check comes first
        assert "no C compiler" in run.stdout and "no-such-cc" in run.stdout
    else:  # ATEN_CPU_CAPABILITY=default (CI's second pass on an AVX2-only CPU): the kernel is not even tried
        assert "the CPU has no AVX2" in run.stdout
    assert not (tmp_path / "kernels").exists() or not list((tmp_path / "kernels").iterdir())
    here = lean.generate(make_model(2, seed=4).eval(), [torch.tensor([3, 4, 5])], max_new_tokens=4, temperature=0.0,
                         eos_ids=[1], pad_id=0)  # this process: the kernel when there is one
    assert f"TOKENS {here.completion_ids[0].tolist()}" in run.stdout


@needs_kernel
def test_decode_forwards_run_torch_on_one_thread_and_the_kernel_on_all():
    model = make_model(2, seed=4).eval()
    seen, calls = [], []
    model.model.layers[0].register_forward_hook(lambda *a: seen.append(torch.get_num_threads()))
    real = decode_kernel.linear
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        decode_kernel.linear = lambda *a, **k: calls.append(a[3] if len(a) > 3 else k.get("threads")) or real(*a, **k)
        lean.generate(model, [torch.tensor([3, 4, 5, 6]), torch.tensor([7, 8])], max_new_tokens=3, temperature=0.0,
                      eos_ids=[1], pad_id=0)
        assert torch.get_num_threads() == 2  # restored
    finally:
        decode_kernel.linear = real
        torch.set_num_threads(before)
    assert seen[0] == 2 and set(seen[1:]) == {1}, seen  # prefill on every thread, decode steps on one
    assert calls and set(calls) == {2}, calls  # the kernel still splits over both
