"""Scoring engines behind the teacher server's one `score(batch)` call: hf (in-process) and vllm.

A backend takes a `Batch` of token sequences, each with its prompt length, and returns a
`ScoreResult` (protege.server.batch): padded arrays over completion positions (the tokens after
the prompt), with logprobs = log_softmax(logits / temperature):

    token_logprobs (N, T) f4   teacher logprob of each actual token
    topk_ids       (N, T, K) i4, topk_logprobs (N, T, K) f4   teacher's own top-K, sorted descending
    query_logprobs (N, T, M) f4   teacher logprobs at ids the caller sent (when asked)
    completion_lengths (N,) i4

Padding is 0. The engine call is synchronous and runs in the batcher's worker thread; backends need
not be thread-safe (one call at a time).
"""

from __future__ import annotations

import logging
import tempfile
from typing import Protocol

import numpy as np
import torch
from torch import nn

from protege.forward import check_supported, output_weight
from protege.server.batch import Batch, RequestError, ScoreResult
from protege.teacher.base import ScoreRequest
from protege.teacher.local import score_rows


class Backend(Protocol):
    name: str  # "hf" | "vllm"
    model_name: str  # what /v1/models reports
    vocab_size: int
    dtype: str

    def score(self, batch: Batch) -> ScoreResult: ...


class HFBackend:
    """An HF causal LM in this process, scored with protege.teacher.local.score_rows.

    `token_budget` caps rows x longest row per forward pass (score_rows groups rows by length);
    logits are formed `chunk_positions` positions at a time, so (N, T, V) never exists. On CPU a
    small chunk (128 positions: 25 MB of fp32 logits at V=49152) keeps the reused logits buffers
    small (see score_rows); GPUs want 2048.
    """

    name = "hf"

    def __init__(self, model: nn.Module, *, model_name: str = "teacher", pad_id: int = 0,
                 token_budget: int = 16384, chunk_positions: int | None = None, tokenizer=None):
        check_supported(model, "teacher")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        weight = output_weight(model)
        self.vocab_size = int(weight.shape[0])
        self.dtype = str(weight.dtype).removeprefix("torch.")
        self.device = str(weight.device)
        self.model_name = model_name
        self.pad_id = pad_id
        self.token_budget = token_budget
        self.chunk_positions = chunk_positions or (128 if weight.device.type == "cpu" else 2048)
        self.tokenizer = tokenizer
        self.max_model_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    def score(self, batch: Batch) -> ScoreResult:
        n = len(batch.sequences)
        comp_lens = np.array([len(s) - p for s, p in zip(batch.sequences, batch.prompt_lengths)], dtype=np.int64)
        t = int(comp_lens.max()) if n else 0
        completion_ids = torch.zeros((n, t), dtype=torch.long)  # (N, T)
        completion_mask = torch.arange(t)[None, :] < torch.from_numpy(comp_lens)[:, None]  # (N, T)
        prompt_ids = []
        for i, (seq, p) in enumerate(zip(batch.sequences, batch.prompt_lengths)):
            seq = torch.from_numpy(np.asarray(seq, dtype=np.int64))
            prompt_ids.append(seq[:p])
            completion_ids[i, : len(seq) - p] = seq[p:]
        query = None
        if batch.query_ids is not None:
            m = batch.query_ids[0].shape[1]
            query = torch.zeros((n, t, m), dtype=torch.long)  # (N, T, M)
            query[completion_mask] = torch.from_numpy(np.concatenate(batch.query_ids).astype(np.int64))
        request = ScoreRequest(topk=batch.topk, query_ids=query, temperature=batch.temperature, hidden=batch.hidden)
        signal = score_rows(self.model, prompt_ids, completion_ids, completion_mask, request,
                            pad_id=self.pad_id, token_budget=self.token_budget,
                            chunk_positions=self.chunk_positions)
        out = {"completion_lengths": comp_lens.astype(np.int32),
               "token_logprobs": signal.token_logprobs.numpy()}
        if batch.topk:
            out["topk_ids"] = signal.topk_ids.to(torch.int32).numpy()
            out["topk_logprobs"] = signal.topk_logprobs.numpy()
        if query is not None:
            out["query_logprobs"] = signal.query_logprobs.numpy()
        if batch.hidden:
            out["hidden_states"] = signal.hidden_states.float().numpy()  # (N, T, H), exact for bf16/fp16 models
        return out


class VLLMBackend:
    """Teacher scoring with vLLM's prompt logprobs (an in-process vLLM engine; vllm imported only here).

    What vLLM gives: for every completion position the logprob of the actual token and the
    teacher's own top-K (prompt_logprobs=K), computed in float32 as log_softmax(logits). What it
    does not give (vLLM 0.32 with its default V1 model runner, and always on CPU): logprobs at ids
    the caller chooses per position (`query_ids`). vLLM's `prompt_logprob_token_ids` does that, but
    only on the V2 model runner, which needs Triton (GPU); it is not used here. Requests with
    query_ids therefore get 422. Prompt logprobs also ignore the sampling temperature, so this
    backend serves one temperature, `temperature` (default 1.0); other temperatures get 422.

    Works with a remote teacher: loss.support=teacher (top-K) or sampled (token logprobs),
    loss.name=sampled_pg or sft, all at loss.temperature == the server's temperature.
    Needs the hf backend: loss.support=student or union (the student's top-k ids are query_ids).
    """

    name = "vllm"

    def __init__(self, model: str, *, dtype: str = "float32", model_name: str | None = None,
                 gpu_memory_utilization: float | None = None, max_model_len: int | None = None,
                 max_logprobs: int = 128, temperature: float = 1.0, seed: int = 0, **llm_kwargs):
        from protege.vllm_settings import eager, in_process, memory_kwargs, quiet_chat_template_warmup, require_vllm

        require_vllm("serve-teacher --backend vllm", "--backend hf")
        from vllm import LLM

        from protege.rollout.vllm_engine import save_for_vllm

        in_process()
        self._tmp = None
        path = str(model)
        try:  # a .gguf teacher: dequantise with transformers once, then serve the HF folder
            from protege.modeling import load_model, resolve_gguf

            if resolve_gguf(path) is not None:
                self._tmp = tempfile.mkdtemp(prefix="protege-vllm-teacher-")
                save_for_vllm(load_model(path, "float32"), self._tmp)
                path = self._tmp
        except ImportError:  # pragma: no cover
            pass
        # GPU: share of GPU memory (default 0.85); CPU: share of RAM for the KV cache (default 0.05)
        kwargs = dict(dtype=dtype, seed=seed, **memory_kwargs(gpu_memory_utilization, 0.85),
                      distributed_executor_backend="uni", max_logprobs=max_logprobs, skip_tokenizer_init=True,
                      enforce_eager=eager(None))
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(llm_kwargs)
        with quiet_chat_template_warmup():
            self.llm = LLM(path, **kwargs)
        config = self.llm.llm_engine.model_config
        self.vocab_size = int(config.get_vocab_size())
        self.dtype = str(config.dtype).removeprefix("torch.")
        self.model_name = model_name or str(model)
        self.max_model_len = int(config.max_model_len) - 1  # one decode token is scheduled per request
        self.max_logprobs = max_logprobs
        self.temperature = float(temperature)
        try:
            from protege.modeling import load_tokenizer

            self.tokenizer = load_tokenizer(model)
        except Exception:  # noqa: BLE001 - a folder without a tokenizer still scores token ids
            self.tokenizer = None
        logging.getLogger("protege.server").warning(
            "vllm backend: top-K and token logprobs at temperature %g only; logprobs at caller-given ids "
            "(query_ids) are not available from vLLM here, so remote loss.support=student|union needs "
            "--backend hf (use loss.support=teacher or sampled with loss.temperature=%g)",
            self.temperature, self.temperature)

    def score(self, batch: Batch) -> ScoreResult:
        from vllm import SamplingParams

        if batch.query_ids is not None:
            raise RequestError(422, "query_ids: this teacher server runs the vllm backend, which cannot return "
                               "logprobs at caller-given ids (vLLM's prompt logprobs give the teacher's own "
                               "top-K and the actual tokens only). Use loss.support=teacher or sampled, or "
                               "serve the teacher with --backend hf for loss.support=student|union.")
        if batch.hidden:
            raise RequestError(422, "hidden_dtype: this teacher server runs the vllm backend, which does not give "
                               "hidden states; serve the teacher with --backend hf for loss.support=full, or use "
                               "loss.support=teacher|sampled.")
        if abs(batch.temperature - self.temperature) > 1e-6:
            raise RequestError(422, f"temperature {batch.temperature:g}: this vllm-backend server scores at "
                               f"temperature {self.temperature:g} only (vLLM's prompt logprobs ignore the "
                               "sampling temperature). Set loss.temperature to match, or use --backend hf.")
        k = int(batch.topk)
        if k > self.max_logprobs:
            raise RequestError(422, f"topk {k} exceeds this vllm server's max_logprobs {self.max_logprobs}")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, flat_logprobs=True,
                                detokenize=False)
        prompts = [{"prompt_token_ids": [int(t) for t in seq]} for seq in batch.sequences]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        n = len(batch.sequences)
        comp_lens = np.array([len(s) - p for s, p in zip(batch.sequences, batch.prompt_lengths)], dtype=np.int64)
        t = int(comp_lens.max()) if n else 0
        token_lp = np.zeros((n, t), np.float32)
        topk_ids = np.zeros((n, t, k), np.int32)
        topk_lp = np.zeros((n, t, k), np.float32)
        for i, (out, seq, p) in enumerate(zip(outputs, batch.sequences, batch.prompt_lengths)):
            flat, c = out.prompt_logprobs, int(comp_lens[i])
            if c == 0:
                continue
            # position 0 has no logprobs; positions 1..L-1 hold [actual token, top-1 .. top-K] each
            lps = np.asarray(flat.logprobs, dtype=np.float32).reshape(len(seq) - 1, 1 + k)[p - 1:]
            ids = np.asarray(flat.token_ids, dtype=np.int64).reshape(len(seq) - 1, 1 + k)[p - 1:]
            token_lp[i, :c] = lps[:, 0]
            if k:
                topk_ids[i, :c] = ids[:, 1:]
                topk_lp[i, :c] = lps[:, 1:]
        out = {"completion_lengths": comp_lens.astype(np.int32), "token_logprobs": token_lp}
        if k:
            out["topk_ids"] = topk_ids
            out["topk_logprobs"] = topk_lp
        return out


def load_backend(name: str, model: str, *, dtype: str = "float32", device: str | None = None,
                 model_name: str | None = None, token_budget: int = 16384) -> Backend:
    """Build the backend `name` ("hf" | "vllm") for a model path or hub id (a .gguf file works for hf)."""
    if name == "vllm":
        return VLLMBackend(model, dtype=dtype, model_name=model_name)
    if name != "hf":
        raise ValueError(f"--backend {name!r}: unknown backend; use hf or vllm")
    try:
        from protege.modeling import load_model, load_tokenizer
    except ImportError:  # protege.modeling is optional at this layer
        from transformers import AutoModelForCausalLM, AutoTokenizer

        def load_model(path, dtype):
            return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))

        load_tokenizer = AutoTokenizer.from_pretrained
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_model(model, dtype).to(device)
    try:
        tokenizer = load_tokenizer(model)
    except Exception:  # a model folder without a tokenizer still scores token ids
        tokenizer = None
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    return HFBackend(teacher, model_name=model_name or str(model), pad_id=pad_id, token_budget=token_budget,
                     tokenizer=tokenizer)
