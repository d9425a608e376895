"""The per-token loss of a cross-tokenizer run (loss.cross_tokenizer), called by protege.objective.

The teacher's answer arrives per aligned span on the student's positions (TeacherSignal.cross, see
protege.teacher.cross_tokenizer); the math of each loss is in protege.losses.cross_tokenizer.

  span         every token: span-level sampled estimator (student rollouts)
  shared_topk  1:1 spans: the divergence loss.name over the teacher's top-K mapped into the student's
               vocabulary + tail bucket (= the same-tokenizer teacher top-K loss when the tokenizers are
               the same); other spans of student rollouts: the span estimator
  uld          each span, at its first student token: GOLD's ULD (observed merge), top-K + tail
  hybrid       1:1 spans: GOLD's hybrid (matched divergence + sorted L1 on the rest); other spans: ULD
  next_byte    each span's first student token: the divergence loss.name between the two models' distributions
               of the next byte of text (the same event for any pair of tokenizers); plus, on student rows,
               the span estimator on every token (it carries the rest of each span's text)
Tokens of no span (a trailing remainder the teacher could not match) get no loss.
"""

from __future__ import annotations

import torch

from protege import losses as L
from protege.losses.cross_tokenizer import hybrid_loss, next_byte_loss, span_pg_loss, span_sums, uld_loss
from protege.forward import HiddenStates, forward_completion_hidden, output_weight
from protege.records import Rollouts, TeacherSignal

MODES = ("span", "shared_topk", "uld", "hybrid", "next_byte")


def teacher_topk(mode: str, top_k: int) -> int:
    """k of the teacher top-K a mode reads (0: token logprobs only)."""
    return 0 if mode == "span" else top_k


def cross_per_token_loss(loss, mode: str, student_hidden: torch.Tensor, student_weight: torch.Tensor, mb: Rollouts,
                         signal: TeacherSignal, sampling_temperature: float) -> torch.Tensor:
    """(B, T) per-token loss of one micro-batch; `loss` is the run's LossConfig."""
    cross = signal.cross
    if cross is None:
        raise ValueError("loss.cross_tokenizer needs a cross-tokenizer teacher's signal (TeacherSignal.cross)")
    dev = student_hidden.device
    mask = mb.completion_mask.to(dev) & cross.valid.to(dev)  # (B, T)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=dev)  # (B, T)
    if mode == "span":
        return _span(loss, student_hidden, student_weight, mb, cross, mask, sampling_temperature, require=True)
    if mode == "next_byte":
        firsts = cross.first.to(dev) & mask
        if not cross.first_span_bytes:  # the student's first token may own a space its text does not have
            firsts = firsts & (cross.span_index.to(dev) > 0)
        out = out.masked_scatter(firsts, _next_byte(loss, student_hidden[firsts], student_weight, cross, firsts))
        if mb.sampling_logprobs is not None:
            out = out + _span(loss, student_hidden, student_weight, mb, cross, mask, sampling_temperature)
        return out
    one = cross.one_to_one.to(dev) & mask  # (B, T)
    if mode == "shared_topk":
        out = out.masked_scatter(one, _shared_topk(loss, student_hidden[one], student_weight, cross, one))
        if mb.sampling_logprobs is not None:
            rest = _span(loss, student_hidden, student_weight, mb, cross, mask & ~one, sampling_temperature)
            out = out + rest
        return out
    firsts = cross.first.to(dev) & mask
    if mode == "hybrid":
        out = out.masked_scatter(one, _hybrid(loss, student_hidden[one], student_weight, cross, one))
        firsts = firsts & ~one
    return out + _uld(loss, student_hidden, student_weight, mb, cross, mask, firsts)


def token_logprobs(hidden, weight, tokens, temperature: float, chunk: int, fused: bool = False) -> torch.Tensor:
    """(n, H), (V, H), (n,) -> (n,) log softmax(hidden @ weight.T / temperature) at `tokens`, chunk by chunk."""
    fn = lambda logits, ids: L.token_logprobs_from_logits(logits.float(), ids, temperature=temperature)  # noqa: E731
    return L.chunked_loss_from_hidden(hidden, weight, fn, tokens, chunk_size=chunk, fused=fused)


def _span(loss, hidden, weight, mb, cross, mask, temperature, require: bool = False) -> torch.Tensor:
    if mb.sampling_logprobs is None:
        if require:
            raise ValueError("loss.cross_tokenizer=span needs sampling logprobs: only student rollouts have them "
                             "(mix.lmbda=1)")
        return torch.zeros(mask.shape, device=hidden.device)
    dev = hidden.device
    tokens = mb.completion_ids.to(dev)[mask]
    lp = token_logprobs(hidden[mask], weight, tokens, temperature, loss.chunk_size, False)  # (n,)
    full = torch.zeros(mask.shape, dtype=lp.dtype, device=dev).masked_scatter(mask, lp)  # (B, T)
    base = None if cross.span_baseline is None else cross.span_baseline.to(dev)
    return span_pg_loss(full, mb.sampling_logprobs.to(dev), cross.span_index.to(dev), cross.span_logprobs.to(dev),
                        mask, base, reward_scale=loss.reward_scale, ratio_clip=loss.ratio_clip,
                        discount=loss.discount)


def needs_canonical(mode: str | None) -> bool:
    """Whether a mode reads the span estimator (span; shared_topk off its 1:1 spans; next_byte): its baseline is the
    student's canonical path (fill_span_baseline)."""
    return mode in ("span", "shared_topk", "next_byte")


def fill_span_baseline(cross, rollouts: Rollouts, logprobs_of) -> None:
    """Sets cross.span_baseline (N, T): for each token, log q_old(c) of the student's canonical path over its
    span c. Rows in cross.canonical (not their tokenizer's own encoding) get it from
    `logprobs_of(prompts, completions) -> [(Tc,) tensors]` (the student's token logprobs of those ids at the
    sampling temperature, one no-grad forward); the others from their sampling logprobs (their own path is
    the canonical one). Without sampling logprobs (no student rows) nothing is set."""
    if rollouts.sampling_logprobs is None:
        return
    mask = rollouts.completion_mask.bool()
    base = span_sums(rollouts.sampling_logprobs.float(), cross.span_index, mask)  # (N, T)
    rows = sorted(cross.canonical)
    if rows:
        lps = logprobs_of([rollouts.prompt_ids[i] for i in rows],
                          [torch.as_tensor(cross.canonical[i][0]) for i in rows])
        for i, lp in zip(rows, lps):
            c_span = torch.as_tensor(cross.canonical[i][1])
            n = int(mask[i].sum())
            sp = cross.span_index[i, :n]
            per = torch.zeros(int(max(int(sp.max()), int(c_span.max()))) + 1, dtype=torch.float64)
            per.index_add_(0, c_span, lp.double().cpu())
            base[i, :n] = per[sp].float()
    cross.span_baseline = base


def _shared_topk(loss, h, weight, cross, one) -> torch.Tensor:
    ids = cross.topk_ids.to(h.device)[one][:, : loss.top_k]  # (n, K)
    lps = cross.topk_logprobs.to(h.device)[one][:, : loss.top_k]  # (n, K)

    def fn(logits, ids_c, lps_c):
        keep = ids_c >= 0
        return L.topk_divergence(logits.float()[None], ids_c.clamp(min=0)[None], lps_c.float()[None], name=loss.name,
                                 tail=loss.tail, support_mask=keep[None], beta=loss.beta, alpha=loss.alpha,
                                 temperature=loss.temperature,
                                 scale_by_temperature_squared=loss.scale_temperature_squared)[0]
    return L.chunked_loss_from_hidden(h, weight, fn, ids, torch.where(ids >= 0, lps, 0.0), chunk_size=loss.chunk_size,
                                      fused=loss.fused)


def _next_byte(loss, h, weight, cross, at) -> torch.Tensor:
    cats = cross.topk_bytes.to(h.device)[at][:, : loss.top_k]  # (n, K)
    lps = cross.topk_logprobs.to(h.device)[at][:, : loss.top_k]  # (n, K)
    s_bytes = cross.student_bytes.to(h.device)  # (V_s,)

    def fn(logits, cats_c, lps_c):
        return next_byte_loss(logits, s_bytes, lps_c, cats_c, name=loss.name, beta=loss.beta, alpha=loss.alpha,
                              temperature=loss.temperature, scale_by_temperature_squared=loss.scale_temperature_squared)
    return L.chunked_loss_from_hidden(h, weight, fn, cats, lps, chunk_size=loss.chunk_size, fused=loss.fused)


def _hybrid(loss, h, weight, cross, one) -> torch.Tensor:
    ids = cross.topk_ids.to(h.device)[one][:, : loss.top_k]  # (n, K)
    lps = cross.topk_logprobs.to(h.device)[one][:, : loss.top_k]  # (n, K)
    matched = cross.student_matched.to(h.device)  # (V_s,)

    def fn(logits, ids_c, lps_c):
        return hybrid_loss(logits, lps_c, ids_c, matched, cross.matched_share, name=loss.name, beta=loss.beta,
                           alpha=loss.alpha, temperature=loss.temperature)
    return L.chunked_loss_from_hidden(h, weight, fn, ids, lps, chunk_size=loss.chunk_size, fused=False)


def _uld(loss, hidden, weight, mb, cross, mask, firsts) -> torch.Tensor:
    """ULD at each span's first student token (observed merge: the span's later student tokens' logprobs,
    with gradients, scale the first position's distribution)."""
    dev = hidden.device
    out = torch.zeros(mask.shape, dtype=torch.float32, device=dev)
    if not bool(firsts.any()):
        return out
    later = mask & ~cross.first.to(dev)  # (B, T) 2nd.. tokens of multi-token spans
    rest = torch.zeros(mask.shape, dtype=torch.float32, device=dev)
    if bool(later.any()):
        lp = token_logprobs(hidden[later], weight, mb.completion_ids.to(dev)[later], loss.temperature,
                             loss.chunk_size, False)  # (m,)
        per = torch.zeros(mask.shape, dtype=lp.dtype, device=dev).masked_scatter(later, lp)
        rest = span_sums(per, cross.span_index.to(dev), later)  # (B, T) on every token
    t_top = cross.topk_logprobs.to(dev)[firsts][:, : loss.top_k]  # (n, K)
    t_rest = cross.rest_logprobs.to(dev)[firsts]  # (n,)

    def fn(logits, s_rest, t_top_c, t_rest_c):
        return uld_loss(torch.log_softmax(logits.float() / loss.temperature, -1), s_rest, t_top_c, t_rest_c)
    values = L.chunked_loss_from_hidden(hidden[firsts], weight, fn, rest[firsts], t_top, t_rest,
                                        chunk_size=loss.chunk_size, fused=False)
    return out.masked_scatter(firsts, values.float())


@torch.no_grad()
def completion_logprobs(model, weight_fn, prompts: list[torch.Tensor], completions: list[torch.Tensor], *, pad_id: int,
                        temperature: float, rows: int, chunk: int, calls: int = 0, device=None) -> list[torch.Tensor]:
    """Each completion's (Tc,) token logprobs log softmax(logits / temperature) under `model` (a HiddenStates
    wrapper; weight_fn() -> its (V, H) output projection, read after each forward), `rows` completions per
    forward, at least `calls` forwards (the extra ones on a padding row: FSDP2 ranks must make the same calls)."""
    device = device or next(model.parameters()).device
    groups = [list(range(s, min(s + rows, len(prompts)))) for s in range(0, len(prompts), rows)]
    groups += [[]] * max(0, calls - len(groups))
    was_training = model.training
    model.eval()
    out = []
    for g in groups:
        ids = [completions[i] for i in g] or [torch.tensor([pad_id])]  # a padding forward
        prompt = [prompts[i] for i in g] or [prompts[0] if prompts else torch.tensor([pad_id])]
        padded = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad_id)  # (B, T)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(r), dtype=torch.bool) for r in ids], batch_first=True)
        h = forward_completion_hidden(model, prompt, padded.to(device), mask, pad_id)  # (B, T, H)
        m = mask.to(h.device)
        lp = token_logprobs(h[m], weight_fn(), padded.to(h.device)[m], temperature, chunk).float().cpu()  # (n,)
        out += list(lp.split([len(r) for r in ids]))[: len(g)]
    model.train(was_training)
    return out


def canonical_student_logprobs(student, cross, rollouts: Rollouts, *, pad_id: int, temperature: float = 1.0,
                               rows: int = 8, weight_fn=None) -> torch.Tensor:
    """(N, T) a student model's log q of each row's canonical path, spread over its spans' tokens: fill_span_baseline
    with one no-grad forward of `student` (a causal LM outside the trainer: held-out evaluation, benchmarks), then
    spread_baseline. weight_fn() -> its (V, H) output projection (default forward.output_weight)."""
    weight_fn = weight_fn or (lambda: output_weight(student))
    fill_span_baseline(cross, rollouts, lambda p, c: completion_logprobs(
        HiddenStates(student), weight_fn, p, c, pad_id=pad_id, temperature=temperature, rows=rows, chunk=1024))
    return spread_baseline(cross)


def spread_baseline(cross) -> torch.Tensor:
    """(N, T) cross.span_baseline spread evenly over each span's student tokens (as the signal's token_logprobs
    spreads the teacher's), so a row's sum is log q of its canonical path: sampled_rkl against it is the
    text-level estimate (0 for a teacher identical to the student)."""
    return cross.span_baseline / cross.student_size.clamp(min=1)
