"""Starts N local processes of one multi-process run: tests, and one node with several GPUs.

    python -m jaxmol.launch --processes 2 --devices_per_process 4 -- \\
        train.py --config configs/tiny.py --workdir /tmp/tiny_2x4
    python -m jaxmol.launch --processes 8 --gpus_per_process 1 -- jaxmol-train --config ...

Each process gets ``JAXMOL_COORDINATOR_ADDRESS`` (127.0.0.1 and a free port),
``JAXMOL_NUM_PROCESSES`` and ``JAXMOL_PROCESS_ID``, which `train.py` and `evaluate.py` read to
join the run (`jaxmol.distributed`); with ``--devices_per_process K`` also
``--xla_force_host_platform_device_count=K`` in ``XLA_FLAGS`` (K fake CPU devices), with
``--gpus_per_process G`` its own ``CUDA_VISIBLE_DEVICES``. A command that ends in ``.py`` runs
with this Python.

Output of every process is forwarded line by line with a ``[i]`` prefix. When one process fails
(non-zero status) the others are stopped (SIGTERM, then SIGKILL after ``--grace_s``), so nothing
is left waiting on a dead peer; Ctrl-C or SIGTERM to the launcher is passed on to every process
(each saves a checkpoint and exits). The launcher's status is the first failure's, else 0.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    """A TCP port nobody listens on right now (the coordinator binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(
    process_id: int,
    num_processes: int,
    address: str,
    devices_per_process: int = 0,
    gpus_per_process: int = 0,
    base: dict | None = None,
) -> dict:
    """The environment of process `process_id` of a local run."""
    env = dict(os.environ if base is None else base)
    env["JAXMOL_COORDINATOR_ADDRESS"] = address
    env["JAXMOL_NUM_PROCESSES"] = str(num_processes)
    env["JAXMOL_PROCESS_ID"] = str(process_id)
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the launcher as they are written
    if devices_per_process:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = (
            f"{flags.strip()} --xla_force_host_platform_device_count={devices_per_process}"
        ).strip()
    if gpus_per_process:
        first = process_id * gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(
            str(g) for g in range(first, first + gpus_per_process)
        )
    return env


def _end_with_parent() -> None:
    """In the child, before it runs: on Linux, SIGTERM it when the launcher dies (even by
    SIGKILL), so no process of the run is left behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the launcher's own clean-up is all there is


def _forward(stream, prefix: str) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(prefix.encode() + line)
        sys.stdout.buffer.flush()
    stream.close()


def launch(
    command: list[str],
    *,
    processes: int,
    devices_per_process: int = 0,
    gpus_per_process: int = 0,
    port: int = 0,
    grace_s: float = 20.0,
) -> int:
    """Runs `command` as `processes` cooperating processes; returns the run's exit status."""
    if command and command[0].endswith(".py"):
        command = [sys.executable, *command]
    address = f"127.0.0.1:{port or free_port()}"
    children = []
    for i in range(processes):
        env = process_env(i, processes, address, devices_per_process, gpus_per_process)
        child = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # signals reach the children only through the launcher
            preexec_fn=_end_with_parent,
        )
        threading.Thread(target=_forward, args=(child.stdout, f"[{i}] "), daemon=True).start()
        children.append(child)

    def pass_on(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        while any(child.poll() is None for child in children):
            failed = [c for c in children if c.poll() not in (None, 0)]
            if failed:
                status = _status(failed[0].returncode)
                index = children.index(failed[0])
                print(
                    f"launch: process {index} exited with status {status}; stopping the others",
                    file=sys.stderr,
                    flush=True,
                )
                _stop(children, grace_s)
                break
            time.sleep(0.2)
        if status == 0:
            status = next((_status(c.returncode) for c in children if c.returncode), 0)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _stop(children, grace_s)
    return status


def _status(returncode: int) -> int:
    """A child's status as a shell reports it (128 + signal for a killed one)."""
    return 128 - returncode if returncode < 0 else returncode


def _stop(children, grace_s: float) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: python -m jaxmol.launch [options] -- COMMAND ...", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(
        prog="python -m jaxmol.launch", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--processes", type=int, required=True, help="processes to start")
    parser.add_argument(
        "--devices_per_process", type=int, default=0, help="fake CPU devices per process"
    )
    parser.add_argument(
        "--gpus_per_process", type=int, default=0, help="GPUs per process (CUDA_VISIBLE_DEVICES)"
    )
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: free)")
    parser.add_argument(
        "--grace_s", type=float, default=20.0, help="seconds between SIGTERM and SIGKILL"
    )
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if args.processes < 1 or not command:
        parser.error("need --processes >= 1 and a command after --")
    return launch(
        command,
        processes=args.processes,
        devices_per_process=args.devices_per_process,
        gpus_per_process=args.gpus_per_process,
        port=args.port,
        grace_s=args.grace_s,
    )


if __name__ == "__main__":
    sys.exit(main())
