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
    """

    topk: int = 0
    query_ids: torch.Tensor | None = None
    hidden: bool = False
    temperature: float = 1.0
    entropy: bool = False


class Teacher(Protocol):
    """What the trainer needs of any teacher (in-process, remote, and the kinds to come).

    vocab_size: the width of its logits (checked against the student's at build time).
    score(rollouts, request): one TeacherSignal for the whole buffer, aligned on the student's
        completion positions, holding exactly what `request` asks for. How the teacher sees a row
        (its own prompt or context, its own tokenizer) is its business; the alignment is not.
    A teacher that answers `request.hidden` also has `output_weight` (V, H), its output projection (an
    in-process teacher's on its own device; a RemoteTeacher's fetched once from the server and checked
    by its sha256), from which the loss rebuilds exact logits chunk by chunk."""

    vocab_size: int

    def score(self, rollouts: Rollouts, request: ScoreRequest) -> TeacherSignal: ...
