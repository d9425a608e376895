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
    hidden:      return final hidden states + lm_head for exact chunked full-vocabulary losses
                 (in-process teachers only).
    temperature: teacher logprobs are log_softmax(logits / temperature).
    entropy:     return the teacher's entropy per position (health diagnostics).
    """

    topk: int = 0
    query_ids: torch.Tensor | None = None
    hidden: bool = False
    temperature: float = 1.0
    entropy: bool = False


class Teacher(Protocol):
    vocab_size: int

    def score(self, rollouts: Rollouts, request: ScoreRequest) -> TeacherSignal: ...
