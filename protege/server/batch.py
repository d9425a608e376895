"""What the teacher server's parts pass each other: a `Batch` of rows in, a `ScoreResult` out, or a `RequestError`.

parse.py builds Batches from request bodies, the batcher merges and splits them, backends score them
into ScoreResults, compat.py and protege.wire encode those; any of them may refuse a request with a
RequestError (HTTP status + a message for people). This module imports nothing from the server, so
every part can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import numpy as np


@dataclass
class Batch:
    """Rows to score in one engine call (all at one temperature)."""

    sequences: list[np.ndarray]  # each (L_i,) int, prompt + completion
    prompt_lengths: list[int]  # 1 <= P_i <= L_i; completion = sequences[i][P_i:]
    topk: int = 0
    query_ids: list[np.ndarray] | None = None  # each (L_i - P_i, M) int, or None
    temperature: float = 1.0
    hidden: bool = False  # also return the final hidden states at the completion positions


class ScoreResult(TypedDict, total=False):
    """A backend's reply to a Batch: padded arrays over completion positions (the tokens after the
    prompt), T = the longest completion, padding 0, logprobs = log_softmax(logits / temperature).
    A plain dict at run time; topk_* only when the batch asked for top-k, query_logprobs only with query_ids,
    hidden_states only with hidden."""

    completion_lengths: np.ndarray  # (N,) i4
    token_logprobs: np.ndarray  # (N, T) f4: teacher logprob of each actual token
    topk_ids: np.ndarray  # (N, T, K) i4: the teacher's own top-K, sorted by logprob, descending
    topk_logprobs: np.ndarray  # (N, T, K) f4
    query_logprobs: np.ndarray  # (N, T, M) f4: teacher logprobs at the ids the caller sent
    hidden_states: np.ndarray  # (N, T, H) f4: final hidden states predicting each completion token (when asked)


class RequestError(Exception):
    """A request the server refuses: HTTP `status` and a message for people (names field and fix)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
