"""The errors that cross modules: a checkpoint that cannot be used, and one that does not fit this run.

Kept below checkpoint.py and fsdp.py (both raise them), so that neither imports the other for them.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unreadable, altered, incomplete, non-finite); the message says why."""


class ResumeMismatch(ValueError):
    """The checkpoints are fine but do not fit this run's settings (e.g. the process count, another teacher)."""
