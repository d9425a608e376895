"""Mistakes a user can make end in ONE `protege train: error:` line naming the field, file or URL, exit
code 2, no traceback (issue 18, item 7); `--debug` / PROTEGE_DEBUG=1 bring the traceback back, and
real bugs keep theirs."""

from __future__ import annotations

import shutil

import pytest

from protege.cli import main

PREFIX = "protege train: error:"


def _base(paths, out, student=None):
    return [f"--student.path={student or paths['student']}", f"--teacher.path={paths['teacher']}",
            f"--data.path={paths['data']}", "--rollout.max_new_tokens=4", "--train.prompts_per_step=2",
            "--train.micro_batch_size=2", "--train.max_steps=1", f"--output.dir={out}", "--output.progress=false",
            "--train.num_threads=1", "--data.eval_prompts=0"]


def _one_error_line(capsys, rc) -> str:
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert rc == 2
    assert "Traceback" not in text
    lines = [ln for ln in captured.err.splitlines() if PREFIX in ln]
    assert len(lines) == 1 and captured.err.rstrip("\n").splitlines()[-1] == lines[0], captured.err
    return lines[0]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("PROTEGE_DEBUG", raising=False)


def test_unknown_key_in_the_config_file(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("student: {path: s}\nteacher: {path: t}\nloss: {nme: jsd, top_k: 0}\n")
    line = _one_error_line(capsys, main(["train", str(cfg)]))
    assert "loss.nme: unknown key" in line and "loss.top_k" in line  # every problem, on the one line


def test_bad_yaml_names_the_file(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("student:\n  path: [unclosed\nteacher: {path: t}\n")
    line = _one_error_line(capsys, main(["train", str(cfg)]))
    assert str(cfg) in line and "YAML" in line


def test_bad_yaml_in_an_override(capsys):
    line = _one_error_line(capsys, main(["train", "--student.path", "s", "--teacher.path", "t",
                                         "--loss.top_k", "[1,"]))
    assert "loss.top_k" in line


def test_missing_data_file(tiny_paths, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    line = _one_error_line(capsys, main(["train", *_base(tiny_paths, tmp_path), f"--data.path={missing}"]))
    assert str(missing) in line and "data.path" in line


def test_num_generations_is_bounded(tmp_path, capsys):
    line = _one_error_line(capsys, main(["train", "--student.path", str(tmp_path / "absent"), "--teacher.path", "t",
                                         "--rollout.num_generations", "100000"]))
    assert "rollout.num_generations" in line and "1024" in line


@pytest.mark.parametrize("override,field", [("rollout.temperature=1e-300", "rollout.temperature"),
                                            ("loss.temperature=1e-300", "loss.temperature"),
                                            ("optim.betas=[2, 0.9]", "optim.betas")])
def test_values_that_overflow_are_refused(tmp_path, capsys, override, field):
    line = _one_error_line(capsys, main(["train", "--student.path", str(tmp_path / "absent"), "--teacher.path", "t",
                                         override]))
    assert field in line


def test_top_k_above_the_vocabulary_fails_before_the_models_load(tiny_paths, tmp_path, capsys):
    student = tmp_path / "student"  # tokenizer only: loading its weights would fail with another error
    shutil.copytree(tiny_paths["student"], student)
    (student / "model.safetensors").unlink()
    line = _one_error_line(capsys, main(["train", *_base(tiny_paths, tmp_path / "out", student=student),
                                         "--loss.support=teacher", "--loss.top_k=100000"]))
    assert "loss.top_k" in line and "100000" in line and "vocabulary" in line


def test_teacher_down_is_one_line_naming_the_url(tiny_paths, tmp_path, capsys):
    """A teacher URL on a port nobody listens on (held, so no one can take it meanwhile)."""
    from protege.server.background import reserve_port

    sock = reserve_port()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        args = [a for a in _base(tiny_paths, tmp_path) if not a.startswith("--teacher.path")]
        rc = main(["train", *args, f"--teacher.urls=[{url}]", "--teacher.max_wait_s=1", "--loss.support=teacher"])
    finally:
        sock.close()
    assert url in _one_error_line(capsys, rc)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, how):
    from protege.config import ConfigError

    cfg = tmp_path / "run.yaml"
    cfg.write_text("student:\n  path: [unclosed\n")
    argv = ["train", str(cfg)]
    if how == "flag":
        argv.append("--debug")
    else:
        monkeypatch.setenv("PROTEGE_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(argv)


def test_real_bugs_keep_their_traceback(monkeypatch):
    import protege.recipe

    def broken(*a, **k):
        return {}["no such key"]

    monkeypatch.setattr(protege.recipe, "load_recipe", broken)
    with pytest.raises(KeyError):
        main(["train", "--student.path", "s", "--teacher.path", "t"])


def test_the_cli_quiets_library_noise(monkeypatch):
    """One httpx INFO line per teacher request and the transformers / GGUF progress bars of every load and save
    are silenced by the CLI (issue 28); PROTEGE_DEBUG=1 keeps them."""
    import logging

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from protege import modeling
    from protege.cli import quiet_libraries

    monkeypatch.setattr(gguf_utils, "tqdm", gguf_utils.tqdm)  # restored after the test
    monkeypatch.delenv("PROTEGE_DEBUG", raising=False)
    httpx_level = logging.getLogger("httpx").level
    try:
        hf_logging.enable_progress_bar()
        quiet_libraries()
        assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING
        assert not hf_logging.is_progress_bar_enabled()
        modeling._gguf_bar_follows_hf_setting()
        assert gguf_utils.tqdm(range(3)).disable  # the GGUF loader's bar
    finally:
        hf_logging.enable_progress_bar()
        logging.getLogger("httpx").setLevel(httpx_level)
        modeling._gguf_bar_follows_hf_setting()
    assert not gguf_utils.tqdm(range(3)).disable
