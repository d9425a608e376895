"""The rollout-engine protocol: sample completions for a buffer of prompts, keep the weights current.

    engine.generate(prompt_ids, sampling, source="student") -> Rollouts   (CPU tensors)
    engine.sync_weights(model)    after each optimizer step: the next buffer samples the new weights

protege.rollout.hf.HFEngine generates with the live HF model (sync is a no-op);
protege.rollout.vllm_engine.VLLMRolloutEngine reloads the weights into a colocated vLLM engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from protege.records import Rollouts


@dataclass(frozen=True)
class Sampling:
    """How to sample: the same fields for every engine.

    temperature 0 is greedy; top_k 0 and top_p 1 are off; generation stops at any of eos_ids (kept as
    the completion's last token) or after max_new_tokens; record_topk > 0 also records the sampling
    policy's top-k ids, logprobs and entropy at every position (student supports, diagnostics)."""

    max_new_tokens: int
    eos_ids: tuple[int, ...] = field(default_factory=tuple)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    record_topk: int = 0


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[torch.Tensor], sampling: Sampling, *, source: str = "student") -> Rollouts:
        ...

    def sync_weights(self, model: nn.Module) -> None:
        ...
