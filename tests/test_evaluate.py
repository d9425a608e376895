"""Model-free eval metrics: exact match with number extraction, repetition and distinct-n."""

import pytest

from protege.evaluate import distinct, exact_match, exact_match_scores, extract_answer, last_number, repetition


def test_last_number_canonical_forms():
    assert last_number("It costs $1,234.50 in total, not 12.") == "12"
    assert last_number("Total: 1,234.50") == "1234.5"
    assert last_number("#### 72") == "72"
    assert last_number("x = -3.0") == "-3"
    assert last_number("no digits here") is None


def test_exact_match_numbers_and_text():
    predictions = ["So she has 1,234 apples.", "The answer is 18", "Paris.", "  London "]
    answers = ["#### 1234", "#### 17", "paris", "Paris"]
    assert exact_match_scores(predictions, answers) == [True, False, True, False]
    assert exact_match(predictions, answers) == pytest.approx(0.5)
    assert exact_match(["Paris", " Paris "], ["Paris", "paris"], normalize=False) == pytest.approx(0.5)
    assert extract_answer("The capital is Paris!") == "the capital is paris"
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="one answer per prediction"):
        exact_match(["1"], [])


def test_repetition_and_distinct_reuse_diagnostics():
    assert repetition([[5, 6, 7, 8, 5, 6, 7, 8, 2]]) == pytest.approx(1 / 6)
    assert distinct([[1, 2, 3], [1, 2, 4]]) == pytest.approx(3 / 4)
    assert distinct([[1, 2, 3], [1, 2, 4]], n=1) == pytest.approx(4 / 6)
