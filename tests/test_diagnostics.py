"""OPD health metrics against hand-computed examples, and the warnings of HealthMonitor."""

import math

import pytest
import torch

from protege.diagnostics import (
    HealthMonitor,
    distinct_n,
    entropy_from_logprobs,
    entropy_gap,
    overlap_metrics,
    repetition_rate,
)
from protege.eval import text_metrics
from protege.records import Rollouts

L = math.log
NEG_INF = float("-inf")


def test_overlap_metrics_hand_computed():
    # four positions, k = 2; position 2 is masked out; position 3 has a -inf padding entry (id 0)
    student_ids = torch.tensor([[[5, 7], [1, 2], [4, 4], [3, 0]]])  # (1, 4, 2)
    student_lp = torch.tensor([[[L(.6), L(.3)], [L(.7), L(.2)], [0.0, 0.0], [0.0, NEG_INF]]])
    teacher_ids = torch.tensor([[[7, 9], [2, 1], [4, 8], [3, 0]]])
    teacher_lp = torch.tensor([[[L(.5), L(.4)], [L(.1), L(.8)], [0.0, 0.0], [L(.9), NEG_INF]]])
    mask = torch.tensor([[True, True, False, True]])
    m = overlap_metrics(student_ids, student_lp, teacher_ids, teacher_lp, mask)
    # shared: {7} | {1, 2} | (masked) | {3}  (id 0 is padding in both lists, not shared)
    assert m["overlap_ratio"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert m["student_overlap_mass"] == pytest.approx((0.3 + 0.9 + 1.0) / 3)
    assert m["teacher_overlap_mass"] == pytest.approx((0.5 + 0.9 + 0.9) / 3)
    advantages = [L(.5) - L(.3), L(.8) - L(.7), L(.1) - L(.2), L(.9) - 0.0]  # log p - log q per shared id
    assert m["overlap_token_advantage"] == pytest.approx(sum(advantages) / 4, rel=1e-6)


def test_overlap_metrics_identical_and_disjoint_lists():
    ids = torch.tensor([[[1, 2, 3]]])
    lp = torch.log(torch.tensor([[[0.5, 0.3, 0.1]]]))
    mask = torch.ones(1, 1, dtype=torch.bool)
    same = overlap_metrics(ids, lp, ids.flip(-1), lp.flip(-1), mask)
    assert same["overlap_ratio"] == 1.0 and same["overlap_token_advantage"] == pytest.approx(0.0, abs=1e-7)
    assert same["student_overlap_mass"] == pytest.approx(0.9) == same["teacher_overlap_mass"]
    apart = overlap_metrics(ids, lp, ids + 10, lp, mask)
    assert apart["overlap_ratio"] == 0.0 and apart["student_overlap_mass"] == 0.0
    assert math.isnan(apart["overlap_token_advantage"])


def test_entropy_of_logprobs():
    assert float(entropy_from_logprobs(torch.log_softmax(torch.zeros(2), -1))) == pytest.approx(math.log(2))
    logprobs = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    assert float(entropy_from_logprobs(logprobs)) == pytest.approx(1.5 * math.log(2))
    assert float(entropy_from_logprobs(torch.tensor([0.0, NEG_INF]))) == 0.0  # a point mass, no NaN
    batch = torch.log_softmax(torch.zeros(2, 3, 4), -1)  # (B, T, V)
    assert entropy_from_logprobs(batch).shape == (2, 3)


def test_entropy_gap_is_masked_mean_of_student_minus_teacher():
    student = torch.tensor([[1.0, 2.0, 9.0]])
    teacher = torch.tensor([[1.5, 1.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    assert entropy_gap(student, teacher, mask) == pytest.approx(((1.0 - 1.5) + (2.0 - 1.0)) / 2)


def test_text_metrics_hand_computed():
    eos = 2
    ids = torch.tensor([
        [5, 6, 7, 8, 5, 6, 7, 8, eos],  # 6 4-grams, "5 6 7 8" twice: repetition 1/6
        [3, 4, 0, 0, 0, 0, 0, 0, 0],    # 2 tokens: no 4-gram, left out of the repetition mean
        [9, 9, 9, 9, 9, eos, 0, 0, 0],  # 3 4-grams, "9 9 9 9" twice: repetition 1/3
    ])
    mask = torch.tensor([[1] * 9, [1] * 2 + [0] * 7, [1] * 6 + [0] * 3], dtype=torch.bool)
    m = text_metrics(Rollouts(prompt_ids=[torch.tensor([1])] * 3, completion_ids=ids, completion_mask=mask,
                              finish_reasons=["stop", "length", "stop"]))
    assert m["length"] == pytest.approx((9 + 2 + 6) / 3)
    assert m["truncation_rate"] == pytest.approx(1 / 3)
    assert m["eos_rate"] == pytest.approx(2 / 3)
    assert m["repetition_rate"] == pytest.approx((1 / 6 + 1 / 3) / 2)
    # bigrams: 8 + 1 + 5 = 14; distinct {56, 67, 78, 85, 82, 34, 99, 92} = 8
    assert m["distinct_2"] == pytest.approx(8 / 14)


def test_distinct_n_and_repetition_rate():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)  # 12 23 12 24
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 3) == 1.0
    assert distinct_n([[1]], 2) == 0.0
    assert repetition_rate([[1, 2, 1, 2, 1, 2]], n=2) == pytest.approx(1 - 2 / 5)
    assert repetition_rate([[1, 2]]) == 0.0


def steady(**changes):
    metrics = {"length_mean": 100.0, "repetition_rate": 0.02, "truncation_rate": 0.1,
               "overlap_ratio": 0.6, "entropy_gap": -0.1}
    metrics.update(changes)
    return metrics


def test_health_monitor_warns_once_per_kind_with_step_and_numbers():
    monitor = HealthMonitor()
    for step in range(3):
        assert monitor.update(step, steady()) == []
    assert monitor.update(3, steady(length_mean=30.0)) == [
        "step 3: length_mean 30.0 fell below 40% of its baseline 100.0"
    ]
    assert monitor.update(4, steady(length_mean=20.0)) == []  # same kind: said once
    [rep] = monitor.update(5, steady(repetition_rate=0.06))  # 3x the baseline 0.02 and above the floor
    assert rep.startswith("step 5: repetition_rate 0.060 is 3.0x its baseline 0.020")
    [trunc] = monitor.update(6, steady(truncation_rate=0.7))
    assert "step 6" in trunc and "0.70" in trunc
    [overlap] = monitor.update(7, steady(overlap_ratio=0.4))  # below 80% of 0.6
    assert "step 7" in overlap and "0.400" in overlap and "0.600" in overlap
    [gap] = monitor.update(8, steady(entropy_gap=-1.5))
    assert "step 8" in gap and "-1.50" in gap
    [high] = monitor.update(9, steady(length_mean=300.0))
    assert "length inflation" in high
    assert len(monitor.warnings) == 6


def test_health_monitor_absolute_checks_prefixes_and_nan():
    monitor = HealthMonitor()
    # absolute thresholds fire before the baseline exists; "prefix/key" names are understood
    [rep] = monitor.update(0, {"rollout/repetition_rate": 0.5, "rollout/length_mean": float("nan")})
    assert rep.startswith("step 0: repetition_rate 0.500 is above 0.300")
    assert monitor.update(1, {}) == []
    # relative checks wait for a baseline; a zero baseline of repetition stays below the floor
    quiet = HealthMonitor(baseline_steps=2)
    for step in range(2):
        quiet.update(step, steady(repetition_rate=0.0))
    assert quiet.update(2, steady(repetition_rate=0.04)) == []
