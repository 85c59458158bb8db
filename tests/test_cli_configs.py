"""The CLIs' config and data-folder handling (jaxmol.cli): shipped config names, sibling imports
of a config file from any directory, and --data_dir / $JAXMOL_DATA_DIR."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxmol import cli
from jaxmol.data import datasets

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_are_the_top_level_configs():
    assert cli.CONFIG_DIR.resolve() == (REPO / "configs").resolve()
    names = cli.shipped_config_names()
    assert {"default", "quickstart", "pcdes", "tiny"} <= set(names)
    assert "__init__" not in names


def test_resolve_config_path():
    tiny = str(cli.CONFIG_DIR / "tiny.py")
    assert cli.resolve_config_path("tiny") == tiny
    assert cli.resolve_config_path("tiny.py") == tiny
    assert cli.resolve_config_path("tiny:arg") == tiny + ":arg"  # ml_collections argument
    existing = str(REPO / "configs" / "pcdes.py")
    assert cli.resolve_config_path(existing) == existing
    assert cli.resolve_config_path("no/such/config.py") == "no/such/config.py"


@pytest.mark.parametrize(
    "argv",
    [
        ["prog", "--config", "tiny", "--config.batch_size=8", "--workdir", "w"],
        ["prog", "--config=tiny", "--config.batch_size=8", "--workdir", "w"],
        ["prog", "-config", "tiny", "--config.batch_size=8", "--workdir", "w"],
    ],
)
def test_prepare_config_argv_resolves_only_the_config_value(argv):
    out = cli.prepare_config_argv(argv)
    tiny = str(cli.CONFIG_DIR / "tiny.py")
    assert tiny in out or f"--config={tiny}" in out
    assert "--config.batch_size=8" in out and out[-2:] == ["--workdir", "w"]
    assert len(out) == len(argv)


def test_config_siblings_import_from_a_copy_anywhere(tmp_path):
    """A copy of configs/ elsewhere: its tiny.py imports *its* default, cwd elsewhere, with
    neither the checkout nor the copy's parent on sys.path (python -P)."""
    copy = tmp_path / "mine" / "configs"
    shutil.copytree(REPO / "configs", copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "default.py").write_text(
        (copy / "default.py").read_text() + "\nMARK = 'copy'\n", encoding="utf-8"
    )
    code = (
        "import sys\n"
        "from jaxmol import cli\n"
        f"config = cli.load_config_file({str(copy / 'tiny.py')!r})\n"
        "print(config.batch_size, sys.modules['configs'].default.MARK)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-P", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["16", "copy"]


def test_load_config_file_unknown_name_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="tiny"):
        cli.load_config_file("no_such_config")


@pytest.fixture
def restore_data_dir(monkeypatch):
    if cli.DATA_ENV in os.environ:
        monkeypatch.setenv(cli.DATA_ENV, os.environ[cli.DATA_ENV])
    else:
        monkeypatch.delenv(cli.DATA_ENV, raising=False)
    monkeypatch.setattr(datasets, "DATA_DIR", datasets.DATA_DIR)


def test_use_data_dir_points_the_split_registry_at_the_folder(restore_data_dir, tmp_path):
    folder = cli.use_data_dir(REPO / "data", ["pcdes/test"])
    assert folder == REPO / "data" == datasets.DATA_DIR
    assert os.environ[cli.DATA_ENV] == str(REPO / "data")
    assert len(datasets.load_split("pcdes/validation")) > 0


def test_use_data_dir_without_data_says_what_to_do(restore_data_dir, tmp_path):
    with pytest.raises(cli.DataDirError, match=r"--data_dir.*JAXMOL_DATA_DIR"):
        cli.use_data_dir(tmp_path / "empty", ["pcdes/train", "tsv:x.tsv"])
    # tsv: splits only: no data folder needed.
    assert cli.use_data_dir(tmp_path / "empty", ["tsv:a.tsv", "tsv:b.tsv"]) == tmp_path / "empty"
