"""Restoring a trained model for evaluation: parameters and BatchNorm statistics only.

No optimiser is built and no optimiser state is read: the restore target is
`jaxmol.builders.abstract_variables` of the run's config (merged onto today's defaults, so an
older checkpoint restores after new config keys were added).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections

from jaxmol import builders
from jaxmol.checkpointing import Checkpointer, CheckpointError, CheckpointMismatchError
from jaxmol.data import datasets
from jaxmol.evaluation.embedder import Embedder
from jaxmol.evaluation.protocols import check_protocol, evaluate_split
from jaxmol.models.retrieval import RetrievalModel
from jaxmol.parallel import DataParallel, select_devices
from jaxmol.scoring import MOMU_INBATCH_SIZE, MOMU_SHUFFLE_SEED

logger = logging.getLogger(__name__)


def restore_for_eval(
    workdir: str | os.PathLike, step: int | str = "best", *, sharding=None
) -> tuple[RetrievalModel, dict, ml_collections.ConfigDict, int]:
    """Restores a trained model for evaluation, without its optimiser state.

    Args:
      workdir: a training workdir (holds ``checkpoints/``).
      step: an int, 'latest', or 'best' (the best validation checkpoint; the latest one when no
        checkpoint has validation metrics). For 'best' and 'latest', a checkpoint that does not
        restore is skipped with a warning and the next newest one is used; an explicit step
        that does not restore is an error.
      sharding: where the variables go; default the first local device (works whatever the
        device count of the training run).

    Returns:
      (model, variables, config, step): an eval-mode `RetrievalModel` (no device axis), its
      {'params', 'batch_stats'}, the run's `ml_collections.ConfigDict` (merged onto today's
      defaults), and the step restored.

    Raises:
      CheckpointError: no workdir, no checkpoint, or none that restores.
    """
    return _restore(workdir, step, sharding)[:4]


def _restore(workdir, step, sharding) -> tuple[RetrievalModel, dict, Any, int, str]:
    """`restore_for_eval`, plus a note naming the checkpoints skipped (empty if none)."""
    directory = Path(workdir).expanduser().absolute() / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoints in {workdir} (expected {directory})")
    checkpointer = Checkpointer(directory, read_only=True, async_save=False)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise CheckpointError(f"{directory} holds no complete checkpoint")
        if step not in ("best", "latest"):
            return (*_restore_step(checkpointer, int(step), sharding), "")
        candidates = steps[::-1]
        if step == "best":
            checkpointer.best_metric = _best_metric(checkpointer, candidates)
            best = checkpointer.best_step()
            if best is not None:
                candidates = [best, *(s for s in candidates if s != best)]
        skipped = []
        for candidate in candidates:
            try:
                restored = _restore_step(checkpointer, candidate, sharding)
            except CheckpointMismatchError:
                raise
            except CheckpointError as error:
                logger.warning(
                    "checkpoint step %d does not restore; trying the next one: %s",
                    candidate,
                    error,
                )
                skipped.append(candidate)
                continue
            note = f"steps {skipped} did not restore and were skipped" if skipped else ""
            return (*restored, note)
        raise CheckpointError(f"no checkpoint in {directory} restores (tried {candidates})")
    finally:
        checkpointer.close()


def _best_metric(checkpointer: Checkpointer, steps: list[int]) -> str | None:
    """The run's `best_metric`, from the newest checkpoint whose config is readable."""
    for step in steps:
        try:
            return checkpointer.restore_json(step, "config").get("best_metric")
        except CheckpointError:
            continue
    return None


def _restore_step(checkpointer: Checkpointer, step: int, sharding) -> tuple:
    config = builders.run_config_from_saved(checkpointer.restore_json(step, "config"))
    model, abstract = builders.abstract_variables(config)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract
    )
    return model, checkpointer.restore_variables(step, target), config, step


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
    model, variables, config, restored_step, note = _restore(workdir, step, None)
    weights = describe_weights(step, restored_step, config)
    if note:
        weights += f"; {note}"
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
