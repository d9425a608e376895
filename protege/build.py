"""The parts of a run, built from its config: one builder per config section.

protege.trainer.Distiller calls these in order (data first, so a bad dataset fails before minutes
of model loading); each takes the config section it needs and what was built before it.
"""

from __future__ import annotations

import math
import os

import torch
from accelerate import Accelerator

from protege.config import Config
from protege.forward import check_supported, output_weight
from protege.objective import Objective
from protege.teacher.base import Teacher


def build_accelerator(cfg: Config) -> Accelerator:
    """accelerate (DDP through `accelerate launch` / torchrun, gloo on CPU), with the run's trackers."""
    return Accelerator(cpu=not torch.cuda.is_available(),
                       log_with=None if cfg.output.report_to == "none" else cfg.output.report_to,
                       project_dir=cfg.output.dir)


def max_steps(cfg: Config, num_prompts: int) -> int:
    """train.max_steps, or train.epochs passes over the training prompts when epochs is set."""
    if cfg.train.epochs:
        return max(1, math.ceil(cfg.train.epochs * num_prompts / cfg.train.prompts_per_step))
    return cfg.train.max_steps


def build_objective(cfg: Config) -> Objective:
    """The loss (protege.objective), told where the teacher runs and what the diagnostics read."""
    return Objective.build(cfg.loss, teacher_local=not cfg.teacher.urls,
                           diagnostics_top_k=cfg.output.diagnostics_top_k, sampling_temperature=cfg.rollout.temperature)


def build_student(cfg: Config, student, device):
    """The trained model: loaded (unless given), with LoRA adapters and gradient checkpointing as configured."""
    from protege.modeling import load_model

    student = student if student is not None else load_model(cfg.student.path, cfg.student.dtype)
    check_supported(student, "student")
    if cfg.student.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lc = cfg.student.lora
        student = get_peft_model(student, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                     target_modules=lc.target_modules, task_type="CAUSAL_LM"))
    if cfg.train.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return student.to(device)


def build_teacher(cfg: Config, teacher_model, *, pad_id: int, device, objective: Objective) -> tuple[Teacher, object]:
    """(teacher, in-process teacher model or None): a RemoteTeacher for teacher.urls, else a LocalTeacher."""
    t = cfg.teacher
    if t.urls:
        from protege.teacher.remote import RemoteTeacher

        return RemoteTeacher(t.urls, api_key=t.api_key or os.environ.get("PROTEGE_API_KEY"), protocol=t.protocol,
                             timeout=t.timeout_s, max_wait_s=t.max_wait_s, logprob_dtype=t.logprob_dtype,
                             vocab_size=t.vocab_size), None
    from protege.modeling import load_model
    from protege.teacher.local import LocalTeacher

    model = (teacher_model if teacher_model is not None else load_model(t.path, t.dtype)).to(device)
    return LocalTeacher(model, pad_id=pad_id, token_budget=t.batch_tokens,
                        chunk_positions=objective.scoring_chunk), model


def check_vocabularies(teacher, student) -> None:
    if teacher.vocab_size != output_weight(student).shape[0]:
        raise ValueError(f"teacher vocabulary ({teacher.vocab_size}) != student vocabulary "
                         f"({output_weight(student).shape[0]}): protege needs a shared tokenizer")


def build_rollout_engine(cfg: Config, student, *, pad_id: int, bf16: bool, seed: int, lean_seed: int | None = None):
    """The student's RolloutEngine: HF generate or the lean loop on the live model, or a colocated vLLM engine
    (rollout.engine). The lean engine draws from torch's global generator (checkpointed: resume continues
    exactly), or from its own seeded with lean_seed (the overlap thread's)."""
    from protege.rollout.hf import HFEngine

    r = cfg.rollout
    if r.engine == "lean":
        from protege.rollout.lean import LeanEngine

        return LeanEngine(student, pad_id=pad_id, batch_tokens=r.batch_tokens, autocast_bf16=bf16, seed=lean_seed)
    if r.engine != "vllm":
        return HFEngine(student, pad_id=pad_id, batch_tokens=r.batch_tokens, autocast_bf16=bf16)
    from protege.rollout.vllm_engine import VLLMRolloutEngine

    return VLLMRolloutEngine(cfg.student.path, student_model=student, dtype="bfloat16" if bf16 else cfg.student.dtype,
                             gpu_memory_utilization=r.vllm_gpu_memory_utilization,
                             max_model_len=min(cfg.data.max_prompt_tokens + r.max_new_tokens,
                                               getattr(student.config, "max_position_embeddings", None) or 1 << 30),
                             seed=seed, enable_sleep_mode=r.vllm_enable_sleep_mode)


def build_overlap(cfg: Config, distiller):
    """rollout.max_lag=1: the prefetcher that samples the next buffer with a copy of the student while a step trains."""
    from protege.rollout.overlap import Overlap

    seed = cfg.train.seed + distiller.acc.process_index

    def make_engine(model, step: int):  # the thread's own random stream: its seed names the run, rank and step
        return build_rollout_engine(cfg, model, pad_id=distiller.tok.pad_token_id, bf16=distiller.bf16, seed=seed,
                                    lean_seed=seed * 1_000_003 + 7919 * step + 1)
    return Overlap(distiller.collect, distiller.student, stream=distiller.stream, max_steps=distiller.max_steps,
                   make_engine=make_engine)


def build_teacher_engine(cfg: Config, teacher_model, *, pad_id: int):
    """The engine that samples teacher rows (mix.seq_kd): HF generate on the in-process teacher, or None."""
    from protege.rollout.hf import HFEngine

    if teacher_model is None:
        return None
    return HFEngine(teacher_model, pad_id=pad_id, batch_tokens=cfg.rollout.batch_tokens)


def build_optimizer(cfg: Config, student, total_steps: int):
    """(AdamW over the trainable parameters, its LR schedule: warmup then constant / linear / cosine)."""
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg, total_steps))


def lr_schedule(cfg: Config, total: int):
    """step -> LR multiplier: (step + 1) / (warmup + 1) during warmup, then the configured decay to 0."""
    warm, kind = cfg.optim.warmup_steps, cfg.optim.schedule

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return 1.0 - frac if kind == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return f


def tracker_config(cfg: Config) -> dict:
    """The config as flat {"section.key": int | float | str | bool}: tensorboard's hparams take nothing else
    (no nested sections, lists or None); wandb shows dotted keys as well."""
    flat = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    walk(cfg.model_dump(mode="json"), "")
    return flat
