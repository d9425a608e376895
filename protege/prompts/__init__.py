"""The built-in prompt set: practical everyday questions for distillation runs that need no dataset.

Written for this project (not downloaded): camping and bushcraft, first aid, cooking, household,
how-to and everyday questions, in varied phrasings (imperative, "how do I", "what's the best way",
short ones, and longer ones with a sentence of context). Two fixed, disjoint splits ship as jsonl
files with rows `{"prompt": "..."}`:

    train    ~85% of the prompts, for training
    heldout  ~15%, for evaluation; it includes SHOWCASE_PROMPTS
    unseen   16 questions written later, never used for training nor for choosing the demo's recipe
             (no near-duplicate of a train/heldout prompt): `protege demo` reports on them too

    >>> from protege.prompts import load_builtin_prompts
    >>> len(load_builtin_prompts("train")) > 300
    True
"""

from __future__ import annotations

import json
import pathlib

SPLITS = ("train", "heldout", "unseen")

# Five held-out prompts whose answers a report shows side by side (teacher / student before / after).
SHOWCASE_PROMPTS = [
    "How do I make a fire?",
    "What's the best way to keep bread from going stale?",
    "How should I treat a small burn on my hand?",
    "How can I get a red wine stain out of a carpet?",
    "What should I pack for a one-night camping trip?",
]


def builtin_prompt_path(split: str) -> pathlib.Path:
    """Path of the jsonl file of one split ("train" or "heldout")."""
    if split not in SPLITS:
        raise ValueError(
            f"unknown built-in prompt split {split!r}; use one of {', '.join(map(repr, SPLITS))}"
        )
    return pathlib.Path(__file__).with_name(f"everyday_{split}.jsonl")


def load_builtin_prompts(split: str) -> list[str]:
    """The prompts of one split, in file order."""
    path = builtin_prompt_path(split)
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]
