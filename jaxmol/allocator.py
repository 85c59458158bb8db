"""Keep the memory XLA frees for the next step, instead of handing it back to the kernel.

Why: XLA's CPU runtime allocates all temporaries of one execution as a single block (1.08 GB
for a quickstart train step at L = 128) with `malloc` and frees it when the execution ends.
glibc serves a block that large with `mmap` and returns it with `munmap`, so every train step
faults 263 k fresh zeroed pages in again: 0.7 s of kernel time per 5 s step, measured with
`bench/bench_train_step.py` (which prints faults and kernel seconds per step) and `strace`
(one 1,076,129,792-byte `mmap`/`munmap` pair per step). Worker threads allocate from their
own arenas, whose heaps are at most 64 MB, so a block that large always falls back to `mmap`
there, whatever the thresholds.

`keep_freed_memory` therefore sets, through `mallopt`, one arena for every thread, no `mmap`
for large blocks and no trimming of the heap's top: the freed block stays resident and the
next execution reuses it. The process's RSS then stays at its peak instead of falling between
steps; the peak itself does not grow. Call it first thing in a process, before JAX starts its
threads (the CLI entry points do); `JAXMOL_KEEP_FREED_MEMORY=0` turns it off. Off glibc (macOS,
musl) it does nothing.
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

    Idempotent; the first call decides. Returns True when the settings are in effect, False
    when turned off by ``JAXMOL_KEEP_FREED_MEMORY=0`` or not on glibc.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
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
