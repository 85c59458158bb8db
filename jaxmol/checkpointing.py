"""Orbax checkpoints: async saves, keep-last-N plus the best by a validation metric, strict restore.

A checkpoint step holds four items:

* ``state``: the train state (params, batch statistics, optimiser states, step, RNG key),
  saved as one replicated copy, so it restores onto any number of devices;
* ``data_position``: where the batch stream stands (`jaxmol.data.batching.Position`);
* ``config``: the resolved run configuration (JSON), so a checkpoint alone can be evaluated;
* ``metrics``: the validation metrics measured at that very step (empty when the step was not
  validated; such a checkpoint never competes for 'best').

Restores always go through an abstract target with explicit shardings (a checkpoint written on 8
devices restores on 1), and every failure is re-raised as `CheckpointError` naming the directory,
the step and what is wrong.

Several processes: every process creates the `Checkpointer` and calls `save` and the restores
together (orbax coordinates them: process 0 writes the replicated state, the JSON items and the
metadata); moving damaged steps aside is done by process 0 while the others wait.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

logger = logging.getLogger(__name__)

ITEMS = ("state", "data_position", "config", "metrics")
# The step, added to the metrics orbax ranks (not to the saved `metrics` item).
_STEP_KEY = "_step"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model being restored."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint whose tree differs from the model (another config or code), as
    opposed to a damaged one."""


def _metric_getter(name: str):
    """The ranking key of orbax's BestN: the metric, then the *earlier* step among ties (the
    step that first reached a score is the one to keep)."""

    def get(metrics: dict) -> tuple[float, int]:
        return float(metrics.get(name, float("-inf"))), -int(metrics.get(_STEP_KEY, 0))

    return get


class Checkpointer:
    """A thin wrapper over `orbax.checkpoint.CheckpointManager`.

    Args:
      directory: where checkpoint steps live (made absolute: orbax needs it).
      keep: how many of the latest checkpoints to keep.
      best_metric: a key of the saved metrics; the checkpoint with its highest value is kept
        as well (None: only the latest `keep`).
      async_save: save in a background thread (call `wait` before reading or exiting).
      read_only: open for evaluation (no saves, no clean-up).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 2,
        best_metric: str | None = None,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = Path(directory).expanduser().absolute()
        # Steps orbax itself cannot list (its own metadata unreadable): moved aside when
        # writing; when reading, the manager sees a view of the directory without them.
        self.damaged = _damaged_steps(self.directory)
        manager_dir = self.directory
        if not read_only:
            if self.damaged and jax.process_index() == 0:
                for step, reason in sorted(self.damaged.items()):
                    _move_aside(self.directory, step, reason)
            _barrier("jaxmol_checkpoints_opened")
        elif self.damaged:
            manager_dir = _view_without(self.directory, self.damaged)
        self._manager_dir = manager_dir
        self.best_metric = best_metric
        policies = [LatestN(n=keep)]
        if best_metric:
            policies.append(
                BestN(
                    get_metric_fn=_metric_getter(best_metric),
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=AnyPreservationPolicy(policies),
            create=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(
            manager_dir,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data_position": ocp.JsonCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "metrics": ocp.JsonCheckpointHandler(),
            },
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the highest `best_metric` among kept checkpoints, the earliest of
        ties; only checkpoints saved with their own validation metrics compete (None if none)."""
        if not self.best_metric:
            return None
        scored = []
        for step in self.all_steps():
            try:
                metrics = self.restore_json(step, "metrics")
            except CheckpointError as error:
                logger.warning("best checkpoint: step %d skipped: %s", step, error)
                continue
            if metrics and self.best_metric in metrics:
                scored.append((float(metrics[self.best_metric]), -step))
        return -max(scored)[1] if scored else None

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_position: dict,
        config: dict,
        metrics: dict | None = None,
    ) -> None:
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data_position=ocp.args.JsonSave(data_position),
                    config=ocp.args.JsonSave(config),
                    metrics=ocp.args.JsonSave(metrics),
                ),
                metrics={**metrics, _STEP_KEY: step} if self.best_metric in metrics else None,
                force=True,
            )
        except Exception as error:  # an earlier async save that failed surfaces here too
            raise self._write_error(step, error) from error

    def wait(self) -> None:
        """Blocks until pending saves are on disk; a failed write raises `CheckpointError`."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise self._write_error(self.latest_step(), error) from error

    def close(self) -> None:
        self.wait()
        self._manager.close()

    def _write_error(self, step: int | None, error: Exception) -> CheckpointError:
        return CheckpointError(
            f"could not write checkpoint step {step} to {self.directory} (disk full or not "
            f"writable?); the checkpoints already there are intact: "
            f"{type(error).__name__}: {error}"
        )

    def set_aside(self, step: int, reason: str) -> Path:
        """Moves a damaged step out of the way (never deletes it) so that orbax can keep
        saving; returns where it went: ``<directory>/../damaged_checkpoints/<step>``."""
        target = self.directory.parent / "damaged_checkpoints" / str(step)
        if jax.process_index() == 0:
            target = _move_aside(self.directory, step, reason)
        _barrier(f"jaxmol_set_aside_{step}")
        self._manager.reload()
        return target

    def _check_step(self, step: int) -> None:
        if step in self.damaged:
            raise CheckpointError(
                f"checkpoint {self.directory} step {step} is damaged: {self.damaged[step]}"
            )
        if step not in self.all_steps():
            raise CheckpointError(
                f"no checkpoint at step {step} in {self.directory} "
                f"(available: {self.all_steps() or 'none'})"
            )

    def restore_json(self, step: int, item: str) -> Any:
        """One JSON item (data_position, config or metrics) of a step."""
        self._check_step(step)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})
            )
        except Exception as error:
            raise CheckpointError(
                f"checkpoint {self.directory} step {step}: cannot read '{item}': {error}"
            ) from error
        return restored[item]

    def restore_state(self, step: int, target: Any) -> Any:
        """Restores the train state of `step` into the structure, shapes and shardings of
        `target` (concrete arrays or `jax.ShapeDtypeStruct`s with shardings).

        Raises:
          CheckpointError: unreadable files, or a tree that differs from the target (names the
            differing entries).
        """
        self._check_step(step)
        abstract = jax.tree.map(_abstract, target)
        self._check_compatible(step, abstract)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )
        except Exception as error:
            raise CheckpointError(
                f"checkpoint {self.directory} step {step} is corrupted or unreadable: "
                f"{type(error).__name__}: {error}"
            ) from error
        return restored["state"]

    def restore_variables(self, step: int, target: dict) -> dict:
        """Restores only the `params` and `batch_stats` of a step's state (no optimiser state
        is read) into the shapes and shardings of `target`."""
        self._check_step(step)
        abstract = jax.tree.map(_abstract, target)
        self._check_compatible(step, abstract, partial=True)
        reader = ocp.CheckpointManager(
            self._manager_dir,
            options=ocp.CheckpointManagerOptions(read_only=True),
            item_handlers={"state": ocp.PyTreeCheckpointHandler()},
        )
        try:
            restored = reader.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=abstract,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                        partial_restore=True,
                    )
                ),
            )
        except Exception as error:
            raise CheckpointError(
                f"checkpoint {self.directory} step {step} is corrupted or unreadable: "
                f"{type(error).__name__}: {error}"
            ) from error
        finally:
            reader.close()
        return dict(restored["state"])

    def _check_compatible(self, step: int, abstract: Any, partial: bool = False) -> None:
        try:
            metadata = self._manager.item_metadata(step)["state"]
        except Exception as error:
            raise CheckpointError(
                f"checkpoint {self.directory} step {step} is corrupted or unreadable "
                f"(no readable state metadata): {type(error).__name__}: {error}"
            ) from error
        if metadata is None:
            raise CheckpointError(f"checkpoint {self.directory} step {step} has no state")
        saved = _shapes_by_path(metadata)
        wanted = _shapes_by_path(abstract)
        problems = [f"missing in checkpoint: {p}" for p in sorted(wanted.keys() - saved.keys())]
        if not partial:
            problems += [f"not in the model: {p}" for p in sorted(saved.keys() - wanted.keys())]
        problems += [
            f"shape of {p}: checkpoint {saved[p]} vs model {wanted[p]}"
            for p in sorted(wanted.keys() & saved.keys())
            if saved[p] is not None
            and wanted[p] is not None  # placeholders: items not restored
            and tuple(saved[p]) != tuple(wanted[p])
        ]
        if problems:
            listing = "\n  ".join(problems[:30])
            more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
            raise CheckpointMismatchError(
                f"checkpoint {self.directory} step {step} does not fit this model "
                f"({len(problems)} problems; was it written with another config?):\n  "
                f"{listing}{more}"
            )


_barrier_count = 0


def _barrier(name: str) -> None:
    """Every process waits here until all arrived (no-op with one process)."""
    global _barrier_count
    if jax.process_count() > 1:
        _barrier_count += 1  # orbax barrier names must be unique
        ocp.multihost.sync_global_processes(f"{name}_{_barrier_count}")


def _abstract(x: Any) -> Any:
    if x is ocp.PLACEHOLDER or isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def _shapes_by_path(tree: Any) -> dict[str, tuple | None]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): getattr(leaf, "shape", None)
        for path, leaf in leaves
    }


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Writes JSON atomically (a reader never sees a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def _damaged_steps(directory: Path) -> dict[int, str]:
    """Step directories whose orbax metadata or metrics file does not parse: {step: reason}.

    orbax reads these for every step when a manager opens the directory, so one damaged step
    would otherwise make the whole directory unreadable.
    """
    damaged = {}
    if not directory.is_dir():
        return damaged
    for path in directory.iterdir():
        if not (path.is_dir() and path.name.isdigit()):
            continue
        for name in ("_CHECKPOINT_METADATA", "metrics/metrics"):
            file = path / name
            try:
                if file.exists():
                    json.loads(file.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as error:
                damaged[int(path.name)] = f"orbax cannot read {file}: {type(error).__name__}"
                break
    return damaged


def _move_aside(directory: Path, step: int, reason: str) -> Path:
    """Moves ``directory/<step>`` to ``directory/../damaged_checkpoints/<step>`` (a new name if
    taken) with a ``.reason.txt`` beside it; returns the new path."""
    target_dir = directory.parent / "damaged_checkpoints"
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / str(step)
    suffix = 1
    while target.exists():
        target = target_dir / f"{step}.{suffix}"
        suffix += 1
    shutil.move(str(directory / str(step)), str(target))
    (target_dir / f"{target.name}.reason.txt").write_text(f"step {step}: {reason}\n")
    logger.warning("checkpoint step %d moved aside to %s: %s", step, target, reason)
    return target


def _view_without(directory: Path, excluded: dict[int, str]) -> Path:
    """A temporary directory of symlinks to every entry of `directory` except the `excluded`
    steps: a read-only view orbax can open (the workdir itself is not modified)."""
    for step, reason in sorted(excluded.items()):
        logger.warning("checkpoint step %d is damaged and is skipped: %s", step, reason)
    view = Path(tempfile.mkdtemp(prefix="jaxmol_checkpoints_view_"))
    for entry in directory.iterdir():
        if entry.name.isdigit() and int(entry.name) in excluded:
            continue
        (view / entry.name).symlink_to(entry)
    return view
