"""FSDP2 students (accelerate `fsdp_version: 2`): what protege does differently when the student is sharded.

accelerate's `fsdp2_prepare_model` shards the student in place with torch's `fully_shard`: one group per
decoder layer and a tail group [final norm, (tied) embedding, lm_head] that stays gathered after the
forward (`reshard_after_forward=False`); every parameter becomes a DTensor sharded on dim 0. protege
trains through the `HiddenStates` wrapper (the FSDP root), never through the lm_head module's forward:
the chunked losses multiply the final hidden states by the lm_head weight themselves. So:

- the lm_head weight is read AFTER the micro-batch's forward (`gathered_output_weight`), when FSDP
  has gathered the tail group: it is then the group's unsharded nn.Parameter, the loss's gradient
  accumulates into that parameter's .grad, and FSDP's own post-backward reduce-scatters it into the
  sharded DTensor's gradient, averaged over ranks like every other parameter (the trainer's
  `loss * world` turns the average into the sum). A weight still sharded at that point is refused
  with an error (a copy gathered by hand would carry a gradient FSDP never reduces).
- every rank runs the same number of forwards (each is a collective): the micro-batch count is the
  largest over ranks, the extra ones run with weight 0 (`micro_batch_weights`); generation runs with
  HF's `synced_gpus` (every rank steps until all have finished).
- checkpoints hold each rank's local shards (`local_state`, `local_optimizer_state`): nothing is
  gathered to one process to save or resume; the final `student/` folder is gathered (`full_state`).

accelerate itself only shards on GPUs; on CPU (gloo) `build_accelerator` switches its state to FSDP
when the launch asked for it (ACCELERATE_USE_FSDP=true, FSDP_VERSION=2), so the very same accelerate
code path runs in the CPU tests.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from protege.errors import CheckpointError
from protege.forward import output_weight


def requested() -> bool:
    """True when the launch asked accelerate for FSDP2 (accelerate launch --config_file fsdp2.yaml sets these)."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and os.environ.get("FSDP_VERSION", "1") == "2")


def enable_on_cpu(acc) -> None:
    """Switch a multi-process CPU accelerator to FSDP2 (accelerate keeps MULTI_CPU for CPU launches)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if acc.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)  # reads the FSDP_* variables of the launch
    acc.state.fsdp_plugin = plugin
    # both shared states: each new AcceleratorState() copies PartialState's distributed_type over its own
    PartialState().distributed_type = acc.state.distributed_type = DistributedType.FSDP


def before_prepare(acc, student: nn.Module) -> None:
    """FSDP2: every rank's copy of the student made equal to rank 0's before sharding (collective).

    fully_shard keeps each rank's own slice of its own tensors: weights initialised per rank (LoRA
    adapters, seeded by train.seed + rank) would otherwise mix. DDP broadcasts them itself."""
    if not getattr(acc, "is_fsdp2", False) or acc.num_processes == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in [*student.parameters(), *student.buffers()]:
            dist.broadcast(t.data, src=0)


def after_prepare(cfg, model: nn.Module, student: nn.Module, device) -> bool:
    """Whether accelerate.prepare sharded the student; if so, checks and set-up (collective).

    The root (`model`, the HiddenStates wrapper) runs one tiny forward first: FSDP2 takes the first
    module to run forward as its root, and generation calls the layers directly. Generation then runs
    with synced_gpus and one generate call per rank and buffer, so every rank makes the same calls."""
    if not is_sharded(model):
        return False
    if cfg.rollout.engine_for(sharded=True, device=device.type) != "hf":
        raise ValueError(f"rollout.engine={cfg.rollout.engine} with an FSDP2 student: generation must step in sync "
                         "on every rank (HF generate's synced_gpus; the vLLM engine needs the whole student in one "
                         "process, the lean engine drops finished rows per rank); use rollout.engine=hf, or DDP")
    if cfg.rollout.max_lag:
        raise ValueError("rollout.max_lag=1 with an FSDP2 student: the prefetch thread would gather shards out of "
                         "step with training; use rollout.max_lag=0, or DDP")
    if 0 < cfg.mix.lmbda < 1:
        raise ValueError(f"mix.lmbda={cfg.mix.lmbda} with an FSDP2 student: a rank whose prompts all drew "
                         "off-policy rows would skip generation while the others gather weights for it; use "
                         "mix.lmbda=1 or 0 (or DDP)")
    with torch.no_grad():
        model(torch.zeros((1, 1), dtype=torch.long, device=device), torch.ones((1, 1), dtype=torch.long,
                                                                                device=device))
    mark_for_generate(student)
    return True


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or a module inside it) was sharded by fully_shard (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def gathered_output_weight(model: nn.Module) -> torch.Tensor:
    """The (V, H) lm_head weight as a plain tensor through which gradients reach the parameter.

    Unsharded model: `output_weight(model)` itself. FSDP2: read after the forward, when accelerate's
    tail group [norm, embeddings, lm_head] is gathered (and stays so: reshard_after_forward=False), it
    is that group's unsharded nn.Parameter; FSDP's post-backward reduce-scatters its gradient. A weight
    still sharded (a DTensor: another wrapping) is refused rather than gathered by hand, whose gradient
    FSDP would not reduce."""
    weight = output_weight(model)
    if _is_dtensor(weight):
        raise RuntimeError("FSDP2: the lm_head weight is still sharded after the forward, so protege's chunked "
                           "loss cannot use it (a hand-gathered copy's gradient would not be reduced over the "
                           "processes). Shard the student with accelerate's FSDP2 preparation "
                           "(examples/accelerate/fsdp2.yaml), which keeps the lm_head's group gathered.")
    return weight


def reshard_all(model: nn.Module) -> None:
    """Put every FSDP2 group back into its sharded state (the state checkpoints read)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def micro_batch_weights(acc, count: int, sharded: bool) -> list[float]:
    """Weights of the micro-batches this rank runs: 1 for its own, 0 for the extra ones that make every rank
    run the largest count (FSDP2: each forward and backward is a collective). Not sharded: [1.0] * count."""
    if not sharded or acc.num_processes == 1:
        return [1.0] * count
    import torch.distributed as dist

    most = torch.tensor(count, device=acc.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    most = int(most)
    return [1.0] * count + [0.0] * (most - count)


def mark_for_generate(student: nn.Module) -> None:
    """Tell HF generate the model is FSDP-managed, so it runs with synced_gpus (all ranks step together)."""
    from protege.forward import causal_lm

    causal_lm(student)._is_fsdp_managed_module = True


# ----------------------------------------------------------------------------------- checkpoints
def _kept(student: nn.Module, adapters: bool) -> dict[str, torch.Tensor]:
    """{name: tensor} of the state a checkpoint keeps: everything, or the trainable parameters under LoRA;
    tensors sharing storage (a tied lm_head) once."""
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    out, seen = {}, set()
    for name, value in student.state_dict().items():
        if adapters and name not in trainable:
            continue
        local = value.to_local() if _is_dtensor(value) else value
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = local
    return out


def local_state(student: nn.Module, adapters: bool) -> dict[str, torch.Tensor]:
    """This rank's shards of the student's state (contiguous CPU copies)."""
    reshard_all(student)
    return {k: v.detach().contiguous().cpu().clone() for k, v in _kept(student, adapters).items()}


def local_shapes(student: nn.Module, adapters: bool) -> dict[str, tuple]:
    reshard_all(student)
    return {k: tuple(v.shape) for k, v in _kept(student, adapters).items()}


@torch.no_grad()
def load_local_state(student: nn.Module, weights: dict[str, torch.Tensor], adapters: bool) -> None:
    """Copy saved local shards into this rank's shards in place (names and shapes checked before)."""
    reshard_all(student)
    for name, local in _kept(student, adapters).items():
        local.copy_(weights[name].to(local.dtype))


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every DTensor replaced by this rank's local shard."""
    sd = optimizer.state_dict()
    state = {i: {k: (v.to_local().clone() if _is_dtensor(v) else v) for k, v in s.items()}
             for i, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """optimizer.load_state_dict, turning local shards back into DTensors shaped like their parameters."""
    from torch.distributed.tensor import DTensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)] if int(i) < len(params) else None
        state[i] = {k: (DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                           run_check=False)
                        if _is_dtensor(p) and isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                    for k, v in s.items()}
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def full_state(student: nn.Module) -> dict[str, torch.Tensor]:
    """The whole student's state gathered on every rank as plain CPU tensors (collective)."""
    reshard_all(student)
    return {k: (v.full_tensor() if _is_dtensor(v) else v).detach().cpu() for k, v in student.state_dict().items()}


def save_shard(folder, rank: int, student: nn.Module, optimizer_state: dict) -> None:
    """student-<rank>.safetensors (this rank's shards) and optimizer-<rank>.pt (its local optimizer state)."""
    from safetensors.torch import save_file

    save_file(local_state(student, hasattr(student, "peft_config")), folder / f"student-{rank}.safetensors")
    torch.save(optimizer_state, folder / f"optimizer-{rank}.pt")


def read_shard(folder, rank: int, student: nn.Module) -> tuple[dict, dict]:
    """(weights, optimizer state) of this rank's shards, checked against the sharded student: names, local
    shapes, finite values; CheckpointError says what is wrong."""
    from safetensors.torch import load_file

    path, opt_path = folder / f"student-{rank}.safetensors", folder / f"optimizer-{rank}.pt"
    try:
        weights = load_file(path)
        optimizer = torch.load(opt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, garbage or missing files; objects are never unpickled
        raise CheckpointError(f"the shards {path.name} / {opt_path.name} in {folder} are unreadable "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
    want = local_shapes(student, hasattr(student, "peft_config"))
    if {k: tuple(v.shape) for k, v in weights.items()} != want:
        raise CheckpointError(f"the weight shards in {path} do not match this rank's shards of the student "
                              f"(missing {sorted(set(want) - set(weights))[:3]}, unexpected "
                              f"{sorted(set(weights) - set(want))[:3]}); resume with the same model, LoRA "
                              "settings and process count")
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"the weight shards in {path} are not finite (NaN or inf in {bad[:3]})")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("param_groups"), list) \
            or not isinstance(optimizer.get("state"), dict):
        raise CheckpointError(f"{opt_path} is not an optimizer state_dict")
    return weights, optimizer
