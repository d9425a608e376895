"""Real tools and environments for the agents tests: a calculator that computes, environments that raise, hang,
or pose a task in their first observation (importable by path: tests.agent_envs / agent_envs)."""

from __future__ import annotations

import ast
import operator
import time

from protege.agents.env import StepResult

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / and parentheses.

    Args:
        expression: the expression, e.g. "12*(3+4)"
    """

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported expression {expression!r}")

    value = ev(ast.parse(expression, mode="eval").body)
    return str(int(value) if float(value).is_integer() else value)


def no_docstring(x: int) -> int:
    return x


def exact_answer(row: dict, text: str) -> float:
    """Reward 1 when the final answer contains the row's `answer` column."""
    return float(str(row.get("answer")) in text)


class TaskEnv:
    """The task is in the first observation (reset), as in TRL #6067; every turn is answered with 'continue'
    until `turns` turns, then done with reward 1."""

    def __init__(self, turns: int = 3):
        self.turns, self.seen = turns, 0

    def reset(self, row: dict) -> list[dict]:
        return [{"role": "user", "content": f"Task {row.get('task', 'none')}: count to three."}]

    def step(self, text: str) -> StepResult:
        self.seen += 1
        if self.seen >= self.turns:
            return StepResult([], 1.0, True)
        return StepResult([{"role": "user", "content": "continue"}], 0.0, False)


class RaisingEnv(TaskEnv):
    def step(self, text: str) -> StepResult:
        raise RuntimeError("the environment broke")


class HangingEnv(TaskEnv):
    def __init__(self, turns: int = 3, sleep_s: float = 1.5):
        super().__init__(turns)
        self.sleep_s = sleep_s

    def step(self, text: str) -> StepResult:
        time.sleep(self.sleep_s)
        return super().step(text)


class BrokenResetEnv(TaskEnv):
    def reset(self, row: dict) -> list[dict]:
        if row.get("task") == 1:
            raise KeyError("no such maze")
        return super().reset(row)
