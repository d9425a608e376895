"""The two records that flow through the loop: what was generated, and what the teacher said.

Everything is aligned on *completion positions*: index t of a row is the t-th generated (or
reference) token of that sequence, and `completion_mask[i, t]` says whether it exists.
Rows are padded on the right to the longest completion in the buffer (not to max_new_tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Rollouts:
    """A buffer of sequences: prompt tokens plus completion tokens, one row per sequence.

    prompt_ids:        list of 1-D LongTensors, each the (left-truncated) prompt of one row.
    completion_ids:    (N, T) int64, right-padded with 0; T = longest completion in the buffer.
    completion_mask:   (N, T) bool, True where a completion token exists (EOS included).
    sampling_logprobs: (N, T) float32 logprob of each completion token under the policy that
                       sampled it (the student at rollout time), or None for off-policy rows.
    student_topk_ids:  (N, T, k) int64 top-k ids of the sampling policy at each position, or None.
    student_topk_logprobs: (N, T, k) float32 their logprobs (-inf padded), or None.
    student_entropy:   (N, T) float32 entropy of the sampling policy at each position, or None.
    finish_reasons:    "stop" (EOS emitted) or "length" (hit max_new_tokens), or "reference".
    sources:           where each row came from: "student", "dataset" or "teacher".
    examples:          the data row (protege.data.Example) each sequence was made from, or None. A teacher
                       that sees a row differently from the student (its own prompt, context or tokenizer)
                       renders its view from here; the completion ids are the same for every teacher.
    policy_version:    (N,) int64 optimizer steps the student that sampled each row had taken, -1 for rows it did
                       not sample, or None (set with rollout.max_lag > 0: protege.rollout.overlap).
    loss_mask:         (N, T) bool, True only on tokens the loss trains (multi-turn rollouts: the tokens the
                       student sampled, not tool outputs or template glue), or None: the completion mask.
                       Teacher and student still read every completion token; see train_mask.
    turn_index:        (N, T) int64 the assistant turn (0, 1, ...) each token belongs to or follows, -1 past the
                       end, or None (single-turn rows).
    episodes:          per row, a multi-turn episode's summary (protege.agents.rollout.Episode.summary), or None.
    """

    prompt_ids: list[torch.Tensor]
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    sampling_logprobs: torch.Tensor | None = None
    student_topk_ids: torch.Tensor | None = None
    student_topk_logprobs: torch.Tensor | None = None
    student_entropy: torch.Tensor | None = None
    finish_reasons: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    examples: list | None = None
    policy_version: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    turn_index: torch.Tensor | None = None
    episodes: list | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens the loss trains (the step's denominator): train_mask's count."""
        return int(self.train_mask.sum())

    @property
    def train_mask(self) -> torch.Tensor:
        """(N, T) bool: the tokens the loss counts; loss_mask where set, else every completion token."""
        return self.completion_mask if self.loss_mask is None else self.loss_mask & self.completion_mask

    @classmethod
    def from_samples(cls, prompt_ids: list[torch.Tensor], completions: list[torch.Tensor],
                     logprobs: list[torch.Tensor], finish_reasons: list[str], source: str, *,
                     topk_ids: list[torch.Tensor] | None = None, topk_logprobs: list[torch.Tensor] | None = None,
                     entropies: list[torch.Tensor] | None = None) -> "Rollouts":
        """A buffer from per-row samples of a rollout engine (each row's tensors of its completion length):
        completions (t,), logprobs (t,), and optionally topk_ids / topk_logprobs (t, k) and entropies (t,)."""
        n = len(completions)
        t = max([len(c) for c in completions] + [1])
        ids = torch.zeros((n, t), dtype=torch.long)  # (N, T)
        mask = torch.zeros((n, t), dtype=torch.bool)  # (N, T)
        lps = torch.zeros((n, t), dtype=torch.float32)  # (N, T)
        tk = torch.zeros((n, t, topk_ids[0].shape[-1]), dtype=torch.long) if topk_ids else None  # (N, T, k)
        for i, c in enumerate(completions):
            ids[i, : len(c)] = c
            mask[i, : len(c)] = True
            lps[i, : len(c)] = logprobs[i]
            if tk is not None:
                tk[i, : len(c)] = topk_ids[i]
        tk_lps = None if topk_logprobs is None else _pad_rows(mask, topk_logprobs, float("-inf"))  # (N, T, k)
        entropy = None if entropies is None else _pad_rows(mask, entropies, 0.0)  # (N, T)
        return cls(prompt_ids=list(prompt_ids), completion_ids=ids, completion_mask=mask, sampling_logprobs=lps,
                   student_topk_ids=tk, student_topk_logprobs=tk_lps, student_entropy=entropy,
                   finish_reasons=list(finish_reasons), sources=[source] * n)

    @classmethod
    def from_references(cls, prompt_ids: list[torch.Tensor], references: list[torch.Tensor],
                        source: str = "dataset") -> "Rollouts":
        """Off-policy rows from given completions (dataset references)."""
        n = len(references)
        t = max([len(r) for r in references] + [1])
        ids = torch.zeros((n, t), dtype=torch.long)
        mask = torch.zeros((n, t), dtype=torch.bool)
        for i, r in enumerate(references):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = True
        return cls(prompt_ids=list(prompt_ids), completion_ids=ids, completion_mask=mask, sampling_logprobs=None,
                   finish_reasons=["reference"] * n, sources=[source] * n)

    @classmethod
    def concat(cls, parts: list["Rollouts"]) -> "Rollouts":
        """One Rollouts from several (re-padded to the longest completion)."""
        parts = [p for p in parts if len(p)]
        t = max(p.completion_ids.shape[1] for p in parts)

        def pad(x: torch.Tensor | None, n: int, fill=0) -> torch.Tensor | None:
            if x is None:
                return None
            out = torch.full((x.shape[0], t, *x.shape[2:]), fill, dtype=x.dtype)
            out[:, : x.shape[1]] = x
            return out

        any_lp = any(p.sampling_logprobs is not None for p in parts)
        any_tk = all(p.student_topk_ids is not None for p in parts)
        any_tlp = all(p.student_topk_logprobs is not None for p in parts)
        return cls(
            prompt_ids=[x for p in parts for x in p.prompt_ids],
            completion_ids=torch.cat([pad(p.completion_ids, t) for p in parts]),
            completion_mask=torch.cat([pad(p.completion_mask, t, False) for p in parts]),
            sampling_logprobs=torch.cat([pad(p.sampling_logprobs if p.sampling_logprobs is not None else
                                             torch.zeros(p.completion_ids.shape), t) for p in parts]) if any_lp else None,
            student_topk_ids=torch.cat([pad(p.student_topk_ids, t) for p in parts]) if any_tk else None,
            student_topk_logprobs=torch.cat([pad(p.student_topk_logprobs, t, float("-inf")) for p in parts])
            if any_tlp else None,
            student_entropy=torch.cat([pad(p.student_entropy, t) for p in parts]) if any_tlp else None,
            finish_reasons=[x for p in parts for x in p.finish_reasons],
            sources=[x for p in parts for x in p.sources],
            examples=[x for p in parts for x in p.examples] if all(p.examples is not None for p in parts) else None,
            policy_version=torch.cat([p.policy_version if p.policy_version is not None else
                                      torch.full((len(p),), -1) for p in parts])
            if any(p.policy_version is not None for p in parts) else None,
            loss_mask=torch.cat([pad(p.train_mask, t, False) for p in parts])
            if any(p.loss_mask is not None for p in parts) else None,
            turn_index=torch.cat([pad(p.turn_index if p.turn_index is not None else
                                      torch.where(p.completion_mask, 0, -1), t, -1) for p in parts])
            if any(p.turn_index is not None for p in parts) else None,
            episodes=[e for p in parts for e in (p.episodes or [None] * len(p))]
            if any(p.episodes is not None for p in parts) else None,
        )

    def select(self, rows: list[int]) -> "Rollouts":
        """Rows `rows` as a new Rollouts, re-padded to their own longest completion."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        mask = self.completion_mask[idx]
        t = int(mask.sum(1).max()) if len(rows) and mask.numel() else 0
        cut = lambda x: None if x is None else x[idx][:, :t]  # noqa: E731
        return Rollouts(
            prompt_ids=[self.prompt_ids[i] for i in rows],
            completion_ids=cut(self.completion_ids),
            completion_mask=mask[:, :t],
            sampling_logprobs=cut(self.sampling_logprobs),
            student_topk_ids=cut(self.student_topk_ids),
            student_topk_logprobs=cut(self.student_topk_logprobs),
            student_entropy=cut(self.student_entropy),
            finish_reasons=[self.finish_reasons[i] for i in rows] if self.finish_reasons else [],
            sources=[self.sources[i] for i in rows] if self.sources else [],
            examples=None if self.examples is None else [self.examples[i] for i in rows],
            policy_version=None if self.policy_version is None else self.policy_version[idx],
            loss_mask=cut(self.loss_mask),
            turn_index=cut(self.turn_index),
            episodes=None if self.episodes is None else [self.episodes[i] for i in rows],
        )


@dataclass
class TeacherSignal:
    """What the teacher says about a Rollouts buffer, aligned on completion positions.

    token_logprobs: (N, T) float32 teacher logprob of each completion token (always present).
    topk_ids:       (N, T, K) int64 the teacher's own top-K ids, or None.
    topk_logprobs:  (N, T, K) float32 teacher logprobs at topk_ids, or None.
    query_logprobs: (N, T, M) float32 teacher logprobs at ids the caller asked for
                    (e.g. the student's top-k), or None.
    entropy:        (N, T) float32 entropy of the teacher's distribution, or None.
    hidden_states:  (N, T, H) final hidden states of the teacher (the position that predicts each
                    completion token; in-process, or sent by a server in teacher.hidden_dtype), or None.
                    With the teacher's own output projection (its output_weight, (V, H)) they give exact
                    full-vocabulary teacher logits chunk by chunk, without storing (N, T, V). Plain data.
    cross:          a teacher with another tokenizer (protege.teacher.cross_tokenizer.CrossSignal): its
                    answer per aligned byte span on the student's positions, or None.
    """

    token_logprobs: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    query_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    cross: object | None = None

    def select(self, rows: list[int], t: int) -> "TeacherSignal":
        idx = torch.as_tensor(rows, dtype=torch.long)
        cut = lambda x: None if x is None else x[idx][:, :t]  # noqa: E731
        return TeacherSignal(
            token_logprobs=cut(self.token_logprobs),
            topk_ids=cut(self.topk_ids),
            topk_logprobs=cut(self.topk_logprobs),
            query_logprobs=cut(self.query_logprobs),
            entropy=cut(self.entropy),
            hidden_states=cut(self.hidden_states),
            cross=None if self.cross is None else self.cross.select(rows, t),
        )


def _pad_rows(mask: torch.Tensor, rows: list[torch.Tensor], fill: float) -> torch.Tensor:
    """(N, T, ...) float32 from per-row tensors of each row's completion length, `fill` past the end."""
    out = torch.full((*mask.shape, *rows[0].shape[1:]), fill, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
