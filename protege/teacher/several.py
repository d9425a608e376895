"""The parts around several named teachers: building them, offloading, the teacher set in checkpoints, metrics.

build_routed_teacher   each `teachers:` entry through build.build_teacher (one teacher's builder), then
                       a RoutedTeacher (protege.teacher.routed) over them
OffloadedTeacher       an in-process teacher kept on the CPU, moved to the device only for its pass
per_teacher_metrics    teacher/<name>/{rows, loss, sampled_rkl, teacher_nll, completion_len_mean, overlap_*}
"""

from __future__ import annotations

from typing import Callable

import torch

from protege.diagnostics import overlap_metrics, sampled_rkl
from protege.forward import output_weight
from protege.records import Rollouts
from protege.teacher.base import ScoreRequest, Teacher, Wrapper
from protege.teacher.routed import ROUTED, RoutedSignal, RoutedTeacher, check_rows


class OffloadedTeacher(Wrapper):
    """An in-process teacher whose model lives on the CPU between passes and on `device` during `score`.

    Same signal as the teacher left on the device (the model is moved, nothing else changes); the
    device memory it held is returned after each pass (torch.cuda.empty_cache on CUDA)."""

    def __init__(self, inner: Teacher, model: torch.nn.Module, device):
        self.inner, self.model, self.device = inner, model.to("cpu"), torch.device(device)
        self.passes_on: list[str] = []  # the device of each pass (what a test can check)

    @property
    def output_weight(self) -> torch.Tensor:
        """(V, H) its output projection where the model is now (the CPU between passes)."""
        return output_weight(self.model).detach()

    def score(self, rollouts: Rollouts, request: ScoreRequest):
        self.model.to(self.device)
        try:
            self.passes_on.append(str(output_weight(self.model).device))
            return self.inner.score(rollouts, request)
        finally:
            self.model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def build_routed_teacher(cfg, teacher_models: dict | None, build_one: Callable, device) -> RoutedTeacher:
    """A RoutedTeacher over cfg.teachers; build_one(cfg_with_that_teacher, model_or_None, device) -> (Teacher,
    model_or_None) is build.build_teacher. teacher_models: {name: in-memory model} (tests, benchmarks) or None."""
    models = teacher_models or {}
    if not isinstance(models, dict):
        raise ValueError("with teachers: pass teacher_model={name: model} (one in-memory model per teacher name)")
    names = [t.name for t in cfg.teachers]
    unknown = sorted(set(models) - set(names))
    if unknown:
        raise ValueError(f"teacher_model names {unknown} are not in teachers (known: {names})")
    built = {}
    for named in cfg.teachers:
        if named.offload and named.self is not None:
            raise ValueError(f"teachers: {named.name!r} is the student itself (self: {named.self}); it cannot be "
                             "offloaded (offload would move the student): remove offload from that entry")
        one = cfg.model_copy(update={"teacher": named, "teachers": []})
        teacher, model = build_one(one, models.get(named.name), "cpu" if named.offload else device)
        built[named.name] = OffloadedTeacher(teacher, model, device) if named.offload else teacher
    return RoutedTeacher(built, mode=cfg.teachers_mode, weights={t.name: t.weight for t in cfg.teachers},
                         column=cfg.data.teacher_column, default=cfg.data.default_teacher, device=device)


# ------------------------------------------------------------------------------------ metrics
def per_teacher_metrics(buffer: Rollouts, signal, row_loss: torch.Tensor | None, top_k: int) -> dict:
    """teacher/<name>/... of one step, from each teacher's own answer (RoutedSignal.parts); {} otherwise.

    Routed, over that teacher's rows: rows, completion_len_mean, loss (sum of its rows' per-token losses
    / their tokens; row_loss (N,) is each row's summed per-token loss), and the three below.
    Both modes, on its rows' student-sampled positions: sampled_rkl (mean log q(y) - log p_i(y)),
    teacher_nll (-log p_i(y), every position), overlap_* (protege.diagnostics.overlap_metrics, top_k > 0)."""
    if not isinstance(signal, RoutedSignal):
        return {}
    out = {}
    student = torch.tensor([s == "student" for s in buffer.sources], dtype=torch.bool)  # (N,)
    for name, (rows, sig) in signal.parts.items():
        idx = torch.as_tensor(rows)
        t = sig.token_logprobs.shape[1]
        mask = buffer.completion_mask[idx][:, :t]  # (n_i, t_i)
        sm = mask & student[idx][:, None]  # student-sampled positions
        m = {"rows": len(rows), "teacher_nll": float(-sig.token_logprobs[mask].mean())}
        if signal.mode == ROUTED:  # its own rows
            m["completion_len_mean"] = float(mask.sum(1).float().mean())
            if row_loss is not None:
                m["loss"] = float(row_loss[idx].sum()) / max(1, int(mask.sum()))
        if buffer.sampling_logprobs is not None and sm.any():
            m["sampled_rkl"] = sampled_rkl(buffer.sampling_logprobs[idx][:, :t], sig.token_logprobs, sm)
        if top_k and buffer.student_topk_logprobs is not None and sig.topk_ids is not None and sm.any():
            m.update(overlap_metrics(buffer.student_topk_ids[idx][:, :t, :top_k],
                                     buffer.student_topk_logprobs[idx][:, :t, :top_k],
                                     sig.topk_ids[..., :top_k], sig.topk_logprobs[..., :top_k], sm))
        out.update({f"teacher/{name}/{k}": v for k, v in m.items()})
    return out


def check_routing(cfg, train_set, eval_set) -> None:
    """Routed teachers: every training and held-out row names a known teacher (or there is a default), checked
    before any model loads; RoutingError names the row, the value or the columns found, and the known names."""
    if not cfg.teachers or cfg.teachers_mode != ROUTED:
        return
    names = [t.name for t in cfg.teachers]
    for source, prompts in (("training", train_set), ("held-out", eval_set)):
        if prompts is not None:
            check_rows(prompts.examples, names, cfg.data.teacher_column, cfg.data.default_teacher,
                       f"{source} data ({cfg.data.path if source == 'training' else 'eval'})")
