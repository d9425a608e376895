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


def trim() -> None:
    """Return the C heap's free memory to the OS (glibc malloc_trim(0)); nothing elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
