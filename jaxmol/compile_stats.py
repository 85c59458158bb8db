"""How much of a process's time went into building XLA programs, from JAX's own monitoring events.

JAX reports, for every program it builds, the seconds spent tracing the function to a jaxpr,
lowering it to StableHLO and compiling it with XLA (`jax.monitoring` duration events). The
evaluation log (`evaluation.evaluate_split`) uses these totals to say how much of its wall time
went into building programs: on a 2-core CPU a BERT program of one new shape takes seconds to
compile, and an evaluation that meets many shapes could spend a large share of its time there.

    clock = compile_stats.install()
    before = clock.snapshot()
    ...  # work
    spent = clock.snapshot() - before  # CompileTotals: .programs, .seconds

A program served from JAX's persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``) still
counts as one program, with the seconds of tracing, lowering and the cache read.
"""

from __future__ import annotations

import dataclasses
import threading

import jax

# The event names of jax._src.dispatch (JAX 0.10, the pinned version; tests/test_compile_stats.py).
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_COUNTED = (TRACE_EVENT, LOWER_EVENT, BACKEND_COMPILE_EVENT)


@dataclasses.dataclass(frozen=True)
class CompileTotals:
    """Totals since the clock was installed.

    Attributes:
      programs: XLA programs built (backend compiles, including persistent-cache hits).
      seconds: seconds of tracing, lowering and backend compilation together.
      backend_seconds: the XLA part of `seconds` alone.
    """

    programs: int = 0
    seconds: float = 0.0
    backend_seconds: float = 0.0

    def __sub__(self, other: CompileTotals) -> CompileTotals:
        return CompileTotals(
            self.programs - other.programs,
            self.seconds - other.seconds,
            self.backend_seconds - other.backend_seconds,
        )


class CompileClock:
    """Accumulates JAX's compile-duration events (thread-safe: the prefetch threads compile too)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._totals = CompileTotals()

    def _on_duration(self, event: str, duration: float, **unused_metadata) -> None:
        if event not in _COUNTED:
            return
        with self._lock:
            t = self._totals
            is_backend = event == BACKEND_COMPILE_EVENT
            self._totals = CompileTotals(
                t.programs + int(is_backend),
                t.seconds + float(duration),
                t.backend_seconds + (float(duration) if is_backend else 0.0),
            )

    def snapshot(self) -> CompileTotals:
        """The totals so far."""
        with self._lock:
            return self._totals


_clock: CompileClock | None = None
_install_lock = threading.Lock()


def install() -> CompileClock:
    """Registers the process's one clock with `jax.monitoring` (idempotent) and returns it.

    Only programs built after the first call are counted.
    """
    global _clock
    with _install_lock:
        if _clock is None:
            _clock = CompileClock()
            jax.monitoring.register_event_duration_secs_listener(_clock._on_duration)
        return _clock
