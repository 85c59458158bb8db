"""Several processes as one run: 2 processes x 4 fake CPU devices against 1 process x 8.

Real processes, real gloo collectives and real orbax checkpoints written by both processes;
every subprocess is bounded by a timeout. The reference is the session's in-process tiny run
(`trained_run`: 1 process, 8 devices, shard_map) with the same config.
"""

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxmol import train_lib
from jaxmol.evaluation import restore_for_eval
from jaxmol.launch import free_port, process_env
from tests import conftest

REPO = conftest.REPO
TIMEOUT_S = 600  # any subprocess; a hang fails the test instead of CI
# The dead-process test's heartbeat timeout: short enough to keep it short, long enough for a
# busy CI host (the default, 100 s, elsewhere).
HEARTBEAT_S = 30

SAME_AS_IN_PROCESS = conftest.IN_PROCESS_OVERRIDES  # `conftest.in_process_config()`


def _launch(workdir, *overrides, processes=2, devices_per_process=4, check=True):
    """`python -m jaxmol.launch ... -- train.py --config configs/tiny.py ...`."""
    command = [
        sys.executable,
        "-m",
        "jaxmol.launch",
        f"--processes={processes}",
        f"--devices_per_process={devices_per_process}",
        "--",
        *conftest.train_command(workdir, *SAME_AS_IN_PROCESS, *overrides)[1:],
    ]
    result = subprocess.run(
        command,
        env=conftest.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=REPO,
    )
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def _start_process(process_id, address, workdir, *overrides, num_processes=2, devices=4):
    """One process of a run started by hand (no launcher), its output in a pipe."""
    env = process_env(process_id, num_processes, address, devices, base=conftest.subprocess_env())
    return subprocess.Popen(
        conftest.train_command(workdir, *SAME_AS_IN_PROCESS, *overrides),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )


def _losses(workdir) -> dict[int, float]:
    log = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in log if "loss" in r}


def _variables(workdir, step="latest"):
    _, variables, _, restored = restore_for_eval(workdir, step=step)
    return restored, jax.device_get(variables)


def _assert_trees_close(a, b, atol):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path)
        )


def _test_metrics(workdir) -> dict:
    report = json.loads((workdir / "eval" / "pcdes_test__pool.json").read_text())
    return {
        f"{d}/{k}": v
        for d in ("t2m", "m2t")
        for k, v in report[d].items()
        if isinstance(v, int | float)
    }


def _checkpoint_steps(workdir) -> list[int]:
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _wait_for_checkpoint_beyond(workdir, step, processes):
    deadline = time.monotonic() + TIMEOUT_S
    while not [s for s in _checkpoint_steps(workdir) if s > step]:
        for process in processes:
            assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"no checkpoint beyond step {step} appeared"
        time.sleep(0.05)


def _communicate_all(processes, timeout):
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return outputs


@dataclasses.dataclass
class InterruptedRun:
    """What the 2-process run went through (see `two_process_run`)."""

    workdir: Path
    sigterm_statuses: list
    sigterm_outputs: list
    saved_by_signal: int
    survivor_status: int
    survivor_output: str
    survivor_took_s: float
    saved_before_kill: int
    at_kill: Path  # a copy of the workdir right after the kill
    final: subprocess.CompletedProcess  # the launcher run that resumed it to the end


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> InterruptedRun:
    """The in-process run's config trained by 2 processes x 4 devices, interrupted twice and
    resumed to the end, the way a preempted pod job lives:

    1. started by hand with the shard_map runner; SIGTERM to process 1 after the first
       checkpoint: both agree to stop, save once and exit 0;
    2. started again (it resumes); SIGKILL of process 1 after the next checkpoint: the survivor
       must end with an error within the heartbeat timeout instead of hanging;
    3. resumed to the end through `jaxmol.launch` with the pmap runner.

    Every step is therefore trained by one of the runners over 2 processes, and the final state
    must equal the uninterrupted 1 x 8 reference run."""
    workdir = tmp_path_factory.mktemp("two_by_four") / "run"
    heartbeat = f"--config.heartbeat_timeout_s={HEARTBEAT_S}"
    address = f"127.0.0.1:{free_port()}"
    processes = [_start_process(i, address, workdir, heartbeat) for i in range(2)]
    _wait_for_checkpoint_beyond(workdir, 0, processes)
    processes[1].send_signal(signal.SIGTERM)
    sigterm_outputs = _communicate_all(processes, timeout=TIMEOUT_S)
    sigterm_statuses = [p.returncode for p in processes]
    saved_by_signal = _checkpoint_steps(workdir)[-1]

    address = f"127.0.0.1:{free_port()}"
    processes = [_start_process(i, address, workdir, heartbeat) for i in range(2)]
    _wait_for_checkpoint_beyond(workdir, saved_by_signal, processes)
    processes[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    survivor_output = _communicate_all(processes[:1], timeout=HEARTBEAT_S + 120)[0]
    survivor_took_s = time.monotonic() - killed_at
    (workdir.parent / "survivor.log").write_text(survivor_output)  # for a failing test's reader
    _communicate_all(processes[1:], timeout=60)
    saved_before_kill = _checkpoint_steps(workdir)[-1]
    at_kill = workdir.parent / "at_kill"
    shutil.copytree(workdir, at_kill)

    final = _launch(workdir, "--config.parallel=pmap")
    return InterruptedRun(
        workdir=workdir,
        sigterm_statuses=sigterm_statuses,
        sigterm_outputs=sigterm_outputs,
        saved_by_signal=saved_by_signal,
        survivor_status=processes[0].returncode,
        survivor_output=survivor_output,
        survivor_took_s=survivor_took_s,
        saved_before_kill=saved_before_kill,
        at_kill=at_kill,
        final=final,
    )


def _assert_like_the_reference(workdir, reference, atol):
    """Losses of every logged step, final parameters, BatchNorm statistics and end-of-run test
    metrics of `workdir` equal those of the 1 x 8 `reference` run."""
    ours, theirs = _losses(workdir), _losses(reference)
    assert sorted(ours) == sorted(theirs) == list(range(1, conftest.IN_PROCESS_STEPS + 1))
    for step, loss in ours.items():
        assert loss == pytest.approx(theirs[step], abs=1e-5), step
    step, variables = _variables(workdir)
    ref_step, ref_variables = _variables(reference)
    assert step == ref_step == conftest.IN_PROCESS_STEPS
    _assert_trees_close(variables["params"], ref_variables["params"], atol=atol)
    _assert_trees_close(variables["batch_stats"], ref_variables["batch_stats"], atol=atol)
    ours, theirs = _test_metrics(workdir), _test_metrics(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_with_one_checkpoint(two_process_run):
    run = two_process_run
    assert run.sigterm_statuses == [0, 0], run.sigterm_outputs
    assert run.saved_by_signal < conftest.IN_PROCESS_STEPS
    saved = f"interrupted: saved a checkpoint at step {run.saved_by_signal}"
    assert saved in run.sigterm_outputs[0]


@pytest.mark.slow
def test_a_dead_process_ends_the_survivor_with_an_error_not_a_hang(two_process_run):
    run = two_process_run
    assert run.survivor_status not in (0, None)
    output = run.survivor_output
    # Which report comes first depends on where the survivor was when its peer died: gloo's
    # broken connection inside a collective, or JAX's coordination service (a heartbeat
    # timeout, then "Terminating process ... another task died"). Any of them names the death.
    # Gloo also has a third way (seen once in CI): XLA tags every gloo collective 0, so when
    # the survivor's devices that talk to the dead peers fail while its other devices go on to
    # the program's next collective, a device still waiting in the earlier one receives a
    # message of another size, and gloo aborts with its "collective mismatch" enforce.
    reports = (
        "stopped sending heartbeats",
        "unhealthy",
        "heartbeat timeout",
        "another task died",
        "Connection reset by peer",
        "Connection closed by peer",
        "Received data size doesn't match expected size",
    )
    assert any(report in output for report in reports), output[:3000] + "\n...\n" + output[-3000:]
    assert run.survivor_took_s < HEARTBEAT_S + 60
    assert run.saved_by_signal < run.saved_before_kill < conftest.IN_PROCESS_STEPS


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_eight_devices(trained_run, two_process_run):
    """Steps trained by shard_map and by pmap over 2 processes x 4 devices, across two
    interruptions, against the uninterrupted 1 x 8 run."""
    reference, _ = trained_run
    run = two_process_run
    result = run.final
    assert f"resumed from step {run.saved_before_kill}" in result.stdout + result.stderr
    # Only process 0 talks: one table, files written once.
    assert result.stdout.count("pcdes/test  pool") == 2  # t2m and m2t rows, from one process
    assert "[1] split" not in result.stdout and "[0] split" in result.stdout
    # Every loss term, negative and BatchNorm statistic spanned the global batch, and the
    # end-of-run evaluation embedded over all 8 devices of both processes.
    _assert_like_the_reference(run.workdir, reference, atol=1e-5)


@pytest.mark.slow
def test_the_killed_run_resumes_on_one_process_to_the_parameters_of_two(
    trained_run, two_process_run
):
    """The checkpoint written by 2 processes at the kill, resumed by 1 process x 8 devices,
    ends where the 2-process resumption and the uninterrupted 1 x 8 run end."""
    reference, _ = trained_run
    run = two_process_run
    result = subprocess.run(
        conftest.train_command(run.at_kill, *SAME_AS_IN_PROCESS, "--config.data.test_splits=()"),
        env=conftest.subprocess_env(devices=8),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step {run.saved_before_kill}" in result.stderr
    step, variables = _variables(run.at_kill)
    assert step == conftest.IN_PROCESS_STEPS
    for other in (run.workdir, reference):
        _, expected = _variables(other)
        _assert_trees_close(variables, expected, atol=1e-6)


@pytest.mark.slow
def test_evaluate_on_one_device_or_two_processes_reproduces_the_run_evaluation(two_process_run):
    workdir = two_process_run.workdir
    written = _test_metrics(workdir)
    evaluate = [
        str(REPO / "evaluate.py"),
        "--split=pcdes/test",
        "--step=latest",
        "--max_pairs=24",
    ]
    one_device = workdir.parent / f"{workdir.name}_eval_1x1"
    shutil.copytree(workdir, one_device)
    subprocess.run(
        [sys.executable, *evaluate, f"--workdir={one_device}", "--num_devices=1"],
        env=conftest.subprocess_env(devices=1),
        check=True,
        capture_output=True,
        timeout=TIMEOUT_S,
        cwd=REPO,
    )
    two_processes = workdir.parent / f"{workdir.name}_eval_2x4"
    shutil.copytree(workdir, two_processes)
    (two_processes / "eval" / "pcdes_test__pool.json").unlink()
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxmol.launch",
            "--processes=2",
            "--devices_per_process=4",
            "--",
            *evaluate,
            f"--workdir={two_processes}",
        ],
        env=conftest.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=REPO,
    )
    assert launched.returncode == 0, launched.stdout[-3000:]
    assert launched.stdout.count("pcdes/test  pool") == 2  # one table, printed by process 0
    assert "[0] weights: latest checkpoint" in launched.stdout
    for again in (_test_metrics(one_device), _test_metrics(two_processes)):
        for key in written:
            assert again[key] == pytest.approx(written[key], abs=1e-5), key


@pytest.mark.slow
def test_a_two_process_checkpoint_restores_for_training_on_one_device(two_process_run, tmp_path):
    workdir = two_process_run.workdir
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    config = conftest.in_process_config()
    config.num_devices = 1
    run = train_lib.setup(config, copy)
    try:
        assert run.runner.num_devices == 1
        assert int(run.state.step) == conftest.IN_PROCESS_STEPS
        assert run.position.to_dict() == {"epoch": 1, "step": 1}  # 3 batches per epoch
        _, expected = _variables(workdir)
        _assert_trees_close(jax.device_get(run.state.params), expected["params"], atol=0)
    finally:
        run.lock.release()


@pytest.mark.slow
def test_processes_with_different_configs_fail_naming_the_key(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    processes = [
        _start_process(0, address, tmp_path / "run"),
        _start_process(1, address, tmp_path / "run", "--config.optim.lr=0.5"),
    ]
    outputs = _communicate_all(processes, timeout=TIMEOUT_S)
    assert [p.returncode for p in processes] == [7, 7], outputs
    assert "the run config differs between processes" in outputs[0]
    assert "optim.lr: 0.001 (process 0) vs 0.5" in outputs[1]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_batch_that_does_not_divide_the_global_devices_stops_every_process(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    processes = [
        _start_process(i, address, tmp_path / "run", "--config.batch_size=12") for i in range(2)
    ]
    outputs = _communicate_all(processes, timeout=TIMEOUT_S)
    assert [p.returncode for p in processes] == [2, 2], outputs
    for output in outputs:
        assert "config.batch_size=12 is not a multiple of the 8 devices" in output


def test_an_unreachable_coordinator_fails_within_the_timeout(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    process = _start_process(1, address, tmp_path / "run", "--config.distributed_timeout_s=2")
    started = time.monotonic()
    output, _ = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 7, output
    assert f"cannot reach the coordinator (process 0) at {address} within 2 s" in output
    assert time.monotonic() - started < 120


def test_the_launcher_prefixes_output_and_stops_all_processes_when_one_fails(tmp_path):
    marker = tmp_path / "still_running"
    program = (
        "import os, sys, time\n"
        "i = os.environ['JAXMOL_PROCESS_ID']\n"
        "print('hello from', i, os.environ['JAXMOL_NUM_PROCESSES'], flush=True)\n"
        "if i == '1':\n"
        "    time.sleep(1)\n"
        "    sys.exit(3)\n"
        f"time.sleep(600); open({str(marker)!r}, 'w').close()\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxmol.launch",
            "--processes=2",
            "--grace_s=5",
            "--",
            sys.executable,
            "-c",
            program,
        ],
        env=conftest.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 3
    assert "[0] hello from 0 2" in result.stdout and "[1] hello from 1 2" in result.stdout
    assert "process 1 exited with status 3; stopping the others" in result.stderr
    assert time.monotonic() - started < 60 and not marker.exists()
