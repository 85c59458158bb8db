"""Faults: a damaged newest checkpoint, two runs on one workdir, preemption signals, one-line
errors with documented exit statuses, a full disk, and fuzzed input."""

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import tiny
from jaxmol import cli, train_lib
from jaxmol.checkpointing import Checkpointer, CheckpointError
from jaxmol.config import ConfigError
from jaxmol.data import batching
from jaxmol.data.datasets import DataError, read_tsv
from jaxmol.data.featurize import InvalidSmilesError, featurize_split, smiles_to_graph
from jaxmol.data.tokenize import load_tokenizer, tokenize_texts
from jaxmol.evaluation import restore_for_eval
from jaxmol.workdir import WorkdirLock, WorkdirLockedError
from tests import conftest

REPO = Path(__file__).resolve().parents[1]


_env = conftest.subprocess_env
_train_command = conftest.train_command


def _checkpoint_steps(workdir):
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _quiet_config(num_steps=8):
    config = tiny.get_config()
    config.num_steps = num_steps
    config.checkpoint_every_steps = 4
    config.data.val_split = ""
    config.data.test_splits = ()
    return config


def _leaves_close(a, b, atol):
    for (path, x), y in zip(
        jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, err_msg=str(path))


# ----------------------------------------------------------------------------------------------
# A damaged newest checkpoint.


def test_a_damaged_newest_checkpoint_falls_back_and_resumes_to_the_same_parameters(
    trained_run, tmp_path
):
    source, _ = trained_run
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir, ignore=shutil.ignore_patterns(".lock"))
    assert _checkpoint_steps(workdir) == [1, 2, 3, 4]
    _, uninterrupted, _, _ = restore_for_eval(workdir, "latest")
    for path in (workdir / "checkpoints" / "4").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")  # every file of step 4 destroyed

    # Evaluation: 'latest' falls back to step 3 with a warning; an explicit 4 is an error.
    _, _, _, step = restore_for_eval(workdir, "latest")
    assert step == 3
    with pytest.raises(CheckpointError, match="step 4"):
        restore_for_eval(workdir, 4)

    # Training: resumes from step 3, moves step 4 aside (kept), and trains step 4 again.
    config = conftest.in_process_config()
    config.data.test_splits = ()
    train_lib.train_and_evaluate(config, str(workdir))
    assert (workdir / "damaged_checkpoints" / "4").is_dir()
    assert "step 4" in (workdir / "damaged_checkpoints" / "4.reason.txt").read_text()
    _, resumed, _, step = restore_for_eval(workdir, "latest")
    assert step == 4
    _leaves_close(resumed, uninterrupted, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# One run per workdir.


def test_a_second_run_on_a_locked_workdir_fails_naming_the_holder(tmp_path):
    lock = WorkdirLock(tmp_path)
    try:
        with pytest.raises(WorkdirLockedError, match=rf"pid {os.getpid()} on host "):
            train_lib.setup(_quiet_config(), tmp_path)
        done = subprocess.run(
            _train_command(tmp_path),
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert done.returncode == cli.EXIT_LOCKED
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("train: error: ") and f"pid {os.getpid()}" in lines[-1]
        assert "Traceback" not in done.stderr
    finally:
        lock.release()
    WorkdirLock(tmp_path).release()  # free again once released


def test_the_lock_of_a_killed_process_is_released_by_the_os(tmp_path):
    code = (
        "import os, signal\n"
        "from jaxmol.workdir import WorkdirLock\n"
        f"WorkdirLock({str(tmp_path)!r})\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=_env(1), timeout=60)
    assert done.returncode == -signal.SIGKILL
    WorkdirLock(tmp_path).release()  # no stale lock


# ----------------------------------------------------------------------------------------------
# Preemption: SIGTERM saves once and exits 0; a second signal exits at once.


def test_sigterm_finishes_the_step_saves_once_and_stops(tmp_path, monkeypatch):
    """SIGTERM arrives during step 2 (sent by the step itself): the loop finishes the step,
    saves a checkpoint at step 2 and raises TrainingInterrupted (the CLI exits 0)."""
    compile_step = train_lib.compile_train_step

    def with_sigterm_in_step_2(*args, **kwargs):
        step_fn = compile_step(*args, **kwargs)
        calls = []

        def run(state, batch):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return step_fn(state, batch)

        return run

    monkeypatch.setattr(train_lib, "compile_train_step", with_sigterm_in_step_2)
    config = _quiet_config(num_steps=8)
    with pytest.raises(train_lib.TrainingInterrupted) as stopped:
        train_lib.train_and_evaluate(config, str(tmp_path))
    assert stopped.value.signum == signal.SIGTERM and stopped.value.step == 2
    assert _checkpoint_steps(tmp_path) == [2]
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored
    WorkdirLock(tmp_path).release()  # the run released its lock


SECOND_SIGNAL_SCRIPT = """
import os, signal, sys
from configs import tiny
from jaxmol import checkpointing, train_lib

config = tiny.get_config()
config.num_steps = 8
config.checkpoint_every_steps = 2
config.data.val_split = ""
config.data.test_splits = ()
compile_step = train_lib.compile_train_step

def with_sigterm_in_step_3(*args, **kwargs):
    step_fn = compile_step(*args, **kwargs)
    calls = []
    def run(state, batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the first signal
        return step_fn(state, batch)
    return run

save = checkpointing.Checkpointer.save
def save_with_second_signal(self, step, *args, **kwargs):
    if step == 3:  # the interrupted run's own save: a second signal arrives now
        self.wait()  # (step 2's asynchronous save is finished: it must survive)
        os.kill(os.getpid(), signal.SIGTERM)
    return save(self, step, *args, **kwargs)

train_lib.compile_train_step = with_sigterm_in_step_3
checkpointing.Checkpointer.save = save_with_second_signal
train_lib.train_and_evaluate(config, sys.argv[1])
"""


@pytest.mark.slow
def test_a_second_signal_exits_at_once_and_keeps_the_last_checkpoint(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", SECOND_SIGNAL_SCRIPT, str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert "SIGTERM again: exiting without saving" in done.stderr
    assert _checkpoint_steps(tmp_path) == [2]  # step 3 was never written
    _, _, _, step = restore_for_eval(tmp_path, "latest")  # and step 2 is intact
    assert step == 2


# ----------------------------------------------------------------------------------------------
# Expected failures: one line, a documented status.


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ConfigError("config.batch_size must be > 0"), cli.EXIT_CONFIG),
        (DataError("data/x.tsv:3: empty SMILES"), cli.EXIT_DATA),
        (InvalidSmilesError("RDKit cannot parse SMILES 'C1CC('"), cli.EXIT_DATA),
        (CheckpointError("step 8 is corrupted"), cli.EXIT_CHECKPOINT),
        (train_lib.NonFiniteLossError("loss is nan at step 7"), cli.EXIT_NONFINITE),
        (WorkdirLockedError("in use by pid 1"), cli.EXIT_LOCKED),
        (train_lib.TrainingInterrupted(signal.SIGINT, 4), cli.EXIT_CTRL_C),
        (train_lib.TrainingInterrupted(signal.SIGTERM, 4), 0),
    ],
)
def test_expected_failures_are_one_line_with_their_status(capsys, monkeypatch, error, status):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)

    def body():
        raise error

    with pytest.raises(SystemExit) as exited:
        cli.run_guarded("train", body)
    assert exited.value.code == status
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: ") and str(error) in lines[0]


def test_a_traceback_on_request_and_for_unexpected_errors(capsys, monkeypatch):
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(SystemExit):
        cli.run_guarded("train", lambda: (_ for _ in ()).throw(DataError("bad row")))
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback (exit status 1)
        cli.run_guarded("train", lambda: 1 / 0)


# ----------------------------------------------------------------------------------------------
# A full disk: the write fails naming the path, the previous checkpoint stays intact.


def test_a_failed_checkpoint_write_names_the_path_and_keeps_the_previous_one(tmp_path):
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        print(f"skipped: cannot mount a small tmpfs here: {mounted.stderr.strip()}")
        pytest.skip("no small tmpfs (mount needs root)")
    try:
        checkpointer = Checkpointer(mount_point / "checkpoints", keep=3, async_save=False)
        small = {"w": np.ones(16, np.float32)}
        checkpointer.save(1, small, data_position={}, config={}, metrics={})
        checkpointer.wait()
        with pytest.raises(CheckpointError, match=str(mount_point / "checkpoints")):
            # 4 MB of random (incompressible) floats on a 256 kB disk.
            big = {"w": np.random.default_rng(0).random(1_000_000, np.float32)}
            checkpointer.save(2, big, data_position={}, config={}, metrics={})
            checkpointer.wait()
        reader = Checkpointer(mount_point / "checkpoints", read_only=True, async_save=False)
        assert reader.all_steps() == [1]
        restored = reader.restore_state(1, {"w": np.zeros(16, np.float32)})
        np.testing.assert_array_equal(restored["w"], small["w"])
        reader.close()
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


# ----------------------------------------------------------------------------------------------
# Fuzzed input: it works, or it fails with the documented error naming the row.

VALID = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "[Na+].[Cl-]", "OC(=O)C=CC(=O)O", "C1CCCCC1"]


def _fuzzed_smiles(count: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    alphabet = "CNOSPFIBrcl()[]=#@+-123456789%/\\.*Hn "
    out: list = [None, b"CCO", 42, "", "   ", "C" * 5000, "c1" * 300, "\x00CCO", "C1CC("]
    while len(out) < count:
        base = rng.choice(VALID)
        kind = rng.randrange(4)
        if kind == 0:  # point mutation
            i = rng.randrange(len(base))
            out.append(base[:i] + rng.choice(alphabet) + base[i + 1 :])
        elif kind == 1:  # truncation
            out.append(base[: rng.randrange(len(base))])
        elif kind == 2:  # garbage
            out.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30))))
        else:  # repeats
            out.append(base * rng.randrange(2, 40))
    return out


def test_fuzzed_smiles_give_a_graph_or_invalid_smiles_error():
    graphs = errors = 0
    for smiles in _fuzzed_smiles(400):
        try:
            graph = smiles_to_graph(smiles)
        except InvalidSmilesError:
            errors += 1
            continue
        graphs += 1
        assert graph.atom_features.shape[0] > 0
        assert graph.senders.max(initial=-1) < graph.atom_features.shape[0]
    assert graphs > 50 and errors > 50  # both outcomes were exercised


def test_fuzzed_smiles_through_the_cached_split_featuriser(tmp_path):
    smiles = [s if isinstance(s, str) else str(s) for s in _fuzzed_smiles(200, seed=1)]
    ids = [f"m{i}" for i in range(len(smiles))]
    split = featurize_split(ids, smiles, on_invalid="skip", cache_dir=tmp_path)
    expected_failures = []
    for identifier, smi in zip(ids, smiles, strict=True):
        try:
            smiles_to_graph(smi)
        except InvalidSmilesError:
            expected_failures.append(identifier)
    assert [f[0] for f in split.failures] == expected_failures
    assert int(split.valid.sum()) == len(smiles) - len(expected_failures)
    again = featurize_split(ids, smiles, on_invalid="skip", cache_dir=tmp_path)
    assert again.cache_hit and [f[0] for f in again.failures] == expected_failures
    with pytest.raises(InvalidSmilesError, match=expected_failures[0]):
        featurize_split(ids, smiles, on_invalid="error", cache_dir=tmp_path)


def test_odd_texts_tokenise_and_batch_or_fail_naming_the_row():
    tokenizer = load_tokenizer(max_length=64)
    odd = [
        "x" * 100_000,  # 100 kB
        "a\x00b\x07c\x1bd control characters",
        "mixed scripts: 水 вода ماء H₂O α-D-glucose",
        "tab\tand\nnewline",
    ]
    tokens = tokenize_texts(tokenizer, odd, ids=[f"t{i}" for i in range(len(odd))])
    assert (tokens.lengths <= 64).all() and (tokens.lengths >= 3).all()
    _, mask = batching.pad_texts(tokens, np.array([0, 1, 2, 3, -1]), 64)
    assert mask.sum(1).tolist() == [*tokens.lengths.tolist(), 0]
    for empty in ("", "   \t\n"):
        with pytest.raises(ValueError, match="empty text at id 'bad'"):
            tokenize_texts(tokenizer, ["fine", empty], ids=["ok", "bad"])


def _write(path: Path, text: str, encoding="utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def test_tsv_variants_work_or_fail_naming_the_line(tmp_path):
    columns = ("id", "smiles", "description")
    rows = "id\tsmiles\tdescription\na\tCCO\tethanol\nb\tC1CCCCC1\tcyclohexane\n"
    for name, text, encoding in [
        ("bom", rows, "utf-8-sig"),
        ("crlf", rows.replace("\n", "\r\n"), "utf-8"),
        ("quoted", rows.replace("ethanol", '"ethanol, an alcohol"'), "utf-8"),
    ]:
        data = read_tsv(
            _write(tmp_path / f"{name}.tsv", text, encoding), columns=columns, name=name
        )
        assert data.ids == ("a", "b"), name
        assert data.smiles == ("CCO", "C1CCCCC1"), name
        assert all("\r" not in t and "\ufeff" not in t for t in data.texts), name
    duplicate = rows + "a\tCC\tagain\n"
    with pytest.raises(DataError, match=r"dup.tsv:4: duplicate id 'a' \(first on line 2\)"):
        read_tsv(_write(tmp_path / "dup.tsv", duplicate), columns=columns, name="dup")
    with pytest.raises(DataError, match=r"missing.tsv:1: bad header"):
        read_tsv(
            _write(tmp_path / "missing.tsv", "id\tsmiles\na\tCCO\n"), columns=columns, name="m"
        )
    with pytest.raises(DataError, match=r"short.tsv:4: 2 tab-separated fields"):
        short = rows + "c\tCCC\n"
        read_tsv(
            _write(tmp_path / "short.tsv", short[: short.rindex("\n")]), columns=columns, name="s"
        )
