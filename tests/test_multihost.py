"""Several processes as one run: 2 processes x 4 fake CPU devices against 1 process x 8.

Real processes, real gloo collectives and real orbax checkpoints written by both processes;
every subprocess is bounded by a timeout. The reference is the session's in-process tiny run
(`trained_run`: 1 process, 8 devices, shard_map) with the same config.
"""

import json
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxmol.evaluation import restore_for_eval
from jaxmol.launch import free_port, process_env
from tests import conftest

REPO = conftest.REPO
TIMEOUT_S = 600  # any subprocess; a hang fails the test instead of CI
# Short enough that a test of a dead process stays short; long enough for a busy CI host.
HEARTBEAT_S = 15

# `conftest.in_process_config()` as command-line overrides of configs/tiny.py.
SAME_AS_IN_PROCESS = (
    f"--config.num_steps={conftest.IN_PROCESS_STEPS}",
    "--config.eval_every_steps=2",
    "--config.checkpoint_every_steps=1",
    "--config.keep_checkpoints=10",
    "--config.log_every_steps=1",
    "--config.data.max_eval_pairs=24",
    "--config.data.test_splits=('pcdes/test',)",
    "--config.optim.adam_eps=0.001",
    f"--config.heartbeat_timeout_s={HEARTBEAT_S}",
)


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


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """The in-process run's config trained by 2 processes x 4 devices (shard_map)."""
    workdir = tmp_path_factory.mktemp("two_by_four")
    result = _launch(workdir)
    return workdir, result


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["shard_map", "pmap"])
def test_two_processes_train_like_one_process_with_eight_devices(
    parallel, trained_run, two_process_run, tmp_path
):
    reference, _ = trained_run
    if parallel == "shard_map":
        workdir, result = two_process_run
    else:
        workdir = tmp_path / "pmap"
        result = _launch(workdir, "--config.parallel=pmap")
    # Only process 0 talks: one table, one progress bar, files written once.
    assert result.stdout.count("pcdes/test  pool") == 2  # t2m and m2t rows, from one process
    assert "[1] split" not in result.stdout and "[0] split" in result.stdout
    ours, theirs = _losses(workdir), _losses(reference)
    assert sorted(ours) == sorted(theirs) == list(range(1, conftest.IN_PROCESS_STEPS + 1))
    np.testing.assert_allclose(
        [ours[s] for s in sorted(ours)], [theirs[s] for s in sorted(theirs)], atol=1e-5, rtol=0
    )
    step, variables = _variables(workdir)
    ref_step, ref_variables = _variables(reference)
    assert step == ref_step == conftest.IN_PROCESS_STEPS
    _assert_trees_close(variables["params"], ref_variables["params"], atol=1e-5)
    _assert_trees_close(variables["batch_stats"], ref_variables["batch_stats"], atol=1e-5)
    # The end-of-run evaluation embedded over all 8 devices of both processes.
    ours, theirs = _test_metrics(workdir), _test_metrics(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key


@pytest.mark.slow
def test_evaluate_on_one_device_reproduces_the_two_process_evaluation(two_process_run):
    workdir, _ = two_process_run
    written = _test_metrics(workdir)
    scratch = workdir.parent / f"{workdir.name}_eval"
    shutil.copytree(workdir, scratch)
    subprocess.run(
        [
            sys.executable,
            str(REPO / "evaluate.py"),
            f"--workdir={scratch}",
            "--split=pcdes/test",
            "--step=latest",
            "--num_devices=1",
            "--max_pairs=24",
        ],
        env=conftest.subprocess_env(devices=1),
        check=True,
        capture_output=True,
        timeout=TIMEOUT_S,
        cwd=REPO,
    )
    again = _test_metrics(scratch)
    for key in written:
        assert again[key] == pytest.approx(written[key], abs=1e-5), key


def _checkpoint_steps(workdir) -> list[int]:
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_a_dead_process_ends_the_other_and_the_run_resumes_on_two_or_one_processes(
    two_process_run, tmp_path
):
    uninterrupted, _ = two_process_run
    workdir = tmp_path / "killed"
    address = f"127.0.0.1:{free_port()}"
    processes = [_start_process(i, address, workdir) for i in range(2)]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not _checkpoint_steps(workdir):
            assert all(p.poll() is None for p in processes), processes[0].stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        processes[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        output, _ = processes[0].communicate(timeout=HEARTBEAT_S + 120)
        survivor_took = time.monotonic() - killed_at
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    # The survivor does not hang: it ends with an error that says a process died.
    assert processes[0].returncode != 0
    assert "stopped sending heartbeats" in output or "unhealthy" in output, output[-3000:]
    assert survivor_took < HEARTBEAT_S + 60
    saved = _checkpoint_steps(workdir)
    assert saved and saved[-1] < conftest.IN_PROCESS_STEPS
    one_process = tmp_path / "resumed_on_one_process"
    shutil.copytree(workdir, one_process)

    _launch(workdir)  # 2 processes again
    result = subprocess.run(
        conftest.train_command(one_process, *SAME_AS_IN_PROCESS),
        env=conftest.subprocess_env(devices=8),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step {saved[-1]}" in result.stderr
    _, expected = _variables(uninterrupted)
    for resumed in (workdir, one_process):
        step, variables = _variables(resumed)
        assert step == conftest.IN_PROCESS_STEPS
        _assert_trees_close(variables, expected, atol=1e-6)


@pytest.mark.slow
def test_processes_with_different_configs_fail_naming_the_key(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    processes = [
        _start_process(0, address, tmp_path / "run"),
        _start_process(1, address, tmp_path / "run", "--config.optim.lr=0.5"),
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert [p.returncode for p in processes] == [7, 7], outputs
    assert "the run config differs between processes" in outputs[0]
    assert "optim.lr: 0.001 (process 0) vs 0.5" in outputs[1]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_unreachable_coordinator_fails_within_the_timeout(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    process = _start_process(1, address, tmp_path / "run", "--config.distributed_timeout_s=2")
    started = time.monotonic()
    output, _ = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 7, output
    assert f"cannot reach the coordinator (process 0) at {address} within 2 s" in output
    assert time.monotonic() - started < 120
