"""Shared layers: MaskedBatchNorm (masked statistics, named stat sets, exact across devices)
and the masked pooling helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxmol.models.layers import MaskedBatchNorm, masked_token_mean


def data_mesh():
    """1-D mesh 'data' over all devices; Auto axes so host arrays are sharded by in_specs."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _numpy_batchnorm(x, mask, scale, bias, eps=1e-5):
    real = x[mask]
    mean = real.mean(0)
    var = real.var(0)  # biased
    unbiased = real.var(0, ddof=1)
    y = (x - mean) / np.sqrt(var + eps) * scale + bias
    y[~mask] = 0.0
    return y, mean, var, unbiased


def test_masked_batchnorm_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (11, 5)).astype(np.float32)
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1], bool)
    bn = MaskedBatchNorm()
    variables = bn.init(jax.random.key(0), x, mask, use_running_average=False)
    scale = rng.normal(size=5).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": variables["batch_stats"]}
    y, updated = bn.apply(variables, x, mask, use_running_average=False, mutable=["batch_stats"])
    expected, mean, _, unbiased = _numpy_batchnorm(x, mask, scale, bias)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    stats = updated["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * unbiased, rtol=1e-5)

    # Eval mode normalises with the running statistics.
    y_eval = bn.apply({**variables, "batch_stats": stats}, x, mask, use_running_average=True)
    running_mean, running_var = np.asarray(stats["mean"]), np.asarray(stats["var"])
    expected_eval = (x - running_mean) / np.sqrt(running_var + 1e-5) * scale + bias
    expected_eval[~mask] = 0.0
    np.testing.assert_allclose(y_eval, expected_eval, atol=1e-5)


def test_masked_batchnorm_ignores_padding_rows():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(6, 4)).astype(np.float32)
    bn = MaskedBatchNorm()
    variables = bn.init(jax.random.key(0), real, use_running_average=False)

    def run(x, mask):
        return bn.apply(variables, x, mask, use_running_average=False, mutable=["batch_stats"])

    y_ref, stats_ref = run(real, np.ones(6, bool))
    padded = np.concatenate([real[:2], 1e3 * rng.normal(size=(5, 4)), real[2:]]).astype(np.float32)
    mask = np.array([1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1], bool)
    y, stats = run(padded, mask)
    np.testing.assert_allclose(y[mask], y_ref, atol=1e-5)
    assert np.all(np.asarray(y)[~mask] == 0.0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), stats, stats_ref)

    # A batch without real rows leaves the running statistics unchanged.
    _, stats_empty = run(padded, np.zeros(11, bool))
    jax.tree.map(
        np.testing.assert_array_equal, stats_empty["batch_stats"], variables["batch_stats"]
    )


def test_masked_batchnorm_named_stat_sets():
    x = np.random.default_rng(2).normal(size=(5, 3)).astype(np.float32)
    bn = MaskedBatchNorm(stat_sets=("txt", "mol"))
    variables = bn.init(jax.random.key(0), x, use_running_average=False, stats="txt")
    assert set(variables["batch_stats"]) == {"txt_mean", "txt_var", "mol_mean", "mol_var"}
    _, updated = bn.apply(
        variables, x, use_running_average=False, stats="mol", mutable=["batch_stats"]
    )
    stats = updated["batch_stats"]
    np.testing.assert_array_equal(stats["txt_mean"], 0.0)
    np.testing.assert_allclose(stats["mol_mean"], 0.1 * x.mean(0), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown statistics set"):
        bn.apply(variables, x, use_running_average=True, stats="image")


def test_masked_batchnorm_synced_across_devices_equals_single_device():
    devices = jax.device_count()
    assert devices == 8, "tests/conftest.py sets 8 fake CPU devices"
    rows_per_device, features = 4, 3
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 2.0, (devices * rows_per_device, features)).astype(np.float32)
    # Uneven real-row counts per device: 4, 1, 0, 3, 2, 4, 0, 1.
    counts = [4, 1, 0, 3, 2, 4, 0, 1]
    mask = np.concatenate([np.arange(rows_per_device) < c for c in counts])
    single = MaskedBatchNorm()
    synced = MaskedBatchNorm(axis_name="data")
    variables = single.init(jax.random.key(0), x, use_running_average=False)
    y_ref, stats_ref = single.apply(
        variables, x, mask, use_running_average=False, mutable=["batch_stats"]
    )

    def per_device(variables, x, mask):
        return synced.apply(variables, x, mask, use_running_average=False, mutable=["batch_stats"])

    mesh = data_mesh()
    sharded = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=(P("data"), P()),
            check_vma=False,
        )
    )
    y, stats = sharded(variables, x, mask)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5),
        stats,
        stats_ref,
    )


# ----------------------------------------------------------------------------------------- GIN


def test_masked_token_mean_averages_only_masked_positions_and_zeroes_empty_rows():
    values = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)  # [B, L, D]
    mask = jnp.array([[True, False, True], [False, False, False]])  # [B, L]
    pooled = np.asarray(masked_token_mean(values, mask))  # [B, D]
    np.testing.assert_allclose(pooled[0], (np.asarray(values[0, 0]) + np.asarray(values[0, 2])) / 2)
    np.testing.assert_array_equal(pooled[1], np.zeros(2))
