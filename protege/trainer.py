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

import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from protege import build, checkpoint, fsdp, guards, memory, packing, run_log, run_state
from protege.agents.checks import check_env_sharded
from protege.agents.metrics import episode_metrics
from protege.config import Config, check_vocab_bounds
from protege.cross_objective import completion_logprobs, fill_span_baseline, spread_baseline
from protege.data import PromptStream, PromptTokenizer, load_prompt_sets
from protege.diagnostics import HealthMonitor, sampled_rkl, step_health, truncation_rate
from protege.hardware import use_bf16
from protege.forward import HiddenStates, dense_grads, forward_completion_hidden, output_weight, tied_input_embedding
from protege.losses import grad_into, reduce_tokens
from protege.rollout.base import RolloutEngine, Sampling
from protege.records import Rollouts, TeacherSignal
from protege.teacher.base import Teacher
from protege.teacher.cache import cache_metrics
from protege.teacher.several import per_teacher_metrics

log = logging.getLogger("protege")


@dataclass
class RunState:
    step: int = 0
    history: list[dict] = field(default_factory=list)


def _process_settings(cfg: Config, process_index: int) -> None:
    """The process-wide settings a run makes: torch threads, glibc's mmap threshold, the seed."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.malloc_mmap_threshold_mb:
        memory.mmap_threshold(cfg.train.malloc_mmap_threshold_mb)  # freed big tensors leave the resident set
    torch.manual_seed(cfg.train.seed + process_index)


class Distiller:
    """Holds the models, data and optimizer of a run; `train()` is the loop."""

    def __init__(self, cfg: Config, *, student=None, teacher_model=None, tokenizer=None, accelerator=None,
                 teacher_tokenizer=None):
        from protege.modeling import eos_ids, load_tokenizer

        self.cfg = cfg
        self.acc = accelerator or build.build_accelerator(cfg)
        if cfg.train.prompts_per_step < self.acc.num_processes:
            raise ValueError(f"train.prompts_per_step={cfg.train.prompts_per_step} is smaller than the number of "
                             f"processes ({self.acc.num_processes}): every process needs at least one prompt per step")
        _process_settings(cfg, self.acc.process_index)
        self.out = Path(cfg.output.dir)
        self.bf16 = use_bf16(cfg.train.precision, self.acc.device.type)
        self.tok = tokenizer or load_tokenizer(cfg.student.path)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.eos_ids = eos_ids(self.tok)
        check_vocab_bounds(cfg, len(self.tok), f"the student's tokenizer {cfg.student.path}")  # before the weights
        # data first: a bad dataset (or a missing vllm) fails before minutes of model loading
        self.prompts = PromptTokenizer(self.tok, cfg.data.max_prompt_tokens)
        self.train_set, self.eval_set = load_prompt_sets(cfg.data, seed=cfg.train.seed)
        columns = build.check_before_models(cfg, self.train_set, self.eval_set)  # the rows' columns
        self.stream = PromptStream(len(self.train_set), cfg.train.seed)
        self.max_steps = build.max_steps(cfg, len(self.train_set))  # the config is never rewritten
        self.teacher_tok, self.cross = build.cross_tokenizer_mode(cfg, self.tok, teacher_tokenizer)
        guards.check_start(self.tok, self.eos_ids, self.teacher_tok, self.cross)  # end of turn, chat templates
        self.agents = build.build_agents(cfg, self.tok, self.eos_ids, max_steps=self.max_steps, cross=bool(self.cross),
                                         columns=columns)  # env: multi-turn rollouts, else None
        objective = build.build_objective(cfg, cross_tokenizer=self.cross)  # its scoring chunk, for the teacher
        self.student = build.build_student(cfg, student, self.acc.device)
        self.teacher: Teacher
        tok_t = self.teacher_tok if self.cross else self.tok  # the teacher's own tokenizer renders its prompts
        self.teacher, self.teacher_model = build.build_teacher(
            cfg, teacher_model, pad_id=build.pad_id_of(tok_t), device=self.acc.device, objective=objective,
            student=self.student, tokenizer=tok_t, data_columns=columns)
        if self.cross:  # the teacher re-tokenizes the student's text; its signal is on the student's positions
            self.teacher = build.wrap_cross_tokenizer(cfg, self.teacher, self.tok, self.teacher_tok,
                                                      output_weight(self.student).shape[0])
        self.objective = build.build_objective(cfg, cross_tokenizer=self.cross, teacher=self.teacher)
        build.check_vocabularies(self.teacher, self.student)
        self.engine: RolloutEngine | None = None  # the student's, see student_engine()
        self.teacher_engine = build.build_teacher_engine(cfg, self.teacher, pad_id=self.tok.pad_token_id,
                                                         tokenizer=self.tok)
        r = cfg.rollout
        self.sampling = Sampling(max_new_tokens=r.max_new_tokens, eos_ids=tuple(self.eos_ids), temperature=r.temperature,
                                 top_p=r.top_p, top_k=r.top_k, record_topk=self.objective.rollout_topk)
        self.optimizer, self.scheduler = build.build_optimizer(cfg, self.student, self.max_steps)
        fsdp.before_prepare(self.acc, self.student)  # FSDP2: rank 0's weights everywhere (LoRA init)
        self.model, self.optimizer = self.acc.prepare(HiddenStates(self.student), self.optimizer)
        self.sharded = fsdp.after_prepare(cfg, self.model, self.student, self.acc.device)  # FSDP2: protege/fsdp.py
        check_env_sharded(cfg, self.sharded)  # env: ranks would make different numbers of generate calls
        self.state = RunState()
        self.progress: run_log.Progress | None = None  # the bar, while train() runs
        self.monitor = HealthMonitor()
        self.overlap = build.build_overlap(cfg, self) if cfg.rollout.max_lag else None  # protege.rollout.overlap
        if cfg.output.report_to != "none":
            self.acc.init_trackers("protege", config=build.tracker_config(cfg))

    # ------------------------------------------------------------------------------ the buffer
    def collect(self, step: int, engine: RolloutEngine | None = None) -> Rollouts:
        """This process's rows of the step: student rollouts, dataset references or teacher samples.
        engine: the one that samples the student rows (default: the live student's; rollout.max_lag: a copy's)."""
        cfg = self.cfg
        picked = self.stream.take(cfg.train.prompts_per_step)
        mine = picked[self.acc.process_index:: self.acc.num_processes]
        coin = random.Random(cfg.train.seed * 7919 + step)  # same decisions on every rank and on resume
        on_policy = [coin.random() < cfg.mix.lmbda for _ in picked][self.acc.process_index:: self.acc.num_processes]
        g = cfg.rollout.num_generations
        student_p, off_p, refs = [], [], []
        student_ex, off_ex, ref_ex = [], [], []  # the data row of each sequence, in the same order
        for idx, on in zip(mine, on_policy):
            ex = self.train_set.examples[idx]
            ids = self.prompts.prompt_ids(ex)
            if on:
                student_p += [ids] * g
                student_ex += [ex] * g
            elif cfg.mix.seq_kd or not ex.reference:
                off_p += [ids] * g
                off_ex += [ex] * g
            else:
                student_p_ref = self.prompts.reference_ids(ex, cfg.rollout.max_new_tokens)
                refs.append((ids, student_p_ref))
                ref_ex.append(ex)
        parts = []
        if student_p:
            eng = engine or self.student_engine()  # env: multi-turn episodes (protege.agents.rollout)
            parts.append(self.agents.rollout(eng, student_ex, self.sampling, step=step,
                                             teacher_engine=self.teacher_engine) if self.agents else
                         eng.generate(student_p, self.sampling, source="student"))
            parts[-1].examples = student_ex
        if off_p:
            if self.teacher_engine is None:
                raise ValueError("mix.seq_kd needs a teacher that samples (capabilities.generates: an in-process "
                                 "teacher.path or an API teacher)")
            gen_p, gen_ex = self.teacher.prompt_view(off_p, off_ex)  # a privileged teacher answers its own prompt
            parts.append(self.teacher_engine.generate(gen_p, replace(self.sampling, record_topk=0), source="teacher",
                                                      examples=gen_ex))
            parts[-1].prompt_ids, parts[-1].examples = list(off_p), off_ex  # trained on the student's prompt
        if refs:
            parts.append(Rollouts.from_references([p for p, _ in refs], [c for _, c in refs]))
            parts[-1].examples = ref_ex
        buffer = Rollouts.concat(parts)
        if self.objective.student_topk and buffer.student_topk_ids is None:  # off-policy rows, remote teacher
            buffer.student_topk_ids = self._student_topk(buffer, self.objective.student_topk)
        return buffer

    def student_engine(self) -> RolloutEngine:
        """The student's rollout engine, built on first use (a vLLM engine loads the weights the student has then)."""
        if self.engine is None:
            self.engine = build.build_rollout_engine(self.cfg, self.student, pad_id=self.tok.pad_token_id,
                                                     bf16=self.bf16, seed=self.cfg.train.seed + self.acc.process_index,
                                                     sharded=self.sharded)
            if self.sharded:  # FSDP2: one generate call per rank and buffer, so every rank makes the same calls
                self.engine.batch_tokens = 1 << 62
        return self.engine

    @torch.no_grad()
    def _student_topk(self, buffer: Rollouts, k: int) -> torch.Tensor:
        """(N, T, k) student top-k ids for rows that were not sampled by the student (remote teachers)."""
        out = torch.zeros((*buffer.completion_ids.shape, k), dtype=torch.long)
        for s in range(0, len(buffer), self.cfg.train.micro_batch_size):
            rows = list(range(s, min(s + self.cfg.train.micro_batch_size, len(buffer))))
            mb = buffer.select(rows)
            h = forward_completion_hidden(self.model, mb.prompt_ids, mb.completion_ids.to(self.acc.device),
                                          mb.completion_mask, self.tok.pad_token_id)
            out[rows, : h.shape[1]] = (h @ fsdp.gathered_output_weight(self.student).T).topk(k, -1).indices.cpu()
        return out

    # -------------------------------------------------------------------------------- one step
    def train_step(self, buffer: Rollouts | None = None, signal: TeacherSignal | None = None) -> dict:
        """One optimizer step in three named phases: collect, score, learn. A given `buffer` (and `signal`)
        replaces the first phase(s): tests train on a fixed buffer, benchmarks time each phase alone."""
        t0 = time.perf_counter()
        self._phase("generating")
        if buffer is None:  # Rollouts (CPU); with rollout.max_lag the next step's buffer is then sampled meanwhile
            buffer = self.overlap.take(self.state.step) if self.overlap else self.collect(self.state.step)
        t1 = time.perf_counter()
        self._phase("teacher")
        signal = self.score(buffer) if signal is None else signal  # aligned on the buffer's completion positions
        t2 = time.perf_counter()
        self._phase("training")
        learned = self.learn(buffer, signal)  # loss, grad_norm, lr, num_tokens
        t3 = time.perf_counter()
        self.state.step += 1
        return self._step_metrics(buffer, signal, **learned, t_gen=t1 - t0, t_teacher=t2 - t1, t_train=t3 - t2)

    def _phase(self, name: str) -> None:
        if self.progress is not None:
            self.progress.phase(name)

    def score(self, buffer: Rollouts) -> TeacherSignal:
        """The teacher's signal for the whole buffer: exactly what the objective asks for (and, for the span
        estimator across tokenizers, the student's logprobs of its canonical paths: fill_span_baseline)."""
        request = self.objective.teacher_request(buffer)
        signal = self.teacher.score(buffer, request)
        if request.canonical and signal.cross is not None:
            fill_span_baseline(signal.cross, buffer, self._completion_logprobs)
        return signal

    def _completion_logprobs(self, prompts: list[torch.Tensor], completions: list[torch.Tensor]) -> list[torch.Tensor]:
        """The student's token logprobs of given completions (cross_objective.completion_logprobs). Under FSDP2
        every rank makes the same number of forwards (each gathers weights); under DDP the unwrapped module
        runs (no collective)."""
        step = self.cfg.train.micro_batch_size
        calls = -(-len(prompts) // step)
        if self.sharded:
            calls = int(self.acc.reduce(torch.tensor(calls, device=self.acc.device), reduction="max"))
        return completion_logprobs(self.model if self.sharded else self.acc.unwrap_model(self.model),
                                   lambda: fsdp.gathered_output_weight(self.student), prompts, completions,
                                   pad_id=self.tok.pad_token_id, temperature=self.objective.sampling_temperature,
                                   rows=step, chunk=self.cfg.loss.chunk_size, calls=calls, device=self.acc.device)

    def learn(self, buffer: Rollouts, signal: TeacherSignal) -> dict:
        """Micro-batched forward/backward of the objective, then one optimizer step (and the engine sync)."""
        cfg, acc = self.cfg, self.acc
        memory.trim()  # what generation and scoring freed goes back to the OS before training allocates
        num_tokens = int(acc.reduce(torch.tensor(buffer.num_tokens, device=acc.device), reduction="sum"))
        teacher_weight = self.teacher.output_weight if self.objective.teacher_hidden else None  # (V, H) or None
        lengths = [len(p) + int(m.sum()) for p, m in zip(buffer.prompt_ids, buffer.completion_mask)]
        order = sorted(range(len(buffer)), key=lambda i: lengths[i])
        mbs = packing.token_batches(order, lengths, cfg.train.micro_batch_tokens) if cfg.train.pack else \
            [order[s: s + cfg.train.micro_batch_size] for s in range(0, len(order), cfg.train.micro_batch_size)]
        forward = packing.forward_packed_hidden if cfg.train.pack else forward_completion_hidden
        scale = fsdp.micro_batch_weights(acc, len(mbs), self.sharded)  # FSDP2: the same count on every rank
        mbs += [mbs[0]] * (len(scale) - len(mbs))
        emb = tied_input_embedding(self.model)  # a tied lm_head: no (V, H) gradient sum in the backward (memory)
        tied = None if emb is None or self.sharded else emb.weight
        loss_sum = 0.0
        row_loss = torch.zeros(len(buffer))  # (N,) each row's summed per-token loss (per-teacher metrics)
        self.model.train()
        for i, rows in enumerate(mbs):
            mb = buffer.select(rows)
            sig = signal.select(rows, mb.completion_ids.shape[1])
            last = i == len(mbs) - 1
            with (acc.no_sync(self.model) if not last else nullcontext()), \
                    torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=self.bf16), grad_into(tied):
                hidden = forward(self.model, mb.prompt_ids, mb.completion_ids.to(acc.device), mb.completion_mask,
                                 self.tok.pad_token_id)  # (B, T, H)
                weight = fsdp.gathered_output_weight(self.student)  # (V, H), after the forward (FSDP2 gathers it)
                per_token = self.objective.per_token_loss(hidden, weight, mb, sig, teacher_weight)  # (B, T)
                if i == 0 and self.state.step == 0 and cfg.train.check_teacher_signal:  # protege.guards
                    guards.check_teacher_reaches_loss(self.objective, hidden, weight, mb, sig, teacher_weight)
                loss = reduce_tokens(per_token, mb.train_mask.to(acc.device), num_tokens)
                loss = loss if scale[i] == 1.0 else loss * scale[i]
                acc.backward(loss * acc.num_processes)  # DDP averages over ranks; we want the sum
            loss_sum += float(loss.detach())
            row_loss[rows] = per_token.detach().float().sum(1).cpu()
        dense_grads(self.model)  # a tied embedding's gradient may be sparse (protege.forward.tied_input_embedding)
        grad_norm = None
        if cfg.optim.max_grad_norm is not None:
            grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm))
        lr = self.optimizer.param_groups[0]["lr"]  # the lr this step applies; the scheduler then moves on
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.teacher.after_step(self.student)  # e.g. an EMA self-teacher follows the new weights
        if self.engine is not None:  # the next buffer samples the new weights (a no-op for the HF engine)
            self.engine.sync_weights(self.student)
        loss_total = float(acc.reduce(torch.tensor(loss_sum, device=acc.device), reduction="sum"))
        return {"loss": loss_total, "grad_norm": grad_norm, "lr": lr, "num_tokens": num_tokens, "row_loss": row_loss}

    def _step_metrics(self, buffer, signal, *, loss, grad_norm, lr, num_tokens, t_gen, t_teacher, t_train,
                      row_loss=None) -> dict:
        mask = buffer.completion_mask
        lengths = mask.sum(1).float()
        student_rows = torch.tensor([s == "student" for s in buffer.sources])
        m = {"step": self.state.step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
             "tokens": num_tokens, "prompt_tokens": sum(len(p) for p in buffer.prompt_ids),
             "completion_len_mean": float(lengths.mean()), "completion_len_max": int(lengths.max()),
             "truncation_rate": truncation_rate(buffer.finish_reasons),
             "time_generate": t_gen, "time_teacher": t_teacher, "time_train": t_train,
             "tokens_per_s": num_tokens / max(1e-9, t_gen + t_teacher + t_train),
             "train_tokens_per_s": num_tokens / max(1e-9, t_train)}
        if buffer.sampling_logprobs is not None and student_rows.any():
            # unbiased sample estimate of the per-token reverse KL on the student's own samples
            sm = buffer.train_mask & student_rows[:, None]
            cross = signal.cross  # across tokenizers: against the canonical paths' logprobs where they exist
            own = buffer.sampling_logprobs if cross is None or cross.span_baseline is None else spread_baseline(cross)
            m["sampled_rkl"] = sampled_rkl(own, signal.token_logprobs, sm)
        m["teacher_nll"] = float(-signal.token_logprobs[mask].mean())
        if signal.cross is not None:  # a teacher with another tokenizer: the alignment's diagnostics
            m.update(signal.cross.stats)
        m.update(cache_metrics(self.teacher))  # cache/hits, misses, teacher_calls, ... ({} without teacher.cache_dir)
        if buffer.policy_version is not None and student_rows.any():  # rollout.max_lag: steps since sampling
            m["policy_lag"] = float(self.state.step - 1 - buffer.policy_version[student_rows].float().mean())
        m.update(self._health(buffer, signal, student_rows))
        m.update(episode_metrics(buffer, signal, self.agents))  # env: turns, tools, finish reasons, KL by turn
        m.update(self.teacher.step_metrics())  # e.g. privileged_leak
        m.update(per_teacher_metrics(buffer, signal, row_loss, self.cfg.output.diagnostics_top_k))  # several teachers
        return m

    def _health(self, buffer: Rollouts, signal: TeacherSignal, student_rows: torch.Tensor) -> dict:
        """Seed 003's OPD health signals of the step (protege.diagnostics.step_health), warnings logged."""
        out = step_health(buffer, signal, student_rows, self.cfg.output.diagnostics_top_k, self.monitor,
                          self.state.step)
        for w in out.get("warnings", []):
            log.warning("health: %s", w)
        return out

    # ------------------------------------------------------------------------------- the loop
    def train(self) -> list[dict]:
        cfg, acc = self.cfg, self.acc
        run_log.check_output_dir(cfg, self.out)  # a fresh run never overwrites an earlier one silently
        run_log.warn_idle_settings(cfg, bool(self.eval_set))
        if cfg.resume and self.load_checkpoint() and self.state.step >= self.max_steps:
            return self._finished()
        run_log.make_output_dir(self.out)
        metrics_path = self.out / "metrics.jsonl"
        if self.state.step == 0 and acc.is_main_process:
            metrics_path.write_text("")
            (self.out / "config.yaml").write_text(run_log.config_yaml(cfg))
        if self.state.step == 0:
            run_log.evaluations(self, metrics_path, every=False)
        self.progress = run_log.Progress(cfg, acc, self.state.step, self.max_steps)
        while self.state.step < self.max_steps:
            run_log.record_step(self, self.train_step(), metrics_path)
            run_log.evaluations(self, metrics_path, every=True)
            s = self.state.step
            if cfg.output.save_every and s % cfg.output.save_every == 0 and s < self.max_steps:
                self.save_checkpoint()
        self.progress.close()
        self.progress = None
        run_log.evaluations(self, metrics_path, every=False)
        self.save_checkpoint()
        self.save_final()
        acc.end_training()
        return self.state.history

    # --------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """output/checkpoints/step-N (see protege/checkpoint.py): complete or absent, never half-written."""
        return checkpoint.save(self.acc, self.out / "checkpoints" / f"step-{self.state.step:07d}",
                               student=self.acc.unwrap_model(self.model).model, state=run_state.state_of(self),
                               keep_last=self.cfg.output.keep_last, sharded=self.sharded)

    def load_checkpoint(self) -> bool:
        """Resume from the newest usable checkpoint (checked; older ones are fallbacks, see checkpoint.restore)."""
        root = self.out / "checkpoints"
        snap = checkpoint.restore(self.acc, root, student=self.acc.unwrap_model(self.model).model,
                                  apply_state=lambda state: run_state.apply_state(self, state))
        if snap is None:
            log.info("resume: no checkpoint in %s, starting from scratch", root)
            return False
        metrics = self.out / "metrics.jsonl"
        if metrics.exists() and self.acc.is_main_process:  # drop lines logged after the checkpoint
            checkpoint.trim_metrics(metrics, self.state.step)
        log.info("resumed from %s (step %d)", snap.folder, self.state.step)
        return True

    def _finished(self) -> list[dict]:
        """Resumed at or past the run's last step: nothing to train, evaluate or log again."""
        log.info("resume: the run in %s is already at step %d (of %d): nothing to do", self.out,
                 self.state.step, self.max_steps)
        if not (self.out / "student").exists():  # killed between the last checkpoint and the final save
            self.save_final()
        self.acc.end_training()
        return self.state.history

    def save_final(self) -> None:
        checkpoint.save_student(self.acc, self.acc.unwrap_model(self.model).model, self.tok, self.out / "student",
                                sharded=self.sharded)


def train(cfg: Config, **kwargs) -> list[dict]:
    """Run a distillation described by `cfg`; returns the metrics of every step and evaluation."""
    return Distiller(cfg, **kwargs).train()
