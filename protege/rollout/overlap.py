"""Overlapped generation (rollout.max_lag = 1): the next step's buffer is sampled while the current step trains.

    step s:  buffer_s = wait for the prefetched buffer (sampled by the weights of version s - 1)
             snapshot <- live weights (version s); start generating buffer_{s+1} with the snapshot, in a thread
             teacher scores buffer_s; the student learns on it (live weights -> version s + 1)

The version of a policy is the number of optimizer steps its weights have taken; every row records the
version that sampled it (Rollouts.policy_version, -1 for rows the student did not sample), so a row
trained at step s has lag s - version: 1 for every step but the first (its buffer is generated at once,
lag 0). The trainer mutates the live weights during the step, so the thread samples a copy (one more
copy of the student's weights in memory), refreshed from the live weights before each launch.

What lag means for the losses:
- sampled_pg (protege/objective.py): the recorded sampling logprobs are those of the snapshot that
  sampled, so its importance ratio rho = q_theta(y) / q_sampling(y) is the correction to the sampling
  policy (truncated at loss.ratio_clip when set: value min(rho, c); with lag 1 rho stays near 1).
- dense losses (reverse/forward KL, JSD, ... over the full vocabulary or a top-k support): computed on the
  current student at every position of the rows, so they are exact for those rows; lag only changes
  which rows are scored: prefixes sampled by the policy one step before (off-policy by one step).
- health metrics read the sampling logprobs: sampled_rkl estimates KL(q_sampling || p).

Resume: a checkpoint stores the stream position before the prefetched buffer's prompts (the buffer in
flight is not saved), so a resumed run sees the same prompts; its first step samples them with the
restored weights (lag 0, as at the start of a run), then lag 1 again.

The thread gets the trainer's torch thread count (torch.set_num_threads per thread), so lag 1 uses
about twice the cores of lag 0. Random numbers: rollout.engine=lean draws from the thread's own
generator, seeded from train.seed, the process and the first step it samples (a run is reproducible;
a resumed run does not replay the numbers of an earlier stretch); the hf engine draws from torch's
global generator, shared with the main thread.
"""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from protege.records import Rollouts
from protege.rollout.base import RolloutEngine


@dataclass
class _Pending:
    step: int
    version: int
    stream_state: dict
    future: Future


class Overlap:
    """Prefetches buffer s + 1 while step s trains (see the module docstring).

    collect(step, engine) -> Rollouts: the trainer's buffer of a step, sampling student rows with `engine`;
    make_engine(model, step) -> RolloutEngine over a model (step: the first it samples);
    stream: the prompt stream (its state is saved)."""

    def __init__(self, collect: Callable[[int, RolloutEngine], Rollouts], student: nn.Module,
                 make_engine: Callable[[nn.Module, int], RolloutEngine], stream, max_steps: int):
        self.collect, self.student, self.make_engine = collect, student, make_engine
        self.stream, self.max_steps = stream, max_steps
        self.snapshot: nn.Module | None = None
        self.engine: RolloutEngine | None = None
        self.pending: _Pending | None = None
        threads = torch.get_num_threads()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="protege-rollout",
                                       initializer=torch.set_num_threads, initargs=(threads,))

    def take(self, step: int) -> Rollouts:
        """Step `step`'s buffer (prefetched, or generated now at the start or after a resume); launches the next."""
        if self.pending is None or self.pending.step != step:
            self._drop()
            self._launch(step, step)
        pending, self.pending = self.pending, None
        buffer = pending.future.result()
        buffer.policy_version = torch.tensor([pending.version if s == "student" else -1 for s in buffer.sources])
        if step + 1 < self.max_steps:
            self._launch(step + 1, step)  # sampled by the weights this step starts from
        return buffer

    def stream_state(self) -> dict:
        """The prompt stream's position after the prompts of the trained steps (not those of the buffer in flight)."""
        return self.pending.stream_state if self.pending is not None else self.stream.state_dict()

    def _launch(self, step: int, version: int) -> None:
        if self.snapshot is None:
            self.snapshot = copy.deepcopy(self.student).eval().requires_grad_(False)
            self.engine = self.make_engine(self.snapshot, step)
        with torch.no_grad():  # the weights as they are now: version `version`
            for mine, live in zip(self.snapshot.state_dict().values(), self.student.state_dict().values()):
                mine.copy_(live)
        state = self.stream.state_dict()
        self.pending = _Pending(step, version, state, self.pool.submit(self.collect, step, self.engine))

    def _drop(self) -> None:
        """A stale prefetch (a step other than the one asked for): wait for it, forget it, rewind the stream."""
        if self.pending is not None:
            self.pending.future.exception()
            self.stream.load_state_dict(self.pending.stream_state)
            self.pending = None

    def close(self) -> None:
        self._drop()
        self.pool.shutdown(wait=True)
