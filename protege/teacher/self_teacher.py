"""The student as its own teacher (teacher.self): base, ema or live weights, no second model loaded.

Self-distillation (OPSD, SDFT, context distillation) scores the student's rollout with the same
network under another view (privileged context, protege.teacher.privileged) and, optionally, other
weights. With theta_S the student's weights at the current step and theta_0 its starting weights:

    base   theta_T = theta_0, fixed. With LoRA the student is W_0 + B A and the base is W_0: the same
           module scored inside peft's `disable_adapter()`, so no second copy of any weight exists.
           Without LoRA a frozen copy of the student is made once at build time (1x the weights).
    ema    theta_T <- (1 - r) theta_T + r theta_S after every optimizer step (r = teacher.ema_rate,
           theta_T starts at theta_0). Only the trainable parameters are averaged (with LoRA: the
           adapters; the frozen base is the same for both), kept in float32 (a bfloat16 student's
           small updates would round away in bfloat16); for the scoring pass they are put into the
           student's parameters (in the parameters' dtype) and the student's own storage is put back
           after it (no copy for float32 weights).
           The EMA is part of every checkpoint (state_dict), so a resumed run continues it exactly.
    live   theta_T = theta_S: the current weights, scored in eval mode under no_grad (dropout off,
           no gradient into the teacher side), the module's train/eval mode restored afterwards.

Scoring is protege.teacher.local.score_rows on the unwrapped student (never the accelerate/DDP
wrapper, whose forward hooks belong to the training pass). The teacher's output projection
(`output_weight`, read by the full-vocabulary losses) is the one of the teacher's weights: the
student's lm_head detached (base, live), or its EMA when the lm_head is trained (ema).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from protege.forward import output_weight
from protege.records import Rollouts, TeacherSignal
from protege.teacher.base import Capabilities, ScoreRequest, Teacher
from protege.teacher.local import LocalTeacher, score_rows

KINDS = ("base", "ema", "live")


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def build_self_teacher(kind: str, student: nn.Module, *, pad_id: int, token_budget: int, chunk_positions: int,
                       ema_rate: float = 0.05):
    """The teacher of teacher.self=`kind` for `student` (the unwrapped model, LoRA already applied)."""
    if kind not in KINDS:
        raise ValueError(f"teacher.self={kind!r}: use one of {', '.join(KINDS)}")
    if student is None:
        raise ValueError(f"teacher.self={kind} needs the student model (build_teacher(..., student=model))")
    if kind == "base" and not is_peft(student):  # a frozen copy of the starting weights
        return LocalTeacher(copy.deepcopy(student), pad_id=pad_id, token_budget=token_budget,
                            chunk_positions=chunk_positions, identity={"kind": "self:base"})
    return SelfTeacher(student, kind, pad_id=pad_id, token_budget=token_budget, chunk_positions=chunk_positions,
                       ema_rate=ema_rate)


def _master(dtype: torch.dtype) -> torch.dtype:
    """The EMA's dtype for parameters of `dtype`: float32 for 16-bit floats, else the same."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class SelfTeacher(Teacher):
    """teacher.self = base (with LoRA), ema or live on the student module itself (see the module docstring)."""

    def __init__(self, student: nn.Module, kind: str, *, pad_id: int, token_budget: int = 16384,
                 chunk_positions: int = 2048, ema_rate: float = 0.05):
        if kind == "base" and not is_peft(student):
            raise ValueError("SelfTeacher(kind='base') needs a LoRA (peft) student; without LoRA use "
                             "build_self_teacher, which makes a frozen copy")
        if not 0 < ema_rate <= 1:
            raise ValueError(f"teacher.ema_rate={ema_rate}: must be in (0, 1]")
        self.student, self.kind = student, kind
        self.pad_id, self.token_budget, self.chunk_positions = pad_id, token_budget, chunk_positions
        self.ema_rate = ema_rate
        self.vocab_size = output_weight(student).shape[0]
        # ema: {name: theta_T} for the trainable parameters, starting at the student's weights
        self.ema = {n: p.detach().clone().to(_master(p.dtype)) for n, p in student.named_parameters()
                    if p.requires_grad} if kind == "ema" else {}
        self._head = next((n for n, p in student.named_parameters() if p is output_weight(student)), None)

    @property
    def output_weight(self) -> torch.Tensor:
        """(V, H) the teacher's output projection (no gradient): the EMA lm_head when it is trained, else the
        student's, which for base is its base weight (LoRA never changes W_0)."""
        if self.kind == "ema" and self._head in self.ema:
            return self.ema[self._head].to(output_weight(self.student).dtype)
        return output_weight(self.student).detach()

    @property
    def capabilities(self) -> Capabilities:
        """In-process, stateful (the EMA); its identity: the kind, and the EMA rate that changes its signal."""
        identity = {"kind": f"self:{self.kind}", **({"ema_rate": self.ema_rate} if self.kind == "ema" else {})}
        return Capabilities(stateful=True, identity=identity)

    def score(self, rollouts: Rollouts, request: ScoreRequest) -> TeacherSignal:
        with self.weights():
            return score_rows(self.student, rollouts.prompt_ids, rollouts.completion_ids, rollouts.completion_mask,
                              request, pad_id=self.pad_id, token_budget=self.token_budget,
                              chunk_positions=self.chunk_positions)

    @contextmanager
    def weights(self):
        """The student module holding the teacher's weights, in eval mode, for the duration of the block."""
        was_training = self.student.training
        self.student.eval()
        own = {}  # the student's own storage of each averaged parameter, while the EMA values are in place
        params = dict(self.student.named_parameters()) if self.kind == "ema" else {}
        try:
            with self.student.disable_adapter() if self.kind == "base" else nullcontext():
                with torch.no_grad():
                    for name, theta_t in self.ema.items():
                        own[name], params[name].data = params[name].data, theta_t.to(params[name].dtype)
                yield self.student
        finally:
            for name, data in own.items():
                params[name].data = data
            self.student.train(was_training)

    @torch.no_grad()
    def after_step(self, student: nn.Module | None = None) -> None:
        """Called by the trainer after every optimizer step: ema applies theta_T <- (1 - r) theta_T + r theta_S
        (torch.lerp, in float32 for low-precision weights); base and live do nothing."""
        if self.kind != "ema":
            return
        params = dict((student if student is not None else self.student).named_parameters())
        for name, theta_t in self.ema.items():
            theta_t.lerp_(params[name].detach().to(theta_t.dtype), self.ema_rate)

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the EMA tensors (ema), else nothing to keep."""
        return {"kind": self.kind, "ema_rate": self.ema_rate, "ema": {n: t.detach().cpu() for n, t in self.ema.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`; a checkpoint of another kind or other parameters is refused (ValueError)."""
        if state.get("kind") != self.kind:
            raise ValueError(f"the checkpoint's self teacher is {state.get('kind')!r}, this run's teacher.self is "
                             f"{self.kind!r}: resume with the same teacher.self")
        saved = state.get("ema", {})
        if set(saved) != set(self.ema) or any(saved[n].shape != t.shape for n, t in self.ema.items()):
            raise ValueError("the checkpoint's EMA teacher does not fit this student (other trainable parameters): "
                             "resume with the same model and LoRA settings")
        for n, t in self.ema.items():
            t.copy_(saved[n])
