"""Which rows a step trains on, and what a run keeps: prompt repetition (rollout.num_generations), the
held-out split (data.eval_fraction), the lmbda coin, the importance ratio of a stale buffer, keep_last.

Each test compares against an independent recomputation (a brute-force forward, a replay of the seeded
coin, the data file itself), never against the code under test.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from protege.config import load_config
from protege.data import load_prompt_sets
from protege.trainer import Distiller, train


def _cfg(paths, out, *extra):
    return load_config(None, [f"student.path={paths['student']}", f"teacher.path={paths['teacher']}",
                              f"data.path={paths['data']}", "rollout.max_new_tokens=6", "train.prompts_per_step=4",
                              "train.micro_batch_size=2", "optim.lr=3e-3", f"output.dir={out}",
                              "output.progress=false", "train.num_threads=1", "data.eval_prompts=0", *extra])


def _unique_rows(path: Path, n: int = 40) -> str:
    """A dataset whose prompts are all different, so a row is known by its prompt text."""
    path.write_text("".join(json.dumps({"prompt": f"row {i}: what is {i % 7}+{i % 5}?",
                                        "completion": str(i % 7 + i % 5)}) + "\n" for i in range(n)))
    return str(path)


def test_num_generations_repeats_each_prompt_with_its_data_row(tiny_paths, tmp_path):
    """g = 3: each picked prompt is sampled 3 times, rows stay in line with the data rows a privileged or
    routed teacher reads (buffer.examples), and the step trains on every row."""
    data = _unique_rows(tmp_path / "rows.jsonl")
    d = Distiller(_cfg(tiny_paths, tmp_path, f"data.path={data}", "rollout.num_generations=3", "mix.lmbda=1"))
    buffer = d.collect(0)
    assert len(buffer) == 4 * 3 and len(buffer.examples) == len(buffer) and set(buffer.sources) == {"student"}
    texts = [ex.messages[-1]["content"] for ex in buffer.examples]
    assert len(set(texts)) == 4 and all(texts[3 * i: 3 * i + 3] == [texts[3 * i]] * 3 for i in range(4))
    for ids, text in zip(buffer.prompt_ids, texts):  # the prompt of each row is its own data row's prompt
        assert text in d.tok.decode(ids)
    m = d.train_step(buffer)
    assert m["tokens"] == buffer.num_tokens


def test_eval_fraction_holds_out_rows_never_trained_on(tiny_paths, tmp_path):
    data = _unique_rows(tmp_path / "rows.jsonl")
    every = {json.loads(x)["prompt"] for x in Path(data).read_text().splitlines()}
    d = Distiller(_cfg(tiny_paths, tmp_path, f"data.path={data}", "data.eval_fraction=0.25"))
    train_rows = [ex.messages[-1]["content"] for ex in d.train_set.examples]
    held = [ex.messages[-1]["content"] for ex in d.eval_set.examples]
    assert len(held) == 10 and len(train_rows) == 30
    assert not set(held) & set(train_rows), "held-out rows leak into training"
    assert set(held) | set(train_rows) == every, "rows lost by the split"
    again, _ = load_prompt_sets(d.cfg.data, seed=d.cfg.train.seed)  # the split is seeded: the same on resume
    assert [ex.messages[-1]["content"] for ex in again.examples] == train_rows


def test_lmbda_half_follows_the_seeded_coin(tiny_paths, tmp_path):
    """mix.lmbda = 0.5: row j of step s is on-policy iff the step's coin random.Random(seed * 7919 + s) says
    so (a replay written here); over 8 steps of 16 prompts the share is inside the binomial bounds."""
    d = Distiller(_cfg(tiny_paths, tmp_path, "mix.lmbda=0.5", "train.prompts_per_step=16", "rollout.max_new_tokens=2"))
    on_policy_total = 0
    for step in range(8):
        coin = random.Random(d.cfg.train.seed * 7919 + step)
        want = sum(coin.random() < 0.5 for _ in range(16))
        sources = d.collect(step).sources
        assert sources.count("student") == want and sources.count("dataset") == 16 - want, step
        on_policy_total += want
    assert 64 - 20 <= on_policy_total <= 64 + 20  # n = 128, p = 0.5: sd 5.7, the bounds are 3.5 sd


@torch.no_grad()
def _row_logprobs(model, prompt: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """log softmax of one full unpadded forward at the completion tokens, (n,)."""
    seq = torch.cat([prompt, completion])[None]
    p0 = len(prompt)
    logits = model(seq).logits[0, p0 - 1: p0 - 1 + len(completion)].double()
    return torch.log_softmax(logits, -1).gather(-1, completion[:, None])[:, 0]


def test_stale_buffer_weights_tokens_by_the_recorded_behaviour_logprobs(tiny_paths, tmp_path):
    """A buffer sampled two steps ago (what rollout.max_lag keeps in flight): sampled_pg's loss is
    -sum_t rho_t A_t / N with rho_t = q_theta(y_t) / q_old(y_t) and A_t = log p(y_t) - log q_old(y_t), where
    q_old is the RECORDED sampling logprob, q_theta the current student (brute-force forwards here)."""
    d = Distiller(_cfg(tiny_paths, tmp_path, "loss.name=sampled_pg", "optim.lr=2e-2", "optim.schedule=constant"))
    stale = d.collect(0)
    d.train_step()
    d.train_step()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_paths["teacher"]).eval()
    d.student.eval()
    total, total_if_current, n_tokens = 0.0, 0.0, 0
    for i in range(len(stale)):
        n = int(stale.completion_mask[i].sum())
        ids = stale.completion_ids[i, :n]
        log_q = _row_logprobs(d.student, stale.prompt_ids[i], ids)
        log_p = _row_logprobs(teacher, stale.prompt_ids[i], ids)
        log_q_old = stale.sampling_logprobs[i, :n].double()
        total += float((-(log_q - log_q_old).exp() * (log_p - log_q_old)).sum())
        total_if_current += float((-(log_p - log_q)).sum())  # the bug: q_old replaced by the current policy
        n_tokens += n
    want, wrong = total / n_tokens, total_if_current / n_tokens
    assert abs(want - wrong) > 1e-3, "the student did not move: this buffer cannot tell the two apart"
    got = d.train_step(stale)["loss"]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5), (got, want, wrong)


def test_keep_last_prunes_the_oldest_checkpoints(tiny_paths, tmp_path):
    """save_every=1, keep_last=2, 4 steps: step-3 and step-4 remain, and step-4 holds the final weights."""
    train(_cfg(tiny_paths, tmp_path, "train.max_steps=4", "output.save_every=1", "output.keep_last=2"))
    folders = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert folders == ["step-0000003", "step-0000004"]
    final = load_file(tmp_path / "student" / "model.safetensors")
    newest = load_file(tmp_path / "checkpoints" / "step-0000004" / "student" / "model.safetensors")
    assert final.keys() == newest.keys() and all(torch.equal(final[k], newest[k]) for k in final)
