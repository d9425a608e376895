"""Resume never trusts the newest checkpoint blindly (issue 18, items 2 and 5).

A run is cut after step 2 (checkpoints step-1 and step-2), the newest checkpoint is damaged in one
way, and `resume=true` must warn, fall back to step-1 and finish with the same weights as a run
that was never interrupted; planted pickles must never run; with no usable checkpoint left the run
stops with one error naming the folders to remove. Also: a torn last line of metrics.jsonl, and a
finished run resumed again (a no-op).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from protege.config import load_config
from protege.trainer import train

NEWEST, OLDER = "step-0000002", "step-0000001"


def _cfg(paths, out, *extra):
    return load_config(None, [f"student.path={paths['student']}", f"teacher.path={paths['teacher']}",
                              f"data.path={paths['data']}", "rollout.max_new_tokens=4", "train.prompts_per_step=2",
                              "train.micro_batch_size=2", "optim.lr=3e-3", f"output.dir={out}",
                              "output.progress=false", "train.num_threads=1", "data.eval_prompts=0",
                              "output.save_every=1", "output.keep_last=5", *extra])


LORA = ("student.lora.enabled=true", "student.lora.r=4")


@pytest.fixture(scope="module")
def runs(tiny_paths, tmp_path_factory):
    """full: 3 uninterrupted steps; cut: the same run stopped after step 2 (for full and LoRA students)."""
    root = tmp_path_factory.mktemp("ckpt")
    for name, extra in (("plain", ()), ("lora", LORA)):
        train(_cfg(tiny_paths, root / name / "full", "train.max_steps=3", *extra))
        train(_cfg(tiny_paths, root / name / "cut", "train.max_steps=2", *extra))
    return root


class Payload:
    """Unpickling this creates `path` (what an attacker's object would do, harmlessly)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _weights(student_dir: Path) -> dict:
    name = "adapter_model.safetensors" if (student_dir / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(student_dir / name)


def _rewrite_weights(path: Path, fn) -> None:
    state = load_file(path)
    save_file({k: fn(k, v) for k, v in state.items()}, path, metadata={"format": "pt"})


def _corrupt(ckpt: Path, case: str, marker: Path) -> None:
    weights = ckpt / "student" / "model.safetensors"
    if case == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "garbage_weights":
        weights.write_bytes(os.urandom(weights.stat().st_size))
    elif case == "garbage_state":
        (ckpt / "trainer_state.pt").write_bytes(os.urandom(4096))
    elif case == "state_without_keys":
        torch.save({"hello": torch.zeros(3), "step": 2}, ckpt / "trainer_state.pt")
    elif case == "missing_rng":
        (ckpt / "rng-0.pt").unlink()
    elif case == "nan_weights":
        first = sorted(load_file(weights))[0]
        _rewrite_weights(weights, lambda k, v: v.clone().fill_(float("nan")) if k == first else v)
    elif case == "scaled_weights":
        _rewrite_weights(weights, lambda k, v: v * 1000)
    elif case == "pickle_state":
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        torch.save({**state, "stream": Payload(marker)}, ckpt / "trainer_state.pt")
    elif case == "pickle_rng":
        torch.save({"torch": Payload(marker), "python": Payload(marker)}, ckpt / "rng-0.pt")
    elif case == "truncated_adapter":
        a = ckpt / "student" / "adapter_model.safetensors"
        a.write_bytes(a.read_bytes()[:100])
    elif case == "missing_adapter":
        (ckpt / "student" / "adapter_model.safetensors").unlink()
    else:
        raise AssertionError(case)


CASES = ["truncated_weights", "garbage_weights", "garbage_state", "state_without_keys", "missing_rng", "nan_weights",
         "scaled_weights", "pickle_state", "pickle_rng"]
PARAMS = [pytest.param(c, True, id=c) for c in CASES] + \
    [pytest.param(c, False, id=f"{c}-no_manifest") for c in CASES] + \
    [pytest.param(c, True, id=c) for c in ("truncated_adapter", "missing_adapter")]


@pytest.mark.parametrize("case,keep_manifest", PARAMS)
def test_damaged_newest_checkpoint_falls_back(runs, tiny_paths, tmp_path, caplog, case, keep_manifest):
    kind = "lora" if "adapter" in case else "plain"
    out = tmp_path / "run"
    shutil.copytree(runs / kind / "cut", out)
    marker = tmp_path / "pwned"
    _corrupt(out / "checkpoints" / NEWEST, case, marker)
    if not keep_manifest:  # the attacker deletes the manifest too: refused though the contents look plausible
        (out / "checkpoints" / NEWEST / "manifest.json").unlink(missing_ok=True)
    extra = LORA if kind == "lora" else ()
    try:
        with caplog.at_level(logging.WARNING, logger="protege"):
            history = train(_cfg(tiny_paths, out, "train.max_steps=3", "resume=true", *extra))
    finally:
        assert not marker.exists(), "a pickled object planted in the checkpoint was executed"
    assert [h["step"] for h in history if "loss" in h] == [2, 3], "did not resume from the older checkpoint"
    assert any(NEWEST in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert (out / "checkpoints" / f"{NEWEST}.rejected").is_dir()
    want, got = _weights(runs / kind / "full" / "student"), _weights(out / "student")
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    assert logged == [1, 2, 3]


def test_a_checkpoint_from_a_protege_without_manifests_is_still_accepted(runs, tiny_paths, tmp_path, caplog):
    """A folder as a protege before manifests wrote it (no manifest.json, no checkpoint_format in its
    trainer_state.pt, the python RNG state saved as a tuple): resumed from, with a warning; the
    same folder with the manifest-era marks and its manifest deleted is refused (test above)."""
    out = tmp_path / "run"
    shutil.copytree(runs / "plain" / "cut", out)
    ckpt = out / "checkpoints" / NEWEST
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state.pop("checkpoint_format") == 2
    torch.save(state, ckpt / "trainer_state.pt")
    rng = torch.load(ckpt / "rng-0.pt", weights_only=True)
    version, internal, gauss = rng["python"]
    torch.save({**rng, "python": (version, tuple(internal), gauss)}, ckpt / "rng-0.pt")
    (ckpt / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="protege"):
        history = train(_cfg(tiny_paths, out, "train.max_steps=3", "resume=true"))
    assert [h["step"] for h in history if "loss" in h] == [3], "did not resume from the older-format checkpoint"
    assert any("written by an older protege" in r.getMessage() for r in caplog.records)
    assert not (out / "checkpoints" / f"{NEWEST}.rejected").exists()


def test_no_usable_checkpoint_is_one_clear_error(runs, tiny_paths, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs / "plain" / "cut", out)
    marker = tmp_path / "pwned"
    _corrupt(out / "checkpoints" / NEWEST, "pickle_state", marker)
    _corrupt(out / "checkpoints" / OLDER, "garbage_weights", marker)
    try:
        with pytest.raises(ValueError) as err:
            train(_cfg(tiny_paths, out, "train.max_steps=3", "resume=true"))
    finally:
        assert not marker.exists(), "a pickled object planted in the checkpoint was executed"
    msg = str(err.value)
    assert "no usable checkpoint" in msg and "\n" not in msg
    for name in (NEWEST, OLDER):
        assert str(out / "checkpoints" / name) in msg  # the folders to remove, by full path
        assert (out / "checkpoints" / name).is_dir()  # nothing moved when nothing could be used


def test_torn_last_metrics_line_does_not_block_resume(runs, tiny_paths, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(runs / "plain" / "cut", out)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.12')  # a kill during the write of step 3's line
    with caplog.at_level(logging.WARNING, logger="protege"):
        train(_cfg(tiny_paths, out, "train.max_steps=3", "resume=true"))
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    assert logged == [1, 2, 3]
    assert any("metrics.jsonl" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_bad_metrics_line_error_names_the_file(runs, tiny_paths, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs / "plain" / "cut", out)
    metrics = out / "metrics.jsonl"
    metrics.write_text("not json\n" + metrics.read_text())
    with pytest.raises(ValueError, match=r"metrics\.jsonl line 1"):
        train(_cfg(tiny_paths, out, "train.max_steps=3", "resume=true"))


def test_resuming_a_finished_run_is_a_no_op(tiny_paths, tmp_path):
    extra = ("train.max_steps=2", "data.eval_fraction=0.2", "data.eval_prompts=2")
    train(_cfg(tiny_paths, tmp_path, *extra))
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    weights = _weights(tmp_path / "student")
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    state = (tmp_path / "checkpoints" / NEWEST / "trainer_state.pt").read_bytes()
    history = train(_cfg(tiny_paths, tmp_path, *extra, "resume=true"))
    assert history == []
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics, "the final evaluation was logged again"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ckpts
    assert (tmp_path / "checkpoints" / NEWEST / "trainer_state.pt").read_bytes() == state
    after = _weights(tmp_path / "student")
    assert all(torch.equal(after[k], weights[k]) for k in weights)


@pytest.mark.parametrize("where", ["under_a_file", "a_file"])
def test_an_unusable_output_dir_is_one_error_naming_it(tiny_paths, tmp_path, where):
    """output.dir below a regular file, or a regular file itself: one ValueError naming output.dir, the
    path and the reason. Before: a bare [Errno 20] / [Errno 17] from mkdir."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "run" if where == "under_a_file" else blocker
    with pytest.raises(ValueError, match="output.dir=") as err:
        train(_cfg(tiny_paths, out, "train.max_steps=1"))
    assert str(out) in str(err.value) and "cannot be used" in str(err.value)
