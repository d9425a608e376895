"""The teacher-score cache's row key tells rows apart that share a prompt (or a token sequence): each row
answered from a warm cache equals an uncached teacher's score of that very row."""

from __future__ import annotations

import torch
from tiny import make_plain_model

from protege.records import Rollouts
from protege.teacher.base import ScoreRequest
from protege.teacher.cache import open_cache
from protege.teacher.local import LocalTeacher

VOCAB = 64


def _rows(pairs: list[tuple[list[int], list[int]]]) -> Rollouts:
    t = max(len(c) for _, c in pairs)
    ids = torch.zeros((len(pairs), t), dtype=torch.long)  # (N, T)
    mask = torch.zeros((len(pairs), t), dtype=torch.bool)  # (N, T)
    for i, (_, c) in enumerate(pairs):
        ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), True
    return Rollouts(prompt_ids=[torch.tensor(p) for p, _ in pairs], completion_ids=ids, completion_mask=mask)


def _same(a, b, mask):
    assert torch.equal(a.token_logprobs[mask], b.token_logprobs[mask])
    assert torch.equal(a.topk_ids[mask], b.topk_ids[mask])
    assert torch.equal(a.topk_logprobs[mask], b.topk_logprobs[mask])


def test_two_completions_of_one_prompt_get_their_own_scores(tmp_path):
    """Cold: completion A of prompt P. Warm: completions B (A with its last token changed), C (A's prefix)
    and D (A plus one token) of the same P, and the same tokens split differently between prompt and
    completion. None may be answered with A's scores: each equals the uncached teacher's."""
    teacher = LocalTeacher(make_plain_model(VOCAB, seed=3), pad_id=0)
    request = ScoreRequest(topk=4)
    prompt, a = [5, 9, 2, 7], [11, 12, 13, 14]
    cached = open_cache(teacher, tmp_path)
    first = _rows([(prompt, a)])
    _same(cached.score(first, request), teacher.score(first, request), first.completion_mask)
    assert cached.take_counts()["misses"] == 1
    again = _rows([(prompt, a), (prompt, a[:-1] + [40]), (prompt, a[:-1]), (prompt, a + [15]),
                   (prompt + a[:1], a[1:]), (prompt[:-1], prompt[-1:] + a)])
    got, want = cached.score(again, request), teacher.score(again, request)
    _same(got, want, again.completion_mask)
    counts = cached.take_counts()
    assert counts["hits"] == 1 and counts["misses"] == 5, counts  # only the identical row is a hit
