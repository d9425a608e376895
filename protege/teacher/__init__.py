"""Teachers: turn a Rollouts buffer into a TeacherSignal (local HF model, or a remote server)."""

from protege.teacher.base import ScoreRequest, Teacher

__all__ = ["ScoreRequest", "Teacher"]
