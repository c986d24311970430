"""Pin glibc's malloc, so that a timing measures the step, not the allocator's history.

Why: an Opacus DP step on a CPU frees and reallocates megabytes every step (the per-sample
gradients alone are B x P floats). glibc's malloc adapts two thresholds as a process runs: memory
freed above the *trim* threshold is handed back to the OS, and blocks above the *mmap* threshold
(at most 32 MiB) are mapped afresh and unmapped when freed; either way the next step touches new
pages and pays a page fault per 4 KiB. How often that happens depends on the order of every
earlier allocation in the process: fresh processes running the same plain DP loop on the digits
CNN (``side_by_side.py``'s, torch's two threads) paid 0, 1, 284, 638 and 981 faults per step on
this project's VM; of two taken minutes apart, the one with 981 took 7.25 ms per step, the one
with 1 took 6.14 ms. The monitor's own allocations shift the thresholds too (its processes
paid 7-686 in the runs left adaptive), which says nothing about the monitor's cost. Blocks above
32 MiB (a ResNet-18's per-sample gradients at batch 8: 75 MB for one conv layer) are mapped
afresh every time unless a free heap chunk happens to fit: in one report process the ResNet-18
DP step paid 30,700 faults per step, the every-step monitored ones 12,300 and the defaults 0,
which made the monitored variants look cheaper than they are.

Pinned: both thresholds fixed (which also turns their adaptation off), the trim threshold at 2
GiB (``INT_MAX``, the most ``mallopt`` takes), and no mmap at all (``M_MMAP_MAX = 0``): every
block comes from the heap and freed memory stays with the process for the next step (the heap
holds what the largest step held). In the report run that followed, every variant's timed steps
paid 0-6 faults per step but ResNet-18's critic-every-step (442); the plain digits processes of
``side_by_side.py`` 0 or 1. It is not airtight (a 64 MiB block allocated and freed in a loop
still faulted in 6,500 of its 16,400 pages per cycle, against all of them unpinned), hence the
faults every report prints per variant. The trim threshold was 1 GiB until the thirteenth
session: in full reports (digits CNN and MLP first, then ResNet-18's six variants of ~0.5 GB a
step each) the ResNet-18 DP step paid 3,072-9,216 faults per step, the heap's freed top
exceeding 1 GiB and going back to the OS between its steps; with the same command at 2 GiB,
none (one run each way). The benchmarks pin it for every loop they compare, monitored or not;
``OPACUS_MI_BENCH_MALLOC=default`` leaves glibc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = (1 << 31) - 1  # INT_MAX: mallopt's value is an int
# The same settings for a process not started yet (read by glibc at start-up).
PINNED_ENV = {
    "GLIBC_TUNABLES": (
        f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"
        ":glibc.malloc.mmap_max=0"
    )
}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt parameters, <malloc.h>

_state = "default"


def pin_malloc() -> str:
    """Fix glibc's thresholds and turn mmap off in this process (idempotent); returns a description
    for report headers. A no-op, said so, off glibc or with ``OPACUS_MI_BENCH_MALLOC=default``."""
    global _state
    choice = os.environ.get("OPACUS_MI_BENCH_MALLOC", "pinned")
    if choice not in ("pinned", "default"):
        raise ValueError(f"OPACUS_MI_BENCH_MALLOC must be 'pinned' or 'default', got {choice!r}")
    if choice == "default":
        _state = "default"
    elif _state != "pinned":
        mallopt = _glibc_mallopt()
        if mallopt is None:
            _state = "unavailable"
        elif all(
            mallopt(param, value) == 1
            for param, value in (
                (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                (_M_MMAP_MAX, 0),
            )
        ):
            _state = "pinned"
        else:
            raise RuntimeError(
                "glibc rejected mallopt (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_MMAP_MAX)"
            )
    return describe()


def describe() -> str:
    return {
        "pinned": "glibc malloc pinned (no mmap, trim threshold 2 GiB)",
        "default": "glibc malloc adaptive (its default; OPACUS_MI_BENCH_MALLOC=default)",
        "unavailable": "malloc not pinned (not glibc)",
    }[_state]


def _glibc_mallopt():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        _ = libc.gnu_get_libc_version  # glibc only: musl and macOS have no such thresholds
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def page_faults() -> int:
    """Minor page faults of this process so far (pages the OS had to map in)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
