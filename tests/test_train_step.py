"""jaxmol.train_step: the run's compute dtype reaches the step; bfloat16 stays close to float32.

(Runner equivalence, resume and the loop are tested in test_train.py.)
"""

import jax
import numpy as np
import optax
import pytest

from configs import tiny
from jaxmol import builders, train_step
from jaxmol.data.batching import PairBatcher
from jaxmol.data.datasets import load_split
from jaxmol.data.encoding import SplitEncoder
from jaxmol.data.tokenize import load_tokenizer
from jaxmol.models.retrieval import RetrievalModel
from jaxmol.parallel import DataParallel, select_devices


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    config = tiny.get_config()
    tokenizer = load_tokenizer(builders.text_model_dir(config), max_length=64)
    encoder = SplitEncoder(
        tokenizer, on_invalid="skip", cache_dir=str(tmp_path_factory.mktemp("features"))
    )
    split = encoder(load_split("pcdes/train").select(range(24)))
    batcher = PairBatcher(split, batch_size=16, shuffle=False, text_buckets=(64,))
    return batcher.make_batch(split.rows[:14])  # 14 real pairs + 2 masked


def _one_step(dtype, batch):
    config = tiny.get_config()
    config.model.dtype = dtype
    config.model.text_dropout = 0.1  # the train-mode attention path with dropout
    runner = DataParallel("shard_map", select_devices(1))
    model = RetrievalModel(builders.model_config_for(config))
    state, tx, critic_tx = train_step.init_state(
        config, model, jax.tree.map(lambda x: x[0], batch), total_steps=10
    )
    step = train_step.compile_train_step(runner, config, model, tx, critic_tx, return_grads=True)
    state, metrics = step(runner.replicate(state), runner.shard(batch))
    return jax.device_get(metrics), jax.device_get(state)


def test_with_compute_dtype():
    config = tiny.get_config()
    model = RetrievalModel(builders.model_config_for(config))
    assert train_step.with_compute_dtype(model, config) is model
    config.model.dtype = "bfloat16"
    half = train_step.with_compute_dtype(model, config)
    assert half.config.dtype == "bfloat16" and half.config.bert == model.config.bert
    del config.model["dtype"]  # a config saved before the key existed
    assert train_step.with_compute_dtype(model, config) is model


def test_bfloat16_step_is_close_to_float32(one_batch):
    """Same initial state, batch and dropout key: the bfloat16 step's loss and gradients
    (and the updated parameters) are float32, and close to the float32 step's."""
    full, _ = _one_step("float32", one_batch)
    half, half_state = _one_step("bfloat16", one_batch)
    print(f"loss float32 {full['loss']:.6f}, bfloat16 {half['loss']:.6f}")
    assert np.isfinite(half["loss"])
    np.testing.assert_allclose(half["loss"], full["loss"], rtol=2e-2)
    np.testing.assert_allclose(half["grad_norm"], full["grad_norm"], rtol=0.1)
    for tree in (half["grads"], half_state.params):
        assert all(x.dtype == np.float32 for x in jax.tree.leaves(tree))
    diff = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), half["grads"], full["grads"])
    relative = optax.tree.norm(diff) / optax.tree.norm(full["grads"])
    print(f"relative gradient difference {relative:.4f}")
    assert relative < 0.1
