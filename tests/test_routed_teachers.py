"""Several named teachers (protege.teacher.routed / several): every row scored by the teacher its key names,
the mixture against its brute-force formula, clear errors (unknown key, missing column, changed set on resume),
and a 2-step run with one in-process (offloaded) teacher and one behind the real server on 127.0.0.1.

References are written here from the models' plain forward passes (model(input_ids).logits), never from
the code under test."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import make_model, make_tokenizer  # noqa: E402

from protege.errors import ResumeMismatch  # noqa: E402
from protege.config import LossConfig, load_config  # noqa: E402
from protege.data import Example  # noqa: E402
from protege.objective import Objective  # noqa: E402
from protege.records import Rollouts  # noqa: E402
from protege.teacher.base import ScoreRequest  # noqa: E402
from protege.teacher.local import LocalTeacher  # noqa: E402
from protege.teacher.routed import RoutedTeacher, RoutingError  # noqa: E402
from protege.teacher.identity import identity_changes  # noqa: E402
from protege.teacher.several import OffloadedTeacher  # noqa: E402
from protege.trainer import Distiller  # noqa: E402

VOCAB = 128


@pytest.fixture(scope="module")
def models():
    """Two clearly different teachers (other seeds, other hidden sizes) and a student."""
    return {"a": make_model(2, seed=11).eval(), "b": make_model(1, seed=12, hidden=32).eval(),
            "student": make_model(1, seed=13, hidden=32)}


def rollouts(keys: list, seed: int = 0) -> Rollouts:
    g = torch.Generator().manual_seed(seed)
    n = len(keys)
    lens = torch.randint(1, 9, (n,), generator=g)
    t = int(lens.max())
    mask = torch.arange(t)[None] < lens[:, None]  # (N, T)
    comp = torch.randint(3, VOCAB, (n, t), generator=g) * mask
    prompts = [torch.randint(3, VOCAB, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g) for _ in keys]
    examples = [Example(messages=[{"role": "user", "content": "x"}], columns={} if k is None else {"teacher": k})
                for k in keys]
    lp = torch.randn(n, t, generator=g).clamp(max=0) - 1
    return Rollouts(prompt_ids=prompts, completion_ids=comp, completion_mask=mask, sampling_logprobs=lp * mask,
                    sources=["student"] * n, finish_reasons=["stop"] * n, examples=examples)


@torch.no_grad()
def ref_logprobs(model, r: Rollouts, row: int, temperature: float = 1.0) -> torch.Tensor:
    """(L, V) the model's log-softmax at the positions predicting row `row`'s completion tokens."""
    p, n = r.prompt_ids[row], int(r.completion_mask[row].sum())
    ids = torch.cat([p, r.completion_ids[row, :n]])[None]
    logits = model(input_ids=ids).logits[0, len(p) - 1: len(p) - 1 + n].float()
    return torch.log_softmax(logits / temperature, -1)


def local(model) -> LocalTeacher:
    return LocalTeacher(model, pad_id=0)


def test_each_row_is_scored_by_the_teacher_its_key_names(models):
    keys = ["a", "b", "b", "a", "b", None]  # the last row: no key -> the default teacher
    r = rollouts(keys)
    routed = RoutedTeacher({"a": local(models["a"]), "b": local(models["b"])}, default="a")
    sig = routed.score(r, ScoreRequest(topk=4, hidden=True, entropy=True, temperature=0.7))
    w = routed.output_weight  # (V, 48 + 32)
    assert w.shape == (VOCAB, 48 + 32)
    for row, key in enumerate(keys):
        own, other = models[key or "a"], models["b" if (key or "a") == "a" else "a"]
        ref = ref_logprobs(own, r, row, 0.7)  # (L, V)
        n = ref.shape[0]
        tok = r.completion_ids[row, :n]
        torch.testing.assert_close(sig.token_logprobs[row, :n], ref.gather(-1, tok[:, None])[:, 0], atol=1e-5, rtol=0)
        assert not torch.allclose(sig.token_logprobs[row, :n], ref_logprobs(other, r, row, 0.7).gather(
            -1, tok[:, None])[:, 0], atol=1e-2)  # the teachers really differ
        torch.testing.assert_close(sig.topk_logprobs[row, :n], ref.topk(4, -1).values, atol=1e-5, rtol=0)
        assert torch.equal(sig.topk_ids[row, :n], ref.topk(4, -1).indices)
        torch.testing.assert_close(sig.entropy[row, :n], -(ref.exp() * ref).sum(-1), atol=1e-5, rtol=0)
        # exact logits from the concatenated hidden states: this row's teacher's lm_head, never the other's
        rebuilt = torch.log_softmax(sig.hidden_states[row, :n].float() @ w.float().T / 0.7, -1)
        torch.testing.assert_close(rebuilt, ref, atol=1e-4, rtol=0)


def test_full_vocabulary_loss_uses_each_rows_teacher(models):
    """The objective's exact reverse KL with routed hidden states = KL(q || p_key(row)) computed here."""
    keys = ["b", "a", "a", "b"]
    r = rollouts(keys, seed=3)
    routed = RoutedTeacher({"a": local(models["a"]), "b": local(models["b"])})
    obj = Objective.build(LossConfig(name="reverse_kl", support="full", chunk_size=16), teacher_local=True)
    sig = routed.score(r, obj.teacher_request(r))
    student = models["student"]
    from protege.forward import HiddenStates, forward_completion_hidden, output_weight

    h = forward_completion_hidden(HiddenStates(student), r.prompt_ids, r.completion_ids, r.completion_mask, 0)
    got = obj.per_token_loss(h, output_weight(student), r, sig, routed.output_weight).detach()  # (N, T)
    for row, key in enumerate(keys):
        p, q = ref_logprobs(models[key], r, row), ref_logprobs(student, r, row)
        want = (q.exp() * (q - p)).sum(-1)
        torch.testing.assert_close(got[row, : len(want)], want, atol=1e-4, rtol=1e-4)


def test_mixture_equals_its_brute_force_formula(models):
    r = rollouts(["a", "b", None, "a"], seed=5)
    weights = {"a": 3.0, "b": 1.0}
    w = {"a": 0.75, "b": 0.25}
    mix = RoutedTeacher({"a": local(models["a"]), "b": local(models["b"])}, mode="mixture", weights=weights)
    query = torch.randint(0, VOCAB, (*r.completion_ids.shape, 5))
    sig = mix.score(r, ScoreRequest(hidden=True, query_ids=query))
    obj = Objective.build(LossConfig(name="reverse_kl", support="full", chunk_size=16), teacher_local=True)
    student = models["student"]
    from protege.forward import HiddenStates, forward_completion_hidden, output_weight

    h = forward_completion_hidden(HiddenStates(student), r.prompt_ids, r.completion_ids, r.completion_mask, 0)
    got = obj.per_token_loss(h, output_weight(student), r, sig, mix.output_weight).detach()
    for row in range(len(r)):
        lp = {k: ref_logprobs(models[k], r, row) for k in w}
        n = lp["a"].shape[0]
        tok, q = r.completion_ids[row, :n], ref_logprobs(student, r, row)
        # sampled-token signal: sum_i w_i log p_i(y)  (sampled_pg's advantage = this - log q)
        want_tok = sum(w[k] * lp[k].gather(-1, tok[:, None])[:, 0] for k in w)
        torch.testing.assert_close(sig.token_logprobs[row, :n], want_tok, atol=1e-5, rtol=0)
        want_q = sum(w[k] * lp[k].gather(-1, query[row, :n]) for k in w)
        torch.testing.assert_close(sig.query_logprobs[row, :n], want_q, atol=1e-5, rtol=0)
        # dense: reverse KL to the normalised geometric mixture p_w = softmax(sum_i w_i log p_i)
        geo = torch.log_softmax(sum(w[k] * lp[k] for k in w), -1)
        kl_geo = (q.exp() * (q - geo)).sum(-1)
        torch.testing.assert_close(got[row, :n], kl_geo, atol=1e-4, rtol=1e-4)
        # the docstring's identity: KL(q||p_w) = sum_i w_i KL(q||p_i) + log Z, log Z <= 0
        log_z = torch.logsumexp(sum(w[k] * lp[k] for k in w), -1)
        per_teacher = sum(w[k] * (q.exp() * (q - lp[k])).sum(-1) for k in w)
        torch.testing.assert_close(kl_geo, per_teacher + log_z, atol=1e-4, rtol=1e-4)
        assert bool((log_z <= 1e-6).all())


def test_offloaded_teacher_scores_like_the_resident_one(models):
    """On this CPU-only machine the device is the CPU: the code path runs (moved for the pass, back after)."""
    r = rollouts(["a"] * 3, seed=7)
    req = ScoreRequest(topk=3, hidden=True)
    resident = local(models["a"]).score(r, req)
    off = OffloadedTeacher(local(models["a"]), models["a"], "cpu")
    got = off.score(r, req)
    assert off.passes_on == ["cpu"] and next(models["a"].parameters()).device.type == "cpu"
    for key in ("token_logprobs", "topk_logprobs", "hidden_states"):
        assert torch.equal(getattr(got, key), getattr(resident, key))


# ------------------------------------------------------------------------------- config and data errors
def write_rows(path, keys, with_column=True):
    rows = [{"prompt": f"what is {i}+{i}?", "completion": str(2 * i), **({"teacher": k} if with_column else {}),
             "domain": "x"} for i, k in enumerate(keys)]
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return str(path)


def cfg_of(tmp_path, data, *extra, teachers=None):
    teachers = teachers or [{"name": "a", "path": "/nonexistent/a"}, {"name": "b", "path": "/nonexistent/b"}]
    return load_config(None, ["student.path=/nonexistent/student", f"data.path={data}", f"output.dir={tmp_path / 'o'}",
                              "train.prompts_per_step=4", "train.micro_batch_size=2", "rollout.max_new_tokens=6",
                              "output.progress=false", "train.num_threads=1", "data.eval_prompts=0",
                              f"teachers={json.dumps(teachers)}", *extra])


def test_unknown_key_and_missing_column_fail_before_any_model_loads(tmp_path):
    tok = make_tokenizer()  # the models' paths do not exist: the routing error must come first
    bad = write_rows(tmp_path / "bad.jsonl", ["a", "b", "c"])
    with pytest.raises(RoutingError, match=r"row 2: teacher='c' names no teacher; known teachers: \['a', 'b'\]"):
        Distiller(cfg_of(tmp_path, bad), tokenizer=tok)
    none = write_rows(tmp_path / "none.jsonl", ["a", "b"], with_column=False)
    with pytest.raises(RoutingError, match=r"has no 'teacher' value \(columns found: \['domain', 'prompt/messages'\]"):
        Distiller(cfg_of(tmp_path, none), tokenizer=tok)
    with pytest.raises(RoutingError, match="names no teacher"):  # another column, still checked
        Distiller(cfg_of(tmp_path, bad, "data.teacher_column=domain"), tokenizer=tok)
    with pytest.raises(ValueError, match=r"data.default_teacher='z' names no teacher; known: \['a', 'b'\]"):
        cfg_of(tmp_path, none, "data.default_teacher=z")
    with pytest.raises(ValueError, match="not both"):
        cfg_of(tmp_path, none, "teacher.path=/x")
    with pytest.raises(ValueError, match=r"names \['a'\] are used more than once"):
        cfg_of(tmp_path, none, teachers=[{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}])


def test_teacher_identity_changes_are_named():
    """identity_changes names each field that differs between two routed identities, as field: old -> new."""
    two = {"kind": "mixture", "teachers": [{"name": "a", "kind": "in-process", "source": "/a", "weight": 0.5},
                                           {"name": "b", "kind": "server", "urls": ["http://h:1"], "weight": 0.5}]}
    assert identity_changes(two, two) == []
    swapped = {"kind": "mixture", "teachers": two["teachers"][::-1]}
    changes = identity_changes(two, swapped)
    assert "teachers[0].name: 'a' -> 'b'" in changes and "teachers[1].name: 'b' -> 'a'" in changes
    assert "teachers[0].source: '/a' -> '(none)'" in changes
    assert identity_changes({"kind": "routed", "teachers": []}, two)[0] == "kind: 'routed' -> 'mixture'"


# ------------------------------------------------------------------------------- end to end
def test_two_steps_routed_in_process_and_server_then_resume_with_other_set(models, tmp_path):
    """Teacher a in process (offloaded between passes), teacher b behind the real server app on 127.0.0.1;
    2 steps log teacher/<name>/ metrics; resuming with another set stops with a message naming the change."""
    from protege.server import HFBackend, create_app
    from protege.server.background import serve_in_thread

    tok = make_tokenizer()
    data = write_rows(tmp_path / "rows.jsonl", ["a", "b"] * 4)
    with serve_in_thread(create_app(HFBackend(models["b"], model_name="tiny-b"), max_k=16)) as server:
        teachers = [{"name": "a", "path": "in-memory-a", "offload": True}, {"name": "b", "urls": [server.url]}]
        cfg = cfg_of(tmp_path, data, "loss.support=teacher", "loss.top_k=4", "output.diagnostics_top_k=4",
                     "train.max_steps=2", teachers=teachers)
        d = Distiller(cfg, student=make_model(1, seed=13, hidden=32), teacher_model={"a": models["a"]}, tokenizer=tok)
        history = d.train()
    steps = [m for m in history if "loss" in m]
    assert len(steps) == 2
    for m in steps:
        for name in ("a", "b"):
            for key in ("rows", "loss", "sampled_rkl", "teacher_nll", "completion_len_mean", "overlap_ratio"):
                assert f"teacher/{name}/{key}" in m, (name, key, sorted(m))
        assert m["teacher/a/rows"] + m["teacher/b/rows"] == 4
        # the step loss is the token-weighted sum of the per-teacher losses
        tokens = {n: m[f"teacher/{n}/completion_len_mean"] * m[f"teacher/{n}/rows"] for n in "ab"}
        joint = sum(m[f"teacher/{n}/loss"] * tokens[n] for n in "ab") / sum(tokens.values())
        assert joint == pytest.approx(m["loss"], rel=1e-4)
    assert d.teacher.teachers["a"].passes_on == ["cpu", "cpu"]  # one pass per step, on the device (the CPU here)
    logged = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert any("teacher/b/sampled_rkl" in x for x in logged)
    other = [{"name": "a", "path": "in-memory-a"}, {"name": "c", "path": "in-memory-c"}]
    cfg2 = cfg_of(tmp_path, write_rows(tmp_path / "rows2.jsonl", ["a", "c"] * 4), "loss.support=teacher",
                  "loss.top_k=4", "output.diagnostics_top_k=4", "train.max_steps=3", "resume=true", teachers=other)
    d2 = Distiller(cfg2, student=make_model(1, seed=13, hidden=32), teacher_model={"a": models["a"], "c": models["b"]},
                   tokenizer=tok)
    with pytest.raises(ResumeMismatch, match=r"teachers\[1\]\.name: 'b' -> 'c'"):
        d2.train()


def test_mixture_run_with_held_out_evaluation(models, tmp_path):
    """Mixture of two in-process teachers, full-vocabulary reverse KL, held-out eval through the routed teacher."""
    tok = make_tokenizer()
    data = write_rows(tmp_path / "rows.jsonl", ["a", "b"] * 5, with_column=False)  # mixture: no column needed
    teachers = [{"name": "a", "path": "in-memory-a", "weight": 3}, {"name": "b", "path": "in-memory-b"}]
    cfg = cfg_of(tmp_path, data, "teachers_mode=mixture", "train.max_steps=2", "data.eval_fraction=0.2",
                 "data.eval_prompts=2", teachers=teachers)
    d = Distiller(cfg, student=make_model(1, seed=13, hidden=32), teacher_model={"a": models["a"], "b": models["b"]},
                  tokenizer=tok)
    history = d.train()
    evals = [m for m in history if "eval/rkl" in m]
    assert len(evals) == 2 and all(m["eval/rkl"] >= 0 for m in evals)  # exact KL to the normalised mixture
    steps = [m for m in history if "loss" in m]
    assert all(f"teacher/{n}/sampled_rkl" in m and f"teacher/{n}/overlap_ratio" in m for m in steps for n in "ab")
    assert d.teacher.weights == {"a": 0.75, "b": 0.25}


def test_shipped_example_config_loads_and_every_row_routes():
    from pathlib import Path

    from protege.data import load_prompt_sets
    from protege.teacher.several import check_routing

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "examples" / "several_teachers.yaml",
                      [f"data.path={root / 'examples' / 'several_teachers.jsonl'}"])
    train, held = load_prompt_sets(cfg.data, seed=0)
    check_routing(cfg, train, held)
    assert [t.name for t in cfg.teachers] == ["math", "chat"] and len(train) == 17


def test_an_ema_self_teacher_among_routed_teachers_follows_its_formula_and_resumes(models, tmp_path):
    """teachers: [me (self: ema), a (in process)]: the routed set forwards the trainer's after_step to the EMA
    member (theta_T <- (1 - r) theta_T + r theta_S, recomputed here from the student's weights), checkpoints it
    by name and loads it back; an EMA member cannot be offloaded (it would move the student)."""
    rate, tok = 0.3, make_tokenizer()
    data = write_rows(tmp_path / "rows.jsonl", ["me", "a"] * 4)
    teachers = [{"name": "me", "self": "ema", "ema_rate": rate}, {"name": "a", "path": "in-memory-a"}]
    cfg = cfg_of(tmp_path, data, "optim.lr=3e-2", teachers=teachers)
    d = Distiller(cfg, student=make_model(1, seed=13, hidden=32), teacher_model={"a": models["a"]}, tokenizer=tok)
    want = {n: p.detach().clone().double() for n, p in d.student.named_parameters() if p.requires_grad}
    for _ in range(2):
        d.train_step()
        now = dict(d.student.named_parameters())
        want = {n: (1 - rate) * w + rate * now[n].detach().double() for n, w in want.items()}
    state = d.teacher.state_dict()
    assert list(state) == ["me"]
    for n in want:
        torch.testing.assert_close(state["me"]["ema"][n].double(), want[n], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(now[n].detach().double(), want[n], atol=1e-5) for n in want), "EMA == student"
    d2 = Distiller(cfg, student=make_model(1, seed=13, hidden=32), teacher_model={"a": models["a"]}, tokenizer=tok)
    d2.teacher.load_state_dict(state)
    for n in want:
        torch.testing.assert_close(d2.teacher.state_dict()["me"]["ema"][n], state["me"]["ema"][n], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no state for teacher 'me'"):
        d2.teacher.load_state_dict({})
    off = cfg_of(tmp_path, data, teachers=[{**teachers[0], "offload": True}, teachers[1]])
    with pytest.raises(ValueError, match="'me' is the student itself .* remove offload"):
        Distiller(off, student=make_model(1, seed=13, hidden=32), teacher_model={"a": models["a"]}, tokenizer=tok)
