"""The environment protocol of multi-turn rollouts, the `ToolEnv` adapter for plain Python tools, and loading by path.

    env.reset(row)             -> list[message]   the first observation, appended to the row's own messages
    env.step(assistant_text)   -> StepResult(messages, reward, done, info)

`row` is the data row: {"messages": the prompt messages, **the row's other columns}; per-row arguments
(a maze's seed, a task's answer) come from its columns. An environment may have `tools`, a list of
JSON schemas the chat template renders (`apply_chat_template(..., tools=env.tools)`).
One environment object serves one episode (a row's generation); `make_env_factory` builds them.

ToolEnv wraps callables: their JSON schemas come from type hints and docstrings
(`transformers.utils.get_json_schema`, as transformers' chat templates use); each step parses the
tool calls of the assistant turn (protege.agents.parse), runs them and answers one
{"role": "tool", "name": ..., "content": ...} message per call. A turn without a call ends the
episode (the final answer). A tool that raises, an unknown tool, bad arguments or a malformed call
become a tool message starting with "error:" sent back to the student, counted in info["tool_errors"].
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from protege.agents.parse import parse_tool_calls


@dataclass
class StepResult:
    """What the environment answers to one assistant turn."""

    messages: list[dict] = field(default_factory=list)  # the observation: tool / user messages, maybe none
    reward: float = 0.0
    done: bool = False
    info: dict = field(default_factory=dict)  # tool_calls, invalid_calls, tool_errors (counts), anything else


class Environment(Protocol):
    def reset(self, row: dict) -> list[dict]:
        ...

    def step(self, assistant_text: str) -> StepResult:
        ...


def tool_schema(fn: Callable) -> dict:
    """The JSON schema of a tool (transformers' get_json_schema); a function without a usable one is an error
    naming it and the fix."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as e:  # DocstringParsingException, TypeHintParsingException, ...
        name = getattr(fn, "__qualname__", repr(fn))
        raise ValueError(f"tool {name}: no usable JSON schema ({e}). Give it type hints on every argument and a "
                         "Google-style docstring with an 'Args:' entry per argument (as transformers' "
                         "get_json_schema reads them)") from None


class ToolEnv:
    """An environment of plain Python tools: one ToolEnv per episode, the tools and their schemas shared.

    reward_fn(row, final_text) -> float, optional: the reward of the final answer (0 otherwise)."""

    def __init__(self, tools: list[Callable], reward_fn: Callable[[dict, str], float] | None = None,
                 schemas: list[dict] | None = None):
        self.functions = {f.__name__: f for f in tools}
        self.tools = schemas if schemas is not None else [tool_schema(f) for f in tools]
        self.reward_fn = reward_fn
        self.row: dict = {}

    def reset(self, row: dict) -> list[dict]:
        self.row = row
        return []  # the row's own messages are the task

    def step(self, assistant_text: str) -> StepResult:
        calls = parse_tool_calls(assistant_text)
        if not calls:  # no call: the final answer
            reward = float(self.reward_fn(self.row, assistant_text)) if self.reward_fn else 0.0
            return StepResult([], reward, True, {"tool_calls": 0, "invalid_calls": 0, "tool_errors": 0})
        messages, invalid, errors = [], 0, 0
        for call in calls:
            content, valid = self._run(call)
            invalid += not valid
            errors += content.startswith("error:")
            messages.append({"role": "tool", "name": call.name or "unknown", "content": content})
        return StepResult(messages, 0.0, False, {"tool_calls": len(calls), "invalid_calls": invalid,
                                                 "tool_errors": errors})

    def _run(self, call) -> tuple[str, bool]:
        """One call's answer text and whether the call itself was valid (a known tool, arguments that bind);
        every failure is an "error: ..." text, never an exception."""
        if call.error is not None:
            return f"error: {call.error}", False
        fn = self.functions.get(call.name)
        if fn is None:
            return f"error: unknown tool {call.name!r}; the tools are {sorted(self.functions)}", False
        try:
            inspect.signature(fn).bind(**call.arguments)
        except TypeError as e:
            return f"error: bad arguments for {call.name}: {e}", False
        try:
            return str(fn(**call.arguments)), True
        except Exception as e:  # the tool's own failure goes back to the student (a valid call that failed)
            return f"error: {call.name} raised {type(e).__name__}: {e}", True


def import_object(path: str, field_name: str) -> Any:
    """`package.module:Name` (or `package.module.Name`) imported (the working directory is searched last); a failure
    is one error naming the path and the fix."""
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    if not module or not name:
        raise ValueError(f"{field_name}={path!r} is not an import path: write it as 'package.module:Name'")
    if os.getcwd() not in sys.path and "" not in sys.path:  # a user's module next to the config, as `python -m` finds
        sys.path.append(os.getcwd())
    try:
        obj = importlib.import_module(module)
    except Exception as e:
        raise ValueError(f"{field_name}={path!r}: cannot import module {module!r} ({type(e).__name__}: {e}). Install "
                         "the package or put its folder on PYTHONPATH, and check the spelling") from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{field_name}={path!r}: module {module!r} has no {name!r}; names there: "
                             f"{sorted(n for n in dir(obj) if not n.startswith('_'))[:20]}")
        obj = getattr(obj, part)
    return obj


def make_env_factory(env_cfg) -> Callable[[], Environment]:
    """A function that makes one fresh environment per episode from an EnvConfig (protege.config.env):
    env_cfg.cls(**env_cfg.args), or a ToolEnv of env_cfg.tools (and env_cfg.reward). Imports happen here, at
    start-up, so a bad path or a tool without a schema fails before any model loads."""
    if env_cfg.cls is not None:
        cls = import_object(env_cfg.cls, "env.class")
        if not callable(cls):
            raise ValueError(f"env.class={env_cfg.cls!r} is a {type(cls).__name__}, not a class or factory")
        for method in ("reset", "step"):
            if isinstance(cls, type) and not callable(getattr(cls, method, None)):
                raise ValueError(f"env.class={env_cfg.cls!r} has no {method}() method: an environment needs "
                                 "reset(row) -> messages and step(assistant_text) -> StepResult")
        args = dict(env_cfg.args)
        return lambda: cls(**args)
    tools = [import_object(p, f"env.tools[{i}]") for i, p in enumerate(env_cfg.tools)]
    schemas = [tool_schema(f) for f in tools]  # checked once, shared by every episode
    reward = import_object(env_cfg.reward, "env.reward") if env_cfg.reward else None
    return lambda: ToolEnv(tools, reward, schemas)
