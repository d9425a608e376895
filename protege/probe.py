"""The greedy probe: the student's greedy answers to a few held-out prompts, tracked during training and
held against the teacher's own answers to the same prompts.

Why: on-policy reverse KL can fall while the text gets worse (seed 003's repetition collapse: the student
loops and never ends, REFERENCE.md section 5). Sampled rollouts at the training cap hide it: they are cut
at max_new_tokens, and sampling at temperature 1 breaks loops that greedy decoding falls into. So the probe
decodes greedily up to `factor` x the training cap, which is where a loop shows, and measures
(protege.eval.text_metrics) per answer set:

    distinct_2       distinct token bigrams / all bigrams, pooled over the answers
    repetition_rate  mean over answers of the share of 4-grams that repeat an earlier 4-gram of the answer
    eos_rate         share of answers that end with an EOS token before the cap
    length           mean answer length in tokens

The teacher's values on the same prompts (greedy, same cap) are the reference; without an in-process
teacher the student's first probe is. `check` turns a probe into warnings with the demo's bar
(issue 16): distinct_2 >= 0.8 x the reference, repetition_rate <= 1.5 x the reference (and above an
absolute floor, so 0.01 vs 0.005 is not a warning), eos_rate >= 0.5 x the reference.
Greedy decoding draws no random numbers, and the probe runs under a forked RNG anyway: a run with the
probe follows exactly the trajectory of the same run without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from protege.eval import text_metrics
from protege.rollout import hf as hf_rollout

PROBE_KEYS = ("distinct_2", "repetition_rate", "eos_rate", "length")


@dataclass(frozen=True)
class ProbeBar:
    """The thresholds of `check`, as ratios to the reference (the teacher's values)."""

    distinct_min: float = 0.8
    repetition_max: float = 1.5
    repetition_floor: float = 0.05
    eos_min: float = 0.5


@dataclass
class GreedyProbe:
    """Greedy answers of `model` to `prompts` (token ids), `max_new_tokens` each; see the module docstring."""

    prompts: list[torch.Tensor]
    max_new_tokens: int
    eos_ids: list[int]
    pad_id: int
    bf16: bool = False

    @torch.no_grad()
    def answers(self, model):
        """The Rollouts of the greedy answers (the model is put in eval mode for the call and restored)."""
        was = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                return hf_rollout.generate(model, self.prompts, temperature=0, max_new_tokens=self.max_new_tokens,
                                           eos_ids=self.eos_ids, pad_id=self.pad_id, autocast_bf16=self.bf16)
        finally:
            model.train(was)

    def measure(self, model) -> dict[str, float]:
        """{distinct_2, repetition_rate, eos_rate, length} of the greedy answers."""
        metrics = text_metrics(self.answers(model))
        return {k: float(metrics[k]) for k in PROBE_KEYS}


def check(student: dict[str, float], reference: dict[str, float], bar: ProbeBar = ProbeBar()) -> dict[str, str]:
    """{kind: message} for every bar the student's probe misses against the reference (empty when it passes).

    kinds: "probe_diversity" (distinct_2 < distinct_min x ref), "probe_repetition" (repetition_rate >
    repetition_max x ref and > repetition_floor), "probe_ending" (eos_rate < eos_min x ref).
    """
    out = {}
    d, d_ref = student["distinct_2"], reference["distinct_2"]
    if d < bar.distinct_min * d_ref:
        out["probe_diversity"] = (f"greedy distinct-2 {d:.2f} is below {bar.distinct_min:.0%} of the teacher's "
                                  f"{d_ref:.2f}: the student's answers repeat themselves")
    r, r_ref = student["repetition_rate"], reference["repetition_rate"]
    if r > bar.repetition_floor and r > bar.repetition_max * r_ref:
        out["probe_repetition"] = (f"greedy repetition rate {r:.2f} is above {bar.repetition_max:g}x the "
                                   f"teacher's {r_ref:.2f}: the student loops (seed 003's repetition collapse)")
    e, e_ref = student["eos_rate"], reference["eos_rate"]
    if e < bar.eos_min * e_ref:
        out["probe_ending"] = (f"only {e:.0%} of greedy answers end with EOS against the teacher's {e_ref:.0%}: "
                               "the student runs to the length cap (teacher samples too short to show an end?)")
    return out


def probe_step(monitor, probe: GreedyProbe, student, teacher_model, step: int) -> tuple[dict[str, float], list[str]]:
    """One probe of a run: (the student's values with the reference beside them as reference_<key>, the
    monitor's new warnings). The reference is measured once (the in-process teacher's greedy answers, or
    this first probe of the student without one) and kept in the monitor, so it survives a resume."""
    values = probe.measure(student)
    if not monitor.probe_reference:
        monitor.probe_reference = probe.measure(teacher_model) if teacher_model is not None else dict(values)
    ref = monitor.probe_reference
    warnings = monitor.fire(step, check(values, ref))
    return {**values, **{f"reference_{k}": v for k, v in ref.items()}}, warnings
