"""The Objective: what a loss configuration needs from the rollout and the teacher, and the per-token loss.

Built once per run from `cfg.loss` and what the teacher can send (`Objective.build`). The names of the
loss table (LossName, Support: protege.loss_names, re-exported here) answer what each loss and support
needs; no other code compares a loss or support name. The trainer asks it three things:

    objective.rollout_topk              k of the student's top-k the rollout must record
    objective.teacher_request(buffer)   what the teacher must send for this buffer (a ScoreRequest)
    objective.per_token_loss(h, W, mb, signal)   (B, T) per-token loss of one micro-batch

The loss table (support x loss name x where the teacher runs):

  support=full     exact divergence over the vocabulary; teacher logits rebuilt per chunk from its
                   hidden states (in-process, or sent by a protege teacher server with its output
                   projection: RemoteTeacher.output_weight, protege.teacher.projection)
  support=teacher  teacher top-k ids; student=student top-k; union=both; sampled=the sampled token;
                   each over k categories + a tail bucket (or renormalised, loss.tail). In-process:
                   the supports are taken from the teacher's exact logprobs per chunk; remote: from
                   the ids and logprobs the server sent (student ids recorded by the rollout)
  sampled_pg       -rho_t * A_t with A_t = log p(y_t) - log q_old(y_t) (OPD as RL)
  sft              -log q(y_t): cross-entropy on the rows' tokens (e.g. teacher samples)

A teacher with another tokenizer (loss.cross_tokenizer = span | shared_topk | uld | hybrid): the losses
of protege.cross_objective over aligned byte spans (docs/cross_tokenizer.md); loss.name=sft as above.

Diagnostics (output.diagnostics_top_k) widen what is asked for: the teacher's top-k (and, in-process,
its entropy) at student-sampled positions, for the health signals of protege.diagnostics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from protege import losses as L
from protege.config import LossConfig
from protege.loss_names import TOKEN_LEVEL, LossName, Support  # noqa: F401  (re-exported)
from protege.cross_objective import cross_per_token_loss, needs_canonical, teacher_topk
from protege.teacher.base import ScoreRequest
from protege.records import Rollouts, TeacherSignal


@dataclass(frozen=True)
class Objective:
    """The loss of a run (see the module docstring); build it with `Objective.build`."""

    loss: LossConfig
    name: LossName
    support: Support
    teacher_local: bool  # an in-process teacher: exact logits from its hidden states
    diagnostics_top_k: int
    sampling_temperature: float  # the rollout's temperature (1 for greedy): sampled_pg's old policy

    cross_tokenizer: str | None = None  # a teacher with another tokenizer: loss.cross_tokenizer (cross_objective)

    @classmethod
    def build(cls, loss: LossConfig, *, teacher_local: bool, diagnostics_top_k: int = 0,
              sampling_temperature: float = 1.0, cross_tokenizer: bool = False) -> "Objective":
        # impossible combinations (a full support with a remote teacher, ...) are refused by protege.config
        cross = loss.cross_tokenizer if cross_tokenizer and loss.name != "sft" else None
        return cls(loss, LossName(loss.name), Support(loss.support), teacher_local and not cross_tokenizer,
                   diagnostics_top_k, sampling_temperature or 1.0, cross)

    # ------------------------------------------------------------------ what the parts must send
    @property
    def student_topk(self) -> int:
        """k of the student top-k ids the loss reads from the buffer (a remote student/union support), else 0."""
        needs = (not self.teacher_local and not self.cross_tokenizer and self.name not in TOKEN_LEVEL
                 and self.support in (Support.STUDENT, Support.UNION))
        return self.loss.top_k if needs else 0

    @property
    def teacher_hidden(self) -> bool:
        """Whether the teacher sends hidden states and the loss needs its `output_weight` (V, H): always in-process,
        and with a remote teacher for the full support (exact logits chunk by chunk, one path for both); never
        for a teacher with another tokenizer (its logits are over another vocabulary)."""
        return self.teacher_local or (self.cross_tokenizer is None and self.support is Support.FULL
                                      and self.name not in TOKEN_LEVEL)

    @property
    def rollout_topk(self) -> int:
        """k of the student top-k (ids and logprobs) the rollout engine records: the loss's and diagnostics'."""
        return max(self.student_topk, self.diagnostics_top_k)

    @property
    def fused(self) -> bool:
        """loss.fused, unless loss.token_clip is set: fused gradients assume every token's value enters the loss
        with one weight, and a clipped token's weight is 0 (the unfused path recomputes each chunk instead)."""
        return self.loss.fused and self.loss.token_clip is None

    @property
    def scoring_chunk(self) -> int:
        """Positions per (chunk, vocab) logits block when an in-process teacher scores."""
        return self.loss.chunk_size

    def teacher_request(self, rollouts: Rollouts) -> ScoreRequest:
        """What to ask the teacher for: what the loss reads, plus the diagnostics' top-k on student rows."""
        request = self._loss_request(rollouts)
        if self.diagnostics_top_k and rollouts.student_topk_logprobs is not None:
            request.topk = max(request.topk, self.diagnostics_top_k)
            request.entropy = self.teacher_local
        return request

    def _loss_request(self, rollouts: Rollouts) -> ScoreRequest:
        cfg = self.loss
        if self.cross_tokenizer:  # the teacher's top-K at each span's first token (none for span)
            return ScoreRequest(topk=teacher_topk(self.cross_tokenizer, cfg.top_k), temperature=cfg.temperature,
                                canonical=needs_canonical(self.cross_tokenizer))
        if self.name in TOKEN_LEVEL or self.support is Support.SAMPLED:
            return ScoreRequest(temperature=cfg.temperature)
        if self.teacher_hidden:  # exact: everything is rebuilt from hidden states inside the loss chunks
            return ScoreRequest(hidden=True, temperature=cfg.temperature)
        topk = cfg.top_k if self.support in (Support.TEACHER, Support.UNION) else 0
        query = None
        if self.support in (Support.STUDENT, Support.UNION):
            if rollouts.student_topk_ids is None:
                raise ValueError("loss.support=student|union with a remote teacher needs the student's top-k ids")
            query = rollouts.student_topk_ids[..., : cfg.top_k]
        return ScoreRequest(topk=topk, query_ids=query, temperature=cfg.temperature)

    # --------------------------------------------------------------------------- the loss
    def per_token_loss(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, mb: Rollouts,
                       signal: TeacherSignal, teacher_weight: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) per-token loss of one micro-batch; 0 where the train mask (Rollouts.train_mask) is False.

        student_hidden (B, T, H) with grad; student_weight (V, H); signal already cut to (B, T, ...);
        teacher_weight (V, H): the teacher's output projection (teacher_hidden: full and local top-k supports)."""
        cfg = self.loss
        mask = mb.train_mask.to(student_hidden.device)  # (B, T) the tokens the loss trains (multi-turn: sampled ones)
        h = student_hidden[mask]  # (n, H), n = tokens in this micro-batch
        tokens = mb.completion_ids.to(h.device)[mask]  # (n,)
        flat = lambda x: None if x is None else x.to(h.device)[mask]  # noqa: E731  (B, T, ...) -> (n, ...)
        out = torch.zeros(mask.shape, dtype=torch.float32, device=h.device)  # (B, T)
        chunk, fused = cfg.chunk_size, self.fused

        if self.cross_tokenizer:
            return cross_per_token_loss(cfg, self.cross_tokenizer, student_hidden, student_weight, mb, signal,
                                        self.sampling_temperature)
        if self.name is LossName.SFT:
            values = -L.chunked_loss_from_hidden(h, student_weight, _token_logprob(1.0), tokens, chunk_size=chunk,
                                                 fused=fused)
        elif self.name is LossName.SAMPLED_PG:
            return self._sampled_pg(h, student_weight, tokens, mask, mb, signal)
        elif self.support is Support.SAMPLED:
            values = L.chunked_loss_from_hidden(h, student_weight, self._topk_fn(), tokens[:, None],
                                                flat(signal.token_logprobs)[:, None], None, chunk_size=chunk,
                                                fused=fused)
        elif self.teacher_hidden:  # exact teacher logits per chunk from its hidden states
            values = self._local(h, student_weight, tokens, flat(signal.hidden_states), teacher_weight.to(h.device))
        else:  # remote teacher: support ids and teacher logprobs at them were sent
            ids, lps, smask = self._remote_support(signal, mb)
            values = L.chunked_loss_from_hidden(h, student_weight, self._topk_fn(), flat(ids), flat(lps), flat(smask),
                                                chunk_size=chunk, fused=fused)
        values = clip_token_loss(values, cfg.token_clip) if cfg.token_clip is not None else values
        return out.masked_scatter(mask, values.float())

    def _sampled_pg(self, h, student_weight, tokens, mask, mb: Rollouts, signal: TeacherSignal) -> torch.Tensor:
        if mb.sampling_logprobs is None:
            raise ValueError("loss.name=sampled_pg needs sampling logprobs: only student rollouts have them")
        cfg = self.loss
        student_lp = L.chunked_loss_from_hidden(h, student_weight, _token_logprob(self.sampling_temperature), tokens,
                                                chunk_size=cfg.chunk_size)  # (n,)
        full = torch.zeros(mask.shape, dtype=student_lp.dtype, device=h.device).masked_scatter(mask, student_lp)
        return L.sampled_token_pg_loss(full, mb.sampling_logprobs.to(h.device), signal.token_logprobs.to(h.device),
                                       mask, reward_scale=cfg.reward_scale, ratio_clip=cfg.ratio_clip,
                                       discount=cfg.discount)

    def _local(self, h, student_weight, tokens, t_hidden, t_weight) -> torch.Tensor:
        cfg = self.loss
        if self.support is Support.FULL:
            return L.chunked_dense_divergence(h, student_weight, teacher_hidden=t_hidden.to(t_weight.dtype),
                                              teacher_weight=t_weight, name=cfg.name, beta=cfg.beta, alpha=cfg.alpha,
                                              temperature=cfg.temperature,
                                              scale_by_temperature_squared=cfg.scale_temperature_squared,
                                              chunk_size=cfg.chunk_size, fused=self.fused)
        return L.chunked_loss_from_hidden(h, student_weight, self._local_topk_fn(t_weight), t_hidden, tokens,
                                          chunk_size=cfg.chunk_size, fused=self.fused)

    def _topk_fn(self):
        cfg = self.loss

        def fn(logits: torch.Tensor, ids: torch.Tensor, teacher_lp: torch.Tensor, smask: torch.Tensor | None):
            return L.topk_divergence(logits.float()[None], ids[None], teacher_lp.float()[None], name=cfg.name,
                                     tail=cfg.tail, support_mask=None if smask is None else smask[None], beta=cfg.beta,
                                     alpha=cfg.alpha, temperature=cfg.temperature,
                                     scale_by_temperature_squared=cfg.scale_temperature_squared)[0]
        return fn

    def _local_topk_fn(self, teacher_weight: torch.Tensor):
        """Top-k supports with an in-process teacher: the teacher's full logprobs exist per chunk."""
        topk, k, support, tau = self._topk_fn(), self.loss.top_k, self.support, self.loss.temperature

        def fn(logits: torch.Tensor, t_hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                t_lp = torch.log_softmax(L.dense_teacher_chunk(t_hidden, teacher_weight).float() / tau, -1)
                if support is Support.TEACHER:
                    ids, smask = t_lp.topk(k, -1).indices, None
                elif support is Support.STUDENT:
                    ids, smask = logits.detach().topk(k, -1).indices, None
                else:  # union
                    ids, smask = L.union_support(t_lp.topk(k, -1).indices, logits.detach().topk(k, -1).indices)
            return topk(logits, ids, t_lp.gather(-1, ids), smask)
        return fn

    def _remote_support(self, signal: TeacherSignal, mb: Rollouts):
        """(ids, teacher logprobs, mask) over the support, each (B, T, K), from what a server sent."""
        k = self.loss.top_k  # the signal may hold more (diagnostics); top-k lists are sorted, so cut
        if self.support is Support.TEACHER:
            return signal.topk_ids[..., :k], signal.topk_logprobs[..., :k], None
        if self.support is Support.STUDENT:
            return mb.student_topk_ids[..., :k], signal.query_logprobs, None
        ids, smask = L.union_support(signal.topk_ids[..., :k], mb.student_topk_ids[..., :k])  # union
        return ids, torch.cat([signal.topk_logprobs[..., :k], signal.query_logprobs], -1), smask


def clip_token_loss(values: torch.Tensor, clip: float) -> torch.Tensor:
    """loss.token_clip: each token's loss l_t becomes clamp(l_t, 0, clip).

    Per token, not per vocabulary entry: a divergence sum_v f(p_v, q_v) is >= 0 as a whole, but its
    entries are not (p_v log(p_v / q_v) < 0 where q_v > p_v), so capping the entries before the sum (OPSD's
    0.05 clip) can make a token's loss negative and push the student away from the teacher (OPSD #24).
    Clamping the sum keeps every token's loss in [0, clip]. Gradient: d clamp(l_t)/d theta = 1[0 <= l_t <= clip]
    * d l_t/d theta, so a token whose loss exceeds the clip gives no gradient at all (as PPO's clipped
    ratio): the step follows the tokens where student and teacher are already within `clip` nats, and
    the outliers (e.g. style tokens the privileged teacher is sure about) are left out, not scaled down."""
    return values.clamp(min=0.0, max=clip)


def _token_logprob(temperature: float):
    def fn(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return L.token_logprobs_from_logits(logits.float(), tokens, temperature=temperature)
    return fn
