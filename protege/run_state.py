"""What a checkpoint keeps of a run besides the student's weights, and how a resumed run takes it back.

`state_of(d)` is plain data (tensors, numbers, strings, lists, dicts: torch.load(weights_only=True)
reads it): optimizer and scheduler, the prompt stream's position, the step, the health monitor, an
EMA teacher's weights, and the teacher set. `apply_state(d, state)` restores it into a Distiller `d`,
raising checkpoint.CheckpointError when it does not fit this run (checkpoint.restore then tries an
older checkpoint) and ResumeMismatch when the run was trained with other teachers.
"""

from __future__ import annotations

from protege import checkpoint, fsdp
from protege.teacher.base import optional
from protege.teacher.several import check_teacher_set, teacher_set


def state_of(d) -> dict:
    """The run state of Distiller `d` (with rollout.max_lag, the stream position before the buffer in flight)."""
    optimizer = fsdp.local_optimizer_state(d.optimizer) if d.sharded else d.optimizer.state_dict()
    return {"optimizer": optimizer, "scheduler": d.scheduler.state_dict(),
            "stream": d.overlap.stream_state() if d.overlap else d.stream.state_dict(),
            "step": d.state.step, "prompts_truncated": d.prompts.truncated, "monitor": d.monitor.state_dict(),
            "teacher": optional(d.teacher, "state_dict", default={}), "teachers": teacher_set(d.cfg)}


def apply_state(d, state: dict) -> None:
    """Restore `state_of`'s output into Distiller `d`."""
    check_teacher_set(state.get("teachers"), teacher_set(d.cfg))  # ResumeMismatch: trained with other teachers
    d.stream.load_state_dict(state["stream"])  # a changed dataset: ValueError, no older checkpoint helps
    try:
        if d.sharded:
            fsdp.load_optimizer_state(d.optimizer, state["optimizer"])
        else:
            d.optimizer.load_state_dict(state["optimizer"])
        d.scheduler.load_state_dict(state["scheduler"])
        if "monitor" in state:  # health warnings fire once per run, not again after each resume
            d.monitor.load_state_dict(state["monitor"])
        optional(d.teacher, "load_state_dict", state.get("teacher", {}))  # an EMA teacher's weights
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        raise checkpoint.CheckpointError(f"its optimizer, scheduler, health-monitor or teacher state does not fit "
                                         f"this run ({type(e).__name__}: {e})") from None
    d.state.step = state["step"]
    d.prompts.truncated = state.get("prompts_truncated", 0)
