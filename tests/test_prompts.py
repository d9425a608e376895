"""The built-in prompt set: size, no duplicates, disjoint splits, showcase prompts held out."""

import json

import pytest

from protege.prompts import SHOWCASE_PROMPTS, builtin_prompt_path, load_builtin_prompts


def test_splits_sizes_and_disjoint():
    train, heldout = load_builtin_prompts("train"), load_builtin_prompts("heldout")
    assert len(train) + len(heldout) >= 300
    assert 0.10 <= len(heldout) / (len(train) + len(heldout)) <= 0.20
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    assert not set(train) & set(heldout)
    assert all(p.strip() == p and len(p) > 10 for p in train + heldout)


def test_showcase_is_held_out():
    heldout = load_builtin_prompts("heldout")
    assert len(SHOWCASE_PROMPTS) == 5 and "How do I make a fire?" in SHOWCASE_PROMPTS
    assert all(p in heldout for p in SHOWCASE_PROMPTS)


def test_files_are_prompt_rows_and_bad_split_is_named():
    for split in ("train", "heldout"):
        with builtin_prompt_path(split).open(encoding="utf-8") as f:
            assert all(set(json.loads(line)) == {"prompt"} for line in f)
    with pytest.raises(ValueError, match="'test'.*'train', 'heldout'"):
        builtin_prompt_path("test")


def test_the_unseen_set_is_not_a_rewording_of_any_training_or_heldout_prompt():
    import difflib

    seen = [p.lower() for p in load_builtin_prompts("train") + load_builtin_prompts("heldout")]
    unseen = load_builtin_prompts("unseen")
    assert len(unseen) == 16 and len(set(unseen)) == 16
    for p in unseen:
        closest = max(difflib.SequenceMatcher(None, p.lower(), s).ratio() for s in seen)
        assert closest < 0.7, (p, difflib.get_close_matches(p.lower(), seen, n=1, cutoff=0.0))
