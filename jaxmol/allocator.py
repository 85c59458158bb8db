"""Keep the memory XLA frees for the next step, instead of handing it back to the kernel.

Why: XLA's CPU runtime allocates all temporaries of one execution as a single block (1.08 GB
for a quickstart train step at L = 128) with `malloc` and frees it when the execution ends.
glibc serves a block that large with `mmap` and returns it with `munmap`, so every train step
faults 263 k fresh zeroed pages in again: 0.7 s of kernel time per 5 s step, measured with
`bench/bench_train_step.py` (which prints faults and kernel seconds per step) and `strace`
(one 1,076,129,792-byte `mmap`/`munmap` pair per step). Worker threads allocate from their
own arenas, whose heaps are at most 64 MB, so a block that large always falls back to `mmap`
there, whatever the thresholds.

`keep_freed_memory` sets, through `mallopt`, one arena for every thread, no `mmap` for large
blocks and no trimming of the heap's top: the freed block stays resident and the next execution
reuses it. Measured (docs/performance.md): training 1.22 x (quickstart) to 1.30 x (paper config)
more pairs/s per probe GFLOP, no page faults, no kernel time.

What it costs, and why it is opt-in (``JAXMOL_KEEP_FREED_MEMORY=1``; the CLI entry points and
benchmarks call `keep_freed_memory` first thing, before JAX starts its threads, and it does
nothing unless the variable asks): memory freed anywhere in the one heap stays resident, and a
real run frees a lot of it in pieces (compiles, two bucket shapes of different sizes, the
prefetch thread's batches), so the heap fragments. A 40-step quickstart run peaked at 4.81 GB
RSS with these settings, 4.25 GB with `release_free_memory` after every new program (what
`jaxmol.parallel` does), against 2.76 GB with glibc's defaults; the benchmark process, which
runs one shape at a time, peaked lower with them. Worth it where memory is plentiful and the
CPU is the limit. Off glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

ENV_SWITCH = "JAXMOL_KEEP_FREED_MEMORY"
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# M_TRIM_THRESHOLD = -1 (SIZE_MAX once converted) disables trimming altogether (mallopt(3)).
_NEVER_TRIM = -1

_applied: bool | None = None


def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """glibc `mallopt`: one arena, no `mmap` for large blocks, no trimming (module docstring).

    Idempotent; the first call decides. Returns True when the settings are in effect; False
    unless ``JAXMOL_KEEP_FREED_MEMORY=1`` asks for them, or not on glibc.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV_SWITCH, "0").strip().lower() not in ("1", "true", "yes", "on"):
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    ok = all(
        libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1 for param, value in settings
    )
    _applied = bool(ok)
    if not ok:
        logger.warning("mallopt refused a setting: freed memory goes back to the kernel")
    return _applied


def release_free_memory() -> bool:
    """Returns the heap's free pages to the kernel (glibc `malloc_trim(0)`), when
    `keep_freed_memory` is in effect (else nothing to do: glibc trims by itself).

    Call after a burst of freed memory (a compile); the next step faults its working set in once
    more. Returns True when memory was released.
    """
    if not _applied:
        return False
    return _malloc_trim()


def return_idle_memory() -> bool:
    """Hands the free memory of every malloc arena back to the kernel (glibc `malloc_trim(0)`),
    with glibc's default settings; does nothing when `keep_freed_memory` is in effect (there the
    kept memory is the point, and `release_free_memory` decides when to let it go).

    Why: with the defaults, every thread that allocates gets its own arena, and an arena keeps
    the pages of the blocks freed inside it unless they lie at its top. Over a training run the
    worker and prefetch threads' arenas fill with such pages: in a quickstart run at step 220,
    `malloc_stats` counted 2.62 GB obtained from the kernel for 1.55 GB in use, one arena holding
    289 MB for 11 MB of live blocks, and one `malloc_trim(0)` took the process from 2.50 to
    1.81 GB at once (docs/performance.md). The training loop calls this at every logging step
    and after every evaluation; the cost is a walk over the arenas' free lists and the page
    faults of whatever is reused later.

    Returns True when memory was handed back.
    """
    if _applied:
        return False
    return _malloc_trim()


def _malloc_trim() -> bool:
    """glibc `malloc_trim(0)`: every arena's free pages back to the kernel; False off glibc."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(ctypes.c_size_t(0)))


def resident_memory_mb() -> dict[str, float]:
    """This process's resident memory now and its peak so far, in MB (``rss_mb``,
    ``peak_rss_mb``: VmRSS and VmHWM of /proc/self/status); empty where /proc is missing."""
    fields = {"VmRSS:": "rss_mb", "VmHWM:": "peak_rss_mb"}
    found: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                key = line.split(maxsplit=1)[0] if line.strip() else ""
                if key in fields:
                    found[fields[key]] = int(line.split()[1]) / 1024  # kB -> MB
    except OSError:
        return {}
    return found
