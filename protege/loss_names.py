"""The loss table's names: every loss (LossName) and support (Support), and what each needs.

The one place a loss or support name is compared: the config's rules, protege.api_kinds, protege.build
and the Objective ask these properties (no name is compared as a string elsewhere; tests/test_loss_table.py
checks it). Pure Python (no torch): protege.config imports it; protege.objective re-exports both enums.

    LossName.token_level     reads only the rows' own tokens (sampled_pg, sft): no distribution, no top-k
    LossName.reads_logprobs  reads teacher logprobs at all (everything but sft, which trains on text)
    LossName.needs_rollouts  its importance ratio needs the student's own samples (sampled_pg)
    Support.exact            the full vocabulary (the teacher's hidden states and output projection)
    Support.topk             a top-k support (teacher, student or union)
    Support.reads_student_ids   asks the teacher at the student's top-k ids (student, union)
    Support.reads_teacher_topk  combines the teacher's own top-k ids (teacher, union)
"""

from __future__ import annotations

from enum import StrEnum


class Support(StrEnum):
    FULL = "full"
    TEACHER = "teacher"
    STUDENT = "student"
    UNION = "union"
    SAMPLED = "sampled"

    @property
    def exact(self) -> bool:
        return self is Support.FULL

    @property
    def topk(self) -> bool:
        return self in (Support.TEACHER, Support.STUDENT, Support.UNION)

    @property
    def reads_student_ids(self) -> bool:
        return self in (Support.STUDENT, Support.UNION)

    @property
    def reads_teacher_topk(self) -> bool:
        return self in (Support.TEACHER, Support.UNION)


class LossName(StrEnum):
    REVERSE_KL = "reverse_kl"
    FORWARD_KL = "forward_kl"
    JSD = "jsd"
    TVD = "tvd"
    SKEW_FORWARD_KL = "skew_forward_kl"
    SKEW_REVERSE_KL = "skew_reverse_kl"
    SAMPLED_PG = "sampled_pg"
    SFT = "sft"

    @property
    def token_level(self) -> bool:
        return self in (LossName.SAMPLED_PG, LossName.SFT)

    @property
    def reads_logprobs(self) -> bool:
        return self is not LossName.SFT

    @property
    def needs_rollouts(self) -> bool:
        return self is LossName.SAMPLED_PG


TOKEN_LEVEL = tuple(n for n in LossName if n.token_level)  # losses that read only the rows' own tokens
