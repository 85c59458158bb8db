"""Several processes (hosts) as one run: start-up, agreement between processes, who talks.

A run over several processes has one global mesh of all their devices (`jaxmol.parallel`). This
module does what only exists because there are several processes:

* `initialize`: joins the processes (`jax.distributed.initialize`) from the run config, the
  ``JAXMOL_*`` environment variables that `python -m jaxmol.launch` sets, or JAX's own cluster
  detection (TPU pods, SLURM); sets JAX's CPU collectives to gloo so that fake CPU devices of
  several processes can talk;
* `check_same_config`: every process must run the same config (a mismatch would silently train
  different models or deadlock on differently shaped collectives);
* `max_over_processes`: a stop request (Ctrl-C, SIGTERM) on one process stops all of them at
  the same step;
* `is_primary` / `quiet_unless_primary`: only process 0 writes files, prints tables and shows
  progress; the others log warnings and errors only, prefixed with their index.

A process that dies ends the others: JAX's coordination service stops receiving its heartbeats
and aborts every process within ``config.heartbeat_timeout_s`` with "The following tasks are
unhealthy (stopped sending heartbeats)". A process that cannot reach the coordinator fails after
``config.distributed_timeout_s``. See docs/multihost.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time

import jax
import numpy as np

logger = logging.getLogger(__name__)

# Environment variables `python -m jaxmol.launch` sets (and a user may set by hand).
ENV_COORDINATOR = "JAXMOL_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAXMOL_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXMOL_PROCESS_ID"

# How long `barrier` waits for the other processes (set by `initialize`).
_timeout_s = 300.0

# Config keys that may differ between the processes of one run.
PER_PROCESS_KEYS = frozenset({"process_id"})


class DistributedError(RuntimeError):
    """The processes of a run cannot work together (unreachable coordinator, different
    configs); the message says what to fix."""


def _setting(config, key: str, env: str, default):
    value = config.get(key, default)
    if value in ("", -1, None) and os.environ.get(env):
        return type(default)(os.environ[env]) if default is not None else os.environ[env]
    return value


def requested(config=None) -> bool:
    """True if this process belongs to a multi-process run: ``config.distributed``, or started
    by `python -m jaxmol.launch` (``$JAXMOL_PROCESS_ID`` set)."""
    return bool(config is not None and config.get("distributed", False)) or bool(
        os.environ.get(ENV_PROCESS_ID)
    )


def initialize(config) -> None:
    """Joins this process to the run's other processes (once; a no-op when already joined).

    Explicit settings come from ``config.coordinator_address``, ``config.num_processes`` and
    ``config.process_id``, else from ``$JAXMOL_COORDINATOR_ADDRESS``, ``$JAXMOL_NUM_PROCESSES``
    and ``$JAXMOL_PROCESS_ID``; with none of them, `jax.distributed.initialize()` detects the
    cluster itself (Cloud TPU pods, SLURM, Open MPI, ``$JAX_COORDINATOR_ADDRESS``).

    Raises:
      DistributedError: the coordinator is not reachable within ``distributed_timeout_s``.
    """
    if jax.distributed.is_initialized():
        return
    address = _setting(config, "coordinator_address", ENV_COORDINATOR, "")
    num_processes = _setting(config, "num_processes", ENV_NUM_PROCESSES, -1)
    process_id = _setting(config, "process_id", ENV_PROCESS_ID, -1)
    global _timeout_s
    timeout = int(config.get("distributed_timeout_s", 300))
    heartbeat = int(config.get("heartbeat_timeout_s", 100))
    _timeout_s = timeout
    # gloo: collectives between processes for CPU devices (the default has none). It only
    # affects the CPU backend, so it is harmless on GPU and TPU hosts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    explicit = {}
    if address:
        explicit["coordinator_address"] = address
    if num_processes != -1:
        explicit["num_processes"] = int(num_processes)
    if process_id != -1:
        explicit["process_id"] = int(process_id)
    if address and int(process_id) > 0:
        _wait_for_coordinator(address, timeout)
    logger.info(
        "joining the run's processes (%s); waiting up to %d s for all of them",
        ", ".join(f"{k}={v}" for k, v in explicit.items()) or "detected from the environment",
        timeout,
    )
    try:
        jax.distributed.initialize(
            **explicit,
            initialization_timeout=timeout,
            heartbeat_timeout_seconds=heartbeat,
            # A process leaving normally waits this long for the others to leave too.
            shutdown_timeout_seconds=heartbeat,
        )
    except (RuntimeError, ValueError) as error:
        raise DistributedError(
            f"could not join the run's processes ({explicit or 'auto-detected'}): {error}"
        ) from error
    logger.info(
        "process %d of %d: %d local devices of %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def _wait_for_coordinator(address: str, timeout: float) -> None:
    """Waits until the coordinator accepts connections; a clear error instead of JAX's abort."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=2):
                return
        except OSError as error:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"cannot reach the coordinator (process 0) at {address} within {timeout} s: "
                    f"{error}. Start process 0 first, check the address and port, or raise "
                    "config.distributed_timeout_s"
                ) from error
            time.sleep(0.5)


def is_primary() -> bool:
    """True on process 0, the one that writes files, prints and shows progress."""
    return jax.process_index() == 0


def quiet_unless_primary() -> None:
    """On processes other than 0: log warnings and errors only, prefixed with the index."""
    if is_primary():
        return
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    prefix = f"[process {jax.process_index()}] "
    for handler in root.handlers:
        fmt = handler.formatter._fmt if handler.formatter else "%(message)s"
        if not fmt.startswith(prefix):
            handler.setFormatter(logging.Formatter(prefix + fmt))


def max_over_processes(value: int) -> int:
    """The largest `value` any process passes (a collective: every process must call it).

    The training loop passes the stop signal it received (0: none), so every process stops at
    the same step and reports the same signal.
    """
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    values = multihost_utils.process_allgather(np.asarray([value], np.int32))
    return int(np.asarray(values).max())


_barrier_count = 0


def barrier(name: str, timeout_s: float | None = None) -> None:
    """Waits until every process reached this point (no-op on one process).

    Uses the coordination service's barrier (no device collective, so it has no compiled
    program of its own); every process must pass the same sequence of names.

    Args:
      name: what is waited for (made unique per call).
      timeout_s: seconds before a missing process is an error (default: the join timeout).
    """
    global _barrier_count
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the client orbax uses, too

    _barrier_count += 1
    timeout = _timeout_s if timeout_s is None else timeout_s
    jax_distributed.global_state.client.wait_at_barrier(
        f"jaxmol_{name}_{_barrier_count}", timeout_in_ms=int(timeout * 1000)
    )


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def check_same_config(resolved: dict) -> None:
    """Raises `DistributedError` on every process if the processes run different configs.

    Each process compares a hash of its config (minus `PER_PROCESS_KEYS`) with every other
    one's; a process whose config differs from process 0's names the differing keys.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    shared = {k: v for k, v in _flatten(resolved).items() if k not in PER_PROCESS_KEYS}
    blob = json.dumps(shared, sort_keys=True, default=str).encode()
    digest = np.frombuffer(hashlib.sha256(blob).digest()[:8], np.int32)  # [2]
    digests = np.asarray(multihost_utils.process_allgather(digest))  # [P, 2]
    differing = [p for p in range(len(digests)) if not np.array_equal(digests[p], digests[0])]
    if not differing:
        return
    # Every process learns process 0's config, so a differing one can name the keys.
    size = int(np.asarray(multihost_utils.process_allgather(np.int32(len(blob)))).max())
    padded = np.zeros(size, np.uint8)
    padded[: len(blob)] = np.frombuffer(blob, np.uint8)
    primary_blob = np.asarray(multihost_utils.broadcast_one_to_all(padded))
    primary_len = int(multihost_utils.broadcast_one_to_all(np.int32(len(blob))))
    primary = json.loads(bytes(primary_blob[:primary_len]).decode())
    keys = sorted(k for k in primary.keys() | shared.keys() if primary.get(k) != shared.get(k))
    detail = (
        "this process differs from process 0 in: "
        + "; ".join(f"{k}: {primary.get(k)!r} (process 0) vs {shared.get(k)!r}" for k in keys)
        if keys
        else f"processes {differing} differ from process 0 (see their messages)"
    )
    raise DistributedError(
        f"the run config differs between processes; every process must get the same config "
        f"and flags. {detail}"
    )
