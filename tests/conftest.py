"""Test setup: 8 fake CPU devices and no network, both set before JAX or HF libraries load."""

import fcntl
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS of a test process with `devices` fake CPU devices."""
    return f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"


# One persistent XLA compilation cache for the whole test session (a fresh directory each
# session), shared with the subprocesses the tests start: many tests train the same tiny program,
# and each would otherwise compile it again (measured: a tiny train.py run 143 s cold, 52 s with
# the cache warm, on a loaded 2-core machine). Numerics are unchanged: the same program is loaded.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxmol_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# XLA's LLVM backend at optimisation level 0 in tests (`TEST_XLA_FLAGS`): most of the suite's
# time is compiling small programs that then run for milliseconds, and level 0 halves that
# (measured: test_bfloat16_step_is_close_to_float32 89 s -> 45 s on a loaded 2-core machine). It
# changes code generation only, not the HLO program or its fusion; every test compares programs
# compiled the same way, and benchmarks and real runs keep XLA's default.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def subprocess_env(devices: int = 8) -> dict:
    """The environment of a jaxmol subprocess: `devices` fake CPU devices, no hub, this
    checkout importable, the session's compilation cache."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(REPO)
    return env


def train_command(workdir, *overrides) -> list[str]:
    """`python train.py --config configs/tiny.py --workdir WORKDIR [overrides]`."""
    config = str(REPO / "configs" / "tiny.py")
    script = str(REPO / "train.py")
    return [sys.executable, script, "--config", config, "--workdir", str(workdir), *overrides]


IN_PROCESS_STEPS = 4
IN_PROCESS_TRAIN_PAIRS = 48  # 3 batches of 16 per epoch: the 4 steps cross an epoch boundary


def in_process_config():
    """The tiny config of the shared in-process run: validated at steps 2 and 4 only,
    checkpointed at every step (all kept), the PCdes test split evaluated at the end, an epoch
    boundary after step 3. Subprocess runs get the same config from `IN_PROCESS_OVERRIDES`."""
    from configs import tiny

    config = tiny.get_config()
    config.num_steps = IN_PROCESS_STEPS
    config.data.max_train_pairs = IN_PROCESS_TRAIN_PAIRS
    config.eval_every_steps = 2  # validated at 2 and 4; checkpoints 1 and 3 are not
    config.checkpoint_every_steps = 1
    config.keep_checkpoints = 10
    config.log_every_steps = 1
    config.data.max_eval_pairs = 24
    config.data.test_splits = ("pcdes/test",)
    # Adam moves parameters whose true gradient is 0 (biases before a BatchNorm) by ±lr on
    # rounding noise; a larger ε keeps runs on other device/process layouts comparable
    # (tests/test_multihost.py) without changing what the run learns.
    config.optim.adam_eps = 1e-3
    return config


# `in_process_config()` as command-line overrides of configs/tiny.py (`train_command`).
IN_PROCESS_OVERRIDES = (
    f"--config.num_steps={IN_PROCESS_STEPS}",
    f"--config.data.max_train_pairs={IN_PROCESS_TRAIN_PAIRS}",
    "--config.eval_every_steps=2",
    "--config.checkpoint_every_steps=1",
    "--config.keep_checkpoints=10",
    "--config.log_every_steps=1",
    "--config.data.max_eval_pairs=24",
    "--config.data.test_splits=('pcdes/test',)",
    "--config.optim.adam_eps=0.001",
)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """(workdir, results returned by training, as JSON) of one tiny training run in process.

    Trained once per test session: under pytest-xdist the first worker that needs it trains
    it while the others wait on a file lock, then every worker reads the same workdir. Tests
    must not modify the workdir (copy it first)."""
    from jaxmol import train_lib

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's directory, shared by its workers
    workdir, returned = root / "in_process_run", root / "in_process_run.json"
    with open(root / "in_process_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not returned.exists():
            results = train_lib.train_and_evaluate(in_process_config(), str(workdir))
            returned.write_text(json.dumps(results))
    return workdir, json.loads(returned.read_text())


def pytest_collection_modifyitems(items):
    """The multi-process tests first: they are the longest file, and under pytest-xdist
    (`--dist loadfile`) a long file started last would run alone at the end."""
    items.sort(key=lambda item: item.path.name != "test_multihost.py")
