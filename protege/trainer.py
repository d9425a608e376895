"""The on-policy distillation loop (GKD / on-policy KD with a generation buffer).

    for step in range(max_steps):
        prompts   = the prompts of this optimizer step (this process's share)
        rollouts  = student samples for a lmbda share of prompts, dataset references or teacher
                    samples for the rest: ONE batched generation over the whole buffer
        signal    = teacher.score(rollouts): ONE batched scoring pass over the whole buffer
        num_tokens = completion tokens of the step over all processes
        for each micro-batch: loss = sum(per-token loss) / num_tokens; backward
        clip, optimizer step, schedule step; log, evaluate, checkpoint

The buffer stays on-policy: student weights only change at the optimizer step, so every rollout of
the step comes from the same policy (seed 000). Dividing every micro-batch's summed loss by the
step's global token count makes gradient accumulation and data parallelism exact (sum over
micro-batches and ranks = one big batch). Under DDP gradients are averaged over ranks, so each rank
multiplies its loss by the world size.

Run: protege train config.yaml --train.max_steps 20   (see `protege train --help`)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from protege import checkpoint, objective
from protege.config import Config, check_vocab_bounds
from protege.data import PromptStream, PromptTokenizer, load_rows, to_examples
from protege.hardware import use_bf16
from protege.forward import HiddenStates, check_supported, forward_completion_hidden, output_weight
from protege.losses import reduce_tokens
from protege.rollout import hf as hf_rollout
from protege.records import Rollouts, TeacherSignal

log = logging.getLogger("protege")


@dataclass
class RunState:
    step: int = 0
    history: list[dict] = field(default_factory=list)


class Distiller:
    """Holds the models, data and optimizer of a run; `train()` is the loop."""

    def __init__(self, cfg: Config, *, student=None, teacher_model=None, tokenizer=None, accelerator=None):
        from protege.modeling import eos_ids, load_model, load_tokenizer

        self.cfg = cfg
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(),
                                              log_with=None if cfg.output.report_to == "none" else cfg.output.report_to,
                                              project_dir=cfg.output.dir)
        if cfg.train.prompts_per_step < self.acc.num_processes:
            raise ValueError(f"train.prompts_per_step={cfg.train.prompts_per_step} is smaller than the number of "
                             f"processes ({self.acc.num_processes}): every process needs at least one prompt per step")
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        torch.manual_seed(cfg.train.seed + self.acc.process_index)
        self.out = Path(cfg.output.dir)
        self.bf16 = use_bf16(cfg.train.precision, self.acc.device.type)
        self.tok = tokenizer or load_tokenizer(cfg.student.path)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.eos_ids = eos_ids(self.tok)
        check_vocab_bounds(cfg, len(self.tok), f"the student's tokenizer {cfg.student.path}")  # before the weights

        if cfg.rollout.engine == "vllm":  # a missing vllm fails before minutes of model loading
            from protege.rollout.vllm_engine import require_vllm

            require_vllm("rollout.engine=vllm", "rollout.engine=hf")
        # data first: a bad dataset fails before minutes of model loading
        self.prompts = PromptTokenizer(self.tok, cfg.data.max_prompt_tokens)
        rows = load_rows(cfg.data.path, cfg.data.split)
        eval_rows = None
        if cfg.data.eval_path:
            eval_rows = load_rows(cfg.data.eval_path, cfg.data.split)
        elif cfg.data.path.startswith("builtin:"):
            eval_rows = load_rows(cfg.data.path, "heldout")
        elif cfg.data.eval_fraction > 0:
            cut = max(1, int(len(rows) * cfg.data.eval_fraction))
            shuffled = random.Random(cfg.train.seed).sample(rows, len(rows))
            eval_rows, rows = shuffled[:cut], shuffled[cut:]
        kw = dict(prompt_column=cfg.data.prompt_column, messages_column=cfg.data.messages_column,
                  completion_column=cfg.data.completion_column, system_prompt=cfg.data.system_prompt)
        self.train_set = to_examples(rows, **kw)
        self.eval_set = to_examples(eval_rows, **kw) if eval_rows else None
        if cfg.mix.lmbda < 1 and not cfg.mix.seq_kd and not any(e.reference for e in self.train_set.examples):
            raise ValueError("mix.lmbda < 1 without mix.seq_kd uses the dataset's reference completions, but no row "
                             f"has one (columns {cfg.data.completion_column!r} or a final assistant turn in "
                             f"{cfg.data.messages_column!r}). Set mix.seq_kd=true or mix.lmbda=1.")
        self.stream = PromptStream(len(self.train_set), cfg.train.seed)
        if cfg.train.epochs:
            cfg.train.max_steps = max(1, math.ceil(cfg.train.epochs * len(self.train_set) / cfg.train.prompts_per_step))


        student = student if student is not None else load_model(cfg.student.path, cfg.student.dtype)
        check_supported(student, "student")
        if cfg.student.lora.enabled:
            from peft import LoraConfig, get_peft_model

            lc = cfg.student.lora
            student = get_peft_model(student, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                         target_modules=lc.target_modules, task_type="CAUSAL_LM"))
        if cfg.train.gradient_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.student = student.to(self.acc.device)
        self.teacher = self._build_teacher(teacher_model)
        if self.teacher.vocab_size != output_weight(self.student).shape[0]:
            raise ValueError(f"teacher vocabulary ({self.teacher.vocab_size}) != student vocabulary "
                             f"({output_weight(self.student).shape[0]}): protege needs a shared tokenizer")

        params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                           weight_decay=cfg.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(cfg))
        self.model = HiddenStates(self.student)
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.state = RunState()
        from protege.diagnostics import HealthMonitor

        self.monitor = HealthMonitor()
        if cfg.output.report_to != "none":
            self.acc.init_trackers("protege", config=_tracker_config(cfg))

    # ----------------------------------------------------------------------------------- setup
    def _build_teacher(self, teacher_model):
        from protege.modeling import load_model
        from protege.teacher.local import LocalTeacher

        cfg = self.cfg.teacher
        if cfg.urls:
            from protege.teacher.remote import RemoteTeacher

            return RemoteTeacher(cfg.urls, api_key=cfg.api_key or os.environ.get("PROTEGE_API_KEY"),
                                 protocol=cfg.protocol, timeout=cfg.timeout_s, max_wait_s=cfg.max_wait_s,
                                 logprob_dtype=cfg.logprob_dtype, vocab_size=cfg.vocab_size)
        model = teacher_model if teacher_model is not None else load_model(cfg.path, cfg.dtype)
        self.teacher_model = model.to(self.acc.device)
        return LocalTeacher(self.teacher_model, pad_id=self.tok.pad_token_id, token_budget=cfg.batch_tokens,
                            chunk_positions=self.cfg.loss.chunk_size)

    # ------------------------------------------------------------------------------ the buffer
    def make_buffer(self, step: int) -> Rollouts:
        """This process's rows of the step: student rollouts, dataset references or teacher samples."""
        cfg = self.cfg
        picked = self.stream.take(cfg.train.prompts_per_step)
        mine = picked[self.acc.process_index:: self.acc.num_processes]
        coin = random.Random(cfg.train.seed * 7919 + step)  # same decisions on every rank and on resume
        on_policy = [coin.random() < cfg.mix.lmbda for _ in picked][self.acc.process_index:: self.acc.num_processes]
        g = cfg.rollout.num_generations
        student_p, off_p, refs = [], [], []
        for idx, on in zip(mine, on_policy):
            ex = self.train_set.examples[idx]
            ids = self.prompts.prompt_ids(ex)
            if on:
                student_p += [ids] * g
            elif cfg.mix.seq_kd or not ex.reference:
                off_p += [ids] * g
            else:
                student_p_ref = self.prompts.reference_ids(ex, cfg.rollout.max_new_tokens)
                refs.append((ids, student_p_ref))
        parts = []
        r = cfg.rollout
        if student_p:
            need_topk = cfg.loss.top_k if self.cfg.teacher.urls and cfg.loss.support in ("student", "union") else 0
            need_topk = max(need_topk, cfg.output.diagnostics_top_k)
            kw = dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                      eos_ids=self.eos_ids, record_topk=need_topk, source="student")
            if r.engine == "vllm":
                parts.append(self._vllm_engine().generate(student_p, **kw))
            else:
                parts.append(hf_rollout.generate(self.student, student_p, pad_id=self.tok.pad_token_id,
                                                 batch_tokens=r.batch_tokens, autocast_bf16=self.bf16, **kw))
        if off_p:
            if not hasattr(self, "teacher_model"):
                raise ValueError("mix.seq_kd needs an in-process teacher (teacher.path) to generate")
            parts.append(hf_rollout.generate(
                self.teacher_model, off_p, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                top_k=r.top_k, eos_ids=self.eos_ids, pad_id=self.tok.pad_token_id, batch_tokens=r.batch_tokens,
                source="teacher"))
        if refs:
            parts.append(hf_rollout.from_references([p for p, _ in refs], [c for _, c in refs]))
        buffer = hf_rollout.concat(parts)
        if self.cfg.teacher.urls and cfg.loss.support in ("student", "union") and buffer.student_topk_ids is None:
            buffer.student_topk_ids = self._student_topk(buffer)
        return buffer

    def _vllm_engine(self):
        """The colocated vLLM rollout engine (rollout.engine=vllm), built on first use from the current student."""
        if getattr(self, "_vllm", None) is None:
            from protege.rollout.vllm_engine import VLLMRolloutEngine

            r = self.cfg.rollout
            self._vllm = VLLMRolloutEngine(
                self.cfg.student.path, student_model=self.student,
                dtype="bfloat16" if self.bf16 else self.cfg.student.dtype,
                gpu_memory_utilization=r.vllm_gpu_memory_utilization,
                max_model_len=min(self.cfg.data.max_prompt_tokens + r.max_new_tokens,
                                  getattr(self.student.config, "max_position_embeddings", None) or 1 << 30),
                seed=self.cfg.train.seed + self.acc.process_index, enable_sleep_mode=r.vllm_enable_sleep_mode)
        return self._vllm

    @torch.no_grad()
    def _student_topk(self, buffer: Rollouts) -> torch.Tensor:
        """(N, T, k) student top-k ids for rows that were not sampled by the student (remote teachers)."""
        k = self.cfg.loss.top_k
        out = torch.zeros((*buffer.completion_ids.shape, k), dtype=torch.long)
        weight = output_weight(self.student)
        for s in range(0, len(buffer), self.cfg.train.micro_batch_size):
            rows = list(range(s, min(s + self.cfg.train.micro_batch_size, len(buffer))))
            mb = buffer.select(rows)
            h = forward_completion_hidden(self.model, mb.prompt_ids, mb.completion_ids.to(self.acc.device),
                                          mb.completion_mask, self.tok.pad_token_id)
            out[rows, : h.shape[1]] = (h @ weight.T).topk(k, -1).indices.cpu()
        return out

    # -------------------------------------------------------------------------------- one step
    def train_step(self) -> dict:
        cfg, acc = self.cfg, self.acc
        step = self.state.step
        t0 = time.perf_counter()
        buffer = self.make_buffer(step)
        t1 = time.perf_counter()
        request = objective.teacher_request(cfg.loss, local=not cfg.teacher.urls, rollouts=buffer)
        if cfg.output.diagnostics_top_k and buffer.student_topk_logprobs is not None:
            request.topk = max(request.topk, cfg.output.diagnostics_top_k)
            request.entropy = not cfg.teacher.urls
        signal: TeacherSignal = self.teacher.score(buffer, request)
        t2 = time.perf_counter()

        local_tokens = buffer.num_tokens
        num_tokens = int(acc.reduce(torch.tensor(local_tokens, device=acc.device), reduction="sum"))
        weight = output_weight(self.student)
        order = sorted(range(len(buffer)), key=lambda i: len(buffer.prompt_ids[i]) + int(buffer.completion_mask[i].sum()))
        mbs = [order[s: s + cfg.train.micro_batch_size] for s in range(0, len(order), cfg.train.micro_batch_size)]
        loss_sum = 0.0
        self.model.train()
        for i, rows in enumerate(mbs):
            mb = buffer.select(rows)
            sig = signal.select(rows, mb.completion_ids.shape[1])
            last = i == len(mbs) - 1
            with (acc.no_sync(self.model) if not last else contextlib.nullcontext()), \
                    torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                hidden = forward_completion_hidden(self.model, mb.prompt_ids, mb.completion_ids.to(acc.device),
                                                   mb.completion_mask, self.tok.pad_token_id)  # (B, T, H)
                per_token = objective.per_token_loss(cfg.loss, hidden, weight, mb, sig,
                                                     sampling_temperature=_sampling_temperature(cfg))  # (B, T)
                loss = reduce_tokens(per_token, mb.completion_mask.to(acc.device), num_tokens)
                acc.backward(loss * acc.num_processes)  # DDP averages over ranks; we want the sum
            loss_sum += float(loss.detach())
        grad_norm = None
        if cfg.optim.max_grad_norm is not None:
            grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm))
        lr = self.optimizer.param_groups[0]["lr"]  # the lr this step applies; the scheduler then moves on
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if getattr(self, "_vllm", None) is not None:  # rollout.engine=vllm: the next buffer samples the new weights
            self._vllm.sync_weights(self.student)
        t3 = time.perf_counter()

        loss_total = float(acc.reduce(torch.tensor(loss_sum, device=acc.device), reduction="sum"))
        self.state.step += 1
        return self._step_metrics(buffer, signal, loss_total, grad_norm, lr, num_tokens, t1 - t0, t2 - t1, t3 - t2)

    def _step_metrics(self, buffer, signal, loss, grad_norm, lr, num_tokens, t_gen, t_teacher, t_train) -> dict:
        mask = buffer.completion_mask
        lengths = mask.sum(1).float()
        student_rows = torch.tensor([s == "student" for s in buffer.sources])
        m = {"step": self.state.step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
             "tokens": num_tokens, "completion_len_mean": float(lengths.mean()), "completion_len_max": int(lengths.max()),
             "truncation_rate": sum(f == "length" for f in buffer.finish_reasons) / max(1, len(buffer)),
             "time_generate": t_gen, "time_teacher": t_teacher, "time_train": t_train,
             "tokens_per_s": num_tokens / max(1e-9, t_gen + t_teacher + t_train),
             "train_tokens_per_s": num_tokens / max(1e-9, t_train)}
        if buffer.sampling_logprobs is not None and student_rows.any():
            # unbiased sample estimate of the per-token reverse KL on the student's own samples
            sm = mask & student_rows[:, None]
            m["sampled_rkl"] = float((buffer.sampling_logprobs - signal.token_logprobs)[sm].mean())
        m["teacher_nll"] = float(-signal.token_logprobs[mask].mean())
        m.update(self._health(buffer, signal, student_rows))
        return m

    def _health(self, buffer: Rollouts, signal: TeacherSignal, student_rows: torch.Tensor) -> dict:
        """Seed 003's OPD health signals of the step (protege.diagnostics.step_health), warnings logged."""
        from protege.diagnostics import step_health

        out = step_health(buffer, signal, student_rows, self.cfg.output.diagnostics_top_k, self.monitor,
                          self.state.step)
        for w in out.get("warnings", []):
            log.warning("health: %s", w)
        return out

    # ------------------------------------------------------------------------------- the loop
    def train(self) -> list[dict]:
        cfg, acc = self.cfg, self.acc
        if cfg.resume and self.load_checkpoint() and self.state.step >= cfg.train.max_steps:
            return self._finished()
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out / "metrics.jsonl"
        if self.state.step == 0 and acc.is_main_process:
            metrics_path.write_text("")
            (self.out / "config.yaml").write_text(_yaml(cfg))
        if self.eval_set and self.state.step == 0:
            self._log_eval(self._evaluate(), metrics_path)
        bar = _progress(cfg, acc, self.state.step)
        while self.state.step < cfg.train.max_steps:
            m = self.train_step()
            self.state.history.append(m)
            if acc.is_main_process:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(m) + "\n")
                if cfg.output.report_to != "none":
                    acc.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=m["step"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", len=f"{m['completion_len_mean']:.0f}",
                                tok_s=f"{m['tokens_per_s']:.0f}")
            elif acc.is_main_process and m["step"] % cfg.output.log_every == 0:
                log.info(_line(m))
            s = self.state.step
            if self.eval_set and cfg.output.eval_every and s % cfg.output.eval_every == 0 and s < cfg.train.max_steps:
                self._log_eval(self._evaluate(), metrics_path)
            if cfg.output.save_every and s % cfg.output.save_every == 0 and s < cfg.train.max_steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self.eval_set:
            self._log_eval(self._evaluate(), metrics_path)
        self.save_checkpoint()
        self.save_final()
        acc.end_training()
        return self.state.history

    def _evaluate(self) -> dict:
        """Held-out metrics of the current student (protege.eval.evaluate); {} without held-out prompts."""
        from protege.eval import evaluate

        cfg, r = self.cfg, self.cfg.rollout
        examples = self.eval_set.examples[: cfg.data.eval_prompts] if self.eval_set else []
        return evaluate(self.student, self.teacher, [self.prompts.prompt_ids(e) for e in examples],
                        teacher_local=not cfg.teacher.urls, pad_id=self.tok.pad_token_id, eos_ids=self.eos_ids,
                        max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                        batch_tokens=r.batch_tokens, micro_batch_size=cfg.train.micro_batch_size, bf16=self.bf16)

    def _log_eval(self, result: dict, path: Path) -> None:
        if not result:
            return
        result = {"step": self.state.step, **{f"eval/{k}": v for k, v in result.items()}}
        self.state.history.append(result)
        if self.acc.is_main_process:
            with path.open("a") as f:
                f.write(json.dumps(result) + "\n")
            log.info("eval @ step %d: %s", self.state.step,
                     ", ".join(f"{k[5:]}={v:.4g}" for k, v in result.items() if k.startswith("eval/")
                               and isinstance(v, float)))

    # --------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """output/checkpoints/step-N (see protege/checkpoint.py): complete or absent, never half-written."""
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "stream": self.stream.state_dict(), "step": self.state.step,
                 "prompts_truncated": self.prompts.truncated, "monitor": self.monitor.state_dict()}
        return checkpoint.save(self.acc, self.out / "checkpoints" / f"step-{self.state.step:07d}",
                               student=self.acc.unwrap_model(self.model).model, state=state,
                               keep_last=self.cfg.output.keep_last)

    def load_checkpoint(self) -> bool:
        """Resume from the newest usable checkpoint (checked; older ones are fallbacks, see checkpoint.restore)."""
        root = self.out / "checkpoints"
        snap = checkpoint.restore(self.acc, root, student=self.acc.unwrap_model(self.model).model,
                                  apply_state=self._apply_state)
        if snap is None:
            log.info("resume: no checkpoint in %s, starting from scratch", root)
            return False
        metrics = self.out / "metrics.jsonl"
        if metrics.exists() and self.acc.is_main_process:  # drop lines logged after the checkpoint
            checkpoint.trim_metrics(metrics, self.state.step)
        log.info("resumed from %s (step %d)", snap.folder, self.state.step)
        return True

    def _apply_state(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])  # a changed dataset: ValueError, no older checkpoint helps
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if "monitor" in state:  # health warnings fire once per run, not again after each resume
                self.monitor.load_state_dict(state["monitor"])
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
            raise checkpoint.CheckpointError(f"its optimizer, scheduler or health-monitor state does not fit this "
                                             f"run ({type(e).__name__}: {e})") from None
        self.state.step = state["step"]
        self.prompts.truncated = state.get("prompts_truncated", 0)

    def _finished(self) -> list[dict]:
        """Resumed at or past train.max_steps: nothing to train, evaluate or log again."""
        log.info("resume: the run in %s is already at step %d (train.max_steps=%d): nothing to do", self.out,
                 self.state.step, self.cfg.train.max_steps)
        if not (self.out / "student").exists():  # killed between the last checkpoint and the final save
            self.save_final()
        self.acc.end_training()
        return self.state.history

    def save_final(self) -> None:
        if self.acc.is_main_process:
            dst = self.out / "student"
            tmp = dst.with_name("student.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.acc.unwrap_model(self.model).model.save_pretrained(tmp, safe_serialization=True)
            self.tok.save_pretrained(tmp)
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(tmp, dst)


def train(cfg: Config, **kwargs) -> list[dict]:
    """Run a distillation described by `cfg`; returns the metrics of every step and evaluation."""
    return Distiller(cfg, **kwargs).train()


# ------------------------------------------------------------------------------------ helpers
def _sampling_temperature(cfg: Config) -> float:
    return cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0


def _schedule(cfg: Config):
    total, warm, kind = cfg.train.max_steps, cfg.optim.warmup_steps, cfg.optim.schedule

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return 1.0 - frac if kind == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return f


def _progress(cfg: Config, acc: Accelerator, start: int):
    if not (cfg.output.progress and acc.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.train.max_steps, initial=start, desc="distill", unit="step", dynamic_ncols=True)


def _line(m: dict) -> str:
    return (f"step {m['step']}: loss {m['loss']:.4f} grad_norm {m['grad_norm'] or 0:.3f} lr {m['lr']:.2e} "
            f"len {m['completion_len_mean']:.1f} trunc {m['truncation_rate']:.2f} "
            f"gen {m['time_generate']:.2f}s teacher {m['time_teacher']:.2f}s train {m['time_train']:.2f}s "
            f"({m['tokens_per_s']:.0f} tok/s)")


def _yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _tracker_config(cfg: Config) -> dict:
    """The config as flat {"section.key": int | float | str | bool}: tensorboard's hparams take nothing else
    (no nested sections, lists or None); wandb shows dotted keys as well."""
    flat = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    walk(cfg.model_dump(mode="json"), "")
    return flat
