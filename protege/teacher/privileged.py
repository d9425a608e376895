"""A teacher that sees more than the student: privileged context, its own last user turn, its own system prompt.

The student samples y ~ q(. | x) from its prompt x; the teacher scores the same tokens under its
own view x' of the row, and the loss compares p(. | x', y_<t) with q(. | x, y_<t) at every
completion position t (OPSD, SDFT, SDPO, context distillation). The teacher's view of a row
(protege.data.Example, carried per sequence in Rollouts.examples) is the student's chat messages with

    teacher_prompt column (data.teacher_prompt_column, a string or chat messages): replaces the last
        user turn (ms-swift's convention); when set it wins over the privileged context;
    else privileged_context column (data.privileged_context_column): the last user turn becomes
        data.privileged_template.format(prompt=<that turn's text>, privileged_context=<the context>)
        (TRL SDFT's convention, default "{prompt}\\n\\n{privileged_context}"); a list of chat messages
        as context is joined to text, one message per line, as TRL does;
    teacher.system_prompt: a system message only the teacher sees, joined in front of the row's own
        system message ("teacher system prompt\\n\\nrow system prompt") or inserted when there is none.

A row with neither column (or a null/empty value) falls back to the student's messages (plus
teacher.system_prompt): the teacher is then an ordinary teacher for that row. protege warns with
the count at start-up (check_data) and logs the share of rows with a privileged view per step
(`privileged_rows`); TRL's SDFT raises on a missing context instead. A dataset with neither column
at all while the config names one explicitly is an error before any model loads.

The view is rendered with the teacher's tokenizer and chat template (add_generation_prompt) and
has its own budget, data.max_teacher_prompt_tokens (None: no limit; longer prompts keep their last
tokens, counted in `teacher_prompts_truncated`); it is never cut to the student's
data.max_prompt_tokens (TRL #5862). Completion ids are passed through untouched: the inner teacher
receives `dataclasses.replace(rollouts, prompt_ids=teacher_prompts)`, so it scores exactly the
student's tokens, aligned on the student's completion positions.

When installed (build.build_teacher): teacher.system_prompt is set, or the training data has one of
the two columns, or the config sets one of data.privileged_context_column, data.teacher_prompt_column,
data.privileged_template, data.max_teacher_prompt_tokens. Otherwise the teacher sees the student's
prompt ids exactly as before (no wrapper).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from protege.config import Config, ConfigError
from protege.data import Example, PromptTokenizer
from protege.diagnostics import privileged_leak
from protege.records import Rollouts, TeacherSignal
from protege.teacher.base import Capabilities, ScoreRequest, Wrapper

log = logging.getLogger("protege")
DATA_KEYS = ("privileged_context_column", "teacher_prompt_column", "privileged_template", "max_teacher_prompt_tokens")


def asked_explicitly(cfg: Config) -> bool:
    """The config names a privileged setting itself (not by default)."""
    from protege.config import teacher_configs

    return any(t.system_prompt for t in teacher_configs(cfg)) or bool(set(DATA_KEYS) & cfg.data.model_fields_set)


def privileged_view(cfg: Config) -> dict:
    """The settings of the teacher's view that change its signal (its identity in checkpoints): the system
    prompt and the data keys that pick and render the privileged context."""
    return {"system_prompt": cfg.teacher.system_prompt, **{k: getattr(cfg.data, k) for k in DATA_KEYS}}


def uses_privileged(cfg: Config, columns: set[str] | frozenset[str] | None = None) -> bool:
    """Whether the teacher gets a privileged view: asked for in the config, or the data (its column names
    `columns`, None when unknown) has one of the two columns."""
    d = cfg.data
    return asked_explicitly(cfg) or bool(columns and {d.privileged_context_column, d.teacher_prompt_column} & columns)


def check_data(cfg: Config, examples: list[Example]) -> frozenset[str]:
    """Start-up check of the training rows (before any model loads); returns the columns the rows have.

    ConfigError: a column is named in the config but no row has it (the message lists the columns
    found), or a row's teacher_prompt is not a string or chat messages. Rows without a privileged
    view while others have one: a warning with their count (they fall back to the student's prompt)."""
    d = cfg.data
    seen = frozenset(k for ex in examples for k in ex.columns)
    if not uses_privileged(cfg, seen):
        return seen
    wanted = {d.privileged_context_column, d.teacher_prompt_column}
    named = {"privileged_context_column", "teacher_prompt_column"} & cfg.data.model_fields_set
    if named and not wanted & seen:
        raise ConfigError(f"data.privileged_context_column={d.privileged_context_column!r} and "
                          f"data.teacher_prompt_column={d.teacher_prompt_column!r}: no training row has either "
                          f"column; the rows' other columns are {sorted(seen)} (besides the prompt/messages/"
                          "completion). Set the key to the column that holds the teacher's context.")
    plain = sum(not teacher_messages(ex, cfg)[1] for ex in examples)
    if plain and (wanted & seen):
        log.warning("%d of %d training rows have no %r or %r value: the teacher sees the student's prompt for "
                    "them (plus teacher.system_prompt)", plain, len(examples), d.privileged_context_column,
                    d.teacher_prompt_column)
    return seen


def teacher_messages(ex: Example, cfg: Config) -> tuple[list[dict], bool]:
    """(the teacher's chat messages for row `ex`, whether a privileged column was used); see the module doc."""
    d = cfg.data
    msgs = [dict(m) for m in ex.messages]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
    tp, ctx = ex.columns.get(d.teacher_prompt_column), ex.columns.get(d.privileged_context_column)
    used = True
    if _present(tp):
        turns = _teacher_prompt_turns(tp, d.teacher_prompt_column, ex)
        msgs = msgs[:last] + turns + msgs[last + 1:] if last is not None else msgs + turns
    elif _present(ctx):
        prompt = msgs[last]["content"] if last is not None else ""
        turn = {"role": "user", "content": d.privileged_template.format(prompt=prompt,
                                                                         privileged_context=_context_text(ctx))}
        if last is None:
            msgs.append(turn)
        else:
            msgs[last] = turn
    else:
        used = False
    system = cfg.teacher.system_prompt
    if system:
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": f"{system}\n\n{msgs[0]['content']}"}
        else:
            msgs.insert(0, {"role": "system", "content": system})
    return msgs, used


def _present(value) -> bool:
    if value is None or (isinstance(value, float) and value != value):  # NaN: an empty CSV/parquet cell
        return False
    return bool(value.strip()) if isinstance(value, str) else bool(value)


def _teacher_prompt_turns(value, column: str, ex: Example) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    ok = isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                         and isinstance(m.get("content"), str) for m in value)
    if not ok:
        first = ex.messages[-1]["content"][:60] if ex.messages else ""
        raise ConfigError(f"data.teacher_prompt_column={column!r}: the row whose prompt starts {first!r} holds "
                          f"{type(value).__name__} {str(value)[:80]!r}; it must be a string or a list of "
                          '{"role": ..., "content": ...} messages')
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _context_text(value) -> str:
    """The privileged context as text: a string as is, chat messages joined one content per line (TRL)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return "\n".join(str(m.get("content", "")) for m in value if m.get("content"))
    return str(value)


class PrivilegedTeacher(Wrapper):
    """Wraps any teacher: renders each row's teacher prompt, then calls `inner.score` on the same completions.

    Its hooks and output projection are the inner teacher's (protege.teacher.base.Wrapper); its record adds
    reads_rows and the view settings that change the signal (system prompt, privileged columns)."""

    def __init__(self, inner, cfg: Config, tokenizer):
        self.inner, self.cfg = inner, cfg
        budget = cfg.data.max_teacher_prompt_tokens or (1 << 62)
        self.prompts = PromptTokenizer(tokenizer, budget)  # .truncated counts teacher prompts cut to the budget
        self._metrics: dict = {}

    @property
    def capabilities(self) -> Capabilities:
        inner = self.inner.capabilities
        view = {k: v for k, v in privileged_view(self.cfg).items() if v}
        return inner.but(reads_rows=True, identity={**inner.identity, **view})

    def teacher_prompt_ids(self, examples: list[Example]) -> tuple[list[torch.Tensor], list[bool]]:
        """Per row: the teacher's prompt ids and whether a privileged column was used (rows that share an
        Example, e.g. rollout.num_generations copies, are rendered once)."""
        done: dict[int, tuple[torch.Tensor, bool]] = {}
        for ex in examples:
            if id(ex) not in done:
                msgs, used = teacher_messages(ex, self.cfg)
                done[id(ex)] = (self.prompts.prompt_ids(Example(messages=msgs)), used)
        return [done[id(ex)][0] for ex in examples], [done[id(ex)][1] for ex in examples]

    def prompt_view(self, prompt_ids: list, examples: list[Example]) -> tuple[list[torch.Tensor], list[Example]]:
        """(prompt ids, rows) as this teacher sees them, for the teacher's own samples (mix.seq_kd): it answers
        the prompt that holds the privileged context; the student then learns that answer to its own prompt."""
        ids, _ = self.teacher_prompt_ids(examples)
        return ids, [Example(messages=teacher_messages(ex, self.cfg)[0], reference=ex.reference, columns=ex.columns)
                     for ex in examples]

    def score(self, rollouts: Rollouts, request: ScoreRequest) -> TeacherSignal:
        if rollouts.examples is None:
            raise ValueError("the privileged-context teacher needs each sequence's data row (Rollouts.examples); "
                             "this buffer has none: build it with Distiller.collect or set rollouts.examples")
        ids, used = self.teacher_prompt_ids(rollouts.examples)
        signal = self.inner.score(replace(rollouts, prompt_ids=ids), request)
        self._metrics = self._leak(rollouts, ids, used, signal)
        return signal

    def _leak(self, rollouts: Rollouts, ids: list[torch.Tensor], used: list[bool], signal: TeacherSignal) -> dict:
        student = torch.tensor([s == "student" for s in rollouts.sources]) if rollouts.sources \
            else torch.ones(len(rollouts), dtype=torch.bool)
        mask = rollouts.completion_mask & student[:, None]
        out = {"privileged_rows": sum(used) / max(1, len(used)),
               "teacher_prompt_len_mean": sum(len(x) for x in ids) / max(1, len(ids)),
               "teacher_prompts_truncated": self.prompts.truncated}
        if bool(mask.any()):
            out["privileged_leak"] = privileged_leak(rollouts.completion_ids, mask, signal.token_logprobs, ids,
                                                     rollouts.prompt_ids)
        return out

    def step_metrics(self) -> dict:
        """The last scored buffer's privileged-view metrics (then cleared), merged with the inner teacher's."""
        out, self._metrics = self._metrics, {}
        return {**self.inner.step_metrics(), **out}
