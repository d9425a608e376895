"""Text and token metrics for `protege eval` that need no model: repetition, diversity, exact match.

    >>> exact_match(["The answer is 1,234.", "Paris"], ["#### 1234", "paris"])
    1.0

exact_match compares the last number of the prediction with the last number of the answer when
the answer has one (GSM8K "#### 72" style; "1,234", "1234.0" and "$1234" are equal); otherwise it
compares the texts, lowercased, with surrounding punctuation and repeated spaces removed.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Iterable, Sequence

from protege.diagnostics import distinct_n, repetition_rate

# a number with optional sign, thousands separators in groups of three, and decimals
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def repetition(token_lists: Iterable[Sequence[int]], n: int = 4) -> float:
    """Mean fraction of repeated n-grams within each sequence (see diagnostics.repetition_rate)."""
    return repetition_rate(token_lists, n)


def distinct(token_lists: Iterable[Sequence[int]], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over the whole set (see diagnostics.distinct_n)."""
    return distinct_n(token_lists, n)


def last_number(text: str) -> str | None:
    """The last number in `text` in a canonical form ("1,234.50" -> "1234.5"), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        value = Decimal(found[-1].replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def normalize_text(text: str) -> str:
    """Lowercased, whitespace collapsed, surrounding punctuation and quotes stripped."""
    return " ".join(text.lower().split()).strip(" .,;:!?\"'`()[]{}")


def extract_answer(text: str) -> str:
    """How an answer reads once normalised: its last number when it has one, else its normalised text."""
    number = last_number(text)
    return number if number is not None else normalize_text(text)


def exact_match_scores(predictions: Sequence[str], answers: Sequence[str], normalize: bool = True) -> list[bool]:
    """Per-example exact match (see the module docstring); normalize=False compares stripped strings."""
    if len(predictions) != len(answers):
        raise ValueError(
            f"exact_match got {len(predictions)} predictions and {len(answers)} answers; pass one answer per prediction"
        )
    scores = []
    for prediction, answer in zip(predictions, answers):
        if not normalize:
            scores.append(prediction.strip() == answer.strip())
            continue
        expected = last_number(answer)
        if expected is not None:
            scores.append(last_number(prediction) == expected)
        else:
            scores.append(normalize_text(prediction) == normalize_text(answer))
    return scores


def exact_match(predictions: Sequence[str], answers: Sequence[str], normalize: bool = True) -> float:
    """Fraction of predictions that match their answer (0.0 for empty input)."""
    scores = exact_match_scores(predictions, answers, normalize)
    return sum(scores) / len(scores) if scores else 0.0
