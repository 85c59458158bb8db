"""jaxmol.train_step: the run's compute dtype reaches the step; bfloat16 stays close to float32;
the adversary's options (reversal schedule, features, validation).

(Runner equivalence, resume and the loop are tested in test_train.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from jaxmol import builders, losses, train_step
from jaxmol.config import ConfigError, validate_config
from jaxmol.data.batching import PairBatcher
from jaxmol.data.datasets import load_split
from jaxmol.data.encoding import SplitEncoder
from jaxmol.data.tokenize import load_tokenizer
from jaxmol.models.retrieval import ModalityDiscriminator, RetrievalModel
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


# ----------------------------------------------------------------------------------------------
# The adversary's options (loss.grl_schedule, loss.adv_features, loss.disc_label_smoothing).


def test_grl_scale_at_constant_and_dann_schedules():
    config = tiny.get_config()
    config.model.grl_scale = 0.5
    assert float(train_step.grl_scale_at(config, 7, None)) == 0.5  # constant: no total needed
    config.loss.grl_schedule = "dann"
    config.loss.grl_gamma = 10.0
    scale = jax.jit(lambda step: train_step.grl_scale_at(config, step, 200))
    assert float(scale(0)) == 0.0  # the first step: no reversed gradient at all
    np.testing.assert_allclose(scale(100), 0.5 * np.tanh(2.5), rtol=1e-6)  # p = 0.5
    np.testing.assert_allclose(scale(200), 0.5 * (2 / (1 + np.exp(-10.0)) - 1), rtol=1e-6)
    with pytest.raises(ValueError, match="total_steps"):
        train_step.grl_scale_at(config, 0, None)
    # a config saved before the keys existed: the constant scale
    del config.loss["grl_schedule"], config.loss["grl_gamma"]
    assert float(train_step.grl_scale_at(config, 3, None)) == 0.5


def _discriminator_only(features_dim: int = 8):
    """A RetrievalModel (only its discriminator is applied) and discriminator-only params."""
    model = RetrievalModel(builders.model_config_for(tiny.get_config()))
    disc = ModalityDiscriminator(model.config.disc_hidden, model.config.disc_negative_slope)
    params = {"discriminator": disc.init(jax.random.PRNGKey(0), jnp.zeros((1, features_dim)))}
    return model, {"discriminator": params["discriminator"]["params"]}


def test_grl_discriminator_logits_reverse_only_the_feature_gradient():
    """Discriminator parameters get +∇BCE at every scale; features get −scale·∇BCE (0 at the
    DANN schedule's first step); masked rows get nothing."""
    model, params = _discriminator_only()
    rng = np.random.default_rng(0)
    feats_txt = jnp.asarray(rng.standard_normal((6, 8)), jnp.float32)
    feats_mol = jnp.asarray(rng.standard_normal((6, 8)) + 1.0, jnp.float32)
    where = jnp.array([True, True, False, True, True, False])
    both = jnp.concatenate([where, where])

    def bce(logits_txt, logits_mol):
        per_entry = losses.modality_adversarial_loss(
            logits_txt, logits_mol, where=where, label_smoothing=0.1
        )
        return losses.masked_mean(per_entry, both)

    def reversed_loss(params, ft, fm, scale):
        return bce(*train_step.grl_discriminator_logits(model, params, ft, fm, scale))

    def plain_loss(params, ft, fm):
        def discriminate(x):
            return model.apply({"params": params}, x, method=RetrievalModel.discriminate)

        return bce(discriminate(ft), discriminate(fm))

    plain = jax.grad(plain_loss, argnums=(0, 1, 2))(params, feats_txt, feats_mol)
    grads = jax.jit(jax.grad(reversed_loss, argnums=(0, 1, 2)))
    for scale in (0.0, 0.25, 1.0):
        g_params, g_txt, g_mol = grads(params, feats_txt, feats_mol, jnp.float32(scale))
        for a, b in zip(jax.tree.leaves(g_params), jax.tree.leaves(plain[0]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)  # the discriminator learns
        np.testing.assert_allclose(g_txt, -scale * plain[1], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(g_mol, -scale * plain[2], rtol=1e-5, atol=1e-8)
        for g in (g_txt, g_mol):
            np.testing.assert_array_equal(np.asarray(g)[~np.asarray(where)], 0.0)
    assert float(optax.tree.norm(plain[1])) > 0  # the check above was not vacuous
    # At the DANN schedule's first step the features get exactly nothing.
    config = tiny.get_config()
    config.loss.grl_schedule = "dann"
    first = train_step.grl_scale_at(config, 0, 100)
    _, g_txt, g_mol = grads(params, feats_txt, feats_mol, first)
    assert not np.any(np.asarray(g_txt)) and not np.any(np.asarray(g_mol))


def test_adversary_features_choice():
    config = tiny.get_config()
    extras = {"pooled_txt": "e_t", "pooled_mol": "e_m"}
    assert train_step.adversary_features(config, "z_t", "z_m", extras) == ("e_t", "e_m")
    config.loss.adv_features = "embeddings"
    assert train_step.adversary_features(config, "z_t", "z_m", extras) == ("z_t", "z_m")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("loss.grl_schedule", "dan", r"config\.loss\.grl_schedule='dan' is not one of"),
        ("loss.adv_features", "pooled_z", r"config\.loss\.adv_features='pooled_z'"),
        ("loss.grl_gamma", 0.0, r"config\.loss\.grl_gamma must be > 0"),
        ("loss.disc_label_smoothing", 0.5, r"config\.loss\.disc_label_smoothing must be in"),
    ],
)
def test_adversary_option_values_are_validated(key, value, message):
    config = tiny.get_config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_grl_only_options_are_refused_with_another_adversary():
    config = tiny.get_config()
    config.loss.grl_schedule = "dann"
    config.loss.disc_label_smoothing = 0.1
    validate_config(config)  # fine with 'grl'
    config.loss.adversary = "wgan_gp"
    with pytest.raises(ConfigError, match=r"config\.loss\.grl_schedule='dann' applies only to"):
        validate_config(config)
    config.loss.grl_schedule = "constant"
    with pytest.raises(ConfigError, match=r"config\.loss\.disc_label_smoothing=0\.1 applies"):
        validate_config(config)
    config.loss.adv_features = "embeddings"  # the critic may read either
    config.loss.disc_label_smoothing = 0.0
    validate_config(config)
