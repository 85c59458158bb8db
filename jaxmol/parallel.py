"""Data parallelism: one per-device SPMD function, run with `jax.shard_map` or `jax.pmap`.

The per-device function sees its own chunk of the batch (the leading device axis removed) and
talks to the other devices through named-axis collectives over `AXIS` ('data'): embeddings are
all-gathered so every loss term sees the global batch, gradients are averaged with `pmean`, and
BatchNorm statistics are summed with `psum`.

Two runners execute the same function:

* ``'shard_map'`` (default): `jax.jit(jax.shard_map(...))` over a 1-D mesh. The state is
  replicated (`P()`), the batch is split along its leading axis (`P('data')`). It runs with
  ``check_vma=False``: with the default check, differentiating through replicated parameters
  already sums the gradient over devices and the `pmean` would then leave it D times too large
  (docs/design.md §4); without the check the semantics are exactly pmap's.
* ``'pmap'``: `jax.pmap` with axis name 'data'; the state is stacked [D, ...].

A single device is the shard_map runner on a one-device mesh, so there is one code path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
MODES = ("shard_map", "pmap")


def select_devices(num_devices: int = -1) -> list:
    """The first `num_devices` local devices (-1: all), with a clear error if too few."""
    devices = jax.local_devices()
    if num_devices == -1:
        return devices
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"num_devices={num_devices}, but {len(devices)} local devices exist")
    return devices[:num_devices]


class DataParallel:
    """Runs per-device functions over D devices and moves pytrees on and off them.

    Args:
      mode: 'shard_map' or 'pmap'.
      devices: the devices to use (D = len(devices)).
    """

    def __init__(self, mode: str, devices: list):
        if mode not in MODES:
            raise ValueError(f"parallel mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.devices = list(devices)
        self.num_devices = len(self.devices)
        # Auto axes: mixing these arrays with host numpy needs no explicit-sharding rules.
        self.mesh = jax.sharding.Mesh(
            np.asarray(self.devices), (AXIS,), axis_types=(AxisType.Auto,)
        )
        self._replicated = NamedSharding(self.mesh, P())
        self._split = NamedSharding(self.mesh, P(AXIS))

    def replicate(self, tree: Any) -> Any:
        """Host or single-device pytree -> the layout the runner expects for replicated state."""
        if self.mode == "pmap":
            stacked = jax.tree.map(
                lambda x: np.broadcast_to(np.asarray(x), (self.num_devices, *np.shape(x))), tree
            )
            return jax.pmap(lambda x: x, devices=self.devices)(stacked)
        return jax.device_put(tree, self._replicated)

    def unreplicate(self, tree: Any) -> Any:
        """Replicated state -> one copy (what checkpoints store)."""
        if self.mode == "pmap":
            return jax.tree.map(lambda x: x[0], tree)
        return tree

    def shard(self, batch: Any) -> Any:
        """Host batch with a leading [D, ...] axis -> device arrays split over devices."""
        if self.mode == "pmap":
            return batch  # pmap splits host arrays over its devices itself
        return jax.device_put(batch, self._split)

    def run(
        self,
        per_device_fn: Callable,
        *,
        replicated_args: tuple[int, ...],
        out_kinds: tuple[str, ...],
        donate_argnums: tuple[int, ...] = (),
    ) -> Callable:
        """Compiles `per_device_fn(*args) -> tuple` for all devices.

        Args:
          per_device_fn: function of local arguments; split arguments arrive without their
            leading device axis. Returns a tuple with one entry per `out_kinds`.
          replicated_args: positions of replicated arguments (state, variables); all other
            arguments are split along their leading [D] axis.
          out_kinds: per output, 'replicated' (identical on every device, e.g. pmean'd: the
            runner's replicated layout, see `unreplicate`) or 'sharded' (per-device values,
            returned stacked as [D, ...]).
          donate_argnums: argument buffers XLA may reuse for the outputs (the old state).

        Returns:
          A callable with the same positional arguments, in the runner's layouts.
        """
        if any(kind not in ("replicated", "sharded") for kind in out_kinds):
            raise ValueError(f"out_kinds must be 'replicated' or 'sharded', got {out_kinds}")
        if self.mode == "pmap":
            return jax.pmap(
                per_device_fn,
                axis_name=AXIS,
                devices=self.devices,
                donate_argnums=donate_argnums,
            )

        def local(*args):
            args = tuple(
                arg if i in replicated_args else jax.tree.map(lambda x: x[0], arg)
                for i, arg in enumerate(args)
            )
            outputs = per_device_fn(*args)
            return tuple(
                jax.tree.map(lambda x: x[None], out) if kind == "sharded" else out
                for kind, out in zip(out_kinds, outputs, strict=True)
            )

        compiled: dict[int, Callable] = {}

        def call(*args):
            if len(args) not in compiled:
                in_specs = tuple(P() if i in replicated_args else P(AXIS) for i in range(len(args)))
                out_specs = tuple(P(AXIS) if k == "sharded" else P() for k in out_kinds)
                compiled[len(args)] = jax.jit(
                    jax.shard_map(
                        local,
                        mesh=self.mesh,
                        in_specs=in_specs,
                        out_specs=out_specs,
                        check_vma=False,
                    ),
                    donate_argnums=donate_argnums,
                )
            return compiled[len(args)](*args)

        return call
