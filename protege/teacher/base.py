"""The one interface every teacher implements: score a whole buffer of rollouts at once."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
import torch

from protege.records import Rollouts, TeacherSignal


@dataclass
class ScoreRequest:
    """What the loss needs from the teacher (the trainer asks for exactly that, nothing more).

    topk:        return the teacher's own top-k ids and logprobs per position (0: don't).
    query_ids:   (N, T, M) ids at which to return teacher logprobs (e.g. the student's top-k), or None.
    hidden:      return final hidden states (with the teacher's output_weight: exact chunked full-vocabulary losses)
                 (in-process teachers, and protege teacher servers: RemoteTeacher sends them in teacher.hidden_dtype).
    temperature: teacher logprobs are log_softmax(logits / temperature).
    entropy:     return the teacher's entropy per position (health diagnostics).
    canonical:   a teacher with another tokenizer also aligns each student row on the student tokenizer's own
                 encoding of its text (the span estimator's baseline, protege.cross_objective.fill_span_baseline).
    """

    topk: int = 0
    query_ids: torch.Tensor | None = None
    hidden: bool = False
    temperature: float = 1.0
    entropy: bool = False
    canonical: bool = False


@dataclass(frozen=True)
class Capabilities:
    """What a teacher can do, declared by the teacher itself (the trainer and the builders ask this record,
    never the teacher's class or the config's shape).

    remote:              scores over the network (a protege server or an API), not in this process
    hidden:              answers ScoreRequest.hidden; has `output_weight` (V, H)
    cross_tokenizer:     its signal is mapped from another tokenizer onto the student's positions
    reads_rows:          score / generate read each row's data (Rollouts.examples: privileged, routed, API)
    generates:           `generator(...)` gives an engine that samples teacher rows (mix.seq_kd)
    stateful:            `state_dict()` / `load_state_dict()` carry state across checkpoints (an EMA)
    scores_student_rows: it scores any row (False: an API teacher knows only its own samples)
    identity:            JSON-able {kind, source, ... the view settings that change its signal}: kept in every
                         checkpoint, compared on resume (protege.run_state)"""

    remote: bool = False
    hidden: bool = True
    cross_tokenizer: bool = False
    reads_rows: bool = False
    generates: bool = False
    stateful: bool = False
    scores_student_rows: bool = True
    identity: dict = field(default_factory=dict)

    def but(self, **changes) -> Capabilities:
        """A copy with `changes` (a wrapper's record: its inner teacher's, with what the wrapper changes)."""
        return replace(self, **changes)


class Teacher:
    """What the trainer needs of any teacher (in-process, remote, and the kinds to come); a teacher subclasses it.

    vocab_size: the width of its logits (checked against the student's at build time), None for text only.
    capabilities: its Capabilities (what it can do and its identity).
    score(rollouts, request): one TeacherSignal for the whole buffer, aligned on the student's
        completion positions, holding exactly what `request` asks for. How the teacher sees a row
        (its own prompt or context, its own tokenizer) is its business; the alignment is not.
    A teacher that answers `request.hidden` also has `output_weight` (V, H), its output projection (an
    in-process teacher's on its own device; a RemoteTeacher's fetched once from the server and checked
    by its sha256), from which the loss rebuilds exact logits chunk by chunk.

    Hooks, no-ops here (a wrapper forwards each to the teacher it holds):
      after_step(student)      after every optimizer step (an EMA self-teacher updates its weights);
      state_dict() / load_state_dict(state)   plain tensors and values kept in every checkpoint under
                               "teacher" (the EMA), so that a resumed run continues exactly; load raises
                               ValueError when the state does not fit this teacher;
      step_metrics() -> dict   extra metrics of the last scored buffer, logged with the step's metrics
                               (the privileged teacher's leak signal), then cleared;
      prompt_view(prompt_ids, examples) -> (prompt_ids, examples)   the prompts it answers when it samples
                               (mix.seq_kd; a privileged teacher answers the prompt holding its context);
      generator(pad_id, batch_tokens, tokenizer) -> engine or None   what samples its rows (capabilities.generates);
      close()                  release connections."""

    vocab_size: int | None = None

    @classmethod
    def from_config(cls, cfg, *, teacher_model, pad_id: int, device, student, chunk_positions: int) -> Teacher:
        """A teacher kind of the user's own (teacher.kind=module:Class) builds itself from the run's config
        (cfg.teacher.options holds its own settings); protege's kinds are built by protege.build."""
        raise ValueError(f"teacher.kind: {cls.__module__}:{cls.__name__} has no from_config classmethod")

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(identity={"kind": type(self).__name__})

    def score(self, rollouts: Rollouts, request: ScoreRequest) -> TeacherSignal:
        raise NotImplementedError

    def after_step(self, student=None) -> None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def step_metrics(self) -> dict:
        return {}

    def prompt_view(self, prompt_ids: list, examples: list) -> tuple[list, list]:
        return prompt_ids, examples

    def generator(self, *, pad_id: int, batch_tokens: int, tokenizer=None):
        return None

    def close(self) -> None:
        return None


class Wrapper(Teacher):
    """A teacher around another (`inner`): every hook, the output projection and the record forwarded explicitly;
    a subclass overrides what it changes."""

    inner: Teacher

    @property
    def vocab_size(self) -> int | None:
        return self.inner.vocab_size

    @property
    def output_weight(self):
        return self.inner.output_weight

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def after_step(self, student=None) -> None:
        self.inner.after_step(student)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def step_metrics(self) -> dict:
        return self.inner.step_metrics()

    def prompt_view(self, prompt_ids: list, examples: list) -> tuple[list, list]:
        return self.inner.prompt_view(prompt_ids, examples)

    def generator(self, *, pad_id: int, batch_tokens: int, tokenizer=None):
        return self.inner.generator(pad_id=pad_id, batch_tokens=batch_tokens, tokenizer=tokenizer)

    def close(self) -> None:
        self.inner.close()
