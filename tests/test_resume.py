"""Exact resume: a run interrupted at a checkpoint and resumed with resume=true equals the uninterrupted run.

"Equal" is bitwise: every deterministic field of every metrics.jsonl line (step losses, grad norms,
the learning rate, sampled completions' statistics, health warnings, held-out evaluations) and
every weight of the final student. Bitwise is the right bar here, not a tolerance: both runs do the
same float operations in the same order on CPU with one thread (gloo's two-rank sum is exact and
order-fixed), and every piece of state round-trips exactly (fp32 safetensors, torch.save of the
optimizer, scheduler, data position and RNG states), so any difference at all is a resume bug.

The interrupted run has the same config as the reference (same max_steps, so the same schedule):
it is stopped right after its step-k checkpoint (an exception in-process, a real SIGKILL in a
subprocess, or SIGKILL while a later checkpoint is half-committed), then a fresh Distiller (or
process) continues it with resume=true. Cases: warmup + cosine (with the lr of every step checked
against the formula below), LoRA, two processes on gloo (on-policy generation, held-out evaluation,
a checkpoint across ranks, per-rank RNG), and a two-stage recipe interrupted in its second stage.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import free_port

from protege.config import load_config
from protege.recipe import load_recipe, run_recipe
from protege.trainer import Distiller

REPO = Path(__file__).resolve().parents[1]
UNTIMED = ("time_", "tokens_per_s", "train_tokens_per_s")  # wall-clock fields differ between any two runs


class Interrupted(Exception):
    """Raised by the simulated crash right after a checkpoint was written."""


def _args(paths, out, *extra) -> list[str]:
    return [f"student.path={paths['student']}", f"teacher.path={paths['teacher']}", f"data.path={paths['data']}",
            "rollout.max_new_tokens=8", "train.prompts_per_step=4", "train.micro_batch_size=2", "optim.lr=3e-3",
            f"output.dir={out}", "output.progress=false", "train.num_threads=1", "data.eval_prompts=0",
            "output.keep_last=10", *extra]


def _metrics(out) -> list[dict]:
    """metrics.jsonl without its wall-clock fields: what two equal runs must log identically."""
    lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x]
    return [{k: v for k, v in m.items() if not k.startswith(UNTIMED)} for m in lines]


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"


def _assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in want], "metrics.jsonl lost or repeated a line"
    for g, w in zip(got, want):
        assert g == w, f"step {w['step']}: resumed {g} != uninterrupted {w}"


def _stop_after_checkpoint(d: Distiller, step: int) -> Distiller:
    """Make `d` crash (raise Interrupted) right after it has written its step-`step` checkpoint."""
    save = d.save_checkpoint

    def save_then_crash():
        path = save()
        if d.state.step == step:
            raise Interrupted(path)
        return path

    d.save_checkpoint = save_then_crash
    return d


def lr_of_step(n: int, peak: float, warmup: int, total: int) -> float:
    """The lr that optimizer step n (1-based) uses: `warmup` steps rising linearly by peak/(warmup+1) from
    peak/(warmup+1), then a half cosine that starts at peak and would reach 0 one step after the last."""
    i = n - 1  # optimizer steps taken before this one
    if i < warmup:
        return peak * (i + 1) / (warmup + 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * (i - warmup) / (total - warmup)))


# A process that trains like `protege train` but SIGKILLs itself at the instant its step-4 checkpoint is
# fully written into step-0000004.tmp/ and not yet renamed to step-0000004/ (checkpoint.py commits with
# os.replace; if that ever changes the kill does not happen and the test says so).
KILL_SCRIPT = """
import os, signal, sys
real_replace = os.replace
def replace(src, dst, *a, **k):
    if str(src).endswith("step-0000004.tmp"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **k)
os.replace = replace
from protege.config import load_config
from protege.trainer import train
train(load_config(None, sys.argv[1:]))
"""


def test_warmup_cosine_sigkill_mid_checkpoint_resumes_exactly(tiny_paths, tmp_path):
    """Killed (SIGKILL) while committing the step-4 checkpoint, resumed from step 2: steps 3-7 and the final
    weights equal the uninterrupted run's, and every step's lr follows the warmup + cosine formula."""
    common = ["train.max_steps=7", "optim.warmup_steps=2", "optim.schedule=cosine", "output.save_every=2"]
    ref = Distiller(load_config(None, _args(tiny_paths, tmp_path / "ref", *common)))
    ref.train()
    want = _metrics(tmp_path / "ref")
    steps = [m for m in want if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 8))
    for m in steps:
        assert m["lr"] == pytest.approx(lr_of_step(m["step"], 3e-3, 2, 7), rel=1e-12, abs=0), m["step"]

    out = tmp_path / "killed"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), *_args(tiny_paths, out, *common)], env=env, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-checkpoint: {proc.stderr[-2000:]}"
    assert (out / "checkpoints" / "step-0000004.tmp").is_dir() and not (out / "student").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004.tmp"]

    resumed = Distiller(load_config(None, _args(tiny_paths, out, *common, "resume=true")))
    history = resumed.train()
    assert [h["step"] for h in history if "loss" in h] == [3, 4, 5, 6, 7]  # continued from step 2
    _assert_same_metrics(_metrics(out), want)
    _assert_same_weights(_weights(resumed.student), _weights(ref.student))
    _assert_same_weights(load_file(out / "student" / "model.safetensors"),
                         load_file(tmp_path / "ref" / "student" / "model.safetensors"))


def test_lora_resume_equals_uninterrupted(tiny_paths, tmp_path):
    """LoRA: the adapters (and their AdamW moments) come back from the checkpoint; every weight, adapters and
    frozen base, ends equal to the uninterrupted run's."""
    common = ["student.lora.enabled=true", "student.lora.r=4", "train.max_steps=5", "optim.warmup_steps=1",
              "optim.schedule=cosine", "output.save_every=2", "optim.lr=1e-2"]
    ref = Distiller(load_config(None, _args(tiny_paths, tmp_path / "ref", *common)))
    ref.train()
    want = _weights(ref.student)
    cut = _stop_after_checkpoint(Distiller(load_config(None, _args(tiny_paths, tmp_path / "cut", *common))), 2)
    with pytest.raises(Interrupted):
        cut.train()
    resumed = Distiller(load_config(None, _args(tiny_paths, tmp_path / "cut", *common, "resume=true")))
    resumed.train()
    _assert_same_metrics(_metrics(tmp_path / "cut"), _metrics(tmp_path / "ref"))
    _assert_same_weights(_weights(resumed.student), want)
    fresh = _weights(Distiller(load_config(None, _args(tiny_paths, tmp_path / "fresh", *common))).student)
    trained = [k for k in want if "lora_" in k and not torch.equal(want[k], fresh[k])]
    assert trained, "the adapters did not move: this test would not see a missing adapter reload"


# Two ranks in one torchrun launch (process start-up is the expensive part): the uninterrupted run, the
# same config crashed right after its step-2 checkpoint, then a fresh Distiller resuming it. Each rank saves
# its final weights of both runs; rank 0 writes metrics.jsonl.
DIST_SCRIPT = """
import sys, torch
from protege.config import load_config
from protege.trainer import Distiller
from accelerate import Accelerator

class Interrupted(Exception):
    pass

ref_dir, cut_dir, args = sys.argv[1], sys.argv[2], sys.argv[3:]
acc = Accelerator(cpu=True)
acc.end_training = lambda: None  # keep the process group for the next run in this process
ref = Distiller(load_config(None, [*args, f"output.dir={ref_dir}"]), accelerator=acc)
ref.train()
cut = Distiller(load_config(None, [*args, f"output.dir={cut_dir}"]), accelerator=acc)
save = cut.save_checkpoint
def save_then_crash():
    path = save()
    if cut.state.step == 2:
        raise Interrupted
    return path
cut.save_checkpoint = save_then_crash
try:
    cut.train()
    raise SystemExit("the run was not interrupted")
except Interrupted:
    pass
resumed = Distiller(load_config(None, [*args, f"output.dir={cut_dir}", "resume=true"]), accelerator=acc)
resumed.train()
weights = lambda d: {k: v.detach().clone() for k, v in d.student.state_dict().items()}
torch.save({"ref": weights(ref), "resumed": weights(resumed)}, f"{cut_dir}/weights-{acc.process_index}.pt")
"""


def test_two_processes_on_policy_with_eval_resume_exactly(tiny_paths, tmp_path):
    """2 ranks (gloo): on-policy generation with each rank's own RNG stream, held-out evaluation every 2 steps,
    a checkpoint written across ranks; resumed from it, both ranks end bitwise equal to the uninterrupted run."""
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    args = [a for a in _args(tiny_paths, "unused") if not a.startswith("output.dir=")]
    args += ["mix.lmbda=1", "train.micro_batch_size=1", "train.max_steps=4", "optim.warmup_steps=1",
             "optim.schedule=cosine", "output.save_every=2", "output.eval_every=2", "data.eval_fraction=0.2",
             "data.eval_prompts=4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(ref), str(cut), *args]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    want = _metrics(ref)
    assert [m["step"] for m in want if "eval/rkl" in m] == [0, 2, 4]
    assert [m["step"] for m in want if "loss" in m] == [1, 2, 3, 4]
    assert all(m["lr"] == pytest.approx(lr_of_step(m["step"], 3e-3, 1, 4), rel=1e-12, abs=0)
               for m in want if "loss" in m)
    _assert_same_metrics(_metrics(cut), want)
    ranks = [torch.load(cut / f"weights-{r}.pt") for r in (0, 1)]
    for r in ranks:
        _assert_same_weights(r["resumed"], r["ref"])
    _assert_same_weights(ranks[1]["resumed"], ranks[0]["resumed"])


def _recipe(tmp_path, paths) -> Path:
    """Cold start (teacher samples, forward KL, 2 steps) then on-policy reverse KL (warmup + cosine, 5 steps)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "student": {"path": paths["student"]}, "teacher": {"path": paths["teacher"]},
        "data": {"path": paths["data"], "eval_fraction": 0.2, "eval_prompts": 4},
        "rollout": {"max_new_tokens": 8}, "optim": {"lr": 3e-3},
        "train": {"prompts_per_step": 4, "micro_batch_size": 2, "num_threads": 1},
        "output": {"dir": str(tmp_path / "run"), "progress": False, "keep_last": 10, "save_every": 2},
        "stages": [{"name": "cold_start", "mix": {"lmbda": 0.0, "seq_kd": True}, "loss": {"name": "forward_kl"},
                    "train": {"max_steps": 2}},
                   {"name": "on_policy", "loss": {"name": "reverse_kl"}, "train": {"max_steps": 5},
                    "optim": {"warmup_steps": 1, "schedule": "cosine"}, "output": {"eval_every": 2}}]}))
    return path


@pytest.fixture(scope="module")
def recipe_reference(tiny_paths, tmp_path_factory):
    """The uninterrupted recipe: its folder and each stage's final student weights."""
    root = tmp_path_factory.mktemp("recipe_ref")
    finals = {}
    run_recipe(load_recipe(_recipe(root, tiny_paths)),
               on_stage_end=lambda stage, d: finals.__setitem__(stage, _weights(d.student)))
    return root / "run", finals


def _crash_in_second_stage(monkeypatch, where: str) -> None:
    """checkpoint: crash right after on_policy's step-2 checkpoint; no_checkpoint: crash inside on_policy's
    step 1, before it has logged that step or written any checkpoint."""
    if where == "checkpoint":
        save = Distiller.save_checkpoint

        def save_then_crash(self):
            path = save(self)
            if self.out.name == "on_policy" and self.state.step == 2:
                raise Interrupted(path)
            return path
        monkeypatch.setattr(Distiller, "save_checkpoint", save_then_crash)
    else:
        step = Distiller.train_step

        def step_then_crash(self):
            m = step(self)
            if self.out.name == "on_policy" and self.state.step == 1:
                raise Interrupted(m)
            return m
        monkeypatch.setattr(Distiller, "train_step", step_then_crash)


@pytest.mark.parametrize("where, replayed", [("checkpoint", [3, 4, 5]), ("no_checkpoint", [1, 2, 3, 4, 5])])
def test_recipe_interrupted_in_second_stage_resumes_exactly(tiny_paths, tmp_path, monkeypatch, recipe_reference,
                                                            where, replayed):
    """Crashed in the on_policy stage (after its step-2 checkpoint, or before its first one); `resume=true` on
    the whole recipe keeps the finished cold_start stage as it was (its student goes on) and continues
    on_policy from its checkpoint or from step 0: metrics and weights equal the uninterrupted recipe's."""
    ref_dir, ref_finals = recipe_reference
    with monkeypatch.context() as m:
        _crash_in_second_stage(m, where)
        with pytest.raises(Interrupted):
            run_recipe(load_recipe(_recipe(tmp_path, tiny_paths)))
    assert not (tmp_path / "run" / "on_policy" / "student").exists()
    finals = {}
    resumed = run_recipe(load_recipe(_recipe(tmp_path, tiny_paths), ["resume=true"]),
                         on_stage_end=lambda stage, d: finals.__setitem__(stage, _weights(d.student)))
    for stage in ("on_policy", "cold_start"):
        want = _metrics(ref_dir / stage)
        assert any("eval/rkl" in m for m in want) and any("loss" in m for m in want)
        _assert_same_metrics(_metrics(tmp_path / "run" / stage), want)
        assert stage in set(finals), f"the resumed recipe did not run stage {stage}"
        _assert_same_weights(finals[stage], ref_finals[stage])
    assert [h["step"] for h in resumed["on_policy"] if "loss" in h] == replayed
    assert [h["step"] for h in resumed["cold_start"] if "loss" in h] == []  # finished: not trained again
