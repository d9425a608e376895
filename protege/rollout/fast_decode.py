"""The CPU decode step of both engines: linear layers through protege's kernel, attention without KV copies.

`fast_decode(model)` is a context manager; inside it, for this model only:

- every exact nn.Linear runs decode_linear: its few decode rows go through protege/rollout/decode_kernel
  (an AVX2 kernel that streams the weight at close to memory speed); anything else through F.linear.
- attention layers whose config says "sdpa" run decode_attention: for one query position it calls
  torch's scaled_dot_product_attention with enable_gqa=True (each KV head serves its g query heads in
  place), where HF's sdpa path first copies the whole KV cache to repeat each KV head g times whenever
  a padding mask is present (every step of a left-padded batch): 224 vs 523 us per layer at 8 rows,
  9 query / 3 KV heads, 100 positions. Everything else (prefill, sliding windows, soft-capping,
  attention sinks, dropout) goes to HF's sdpa_attention_forward unchanged.

Both are exact up to float32 rounding (tests/test_fast_decode.py compares with float64 and the model's own
forward). rollout.fast_decode: false turns both off.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import threading

import torch
from torch import nn

from protege.rollout import decode_kernel

ATTENTION = "protege_decode"


def decode_linear(module: nn.Linear, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """module(x), through protege's decode kernel when it applies (few float32 CPU rows, no grad; its rows split over
    `threads` threads), else F.linear."""
    if decode_kernel.usable(x, module.weight, module.bias):
        return decode_kernel.linear(x, module.weight, module.bias, threads)
    return nn.functional.linear(x, module.weight, module.bias)


def decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs):
    """HF attention-interface function: (b, 1, heads, d) output for a single query position, else sdpa's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    special = (dropout or kwargs.get("softcap") or kwargs.get("s_aux") is not None or kwargs.get("sliding_window")
               or kwargs.get("position_bias") is not None or kwargs.get("output_attentions")
               or getattr(module, "sliding_window", None))
    heads, q_len = query.shape[1], query.shape[2]
    if special or q_len != 1 or heads % key.shape[1] or (attention_mask is not None and (
            attention_mask.dim() != 4 or attention_mask.shape[-2] != 1 or attention_mask.shape[-1] != key.shape[-2])):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                                     enable_gqa=True)  # (b, heads, 1, d)
    return out.transpose(1, 2), None


def _decode_threads(module, args, kwargs, threads: int):
    """Forward pre-hook: one torch thread for a decode forward (input_ids of one position), else `threads`."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    torch.set_num_threads(1 if isinstance(ids, torch.Tensor) and ids.shape[-1] == 1 else threads)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the same mask sdpa gets


@contextmanager
def fast_decode(model: nn.Module, enabled: bool = True):
    """While inside, `model` decodes with decode_linear (when protege's kernel is available) and decode_attention
    (for configs using sdpa). Instance attributes and config fields, all restored on exit: other models and other
    threads are untouched. A no-op when not enabled.

    With the kernel and more than one torch thread, a decode forward (one new token per row) runs torch's own ops
    on one thread and the kernel splits its rows over all of them: at decode sizes OpenMP's fork/join costs more
    than the small ops it splits (docs/scale.md). Other forwards (the prefill) keep every thread; the count is
    restored on exit."""
    linears = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in vars(m)] \
        if enabled and decode_kernel.available() else []
    configs = {}
    if enabled:
        _register()
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and getattr(cfg, "_attn_implementation", None) == "sdpa":
                configs[id(cfg)] = cfg
    threads = torch.get_num_threads()
    for m in linears:
        m.forward = partial(decode_linear, m, threads=threads)
    for cfg in configs.values():
        cfg._attn_implementation = ATTENTION
    main = threading.current_thread() is threading.main_thread()  # not in rollout.max_lag's thread: MKL's thread
    hook = model.register_forward_pre_hook(partial(_decode_threads, threads=threads), with_kwargs=True) \
        if linears and threads > 1 and main else None  # count is process-wide, the training thread would feel it
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()
            torch.set_num_threads(threads)
        for m in linears:
            del m.forward
        for cfg in configs.values():
            cfg._attn_implementation = "sdpa"
