"""Training: 8-device shard_map / pmap equivalence, kill-and-resume, config errors, NaN stop."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from configs import tiny
from jaxmol import builders, train_lib, train_step
from jaxmol.config import ConfigError, validate_config
from jaxmol.data.batching import PairBatcher
from jaxmol.data.datasets import load_split
from jaxmol.data.encoding import SplitEncoder
from jaxmol.data.tokenize import load_tokenizer
from jaxmol.evaluation import restore_for_eval
from jaxmol.models.retrieval import RetrievalModel
from jaxmol.parallel import DataParallel, select_devices

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


def _env(devices=8):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(REPO)
    return env


def _train_command(workdir, *overrides):
    return [
        sys.executable,
        str(REPO / "train.py"),
        "--config",
        str(REPO / "configs" / "tiny.py"),
        "--workdir",
        str(workdir),
        *overrides,
    ]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--config.loss.adverary=grl", "adverary"),  # typo in a key
        ("--config.batch_size=big", "batch_size"),  # wrong type
        ("--config.parallel=mpi", "config.parallel"),  # bad value
    ],
)
def test_config_errors_fail_at_start_naming_the_key(tmp_path, override, expected):
    result = subprocess.run(
        _train_command(tmp_path / "w", override),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode != 0
    assert expected in result.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


RESUME_OVERRIDES = (
    "--config.num_steps=24",  # 4 epochs of 6 batches: the resume crosses epoch boundaries
    "--config.checkpoint_every_steps=4",
    "--config.eval_every_steps=1000",
    "--config.data.test_splits=()",
)


def _final_params(workdir):
    _, variables, _, step = restore_for_eval(workdir, step="latest")
    return step, jax.device_get(variables)


def _checkpoint_steps(workdir):
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())  # finalised


def _run_until_checkpoint_then_signal(workdir, after_step, sig):
    """Starts training, waits for a finalised checkpoint beyond `after_step`, sends `sig`."""
    process = subprocess.Popen(
        _train_command(workdir, *RESUME_OVERRIDES),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.time() + 600
    while not [s for s in _checkpoint_steps(workdir) if s > after_step]:
        assert process.poll() is None, "training exited before the checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


@pytest.mark.slow
def test_interrupted_and_killed_run_resumes_to_the_same_parameters(tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(
        _train_command(reference, *RESUME_OVERRIDES, "--config.parallel=pmap"),
        env=_env(),
        check=True,
        capture_output=True,
        timeout=600,
        cwd=REPO,
    )
    run = tmp_path / "run"
    # Ctrl-C: the run finishes its step, saves a checkpoint there, and exits.
    code, stderr = _run_until_checkpoint_then_signal(run, 0, signal.SIGINT)
    assert code != 0 and "interrupted: saved a checkpoint at step" in stderr
    interrupted_at = _checkpoint_steps(run)[-1]
    assert interrupted_at < 24
    # SIGKILL after the next checkpoint: nothing gets the chance to save.
    code, _ = _run_until_checkpoint_then_signal(run, interrupted_at, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert _checkpoint_steps(run)[-1] < 24
    subprocess.run(
        _train_command(run, *RESUME_OVERRIDES),
        env=_env(),
        check=True,
        capture_output=True,
        timeout=600,
        cwd=REPO,
    )
    step_a, params_a = _final_params(reference)
    step_b, params_b = _final_params(run)
    assert step_a == step_b == 24
    _assert_trees_close(params_b, params_a, atol=1e-6)
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 24
    assert json.loads((run / "config.json").read_text())["num_steps"] == 24
