"""jaxmol.compile_stats: counts the programs JAX builds and the seconds spent building them."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxmol import compile_stats


def test_a_new_program_is_counted_once_and_a_cached_one_not_at_all():
    clock = compile_stats.install()
    assert compile_stats.install() is clock  # one clock per process

    @jax.jit
    def f(x):
        return jnp.tanh(x) @ x.T

    before = clock.snapshot()
    f(np.ones((8, 4), np.float32)).block_until_ready()
    first = clock.snapshot() - before
    assert first.programs == 1
    assert first.seconds > 0.0
    assert 0.0 < first.backend_seconds <= first.seconds

    f(np.zeros((8, 4), np.float32)).block_until_ready()  # same shape: no new program
    assert (clock.snapshot() - before).programs == 1
    f(np.ones((16, 4), np.float32)).block_until_ready()  # new shape: a new program
    assert (clock.snapshot() - before).programs == 2


def test_other_events_are_ignored():
    clock = compile_stats.install()
    before = clock.snapshot()
    jax.monitoring.record_event_duration_secs("/jaxmol/test/unrelated", 5.0)
    jax.monitoring.record_event_duration_secs(compile_stats.TRACE_EVENT, 0.25)
    spent = clock.snapshot() - before
    assert spent.programs == 0
    assert spent.seconds == 0.25
    assert spent.backend_seconds == 0.0
