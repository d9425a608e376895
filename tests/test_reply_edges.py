"""The teacher reply checks (protege.teacher.replies.check_values) tried exactly at the edge of what is
allowed and one step past it: logprobs <= LOGPROB_TOL, top-k ids in [0, vocab), top-k mass <= 1 + tol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protege.teacher.replies import LOGPROB_TOL, MASS_TOL, InvalidReply, check_values

VOCAB = 50


def _f32_at_most(x: float) -> float:
    """The largest float32 <= x (what a float32 reply can carry at the edge)."""
    y = np.float32(x)
    return float(y if y <= x else np.nextafter(y, np.float32(-np.inf)))


def _f32_above(x: float) -> float:
    """The smallest float32 > x: one step past the edge."""
    y = np.float32(x)
    return float(y if y > x else np.nextafter(y, np.float32(np.inf)))


def _reply(token: float = -1.0, ids=(0, 1), topk=(-1.0, -2.0)) -> dict[str, torch.Tensor]:
    """One row, one completion position, k = len(ids)."""
    return {"token_logprobs": torch.tensor([[token]], dtype=torch.float32),
            "topk_ids": torch.tensor([[list(ids)]], dtype=torch.long),
            "topk_logprobs": torch.tensor([[list(topk)]], dtype=torch.float32)}


def _check(arrays, tol=MASS_TOL["float32"]):
    check_values(arrays, [1], VOCAB, tol)


@pytest.mark.parametrize("value", [0.0, 1e-7, _f32_at_most(LOGPROB_TOL), -math.inf])
def test_logprobs_up_to_the_tolerance_pass(value):
    _check(_reply(token=value))
    _check({"query_logprobs": torch.tensor([[[value]]], dtype=torch.float32)})


@pytest.mark.parametrize("value", [_f32_above(LOGPROB_TOL), 1e-3, math.inf, math.nan])
def test_logprobs_past_the_tolerance_fail(value):
    with pytest.raises(InvalidReply, match="token_logprobs"):
        _check(_reply(token=value))
    with pytest.raises(InvalidReply, match="query_logprobs"):
        _check({"query_logprobs": torch.tensor([[[value]]], dtype=torch.float32)})


@pytest.mark.parametrize("ids, ok", [((0, VOCAB - 1), True), ((VOCAB - 1, VOCAB), False), ((-1, 0), False)])
def test_topk_ids_inside_the_vocabulary(ids, ok):
    if ok:
        _check(_reply(ids=ids))
    else:
        with pytest.raises(InvalidReply, match=r"topk_ids.*outside the vocabulary \[0, 50\)"):
            _check(_reply(ids=ids))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_topk_mass_up_to_one_plus_tol(dtype):
    """Two top-k logprobs whose probabilities sum to 1 + tol - 1e-6 pass, to 1 + tol + 1e-6 fail."""
    tol = MASS_TOL[dtype]
    for excess, ok in ((-1e-6, True), (1e-6, False)):
        mass = 1 + tol + excess
        topk = (math.log(0.5), math.log(mass - 0.5))  # float32 rounding moves the sum by < 1e-7
        if ok:
            _check(_reply(topk=topk), tol)
        else:
            with pytest.raises(InvalidReply, match="sum to more than 1"):
                _check(_reply(topk=topk), tol)


def test_padding_positions_are_not_held_to_the_mass_rule():
    """Past a row's completion length the top-k slots are padding: their mass is not checked."""
    arrays = _reply(topk=(math.log(0.9), math.log(0.9)))
    check_values(arrays, [0], VOCAB, MASS_TOL["float32"])
    with pytest.raises(InvalidReply):
        check_values(arrays, [1], VOCAB, MASS_TOL["float32"])


@pytest.mark.parametrize("finish, ok", [("stop", True), ("length", True), ("content_filter", False), (None, False)])
def test_api_reply_finish_reason_is_stop_or_length(finish, ok):
    """A generation API's reply cut for any other reason (a content filter, a tool call) is not an answer."""
    import orjson

    from protege.teacher.api_replies import parse_generation_reply

    body = orjson.dumps({"choices": [{"index": 0, "text": "xy", "finish_reason": finish}],
                         "usage": {"completion_tokens": 2}})
    if ok:
        assert parse_generation_reply(body, chat=False, topk=0, vocab_size=None, url="u")["finish_reason"] == finish
    else:
        with pytest.raises(InvalidReply, match="finish_reason"):
            parse_generation_reply(body, chat=False, topk=0, vocab_size=None, url="u")
