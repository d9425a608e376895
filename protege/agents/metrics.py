"""Step metrics of multi-turn episodes: turns, tool calls, finish reasons, rewards, and KL / teacher NLL by turn.

    env/turns_mean, env/reward_mean, env/tool_calls, env/invalid_call_rate (invalid / calls), env/tool_errors,
    env/teacher_turns (guided turns, mix.teacher_turns),
    env/env_errors (the run's total so far), env/finish/<reason> (share of episodes),
    env/sampled_rkl/turn_<k>  mean over the turn's sampled tokens of log q_old(y) - log p(y)
    env/teacher_nll/turn_<k>  mean over the turn's sampled tokens of -log p(y)
The per-turn values show the multi-turn failure signature: KL growing with turn depth.
"""

from __future__ import annotations

from collections import Counter

import torch


def episode_metrics(buffer, signal, agents) -> dict:
    """{} without episodes; else the env/* metrics of the buffer's episode rows."""
    if buffer.episodes is None or agents is None:
        return {}
    eps = [e for e in buffer.episodes if e is not None]
    if not eps:
        return {}
    calls = sum(e["tool_calls"] for e in eps)
    m = {"env/turns_mean": sum(e["turns"] for e in eps) / len(eps),
         "env/reward_mean": sum(e["reward"] for e in eps) / len(eps),
         "env/tool_calls": calls,
         "env/invalid_call_rate": sum(e["invalid_calls"] for e in eps) / calls if calls else 0.0,
         "env/tool_errors": sum(e["tool_errors"] for e in eps),
         "env/env_errors": agents.env_errors,
         "env/teacher_turns": sum(e["teacher_turns"] for e in eps)}
    for reason, n in Counter(e["finish"] for e in eps).items():
        m[f"env/finish/{reason}"] = n / len(eps)
    m.update(per_turn(buffer, signal))
    return m


def per_turn(buffer, signal) -> dict:
    """Sampled reverse KL and teacher NLL per turn index, over the tokens the student sampled."""
    if buffer.turn_index is None:
        return {}
    out = {}
    sampled = buffer.loss_mask if buffer.loss_mask is not None else buffer.completion_mask  # (N, T)
    sampled = sampled & torch.tensor([s == "student" for s in buffer.sources])[:, None]
    teacher = signal.token_logprobs.float()  # (N, T)
    for k in range(int(buffer.turn_index.max()) + 1):
        mask = sampled & (buffer.turn_index == k)  # (N, T)
        if not mask.any():
            continue
        if buffer.sampling_logprobs is not None:
            out[f"env/sampled_rkl/turn_{k}"] = float((buffer.sampling_logprobs - teacher)[mask].mean())
        out[f"env/teacher_nll/turn_{k}"] = float(-teacher[mask].mean())
    return out
