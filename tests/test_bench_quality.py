"""The quality benchmark's task (bench/bench_quality.py): worked answers are right and parse back."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

spec = importlib.util.spec_from_file_location("bench_quality", Path(__file__).resolve().parents[1] / "bench" /
                                              "bench_quality.py")
bq = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bq)


def test_worked_answer_example():
    assert bq.worked(347, 589) == "7+9=16|4+8+1=13|3+5+1=9|936"
    assert bq.worked(999, 1) == "9+1=10|9+0+1=10|9+0+1=10|1000"


def test_worked_answers_are_correct_column_sums():
    rng = random.Random(0)
    for _ in range(500):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        text = bq.worked(a, b)
        assert bq.answer_of(text) == str(a + b)
        carry = 0
        for i, step in enumerate(text.split("|")[:-1]):  # every column: x+y(+1)=s with the right carry
            lhs, s = step.split("=")
            terms = [int(t) for t in lhs.split("+")]
            assert terms[:2] == [a // 10 ** i % 10, b // 10 ** i % 10] and sum(terms) == int(s)
            assert (len(terms) == 3) == bool(carry)
            carry = int(s) // 10


def test_problems_are_disjoint_and_tokenizer_round_trips():
    held = bq.problems(50, seed=1)
    train = bq.problems(500, seed=2, exclude=set(held))
    assert len(set(train)) == 500 and not set(train) & set(held)
    tok = bq.make_tokenizer()
    text = "347+589=" + bq.worked(347, 589)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
