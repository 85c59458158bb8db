"""orbax checkpoints: round trip, best-checkpoint choice, 'does not fit this model', partial
restore of params and batch statistics only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmol.checkpointing import Checkpointer, CheckpointError


def _state(scale: float = 1.0) -> dict:
    return {
        "params": {"dense": {"kernel": scale * jnp.ones((3, 2)), "bias": jnp.zeros(2)}},
        "batch_stats": {"bn": {"mean": jnp.full((2,), scale)}},
        "opt_state": {"mu": jnp.arange(6.0).reshape(3, 2)},
        "step": jnp.asarray(7, jnp.int32),
    }


def _save(checkpointer, step, metrics=None, scale=1.0):
    checkpointer.save(
        step,
        _state(scale),
        data_position={"epoch": 1, "step": step},
        config={"best_metric": "val/mean_mrr", "seed": 3},
        metrics=metrics,
    )


def test_round_trip_restores_state_position_config_and_metrics(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=3, best_metric="val/mean_mrr")
    _save(checkpointer, 5, metrics={"val/mean_mrr": 0.25}, scale=2.0)
    checkpointer.wait()
    restored = checkpointer.restore_state(5, _state(0.0))
    for (path, got), want in zip(
        jax.tree_util.tree_flatten_with_path(restored)[0],
        jax.tree.leaves(_state(2.0)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), jax.tree_util.keystr(path))
    assert checkpointer.restore_json(5, "data_position") == {"epoch": 1, "step": 5}
    assert checkpointer.restore_json(5, "config") == {"best_metric": "val/mean_mrr", "seed": 3}
    assert checkpointer.restore_json(5, "metrics") == {"val/mean_mrr": 0.25}
    checkpointer.close()


def test_best_step_ignores_unvalidated_checkpoints_and_prefers_the_earlier_of_ties(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=10, best_metric="val/mean_mrr")
    _save(checkpointer, 1, metrics={"val/mean_mrr": 0.4})
    _save(checkpointer, 2)  # no validation of its own: never competes
    _save(checkpointer, 3, metrics={"val/mean_mrr": 0.4})  # ties with step 1
    _save(checkpointer, 4, metrics={})
    checkpointer.wait()
    assert checkpointer.best_step() == 1
    _save(checkpointer, 5, metrics={"val/mean_mrr": 0.5})
    checkpointer.wait()
    assert checkpointer.best_step() == 5
    checkpointer.close()


def test_best_step_is_none_without_any_validated_checkpoint(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2, best_metric="val/mean_mrr")
    _save(checkpointer, 1)
    checkpointer.wait()
    assert checkpointer.best_step() is None
    checkpointer.close()


def test_a_checkpoint_that_does_not_fit_names_every_differing_path(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2)
    _save(checkpointer, 1)
    checkpointer.wait()
    wrong = _state()
    wrong["params"]["dense"]["kernel"] = jnp.ones((4, 2))  # other shape
    wrong["params"]["extra"] = jnp.ones(1)  # not in the checkpoint
    with pytest.raises(CheckpointError, match="does not fit this model") as error:
        checkpointer.restore_state(1, wrong)
    message = str(error.value)
    assert "params/dense/kernel" in message and "(3, 2)" in message and "(4, 2)" in message
    assert "missing in checkpoint: params/extra" in message
    checkpointer.close()


def test_restore_variables_reads_params_and_batch_stats_only(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2)
    _save(checkpointer, 1, scale=3.0)
    checkpointer.wait()
    target = {k: v for k, v in _state(0.0).items() if k in ("params", "batch_stats")}
    variables = checkpointer.restore_variables(1, target)
    assert set(variables) == {"params", "batch_stats"}
    np.testing.assert_array_equal(variables["params"]["dense"]["kernel"], 3.0 * np.ones((3, 2)))
    np.testing.assert_array_equal(variables["batch_stats"]["bn"]["mean"], [3.0, 3.0])
    checkpointer.close()


def test_a_missing_step_is_a_clear_error(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2)
    _save(checkpointer, 1)
    checkpointer.wait()
    with pytest.raises(CheckpointError, match="no checkpoint at step 9"):
        checkpointer.restore_json(9, "config")
    checkpointer.close()


def test_orbax_keeps_the_earlier_of_tied_best_checkpoints(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=1, best_metric="val/mean_mrr")
    _save(checkpointer, 1, metrics={"val/mean_mrr": 0.4})
    _save(checkpointer, 2, metrics={"val/mean_mrr": 0.4})
    _save(checkpointer, 3)
    checkpointer.wait()
    assert checkpointer.all_steps() == [1, 3]  # best (earliest of the tie) + latest
    assert checkpointer.best_step() == 1
    checkpointer.close()
