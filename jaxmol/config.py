"""Run-config checks: fail at start, naming the key, before any data or weights are loaded.

Unknown keys and wrong types in ``--config.key=value`` overrides are already refused by
`ml_collections.config_flags` (the config is locked). This module checks values.
"""

from __future__ import annotations

import ml_collections

from jaxmol.configs import default as paper_settings

_CHOICES = {
    "parallel": ("shard_map", "pmap"),
    "model.text_init": ("pretrained", "random"),
    "model.mol_encoder": ("gin", "gcn_mol2vec"),
    "model.projector": ("memory", "pool"),
    "model.head_bn_stats": ("per_modality", "shared"),
    "model.dtype": ("float32", "bfloat16"),
    "loss.first_order": ("triplet", "info_nce"),
    "loss.kl_similarity": ("distance", "neg_distance"),
    "loss.kl_metric": ("euclidean", "cosine"),
    "loss.adversary": ("grl", "wgan_gp", "none"),
    "loss.grl_schedule": ("constant", "dann"),
    "loss.adv_features": ("pooled", "embeddings"),
    "data.on_invalid": ("error", "skip"),
    "optim.schedule": ("warmup_linear", "constant"),
}
_POSITIVE = (
    "batch_size",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval_batch_size",
    "distributed_timeout_s",
    "optim.adam_eps",
    "heartbeat_timeout_s",
    "data.max_text_length",
    "model.gin_layers",
    "model.gin_dim",
    "model.embed_dim",
    "model.num_memory",
    "model.num_heads",
    "loss.grl_gamma",
)
_BOOLEANS = (
    "data.group_by_length",
    "data.single_graph_budget",
    "data.pack_texts",
)
_NON_NEGATIVE = (
    "optim.lr",
    "optim.bert_lr",
    "optim.warmup_steps",
    "optim.freeze_bert_layers",
    "loss.margin",
    "loss.u2u_weight",
    "loss.u2c_weight",
    "model.text_dropout",
    "model.gin_dropout",
)


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


def _get(config: ml_collections.ConfigDict, dotted: str):
    value = config
    for part in dotted.split("."):
        if part not in value:
            raise ConfigError(f"config key {dotted!r} is missing")
        value = value[part]
    return value


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` naming the first invalid key."""
    for key, allowed in _CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            raise ConfigError(f"config.{key}={value!r} is not one of {allowed}")
    for key in _POSITIVE:
        if _get(config, key) <= 0:
            raise ConfigError(f"config.{key} must be > 0, got {_get(config, key)!r}")
    for key in _NON_NEGATIVE:
        if _get(config, key) < 0:
            raise ConfigError(f"config.{key} must be >= 0, got {_get(config, key)!r}")
    for key in _BOOLEANS:
        if not isinstance(_get(config, key), bool):
            raise ConfigError(f"config.{key} must be True or False, got {_get(config, key)!r}")
    if config.num_steps <= 0 and config.num_epochs <= 0:
        raise ConfigError("config.num_steps or config.num_epochs must be > 0")
    if config.model.embed_dim % config.model.num_heads:
        raise ConfigError(
            f"config.model.embed_dim={config.model.embed_dim} is not divisible by "
            f"config.model.num_heads={config.model.num_heads}"
        )
    buckets = list(config.data.text_buckets)
    if buckets != sorted(buckets) or buckets[-1] < config.data.max_text_length:
        raise ConfigError(
            f"config.data.text_buckets={tuple(buckets)} must be ascending and end at >= "
            f"config.data.max_text_length={config.data.max_text_length}"
        )
    smoothing = config.loss.disc_label_smoothing
    if not 0.0 <= smoothing < 0.5:
        raise ConfigError(
            f"config.loss.disc_label_smoothing must be in [0, 0.5), got {smoothing!r}"
        )
    # Options of the gradient-reversal adversary only: refused elsewhere, so that a run never
    # records a setting that did nothing.
    if config.loss.adversary != "grl":
        for key, inert in (
            ("grl_schedule", config.loss.grl_schedule == "constant"),
            ("disc_label_smoothing", smoothing == 0.0),
        ):
            if not inert:
                raise ConfigError(
                    f"config.loss.{key}={config.loss[key]!r} applies only to "
                    f"config.loss.adversary='grl', got {config.loss.adversary!r}"
                )
    if not config.best_metric.startswith("val/"):
        raise ConfigError(f"config.best_metric={config.best_metric!r} must start with 'val/'")


def default_config() -> ml_collections.ConfigDict:
    """Today's defaults: every key a run config has, at the paper settings
    (``configs/default.py``, shipped inside the package as ``jaxmol.configs.default``)."""
    return paper_settings.get_config()
