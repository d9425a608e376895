"""Checkpoints that are never half-written, never run code, and are checked before use.

output/checkpoints/step-N/ holds

    student/            save_pretrained form (LoRA adapters only, when LoRA)
    trainer_state.pt    optimizer, scheduler, data position, step, counters (tensors and plain values)
    rng-<rank>.pt       each process's torch (CPU, CUDA) and python RNG state (tensors and plain lists)
    manifest.json       written last: size and sha256 of every other file, and the process count

trainer_state.pt also records "checkpoint_format" (FORMAT). A folder without manifest.json is
accepted (with a warning, its contents checked) only when it was written by a protege that wrote
no manifests: one whose trainer_state.pt has no "checkpoint_format" and whose rng-<rank>.pt holds
the python RNG state as a tuple (every protege that writes manifests stores a list there). A
deleted manifest cannot remove those marks, so such a folder is refused and resume falls back.

An FSDP2 student (protege/fsdp.py) is saved as each rank's shards instead of student/, with nothing
gathered: student-<rank>.safetensors (its local shards: every tensor, or the trainable ones under
LoRA) and optimizer-<rank>.pt (its optimizer state, local shards); trainer_state.pt then keeps only
the optimizer's param_groups. A single-process or DDP checkpoint is unchanged.

Everything is written into step-N.tmp/ and renamed at the end; folders ending in .tmp are ignored
on resume. Loading never unpickles objects (`torch.load(weights_only=True)`), and a checkpoint is
only used after `read` has checked it: every file matches the manifest (a truncated, rewritten or
bit-flipped file differs in size or sha256), the state files are readable and hold the expected
keys with plausible values, the weights have the student's names and shapes and are all finite.
`restore` takes the newest checkpoint that passes, warns about each newer one that does not and
moves it aside to step-N.rejected/; when none passes it stops with one error that lists each
folder, why it was refused and what to remove.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from protege import fsdp
from protege.errors import CheckpointError, ResumeMismatch

log = logging.getLogger("protege")
MANIFEST = "manifest.json"
FORMAT = 2  # trainer_state.pt's "checkpoint_format": 1 = manifests (no mark recorded), 2 = this mark too
STATE_KEYS = ("optimizer", "scheduler", "stream", "step")


# ----------------------------------------------------------------------------------- writing
def _peft_kwargs(student) -> dict:
    """A PEFT model never had its embeddings resized here: without save_embedding_layers=False, peft asks the
    hub whether the base model's config.json exists (a network call) and warns when it cannot tell."""
    return {"save_embedding_layers": False} if _has_adapters(student) else {}


def save(acc, folder: Path, *, student, state: dict, keep_last: int, sharded: bool = False) -> Path:
    """Collective: every process must call it. `student` is the unwrapped HF/PEFT model. sharded (FSDP2):
    state["optimizer"] is this rank's local optimizer state, saved per rank with the student's shards."""
    final = Path(folder)
    tmp = final.with_name(final.name + ".tmp")
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if not sharded:
            student.save_pretrained(tmp / "student", safe_serialization=True, **_peft_kwargs(student))
        groups = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
        marked = {**state, "checkpoint_format": FORMAT}
        torch.save({**marked, "optimizer": groups} if sharded else marked, tmp / "trainer_state.pt")
    acc.wait_for_everyone()
    if sharded:
        fsdp.save_shard(tmp, acc.process_index, student, state["optimizer"])
    torch.save(rng_state(), tmp / f"rng-{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_manifest(tmp, processes=acc.num_processes)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete(final.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def rng_state() -> dict:
    """This process's RNG state in a form `torch.load(weights_only=True)` reads: tensors and plain lists."""
    version, internal, gauss = random.getstate()
    out = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(r: dict) -> None:
    torch.set_rng_state(r["torch"])
    version, internal, gauss = r["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in r and torch.cuda.is_available() and len(r["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(r["cuda"])


def write_manifest(folder: Path, *, processes: int) -> None:
    """manifest.json: {"format": 1, "processes": P, "files": {relative path: {"bytes": n, "sha256": hex}}}."""
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"format": 1, "processes": processes, "files": files}, indent=1))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def complete(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first (not step-N.tmp/ nor step-N.rejected/)."""
    return sorted(p for p in Path(root).glob("step-*") if p.is_dir() and "." not in p.name)


# ----------------------------------------------------------------------------------- reading
@dataclass
class Snapshot:
    """A checked checkpoint, read into memory and not yet applied."""

    folder: Path
    state: dict
    rng: dict
    weights: dict
    adapters: bool
    sharded: bool = False  # FSDP2: this rank's local shards

    def apply(self, student) -> None:
        """Load the weights into `student` in place (then drop this copy) and restore this process's RNG."""
        if self.sharded:
            fsdp.load_local_state(student, self.weights, self.adapters)
        else:
            _load_weights(student, self.weights, self.adapters)
        self.weights = {}
        set_rng_state(self.rng)


def read(acc, folder: Path, *, student) -> Snapshot:
    """Check a checkpoint for this process and `student`; CheckpointError says what is wrong."""
    folder = Path(folder)
    check_manifest(folder, acc.num_processes)
    state = _torch_file(folder / "trainer_state.pt")
    _check_state(state, folder)
    rng = _torch_file(folder / f"rng-{acc.process_index}.pt")
    _check_rng(rng, folder / f"rng-{acc.process_index}.pt")
    if (folder / f"student-{acc.process_index}.safetensors").exists():  # FSDP2 shards
        weights, optimizer = fsdp.read_shard(folder, acc.process_index, student)
        return Snapshot(folder, {**state, "optimizer": optimizer}, rng, weights, _has_adapters(student), sharded=True)
    weights, adapters = read_weights(student, folder / "student")
    return Snapshot(folder, state, rng, weights, adapters)


def load(acc, folder: Path, *, student) -> dict:
    """Check, then restore student weights and this process's RNG; return the trainer state dict."""
    snap = read(acc, folder, student=student)
    snap.apply(student)
    return snap.state


def restore(acc, root: Path, *, student, apply_state: Callable[[dict], None]) -> Snapshot | None:
    """Apply the newest usable checkpoint under `root`: weights and RNG, then `apply_state(state)` (which
    raises CheckpointError for a state that does not fit). None when `root` holds no checkpoint.

    A newer checkpoint that fails is warned about and, once an older one is applied, moved aside to
    step-N.rejected/ (applying the older one overwrites everything the failed one may have set).
    When none is usable: one CheckpointError naming each folder, its fault and the folders to remove."""
    refused: list[tuple[Path, str]] = []
    chosen = None
    for folder in reversed(complete(root)):
        try:
            snap = read(acc, folder, student=student)
            snap.apply(student)
            apply_state(snap.state)
        except CheckpointError as e:
            log.warning("resume: cannot use %s: %s", folder.name, e)
            refused.append((folder, str(e)))
            continue
        chosen = snap
        break
    _agree(acc, chosen)
    if chosen is None:
        if refused:
            raise CheckpointError(f"resume: no usable checkpoint in {root}: "
                                  + "; ".join(f"{f.name}: {why}" for f, why in refused)
                                  + ". Remove those folders to start over (rm -r "
                                  + " ".join(str(f) for f, _ in refused) + ") or set resume=false")
        return None
    if refused:
        acc.wait_for_everyone()
        if acc.is_main_process:
            for folder, _ in refused:
                aside = _aside(folder)
                os.replace(folder, aside)
                log.warning("resume: moved the unusable %s aside to %s (delete it once inspected)", folder, aside)
        acc.wait_for_everyone()
        log.warning("resume: fell back to %s (step %d)", chosen.folder, chosen.state["step"])
    return chosen


def _aside(folder: Path) -> Path:
    target, n = folder.with_name(folder.name + ".rejected"), 1
    while target.exists():
        target, n = folder.with_name(f"{folder.name}.rejected.{n}"), n + 1
    return target


def _agree(acc, chosen: Snapshot | None) -> None:
    """Every process must resume from the same step (a process-local fault could make them differ)."""
    if acc.num_processes == 1:
        return
    mine = torch.tensor([chosen.state["step"] if chosen is not None else -1], device=acc.device)
    steps = acc.gather(mine).tolist()
    if len(set(steps)) > 1:
        raise CheckpointError(f"resume: the processes found different usable checkpoints (steps {steps}, -1 = "
                              "none); check the warnings above and remove the faulty folders")


def check_manifest(folder: Path, processes: int) -> None:
    """Every file listed in manifest.json is there with its size and sha256 (no manifest: only a folder
    that an older protege wrote, see `_manifest_era`)."""
    path = folder / MANIFEST
    if not path.exists():
        if (mark := _manifest_era(folder)) is not None:
            raise CheckpointError(f"{path} is missing, but {mark}: a protege that writes manifests wrote this "
                                  "folder, so its manifest was deleted and its files cannot be checked")
        log.warning("resume: %s has no %s (written by an older protege): checking its contents only", folder,
                    MANIFEST)
        return
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        written_by = int(manifest["processes"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    if written_by != processes:
        raise ResumeMismatch(f"resume: {folder} was written by {written_by} process(es), this run has {processes}: "
                             "resume with the same number of processes")
    for rel, want in files.items():
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"{p} is missing (listed in {MANIFEST})")
        if p.stat().st_size != want["bytes"]:
            raise CheckpointError(f"{p} has {p.stat().st_size} bytes, {MANIFEST} says {want['bytes']} (truncated "
                                  "or rewritten)")
        if _sha256(p) != want["sha256"]:
            raise CheckpointError(f"{p} differs from the file that was saved (sha256 mismatch with {MANIFEST})")


def _manifest_era(folder: Path) -> str | None:
    """What shows that `folder` was written by a protege that writes manifests, or None: trainer_state.pt's
    "checkpoint_format", or an rng-<rank>.pt holding the python RNG state as a list (older ones: a tuple)."""
    state = _torch_file(folder / "trainer_state.pt")
    if isinstance(state, dict) and "checkpoint_format" in state:
        return f"trainer_state.pt records checkpoint_format {state['checkpoint_format']!r}"
    for rng_path in sorted(folder.glob("rng-*.pt")):
        rng = _torch_file(rng_path)
        if isinstance(rng, dict) and isinstance(rng.get("python"), list):
            return f"{rng_path.name} holds the RNG state in the form written alongside manifests"
    return None


def _torch_file(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to read means the file is unusable; objects are never unpickled
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path} is unreadable or holds more than tensors and plain values "
                              f"({type(e).__name__}: {first[:200]})") from None


def _check_state(state, folder: Path) -> None:
    path = folder / "trainer_state.pt"
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        got = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} lacks the trainer state keys {list(STATE_KEYS)} (found {got})")
    step, stream, opt = state["step"], state["stream"], state["optimizer"]
    named = folder.name.split("-", 1)[1] if "-" in folder.name else ""
    if not isinstance(step, int) or step < 0 or (named.isdigit() and int(named) != step):
        raise CheckpointError(f"{path} holds step {step!r}, but the folder is {folder.name}")
    if not isinstance(stream, dict) or not all(isinstance(stream.get(k), int) for k in ("epoch", "index", "n", "seed")):
        raise CheckpointError(f"{path}: the data position (stream) is not {{epoch, index, n, seed}} integers")
    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list) or "state" not in opt:
        raise CheckpointError(f"{path}: the optimizer state is not an optimizer state_dict")
    if not isinstance(state["scheduler"], dict):
        raise CheckpointError(f"{path}: the scheduler state is not a scheduler state_dict")


def _check_rng(rng, path: Path) -> None:
    ok = isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor) and rng["torch"].dtype == torch.uint8
    py = rng.get("python") if isinstance(rng, dict) else None
    ok = ok and isinstance(py, (list, tuple)) and len(py) == 3 and isinstance(py[1], (list, tuple))
    if not ok:
        raise CheckpointError(f"{path} is not an RNG state {{torch: uint8 tensor, python: [version, state, gauss]}}")


def read_weights(model, folder: Path) -> tuple[dict, bool]:
    """({name: tensor}, adapters?) of a save_pretrained folder, checked against `model`: same names and shapes
    (a tied lm_head may be absent) and every floating value finite."""
    from safetensors.torch import load_file

    adapters = (folder / "adapter_model.safetensors").exists() or (folder / "adapter_config.json").exists()
    index = folder / "model.safetensors.index.json"
    try:
        if adapters:
            files = ["adapter_model.safetensors"]
        else:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
                else ["model.safetensors"]
        state = {}
        for f in files:
            if not (folder / f).is_file():
                raise CheckpointError(f"{folder / f} is missing")
            state.update(load_file(folder / f))
    except CheckpointError:
        raise
    except Exception as e:  # truncated or garbage safetensors, a bad index: unusable
        raise CheckpointError(f"the weights in {folder} are unreadable ({type(e).__name__}: {e})") from None
    _check_names(model, state, folder, adapters)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"the weights in {folder} are not finite (NaN or inf in {bad[:3]}"
                              f"{' ...' if len(bad) > 3 else ''})")
    return state, adapters


def _check_names(model, state: dict, folder: Path, adapters: bool) -> None:
    if adapters:
        from peft import get_peft_model_state_dict

        want = get_peft_model_state_dict(model) if hasattr(model, "peft_config") else {}
    else:
        want = model.state_dict()
    missing = {k for k in set(want) - set(state) if adapters or "lm_head" not in k}
    unexpected = set(state) - set(want)
    shapes = [k for k in set(state) & set(want) if tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(f"the weights in {folder} do not match the student: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}, other shapes {sorted(shapes)[:3]}")


def _has_adapters(student) -> bool:
    return hasattr(student, "peft_config")


def save_student(acc, student, tokenizer, dst: Path, *, sharded: bool = False) -> None:
    """The final student/ folder (save_pretrained + tokenizer), replaced atomically. Collective when sharded
    (FSDP2: the weights are gathered on every rank, rank 0 writes)."""
    full = fsdp.full_state(student) if sharded else None
    if acc.is_main_process:
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        student.save_pretrained(tmp, safe_serialization=True, state_dict=full, **_peft_kwargs(student))
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)


def _load_weights(model, weights: dict, adapters: bool) -> None:
    if adapters:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, weights)
    else:
        model.load_state_dict(weights, strict=False)


def trim_metrics(path: Path, step: int) -> None:
    """Keep the records of metrics.jsonl up to `step` (those the checkpoint has seen), rewritten atomically.

    A last line that is not a JSON object was torn by a kill during its write: it is dropped with a
    warning. Any other unreadable line stops the resume with an error naming the file and line."""
    path = Path(path)
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    keep = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            record = json.loads(ln)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except (ValueError, RecursionError) as e:
            if i == last:
                log.warning("resume: dropped the torn last line of %s (line %d, %d characters, cut by a kill "
                            "during its write)", path, i + 1, len(ln))
                continue
            raise ValueError(f"resume: {path} line {i + 1} is not a JSON record ({str(e)[:100]}); fix or delete "
                             "that line") from None
        s = record.get("step")
        if not isinstance(s, (int, float)) or s <= step:
            keep.append(ln)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)
