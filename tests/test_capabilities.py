"""What each of protege's teacher kinds declares (protege.teacher.base.Capabilities), built as the trainer builds
them; the trainer and build.py act on these records alone, so each field is checked against what the kind is."""

from __future__ import annotations

import json

import pytest

from protege.config import load_config
from protege.trainer import Distiller


def _teacher(paths, tmp_path, *extra):
    cfg = load_config(None, [f"student.path={paths['student']}", f"data.path={paths['data']}",
                             "rollout.max_new_tokens=4", "train.prompts_per_step=2", "train.micro_batch_size=2",
                             f"output.dir={tmp_path}", "output.progress=false", "train.num_threads=1",
                             "data.eval_prompts=0", "train.max_steps=1", *extra])
    return Distiller(cfg)


def test_in_process_teacher(tiny_paths, tmp_path):
    d = _teacher(tiny_paths, tmp_path, f"teacher.path={tiny_paths['teacher']}")
    c = d.teacher.capabilities
    assert (c.remote, c.hidden, c.cross_tokenizer, c.reads_rows, c.generates, c.stateful, c.scores_student_rows) == \
        (False, True, False, False, True, False, True)
    assert c.identity == {"kind": "in-process", "source": tiny_paths["teacher"], "dtype": "float32"}
    assert d.objective.teacher_local and d.teacher_engine is not None  # decided from the record
    json.dumps(c.identity)  # JSON-able: it goes into checkpoints


def test_privileged_view_adds_rows_and_its_settings(tiny_paths, tmp_path):
    d = _teacher(tiny_paths, tmp_path, f"teacher.path={tiny_paths['teacher']}", "teacher.system_prompt=Be brief.")
    c = d.teacher.capabilities
    assert c.reads_rows and c.generates and not c.remote
    assert c.identity["kind"] == "in-process" and c.identity["system_prompt"] == "Be brief."


def test_ema_self_teacher_is_stateful_and_names_its_rate(tiny_paths, tmp_path):
    d = _teacher(tiny_paths, tmp_path, "teacher.self=ema", "teacher.ema_rate=0.25")
    c = d.teacher.capabilities
    assert c.stateful and not c.generates and not c.remote
    assert c.identity == {"kind": "self:ema", "ema_rate": 0.25}
    assert d.teacher_engine is None


def test_server_teacher_is_remote(tiny_paths, tmp_path):
    from protege.teacher.remote import RemoteTeacher

    d = _teacher(tiny_paths, tmp_path, "teacher.urls=[http://127.0.0.1:9]", "teacher.protocol=openai",
                 "loss.support=teacher", "teacher.vocab_size=128")  # openai + a given vocab_size: no request here
    c = d.teacher.capabilities
    assert c.remote and not c.hidden and not c.generates  # vLLM's prompt_logprobs: no hidden states
    assert c.identity == {"kind": "server", "protocol": "openai", "urls": ["http://127.0.0.1:9"]}
    assert not d.objective.teacher_local and d.teacher_engine is None
    protege_server = RemoteTeacher(["http://127.0.0.1:9"]).capabilities  # protege serve-teacher sends them
    assert protege_server.remote and protege_server.hidden


def test_api_teacher_reads_rows_samples_and_scores_only_its_own(tiny_paths, tmp_path):
    d = _teacher(tiny_paths, tmp_path, "teacher.urls=[http://127.0.0.1:9]", "teacher.protocol=openai-chat",
                 "teacher.model=m", "mix.lmbda=0", "mix.seq_kd=true", "loss.name=sft")
    c = d.teacher.capabilities
    assert (c.remote, c.hidden, c.reads_rows, c.generates, c.scores_student_rows) == (True, False, True, True, False)
    assert c.identity == {"kind": "api:openai-chat", "urls": ["http://127.0.0.1:9"], "model": "m"}
    assert d.teacher_engine is d.teacher  # it samples itself


def test_routed_teachers_combine_their_members(tiny_paths, tmp_path):
    teachers = [{"name": "a", "path": tiny_paths["teacher"]}, {"name": "b", "self": "ema", "ema_rate": 0.5}]
    d = _teacher(tiny_paths, tmp_path, "teachers_mode=mixture", f"teachers={json.dumps(teachers)}")
    c = d.teacher.capabilities
    assert c.stateful and not c.generates and not c.remote and c.hidden
    assert c.identity == {"kind": "mixture", "teachers": [
        {"name": "a", "weight": 0.5, "kind": "in-process", "source": tiny_paths["teacher"], "dtype": "float32"},
        {"name": "b", "weight": 0.5, "kind": "self:ema", "ema_rate": 0.5}]}


def test_teacher_kind_must_match_its_source():
    with pytest.raises(ValueError, match="teacher.kind=server needs teacher.urls"):
        load_config(None, ["student.path=s", "teacher.path=/t", "teacher.kind=server"])
    assert load_config(None, ["student.path=s", "teacher.urls=[http://h:1]"]).teacher.resolved_kind == "server"
