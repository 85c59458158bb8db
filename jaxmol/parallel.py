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

Several processes (hosts, `jaxmol.distributed`): the mesh holds the devices of *all* processes
(`jax.devices()`), so every collective spans the global batch. Each process builds and passes
only the chunks of its own devices (`local_chunks`, a contiguous range of the device axis):
`shard` assembles them into global arrays (`jax.make_array_from_process_local_data`; pmap takes
per-process chunks itself), and `fetch` gathers per-device outputs of all processes back to
every host (`multihost_utils.process_allgather`).
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
    """The first `num_devices` local devices (-1: all), with a clear error if too few.

    With several processes every device of every process takes part (`jax.devices()`); then
    `num_devices` must be -1 or the global device count.
    """
    if jax.process_count() > 1:
        devices = jax.devices()
        if num_devices not in (-1, len(devices)):
            raise ValueError(
                f"num_devices={num_devices}: a run of {jax.process_count()} processes uses all "
                f"{len(devices)} devices (leave num_devices at -1)"
            )
        return devices
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
        # This process's devices: a contiguous range of the device axis (jax.devices() lists
        # the devices process by process).
        mine = [i for i, d in enumerate(self.devices) if d.process_index == jax.process_index()]
        if not mine or mine != list(range(mine[0], mine[-1] + 1)):
            raise ValueError(
                f"process {jax.process_index()} owns devices at positions {mine} of the mesh; "
                "they must be a non-empty contiguous range"
            )
        self.local_chunks = slice(mine[0], mine[-1] + 1)
        self.num_local_devices = len(mine)
        self.multiprocess = self.num_local_devices < self.num_devices

    def replicate(self, tree: Any) -> Any:
        """Host, single-device or globally replicated pytree -> the layout the runner expects
        for replicated state (every process passes the same values)."""
        if self.mode == "pmap":
            local = self.num_local_devices
            stacked = jax.tree.map(
                lambda x: np.broadcast_to(np.asarray(x), (local, *np.shape(x))), tree
            )
            return jax.pmap(lambda x: x, devices=self.devices)(stacked)
        if self.multiprocess:
            return self._global_copy(tree)
        return jax.device_put(tree, self._replicated)

    def _global_copy(self, tree: Any) -> Any:
        """Identical values on every process -> arrays replicated over the global mesh.

        `jax.device_put` onto a multi-process sharding first checks that every process passes
        the same value, with one collective per leaf (hundreds for a train state); the values
        here are identical by construction (same seed, same checkpoint).
        """

        def to_global(x):
            if isinstance(x, jax.Array) and x.sharding == self._replicated:
                return x
            host = np.asarray(x)
            return jax.make_array_from_callback(
                host.shape, self._replicated, lambda index: host[index]
            )

        return jax.tree.map(to_global, tree)

    def unreplicate(self, tree: Any) -> Any:
        """Replicated state -> one copy (pmap: on the host, as NumPy arrays)."""
        if self.mode == "pmap":
            # The first device's buffer, copied out: no per-leaf `x[0]`, which would compile
            # one gather program per leaf shape.
            return jax.tree.map(
                lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)[0],
                tree,
            )
        return tree

    def for_checkpoint(self, tree: Any) -> Any:
        """Replicated state -> one copy that orbax can save from every process at once: a
        globally replicated array (process 0 writes it), never one private copy per process."""
        tree = self.unreplicate(tree)
        if self.mode == "pmap":
            return self._global_copy(tree) if self.multiprocess else jax.device_put(tree)
        return tree

    def abstract_replicated(self, tree: Any) -> Any:
        """`jax.ShapeDtypeStruct`s replicated over the mesh: a restore target that reads a
        checkpoint of any device or process count onto this runner's devices."""
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=self._replicated), tree
        )

    def shard(self, batch: Any) -> Any:
        """This process's chunks [D_local, ...] (all [D, ...] on one process) -> device arrays
        split over the devices; with several processes, one global [D, ...] array."""
        if self.mode == "pmap":
            return batch  # pmap splits host arrays over its (local) devices itself
        if self.multiprocess:
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(self._split, np.asarray(x)),
                batch,
            )
        return jax.device_put(batch, self._split)

    def fetch(self, sharded: Any) -> Any:
        """A 'sharded' output ([D, ...] over all devices) -> host numpy [D, ...] on every
        process, including the rows other processes computed."""
        if not self.multiprocess:
            return jax.tree.map(np.asarray, sharded)
        from jax.experimental import multihost_utils

        # A pmap output holds this process's [D_local, ...] (concatenated over processes); a
        # shard_map output is already one global array (gathered whole).
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(sharded, tiled=True))

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
            mapped = jax.pmap(
                per_device_fn,
                axis_name=AXIS,
                devices=self.devices,
                donate_argnums=donate_argnums,
            )
            return _trimmed_after_compiles(
                self._started_together(mapped) if self.multiprocess else mapped
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

        def jitted(*args):
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
            return compiled[len(args)]

        if self.multiprocess:
            return _trimmed_after_compiles(self._compiled_together(jitted))
        return _trimmed_after_compiles(_compiled_then_trimmed(jitted))

    def _started_together(self, mapped: Callable) -> Callable:
        """Several processes, pmap: every process waits at a barrier before the first run of
        each new input signature, so they compile it together and arrive at its first run
        (where gloo sets up) about as far apart as their compile times differ. (An
        ahead-of-time compiled pmap expects global shapes, while each process passes its own
        [D_local, ...] rows, so the shard_map runner's `_compiled_together` does not apply.)
        """
        from jaxmol import distributed

        seen: set = set()

        def run(*args):
            key = _signature(args)
            if key not in seen:
                distributed.barrier("pmap_compile")
                seen.add(key)
            return mapped(*args)

        return run

    def _compiled_together(self, program_for: Callable) -> Callable:
        """Several processes: compiles each new input signature ahead of time, then waits for
        every process to have compiled it before the first run.

        The first run of a program sets up its CPU (gloo) collectives, which gives up when the
        processes arrive more than 30 s apart; compile times of a busy host differ by more.

        Args:
          program_for: (*args) -> the jitted or pmapped program for these arguments.
        """
        from jaxmol import distributed  # jaxmol.parallel stays free of start-up code

        executables: dict[Any, Callable] = {}

        def run(*args):
            key = _signature(args)
            executable = executables.get(key)
            if executable is None:
                executable = program_for(*args).lower(*args).compile()
                distributed.barrier("compiled")
                executables[key] = executable
            return executable(*args)

        return run


def _compiled_then_trimmed(program_for: Callable) -> Callable:
    """One process: compiles each new input signature ahead of its first run (into jit's own
    cache, which the run then uses), and hands the malloc arenas' idle memory back between the
    two (`jaxmol.allocator.return_idle_memory`; nothing when freed memory is kept on purpose).

    Why: the compile's freed working set would otherwise still be resident when the first run
    allocates its temporaries, so the first step of every new shape peaked higher than the
    steps after it (paper config, a batch of 24 packed rows in its own process: 5.02 GB with
    its compile against 4.52 GB for the next steps; docs/performance.md).

    Args:
      program_for: (*args) -> the jitted program for these arguments.
    """
    from jaxmol import allocator

    seen: set = set()

    def run(*args):
        program = program_for(*args)
        key = _signature(args)
        if key not in seen:
            program.lower(*args).compile()
            allocator.return_idle_memory()
            seen.add(key)
        return program(*args)

    return run


def _trimmed_after_compiles(program: Callable) -> Callable:
    """`program`, which hands the heap's free memory back to the kernel after the first call of
    each new input signature (`jaxmol.allocator.release_free_memory`: the compile's freed
    working set, kept resident otherwise when the CLI keeps freed memory)."""
    from jaxmol import allocator

    if not allocator.keep_freed_memory():  # the default: glibc trims by itself, nothing to add
        return program
    seen: set = set()

    def run(*args):
        outputs = program(*args)
        key = _signature(args)
        if key not in seen:
            seen.add(key)
            allocator.release_free_memory()
        return outputs

    return run


def _signature(args: tuple) -> tuple:
    """What a compiled program is specialised on: the tree structure, shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(args)
    # x.dtype where there is one: np.result_type(array) is deprecated in NumPy 2
    return treedef, tuple(
        (np.shape(x), x.dtype if hasattr(x, "dtype") else np.result_type(x)) for x in leaves
    )
