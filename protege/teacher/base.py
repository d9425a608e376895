"""The one interface every teacher implements: score a whole buffer of rollouts at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from protege.records import Rollouts, TeacherSignal


@dataclass
class ScoreRequest:
    """What the loss needs from the teacher (the trainer asks for exactly that, nothing more).

    topk:        return the teacher's own top-k ids and logprobs per position (0: don't).
    query_ids:   (N, T, M) ids at which to return teacher logprobs (e.g. the student's top-k), or None.
    hidden:      return final hidden states (with the teacher's output_weight: exact chunked full-vocabulary losses)
                 (in-process teachers, and protege teacher servers: RemoteTeacher sends them in teacher.hidden_dtype).
    temperature: teacher logprobs are log_softmax(logits / temperature).
    entropy:     return the teacher's entropy per position (health diagnostics).
    canonical:   a teacher with another tokenizer also aligns each student row on the student tokenizer's own
                 encoding of its text (the span estimator's baseline, protege.cross_objective.fill_span_baseline).
    """

    topk: int = 0
    query_ids: torch.Tensor | None = None
    hidden: bool = False
    temperature: float = 1.0
    entropy: bool = False
    canonical: bool = False


class Teacher(Protocol):
    """What the trainer needs of any teacher (in-process, remote, and the kinds to come).

    vocab_size: the width of its logits (checked against the student's at build time).
    score(rollouts, request): one TeacherSignal for the whole buffer, aligned on the student's
        completion positions, holding exactly what `request` asks for. How the teacher sees a row
        (its own prompt or context, its own tokenizer) is its business; the alignment is not.
    A teacher that answers `request.hidden` also has `output_weight` (V, H), its output projection (an
    in-process teacher's on its own device; a RemoteTeacher's fetched once from the server and checked
    by its sha256), from which the loss rebuilds exact logits chunk by chunk.

    Optional hooks (the trainer calls each only when the teacher has it, see `optional`; a wrapper that
    holds other teachers forwards them):
      after_step(student)      after every optimizer step (an EMA self-teacher updates its weights);
      state_dict() / load_state_dict(state)   plain tensors and values kept in every checkpoint under
                               "teacher" (the EMA), so that a resumed run continues exactly; load raises
                               ValueError when the state does not fit this teacher;
      step_metrics() -> dict   extra metrics of the last scored buffer, logged with the step's metrics
                               (the privileged teacher's leak signal), then cleared."""

    vocab_size: int

    def score(self, rollouts: Rollouts, request: ScoreRequest) -> TeacherSignal: ...


def optional(teacher, hook: str, *args, default=None):
    """teacher.<hook>(*args) when the teacher has that optional hook, else `default`."""
    fn = getattr(teacher, hook, None)
    return fn(*args) if callable(fn) else default
