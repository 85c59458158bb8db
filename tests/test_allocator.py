"""jaxmol.allocator: with JAXMOL_KEEP_FREED_MEMORY=1, freed XLA temporaries stay resident for
the next execution (no fresh page faults); without it nothing changes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxmol import allocator
from tests import conftest

# Seven executions of a program whose temporaries (sin(x) and cos(x), 64 MB each, and the matmul's
# own) are far above glibc's mmap threshold; prints the minor page faults of the last four, per
# execution. Without the settings every execution faults ~295 k pages in; with them the heap
# reaches its size in the first two (91 k and 16 k faults here), then faults nothing, or now and
# then 16 k pages when a 64 MB block finds no hole and the heap grows.
PROGRAM = """
import json, resource, sys
from jaxmol import allocator
applied = allocator.keep_freed_memory()
import jax, jax.numpy as jnp
x = jnp.linspace(0.0, 1.0, 512 * 32768, dtype=jnp.float32).reshape(512, 32768)
f = jax.jit(lambda x: jnp.sum(jnp.sin(x) @ jnp.cos(x).T))
for _ in range(3):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
kept = resident_mb()
released = allocator.release_free_memory()
print(json.dumps({"applied": applied, "faults": faults, "released": released,
                  "kept_mb": kept, "after_release_mb": resident_mb()}))
"""
TEMP_PAGES = 2 * 64 * 2**20 // 4096  # the two temporaries, in 4 KiB pages


def _faults(switch: str) -> dict:
    env = {**conftest.subprocess_env(devices=1), allocator.ENV_SWITCH: switch}
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(allocator._libc() is None, reason="glibc only")
def test_freed_temporaries_are_reused_without_new_page_faults():
    on, off = _faults("1"), _faults("0")
    assert on["applied"] and not off["applied"]
    # Off: every execution maps its temporaries afresh and faults them in.
    assert off["faults"] > 0.8 * TEMP_PAGES, off
    # On: the freed blocks are reused.
    assert on["faults"] < 0.25 * off["faults"], (on, off)
    # release_free_memory hands the kept temporaries (>= 128 MB) back; off, there is nothing kept
    assert on["released"] and on["after_release_mb"] < on["kept_mb"] - 100, on
    assert not off["released"]


def test_off_unless_asked_and_the_first_call_decides(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    assert allocator.keep_freed_memory() is False  # opt-in
    assert allocator.release_free_memory() is False  # nothing kept, nothing to release
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv(allocator.ENV_SWITCH, "0")
    assert allocator.keep_freed_memory() is False
    monkeypatch.setenv(allocator.ENV_SWITCH, "1")
    assert allocator.keep_freed_memory() is False  # the first call decided
    assert os.environ[allocator.ENV_SWITCH] == "1"


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_the_runner_releases_memory_after_each_new_program_only_when_kept(monkeypatch, mode):
    import jax
    import jax.numpy as jnp

    from jaxmol.parallel import DataParallel

    releases = []
    monkeypatch.setattr(allocator, "release_free_memory", lambda: releases.append(1) or True)
    runner = DataParallel(mode, jax.devices()[:2])

    def double(x):
        return (2 * x,)

    for kept in (False, True):
        monkeypatch.setattr(allocator, "_applied", kept)
        releases.clear()
        run = runner.run(double, replicated_args=(), out_kinds=("sharded",))
        for shape in [(2, 3), (2, 3), (2, 5), (2, 3)]:
            (out,) = run(jnp.ones(shape))
            assert out.shape == shape and float(out.sum()) == 2 * out.size
        assert len(releases) == (2 if kept else 0)  # two input signatures


def test_resident_memory_follows_an_allocation_and_the_peak_stays():
    before = allocator.resident_memory_mb()
    block = np.ones(64 * 2**20 // 8)  # 64 MB, touched
    during = allocator.resident_memory_mb()
    del block
    after = allocator.resident_memory_mb()
    assert during["rss_mb"] >= before["rss_mb"] + 60
    assert during["peak_rss_mb"] >= during["rss_mb"]
    assert after["peak_rss_mb"] >= during["rss_mb"] - 1  # the peak is kept


# A worker thread fills its own arena with 16 KiB blocks (below the mmap threshold), then frees
# all but every 64th: the arena keeps the pages between the survivors resident until
# `return_idle_memory` trims it. Prints RSS (MB) filled, after the frees and after the trim.
FRAGMENTED_ARENA = """
import ctypes, json, threading
from jaxmol import allocator
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
rss = lambda: allocator.resident_memory_mb()["rss_mb"]
out = {}
def work():
    blocks = [libc.malloc(16384) for _ in range(20000)]  # 312 MiB
    for b in blocks:
        ctypes.memset(b, 1, 16384)
    out["filled"] = rss()
    for i, b in enumerate(blocks):
        if i % 64:
            libc.free(b)
    out["freed"] = rss()
    out["returned"] = allocator.return_idle_memory()
    out["trimmed"] = rss()
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps(out))
"""


@pytest.mark.skipif(allocator._libc() is None, reason="glibc only")
def test_idle_arena_memory_goes_back_to_the_kernel_with_the_default_settings():
    env = {**conftest.subprocess_env(devices=1), allocator.ENV_SWITCH: "0"}
    out = subprocess.run(
        [sys.executable, "-c", FRAGMENTED_ARENA],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    assert rss["freed"] > rss["filled"] - 100, rss  # glibc kept the freed pages
    assert rss["returned"], rss
    assert rss["trimmed"] < rss["freed"] - 200, rss  # most of the 307 MiB freed came back


def test_idle_memory_is_left_alone_when_freed_memory_is_kept(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", True)
    assert allocator.return_idle_memory() is False


def test_one_process_compiles_a_new_shape_once_and_trims_before_its_first_run(monkeypatch):
    import jax

    from jaxmol import compile_stats
    from jaxmol.parallel import DataParallel

    monkeypatch.setattr(allocator, "_applied", False)  # glibc's defaults
    events = []
    monkeypatch.setattr(allocator, "return_idle_memory", lambda: events.append("trim") or True)
    runner = DataParallel("shard_map", jax.devices()[:2])
    clock = compile_stats.install()

    def scaled(x, y):
        events.append("traced")
        return (x * y,)

    run = runner.run(scaled, replicated_args=(), out_kinds=("sharded",))
    before = clock.snapshot()
    for shape in [(2, 3), (2, 3), (2, 7), (2, 3)]:  # host inputs, host checks: no other programs
        (out,) = run(np.ones(shape, np.float32), np.full(shape, 3.0, np.float32))
        np.testing.assert_array_equal(np.asarray(out), np.full(shape, 3.0))
    # Two signatures: each compiled once (the ahead-of-time compile fills jit's own cache, the
    # run uses it), the arenas trimmed between each compile and its first run.
    assert (clock.snapshot() - before).programs == 2
    assert events == ["traced", "trim", "traced", "trim"]
