"""builders: config -> objects; saved configs merged onto today's defaults; abstract variables."""

import functools
import json

import jax
import pytest

from configs import tiny
from jaxmol import builders
from jaxmol.config import default_config


def _saved_json(config) -> dict:
    """The config as the training loop writes it (JSON: tuples become lists)."""
    return json.loads(json.dumps(config.to_dict(), default=list))


def test_a_saved_config_lacking_keys_takes_todays_defaults():
    saved = _saved_json(tiny.get_config())
    del saved["model"]["gin_mlp_batch_norm"]  # a knob added after the run was written
    del saved["loss"]["gp_weight"]
    saved["model"]["retired_knob"] = 3  # a knob that no longer exists
    merged = builders.run_config_from_saved(saved)
    defaults = default_config()
    assert merged.model.gin_mlp_batch_norm == defaults.model.gin_mlp_batch_norm
    assert merged.loss.gp_weight == defaults.loss.gp_weight
    assert "retired_knob" not in merged.model
    # Everything the run did save wins over the defaults, with its original types.
    assert merged.model.gin_dim == 32 != defaults.model.gin_dim
    assert merged.data.text_buckets == (64,)
    assert merged.model.text_random.hidden_size == saved["model"]["text_random"]["hidden_size"]
    assert builders.flat_config(merged).keys() == builders.flat_config(defaults).keys()


def test_abstract_variables_have_the_shapes_of_a_real_init():
    config = tiny.get_config()
    model, abstract = builders.abstract_variables(config)
    chunk = builders.dummy_chunk(config)
    real = jax.jit(functools.partial(model.init, train=False))(
        jax.random.PRNGKey(1), chunk["text_ids"], chunk["text_mask"], chunk["graphs"]
    )

    def shapes(tree):
        return {
            jax.tree_util.keystr(path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        }

    assert shapes(abstract["params"]) == shapes(real["params"])
    assert shapes(abstract["batch_stats"]) == shapes(real["batch_stats"])
    assert model.config.axis_name is None  # eval model: running BatchNorm statistics


def test_split_encoder_follows_the_run_config():
    config = tiny.get_config()
    config.data.on_invalid = "error"
    encoder = builders.split_encoder(config)
    assert encoder.on_invalid == "error" and encoder.featurizer == "ogb"
    assert encoder.tokenizer.max_length == config.data.max_text_length
    config.model.mol_encoder = "gcn_mol2vec"
    assert builders.featurizer_for(config) == "mol2vec"
    with pytest.raises(ValueError, match="on_invalid"):
        type(encoder)(encoder.tokenizer, on_invalid="drop")


def test_the_model_computes_in_the_run_dtype_for_training_and_evaluation():
    from jaxmol.config import default_config

    config = default_config()
    assert builders.model_config_for(config).dtype == "float32"
    config.model.dtype = "bfloat16"
    assert builders.model_config_for(config).dtype == "bfloat16"
    assert builders.model_config_for(config, axis_name=None).dtype == "bfloat16"  # evaluation
