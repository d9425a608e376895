"""OPD health signals: top-k overlap, entropy gap, sequence statistics, and a monitor that warns.

Pure functions of tensors and a completion mask; each returns per-batch float means (seed 003,
REFERENCE.md section 6; verl logs the same names). At a student-visited position t with
q = student distribution, p = teacher distribution, S = student top-k ids, T = teacher top-k ids:

    overlap_ratio            |S ∩ T| / k                      rises when OPD works
    student_overlap_mass     sum_{v in S∩T} q(v)               ~0.97-0.99 when aligned
    teacher_overlap_mass     sum_{v in S∩T} p(v)               ~0.97-0.99 when aligned
    overlap_token_advantage  mean_{v in S∩T} [log p(v) - log q(v)]   tends to 0
    entropy_gap              H(q) - H(p)                       small when aligned; strongly
                                                               negative = student collapsing

Sequence statistics (length, truncation, EOS, repetition, distinct-n) catch the failure modes of
seed 001 and StableOPD: length inflation, repetition collapse and truncation collapse.
HealthMonitor turns these numbers into one warning per kind of trouble.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch


# --------------------------------------------------------------------------- top-k overlap
def overlap_metrics(
    student_topk_ids: torch.Tensor,
    student_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, float]:
    """Overlap of the student's and the teacher's top-k at the masked positions.

    student_topk_ids, student_topk_logprobs: (B, T, k_s) ids and log q of the student's top-k.
    teacher_topk_ids, teacher_topk_logprobs: (B, T, k_t) ids and log p of the teacher's top-k.
    mask: (B, T) bool, True at completion tokens.
    Ids are assumed distinct within each list; entries with a -inf logprob are padding and never
    count as shared. overlap_ratio divides by k = min(k_s, k_t). Ratio and masses are means over
    masked positions; overlap_token_advantage is the mean over every shared (position, id) pair
    of the batch, NaN when no id is shared anywhere. Since a shared id is in both lists, both
    log p and log q at it are known; no third lookup is needed.
    """
    mask = mask.bool()
    k = min(student_topk_ids.shape[-1], teacher_topk_ids.shape[-1])
    s_lp, t_lp = student_topk_logprobs.float(), teacher_topk_logprobs.float()
    match = student_topk_ids.unsqueeze(-1) == teacher_topk_ids.unsqueeze(-2)  # (B, T, k_s, k_t)
    match &= torch.isfinite(s_lp).unsqueeze(-1) & torch.isfinite(t_lp).unsqueeze(-2)
    in_teacher = match.any(-1)  # (B, T, k_s): student entry is also a teacher entry
    in_student = match.any(-2)  # (B, T, k_t): teacher entry is also a student entry
    # log p at each shared student entry: gather the matching teacher logprob (0 where no match)
    t_lp_at_s = torch.where(match, t_lp.unsqueeze(-2), torch.zeros_like(t_lp).unsqueeze(-2)).sum(-1)  # (B, T, k_s)

    zero = torch.zeros_like(s_lp)
    overlap_ratio = in_teacher.sum(-1).float() / k  # (B, T)
    student_mass = torch.where(in_teacher, s_lp.exp(), zero).sum(-1)  # (B, T)
    teacher_mass = torch.where(in_student, t_lp.exp(), torch.zeros_like(t_lp)).sum(-1)  # (B, T)
    shared = in_teacher & mask.unsqueeze(-1)  # (B, T, k_s)
    num_shared = int(shared.sum())
    advantage = torch.where(shared, t_lp_at_s - s_lp, zero).sum()  # log p - log q over shared ids
    return {
        "overlap_ratio": masked_mean(overlap_ratio, mask),
        "student_overlap_mass": masked_mean(student_mass, mask),
        "teacher_overlap_mass": masked_mean(teacher_mass, mask),
        "overlap_token_advantage": float(advantage) / num_shared if num_shared else math.nan,
    }


# --------------------------------------------------------------------------- entropy
def entropy_from_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """(...,) entropy -sum p log p of normalised logprobs (..., V); -inf entries (p = 0) add exactly 0."""
    return -(logprobs.exp() * logprobs.clamp_min(-1e30)).sum(-1)


def sampled_rkl(sampling_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Per-token reverse KL estimated on the student's own samples: mean of log q(y) - log p(y) over `mask`
    (unbiased for KL(q||p) when the rows were sampled from q)."""
    return float((sampling_logprobs - teacher_logprobs)[mask].mean())


def truncation_rate(finish_reasons: Sequence[str]) -> float:
    """Share of rows that hit max_new_tokens (finish reason "length"); 0 for no rows."""
    return sum(r == "length" for r in finish_reasons) / max(1, len(finish_reasons))


def entropy_gap(student_entropy: torch.Tensor, teacher_entropy: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over masked positions of H(q) - H(p); negative means the student is more peaked."""
    return masked_mean(student_entropy.float() - teacher_entropy.float(), mask)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of `values` (B, T) over positions where `mask` (B, T) is True; NaN on an empty mask."""
    mask = mask.bool()
    num_tokens = int(mask.sum())
    if num_tokens == 0:
        return math.nan
    return float(torch.where(mask, values.float(), torch.zeros_like(values, dtype=torch.float32)).sum()) / num_tokens


# --------------------------------------------------------------------------- sequences
def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """The n-grams of one token list, in order."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(token_lists: Iterable[Sequence[int]], n: int) -> float:
    """Distinct n-grams / all n-grams, pooled over the whole set of sequences (0.0 if none)."""
    pooled = [g for tokens in token_lists for g in ngrams(list(tokens), n)]
    return len(set(pooled)) / len(pooled) if pooled else 0.0


def repetition_rate(token_lists: Iterable[Sequence[int]], n: int = 4) -> float:
    """Mean over sequences of the fraction of n-grams that repeat an earlier n-gram of the same sequence.

    A sequence "a b c d a b c d" has 5 4-grams of which 4 are distinct: rate 1/5. Sequences shorter
    than n have no n-gram and are left out of the mean (0.0 when none is long enough).
    """
    rates = []
    for tokens in token_lists:
        grams = ngrams(list(tokens), n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


# --------------------------------------------------------------------------- monitor
@dataclass
class HealthMonitor:
    """Watches per-step metrics and warns, once per kind, when OPD looks unhealthy.

    Feed it the metrics dict of every step: `warnings = monitor.update(step, metrics)`. Keys it
    reads (exactly, or as the last part of a "prefix/key" name): repetition_rate, length_mean,
    truncation_rate, overlap_ratio, entropy_gap. Missing or NaN values are skipped. The baseline
    of each metric is the mean of its first `baseline_steps` values; checks against the baseline
    start once it is complete, absolute checks start at once.
    """

    baseline_steps: int = 3
    """How many first observations of a metric are averaged into its baseline."""
    repetition_max: float = 0.3
    """Warn when repetition_rate (fraction of repeated 4-grams) exceeds this absolute level."""
    repetition_growth: float = 2.0
    """Warn when repetition_rate reaches this multiple of its baseline ..."""
    repetition_floor: float = 0.05
    """... and is above this level too (doubling a near-zero rate is noise, not collapse)."""
    length_low: float = 0.4
    """Warn when length_mean falls below this fraction of its baseline (answers collapsing)."""
    length_high: float = 2.5
    """Warn when length_mean rises above this multiple of its baseline (length inflation)."""
    truncation_max: float = 0.5
    """Warn when more than this fraction of rollouts hit max_new_tokens (truncation collapse)."""
    overlap_fall: float = 0.8
    """Warn when overlap_ratio falls below this fraction of its baseline (student drifting away)."""
    entropy_gap_min: float = -1.0
    """Warn when entropy_gap = H(student) - H(teacher) drops below this many nats (student far more
    peaked than the teacher: mode collapse)."""
    warnings: list[str] = field(default_factory=list, init=False)
    """Every warning emitted so far, in order."""
    probe_reference: dict[str, float] = field(default_factory=dict, init=False)
    """The greedy probe's reference values (protege.probe: the teacher's, or the student's first probe)."""
    _history: dict[str, list[float]] = field(default_factory=dict, init=False, repr=False)
    _fired: set[str] = field(default_factory=set, init=False, repr=False)

    def baseline(self, key: str) -> float | None:
        """Mean of the first `baseline_steps` values of `key`, or None until that many were seen."""
        seen = self._history.get(key, [])
        if len(seen) < self.baseline_steps:
            return None
        return sum(seen[: self.baseline_steps]) / self.baseline_steps

    def state_dict(self) -> dict:
        """What a checkpoint keeps so that a resumed run warns exactly as an uninterrupted one: the warnings
        so far, the kinds already fired, and each metric's first `baseline_steps` values (all a baseline
        reads). Plain lists and strings, which torch.load(weights_only=True) reads."""
        return {"warnings": list(self.warnings), "fired": sorted(self._fired),
                "history": {k: list(v[: self.baseline_steps]) for k, v in self._history.items()},
                "probe_reference": dict(self.probe_reference)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s output."""
        self.warnings = [str(w) for w in state["warnings"]]
        self._fired = {str(k) for k in state["fired"]}
        self._history = {str(k): [float(x) for x in v] for k, v in state["history"].items()}
        self.probe_reference = {str(k): float(v) for k, v in state.get("probe_reference", {}).items()}

    def fire(self, step: int, found: dict[str, str]) -> list[str]:
        """Warnings found elsewhere ({kind: message}, e.g. protege.probe.check), each kind once per run;
        returns those that fire for the first time now."""
        new = [f"step {step}: {message}" for kind, message in found.items() if kind not in self._fired]
        self._fired.update(found)
        self.warnings.extend(new)
        return new

    def update(self, step: int, metrics: dict[str, float]) -> list[str]:
        """Record this step's metrics; return the warnings that fire for the first time now."""
        values = {key: _lookup(metrics, key) for key in _WATCHED}
        baselines = {key: self.baseline(key) for key in _WATCHED}  # before this step is recorded
        for key, value in values.items():
            if value is not None:
                self._history.setdefault(key, []).append(value)
        new: list[str] = []

        def warn(kind: str, message: str) -> None:
            if kind not in self._fired:
                self._fired.add(kind)
                new.append(f"step {step}: {message}")

        rep, rep_base = values["repetition_rate"], baselines["repetition_rate"]
        if rep is not None and rep > self.repetition_max:
            warn("repetition", f"repetition_rate {rep:.3f} is above {self.repetition_max:.3f} (repetition collapse?)")
        elif rep is not None and rep_base is not None and rep > self.repetition_floor \
                and rep >= self.repetition_growth * rep_base:
            warn("repetition",
                 f"repetition_rate {rep:.3f} is {rep / max(rep_base, 1e-12):.1f}x its baseline {rep_base:.3f}")
        length, length_base = values["length_mean"], baselines["length_mean"]
        if length is not None and length_base:
            if length < self.length_low * length_base:
                warn("length_low", f"length_mean {length:.1f} fell below {self.length_low:.0%} "
                                   f"of its baseline {length_base:.1f}")
            elif length > self.length_high * length_base:
                warn("length_high", f"length_mean {length:.1f} rose above {self.length_high:.0%} "
                                    f"of its baseline {length_base:.1f} (length inflation)")
        trunc = values["truncation_rate"]
        if trunc is not None and trunc > self.truncation_max:
            warn("truncation", f"truncation_rate {trunc:.2f} is above {self.truncation_max:.2f}: "
                               "most rollouts hit max_new_tokens")
        overlap, overlap_base = values["overlap_ratio"], baselines["overlap_ratio"]
        if overlap is not None and overlap_base and overlap < self.overlap_fall * overlap_base:
            warn("overlap", f"overlap_ratio {overlap:.3f} fell below {self.overlap_fall:.0%} "
                            f"of its baseline {overlap_base:.3f}")
        gap = values["entropy_gap"]
        if gap is not None and gap < self.entropy_gap_min:
            warn("entropy_gap", f"entropy_gap {gap:.2f} nats is below {self.entropy_gap_min:.2f}: "
                                "the student is far more peaked than the teacher (collapse?)")
        self.warnings.extend(new)
        return new


_WATCHED = ("repetition_rate", "length_mean", "truncation_rate", "overlap_ratio", "entropy_gap")


def _lookup(metrics: dict[str, float], key: str) -> float | None:
    """metrics[key], or metrics["anything/key"]; None when absent or not a finite number."""
    value = metrics.get(key)
    if value is None:
        value = next((v for k, v in metrics.items() if k.rsplit("/", 1)[-1] == key), None)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def step_health(buffer, signal, student_rows: torch.Tensor, k: int, monitor: HealthMonitor, step: int) -> dict:
    """The health signals of one training step at student-visited positions, plus the monitor's new warnings.

    buffer: the step's Rollouts; signal: the teacher's TeacherSignal for it; student_rows (N,) bool:
    rows the student sampled; k: top-k of the overlap metrics (0 = off). Returns repetition_rate and
    distinct_2 of the student rows, overlap metrics and entropy_gap when both top-k lists exist, and
    "warnings" (a list) when the monitor raised any this step.
    """
    out = {}
    ids = [buffer.completion_ids[i, : int(buffer.completion_mask[i].sum())].tolist() for i in range(len(buffer))]
    student_ids = [x for x, s in zip(ids, student_rows.tolist()) if s]
    if student_ids:
        out["repetition_rate"] = repetition_rate(student_ids, n=4)
        out["distinct_2"] = distinct_n(student_ids, 2)
    if k and buffer.student_topk_logprobs is not None and signal.topk_ids is not None and student_rows.any():
        sm = buffer.completion_mask & student_rows[:, None]  # (N, T)
        out.update(overlap_metrics(buffer.student_topk_ids[..., :k], buffer.student_topk_logprobs[..., :k],
                                   signal.topk_ids[..., :k], signal.topk_logprobs[..., :k], sm))
        if signal.entropy is not None and buffer.student_entropy is not None:
            out["entropy_gap"] = entropy_gap(buffer.student_entropy, signal.entropy, sm)
    for_monitor = {**out, "length_mean": float(buffer.completion_mask.sum(1).float().mean()),
                   "truncation_rate": truncation_rate(buffer.finish_reasons)}
    warnings = monitor.update(step, for_monitor)
    if warnings:
        out["warnings"] = warnings
    return out


# --------------------------------------------------------------------------- privileged context
def privileged_leak(completion_ids: torch.Tensor, mask: torch.Tensor, teacher_logprobs: torch.Tensor,
                    teacher_prompts: Sequence[torch.Tensor], student_prompts: Sequence[torch.Tensor], *, n: int = 4,
                    threshold: float = 0.5) -> float:
    """How much privileged text a teacher pushes into the student's answers (a leak signal, 0..1).

    completion_ids (N, T), mask (N, T) bool (the tokens to count, e.g. student rows), teacher_logprobs
    (N, T) log p_T(y_t) of each completion token, teacher_prompts / student_prompts: each row's prompt ids.
    Row i's privileged n-grams are L_i = ngrams_n(teacher prompt) minus ngrams_n(student prompt): token
    sequences the teacher saw and the student did not. A completion token y_t is a copy when the
    n-gram of the completion ending at it, (y_{t-n+1}, ..., y_t), is in L_i and the teacher is confident
    in it, p_T(y_t) > threshold. Result: copies / tokens in `mask` (NaN when the mask is empty); tokens
    before position n-1 are never copies. A rising value means the teacher rewards reproducing its
    context (e.g. "as the solution says ...") that the student cannot know at test time."""
    total = int(mask.sum())
    if total == 0:
        return math.nan
    confident = teacher_logprobs > math.log(threshold)  # (N, T)
    copies = 0
    for i in range(completion_ids.shape[0]):
        length = int(mask[i].nonzero().max()) + 1 if bool(mask[i].any()) else 0
        if length < n:
            continue
        leaked = set(ngrams(teacher_prompts[i].tolist(), n)) - set(ngrams(student_prompts[i].tolist(), n))
        if not leaked:
            continue
        tokens = completion_ids[i, :length].tolist()
        copies += sum(1 for t in range(n - 1, length) if mask[i, t] and confident[i, t]
                      and tuple(tokens[t - n + 1: t + 1]) in leaked)
    return copies / total
