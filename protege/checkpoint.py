"""Checkpoints that are never half-written: output/checkpoints/step-N/ holds

    student/            save_pretrained form (LoRA adapters only, when LoRA)
    trainer_state.pt    optimizer, scheduler, data position, step, counters
    rng-<rank>.pt       each process's torch and python RNG state

Everything is written into step-N.tmp/ and renamed at the end; folders ending in .tmp are ignored
on resume, so a run killed at any instant resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch


def save(acc, folder: Path, *, student, state: dict, keep_last: int) -> Path:
    """Collective: every process must call it. `student` is the unwrapped HF/PEFT model."""
    final = Path(folder)
    tmp = final.with_name(final.name + ".tmp")
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        student.save_pretrained(tmp / "student", safe_serialization=True)
        torch.save(state, tmp / "trainer_state.pt")
    acc.wait_for_everyone()
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / f"rng-{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete(final.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def complete(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    return sorted(p for p in Path(root).glob("step-*") if not p.name.endswith(".tmp"))


def load(acc, folder: Path, *, student) -> dict:
    """Restore student weights and this process's RNG; return the trainer state dict."""
    load_student_weights(student, folder / "student")
    rng = folder / f"rng-{acc.process_index}.pt"
    if not rng.exists():
        raise ValueError(f"resume: {folder} was written by fewer processes (no {rng.name}); resume with the same "
                         "number of processes")
    r = torch.load(rng, weights_only=False)
    torch.set_rng_state(r["torch"])
    random.setstate(r["python"])
    return torch.load(folder / "trainer_state.pt", weights_only=False)


def load_student_weights(model, folder: Path) -> None:
    """Load a save_pretrained folder (full model, sharded or not, or PEFT adapters) into `model` in place."""
    from safetensors.torch import load_file

    if (folder / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for f in files:
        state.update(load_file(folder / f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"checkpoint {folder} does not match the student: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")
