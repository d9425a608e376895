"""Multi-turn rollouts, batched over rows, on any rollout engine (engine.generate(prompt_ids, sampling) -> Rollouts).

    prompts = chat template of (row messages + env.reset(row)) with the assistant header
    repeat up to max_turns:
        ONE engine.generate call over every active episode (each samples its next assistant turn)
        the environments of all those episodes step concurrently (EnvCalls: a per-call time limit)
        each observation is appended by token ids (protege.agents.template.observation_ids)

One Rollouts row per episode: completion_ids = every id after the initial prompt (the student's turns,
each with its end-of-turn id, and the observation / template ids between them); loss_mask True only on
ids the student sampled (loss.turns=last: only on its last turn); sampling_logprobs 0 elsewhere. The
teacher and the student read every id; the loss counts the loss mask (Rollouts.train_mask).

Finish reasons, per turn and per episode (the episode's is its last turn's): stop (the turn ended with an
end-of-turn id), length (a turn hit max_tokens_per_turn without one: the episode ends), env_done (the
environment ended it), max_turns, tool_error (a turn whose tool calls failed; the episode goes on),
env_error (the environment raised or timed out: counted, warned), context_overflow (the next turn or
observation would pass max_total_tokens).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from protege.agents.calls import EnvCalls
from protege.agents.env import StepResult, make_env_factory
from protege.agents.template import check_prefix_template, observation_ids, render
from protege.records import Rollouts

log = logging.getLogger("protege")
TRUNCATED = " ...[truncated]"


@dataclass
class Episode:
    """One row's trajectory while it is rolled out: ids after the prompt, which the student sampled, and counts."""

    env: object
    messages: list[dict]
    tools: list[dict] | None
    prompt_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # every id after the prompt
    sampled: list[bool] = field(default_factory=list)  # per id: the student sampled it
    logprobs: list[float] = field(default_factory=list)  # per id: its sampling logprob (0 if not sampled)
    turn_of: list[int] = field(default_factory=list)  # per id: the turn it belongs to or follows
    topk: list[tuple] = field(default_factory=list)  # per id: (top-k ids, top-k logprobs, entropy) when recorded
    rewards: list[float] = field(default_factory=list)
    turn_finish: list[str] = field(default_factory=list)
    finish: str | None = None
    tool_calls: int = 0
    invalid_calls: int = 0
    tool_errors: int = 0
    truncated_outputs: int = 0
    error: str | None = None

    @property
    def active(self) -> bool:
        return self.finish is None

    def end(self, reason: str) -> None:
        self.finish = reason
        if self.turn_finish:
            self.turn_finish[-1] = reason if self.turn_finish[-1] in ("stop", "tool_error") else self.turn_finish[-1]

    def summary(self) -> dict:
        return {"turns": len(self.turn_finish), "rewards": list(self.rewards), "reward": sum(self.rewards),
                "finish": self.finish, "turn_finish": list(self.turn_finish), "tool_calls": self.tool_calls,
                "invalid_calls": self.invalid_calls, "tool_errors": self.tool_errors,
                "truncated_outputs": self.truncated_outputs, "error": self.error}


class AgentRollouts:
    """Multi-turn rollouts of one run: the environment factory, the limits, the thread pool, the counters.

    env_cfg: protege.agents.config.EnvConfig; turns: loss.turns ("all" or "last")."""

    def __init__(self, env_cfg, tokenizer, eos_ids, *, turns: str = "all"):
        self.cfg, self.tok, self.eos_ids, self.turns = env_cfg, tokenizer, tuple(eos_ids), turns
        self.make_env = make_env_factory(env_cfg)
        self.calls = EnvCalls(env_cfg.concurrency, env_cfg.timeout_s)
        self.env_errors = 0

    def rollout(self, engine, examples: list, sampling, *, source: str = "student") -> Rollouts:
        """One episode per example (repeat an example for several generations), all rolled out together."""
        episodes = self._reset(examples)
        per_turn = self.cfg.max_tokens_per_turn or sampling.max_new_tokens
        for turn in range(self.cfg.max_turns):
            active = [e for e in episodes if e.active]
            budgets = [min(per_turn, self.cfg.max_total_tokens - len(e.prompt_ids) - len(e.ids)) for e in active]
            for e, b in zip(active, budgets):
                if b <= 0:
                    e.end("context_overflow")
            active, budgets = [e for e in active if e.active], [b for b in budgets if b > 0]
            if not active:
                break
            out = engine.generate([torch.tensor(e.prompt_ids + e.ids) for e in active],
                                  replace(sampling, max_new_tokens=max(budgets)), source=source)
            for row, (e, b) in enumerate(zip(active, budgets)):
                self._add_turn(e, out, row, b, turn, per_turn)
            stepping = [e for e in active if e.active]
            for e, result in zip(stepping, self.calls.run([_step_call(e) for e in stepping])):
                self._observe(e, result, last_turn=turn == self.cfg.max_turns - 1)
        return self._records(examples, episodes, source, sampling.record_topk)

    def _reset(self, examples: list) -> list[Episode]:
        episodes = []
        for ex in examples:
            env = self.make_env()
            episodes.append(Episode(env, [dict(m) for m in ex.messages], getattr(env, "tools", None)))
        rows = [{"messages": [dict(m) for m in ex.messages], **ex.columns} for ex in examples]
        results = self.calls.run([(lambda e=e, r=r: e.env.reset(r)) for e, r in zip(episodes, rows)])
        for e, (ok, value) in zip(episodes, results):
            if ok:
                e.messages += list(value or [])
            check_prefix_template(self.tok, self.eos_ids, e.tools)
            e.prompt_ids = render(self.tok, e.messages, e.tools, add_generation_prompt=True)
            if not ok:
                self._env_error(e, value, "reset")
            elif len(e.prompt_ids) >= self.cfg.max_total_tokens:
                e.end("context_overflow")
        return episodes

    def _add_turn(self, e: Episode, out: Rollouts, row: int, budget: int, turn: int, per_turn: int) -> None:
        """Append the student's sampled turn `row` of `out` (cut to `budget` ids) to episode `e`; a turn cut by the
        context budget (budget < per_turn) ends the episode with context_overflow, one cut by per_turn with length."""
        n = int(out.completion_mask[row].sum())
        ids = out.completion_ids[row, :n].tolist()
        reason = out.finish_reasons[row]
        if n > budget:
            ids, n, reason = ids[:budget], budget, "length"
        if reason == "length" and budget < per_turn:
            reason = "context_overflow"
        e.ids += ids
        e.sampled += [True] * n
        e.logprobs += out.sampling_logprobs[row, :n].tolist()
        e.turn_of += [turn] * n
        if out.student_topk_ids is not None:
            e.topk += [(out.student_topk_ids[row, t], out.student_topk_logprobs[row, t], out.student_entropy[row, t])
                       for t in range(n)]
        text_ids = ids[:-1] if reason == "stop" else ids
        e.messages.append({"role": "assistant", "content": self.tok.decode(text_ids, skip_special_tokens=False)})
        e.turn_finish.append(reason)
        if reason != "stop":  # a turn without its end-of-turn id cannot be followed by an observation
            e.end(reason)

    def _observe(self, e: Episode, result: tuple[bool, object], *, last_turn: bool) -> None:
        ok, value = result
        if not ok or not isinstance(value, StepResult):
            self._env_error(e, value if not ok else TypeError(f"step() returned {type(value).__name__}, "
                                                              "not a StepResult"), "step")
            return
        e.rewards.append(float(value.reward))
        info = value.info or {}
        e.tool_calls += int(info.get("tool_calls", 0))
        e.invalid_calls += int(info.get("invalid_calls", 0))
        e.tool_errors += int(info.get("tool_errors", 0))
        if info.get("tool_errors"):
            e.turn_finish[-1] = "tool_error"
        if value.done:
            return e.end("env_done")
        if last_turn:
            return e.end("max_turns")
        obs = self._truncate_outputs(e, list(value.messages))
        ids = observation_ids(self.tok, e.messages, obs, e.tools, self.eos_ids)
        if len(e.prompt_ids) + len(e.ids) + len(ids) >= self.cfg.max_total_tokens:
            return e.end("context_overflow")
        e.messages += obs
        turn = e.turn_of[-1]
        e.ids += ids
        e.sampled += [False] * len(ids)
        e.logprobs += [0.0] * len(ids)
        e.turn_of += [turn] * len(ids)
        e.topk += [None] * len(ids)

    def _truncate_outputs(self, e: Episode, messages: list[dict]) -> list[dict]:
        """Tool messages cut to env.tool_output_max_tokens tokens of content (counted)."""
        limit, out = self.cfg.tool_output_max_tokens, []
        for m in messages:
            if m.get("role") == "tool" and isinstance(m.get("content"), str):
                ids = self.tok(m["content"], add_special_tokens=False)["input_ids"]
                if len(ids) > limit:
                    m = {**m, "content": self.tok.decode(ids[:limit]) + TRUNCATED}
                    e.truncated_outputs += 1
            out.append(m)
        return out

    def _env_error(self, e: Episode, error, where: str) -> None:
        self.env_errors += 1
        e.error = f"{where}: {type(error).__name__}: {error}"
        log.warning("environment %s failed (%s); the episode ends with env_error, the run goes on "
                    "(%d environment errors so far)", where, e.error, self.env_errors)
        if e.turn_finish:
            e.turn_finish[-1] = "env_error"
        e.finish = "env_error"

    def _records(self, examples: list, episodes: list[Episode], source: str, record_topk: int) -> Rollouts:
        return episode_records(examples, episodes, source, record_topk, last_turn_only=self.turns == "last")

    def close(self) -> None:
        self.calls.close()


def _step_call(e: Episode):
    text = e.messages[-1]["content"]
    return lambda: e.env.step(text)


def episode_records(examples: list, episodes: list[Episode], source: str, record_topk: int, *,
                    last_turn_only: bool = False) -> Rollouts:
    """One Rollouts row per episode, with loss_mask (sampled ids; last_turn_only: of the last turn), turn_index
    and the episodes' summaries."""
    comps = [torch.tensor(e.ids, dtype=torch.long) for e in episodes]
    lps = [torch.tensor(e.logprobs, dtype=torch.float32) for e in episodes]
    kw = {}
    if record_topk:
        kw = dict(zip(("topk_ids", "topk_logprobs", "entropies"), zip(*[_topk_rows(e, record_topk) for e in episodes])))
        kw = {k: list(v) for k, v in kw.items()} if episodes else {}
    out = Rollouts.from_samples([torch.tensor(e.prompt_ids, dtype=torch.long) for e in episodes], comps, lps,
                                [e.finish or "max_turns" for e in episodes], source, **kw)
    n, t = out.completion_ids.shape
    out.loss_mask = torch.zeros((n, t), dtype=torch.bool)  # (N, T)
    out.turn_index = torch.full((n, t), -1, dtype=torch.long)  # (N, T)
    for i, e in enumerate(episodes):
        sampled = torch.tensor(e.sampled, dtype=torch.bool)
        turn_of = torch.tensor(e.turn_of, dtype=torch.long)
        if last_turn_only and len(turn_of):
            sampled &= turn_of == int(turn_of[sampled].max()) if sampled.any() else sampled
        out.loss_mask[i, : len(e.ids)] = sampled
        out.turn_index[i, : len(e.ids)] = turn_of
    out.examples = list(examples)
    out.episodes = [e.summary() for e in episodes]
    return out


def _topk_rows(e: Episode, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, k) ids, (t, k) logprobs, (t,) entropy of one episode; an observation id is its own top-1 (logprob 0)."""
    ids = torch.zeros((len(e.ids), k), dtype=torch.long)
    lps = torch.full((len(e.ids), k), float("-inf"))
    ent = torch.zeros(len(e.ids))
    for j, (tok_id, entry) in enumerate(zip(e.ids, e.topk)):
        if entry is None:
            ids[j, 0], lps[j, 0] = tok_id, 0.0
        else:
            ids[j], lps[j], ent[j] = entry[0][:k], entry[1][:k], entry[2]
    return ids, lps, ent
