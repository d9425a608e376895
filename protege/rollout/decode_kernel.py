"""The decode step's linear layers on x86-64 CPUs: a small AVX2 kernel (decode_kernel.c), compiled at first use.

A decode step multiplies a few rows (one per sequence being sampled) by every weight matrix of the model,
so it is bound by how fast the weights stream from memory, not by FLOPs. BLAS's GEMM is built for the
opposite case; at 8 rows on this machine's CPU it reaches about a third of the memory bandwidth (the
SmolLM2 student's 169 linear layers: 134 ms per decode step through torch.mm against 46 ms to merely
read the weights; this kernel: 59 ms). bench/results/generate.md measures it inside generation.

    y = x @ W^T + b, x (rows, K) with rows <= MAX_ROWS, by decode_kernel.c

Only used where it is valid and was measured: float32 weights and inputs on the CPU, outside autograd,
an x86-64 CPU whose torch capability is AVX2 or AVX512, and a C compiler ($CC, else cc) that built
the kernel. Otherwise `available()` says why not, and callers use torch. The shared library is cached in
$PROTEGE_KERNEL_CACHE (default ~/.cache/protege/kernels) under the hash of its source and flags, and
written by an atomic rename, so concurrent processes never load a half-written file. PROTEGE_KERNELS=0
turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
MAX_ROWS = 32  # more rows per call go to torch: vs F.linear 2.0x faster at 8 rows, 1.16x at 32, even at 48
PROFILE_NAME = "protege::decode_linear"
SOURCE = Path(__file__).with_name("decode_kernel.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-shared", "-fPIC", "-pthread"]
_lib: ctypes.CDLL | None = None
_why_not: str | None = None  # set once the first load attempt failed


def _cache_dir() -> Path:
    return Path(os.environ.get("PROTEGE_KERNEL_CACHE") or Path.home() / ".cache" / "protege" / "kernels")


def _build(cc: str) -> Path:
    """The compiled kernel's path: cached by the hash of source + compiler + flags, else compiled now."""
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + cc.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    folder = _cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a private folder, never a shared one another user could plant a library in
        folder = Path(tempfile.mkdtemp(prefix="protege_kernels_"))
    target = folder / f"decode_kernel-{key}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        run = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            raise RuntimeError(f"{cc} failed: {run.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: another process sees the old state or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL:
    if os.environ.get("PROTEGE_KERNELS", "1") == "0":
        raise RuntimeError("turned off by PROTEGE_KERNELS=0")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"not an x86-64 CPU ({platform.machine()})")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        raise RuntimeError(f"the CPU has no AVX2 (torch's CPU capability: {capability})")
    cc = os.environ.get("CC") or "cc"
    if not shutil.which(cc):
        raise RuntimeError(f"no C compiler: '{cc}' is not on PATH (install gcc, or set CC)")
    lib = ctypes.CDLL(str(_build(cc)))
    if lib.protege_decode_kernel_version() != 2:
        raise RuntimeError("the cached kernel library has another version")
    lib.protege_xwt.restype = ctypes.c_int
    lib.protege_xwt.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
    return lib


def available() -> bool:
    """Whether the kernel is loaded (it is compiled or loaded on the first call); why_not() says why not."""
    global _lib, _why_not
    if _lib is None and _why_not is None:
        try:
            _lib = _load()
            log.info("decode kernel loaded")
        except Exception as e:  # noqa: BLE001 - any failure means: use torch
            _why_not = str(e)
            log.warning("protege's decode kernel is not used (decode steps use F.linear): %s", e)
    return _lib is not None


def why_not() -> str | None:
    available()
    return _why_not


def usable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether linear(x, weight, bias) can take the kernel: few float32 CPU rows, no autograd, no autocast."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (0 < rows <= MAX_ROWS and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.device.type == "cpu" and weight.dim() == 2 and weight.is_contiguous()
            and x.shape[-1] == weight.shape[1] and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous() and bias.shape == weight.shape[:1]))
            and available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           threads: int | None = None) -> torch.Tensor:
    """x @ weight^T + bias for x (..., K) with at most MAX_ROWS rows, through the kernel (check usable() first),
    its output rows split over `threads` threads (default torch.get_num_threads())."""
    n, k = weight.shape
    flat = x.reshape(-1, k).contiguous()  # (rows, K): a view for the usual contiguous input
    y = x.new_empty((flat.shape[0], n))
    args = (flat.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), flat.shape[0],
            k, n, threads or torch.get_num_threads())
    if torch.autograd.profiler._is_profiler_enabled:  # named in profiles (bench_vs_trl counts it as a matmul)
        with torch.profiler.record_function(PROFILE_NAME):
            _lib.protege_xwt(*args)
    else:
        _lib.protege_xwt(*args)
    return y.view(*x.shape[:-1], n)
