"""glibc's malloc with fixed thresholds, so training steps stop faulting their buffers in.

glibc adapts its mmap threshold and trims the top of the heap as memory is freed, so
whether a training step's activation buffers (a few MB, freed at every step) go back to
the kernel and are faulted in afresh at the next step depends on the process's history.
Page faults cost microseconds each on a VM: on the 2-core VM of
``experiments/bench/engines.py`` a plain PyTorch loop ran W1's rounds 1.4-1.5x slower
with the default than with fixed thresholds, and fedsim inline likewise (a run with
``--system-malloc`` against one without). ``fedsim run`` therefore fixes both thresholds
for itself and for the processes it starts (a local Ray's workers, not those of a cluster
it joins) unless the user set ``GLIBC_TUNABLES`` or ``engine.pin_malloc = false``. The
price is memory a process keeps after freeing it: up to ``TRIM_THRESHOLD`` above its peak.
"""

import ctypes
import os
import platform

MMAP_THRESHOLD = 32 * 2**20  # allocations below this come from the heap, never from mmap
TRIM_THRESHOLD = 256 * 2**20  # free heap top kept before glibc returns it to the kernel
# The same setting for processes not yet started: glibc reads it when a process starts.
TUNABLES = (
    f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"
)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h


def pin_malloc_thresholds() -> bool:
    """Fix glibc's thresholds here and in child processes; return whether it did.

    Does nothing where the C library is not glibc, or where ``GLIBC_TUNABLES`` is
    already set (whoever set it chose the allocator's behaviour).
    """
    if os.environ.get("GLIBC_TUNABLES") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    pinned = (
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
    if pinned:
        os.environ["GLIBC_TUNABLES"] = TUNABLES
    return pinned
