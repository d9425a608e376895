"""FSDP2 students (protege/fsdp.py) on CPU with gloo: 2 sharded processes equal 1 process, and resume exactly.

One `accelerate launch --config_file examples/accelerate/fsdp2.yaml` of 2 processes (the README's
command, so the shipped config is what runs) trains, in turn:
  full   all weights, dataset references (mix.lmbda=0: the same rows whatever the process count),
         2 optimizer steps, 8 prompts per step, micro-batches of 2 (so gradient accumulation too)
  lora   the same with LoRA adapters (r=4)
  resume on-policy generation (synced across ranks) and held-out evaluation, 4 steps with a sharded
         checkpoint every 2: the uninterrupted run, the same run crashed right after its step-2
         checkpoint, and a fresh Distiller resuming it from the per-rank shards
and saves the gathered weights. The references are plain 1-process runs in this test process.

Tolerance, 2 processes vs 1: the two do the same arithmetic except the order of float sums (each
rank sums its micro-batches' gradients, then FSDP reduce-scatters and averages them, instead of one
process summing them all), so values differ by fp32 rounding: ~1e-7 relative in the losses, and in
the weights at most ~lr x (relative gradient rounding), amplified by AdamW's 1/sqrt(v) on coordinates
with tiny gradients; observed up to 8e-7 after 2 steps at lr 3e-3. We allow rel 1e-5 (losses and gradient
norms) and abs 5e-6 (weights). A wrong gradient is far outside: a missing rank's share of the lm_head
gradient changes AdamW's first steps by O(lr) = 3e-3 on many weights, and an average instead of a sum
(which AdamW's update hardly sees) halves the gradient norm.
Resume under FSDP2 is bitwise: both runs are the same 2-process computation in the same order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from protege.config import load_config
from protege.trainer import Distiller

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys, torch
from protege import build, fsdp
from protege.config import load_config
from protege.trainer import Distiller

class Interrupted(Exception):
    pass

root, common = sys.argv[1], sys.argv[2:]
acc = build.build_accelerator(load_config(None, [*common, f"output.dir={root}/full"]))
acc.end_training = lambda: None  # keep the process group for the next run in this process
_prepare = acc.prepare
def prepare(*args):  # one model at a time: accelerate's clip_grad_norm_ compares parameter lists of all
    acc._models.clear()  # prepared models with ==, which fails for two FSDP models of the same size
    return _prepare(*args)
acc.prepare = prepare
assert acc.is_fsdp2, acc.distributed_type
out = {}
for name, extra in (("full", []), ("lora", ["student.lora.enabled=true", "student.lora.r=4"])):
    d = Distiller(load_config(None, [*common, "mix.lmbda=0", f"output.dir={root}/{name}", *extra]), accelerator=acc)
    assert d.sharded
    steps = [d.train_step() for _ in range(2)]
    out[name] = {"losses": [(m["loss"], m["grad_norm"]) for m in steps], "state": fsdp.full_state(d.student)}
on_policy = [*common, "mix.lmbda=1", "train.max_steps=4", "output.save_every=2", "optim.warmup_steps=1",
             "optim.schedule=cosine", "output.eval_every=2", "data.eval_fraction=0.2", "data.eval_prompts=4"]
ref = Distiller(load_config(None, [*on_policy, f"output.dir={root}/ref"]), accelerator=acc)
ref.train()
cut = Distiller(load_config(None, [*on_policy, f"output.dir={root}/cut"]), accelerator=acc)
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
resumed = Distiller(load_config(None, [*on_policy, f"output.dir={root}/cut", "resume=true"]), accelerator=acc)
resumed.train()
out["ref"], out["resumed"] = fsdp.full_state(ref.student), fsdp.full_state(resumed.student)
if acc.is_main_process:
    torch.save(out, f"{root}/result.pt")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _common(paths) -> list[str]:
    return [f"student.path={paths['student']}", f"teacher.path={paths['teacher']}", f"data.path={paths['data']}",
            "rollout.max_new_tokens=8", "train.prompts_per_step=8", "train.micro_batch_size=2", "optim.lr=3e-3",
            "output.progress=false", "train.num_threads=1", "data.eval_prompts=0"]


def _metrics(out: Path) -> list[dict]:
    drop = ("time_", "tokens_per_s", "train_tokens_per_s")  # wall-clock fields
    return [{k: v for k, v in json.loads(x).items() if not k.startswith(drop)}
            for x in (out / "metrics.jsonl").read_text().splitlines() if x]


def _one_process(paths, out: Path, *extra) -> dict:
    d = Distiller(load_config(None, [*_common(paths), "mix.lmbda=0", f"output.dir={out}", *extra]))
    steps = [d.train_step() for _ in range(2)]
    return {"losses": [(m["loss"], m["grad_norm"]) for m in steps], "state": {k: v.detach().clone() for k, v in d.student.state_dict().items()}}


def _assert_close(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys()
    worst = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
    assert worst <= atol, f"largest weight difference {worst:.3g} > {atol}"


@pytest.fixture(scope="module")
def fsdp_run(tiny_paths, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    script = root / "fsdp_run.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "examples" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2", "--main_process_ip",
           "127.0.0.1", "--main_process_port", str(_free_port()), str(script), str(root), *_common(tiny_paths)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root, torch.load(root / "result.pt")


@pytest.mark.parametrize("name, extra", [("full", []), ("lora", ["student.lora.enabled=true", "student.lora.r=4"])])
def test_two_sharded_processes_match_one(fsdp_run, tiny_paths, tmp_path, name, extra):
    """Same global batch: the 2-process FSDP2 run's losses, gradient norms (AdamW's update barely sees a
    gradient's scale, the norm does) and updated weights equal 1 process's."""
    _, result = fsdp_run
    want = _one_process(tiny_paths, tmp_path, *extra)
    for got, ref in zip(result[name]["losses"], want["losses"]):
        assert got == pytest.approx(ref, rel=1e-5)  # (loss, grad_norm) of each step
    _assert_close(result[name]["state"], want["state"], atol=5e-6)
    moved = [k for k in want["state"] if "lm_head" in k or "lora_" in k]
    assert moved, "the comparison must cover the lm_head (full) or the adapters (LoRA)"


def test_sharded_checkpoint_resumes_exactly(fsdp_run):
    """Crashed after its step-2 checkpoint (per-rank shards, nothing gathered) and resumed: the metrics of
    every step and the final weights equal the uninterrupted FSDP2 run's, bitwise."""
    root, result = fsdp_run
    ckpt = root / "cut" / "checkpoints" / "step-0000002"
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == ["manifest.json", "optimizer-0.pt", "optimizer-1.pt", "rng-0.pt", "rng-1.pt",
                     "student-0.safetensors", "student-1.safetensors", "trainer_state.pt"], files
    want = _metrics(root / "ref")
    assert [m["step"] for m in want if "loss" in m] == [1, 2, 3, 4]
    assert [m["step"] for m in want if "eval/rkl" in m] == [0, 2, 4]  # held-out evaluation of a sharded student
    assert _metrics(root / "cut") == want
    for k, v in result["ref"].items():
        assert torch.equal(result["resumed"][k], v), k
    final = root / "cut" / "student" / "model.safetensors"
    from safetensors.torch import load_file

    saved = load_file(final)  # gathered at the end: a plain HF checkpoint
    assert all(torch.equal(saved[k], result["ref"][k]) for k in saved)
