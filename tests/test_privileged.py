"""Privileged context for the teacher, loss.token_clip and the leak signal, against references written here.

The teacher's prompt for a row is built here by hand from the tiny chat template
(<|role|>content<eos> ... <|assistant|>, one id per character) and scored by one plain forward of the
teacher model; the student's side (prompt ids, sampled tokens, their logprobs) must be bit-identical
with and without the privileged column, and the ids the inner teacher receives must be exactly the
student's completion ids. Every loss name trains with a privileged self-teacher, and the first step's
loss equals a brute-force value for reverse KL (full vocabulary) and the teacher's top-k support.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re

import pytest
import torch
from tiny import make_tokenizer

from protege.config import ConfigError, LossConfig, load_config
from protege.data import Example
from protege.diagnostics import privileged_leak
from protege.objective import Objective, clip_token_loss
from protege.records import Rollouts, TeacherSignal
from protege.teacher.base import Wrapper
from protege.teacher.privileged import PrivilegedTeacher, teacher_messages
from protege.trainer import Distiller

TOK = make_tokenizer()


def _rows(n: int = 12, context: bool = True, every: int = 1) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 7, (i * 3) % 5
        row = {"prompt": f"what is {a}+{b}?", "completion": f"{a + b}", "source": "tiny"}
        if context and i % every == 0:
            row["privileged_context"] = f"the answer is {a + b}, since {a}+{b}={a + b}"
        rows.append(row)
    return rows


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(paths, out, data, *extra):
    return load_config(None, [f"student.path={paths['student']}", f"data.path={data}", "rollout.max_new_tokens=6",
                              "train.prompts_per_step=4", "train.micro_batch_size=2", "optim.lr=1e-3",
                              f"output.dir={out}", "output.progress=false", "train.num_threads=1",
                              "data.eval_prompts=0", "train.max_steps=1", "train.seed=3", "loss.top_k=4", *extra])


def _ids(turns: list[tuple[str, str]]) -> torch.Tensor:
    """The tiny chat template by hand: <|role|> + one id per character + <eos> per turn, then <|assistant|>.
    The tiny tokenizer splits on the regex '.', which skips newlines: a run of them is one <unk> (id 2)."""
    ids = []
    for role, text in turns:
        chars = [TOK.convert_tokens_to_ids(c) for c in re.sub(r"\n+", "\x00", text)]
        ids += [TOK.convert_tokens_to_ids(f"<|{role}|>")] + chars + [1]
    return torch.tensor(ids + [TOK.convert_tokens_to_ids("<|assistant|>")])


@torch.no_grad()
def _logits(model, prompt, tokens) -> torch.Tensor:
    return model.eval()(input_ids=torch.cat([prompt, tokens])[None]).logits[0, len(prompt) - 1:
                                                                            len(prompt) - 1 + len(tokens)].double()


def test_the_teachers_view_of_a_row():
    cfg = load_config(None, ["student.path=x", "teacher.path=y", "teacher.system_prompt=Be exact."])
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    ex = Example(messages=chat, columns={"privileged_context": "ctx"})
    assert teacher_messages(ex, cfg) == ([{"role": "system", "content": "Be exact.\n\nS"}, chat[1], chat[2],
                                          {"role": "user", "content": "q2\n\nctx"}], True)
    ex = Example(messages=chat[1:], columns={"privileged_context": [{"role": "user", "content": "m1"},
                                                                    {"role": "assistant", "content": "m2"}],
                                             "teacher_prompt": "TQ"})  # teacher_prompt wins, replaces q2
    assert teacher_messages(ex, cfg) == ([{"role": "system", "content": "Be exact."}, chat[1], chat[2],
                                          {"role": "user", "content": "TQ"}], True)
    ex.columns = {"privileged_context": [{"role": "user", "content": "m1"}, {"role": "assistant", "content": "m2"}]}
    cfg2 = load_config(None, ["student.path=x", "teacher.path=y", "data.privileged_template=<{privileged_context}> "
                              "{prompt}"])
    assert teacher_messages(ex, cfg2)[0][-1] == {"role": "user", "content": "<m1\nm2> q2"}
    ex.columns = {"teacher_prompt": [{"role": "user", "content": "T1"}, {"role": "assistant", "content": "T2"},
                                     {"role": "user", "content": "T3"}]}
    assert teacher_messages(ex, cfg2)[0] == chat[1:3] + ex.columns["teacher_prompt"]
    ex.columns = {"privileged_context": None, "teacher_prompt": "  "}  # empty: the student's prompt
    assert teacher_messages(ex, cfg2) == (chat[1:], False)
    ex.columns = {"teacher_prompt": 7}
    with pytest.raises(ConfigError, match="teacher_prompt.*string or a list"):
        teacher_messages(ex, cfg2)


class Recorder(Wrapper):
    """An inner teacher that records what it was asked to score, then scores with the real one."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def score(self, rollouts, request):
        self.seen.append(copy.deepcopy(rollouts))
        return self.inner.score(rollouts, request)


def test_privileged_context_changes_the_teacher_signal_and_nothing_the_student_sees(tiny_paths, tmp_path):
    priv = _cfg(tiny_paths, tmp_path / "a", _write(tmp_path / "p.jsonl", _rows()), f"teacher.path={tiny_paths['teacher']}",
                "data.max_prompt_tokens=16")  # shorter than the teacher's prompts: they keep their own length
    plain = _cfg(tiny_paths, tmp_path / "b", _write(tmp_path / "q.jsonl", _rows(context=False)),
                 f"teacher.path={tiny_paths['teacher']}", "data.max_prompt_tokens=16")
    a = Distiller(priv)  # each Distiller seeds torch when built: build, then sample, one after the other
    a.teacher.inner = recorder = Recorder(a.teacher.inner)
    ba = a.collect(0)
    b = Distiller(plain)
    bb = b.collect(0)
    assert isinstance(a.teacher, PrivilegedTeacher) and not isinstance(b.teacher, PrivilegedTeacher)
    for x, y in zip(ba.prompt_ids, bb.prompt_ids):
        assert torch.equal(x, y)
    assert torch.equal(ba.completion_ids, bb.completion_ids) and torch.equal(ba.sampling_logprobs, bb.sampling_logprobs)
    sa, sb = a.score(ba), b.score(bb)
    (seen,) = recorder.seen
    assert torch.equal(seen.completion_ids, ba.completion_ids) and torch.equal(seen.completion_mask,
                                                                                ba.completion_mask)
    for i, ex in enumerate(ba.examples):
        row = ex.messages[-1]["content"]
        want = _ids([("user", f"{row}\n\n{ex.columns['privileged_context']}")])
        assert len(want) > 16 and torch.equal(seen.prompt_ids[i], want), "teacher prompt not rendered / cut"
        n = int(ba.completion_mask[i].sum())
        tokens = ba.completion_ids[i, :n]
        ref = torch.log_softmax(_logits(a.teacher_model, want, tokens), -1).gather(-1, tokens[:, None])[:, 0]
        torch.testing.assert_close(sa.token_logprobs[i, :n].double(), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sa.token_logprobs, sb.token_logprobs, atol=1e-4), "the context changed nothing"
    m = a.train_step(ba, sa)
    assert m["privileged_rows"] == 1.0 and 0.0 <= m["privileged_leak"] <= 1.0


def test_teacher_samples_answer_the_privileged_prompt_and_train_on_the_students(tiny_paths, tmp_path):
    """mix.seq_kd with a privileged teacher: the teacher samples from ITS prompt (the context in view): the
    logprobs it recorded for its tokens are a plain forward of the teacher on the hand-built privileged prompt,
    not on the student's; and the row trains on the student's prompt."""
    cfg = _cfg(tiny_paths, tmp_path / "a", _write(tmp_path / "p.jsonl", _rows()), f"teacher.path={tiny_paths['teacher']}",
               "mix.lmbda=0", "mix.seq_kd=true")
    d = Distiller(cfg)
    buffer = d.collect(0)
    assert buffer.sources == ["teacher"] * len(buffer)
    for i, ex in enumerate(buffer.examples):
        question = ex.messages[-1]["content"]
        assert torch.equal(buffer.prompt_ids[i], _ids([("user", question)])), "not the student's prompt"
        n = int(buffer.completion_mask[i].sum())
        tokens = buffer.completion_ids[i, :n]
        lp = {name: torch.log_softmax(_logits(d.teacher_model, _ids([("user", prompt)]), tokens), -1)
              .gather(-1, tokens[:, None])[:, 0]
              for name, prompt in (("view", f"{question}\n\n{ex.columns['privileged_context']}"), ("plain", question))}
        torch.testing.assert_close(buffer.sampling_logprobs[i, :n].double(), lp["view"], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(lp["view"], lp["plain"], atol=1e-3), "the context changes nothing here"


def test_teacher_prompt_budget_is_its_own(tiny_paths, tmp_path):
    data = _write(tmp_path / "p.jsonl", _rows())
    cfg = _cfg(tiny_paths, tmp_path, data, "teacher.self=live", "data.max_prompt_tokens=8",
               "data.max_teacher_prompt_tokens=20")
    d = Distiller(cfg)
    ex = d.train_set.examples[0]
    ids, used = d.teacher.teacher_prompt_ids([ex])
    full = _ids([("user", f"{ex.messages[-1]['content']}\n\n{ex.columns['privileged_context']}")])
    assert used == [True] and torch.equal(ids[0], full[-20:]) and d.teacher.prompts.truncated == 1
    assert len(d.prompts.prompt_ids(ex)) == 8


def test_rows_without_context_fall_back_with_a_warning(tiny_paths, tmp_path, caplog):
    data = _write(tmp_path / "p.jsonl", _rows(12, every=3))
    with caplog.at_level(logging.WARNING, logger="protege"):
        d = Distiller(_cfg(tiny_paths, tmp_path, data, "teacher.self=base", "teacher.system_prompt=Be exact."))
    assert any("8 of 12 training rows have no 'privileged_context'" in r.message for r in caplog.records)
    ex = next(e for e in d.train_set.examples if "privileged_context" not in e.columns)
    ids, used = d.teacher.teacher_prompt_ids([ex])
    assert used == [False] and torch.equal(ids[0], _ids([("system", "Be exact."), ("user", ex.messages[-1]["content"])]))


def test_errors_name_the_problem(tiny_paths, tmp_path):
    data = _write(tmp_path / "p.jsonl", _rows(context=False))
    cfg = _cfg({**tiny_paths, "student": str(tmp_path / "no-such-model")}, tmp_path, data,
               f"teacher.path={tiny_paths['teacher']}", "data.privileged_context_column=solution")
    with pytest.raises(ConfigError, match=r"privileged_context_column='solution'.*columns are \['source'\]"):
        Distiller(cfg, tokenizer=TOK)  # fails on the data, before the (missing) student model is loaded
    base = ["student.path=s", f"data.path={data}"]
    for extra, match in [(["teacher.self=ema", "teacher.path=t"], "exactly one of teacher.path.*teacher.self"),
                         (["teacher.self=eman"], r"teacher.self: Input should be 'base', 'ema' or 'live'"),
                         (["teacher.self=ema", "teacher.ema_rate=0"], "teacher.ema_rate"),
                         (["teacher.self=base", "mix.seq_kd=true"], "mix.seq_kd.*teacher.self=base"),
                         (["teacher.path=t", "data.privileged_template='{prompt}'"], "lacks {privileged_context}"),
                         (["teacher.path=t", "data.privileged_template='{ctx}'"], "privileged_template.*KeyError"),
                         (["teacher.path=t", "loss.name=sampled_pg", "loss.token_clip=1"], "token_clip.*ratio_clip")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, base + extra)


def test_leak_signal_counts_confident_copies_of_unseen_ngrams():
    student = [torch.tensor([5, 6, 7])]
    teacher = [torch.tensor([5, 6, 7, 20, 21, 22, 23, 24])]  # privileged 3-grams: (7,20,21) ... (22,23,24)
    completion = torch.tensor([[20, 21, 22, 23, 5, 6, 7, 22, 23, 24]])
    lp = torch.log(torch.tensor([[.9, .9, .9, .4, .9, .9, .9, .9, .9, .9]]))
    mask = torch.ones_like(completion, dtype=torch.bool)
    # t=2 (20,21,22) copy; t=3 (21,22,23) p=.4 not confident; t=6 (5,6,7) seen by the student; t=9 (22,23,24) copy
    assert privileged_leak(completion, mask, lp, teacher, student, n=3) == pytest.approx(2 / 10)
    mask[0, 9] = False
    assert privileged_leak(completion, mask, lp, teacher, student, n=3) == pytest.approx(1 / 9)
    assert math.isnan(privileged_leak(completion, mask & False, lp, teacher, student, n=3))


def test_token_clip_clamps_each_tokens_loss_not_each_entry():
    torch.manual_seed(0)
    n, h, v = 12, 8, 16
    hidden, weight = torch.randn(1, n, h, requires_grad=True), torch.randn(v, h)
    t_hidden, t_weight = torch.randn(1, n, h), torch.randn(v, h)
    mb = Rollouts(prompt_ids=[torch.tensor([1])], completion_ids=torch.randint(0, v, (1, n)),
                  completion_mask=torch.ones(1, n, dtype=torch.bool))
    sig = TeacherSignal(token_logprobs=torch.zeros(1, n), hidden_states=t_hidden)
    q = torch.log_softmax(hidden[0] @ weight.T, -1)
    p = torch.log_softmax(t_hidden[0] @ t_weight.T, -1)
    entries = q.exp() * (q - p)  # reverse KL's terms per vocabulary entry: some are negative
    clip = float(entries.sum(-1).median().detach())
    ref = entries.sum(-1).clamp(0, clip)
    out = Objective.build(LossConfig(token_clip=clip), teacher_local=True).per_token_loss(hidden, weight, mb, sig,
                                                                                           t_weight)
    assert (ref == clip).any() and (ref < clip).any(), "pick a clip that cuts some tokens and not others"
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-6)
    assert (out >= 0).all()
    g, = torch.autograd.grad(out.sum(), hidden)
    g_ref, = torch.autograd.grad(ref.sum(), hidden)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    q, p = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])  # OPSD #24: clip each entry at 0.05, then sum
    assert (q * (q / p).log()).clamp(max=0.05).sum() < 0 < clip_token_loss((q * (q / p).log()).sum(), 0.05)


LOSSES = [("reverse_kl-full", ["loss.name=reverse_kl"]), ("reverse_kl-teacher-topk", ["loss.support=teacher"]),
          ("forward_kl", ["loss.name=forward_kl"]), ("jsd", ["loss.name=jsd"]), ("tvd", ["loss.name=tvd"]),
          ("skew_forward_kl-union", ["loss.name=skew_forward_kl", "loss.support=union"]),
          ("skew_reverse_kl-student", ["loss.name=skew_reverse_kl", "loss.support=student"]),
          ("reverse_kl-sampled", ["loss.support=sampled"]), ("sampled_pg", ["loss.name=sampled_pg"]),
          ("sft", ["loss.name=sft", "mix.lmbda=0"]), ("reverse_kl-full-clip", ["loss.token_clip=0.05"])]


@pytest.mark.parametrize("name, overrides", LOSSES, ids=[x[0] for x in LOSSES])
def test_every_loss_trains_with_a_privileged_self_teacher(tiny_paths, tmp_path, name, overrides):
    data = _write(tmp_path / "p.jsonl", _rows())
    d = Distiller(_cfg(tiny_paths, tmp_path, data, "teacher.self=base", "optim.lr=0.05", *overrides))
    for step in range(2):  # move the student away from its base weights, so that the divergence is sizeable
        d.train_step()
    buffer = d.collect(2)
    base = copy.deepcopy(d.teacher.inner.model)  # the frozen starting weights
    ref = None
    if name.startswith("reverse_kl-full") or name == "reverse_kl-teacher-topk":
        values = []
        for i, ex in enumerate(buffer.examples):
            tokens = buffer.completion_ids[i, : int(buffer.completion_mask[i].sum())]
            q = torch.softmax(_logits(d.student, buffer.prompt_ids[i], tokens), -1)
            teacher_prompt = _ids([("user", f"{ex.messages[-1]['content']}\n\n{ex.columns['privileged_context']}")])
            p = torch.softmax(_logits(base, teacher_prompt, tokens), -1)
            if name == "reverse_kl-teacher-topk":  # the teacher's top-4 + one tail category
                keep = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, p.topk(4, -1).indices, True)
                q, p = (torch.cat([torch.where(keep, x, 0), 1 - torch.where(keep, x, 0).sum(-1, keepdim=True)], -1)
                        for x in (q, p))
            kl = torch.where(q > 0, q * (q.log() - p.log()), 0.0).sum(-1)
            values.append(kl.clamp(0, 0.05) if name.endswith("clip") else kl)
        ref = float(torch.cat(values).mean())
    m = d.train_step(buffer)
    assert math.isfinite(m["loss"]) and m["privileged_rows"] == 1.0
    if ref is not None:
        assert ref > 1e-3, "the divergence is too small to tell a wrong teacher prompt from the right one"
        assert m["loss"] == pytest.approx(ref, rel=1e-4, abs=1e-6)
