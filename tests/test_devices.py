"""Tests of the device check `python -m jaxmol.devices` on CPU (8 fake devices, conftest.py).

Needs only JAX: also run by tools/ci_newest_jax.sh, where the train extra is absent and the
default config cannot be read (then the built-in defaults are checked against nothing).
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from jaxmol import devices
from tests import conftest

HAVE_TRAIN_EXTRA = importlib.util.find_spec("ml_collections") is not None


def _run(*args, devices_count=8):
    env = dict(os.environ)
    env["XLA_FLAGS"] = conftest.xla_flags(devices_count)
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, "-m", "jaxmol.devices", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_report_on_cpu_lists_devices_and_says_the_step_uses_them():
    result = _run("--no_config", "--batch_size", "32")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "platform: cpu" in out
    assert "devices: 8 in all, 8 local:" in out
    assert sum(line.startswith("  cpu:") for line in out.splitlines()) == 8
    # On CPU it says how to get an accelerator, with this JAX's version.
    assert "no GPU or TPU visible to JAX" in out
    import jax

    assert f'"jax[cuda12]=={jax.__version__}"' in out
    assert f'"jax[tpu]=={jax.__version__}"' in out
    assert "OK: uses all 8 of 8 local devices (cpu), 4 of the 32 pairs per device" in out


def test_batch_not_divisible_fails_with_status_1():
    result = _run("--no_config", "--num_devices", "3", "--batch_size", "32")
    assert result.returncode == 1
    assert "uses" not in result.stdout.splitlines()[-1]
    assert "NOT OK: batch_size 32 is not a multiple of the 3 devices" in result.stdout


def test_too_many_devices_fails_with_status_1():
    result = _run("--no_config", "--num_devices", "4", devices_count=2)
    assert result.returncode == 1
    assert "NOT OK: num_devices=4, but 2 local devices exist" in result.stdout


def test_default_settings_equal_the_default_config():
    """The fallback used without ml-collections must say what the default config says."""
    if not HAVE_TRAIN_EXTRA:
        pytest.skip("reading a config needs the train extra (ml-collections)")
    from jaxmol import cli

    from_config = devices.settings_from_config(cli.load_config_file("default"), "default")
    fallback = devices.StepSettings(source="default")
    assert from_config == fallback


def test_reads_a_shipped_config_by_name():
    result = _run("--config", "tiny")
    if not HAVE_TRAIN_EXTRA:
        assert "not read" in result.stdout
        return
    assert result.returncode == 0, result.stderr
    assert "train step (tiny: parallel=shard_map, num_devices=-1, batch_size=16):" in result.stdout
    assert "OK: uses all 8 of 8 local devices (cpu), 2 of the 16 pairs per device" in result.stdout
