"""The training loop on tiny models: it learns, mixes data sources, resumes exactly, runs on 2 ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import free_port

from protege.config import load_config
from protege.trainer import Distiller, train

REPO = Path(__file__).resolve().parents[1]


def _cfg(paths, out, *extra):
    return load_config(None, [f"student.path={paths['student']}", f"teacher.path={paths['teacher']}",
                              f"data.path={paths['data']}", "rollout.max_new_tokens=8", "train.prompts_per_step=4",
                              "train.micro_batch_size=2", "optim.lr=3e-3", f"output.dir={out}",
                              "output.progress=false", "train.num_threads=1", "data.eval_prompts=0", *extra])


def _metrics(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x]


def test_heldout_kl_falls(tiny_paths, tmp_path):
    cfg = _cfg(tiny_paths, tmp_path, "train.max_steps=16", "data.eval_fraction=0.2", "data.eval_prompts=8")
    history = train(cfg)
    evals = [h["eval/rkl"] for h in history if "eval/rkl" in h]
    assert len(evals) == 2
    assert evals[-1] < 0.6 * evals[0], evals
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 16 and all(torch.isfinite(torch.tensor(h["loss"])) for h in steps)
    for key in ("time_generate", "time_teacher", "time_train", "tokens_per_s", "truncation_rate", "sampled_rkl",
                "overlap_ratio", "student_overlap_mass", "entropy_gap", "repetition_rate", "distinct_2"):
        assert key in steps[0]
    assert (tmp_path / "student" / "config.json").exists()
    assert (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("mix, source", [(["mix.lmbda=1"], "student"), (["mix.lmbda=0"], "dataset"),
                                         (["mix.lmbda=0", "mix.seq_kd=true"], "teacher")])
def test_lmbda_and_seq_kd_choose_the_rows(tiny_paths, tmp_path, mix, source):
    d = Distiller(_cfg(tiny_paths, tmp_path, "train.max_steps=1", *mix))
    buffer = d.collect(0)
    assert set(buffer.sources) == {source}
    if source == "dataset":  # the reference answer plus EOS
        text = d.tok.decode(buffer.completion_ids[0][buffer.completion_mask[0]])
        assert text.endswith("<eos>") and text[:-5].isdigit()
        assert buffer.sampling_logprobs is None
    m = d.train_step(buffer)  # the step trains on this buffer, not a freshly collected one
    assert m["loss"] > 0 and m["tokens"] == buffer.num_tokens


def test_mixed_buffer_half_on_policy(tiny_paths, tmp_path):
    d = Distiller(_cfg(tiny_paths, tmp_path, "train.max_steps=1", "mix.lmbda=0.5", "train.prompts_per_step=16"))
    sources = d.collect(0).sources
    assert {"student", "dataset"} == set(sources)
    d.train_step()


# Every objective (support x loss name x local/remote teacher, mixes, seq_kd, sampled_pg, sft, LoRA, bf16):
# tests/test_objectives.py checks the first step's loss against a brute-force reference and that a step lowers it.


def test_sigkill_then_resume_continues_exactly(tiny_paths, tmp_path):
    common = ["optim.schedule=constant", "output.save_every=2", "output.keep_last=10"]
    reference = train(_cfg(tiny_paths, tmp_path / "ref", "train.max_steps=8", *common))
    ref_loss = {h["step"]: h["loss"] for h in reference if "loss" in h}

    out = tmp_path / "killed"
    args = [f"student.path={tiny_paths['student']}", f"teacher.path={tiny_paths['teacher']}",
            f"data.path={tiny_paths['data']}", "rollout.max_new_tokens=8", "train.prompts_per_step=4",
            "train.micro_batch_size=2", "optim.lr=3e-3", f"output.dir={out}", "output.progress=false",
            "train.num_threads=1", "data.eval_prompts=0", "train.max_steps=1000", *common]
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.Popen([sys.executable, "-m", "protege.cli", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while not (out / "checkpoints" / "step-0000002").exists():
            assert proc.poll() is None, "training process died"
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.endswith(".tmp"))
    last = int(done[-1].split("-")[1])
    assert last < 7, "the run went too far before the kill"
    for name in done:  # every non-temporary checkpoint is complete
        assert (out / "checkpoints" / name / "trainer_state.pt").exists()
    resumed = train(load_config(None, [*args[:-4], "train.max_steps=8", *common, "resume=true"]))
    got = {h["step"]: h["loss"] for h in resumed if "loss" in h}
    assert sorted(got) == list(range(last + 1, 9))
    for step, loss in got.items():
        assert loss == pytest.approx(ref_loss[step], rel=1e-6, abs=1e-7), step
    logged = [m["step"] for m in _metrics(out) if "loss" in m]
    assert logged == list(range(1, 9)), "metrics.jsonl has lost or repeated a step"


DIST_SCRIPT = """
import sys, json, torch
from protege.config import load_config
from protege.trainer import Distiller
d = Distiller(load_config(None, sys.argv[1:]))
losses = [d.train_step()["loss"] for _ in range(2)]
if d.acc.is_main_process:
    params = torch.cat([p.detach().flatten() for p in d.student.parameters()])
    torch.save({"losses": losses, "params": params}, d.out / "result.pt")
"""


def test_two_processes_match_one(tiny_paths, tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        out.mkdir()
        args = [f"student.path={tiny_paths['student']}", f"teacher.path={tiny_paths['teacher']}",
                f"data.path={tiny_paths['data']}", "mix.lmbda=0", "train.prompts_per_step=8",
                "train.micro_batch_size=2", "optim.lr=3e-3", f"output.dir={out}", "output.progress=false",
                "train.num_threads=1", "data.eval_prompts=0"]
        cmd = [sys.executable, str(script), *args] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             str(script), *args]
        subprocess.run(cmd, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True)
        results[nproc] = torch.load(out / "result.pt")
    assert results[1]["losses"] == pytest.approx(results[2]["losses"], rel=1e-5)
    assert torch.allclose(results[1]["params"], results[2]["params"], atol=1e-6)


def test_clear_errors(tiny_paths, tmp_path):
    with pytest.raises(ValueError, match="loss.nme: unknown key"):
        _cfg(tiny_paths, tmp_path, "loss.nme=x")
    with pytest.raises(ValueError, match="loss.beta"):
        _cfg(tiny_paths, tmp_path, "loss.beta=2")
    with pytest.raises(ValueError, match="teacher: required, not set \\(set teacher.path or teacher.urls"):
        load_config(None, ["student.path=x"])
    with pytest.raises(ValueError, match="exactly one of teacher.path"):
        load_config(None, ["student.path=x", "teacher.path=y", "teacher.urls=[http://127.0.0.1:1]"])
    with pytest.raises(ValueError, match="sampled_pg needs student rollouts"):
        _cfg(tiny_paths, tmp_path, "loss.name=sampled_pg", "mix.lmbda=0.5")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(ValueError, match="columns found: \\['question'\\]"):
        Distiller(_cfg(tiny_paths, tmp_path, f"data.path={bad}"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": ""}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    with pytest.raises(ValueError, match="no usable rows"):
        Distiller(_cfg(tiny_paths, tmp_path, f"data.path={empty}"))
    noref = tmp_path / "noref.jsonl"
    noref.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(ValueError, match="reference completions"):
        Distiller(_cfg(tiny_paths, tmp_path, f"data.path={noref}", "mix.lmbda=0"))


def test_vocab_mismatch_is_refused(tiny_paths, tmp_path):
    from tiny import make_model

    with pytest.raises(ValueError, match="vocabulary"):
        Distiller(_cfg(tiny_paths, tmp_path), teacher_model=make_model(2, 0, vocab=256))


def test_cli_help_and_bad_override(capsys):
    from protege.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--section.key VALUE" in capsys.readouterr().out
    assert main(["train", "--loss.name", "nope", "--student.path", "x", "--teacher.path", "y"]) == 2
    assert "loss.name" in capsys.readouterr().err


def test_remote_teacher_restarted_mid_run(tiny_paths, tmp_path):
    """The teacher server goes away after step 2 and comes back on the same port 1.5 s later:
    the step in flight waits, retries and completes; no step is lost or repeated."""
    import socket
    import threading

    from transformers import AutoModelForCausalLM

    from protege.server.app import create_app
    from protege.server.backends import HFBackend
    from protege.server.background import reserve_port, serve_in_thread

    teacher = AutoModelForCausalLM.from_pretrained(tiny_paths["teacher"])
    sock = reserve_port()
    port = sock.getsockname()[1]
    server = serve_in_thread(create_app(HFBackend(teacher, pad_id=0)), sock=sock)
    cfg = load_config(None, [f"student.path={tiny_paths['student']}", f"teacher.urls=[{server.url}]",
                             f"data.path={tiny_paths['data']}", "loss.support=teacher", "loss.top_k=8",
                             "rollout.max_new_tokens=6", "train.prompts_per_step=4", "train.micro_batch_size=2",
                             f"output.dir={tmp_path}", "output.progress=false", "train.num_threads=1",
                             "data.eval_prompts=0", "train.max_steps=4", "teacher.max_wait_s=60"])
    d = Distiller(cfg)
    steps = [d.train_step()["step"] for _ in range(2)]
    server.stop()
    restarted = {}

    def restart():
        time.sleep(1.5)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        restarted["server"] = serve_in_thread(create_app(HFBackend(teacher, pad_id=0)), sock=s)

    threading.Thread(target=restart, daemon=True).start()
    t0 = time.time()
    m = d.train_step()  # blocks while the server is down, then succeeds
    waited = time.time() - t0
    steps += [m["step"], d.train_step()["step"]]
    restarted["server"].stop()
    assert steps == [1, 2, 3, 4]
    assert waited >= 1.0 and torch.isfinite(torch.tensor(m["loss"]))


def test_epochs_set_the_step_count(tiny_paths, tmp_path):
    cfg = _cfg(tiny_paths, tmp_path, "train.epochs=0.5")
    d = Distiller(cfg)  # 40 rows, 4 prompts per step
    assert d.max_steps == 5 and cfg.train.max_steps == 50, "epochs set the run's steps, the config is not rewritten"


def test_lora_checkpoint_holds_adapters_and_resumes(tiny_paths, tmp_path):
    common = ["student.lora.enabled=true", "student.lora.r=4", "output.save_every=1", "output.keep_last=5"]
    ref = train(_cfg(tiny_paths, tmp_path / "a", "train.max_steps=3", *common))
    ckpt = tmp_path / "a" / "checkpoints" / "step-0000001" / "student"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    train(_cfg(tiny_paths, tmp_path / "b", "train.max_steps=1", *common))
    resumed = train(_cfg(tiny_paths, tmp_path / "b", "train.max_steps=3", "resume=true", *common))
    want = [h["loss"] for h in ref if "loss" in h][1:]
    got = [h["loss"] for h in resumed if "loss" in h]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_vllm_engine_without_vllm_fails_before_loading_models(tiny_paths, tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here; tests/test_vllm.py trains with it")
    import protege.modeling

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the vllm check")

    monkeypatch.setattr(protege.modeling, "load_model", no_loading)
    with pytest.raises(ValueError, match=r"rollout.engine=vllm needs vllm.*setup.sh --vllm.*rollout.engine=hf"):
        Distiller(_cfg(tiny_paths, tmp_path, "rollout.engine=vllm"))


def test_gradient_checkpointing_gives_the_same_step(tiny_paths, tmp_path):
    """Same step with and without checkpointing, and checkpointing really ran: the backward re-runs each
    decoder layer's forward once per micro-batch (counted here), so the two steps are not one path."""
    params, grad_forwards = [], []
    for gc in (False, True):
        d = Distiller(_cfg(tiny_paths, tmp_path / str(gc), "train.max_steps=1", f"train.gradient_checkpointing={gc}"))
        buffer = d.collect(0)
        calls = []
        mlp = d.student.model.layers[0].mlp  # its forward, wrapped (module hooks do not fire on the recompute)
        inner = mlp.forward
        mlp.forward = lambda *a, **k: calls.append(torch.is_grad_enabled()) or inner(*a, **k)
        d.train_step(buffer)
        del mlp.forward
        grad_forwards.append(sum(calls))  # forwards that record a graph (the scoring forwards do not)
        params.append(torch.cat([p.detach().flatten() for p in d.student.parameters()]))
    micro_batches = -(-len(buffer) // 2)
    assert grad_forwards == [micro_batches, 2 * micro_batches], grad_forwards
    assert torch.allclose(params[0], params[1], atol=1e-6, rtol=0), (params[0] - params[1]).abs().max()


@pytest.mark.parametrize("loss", [["loss.name=jsd"], ["loss.support=teacher", "loss.top_k=4"],
                                  ["loss.name=sft", "mix.lmbda=0"]])
def test_fused_loss_gives_the_same_step(tiny_paths, tmp_path, loss):
    params = []
    for fused in (False, True):
        d = Distiller(_cfg(tiny_paths, tmp_path / str(fused), "train.max_steps=1", f"loss.fused={fused}", *loss))
        before = torch.cat([p.detach().flatten() for p in d.student.parameters()])
        d.train_step()
        params.append(torch.cat([p.detach().flatten() for p in d.student.parameters()]))
        assert not torch.equal(before, params[-1])
    assert torch.allclose(params[0], params[1], atol=1e-6, rtol=0), (params[0] - params[1]).abs().max()
