"""Give freed heap memory back to the operating system between the phases of a step.

glibc keeps memory freed by small and medium allocations (the decode loop's KV-cache pieces, the
teacher's per-batch activations) in its heap; the next phase's allocations do not always fit those
holes, so the resident set grows by what was kept. `trim()` (glibc's malloc_trim(0)) returns it; it
costs milliseconds. A no-op where the C library is not glibc. Measured in bench/results/memory.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def mmap_threshold(mb: int) -> bool:
    """glibc: serve allocations of at least `mb` MB with their own mmap (returned to the OS by free).

    By default glibc raises this threshold as large blocks are freed, up to 32 MB, so the many 4-32 MB tensors
    of a step (a loss chunk's (128, V) logits, the recomputed activations) come from its heap afterwards and stay
    resident once freed. A fixed threshold stops that (glibc then keeps it fixed). Process-wide, like
    MALLOC_MMAP_THRESHOLD_. True if set (glibc), False elsewhere."""
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(M_MMAP_THRESHOLD, int(mb) << 20))


def trim() -> None:
    """Return the C heap's free memory to the OS (glibc malloc_trim(0)); nothing elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
