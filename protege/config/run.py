"""The whole run's config (Config): its sections together, and the rules across them.

Unknown keys, wrong types and impossible combinations are refused with the field's dotted name and the fix.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from protege.config.env import EnvConfig
from protege.api_kinds import check_api_teacher
from protege.config.sections import (ConfigError, DataConfig, LossConfig, MixConfig, OptimConfig, OutputConfig,
                                     RolloutConfig, StudentConfig, TrainConfig, Section)
from protege.config.teacher import (NamedTeacherConfig, TeacherConfig, check_cache, check_teachers_config,
                                    teacher_configs)
from protege.loss_names import LossName


class Config(Section):
    student: StudentConfig
    teacher: TeacherConfig | None = Field(None, description="The teacher (one); for several, use teachers.")
    teachers: list[NamedTeacherConfig] = Field(default_factory=list, description="Several named teachers, each "
                                               "with every teacher setting plus name, weight and offload "
                                               "(docs/teachers.md, Several teachers); instead of teacher.")
    teachers_mode: Literal["routed", "mixture"] = Field("routed", description="teachers: routed = each row is "
                                                        "scored by the teacher its data.teacher_column names; "
                                                        "mixture = every row by every teacher, combined with "
                                                        "the normalised weights.")
    data: DataConfig = Field(default_factory=DataConfig)
    mix: MixConfig = Field(default_factory=MixConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    env: EnvConfig | None = Field(None, description="Multi-turn rollouts in an environment (docs/agents.md).")
    resume: bool = Field(False, description="Continue from the newest checkpoint in output.dir.")
    resume_new_teacher: bool = Field(False, description="resume=true with a teacher whose identity differs from the "
                                     "checkpoint's (another model, server, system prompt, EMA rate, teacher list): "
                                     "continue on purpose, the differences logged. false: such a resume is refused.")

    @model_validator(mode="after")
    def _combinations(self):
        loss = self.loss
        check_teachers_config(self)
        for t in teacher_configs(self):
            check_api_teacher(t.protocol, several=bool(self.teachers), lmbda=self.mix.lmbda, seq_kd=self.mix.seq_kd,
                              loss_name=loss.name, support=loss.support, top_k=loss.top_k, temperature=loss.temperature)
        remote = [getattr(t, "name", "teacher") for t in teacher_configs(self) if t.urls and t.protocol == "openai"]
        cross = self.teacher is not None and (self.teacher.cross_tokenizer == "on" or (
            self.teacher.cross_tokenizer == "auto" and self.teacher.tokenizer is not None))
        if loss.support.exact and remote and not loss.name.token_level and not cross:
            raise ValueError("loss.support=full needs the teacher's hidden states: an in-process teacher (teacher.path)"
                             " or `protege serve-teacher` (teacher.protocol=protege); with teacher.protocol=openai use "
                             "loss.support=teacher|sampled" + (f" (openai teachers: {remote})" if self.teachers else ""))
        if loss.name.needs_rollouts and self.mix.lmbda < 1:
            raise ValueError("loss.name=sampled_pg needs student rollouts (importance ratio to the sampling policy):"
                             " set mix.lmbda=1")
        if self.train.micro_batch_size > self.train.prompts_per_step * self.rollout.num_generations:
            raise ValueError("train.micro_batch_size is larger than the buffer (train.prompts_per_step x "
                             "rollout.num_generations)")
        selfs = [t.self for t in teacher_configs(self) if t.self is not None]
        if selfs and self.mix.seq_kd:
            raise ValueError(f"mix.seq_kd samples from an in-process teacher model; teacher.self={selfs[0]} "
                             "has none of its own: set mix.seq_kd=false")
        if loss.token_clip is not None and loss.name is LossName.SAMPLED_PG:
            raise ValueError("loss.token_clip clamps a divergence at [0, clip]; sampled_pg's per-token surrogate "
                             "-rho*A is signed by design: use loss.ratio_clip instead, or unset loss.token_clip")
        for t in teacher_configs(self):
            check_cache(t, loss)
        if any(t.protocol == "openai" for t in teacher_configs(self)) and loss.support.reads_student_ids:
            raise ValueError("teacher.protocol=openai cannot return logprobs at the student's ids: use "
                             "loss.support=teacher|sampled, or protege serve-teacher")
        if (self.rollout.max_lag and self.teacher.urls and loss.support.reads_student_ids and self.mix.lmbda < 1
                and not loss.name.token_level):
            raise ValueError("rollout.max_lag=1 with a remote teacher, loss.support=student|union and mix.lmbda<1 "
                             "would read the live student's top-k while it trains: set rollout.max_lag=0 or "
                             "mix.lmbda=1")
        return self


def check_vocab_bounds(cfg: Config, vocab_size: int, source: str) -> None:
    """Top-k sizes that cannot exceed the vocabulary, checked as soon as it is known (before weights load)."""
    checks = [("output.diagnostics_top_k", cfg.output.diagnostics_top_k)]
    if cfg.loss.support.topk:
        checks.insert(0, ("loss.top_k", cfg.loss.top_k))
    for name, k in checks:
        if k > vocab_size:
            raise ConfigError(f"{name}={k} is larger than the vocabulary ({vocab_size} tokens in {source}): "
                              f"set {name} to at most {vocab_size}")
