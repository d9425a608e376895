"""The `env:` section of a run's config (protege.agents): the environment (a class or tools) and the limits of
multi-turn rollouts."""

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
