"""Config -> objects: the text tower's files, the model, the split encoder, abstract variables.

No training code lives here (no optimiser, no loop), so evaluation, search and training all
build their objects the same way from a run config. A config read back from a checkpoint is
first merged onto today's defaults (`run_config_from_saved`): a knob added after the run was
written takes its default instead of breaking the restore.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import jraph
import ml_collections

from jaxmol.config import default_config
from jaxmol.data import batching, datasets
from jaxmol.data.encoding import SplitEncoder
from jaxmol.data.featurize import MolGraph
from jaxmol.data.tokenize import Tokenizer, default_model_dir, load_tokenizer
from jaxmol.models import bert
from jaxmol.models.retrieval import ModelConfig, RetrievalModel
from jaxmol.parallel import AXIS

logger = logging.getLogger(__name__)


def text_model_dir(config: ml_collections.ConfigDict) -> str:
    """The local Hugging Face BERT directory of the run (default: the offline MiniLM)."""
    return config.model.text_model_dir or default_model_dir()


def bert_config_for(config: ml_collections.ConfigDict) -> bert.BertConfig:
    """The text tower's config: from the pretrained directory, or the small random one."""
    base = bert.BertConfig.from_json(os.path.join(text_model_dir(config), "config.json"))
    if config.model.text_init == "random":
        base = dataclasses.replace(base, **dict(config.model.text_random))
    return dataclasses.replace(
        base,
        hidden_dropout_prob=config.model.text_dropout,
        attention_probs_dropout_prob=config.model.text_dropout,
    )


def model_config_for(
    config: ml_collections.ConfigDict, axis_name: str | None = AXIS
) -> ModelConfig:
    """The `ModelConfig` of a run.

    ``optim.freeze_bert_layers`` feeds the model as well as the optimiser: the model stops
    gradients below that layer, so the frozen layers' backward pass is never computed.

    Args:
      config: the run config.
      axis_name: the device axis of the training step (exact cross-device BatchNorm
        statistics); None for evaluation, where BatchNorm uses running statistics.
    """
    m = config.model
    return ModelConfig(
        bert=bert_config_for(config),
        bert_frozen_layers=config.optim.freeze_bert_layers,
        mol_encoder=m.mol_encoder,
        gin_layers=m.gin_layers,
        gin_dim=m.gin_dim,
        gin_dropout=m.gin_dropout,
        gin_mlp_batch_norm=m.gin_mlp_batch_norm,
        embed_dim=m.embed_dim,
        num_memory=m.num_memory,
        num_heads=m.num_heads,
        projector=m.projector,
        head_bn_stats=m.head_bn_stats,
        grl_scale=m.grl_scale,
        # Training, evaluation and search compute in the run's dtype alike.
        dtype=m.get("dtype", "float32"),
        axis_name=axis_name,
    )


def featurizer_for(config: ml_collections.ConfigDict) -> str:
    """'ogb' features for the GIN, mol2vec table rows for the official GCN."""
    return "ogb" if config.model.mol_encoder == "gin" else "mol2vec"


def tokenizer_for(config: ml_collections.ConfigDict) -> Tokenizer:
    """The run's tokenizer (its vocabulary and ``data.max_text_length``)."""
    return load_tokenizer(text_model_dir(config), max_length=config.data.max_text_length)


def split_encoder(config: ml_collections.ConfigDict) -> SplitEncoder:
    """The one encoder of a run: its tokenizer, featuriser, ``data.on_invalid`` and cache."""
    return SplitEncoder(
        tokenizer_for(config),
        featurizer=featurizer_for(config),
        on_invalid=config.data.on_invalid,
        cache_dir=config.data.cache_dir or None,
    )


def train_batcher(
    config: ml_collections.ConfigDict,
    encoder: SplitEncoder,
    num_devices: int,
    local_chunks: slice | None = None,
) -> batching.PairBatcher:
    """The run's training batches: ``data.train_split`` (first ``data.max_train_pairs``)
    encoded by `encoder`, batched as the config says over `num_devices` devices, of which
    this process builds `local_chunks` (default all)."""
    split = encoder(datasets.load_split_head(config.data.train_split, config.data.max_train_pairs))
    return batching.PairBatcher(
        split,
        batch_size=config.batch_size,
        num_devices=num_devices,
        seed=config.seed,
        group_by_length=config.data.group_by_length,
        text_buckets=config.data.text_buckets,
        single_graph_budget=config.data.single_graph_budget,
        local_chunks=local_chunks,
        pack_texts=config.data.pack_texts,
    )


def dummy_chunk(config: ml_collections.ConfigDict) -> dict:
    """A one-pair device chunk of the right dtypes and widths, for shape-only initialisation.

    The molecule slot is `MolGraph.empty()` (a masked pair), followed by the jraph padding
    graph, exactly the layout the batcher produces.
    """
    width = 9 if featurizer_for(config) == "ogb" else 1
    molecule = MolGraph.empty(node_width=width).as_graphs_tuple()
    graphs = jraph.pad_with_graphs(molecule, n_node=2, n_edge=1, n_graph=2)
    return {
        "text_ids": jnp.zeros((1, 8), jnp.int32),  # [b, L]
        "text_mask": jnp.ones((1, 8), jnp.int32),  # [b, L]
        "graphs": jax.tree.map(jnp.asarray, graphs),
    }


def abstract_variables(config: ml_collections.ConfigDict) -> tuple[RetrievalModel, dict]:
    """The eval-mode model and the shapes of its {'params', 'batch_stats'}.

    Computed with `jax.eval_shape` of `model.init` on `dummy_chunk`: no array is made and no
    weights file is read.

    Returns:
      (model, variables): a `RetrievalModel` without a device axis, and a tree of
      `jax.ShapeDtypeStruct` with keys 'params' and 'batch_stats'.
    """
    model = RetrievalModel(model_config_for(config, axis_name=None))
    chunk = dummy_chunk(config)

    def init(key):
        return model.init(
            {"params": key, "dropout": key},
            chunk["text_ids"],
            chunk["text_mask"],
            chunk["graphs"],
            train=False,
        )

    variables = jax.eval_shape(init, jax.random.PRNGKey(0))
    return model, {
        "params": variables["params"],
        "batch_stats": variables.get("batch_stats", {}),
    }


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def flat_config(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """{'group.key': value} of a config (tuples as lists, as JSON stores them)."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in _flatten(config).items()
    }


# Keys whose default changed when they were added: a run saved before the key existed behaved
# as this value, not as today's default.
VALUE_BEFORE_KEY_EXISTED = {"data.pack_texts": False}


def run_config_from_saved(saved: dict) -> ml_collections.ConfigDict:
    """A run config read back from a checkpoint or ``config.json``, merged onto today's
    defaults: keys the saved run lacks take today's default value (or, for the keys of
    `VALUE_BEFORE_KEY_EXISTED`, the behaviour runs had before the key existed); keys it has
    that no longer exist are dropped with a warning.

    Args:
      saved: the JSON dict that was written with the run.

    Returns:
      A resolved `ml_collections.ConfigDict` with every key `default_config()` has.
    """
    merged = default_config()
    known = flat_config(merged)
    saved_flat = flat_config(saved)
    missing = sorted(known.keys() - saved_flat.keys())
    if missing:
        logger.info("saved config lacks %s: using today's defaults", ", ".join(missing))
    absent = {k: v for k, v in VALUE_BEFORE_KEY_EXISTED.items() if k not in saved_flat}
    with merged.unlocked():
        for key, value in {**saved_flat, **absent}.items():
            if key not in known:
                logger.warning("saved config key %r no longer exists; ignored", key)
                continue
            *groups, leaf = key.split(".")
            node = merged
            for group in groups:
                node = node[group]
            default = node[leaf]
            if isinstance(default, tuple) and isinstance(value, list):
                value = tuple(value)
            if isinstance(default, ml_collections.ConfigDict) and isinstance(value, dict):
                value = ml_collections.ConfigDict(value)
            node[leaf] = value
    return merged
