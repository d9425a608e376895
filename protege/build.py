"""The parts of a run, built from its config: one builder per config section.

protege.trainer.Distiller calls these in order (data first, so a bad dataset fails before minutes
of model loading); each takes the config section it needs and what was built before it.
"""

from __future__ import annotations

import math
import os

import torch
from accelerate import Accelerator

from protege.api_kinds import API_KINDS
from protege.config import Config
from protege.forward import check_supported, output_weight
from protege.objective import Objective
from protege.teacher import cache
from protege.teacher.base import Teacher
from protege.teacher.privileged import check_data
from protege.teacher.several import check_routing


def build_accelerator(cfg: Config) -> Accelerator:
    """accelerate (DDP or FSDP2 through `accelerate launch` / torchrun, gloo on CPU), with the run's trackers."""
    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      log_with=None if cfg.output.report_to == "none" else cfg.output.report_to,
                      project_dir=cfg.output.dir)
    from protege import fsdp

    if fsdp.requested():  # FSDP2 on CPU (gloo): accelerate only shards on GPUs by itself
        fsdp.enable_on_cpu(acc)
    return acc


def check_before_models(cfg: Config, train_set, eval_set) -> frozenset[str]:
    """The start-up checks that need no model (a missing vllm, privileged columns, reference completions for
    mix.lmbda < 1, a teacher for every routed row); returns the training rows' columns."""
    if cfg.rollout.engine == "vllm":
        from protege.rollout.vllm_engine import require_vllm

        require_vllm("rollout.engine=vllm", "rollout.engine=hf")
    columns = check_data(cfg, train_set.examples)  # a privileged column named but absent: fails here
    if cfg.mix.lmbda < 1 and not cfg.mix.seq_kd and not any(e.reference for e in train_set.examples):
        raise ValueError("mix.lmbda < 1 without mix.seq_kd uses the dataset's reference completions, but no row "
                         f"has one (columns {cfg.data.completion_column!r} or a final assistant turn in "
                         f"{cfg.data.messages_column!r}). Set mix.seq_kd=true or mix.lmbda=1.")
    check_routing(cfg, train_set, eval_set)  # routed teachers: every row names one
    return columns


def max_steps(cfg: Config, num_prompts: int) -> int:
    """train.max_steps, or train.epochs passes over the training prompts when epochs is set."""
    if cfg.train.epochs:
        return max(1, math.ceil(cfg.train.epochs * num_prompts / cfg.train.prompts_per_step))
    return cfg.train.max_steps


def build_objective(cfg: Config, cross_tokenizer: bool = False, teacher: Teacher | None = None) -> Objective:
    """The loss (protege.objective), told where the teacher runs (its capabilities; before the teacher is built:
    in-process, which only the teacher's scoring chunk reads), what the diagnostics read and whether the
    teacher has another tokenizer (cross_tokenizer_mode)."""
    return Objective.build(cfg.loss, teacher_local=teacher is None or not teacher.capabilities.remote,
                           diagnostics_top_k=cfg.output.diagnostics_top_k, sampling_temperature=cfg.rollout.temperature,
                           cross_tokenizer=cross_tokenizer)


def cross_tokenizer_mode(cfg: Config, student_tokenizer, teacher_tokenizer=None) -> tuple[object, bool]:
    """(the teacher's tokenizer or None, whether to distil across tokenizers), before any weights load.

    teacher.cross_tokenizer=off: never; on: always; auto: when the teacher's tokenizer (teacher_tokenizer, else
    teacher.tokenizer, else teacher.path's when it is not the student's path, else the student's) has another
    vocabulary or other special tokens than the student's."""
    from protege.modeling import load_tokenizer

    t = cfg.teacher
    if t is None or t.cross_tokenizer == "off":  # several teachers: one tokenizer for all (for now)
        return None, False
    source = t.tokenizer or (t.path if t.path != cfg.student.path else None)
    if teacher_tokenizer is None and source is not None:
        try:
            teacher_tokenizer = load_tokenizer(source)
        except (ValueError, OSError) as e:
            if t.cross_tokenizer == "on" or t.tokenizer:
                raise ValueError(f"teacher.tokenizer: could not load the teacher's tokenizer {source!r} ({e}); set "
                                 "teacher.tokenizer to an HF folder, hub id, .gguf file or smollm2") from None
    if teacher_tokenizer is None:
        if t.cross_tokenizer != "on":
            return None, False
        teacher_tokenizer = student_tokenizer  # on, and no tokenizer of its own named: the student's
    cross = t.cross_tokenizer == "on" or not same_tokenizer(student_tokenizer, teacher_tokenizer)
    if cross:
        check_cross_tokenizer(cfg)
    return teacher_tokenizer, cross


def pad_id_of(tokenizer) -> int:
    """A padding id inside the tokenizer's vocabulary (pad, else EOS, else 0)."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def same_tokenizer(a, b) -> bool:
    """Same vocabulary (token -> id) and the same special tokens."""
    return a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens


def check_cross_tokenizer(cfg: Config) -> None:
    """What a cross-tokenizer run cannot do, refused at start-up."""
    if cfg.mix.seq_kd:
        raise ValueError("mix.seq_kd with a teacher of another tokenizer: its samples are in its own vocabulary. "
                         "Write the teacher's samples as a dataset's completions (mix.lmbda=0 uses them), or set "
                         "mix.seq_kd=false")
    if cfg.loss.cross_tokenizer == "span" and cfg.loss.name.reads_logprobs and cfg.mix.lmbda < 1:
        raise ValueError("loss.cross_tokenizer=span needs student rollouts (importance ratio to the sampling "
                         "policy): set mix.lmbda=1, or use loss.cross_tokenizer=shared_topk|uld|hybrid|next_byte")


def wrap_cross_tokenizer(cfg: Config, teacher: Teacher, student_tokenizer, teacher_tokenizer,
                         student_vocab_size: int) -> Teacher:
    """The teacher seen through the student's positions (protege.teacher.cross_tokenizer)."""
    from protege.modeling import eos_ids
    from protege.teacher.cross_tokenizer import CrossTokenizerTeacher

    return CrossTokenizerTeacher(teacher, student_tokenizer, teacher_tokenizer, student_vocab_size=student_vocab_size,
                                 student_eos_ids=eos_ids(student_tokenizer), teacher_eos_ids=eos_ids(teacher_tokenizer),
                                 max_prompt_tokens=cfg.data.max_prompt_tokens)


def build_agents(cfg: Config, tokenizer, eos_ids: list[int], *, max_steps: int, cross: bool, columns):
    """env: the multi-turn rollouts (protege.agents), after refusing at start-up what is not built yet; None
    without an env section."""
    from protege.agents.checks import check_env_supported
    from protege.agents.rollout import AgentRollouts

    check_env_supported(cfg, cross_tokenizer=cross, columns=columns)
    if cfg.env is None:
        return None
    return AgentRollouts(cfg.env, tokenizer, eos_ids, turns=cfg.loss.turns, seed=cfg.train.seed,
                         guide=(cfg.mix.teacher_turns, max_steps))


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


def build_teacher(cfg: Config, teacher_model, *, pad_id: int, device, objective: Objective, student=None,
                  tokenizer=None, data_columns: frozenset[str] | None = None) -> tuple[Teacher, object]:
    """(teacher, in-process teacher model or None) for cfg.teacher: the scorer (_teacher_source: a RemoteTeacher,
    a LocalTeacher, or the student itself for teacher.self), wrapped in a PrivilegedTeacher when the teacher
    sees its own view of each row (protege.teacher.privileged.uses_privileged: teacher.system_prompt, a
    privileged data key, or a privileged column among `data_columns`, the training rows' columns).

    student: the (unwrapped, LoRA-applied) student model, needed by teacher.self. tokenizer: the student's,
    which renders the privileged view unless the teacher is loaded from teacher.path (its own tokenizer).
    For `teachers:` a RoutedTeacher over one of these per name (protege.teacher.several)."""
    from protege.teacher.privileged import PrivilegedTeacher, uses_privileged

    if cfg.teachers:  # several named teachers: a RoutedTeacher over one built here per name (model None)
        from protege.teacher.several import build_routed_teacher

        return build_routed_teacher(cfg, teacher_model, lambda one, model, dev: build_teacher(
            one, model, pad_id=pad_id, device=dev, objective=objective, student=student, tokenizer=tokenizer,
            data_columns=data_columns), device), None
    teacher, model = _teacher_source(cfg, teacher_model, pad_id=pad_id, device=device, objective=objective,
                                     student=student)
    if not uses_privileged(cfg, data_columns):
        return teacher, model
    if cfg.teacher.path and teacher_model is None:
        from protege.modeling import load_tokenizer

        tokenizer = load_tokenizer(cfg.teacher.path)
    if tokenizer is None:
        raise ValueError("a privileged-context teacher needs a tokenizer to render its prompts: pass tokenizer=")
    return PrivilegedTeacher(teacher, cfg, tokenizer), model


def teacher_kind_class(kind: str) -> type[Teacher]:
    """The class of teacher.kind=module:Class (a teacher kind of the user's own), imported; ValueError naming the
    field when it cannot be imported or is not a protege.teacher.base.Teacher with a from_config classmethod."""
    import importlib

    module, _, name = kind.partition(":")
    try:
        cls = vars(importlib.import_module(module)).get(name)
    except ImportError as e:
        raise ValueError(f"teacher.kind={kind}: cannot import module {module!r} ({e}); put it on PYTHONPATH") from None
    if not (isinstance(cls, type) and issubclass(cls, Teacher)):
        raise ValueError(f"teacher.kind={kind}: {module} has no class {name} subclassing protege.teacher.base.Teacher "
                         "with a from_config(cfg, *, teacher_model, pad_id, device, student, chunk_positions) classmethod")
    return cls


def _teacher_source(cfg: Config, teacher_model, *, pad_id: int, device, objective: Objective, student):
    t = cfg.teacher
    if t.plugin:  # teacher.kind=module:Class: the user's own kind builds itself
        return teacher_kind_class(t.kind).from_config(cfg, teacher_model=teacher_model, pad_id=pad_id, device=device,
                                                      student=student, chunk_positions=objective.scoring_chunk), None
    if t.protocol in API_KINDS:  # a generation API: teacher samples only (protege.api_kinds)
        from protege.teacher.api import APITeacher

        return APITeacher(t.protocol, t.urls, store_dir=t.api_store or os.path.join(cfg.output.dir, "teacher_api"),
                          topk=cfg.loss.top_k if cfg.loss.name.reads_logprobs else 0, api_key=t.api_key,
                          model=t.model, timeout=t.timeout_s, max_wait_s=t.max_wait_s,
                          max_concurrency=t.max_concurrency, vocab_size=t.vocab_size), None
    if t.resolved_kind == "self":  # the student itself: no model of its own (mix.seq_kd is refused by the config)
        from protege.teacher.self_teacher import build_self_teacher

        return build_self_teacher(t.self, student, pad_id=pad_id, token_budget=t.batch_tokens,
                                  chunk_positions=objective.scoring_chunk, ema_rate=t.ema_rate), None
    if t.resolved_kind == "server":
        from protege.teacher.remote import RemoteTeacher

        return cache.wrap(t, RemoteTeacher(t.urls, api_key=t.api_key or os.environ.get("PROTEGE_API_KEY"),
                                           protocol=t.protocol, timeout=t.timeout_s, max_wait_s=t.max_wait_s,
                                           logprob_dtype=t.logprob_dtype, vocab_size=t.vocab_size,
                                           hidden_dtype=t.hidden_dtype, projection_cache=t.projection_cache,
                                           min_wire_version=t.min_wire_version)), None
    from protege.modeling import load_model
    from protege.teacher.local import LocalTeacher

    model = (teacher_model if teacher_model is not None else load_model(t.path, t.dtype)).to(device)
    return cache.wrap(t, LocalTeacher(model, pad_id=pad_id, token_budget=t.batch_tokens,
                                      chunk_positions=objective.scoring_chunk,
                                      identity={"source": t.path or "", "dtype": t.dtype})), model


def check_vocabularies(teacher, student) -> None:
    """A teacher's logits must be as wide as the student's (a text-only API teacher has none: vocab_size None)."""
    if teacher.vocab_size is not None and teacher.vocab_size != output_weight(student).shape[0]:
        raise ValueError(f"teacher vocabulary ({teacher.vocab_size}) != student vocabulary "
                         f"({output_weight(student).shape[0]}): protege needs a shared tokenizer, or the teacher's own "
                         "(teacher.tokenizer, teacher.cross_tokenizer=auto|on) to distil across tokenizers")


def build_rollout_engine(cfg: Config, student, *, pad_id: int, bf16: bool, seed: int, lean_seed: int | None = None,
                         sharded: bool = False):
    """The student's RolloutEngine: HF generate or the lean loop on the live model, or a colocated vLLM engine
    (rollout.engine, auto resolved by RolloutConfig.engine_for). The lean engine draws from torch's global generator
    (checkpointed: resume continues exactly), or from its own seeded with lean_seed (the overlap thread's)."""
    from protege.rollout.hf import HFEngine

    r = cfg.rollout
    name = r.engine_for(sharded, next(student.parameters()).device.type)
    if name == "lean":
        from protege.rollout.lean import LeanEngine

        return LeanEngine(student, pad_id=pad_id, batch_tokens=r.batch_tokens, autocast_bf16=bf16, seed=lean_seed,
                          fast_decode=r.fast_decode)
    if name != "vllm":
        return HFEngine(student, pad_id=pad_id, batch_tokens=r.batch_tokens, autocast_bf16=bf16,
                        fast_decode=r.fast_decode)
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


def build_teacher_engine(cfg: Config, teacher: Teacher, *, pad_id: int, tokenizer=None):
    """The engine that samples teacher rows (mix.seq_kd), when the teacher's capabilities say it samples: HF
    generate on an in-process teacher's model, an API teacher itself (given the student's tokenizer); else None."""
    if not teacher.capabilities.generates:
        return None
    return teacher.generator(pad_id=pad_id, batch_tokens=cfg.rollout.batch_tokens, tokenizer=tokenizer)


def build_optimizer(cfg: Config, student, total_steps: int):
    """(AdamW over the trainable parameters, its LR schedule: warmup then constant / linear / cosine).

    torch's fused AdamW where it applies (every parameter a floating-point tensor on CPU or CUDA, no FSDP2,
    whose sharded parameters are swapped in later), as HF Trainer's default `adamw_torch_fused`: one kernel
    per parameter and no full-size temporaries. On this 2-core CPU, for SmolLM2's 113 M parameters, a step
    took 0.21 s against 1.13 s for the default implementation, without its 225 MB of temporaries
    (bench/results/optimizer.md)."""
    params = [p for p in student.parameters() if p.requires_grad]
    sharded = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    fused = bool(params) and not sharded and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay,
                                  fused=fused or None)
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
