"""Multi-turn OPD end to end on tiny models: a real engine's episodes, the teacher scoring exactly the student's
ids, the loss and its token count on the train mask only, `protege train` steps with a calculator tool and with an
environment class, and the combinations refused at start-up."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny import make_model, make_tokenizer

from protege.config.env import EnvConfig
from protege.agents.rollout import AgentRollouts
from protege.config import load_config
from protege.data import Example
from protege.forward import forward_completion_hidden
from protege.records import Rollouts
from protege.rollout.base import Sampling
from protege.rollout.hf import HFEngine
from protege.teacher.base import ScoreRequest
from protege.teacher.local import LocalTeacher
from protege.trainer import Distiller


def stop_ids(tok) -> tuple[int, ...]:
    """A random tiny model rarely samples <eos>: its turns also end at any odd id (still a sampled id, which the
    template's end-of-turn glue then follows), so that episodes have several turns."""
    return (tok.eos_token_id, *range(3, len(tok), 2))


def _episodes(turns: int = 3) -> tuple[Rollouts, torch.nn.Module]:
    tok, student = make_tokenizer(), make_model(2, seed=2)
    cfg = EnvConfig(**{"class": "agent_envs:TaskEnv", "args": {"turns": turns}}, max_total_tokens=400)
    rows = [Example([{"role": "user", "content": f"row {i}"}], columns={"task": i}) for i in range(3)]
    torch.manual_seed(0)
    out = AgentRollouts(cfg, tok, (tok.eos_token_id,)).rollout(HFEngine(student, pad_id=0), rows,
                                                                 Sampling(max_new_tokens=12, eos_ids=stop_ids(tok)))
    return out, student


def test_the_teacher_scores_exactly_the_ids_the_student_sampled():
    """A teacher equal to the student gives, on every sampled position, the student's own sampling logprob: the
    trajectory holds exactly the ids the student saw when it sampled (no decode / re-encode of the history)."""
    out, student = _episodes()
    assert (out.loss_mask.sum(1) > 0).all() and (out.completion_mask & ~out.loss_mask).any()  # observations exist
    signal = LocalTeacher(student.eval(), pad_id=0).score(out, ScoreRequest())
    sampled = out.loss_mask
    torch.testing.assert_close(signal.token_logprobs[sampled], out.sampling_logprobs[sampled], atol=2e-4, rtol=1e-4)
    observed = out.completion_mask & ~out.loss_mask
    assert torch.isfinite(signal.token_logprobs[observed]).all()  # read by the teacher, never trained
    assert (out.sampling_logprobs[observed] == 0).all()


def test_records_carry_the_loss_mask():
    out, _ = _episodes()
    ref = Rollouts.from_references([torch.tensor([5, 6])], [torch.tensor([7, 8, 1])])
    both = Rollouts.concat([out, ref])
    assert torch.equal(both.train_mask[: len(out), : out.loss_mask.shape[1]], out.loss_mask)
    assert torch.equal(both.train_mask[len(out):], both.completion_mask[len(out):])  # None: every completion token
    assert both.num_tokens == int(out.loss_mask.sum()) + 3
    assert both.episodes[-1] is None and both.turn_index[-1, :3].tolist() == [0, 0, 0]
    picked = both.select([1, len(out)])
    assert torch.equal(picked.loss_mask[0], both.loss_mask[1, : picked.loss_mask.shape[1]])
    assert picked.episodes == [both.episodes[1], None]


def _cfg(tiny_paths, out, *extra):
    return load_config(None, [f"student.path={tiny_paths['student']}", f"teacher.path={tiny_paths['teacher']}",
                              f"data.path={tiny_paths['data']}", "rollout.max_new_tokens=10",
                              "train.prompts_per_step=2", "train.micro_batch_size=2", "optim.lr=3e-3",
                              f"output.dir={out}", "output.progress=false", "train.num_threads=1",
                              "data.eval_prompts=0", "train.max_steps=2", *extra])


def distiller(cfg) -> Distiller:
    d = Distiller(cfg)
    d.sampling = replace(d.sampling, eos_ids=stop_ids(d.tok))
    return d


def test_the_loss_and_its_token_count_use_the_train_mask(tiny_paths, tmp_path):
    d = distiller(_cfg(tiny_paths, tmp_path, "env.class=agent_envs:TaskEnv", "env.max_total_tokens=200"))
    buffer = d.collect(0)
    assert buffer.loss_mask is not None and (buffer.completion_mask & ~buffer.loss_mask).any()
    signal = d.score(buffer)
    with torch.no_grad():  # the independent value: the per-token loss summed over sampled tokens / their count
        hidden = forward_completion_hidden(d.model, buffer.prompt_ids, buffer.completion_ids, buffer.completion_mask, 0)
        per_token = d.objective.per_token_loss(hidden, d.student.lm_head.weight, buffer, signal,
                                               d.teacher.output_weight)
    expected = float(per_token[buffer.loss_mask].sum() / buffer.loss_mask.sum())
    assert float(per_token[buffer.completion_mask].sum() / buffer.completion_mask.sum()) != pytest.approx(expected)
    learned = d.learn(buffer, signal)
    assert learned["num_tokens"] == int(buffer.loss_mask.sum())
    assert learned["loss"] == pytest.approx(expected, rel=1e-4)


def test_train_two_steps_with_a_calculator_tool(tiny_paths, tmp_path):
    history = distiller(_cfg(tiny_paths, tmp_path, "env.tools=[agent_envs:calculator]", "env.max_turns=2")).train()
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in steps)
    assert all(h["env/turns_mean"] >= 1 and "env/teacher_nll/turn_0" in h for h in steps)
    logged = [json.loads(x) for x in (Path(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["env/tool_calls"] >= 0 and (Path(tmp_path) / "student" / "config.json").exists()


def test_train_two_steps_in_an_environment_class(tiny_paths, tmp_path):
    history = distiller(_cfg(tiny_paths, tmp_path, "env.class=agent_envs:TaskEnv", "env.args={turns: 3}",
                             "env.max_total_tokens=300")).train()
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 2 and all(h["env/turns_mean"] > 1 for h in steps)
    assert all("env/sampled_rkl/turn_1" in h for h in steps)


@pytest.mark.parametrize("extra, match", [
    (["mix.lmbda=0.5"], "mix.lmbda=0.5"),
    (["mix.lmbda=0", "mix.seq_kd=true"], "mix.lmbda=0.0"),
    (["loss.name=sampled_pg", "loss.discount=0.9"], "loss.discount"),
    (["teacher.system_prompt=secret"], "privileged teacher view"),
])
def test_unsupported_combinations_are_refused_at_start_up(tiny_paths, tmp_path, extra, match):
    with pytest.raises(ValueError, match=f"env \\(multi-turn rollouts\\) does not support.*{match}"):
        Distiller(_cfg(tiny_paths, tmp_path, "env.class=agent_envs:TaskEnv", *extra))


def test_a_bad_environment_path_fails_before_training(tiny_paths, tmp_path):
    with pytest.raises(ValueError, match="env.class='nopkg_xyz:Env': cannot import module 'nopkg_xyz'"):
        Distiller(_cfg(tiny_paths, tmp_path, "env.class=nopkg_xyz:Env"))


def test_guided_turns_in_training(tiny_paths, tmp_path):
    d = distiller(_cfg(tiny_paths, tmp_path, "env.class=agent_envs:TaskEnv", "env.max_total_tokens=200",
                       "mix.teacher_turns=1.0", "train.max_steps=4"))
    buffer = d.collect(0)  # p(0) = 1: every turn is the teacher's, nothing is trained
    assert all(e["teacher_turns"] == e["turns"] for e in buffer.episodes) and buffer.num_tokens == 0
    late = d.collect(4)  # p(max_steps) = 0
    assert all(e["teacher_turns"] == 0 for e in late.episodes) and late.num_tokens > 0
    m = d.train_step(late)
    assert m["env/teacher_turns"] == 0 and torch.isfinite(torch.tensor(m["loss"]))


def test_guided_turns_need_env_and_a_local_teacher(tiny_paths, tmp_path):
    with pytest.raises(ValueError, match="mix.teacher_turns .guided turns. needs multi-turn rollouts"):
        Distiller(_cfg(tiny_paths, tmp_path, "mix.teacher_turns=0.5"))


def test_per_turn_diagnostics_match_a_loop():
    from protege.agents.metrics import per_turn
    from protege.records import TeacherSignal

    out, _ = _episodes()
    teacher = torch.randn(out.completion_ids.shape) - 3  # (N, T) any teacher logprobs
    m = per_turn(out, TeacherSignal(token_logprobs=teacher))
    for k in range(int(out.turn_index.max()) + 1):
        rkl, nll = [], []
        for i in range(len(out)):
            for t in range(out.completion_ids.shape[1]):
                if out.loss_mask[i, t] and out.turn_index[i, t] == k:
                    rkl.append(float(out.sampling_logprobs[i, t]) - float(teacher[i, t]))
                    nll.append(-float(teacher[i, t]))
        if rkl:
            assert m[f"env/sampled_rkl/turn_{k}"] == pytest.approx(sum(rkl) / len(rkl), rel=1e-5)
            assert m[f"env/teacher_nll/turn_{k}"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert "env/sampled_rkl/turn_1" in m


@pytest.mark.parametrize("override, message", [
    ("--env.class=nopkg_xyz.envs:Maze", "env.class='nopkg_xyz.envs:Maze': cannot import module 'nopkg_xyz.envs'"),
    ("--env.tools=[agent_envs:no_docstring]", "tool no_docstring: no usable JSON schema"),
])
def test_start_up_errors_are_one_cli_line(tiny_paths, tmp_path, capsys, override, message):
    from protege.cli import main

    code = main(["train", f"--student.path={tiny_paths['student']}", f"--teacher.path={tiny_paths['teacher']}",
                 f"--data.path={tiny_paths['data']}", f"--output.dir={tmp_path}", "--output.progress=false", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("protege train: error: ") and message in err[-1]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_an_fsdp2_student_is_refused_with_env():
    from protege.agents.checks import check_env_sharded

    cfg = load_config(None, ["student.path=s", "teacher.path=t", "env.class=agent_envs:TaskEnv"])
    check_env_sharded(cfg, sharded=False)
    with pytest.raises(ValueError, match="FSDP2 student is not supported yet.*use DDP"):
        check_env_sharded(cfg, sharded=True)
