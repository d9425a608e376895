"""bench/flops.py's step_flops (the FLOP bound of bench/results/vs_trl*.md, part 2) against a count of every
matmul and attention call of a real protege step.

The reference is a TorchDispatchMode that sees each ATen op the step runs: 2 * M * K * N for every
mm / addmm / addmm_, 4 * B * H * Lq * Lk * D for every sdpa forward and twice that for its backward (the
bench's convention: dQ, dK, dV and dP), and it fails on any other matmul-like op, so a matmul the formula
does not know about cannot pass unseen. Rows of different prompt lengths, rows that stop early (the EOS
row of the tied output projection copies the most sampled token's row, so EOS is drawn about as often),
both engines, gradient checkpointing on and off.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

spec = importlib.util.spec_from_file_location("bench_flops", Path(__file__).resolve().parents[1] / "bench" /
                                              "flops.py")
bench_flops = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_flops)

aten = torch.ops.aten
MM = (aten.mm, aten.addmm, aten.addmm_)
UNCOUNTED = (aten.bmm, aten.baddbmm, aten.matmul, aten.linear, aten.mv, aten.addmv, aten.dot, aten._addmm_activation)


class CountFlops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket
        if op in MM:
            a, b = (args[0], args[1]) if op is aten.mm else (args[1], args[2])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        elif "scaled_dot_product" in str(op):
            q, k = args[0], args[1]  # (B, H, Lq, D), (B, H_kv, Lk, D)
            b, h, lq, d = q.shape
            self.flops += 4 * b * h * lq * k.shape[2] * d * (2 if "backward" in str(op) else 1)
        elif op in UNCOUNTED:
            raise AssertionError(f"{op} is not counted by this test: {[getattr(x, 'shape', x) for x in args]}")
        return func(*args, **(kwargs or {}))


def counted(fn):
    with CountFlops() as c:
        out = fn()
    return out, c.flops


@pytest.mark.parametrize("engine,checkpointing", [("hf", True), ("lean", True), ("lean", False)])
def test_step_flops_equal_a_count_of_every_matmul(tiny_paths, tmp_path, engine, checkpointing):
    from protege.config import load_config
    from protege.trainer import Distiller

    data = tmp_path / "prompts.jsonl"  # prompts of 6 different lengths
    data.write_text("".join(json.dumps({"prompt": "x" * (3 + 5 * i)}) + "\n" for i in range(12)))
    d = Distiller(load_config(None, [
        f"student.path={tiny_paths['student']}", f"teacher.path={tiny_paths['teacher']}", f"data.path={data}",
        f"output.dir={tmp_path / 'out'}", "output.progress=false", "train.num_threads=1", "data.eval_prompts=0",
        f"rollout.engine={engine}", "rollout.fast_decode=false",  # the AVX2 kernel is no ATen op: not counted
        "train.prompts_per_step=6", "train.micro_batch_size=4", "rollout.max_new_tokens=12",
        "loss.name=reverse_kl", "loss.support=full", "train.precision=fp32",
        "train.check_teacher_signal=false",  # the first step's one-off guard is not part of a step's FLOPs
        f"train.gradient_checkpointing={str(checkpointing).lower()}"]))
    first = d.collect(0)
    top = torch.bincount(first.completion_ids[first.completion_mask.bool()]).argmax()
    with torch.no_grad():  # EOS (id 1) as likely as the most sampled token: rows of different lengths
        weight = d.student.get_output_embeddings().weight
        weight[1] = weight[top]

    buffer, gen = counted(lambda: d.collect(1))
    signal, teacher = counted(lambda: d.score(buffer))
    _, train = counted(lambda: d.train_step(buffer, signal))

    lengths = buffer.completion_mask.sum(1).tolist()
    assert len(set(lengths)) > 2 and max(lengths) > min(lengths) + 2, lengths  # the cases the formula must cover
    assert len({len(p) for p in buffer.prompt_ids}) > 2
    s_cfg, t_cfg = d.student.config, d.teacher_model.config
    est = bench_flops.step_flops(buffer, s_cfg, t_cfg, mb=4, gen_rows=len(buffer), engine=engine,
                                 checkpointing=checkpointing)
    assert est["generate"] == gen
    assert est["teacher"] == teacher
    assert est["train"] + est["recompute"] == train
    assert (est["recompute"] > 0) == checkpointing
    assert 0 < est["prefill"] < est["generate"]
    if engine == "lean":  # HF generate would have decoded every row to the longest: more FLOPs
        hf = bench_flops.step_flops(buffer, s_cfg, t_cfg, mb=4, gen_rows=len(buffer), engine="hf")
        assert hf["generate"] > gen
