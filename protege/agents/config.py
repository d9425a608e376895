"""The `env:` section of a run's config: the environment (a class or tools) and the limits of multi-turn rollouts."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EnvConfig(BaseModel):
    """Multi-turn rollouts in an environment (protege.agents; docs/agents.md). Set `class` or `tools`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    cls: str | None = Field(None, alias="class", description="The environment class by import path "
                            "'package.module:Name', made once per episode as Name(**env.args); it has reset(row) "
                            "-> messages and step(assistant_text) -> StepResult (protege.agents.env).")
    args: dict = Field(default_factory=dict, description="Keyword arguments of the environment class.")
    tools: list[str] = Field(default_factory=list, description="Plain Python functions as tools, by import path "
                             "'package.module:function' (type hints and a Google-style docstring give the schema).")
    reward: str | None = Field(None, description="With tools: reward(row, final_text) -> float by import path.")
    max_turns: int = Field(4, ge=1, description="Assistant turns per episode at most (finish reason max_turns).")
    max_total_tokens: int = Field(2048, ge=16, description="Prompt + every turn and observation of an episode "
                                  "(the context); a longer trajectory is cut (finish reason context_overflow).")
    max_tokens_per_turn: int | None = Field(None, ge=1, description="Tokens one assistant turn may sample "
                                            "(None: rollout.max_new_tokens).")
    tool_output_max_tokens: int = Field(256, ge=1, description="A tool message's content is cut to this many "
                                        "tokens (marked '...[truncated]').")
    timeout_s: float = Field(30.0, gt=0, description="One reset/step call's time limit; a slower or raising "
                             "environment ends its episode (finish reason env_error), the run goes on.")
    concurrency: int = Field(16, ge=1, description="Environment calls running at once (threads).")

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.cls is None) == (not self.tools):
            raise ValueError("env: set exactly one of env.class (an environment class by import path) or env.tools "
                             "(a list of functions by import path)")
        if self.cls is not None and self.reward is not None:
            raise ValueError("env.reward is for env.tools; an env.class returns its rewards from step()")
        return self


def check_env_supported(cfg, *, cross_tokenizer: bool, columns: frozenset[str]) -> None:
    """Start-up refusal of what multi-turn rollouts (cfg.env) do not support yet, each with the fix."""
    from protege.config import teacher_configs
    from protege.teacher.privileged import uses_privileged

    if cfg.env is None:
        if cfg.mix.teacher_turns:
            raise ValueError("mix.teacher_turns (guided turns) needs multi-turn rollouts: set env (env.class or "
                             "env.tools), or mix.teacher_turns=0")
        return
    refuse = []
    if cross_tokenizer:
        refuse.append("a teacher with another tokenizer (teacher.cross_tokenizer): aligning segment by segment is "
                      "not built yet; use a teacher with the student's tokenizer")
    if cfg.mix.lmbda < 1:
        refuse.append(f"mix.lmbda={cfg.mix.lmbda} (dataset or teacher rows, mix.seq_kd): only student episodes are "
                      "multi-turn yet; set mix.lmbda=1")
    if cfg.loss.discount is not None:
        refuse.append("loss.discount (reward-to-go would run across tool outputs); unset it")
    if cfg.rollout.max_lag:
        refuse.append("rollout.max_lag > 0; set rollout.max_lag=0")
    if uses_privileged(cfg, columns) or any(t.system_prompt for t in teacher_configs(cfg)):
        refuse.append("a privileged teacher view (teacher.system_prompt, privileged_context/teacher_prompt columns):"
                      " the teacher would not see the episode's observations; remove them")
    if any(t.protocol in ("openai-chat", "openai-completions") for t in teacher_configs(cfg)):
        refuse.append("an API teacher (teacher.protocol=openai-chat|openai-completions) scores its own samples only")
    room = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens  # a vLLM engine's max_model_len
    if cfg.rollout.engine == "vllm" and cfg.env.max_total_tokens > room:
        refuse.append(f"rollout.engine=vllm with env.max_total_tokens={cfg.env.max_total_tokens} above the engine's "
                      f"context (data.max_prompt_tokens + rollout.max_new_tokens = {room}); raise "
                      "data.max_prompt_tokens or lower env.max_total_tokens")
    if cfg.mix.teacher_turns and (cfg.teacher is None or cfg.teacher.path is None or cross_tokenizer):
        refuse.append("mix.teacher_turns without an in-process teacher of the student's tokenizer (teacher.path): "
                      "guided turns are generated by the teacher model; set mix.teacher_turns=0")
    if refuse:
        raise ValueError("env (multi-turn rollouts) does not support " + "; nor ".join(refuse))


def check_env_sharded(cfg, sharded: bool) -> None:
    """An FSDP2 student generates in lockstep on every rank (one generate call per rank and buffer); episodes end
    after different numbers of turns on different ranks, so the calls would not match (a hang, as DeepSpeed #8262)."""
    if cfg.env is not None and sharded:
        raise ValueError("env (multi-turn rollouts) with an FSDP2 student is not supported yet: ranks would make "
                         "different numbers of generate calls and hang; use DDP (no fsdp in the accelerate config)")
