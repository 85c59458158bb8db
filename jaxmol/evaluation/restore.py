"""Restoring a trained model for evaluation: parameters and BatchNorm statistics only.

No optimiser is built and no optimiser state is read: the restore target is
`jaxmol.builders.abstract_variables` of the run's config (merged onto today's defaults, so an
older checkpoint restores after new config keys were added).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import ml_collections

from jaxmol import builders
from jaxmol.checkpointing import Checkpointer, CheckpointError
from jaxmol.data import datasets
from jaxmol.evaluation.embedder import Embedder
from jaxmol.evaluation.protocols import check_protocol, evaluate_split
from jaxmol.models.retrieval import RetrievalModel
from jaxmol.parallel import DataParallel, select_devices
from jaxmol.scoring import MOMU_INBATCH_SIZE, MOMU_SHUFFLE_SEED


def restore_for_eval(
    workdir: str | os.PathLike, step: int | str = "best", *, sharding=None
) -> tuple[RetrievalModel, dict, ml_collections.ConfigDict, int]:
    """Restores a trained model for evaluation, without its optimiser state.

    Args:
      workdir: a training workdir (holds ``checkpoints/``).
      step: an int, 'latest', or 'best' (the best validation checkpoint; the latest one when no
        checkpoint has validation metrics).
      sharding: where the variables go; default the first local device (works whatever the
        device count of the training run).

    Returns:
      (model, variables, config, step): an eval-mode `RetrievalModel` (no device axis), its
      {'params', 'batch_stats'}, the run's `ml_collections.ConfigDict` (merged onto today's
      defaults), and the step restored.

    Raises:
      CheckpointError: no workdir, no checkpoint, or an unreadable one.
    """
    directory = Path(workdir).expanduser().absolute() / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoints in {workdir} (expected {directory})")
    checkpointer = Checkpointer(directory, read_only=True, async_save=False)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise CheckpointError(f"{directory} holds no complete checkpoint")
        if step == "latest":
            step = steps[-1]
        elif step == "best":
            saved = checkpointer.restore_json(steps[-1], "config")
            checkpointer.best_metric = saved.get("best_metric")
            step = checkpointer.best_step() or steps[-1]
        step = int(step)
        config = builders.run_config_from_saved(checkpointer.restore_json(step, "config"))
        model, abstract = builders.abstract_variables(config)
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract
        )
        variables = checkpointer.restore_variables(step, target)
    finally:
        checkpointer.close()
    return model, variables, config, step


def evaluate_checkpoint(
    workdir: str | Path,
    split_name: str,
    *,
    protocol: str = "pool",
    step: int | str = "best",
    batch_size: int = 0,
    num_devices: int = -1,
    parallel: str = "shard_map",
    max_pairs: int = -1,
    inbatch_size: int = MOMU_INBATCH_SIZE,
    inbatch_seed: int | None = MOMU_SHUFFLE_SEED,
) -> dict:
    """Restores a training workdir's model (no optimiser state) and evaluates one split.

    The variables are restored onto one device, whatever the training device count, then
    replicated over the `num_devices` devices used for embedding.

    Args:
      workdir: a training workdir (with ``checkpoints/``); results go to its ``eval/``.
      split_name, protocol, max_pairs, inbatch_size, inbatch_seed: as `evaluate_split`.
      step: 'best', 'latest' or a step number.
      batch_size: embedding batch; <= 0 uses the run's ``eval_batch_size``.
      num_devices: devices to embed on (-1: all local devices).
      parallel: 'shard_map' or 'pmap'.

    Returns:
      The report of `evaluate_split`.

    Raises:
      CheckpointError: no workdir, no checkpoint, or an unreadable one.
      ProtocolError, jaxmol.data.datasets.DataError: as `evaluate_split` (checked before the
        model is restored).
    """
    check_protocol(split_name, protocol)
    datasets.load_split(split_name)  # a bad split name fails before the (slow) restore
    model, variables, config, restored_step = restore_for_eval(workdir, step)
    weights = describe_weights(step, restored_step, config)
    embedder = Embedder(model, DataParallel(parallel, select_devices(num_devices)))
    return evaluate_split(
        embedder,
        variables,
        split_name,
        protocol=protocol,
        encoder=builders.split_encoder(config),
        batch_size=batch_size if batch_size > 0 else int(config.eval_batch_size),
        workdir=workdir,
        checkpoint_step=restored_step,
        max_pairs=max_pairs,
        inbatch_size=inbatch_size,
        inbatch_seed=inbatch_seed,
        weights=weights,
    )


def describe_weights(requested: int | str, step: int, config: ml_collections.ConfigDict) -> str:
    """Which weights a restore picked, in words (the paper reports final weights)."""
    if requested == "best":
        return (
            f"best validation checkpoint: step {step} by {config.best_metric} (the paper "
            "reports final weights: --step latest after a finished run)"
        )
    if requested == "latest":
        return f"latest checkpoint: step {step} (final weights when the run finished)"
    return f"checkpoint of step {step}"
