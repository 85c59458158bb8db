"""Training: the host side — set-up, the loop, checkpoints, logs and the final evaluation.

The jit-compiled step itself is `jaxmol.train_step` (pure JAX). This module builds a `TrainRun`
(`setup`), runs the loop over it (`train`), then evaluates the test splits (`evaluate_test_splits`);
`train_and_evaluate` does all three.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from jaxmol import allocator, builders, checkpointing, distributed, evaluation, scoring
from jaxmol.config import ConfigError, validate_config
from jaxmol.data import batching, datasets
from jaxmol.data.encoding import EncodedSplit, SplitEncoder
from jaxmol.metrics import modality_gap
from jaxmol.models.retrieval import RetrievalModel, count_params
from jaxmol.parallel import DataParallel, select_devices
from jaxmol.train_step import (
    TrainState,
    compile_train_step,
    init_state,
    learning_rate_schedule,
)
from jaxmol.workdir import WorkdirLock

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (preemption) stopped the loop after it saved a checkpoint.

    Attributes:
      signum: the signal received.
      step: the step saved; running the same command again resumes from it.
    """

    def __init__(self, signum: int, step: int):
        super().__init__(f"{signal.Signals(signum).name}: saved a checkpoint at step {step}")
        self.signum = signum
        self.step = step


@dataclasses.dataclass
class TrainRun:
    """Everything the loop needs, built once by `setup`.

    Attributes:
      config: the validated run config.
      workdir: absolute workdir (checkpoints/, metrics.jsonl, config.json, eval/).
      resolved: the config as JSON (written with every checkpoint).
      runner: the data-parallel runner.
      encoder: the run's one `SplitEncoder` (train, validation and test splits).
      batcher: the training batches.
      total_steps: optimiser steps of the whole run.
      model: the per-device training model.
      tx, critic_tx: the optimisers.
      state: the host copy of the train state (restored when resuming).
      position: where the batch stream continues.
      checkpointer: the workdir's checkpoints.
      embedder: the eval-mode embedder over the same devices.
      val_split: the encoded validation split (None: no validation).
      lock: the workdir lock, held until the run ends (`WorkdirLock.release`).
    """

    config: ml_collections.ConfigDict
    workdir: Path
    resolved: dict
    runner: DataParallel
    encoder: SplitEncoder
    batcher: batching.PairBatcher
    total_steps: int
    model: RetrievalModel
    tx: optax.GradientTransformation
    critic_tx: optax.GradientTransformation | None
    state: TrainState
    position: batching.Position
    checkpointer: checkpointing.Checkpointer
    embedder: evaluation.Embedder
    val_split: EncodedSplit | None
    lock: WorkdirLock | _NoLock


def setup(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainRun:
    """Validates the config, encodes the data, initialises or restores the state.

    Takes the workdir lock first (released by `train_and_evaluate`, or here on failure). A
    damaged newest checkpoint does not stop a resume: the newest one that restores completely
    is used, and the damaged ones are moved aside (never deleted) and logged.

    Raises:
      jaxmol.config.ConfigError: an invalid config value (before anything is loaded).
      jaxmol.workdir.WorkdirLockedError: another run trains in this workdir.
      jaxmol.checkpointing.CheckpointError: the workdir holds a different run, or no
        checkpoint in it restores.
    """
    validate_config(config)
    if distributed.requested(config):
        distributed.initialize(config)
        distributed.quiet_unless_primary()
        distributed.check_same_config(_json_ready(config))
    workdir = Path(workdir).expanduser().absolute()
    # Several processes share one workdir; process 0 holds the lock and writes the files.
    lock = WorkdirLock(workdir) if distributed.is_primary() else _NoLock()
    try:
        return _setup_locked(config, workdir, lock)
    except BaseException:
        lock.release()
        raise


def _setup_locked(
    config: ml_collections.ConfigDict, workdir: Path, lock: WorkdirLock | _NoLock
) -> TrainRun:
    runner = DataParallel(config.parallel, select_devices(config.num_devices))
    if config.batch_size % runner.num_devices:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is not a multiple of the "
            f"{runner.num_devices} devices (set config.num_devices or the batch size)"
        )
    encoder = builders.split_encoder(config)
    batcher = builders.train_batcher(config, encoder, runner.num_devices, runner.local_chunks)
    total_steps = (
        config.num_steps if config.num_steps > 0 else config.num_epochs * batcher.num_batches
    )
    model = RetrievalModel(builders.model_config_for(config))
    example = jax.tree.map(lambda x: x[0], batcher.make_batch(batcher.epoch_batches(0)[0]))
    state, tx, critic_tx = init_state(config, model, example, total_steps)
    logger.info("model parameters: %s", f"{count_params(state.params):,}")

    resolved = _json_ready(config)
    checkpointer = checkpointing.Checkpointer(
        workdir / "checkpoints", keep=config.keep_checkpoints, best_metric=config.best_metric
    )
    state, position = _resume(checkpointer, state, resolved, runner.abstract_replicated(state))
    if distributed.is_primary():
        checkpointing.write_json(workdir / "config.json", resolved)
    eval_model = RetrievalModel(builders.model_config_for(config, axis_name=None))
    val_split = None
    if config.data.val_split:
        val_split = encoder(
            datasets.load_split_head(config.data.val_split, config.data.max_eval_pairs)
        )
    return TrainRun(
        config=config,
        workdir=workdir,
        resolved=resolved,
        runner=runner,
        encoder=encoder,
        batcher=batcher,
        total_steps=total_steps,
        model=model,
        tx=tx,
        critic_tx=critic_tx,
        state=state,
        position=position,
        checkpointer=checkpointer,
        embedder=evaluation.Embedder(eval_model, runner),
        val_split=val_split,
        lock=lock,
    )


def _resume(
    checkpointer: checkpointing.Checkpointer, state: TrainState, resolved: dict, target: Any
) -> tuple[TrainState, batching.Position]:
    """The newest checkpoint that restores completely (state, position), or the fresh state.

    `target` gives the restored arrays' shapes and shardings (replicated over the runner's
    mesh, so any device or process count restores any checkpoint).

    A checkpoint of a different run (config or model mismatch) is an error, not damage.
    Damaged newer steps are moved aside so that orbax can save those steps again.
    """
    damaged: list[tuple[int, str]] = []
    restored = None
    for step in reversed(checkpointer.all_steps()):
        try:
            saved_config = checkpointer.restore_json(step, "config")
        except checkpointing.CheckpointError as error:
            damaged.append((step, str(error)))
            continue
        _check_resume_compatible(saved_config, resolved)
        try:
            restored = (
                checkpointer.restore_state(step, target),
                batching.Position.from_dict(checkpointer.restore_json(step, "data_position")),
            )
        except checkpointing.CheckpointMismatchError:
            raise
        except (checkpointing.CheckpointError, KeyError, TypeError, ValueError) as error:
            damaged.append((step, str(error)))
            continue
        logger.info(
            "resumed from step %d (epoch %d, batch %d)",
            step,
            restored[1].epoch,
            restored[1].step,
        )
        break
    for step, reason in damaged:
        logger.warning("checkpoint step %d does not restore; skipped: %s", step, reason)
        checkpointer.set_aside(step, reason)
    if restored is None and damaged:
        logger.warning("no checkpoint restores; training starts from step 0")
    return restored or (state, batching.Position())


def train(run: TrainRun) -> tuple[TrainState, int]:
    """Runs the loop from the run's state and position to ``total_steps``.

    Validates every ``eval_every_steps`` and at the end; checkpoints every
    ``checkpoint_every_steps`` and at the end, each only after every step up to it was checked
    finite, and each with the validation metrics of its own step (none if it was not validated
    there, so it never competes for 'best' with another step's score). SIGINT (Ctrl-C) or
    SIGTERM (preemption) finishes the step, saves once and raises `TrainingInterrupted`; a
    second signal exits the process at once (status 128 + signal), leaving the last finished
    checkpoint intact.

    Returns:
      The final state (one host-side copy) and its step.

    Raises:
      NonFiniteLossError: a NaN or infinite loss, naming the step (nothing after the last
        finite checkpoint is saved).
    """
    config, runner = run.config, run.runner
    train_step = compile_train_step(
        runner, config, run.model, run.tx, run.critic_tx, total_steps=run.total_steps
    )
    state = runner.replicate(run.state)
    log = MetricsLog(run.workdir / "metrics.jsonl", enabled=distributed.is_primary())
    step = int(run.state.step)
    position = run.position
    stream = batching.prefetch(run.batcher.iterate(position), size=config.data.prefetch)
    lr_schedule = learning_rate_schedule(config, config.optim.lr, run.total_steps)
    pending: list[tuple[int, Any]] = []  # (step, device metrics) not yet checked for NaN
    interrupted = 0  # the first SIGINT / SIGTERM received (by this process)
    stop = False  # all processes agreed to stop after this step
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous_handlers = {signum: signal.getsignal(signum) for signum in stop_signals}

    def on_signal(signum, frame):
        nonlocal interrupted
        if interrupted:  # a second signal: leave now; the last finished checkpoint is intact
            print(
                f"{signal.Signals(signum).name} again: exiting without saving",
                file=sys.stderr,
                flush=True,
            )
            os._exit(128 + signum)
        interrupted = signum  # finish the current step, save, then stop

    for signum in stop_signals:
        signal.signal(signum, on_signal)
    progress = _progress_bar(run.total_steps, step, enabled=distributed.is_primary())
    window_start, window_pairs = time.perf_counter(), 0
    # Pairs of the global batch from this process's chunks: exact except in the last, partly
    # masked batch of an epoch when several processes share it.
    pairs_scale = runner.num_devices / runner.num_local_devices
    try:
        while step < run.total_steps and not stop:
            position, batch = next(stream)
            state, metrics = train_step(state, runner.shard(batch))
            step += 1
            window_pairs += int(batch["pair_mask"].sum()) * pairs_scale
            pending.append((step, metrics))
            last_of_run = step == run.total_steps
            log_now = step % config.log_every_steps == 0 or last_of_run
            validate_now = run.val_split is not None and (
                step % config.eval_every_steps == 0 or last_of_run
            )
            save_now = step % config.checkpoint_every_steps == 0 or last_of_run
            # Fetching (blocking) at least every 8 steps also avoids a known shard_map dispatch
            # deadlock on CPU; a checkpoint is only written once its steps are known finite.
            synced = len(pending) >= 8 or log_now or save_now
            if synced:
                host = _check_finite(pending, runner)
                pending = []
                if log_now:
                    elapsed = time.perf_counter() - window_start
                    record = {**host, "pairs_per_s": window_pairs / max(elapsed, 1e-9)}
                    record["lr"] = float(lr_schedule(step - 1))
                    record.update(allocator.resident_memory_mb())  # the run's RSS curve
                    log.write(step, record)
                    allocator.return_idle_memory()  # what the arenas hold for nothing
                    progress.set_postfix(
                        loss=f"{host['loss']:.4f}", pairs_s=f"{record['pairs_per_s']:.1f}"
                    )
                    window_start, window_pairs = time.perf_counter(), 0
            progress.update(1)
            val_metrics: dict = {}
            if validate_now:
                val_metrics = _validate(run, state)
                allocator.return_idle_memory()  # the evaluation's freed buffers and compiles
                log.write(step, val_metrics)
                logger.info("step %d validation: %s", step, _short(val_metrics))
            if save_now:
                _save(run, step, state, position, val_metrics)
            # One process stops only together with all others, at a step they all reach:
            # with several processes the stop request is shared at the fetch points above.
            if not runner.multiprocess:
                stop = bool(interrupted)
            elif synced:
                agreed = distributed.max_over_processes(interrupted)
                stop, interrupted = bool(agreed), agreed  # the same signal on every process
        if stop:
            if pending:
                _check_finite(pending, runner)
            if run.checkpointer.latest_step() != step:  # not saved by the loop already
                _save(run, step, state, position, {})
            run.checkpointer.close()
            logger.warning(
                "interrupted: saved a checkpoint at step %d (%s); run the same command to resume",
                step,
                signal.Signals(interrupted).name,
            )
            raise TrainingInterrupted(interrupted, step)
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        progress.close()
    run.checkpointer.close()
    return runner.unreplicate(state), step


def evaluate_test_splits(run: TrainRun, state: TrainState, step: int) -> dict:
    """The pool protocol on every ``data.test_splits`` split, with the run's own encoder;
    results go to ``workdir/eval/`` and the table is printed.

    Returns:
      {split: report of `jaxmol.evaluation.evaluate_split`}.
    """
    variables = run.embedder.replicate(state.eval_variables())
    results = {}
    for split_name in run.config.data.test_splits:
        results[split_name] = evaluation.evaluate_split(
            run.embedder,
            variables,
            split_name,
            protocol="pool",
            encoder=run.encoder,
            batch_size=run.config.eval_batch_size,
            max_pairs=run.config.data.max_eval_pairs,
            workdir=run.workdir,
            checkpoint_step=step,
            weights=f"final weights: step {step}, end of training",
        )
        allocator.return_idle_memory()
    if results and distributed.is_primary():
        print(evaluation.format_table(results))
    memory = allocator.resident_memory_mb()
    if memory:
        logger.info("peak resident memory of this process: %.0f MB", memory["peak_rss_mb"])
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from `workdir` when it holds a checkpoint), then evaluates.

    Returns:
      The final test metrics: {split: report with 't2m' and 'm2t' blocks}.
    """
    run = setup(config, workdir)
    try:
        state, step = train(run)
        return evaluate_test_splits(run, state, step)
    finally:
        run.lock.release()


def _json_ready(value: Any) -> Any:
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    return json.loads(
        json.dumps(value, default=lambda x: list(x) if isinstance(x, tuple) else str(x))
    )


class _NoLock:
    """What processes other than 0 hold: process 0 holds the workdir lock for the run."""

    def release(self) -> None:
        pass


class MetricsLog:
    """Appends one JSON object per line to workdir/metrics.jsonl, and writes TensorBoard
    scalars to workdir/tensorboard when the optional `tensorboardX` package is installed."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled  # False on processes other than 0: nothing is written
        self._tensorboard = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            self._tensorboard = None
        else:
            self._tensorboard = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {
            "step": int(step),
            "time": time.time(),
            **{k: _to_float(v) for k, v in values.items()},
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, float):
                    self._tensorboard.add_scalar(key, value, int(step))
            self._tensorboard.flush()


def _to_float(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _short(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _progress_bar(total: int, initial: int, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        dynamic_ncols=True,
        mininterval=2.0,
        disable=not enabled,
    )


def _check_finite(pending: list, runner: DataParallel) -> dict:
    """Fetches pending step metrics; raises naming the first step whose loss is not finite."""
    host_values = None
    for step, metrics in pending:
        host_values = {k: float(np.asarray(runner.unreplicate(v))) for k, v in metrics.items()}
        if not math.isfinite(host_values["loss"]):
            terms = {k: v for k, v in host_values.items() if not math.isfinite(v)}
            raise NonFiniteLossError(
                f"loss is {host_values['loss']} at step {step} (non-finite terms: {terms}); "
                "stopping without saving this state"
            )
    return host_values


def _validate(run: TrainRun, state: TrainState) -> dict:
    """Pool-protocol metrics of the validation split, flattened as 'val/<dir>/<metric>', and
    the modality gap of its embeddings (`jaxmol.metrics.modality_gap`) as
    'val/modality_gap/<quantity>'."""
    variables = run.runner.unreplicate(state).eval_variables()
    text_emb, mol_emb = run.embedder.embed_split(
        variables, run.val_split, batch_size=run.config.eval_batch_size
    )
    result = scoring.pool_metrics_from_embeddings(text_emb, mol_emb)
    flat = {
        f"val/{direction}/{k}": v
        for direction in ("t2m", "m2t")
        for k, v in result[direction].items()
        if isinstance(v, (int, float))
    }
    flat["val/mean_mrr"] = 0.5 * (result["t2m"]["mrr"] + result["m2t"]["mrr"])
    if len(text_emb) >= 2 and len(text_emb) == len(mol_emb):
        gap = modality_gap(text_emb, mol_emb)
        for key in ("paired_mean", "unpaired_mean", "gap", "ratio", "centroid_distance"):
            flat[f"val/modality_gap/{key}"] = gap[key]
    return flat


def _save(run: TrainRun, step: int, state: TrainState, position, val_metrics: dict) -> None:
    """Saves `step`; `val_metrics` must be the validation of this very step (or empty)."""
    run.checkpointer.save(
        step,
        run.runner.for_checkpoint(state),
        data_position=position.to_dict(),
        config=run.resolved,
        metrics=val_metrics,
    )


# Settings that may change between a run and its resumption (they do not affect training).
_RESUME_FREE_KEYS = {
    "data.prefetch",
    "data.test_splits",
    "data.max_eval_pairs",
    "data.cache_dir",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval_batch_size",
    "parallel",
    "num_devices",
    "distributed",
    "coordinator_address",
    "num_processes",
    "process_id",
    "distributed_timeout_s",
    "heartbeat_timeout_s",
    "model.dtype",  # compute dtype only: the parameters are float32 either way
    # The texts' layout only: the same pairs in the same batches, the same model and losses
    # (equal within float rounding with dropout off, tests/test_packing.py); like a change of
    # the device count, only the layout of the dropout draws differs.
    "data.pack_texts",
}


def _check_resume_compatible(saved: dict, current: dict) -> None:
    """A workdir resumes only with the same model, loss, optimiser, data and schedule; device
    count, parallel mode and logging cadence may change."""
    # Keys added since the checkpoint was written take today's default (the behaviour the run
    # had before the key existed), so they never block a resume.
    old = builders.flat_config(_json_ready(builders.run_config_from_saved(saved)))
    new = builders.flat_config(current)
    differences = [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if key not in _RESUME_FREE_KEYS and old.get(key) != new.get(key)
    ]
    if differences:
        raise checkpointing.CheckpointError(
            "the workdir holds a checkpoint of a different run; use another --workdir or the "
            "same config. Differences: " + "; ".join(differences)
        )
