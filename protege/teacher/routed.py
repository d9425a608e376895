"""Several named teachers: each row scored by the teacher its data column names (routed), or by all (mixture).

Routed (teachers_mode=routed): the rows whose `data.teacher_column` value is i go to teacher i, in ONE
batched `score` call per teacher per buffer on `rollouts.select(rows_i)`; each TeacherSignal is put
back at its rows, re-padded to the buffer's T. A row without a value goes to `data.default_teacher`.

Mixture (teachers_mode=mixture): every row is scored by every teacher and the signals are combined
with the normalised weights w_i = weight_i / sum_j weight_j into the log-linear (geometric) mixture

    log p_w(v) = sum_i w_i log p_i(v) - log Z,      Z = sum_v prod_i p_i(v)^w_i  <= 1 (Hoelder)

  * sampled-token signals (token_logprobs: loss.name=sampled_pg, loss.support=sampled, the metrics):
    sum_i w_i log p_i(y), so sampled_pg's advantage is exactly A = sum_i w_i (log p_i(y) - log q(y));
    the same sum at the student's top-k ids (query_logprobs, loss.support=student, remote teachers).
  * dense losses with in-process teachers: exactly the normalised p_w, because for logits z_i = h_i W_i^T
    log_softmax(sum_i w_i z_i / tau) = sum_i w_i log_softmax(z_i / tau) - log Z  (each log-sum-exp is a
    per-position constant). Reverse KL then is KL(q || p_w) = sum_i w_i KL(q || p_i) + log Z: the
    weighted sum of the per-teacher reverse KLs up to a term without student gradient, i.e. the same
    objective as the summed advantages above. Forward KL to p_w is NOT sum_i w_i KL(p_i || q); that sum
    equals KL(sum_i w_i p_i || q) + const (the arithmetic mixture). We use the geometric mixture for
    every loss: one target whatever the loss, the on-policy (reverse KL / sampled) objectives are exactly
    the weighted sums of per-teacher objectives, and it is rebuilt exactly from hidden states with one
    matmul. It puts mass where the teachers agree (a product of experts); teachers with disjoint
    favourites give a flat target, so domain experts are better routed than mixed (docs/teachers.md).

Hidden states of several teachers (exact full-vocabulary losses): row r's hidden state is the
concatenation [c_r1 h_1(r), ..., c_rk h_k(r)] (N, T, sum_i H_i) and `output_weight` is [W_1, ..., W_k]
(V, sum_i H_i), so h W^T = sum_i c_ri z_i(r): routed c = one-hot (each row gets ITS teacher's logits,
through its own lm_head, never another's), mixture c_ri = w_i. Cost: (N, T, sum_i H_i) hidden states
on the CPU and a sum_i H_i-wide teacher projection in the loss, instead of one teacher's H.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from protege.records import Rollouts, TeacherSignal
from protege.teacher.base import Capabilities, ScoreRequest, Teacher

ROUTED, MIXTURE = "routed", "mixture"


class RoutingError(ValueError):
    """A row names no teacher (or names none and there is no default): the message lists what is known."""


@dataclass
class RoutedSignal(TeacherSignal):
    """A TeacherSignal of several teachers, plus each teacher's own answer: parts[name] = (rows, signal)."""

    parts: dict = field(default_factory=dict)
    mode: str = ROUTED


def row_teacher(columns: dict, names: list[str], column: str, default: str | None, where: str) -> str:
    """The teacher of one row: its `column` value (a known name), else `default`; RoutingError otherwise."""
    key = columns.get(column)
    if key is None or key == "":
        if default is not None:
            return default
        found = sorted(columns) + ["prompt/messages"]
        raise RoutingError(f"{where} has no {column!r} value (columns found: {found}): add the column "
                           f"(data.teacher_column={column!r}) or set data.default_teacher to one of {names}")
    if str(key) not in names:
        raise RoutingError(f"{where}: {column}={key!r} names no teacher; known teachers: {names}. Fix the row, "
                           "add a teacher of that name to teachers, or rename data.teacher_column")
    return str(key)


def check_rows(examples, names: list[str], column: str, default: str | None, source: str) -> dict[str, int]:
    """Every row of a prompt set routed (RoutingError naming the first bad row); rows per teacher."""
    counts = dict.fromkeys(names, 0)
    for i, ex in enumerate(examples):
        counts[row_teacher(ex.columns, names, column, default, f"{source} row {i}")] += 1
    return counts


class RoutedTeacher(Teacher):
    """Several teachers behind the Teacher protocol (see the module docstring for both modes and the math).

    teachers: {name: Teacher}, in config order; weights: {name: weight} (mixture; normalised here);
    device: where the concatenated output projection lives (the training device)."""

    def __init__(self, teachers: dict[str, Teacher], *, mode: str = ROUTED, weights: dict[str, float] | None = None,
                 column: str = "teacher", default: str | None = None, device="cpu"):
        if mode not in (ROUTED, MIXTURE):
            raise ValueError(f"teachers_mode must be {ROUTED!r} or {MIXTURE!r}, got {mode!r}")
        self.teachers, self.names, self.mode = dict(teachers), list(teachers), mode
        raw = [float((weights or {}).get(n, 1.0)) for n in self.names]
        self.weights = {n: w / sum(raw) for n, w in zip(self.names, raw)}  # sum to 1
        self.column, self.default, self.device = column, default, torch.device(device)
        vocab = {n: t.vocab_size for n, t in self.teachers.items()}
        if len(set(vocab.values())) > 1:
            raise ValueError(f"the teachers' vocabularies differ ({vocab}): protege needs one shared tokenizer")
        self.vocab_size = next(iter(vocab.values()))

    # ------------------------------------------------------------------------- the members' hooks
    @property
    def capabilities(self) -> Capabilities:
        """From the members': remote or hidden-less if any is; reads the rows when routed (each names its teacher);
        never samples (mix.seq_kd is refused with teachers:). identity: the mode and each member's in config order."""
        caps = {n: t.capabilities for n, t in self.teachers.items()}
        members = [{"name": n, "weight": self.weights[n], **c.identity} for n, c in caps.items()]
        return Capabilities(remote=any(c.remote for c in caps.values()), hidden=all(c.hidden for c in caps.values()),
                            reads_rows=self.mode == ROUTED or any(c.reads_rows for c in caps.values()),
                            stateful=any(c.stateful for c in caps.values()),
                            scores_student_rows=all(c.scores_student_rows for c in caps.values()),
                            identity={"kind": self.mode, "teachers": members})

    def after_step(self, student=None) -> None:
        """Every member's after_step (an EMA self teacher among them follows the new weights)."""
        for teacher in self.teachers.values():
            teacher.after_step(student)

    def step_metrics(self) -> dict:
        """The members' step metrics (e.g. a privileged teacher's privileged_leak) as teacher/<name>/<key>."""
        return {f"teacher/{n}/{k}": v for n, t in self.teachers.items()
                for k, v in t.step_metrics().items()}

    def state_dict(self) -> dict:
        """{name: state} of the members that keep state (an EMA self teacher's weights) for the checkpoint."""
        return {n: st for n, t in self.teachers.items() if t.capabilities.stateful and (st := t.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        """Each stateful member from `state_dict()`'s entry of its name; a missing entry is an error."""
        for n, t in self.teachers.items():
            if t.capabilities.stateful:
                if n not in state:
                    raise ValueError(f"the checkpoint holds no state for teacher {n!r} (e.g. its EMA weights): it "
                                     "was written by another teacher set or an older protege; start a new output.dir")
                t.load_state_dict(state[n])

    # ------------------------------------------------------------------------- routing
    def groups(self, rollouts: Rollouts) -> dict[str, list[int]]:
        """{name: the buffer rows it scores}: every row for every teacher in mixture mode."""
        if self.mode == MIXTURE:
            return {n: list(range(len(rollouts))) for n in self.names}
        if rollouts.examples is None:
            raise RoutingError("routed teachers need each row's data row (Rollouts.examples) to find its teacher")
        out = {n: [] for n in self.names}
        for r, ex in enumerate(rollouts.examples):
            out[row_teacher(ex.columns, self.names, self.column, self.default, f"buffer row {r}")].append(r)
        return out

    # ------------------------------------------------------------------------- scoring
    def score(self, rollouts: Rollouts, request: ScoreRequest) -> RoutedSignal:
        """One score call per teacher on its rows; the signals scattered back (routed) or combined (mixture)."""
        parts = {}
        for name, rows in self.groups(rollouts).items():
            if rows:
                sub = rollouts.select(rows)
                query = request.query_ids
                sub_request = replace(request, query_ids=None if query is None else
                                      query[torch.as_tensor(rows)][:, : sub.completion_ids.shape[1]])
                parts[name] = (rows, self.teachers[name].score(sub, sub_request))
        n, t = rollouts.completion_ids.shape
        fields = self._scatter(parts, n, t) if self.mode == ROUTED else self._combine(parts, n, t)
        return RoutedSignal(**fields, parts=parts, mode=self.mode)

    def _scatter(self, parts: dict, n: int, t: int) -> dict:
        """Routed: each teacher's values at its rows, zero-padded to (N, T, ...); hidden states in its block."""
        out = {}
        for key in ("token_logprobs", "topk_ids", "topk_logprobs", "query_logprobs", "entropy"):
            values = [(rows, getattr(sig, key)) for rows, sig in parts.values()]
            if any(v is None for _, v in values):
                continue  # a teacher that did not send it (e.g. a server's entropy): left out for all
            width = min(v.shape[2] for _, v in values) if values[0][1].dim() == 3 else None  # top-k: the shortest
            first = values[0][1]
            shape = (n, t) if width is None else (n, t, width)
            full = torch.zeros(shape, dtype=first.dtype)
            for rows, v in values:
                full[torch.as_tensor(rows), : v.shape[1]] = v if width is None else v[..., :width].to(full.dtype)
            out[key] = full
        out["hidden_states"] = self._hidden(parts, n, t, {name: 1.0 for name in parts})
        return out

    def _combine(self, parts: dict, n: int, t: int) -> dict:
        """Mixture: sum_i w_i of each teacher's token / query logprobs, w_i-scaled hidden blocks (module docstring)."""
        out = {"token_logprobs": self._weighted(parts, "token_logprobs", n, t)}
        if all(sig.query_logprobs is not None for _, sig in parts.values()):
            out["query_logprobs"] = self._weighted(parts, "query_logprobs", n, t)
        out["hidden_states"] = self._hidden(parts, n, t, self.weights)
        return out  # the teachers' own top-k and entropy stay in parts (per-teacher metrics), not combined

    def _weighted(self, parts: dict, key: str, n: int, t: int) -> torch.Tensor:
        first = getattr(next(iter(parts.values()))[1], key)
        total = torch.zeros((n, t, *first.shape[2:]), dtype=torch.float32)  # (N, T) or (N, T, M)
        for name, (_, sig) in parts.items():
            v = getattr(sig, key).float()
            total[:, : v.shape[1]] += self.weights[name] * v
        return total

    def _hidden(self, parts: dict, n: int, t: int, scale: dict[str, float]) -> torch.Tensor | None:
        """(N, T, sum_i H_i): teacher i's hidden states (times scale[i]) in columns offsets[i]:offsets[i]+H_i."""
        if not parts or any(sig.hidden_states is None for _, sig in parts.values()):
            return None
        widths = self.hidden_widths()
        dtype = self._common_dtype([sig.hidden_states.dtype for _, sig in parts.values()], scale)
        out = torch.zeros((n, t, sum(widths.values())), dtype=dtype)
        start = 0
        for name, width in widths.items():
            if name in parts:
                rows, sig = parts[name]
                h = sig.hidden_states  # (n_i, t_i, H_i)
                block = (h.float() * scale[name]).to(dtype) if scale[name] != 1.0 else h.to(dtype)
                out[torch.as_tensor(rows), : h.shape[1], start: start + width] = block
            start += width
        return out

    @staticmethod
    def _common_dtype(dtypes: list, scale: dict[str, float]) -> torch.dtype:
        same = len(set(dtypes)) == 1 and all(s == 1.0 for s in scale.values())
        return dtypes[0] if same else torch.float32

    # ------------------------------------------------------------------------- exact logits
    def hidden_widths(self) -> dict[str, int]:
        """{name: H_i}, the hidden size of each in-process teacher (its block of the concatenated hidden states)."""
        return {n: self._weight_of(n).shape[1] for n in self.names}

    def _weight_of(self, name: str) -> torch.Tensor:
        teacher = self.teachers[name]
        if not hasattr(teacher, "output_weight"):
            raise ValueError(f"teacher {name!r} runs behind a server: it sends no hidden states, so exact "
                             "full-vocabulary losses need every teacher in process (or loss.support != full)")
        return teacher.output_weight

    @property
    def output_weight(self) -> torch.Tensor:
        """(V, sum_i H_i) the teachers' output projections side by side, on `device` (read fresh each time:
        a teacher whose weights change, e.g. an EMA of the student, is never stale)."""
        ws = [self._weight_of(n) for n in self.names]
        dtype = ws[0].dtype if len({w.dtype for w in ws}) == 1 else torch.float32
        return torch.cat([w.detach().to(self.device, dtype) for w in ws], dim=1)
