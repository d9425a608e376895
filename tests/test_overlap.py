"""rollout.max_lag (protege.rollout.overlap): lag 0 is today's trajectory; lag 1 samples with the previous weights.

- lag 0: losses, grad norms, sampled RKL, teacher NLL and a weighted sum of every final student weight equal
  values recorded from the code before overlapped generation existed (sampled_pg, hf engine, 3 steps);
- lag 1: the buffer trained at step s was sampled by the weights of version s - 1 (s >= 1; step 0 by
  version 0): its recorded sampling logprobs equal a plain forward of those weights (saved in the test
  before each update) and not of the weights the step starts from; policy_version and policy_lag say so;
- resume with lag 1: the prompts of the first resumed step are those the uninterrupted run trained on at
  that step, sampled on-policy by the restored weights (policy_version = the step).
"""

from __future__ import annotations

import copy

import pytest
import torch

from protege.config import load_config
from protege.trainer import Distiller

# recorded with the trainer before rollout.max_lag (commit b3d98e2 + the lean engine): per step
# [loss, grad_norm, sampled_rkl, teacher_nll], and the weighted weight sum below
PINNED_LAG0 = [[0.06353344768285751, 0.3536940813064575, 0.06353344768285751, 0.5160450339317322],
               [0.18103472888469696, 1.6051326990127563, 0.18103469908237457, 0.7678075432777405],
               [0.3189370036125183, 2.0627217292785645, 0.3189370334148407, 1.4323774576187134]]
PINNED_WEIGHTS = 1.4613398813399003  # the tied embedding's gradient as a sparse addend (protege.forward.
# tied_input_embedding: every weight within 1.2e-7 of the dense path's, float32 summation order), before it
# 1.4613403641186933 with torch's fused AdamW (protege.build.build_optimizer) and the CPU decode step
# (protege.rollout.fast_decode: the same tokens, sampling logprobs to float32 rounding); before the decode step
# 1.4613403385484474 (2e-8 relative), with the default AdamW 1.4613410182651059 and a third-step grad norm of
# 2.0627214908599854 (the same to 5e-7 relative)


def config(paths, out, *extra):
    return load_config(None, [f"student.path={paths['student']}", f"teacher.path={paths['teacher']}",
                              f"data.path={paths['data']}", "rollout.max_new_tokens=6", "train.prompts_per_step=4",
                              "train.micro_batch_size=2", "optim.lr=3e-3", f"output.dir={out}",
                              "output.progress=false", "train.num_threads=1", "data.eval_prompts=0",
                              "train.max_steps=3", "rollout.engine=hf", *extra])  # the recorded engine


def fingerprint(model) -> tuple[float, float]:
    """(sum_i w_i * l_i, sum_i |w_i * l_i|) over every parameter, l = linspace(-1, 1) per tensor: the first
    moves with any single weight; the second bounds how far float32 rounding can move it."""
    total, scale = 0.0, 0.0
    for p in model.parameters():
        wl = p.detach().double().flatten() * torch.linspace(-1, 1, p.numel(), dtype=torch.float64)
        total, scale = total + float(wl.sum()), scale + float(wl.abs().sum())
    return total, scale


def test_lag0_is_the_recorded_trajectory(tiny_paths, tmp_path):
    d = Distiller(config(tiny_paths, tmp_path, "loss.name=sampled_pg", "rollout.max_lag=0"))
    hist = [h for h in d.train() if "loss" in h]
    got = [[h[k] for k in ("loss", "grad_norm", "sampled_rkl", "teacher_nll")] for h in hist]
    assert sum(got, []) == pytest.approx(sum(PINNED_LAG0, []), rel=1e-5, abs=1e-7)  # as tests/test_pinned.py
    # Not bit for bit across CPUs: float32 reductions take another order on another SIMD width. Seen: the
    # recorded value (AVX2), +6.9e-7 on an AVX-512 Intel Xeon, +5.4e-7 there under ATEN_CPU_CAPABILITY=avx2,
    # +1.0e-6 on an AVX-512 AMD EPYC. The bound: every weight moved by one float32 rounding unit (2^-24
    # relative) in the worst direction, sum_i |w_i l_i| * 2^-24 (~5e-5 here, 3.5e-5 relative); a change of the
    # trajectory moves it far past that: optim.lr 3.03e-3 instead of 3e-3 by 1.2e-2, max_grad_norm 0.5 by 0.32.
    value, scale = fingerprint(d.student)
    assert abs(value - PINNED_WEIGHTS) <= scale * 2.0 ** -24, (value, PINNED_WEIGHTS, scale * 2.0 ** -24)
    assert d.overlap is None and all("policy_lag" not in h for h in hist)


def recording(d: Distiller) -> tuple[list, list]:
    """Wrap learn/score: the student's weights before each update, and each scored buffer."""
    weights, buffers = [], []
    learn, score = d.learn, d.score

    def learn_(buffer, signal):
        weights.append(copy.deepcopy(d.student.state_dict()))
        return learn(buffer, signal)

    def score_(buffer):
        buffers.append(buffer)
        return score(buffer)
    d.learn, d.score = learn_, score_
    return weights, buffers


@torch.no_grad()
def forward_logprobs(model, state, buffer, row: int) -> torch.Tensor:
    """(L,) log_softmax(z) of the row's completion tokens under `state`, one unpadded forward."""
    model.load_state_dict(state)
    n = int(buffer.completion_mask[row].sum())
    prompt, tokens = buffer.prompt_ids[row], buffer.completion_ids[row, :n]
    logits = model(input_ids=torch.cat([prompt, tokens])[None]).logits[0].double()
    lp = torch.log_softmax(logits, -1)[len(prompt) - 1: len(prompt) - 1 + n]
    return lp.gather(-1, tokens[:, None])[:, 0]


def test_lag1_samples_with_the_previous_weights(tiny_paths, tmp_path):
    d = Distiller(config(tiny_paths, tmp_path, "loss.name=sampled_pg", "rollout.engine=lean", "rollout.max_lag=1"))
    weights, buffers = recording(d)
    hist = [d.train_step() for _ in range(3)]
    assert [h["policy_lag"] for h in hist] == [0.0, 1.0, 1.0]
    assert [b.policy_version.tolist() for b in buffers] == [[0] * 4, [0] * 4, [1] * 4]
    probe = copy.deepcopy(d.student).eval()
    for s, buffer in enumerate(buffers):
        sampler = weights[max(0, s - 1)]
        for row in range(len(buffer)):
            want = forward_logprobs(probe, sampler, buffer, row)
            n = len(want)
            torch.testing.assert_close(buffer.sampling_logprobs[row, :n].double(), want, atol=1e-4, rtol=0)
            if s >= 1:  # and not the weights the step trained from
                current = forward_logprobs(probe, weights[s], buffer, row)
                assert float((current - want).abs().max()) > 1e-3, f"step {s} row {row}: weights did not move"
    assert d.overlap.pending is None  # nothing prefetched past the last step


def test_lag1_resume_sees_the_same_prompts(tiny_paths, tmp_path):
    extra = ("rollout.engine=lean", "rollout.max_lag=1", "output.save_every=2")
    full = Distiller(config(tiny_paths, tmp_path / "a", *extra))
    _, buffers = recording(full)
    full.train()
    resumed = Distiller(config(tiny_paths, tmp_path / "a", *extra, "resume=true", "train.max_steps=3"))
    # the run above finished: restart it from its step-2 checkpoint as if it had been killed after saving it
    import shutil
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step-0000003")
    _, again = recording(resumed)
    hist = [h for h in resumed.train() if "loss" in h]
    assert len(hist) == 1 and len(again) == 1
    assert [p.tolist() for p in again[0].prompt_ids] == [p.tolist() for p in buffers[2].prompt_ids]
    assert again[0].policy_version.tolist() == [2] * 4 and buffers[2].policy_version.tolist() == [1] * 4
    assert hist[0]["policy_lag"] == 0.0


@pytest.mark.parametrize("extra, named", [(["rollout.engine=vllm"], "rollout.engine=lean"),
                                          (["teacher.path=null", "teacher.urls=[http://127.0.0.1:1]",
                                            "loss.support=student", "mix.lmbda=0.5"], "mix.lmbda=1")])
def test_lag1_refuses_what_it_cannot_do_at_start_up(tmp_path, extra, named):
    from protege.config import ConfigError

    with pytest.raises(ConfigError, match="rollout.max_lag=1") as e:
        load_config(None, ["student.path=s", "teacher.path=t", f"output.dir={tmp_path}", "rollout.max_lag=1", *extra])
    assert named in str(e.value)


def test_lean_lag0_resume_continues_exactly(tiny_paths, tmp_path):
    """The lean engine draws from torch's global generator, which checkpoints save: 2 + 2 steps = 4 steps."""
    def losses(out, *extra):
        return [h["loss"] for h in Distiller(config(tiny_paths, out, "rollout.engine=lean", *extra)).train()
                if "loss" in h]
    whole = losses(tmp_path / "a", "train.max_steps=4")
    first = losses(tmp_path / "b", "train.max_steps=2")
    rest = losses(tmp_path / "b", "train.max_steps=4", "resume=true")
    assert first + rest[-2:] == whole and len(rest) >= 2
