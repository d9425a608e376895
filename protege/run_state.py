"""What a checkpoint keeps of a run besides the student's weights, and how a resumed run takes it back.

`state_of(d)` is plain data (tensors, numbers, strings, lists, dicts: torch.load(weights_only=True)
reads it): optimizer and scheduler, the prompt stream's position, the step, the health monitor, an
EMA teacher's weights, and the teacher's identity (its capabilities record). `apply_state(d, state)`
restores it into a Distiller `d`, raising checkpoint.CheckpointError when it does not fit this run
(checkpoint.restore then tries an older checkpoint) and ResumeMismatch when the run was trained with
another teacher (each difference named; resume_new_teacher=true continues and logs them).
"""

from __future__ import annotations

import logging

from protege import checkpoint, fsdp
from protege.errors import ResumeMismatch
from protege.teacher.identity import identity_changes

log = logging.getLogger("protege")


def state_of(d) -> dict:
    """The run state of Distiller `d` (with rollout.max_lag, the stream position before the buffer in flight)."""
    optimizer = fsdp.local_optimizer_state(d.optimizer) if d.sharded else d.optimizer.state_dict()
    return {"optimizer": optimizer, "scheduler": d.scheduler.state_dict(),
            "stream": d.overlap.stream_state() if d.overlap else d.stream.state_dict(),
            "step": d.state.step, "prompts_truncated": d.prompts.truncated, "monitor": d.monitor.state_dict(),
            "teacher": d.teacher.state_dict(), "teacher_identity": d.teacher.capabilities.identity}


def apply_state(d, state: dict) -> None:
    """Restore `state_of`'s output into Distiller `d`."""
    check_same_teacher(state.get("teacher_identity"), d.teacher.capabilities.identity, d.cfg.resume_new_teacher)
    d.stream.load_state_dict(state["stream"])  # a changed dataset: ValueError, no older checkpoint helps
    try:
        if d.sharded:
            fsdp.load_optimizer_state(d.optimizer, state["optimizer"])
        else:
            d.optimizer.load_state_dict(state["optimizer"])
        d.scheduler.load_state_dict(state["scheduler"])
        if "monitor" in state:  # health warnings fire once per run, not again after each resume
            d.monitor.load_state_dict(state["monitor"])
        d.teacher.load_state_dict(state.get("teacher", {}))  # an EMA teacher's weights
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        raise checkpoint.CheckpointError(f"its optimizer, scheduler, health-monitor or teacher state does not fit "
                                         f"this run ({type(e).__name__}: {e})") from None
    d.state.step = state["step"]
    d.prompts.truncated = state.get("prompts_truncated", 0)


def check_same_teacher(saved: dict | None, current: dict, allow_change: bool) -> None:
    """Resume with the teacher the checkpoint was trained with: ResumeMismatch naming each difference
    (field: old -> new), unless `allow_change` (resume_new_teacher=true), which logs them. A checkpoint without
    an identity (an older protege) is not checked."""
    if saved is None:
        log.warning("resume: the checkpoint records no teacher identity (written by an older protege); the teacher "
                    "is not checked")
        return
    changes = identity_changes(saved, current)
    if not changes:
        return
    if allow_change:
        log.warning("resume: resume_new_teacher=true: continuing with another teacher than the checkpoint's: %s",
                    "; ".join(changes))
        return
    raise ResumeMismatch("resume: the checkpoint was trained with another teacher: " + "; ".join(changes)
                                    + ". Resume with that teacher, set resume_new_teacher=true to change teachers "
                                    "on purpose, or start a new output.dir")
