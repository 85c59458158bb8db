"""Training: 8-device shard_map / pmap equivalence, config errors, NaN stop. (Signals, kills and
resumes: tests/test_faults.py in process and tests/test_multihost.py with real processes.)"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from configs import tiny
from jaxmol import builders, train_lib, train_step
from jaxmol.checkpointing import Checkpointer, CheckpointError
from jaxmol.config import ConfigError, validate_config
from jaxmol.data.batching import PairBatcher
from jaxmol.data.datasets import load_split
from jaxmol.data.encoding import SplitEncoder
from jaxmol.data.tokenize import load_tokenizer
from jaxmol.models.retrieval import RetrievalModel
from jaxmol.parallel import DataParallel, select_devices
from tests import conftest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    config = tiny.get_config()
    tokenizer = load_tokenizer(builders.text_model_dir(config), max_length=64)
    dataset = load_split("pcdes/train").select(range(40))
    encoder = SplitEncoder(
        tokenizer, on_invalid="skip", cache_dir=str(tmp_path_factory.mktemp("features"))
    )
    return encoder(dataset)


def _three_steps(config, split, mode, num_devices):
    """Three train steps on the same global batch of 16 (13 real pairs + 3 masked).

    Plain SGD replaces Adam here: Adam's first updates are close to lr·sign(g), so elements
    whose true gradient is 0 (biases right before a BatchNorm) would move by ±lr on rounding
    noise and hide the comparison. The runners must agree whatever the optimiser.
    """
    runner = DataParallel(mode, select_devices(num_devices))
    batcher = PairBatcher(
        split, batch_size=16, num_devices=num_devices, shuffle=False, text_buckets=(64,)
    )
    batch = batcher.make_batch(split.rows[:13])
    model = RetrievalModel(builders.model_config_for(config))
    chunk = jax.tree.map(lambda x: x[0], batch)
    state, _, critic_tx = train_step.init_state(config, model, chunk, total_steps=10)
    tx = optax.sgd(0.05)
    state = state.replace(opt_state=tx.init(state.params))
    step = train_step.compile_train_step(
        runner, config, model, tx, critic_tx, return_grads=True, donate_state=False
    )
    state = runner.replicate(state)
    losses, grads = [], []
    for _ in range(3):
        state, metrics = step(state, runner.shard(batch))
        metrics = jax.device_get(runner.unreplicate(metrics))
        losses.append(float(metrics["loss"]))
        grads.append(metrics["grads"])
    return losses, grads, jax.device_get(runner.unreplicate(state))


def _assert_trees_close(a, b, atol, rtol=0.0):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), atol=atol, rtol=rtol, err_msg=jax.tree_util.keystr(path)
        )


@pytest.mark.parametrize("adversary", ["grl", "wgan_gp"])
def test_eight_devices_equal_one_device(small_split, adversary):
    assert jax.device_count() == 8
    config = tiny.get_config()
    config.loss.adversary = adversary
    if adversary == "wgan_gp":
        # InfoNCE has no argmax: the batch-hard triplet's hardest negative can flip between
        # near-tied candidates on float32 summation-order noise (seen on one CPU with the
        # critic's extra term), which changes the gradient by far more than rounding. The
        # triplet is compared under the 'grl' case.
        config.loss.first_order = "info_nce"
    reference_losses, reference_grads, reference = _three_steps(config, small_split, "shard_map", 1)
    modes = ["shard_map", "pmap"] if adversary == "grl" else ["shard_map"]
    for mode in modes:
        losses, grads, state = _three_steps(config, small_split, mode, 8)
        np.testing.assert_allclose(losses, reference_losses, atol=1e-5, rtol=0)
        # Gradients (largest entries ~0.8) agree to float32 summation-order noise.
        for ours, theirs in zip(grads, reference_grads, strict=True):
            _assert_trees_close(ours, theirs, atol=5e-5)
        _assert_trees_close(state.params, reference.params, atol=1e-5)
        # Running variances reach ~6: compare them within 1e-5 relative as well.
        _assert_trees_close(state.batch_stats, reference.batch_stats, atol=1e-5, rtol=1e-5)
    # The steps did something: the loss moved.
    assert reference_losses[2] < reference_losses[0]


def test_wgan_gp_updates_the_critic_and_grl_does_not_freeze_it(small_split):
    config = tiny.get_config()
    config.loss.adversary = "wgan_gp"
    model = RetrievalModel(builders.model_config_for(config))
    labels = train_step.param_labels(builders.abstract_variables(config)[1]["params"], config)
    assert set(jax.tree.leaves(labels["discriminator"])) == {"critic"}
    assert set(jax.tree.leaves(labels["txt"])) == {"bert"}
    config.optim.freeze_bert_layers = 1
    labels = train_step.param_labels(builders.abstract_variables(config)[1]["params"], config)
    assert set(jax.tree.leaves(labels["txt"]["embeddings"])) == {"frozen"}
    assert set(jax.tree.leaves(labels["txt"]["layer_0"])) == {"frozen"}
    assert set(jax.tree.leaves(labels["txt"]["layer_1"])) == {"bert"}
    del model


def test_learning_rate_schedule_matches_the_official_shape():
    config = tiny.get_config()
    config.optim.warmup_steps = 10
    config.optim.decay_ends_warmup_early = True
    schedule = train_step.learning_rate_schedule(config, 1.0, total_steps=100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(90)) == pytest.approx(0.0, abs=1e-6)  # 0 at total - warmup
    assert float(schedule(99)) == pytest.approx(0.0, abs=1e-6)
    config.optim.decay_ends_warmup_early = False
    schedule = train_step.learning_rate_schedule(config, 1.0, total_steps=100)
    assert float(schedule(55)) == pytest.approx(0.5)


def test_nonfinite_loss_names_the_step():
    runner = DataParallel("shard_map", select_devices(1))
    pending = [(7, {"loss": np.float32(1.0)}), (8, {"loss": np.float32(np.nan)})]
    with pytest.raises(train_lib.NonFiniteLossError, match="at step 8"):
        train_lib._check_finite(pending, runner)


def test_invalid_config_values_name_the_key():
    config = tiny.get_config()
    config.loss.adversary = "gan"
    with pytest.raises(ConfigError, match=r"config\.loss\.adversary='gan'"):
        validate_config(config)
    config = tiny.get_config()
    config.data.text_buckets = (32,)
    with pytest.raises(ConfigError, match=r"config\.data\.text_buckets"):
        validate_config(config)
    config = tiny.get_config()
    config.model.num_heads = 5
    with pytest.raises(ConfigError, match=r"num_heads"):
        validate_config(config)


_env = conftest.subprocess_env
_train_command = conftest.train_command


def test_config_typos_and_wrong_types_name_the_key():
    config = tiny.get_config()
    config.lock()  # as the CLI's config flag does
    with pytest.raises(AttributeError, match="adverary"):
        config.loss.adverary = "grl"
    with pytest.raises(TypeError, match="batch_size"):
        config.batch_size = "big"


def test_a_config_typo_on_the_command_line_fails_at_start_naming_the_key(tmp_path):
    result = subprocess.run(
        _train_command(tmp_path / "w", "--config.loss.adverary=grl"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode != 0
    assert "adverary" in result.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------
# A tiny run in process: what training returns and writes.


def test_training_returns_and_writes_the_test_metrics(trained_run):
    workdir, results = trained_run
    assert list(results) == ["pcdes/test"]
    report = results["pcdes/test"]
    assert report["checkpoint_step"] == conftest.IN_PROCESS_STEPS
    for direction in ("t2m", "m2t"):
        assert 0.0 <= report[direction]["mrr"] <= 1.0
        assert report[direction]["num_queries"] == report[direction]["pool_size"] > 0
    written = json.loads((workdir / "eval" / "pcdes_test__pool.json").read_text())
    assert written["t2m"] == report["t2m"] and written["m2t"] == report["m2t"]
    assert (
        json.loads((workdir / "config.json").read_text())["num_steps"] == conftest.IN_PROCESS_STEPS
    )
    log = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, conftest.IN_PROCESS_STEPS + 1))
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    assert [r["step"] for r in log if "val/mean_mrr" in r] == [2, 4]
    # The run's memory curve: this process's RSS and its peak so far at every logged step.
    memory = [(r["rss_mb"], r["peak_rss_mb"]) for r in log if "loss" in r]
    assert len(memory) == conftest.IN_PROCESS_STEPS
    assert all(100 < rss <= peak for rss, peak in memory), memory
    assert [peak for _, peak in memory] == sorted(peak for _, peak in memory)


def test_each_checkpoint_carries_only_the_validation_of_its_own_step(trained_run):
    workdir, _ = trained_run
    log = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["val/mean_mrr"] for r in log if "val/mean_mrr" in r}
    checkpointer = Checkpointer(workdir / "checkpoints", read_only=True, async_save=False)
    saved = {step: checkpointer.restore_json(step, "metrics") for step in checkpointer.all_steps()}
    assert sorted(saved) == [1, 2, 3, 4]
    assert saved[1] == saved[3] == {}  # not validated there: never "best" with another's score
    for step in (2, 4):
        assert saved[step]["val/mean_mrr"] == pytest.approx(logged[step])
    checkpointer.best_metric = "val/mean_mrr"
    best = checkpointer.best_step()
    checkpointer.close()
    assert logged[best] == max(logged.values()) and best in (2, 4)


def test_resuming_under_a_changed_model_config_is_refused_naming_the_key(trained_run):
    workdir, _ = trained_run
    config = conftest.in_process_config()
    config.model.gin_dim = 48
    with pytest.raises(CheckpointError, match=r"model\.gin_dim: 32 -> 48"):
        train_lib.setup(config, workdir)


def test_restore_for_eval_builds_no_optimiser(trained_run):
    """optax cannot even be imported: restoring must not build or read optimiser state."""
    workdir, _ = trained_run
    code = (
        "import sys; sys.modules['optax'] = None\n"
        "from jaxmol.evaluation import restore_for_eval\n"
        f"model, variables, config, step = restore_for_eval({str(workdir)!r}, 'latest')\n"
        "assert set(variables) == {'params', 'batch_stats'}, set(variables)\n"
        "assert step == 4, step\n"
        "print('restored', step)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=_env(1), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "restored 4" in done.stdout


def test_a_checkpoint_is_written_only_after_its_steps_were_checked_finite(tmp_path, monkeypatch):
    """A NaN at step 2, with checkpoints every 3 steps and no log step before the last (4): the
    run must stop at the checkpoint of step 3 (before writing it), naming step 2."""
    compile_step = train_lib.compile_train_step

    def with_nan_at_step_2(*args, **kwargs):
        step_fn = compile_step(*args, **kwargs)

        def run(state, batch):
            state, metrics = step_fn(state, batch)
            poisoned = jax.numpy.where(state.step == 2, jax.numpy.nan, metrics["loss"])
            return state, {**metrics, "loss": poisoned}

        return run

    monkeypatch.setattr(train_lib, "compile_train_step", with_nan_at_step_2)
    # The session run's config (its compiled step is in the compilation cache).
    config = conftest.in_process_config()
    config.checkpoint_every_steps = 3
    config.log_every_steps = 100
    config.data.val_split = ""
    config.data.test_splits = ()
    with pytest.raises(train_lib.NonFiniteLossError, match="at step 2"):
        train_lib.train_and_evaluate(config, str(tmp_path))
    assert _checkpoint_steps(tmp_path) == []


def _checkpoint_steps(workdir):
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())  # finalised
