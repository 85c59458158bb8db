"""tools/ablate.py: the commands it plans, its table, and one real tiny run (resumable)."""

import importlib.util
import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests import conftest

SCRIPT = conftest.REPO / "tools" / "ablate.py"
TINY = str(conftest.REPO / "configs" / "tiny.py")
# The session's in-process run config (conftest.IN_PROCESS_OVERRIDES) minus the budget, which
# ablate sets itself: the real run below then compiles the programs the session already has.
SMOKE_OVERRIDES = [
    o.removeprefix("--config.") for o in conftest.IN_PROCESS_OVERRIDES if "num_steps" not in o
]


def _load_ablate():
    spec = importlib.util.spec_from_file_location("ablate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablate"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ablate = _load_ablate()


def test_dry_run_prints_every_command_and_trains_nothing(tmp_path, capsys):
    root = tmp_path / "root"
    argv = ["--base_config", TINY, "--variants", "full,grl_dann", "--seeds", "3,4"]
    argv += ["--num_steps", "5", "--workdir_root", str(root), "--dry_run"]
    assert ablate.main([*argv, "--override", "optim.lr=2e-4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [line for line in lines if "train.py" in line]
    assert len(commands) == 4  # 2 variants x 2 seeds, every variant of seed 3 first
    assert ["full" in commands[0], "grl_dann" in commands[1], "seed4" in commands[2]] == [True] * 3
    assert "--config.num_steps=5 --config.seed=3" in commands[0]
    assert "--config.optim.lr=2e-4" in commands[0]
    assert "--config.loss.grl_schedule=dann --config.loss.adv_features" not in commands[1]
    for flag in ("loss.adversary=grl", "loss.adv_weight=1.0", "loss.grl_schedule=dann"):
        assert f"--config.{flag}" in commands[1]
    assert all(line.startswith("# new") for line in lines if line.startswith("# n"))
    assert not root.exists()  # nothing was created


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--override", "loss.grl_schedul=dann"], "unknown config key 'loss.grl_schedul'"),
        (["--override", "loss.adv_features=z"], "config.loss.adv_features='z' is not one of"),
        (["--variants", "full,no_memroy"], "unknown variant(s) ['no_memroy']"),
        (["--override", "num_steps=3"], "--num_steps and --seeds"),
    ],
)
def test_bad_settings_fail_before_training_naming_the_key(tmp_path, capsys, extra, message):
    argv = ["--base_config", TINY, "--variants", "full", "--seeds", "0"]
    assert ablate.main([*argv, "--workdir_root", str(tmp_path), "--dry_run", *extra]) == 2
    assert message in capsys.readouterr().err


def test_every_variant_is_a_valid_config_of_the_quickstart(capsys):
    runs = ablate.plan_runs(
        "configs/quickstart.py", list(ablate.VARIANTS), [0], 300, conftest.REPO / "unused"
    )
    assert [r.variant for r in runs] == list(ablate.VARIANTS)
    assert all(r.test_splits == ("pcdes/test", "chebi20/test") for r in runs)


def test_result_stem_is_the_evaluation_file_stem():
    # jaxmol.evaluation.report.result_stem(split, 'pool'), without importing JAX here
    assert ablate.result_stem("pcdes/test") == "pcdes_test__pool"
    assert ablate.result_stem("tsv:/a/b.tsv") == "tsv__a_b.tsv__pool"


def _result(variant, seed, h1, gap=None):
    block = {"hits@1": h1, "hits@10": 2 * h1, "mrr": 1.5 * h1}
    out = {
        "variant": variant,
        "seed": seed,
        "wall_s": 60.0 * (seed + 1),
        "test_eval_s": {"pcdes/test": 10.0},
        "test": {"pcdes/test": {"t2m": block, "m2t": block}},
        "disc_accuracy": {"final_window_mean": 0.5},
    }
    if gap is not None:
        out["val"] = {"val/modality_gap/gap": gap, "val/mean_mrr": 0.25}
    return out


def test_table_mean_and_sample_std_over_seeds(tmp_path):
    results = [_result("full", 0, 0.10, 0.2), _result("full", 1, 0.20, 0.4)]
    results.append(_result("no_u2u", 0, 0.30))
    table = ablate.aggregate(results, ["full", "no_u2u", "wgan_gp"], ["pcdes/test"])
    full = table["variants"]["full"]["test"]["pcdes/test"]["t2m"]["hits@1"]
    assert full["n"] == 2 and full["mean"] == pytest.approx(0.15)
    assert full["std"] == pytest.approx(math.sqrt(0.005))  # ddof = 1
    single = table["variants"]["no_u2u"]["test"]["pcdes/test"]["m2t"]["mrr"]
    assert single["n"] == 1 and single["std"] is None
    assert single["mean"] == pytest.approx(0.45) and single["values"] == [single["mean"]]
    assert table["variants"]["wgan_gp"]["seeds"] == []
    header = {
        "base_config": "configs/tiny.py",
        "num_steps": 4,
        "seeds": [0, 1],
        "variants": ["full", "no_u2u", "wgan_gp"],
        "splits": ["pcdes/test"],
        "command": "python tools/ablate.py",
        "written": "now",
        "missing": ["wgan_gp seed 0"],
    }
    md_path, json_path = ablate.write_table(tmp_path / "t.md", results, header)
    text = md_path.read_text()
    assert "| full | 2 | 15.00 ± 7.07 | 30.00 ± 14.14 |" in text
    assert "| no_u2u | 1 | 30.00 | 60.00 |" in text
    assert "| wgan_gp | 0 | – |" in text and "- wgan_gp seed 0" in text
    # diagnostics: wall 1.5 ± 0.7 min, eval 10 s, disc. accuracy 50 %, gap 0.300 ± 0.141
    expected = "| full | 2 | 1.5 ± 0.7 | 10 ± 0 | 50.0 ± 0.0 | – | – | 0.300 ± 0.141 | 25.0 ± 0.0 |"
    assert expected in text
    assert json.loads(json_path.read_text())["table"]["variants"]["full"]["seeds"] == [0, 1]


def test_training_diagnostics_from_metrics_records():
    records = [
        {"step": s, "disc_accuracy": a, "grl_scale": s / 10} for s, a in [(1, 0.5), (2, 1.0)]
    ]
    records += [{"step": 1, "disc_accuracy": 0.25}]  # a resumed run logs step 1 again
    records += [{"step": 2, "val/mean_mrr": 0.3, "val/modality_gap/gap": 0.1}]
    out = ablate.training_diagnostics(records)
    assert out["disc_accuracy"]["curve"] == [[1, 0.25], [2, 1.0]]
    assert out["disc_accuracy"]["final_window_mean"] == 1.0
    assert out["disc_accuracy"]["first_step_at_least_0.99"] == 2
    assert out["grl_scale_curve"] == [[1, 0.1], [2, 0.2]]
    assert out["val"] == {"val/mean_mrr": 0.3, "val/modality_gap/gap": 0.1}
    log = "===== ablate: attempt started x\npcdes/test (pool) evaluated in 3.0 s\n"
    log += "===== ablate: attempt started y\nchebi20/test (pool) evaluated in 12.5 s\n"
    assert ablate.eval_seconds(log) == {"chebi20/test": 12.5}


# A stand-in for `python train.py` (given to --python): reads the workdir and the budget from
# its arguments, writes what train.py writes (metrics.jsonl, the end-of-run evaluation, the log
# line), and fails once in a workdir named no_u2c. Tests the tool's loop without JAX.
FAKE_TRAINER = """#!{python}
import json, sys
from pathlib import Path
args = sys.argv[2:]
workdir = Path(args[args.index("--workdir") + 1])
steps = int(next(a for a in args if a.startswith("--config.num_steps=")).split("=")[1])
if workdir.parent.name == "no_u2c" and not (workdir / "failed_once").exists():
    (workdir / "failed_once").write_text("")
    print("data error", flush=True)
    sys.exit(3)
with (workdir / "metrics.jsonl").open("a") as f:
    for step in range(1, steps + 1):
        f.write(json.dumps({{"step": step, "disc_accuracy": 0.5 + 0.1 * step}}) + "\\n")
    f.write(json.dumps({{"step": steps, "val/mean_mrr": 0.2, "val/modality_gap/gap": 0.1}}) + "\\n")
(workdir / "eval").mkdir(exist_ok=True)
block = {{"hits@1": 0.1, "hits@10": 0.4, "mrr": 0.2, "num_queries": 9}}
report = {{"checkpoint_step": steps, "t2m": block, "m2t": block}}
(workdir / "eval" / "pcdes_test__pool.json").write_text(json.dumps(report))
print("I1130 protocols.py:328] pcdes/test (pool) evaluated in 1.5 s", flush=True)
"""


def test_the_loop_reports_failures_resumes_and_never_retrains(tmp_path, capsys):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_TRAINER.format(python=sys.executable))
    fake.chmod(0o755)
    root = tmp_path / "root"
    argv = ["--base_config", TINY, "--variants", "full,no_u2c", "--seeds", "0"]
    argv += ["--num_steps", "3", "--workdir_root", str(root), "--python", str(fake)]

    assert ablate.main(argv) == 1  # no_u2c failed
    out = capsys.readouterr().out
    assert "full seed 0: finished" in out and "no_u2c seed 0: FAILED (exit status 3)" in out
    table = json.loads((root / "ablation.json").read_text())
    assert table["table"]["variants"]["full"]["seeds"] == [0]
    assert table["table"]["variants"]["no_u2c"]["seeds"] == []
    assert table["header"]["missing"] == ["no_u2c seed 0"]
    assert "data error" in (root / "no_u2c" / "seed0" / ablate.LOG_NAME).read_text()
    full = json.loads((root / "full" / "seed0" / ablate.RESULT_NAME).read_text())
    assert full["disc_accuracy"]["first_step_at_least_0.99"] is None
    assert full["test_eval_s"] == {"pcdes/test": 1.5} and full["val_step"] == 3

    assert ablate.main(argv) == 0  # the failed run again; the finished one is not retrained
    out = capsys.readouterr().out
    assert "full seed 0: done before, not retrained" in out
    assert "no_u2c seed 0: finished" in out
    markdown = (root / "ablation.md").read_text()
    for name in ("full", "no_u2c"):
        assert f"| {name} | 1 | 10.00 | 40.00 | 20.00 | 10.00 | 40.00 | 20.00 |" in markdown
    attempts = {
        name: len((root / name / "seed0" / ablate.ATTEMPTS_NAME).read_text().splitlines())
        for name in ("full", "no_u2c")
    }
    assert attempts == {"full": 1, "no_u2c": 2}

    assert ablate.main(argv) == 0  # everything done: nothing runs
    assert capsys.readouterr().out.count("done before, not retrained") == 2
    # the same root with another budget is refused, not mixed
    assert ablate.main([*argv[:-4], "--num_steps", "4", *argv[-4:]]) == 2
    assert "holds a run of other settings" in capsys.readouterr().err


# A stand-in for `python evaluate.py` as well (the tool runs both with --python): writes the
# final-weights result of --split at --step; fails on chebi20/validation.
FAKE_TRAINER_AND_EVALUATOR = """#!{python}
import json, sys
from pathlib import Path
if not sys.argv[1].endswith("evaluate.py"):
    exec(compile(Path(sys.argv[0] + ".train").read_text(), "train", "exec"))
    sys.exit(0)
args = sys.argv[2:]
workdir, split = Path(args[args.index("--workdir") + 1]), args[args.index("--split") + 1]
if split == "chebi20/validation":
    print("evaluation error", flush=True)
    sys.exit(4)
block = {{"hits@1": 0.3, "hits@10": 0.6, "mrr": 0.4, "num_queries": 9}}
report = {{"checkpoint_step": int(args[args.index("--step") + 1]), "t2m": block, "m2t": block}}
stem = split.replace("/", "_") + "__pool"
(workdir / "eval" / (stem + ".json")).write_text(json.dumps(report))
print(split + " (pool) evaluated in 2.5 s", flush=True)
"""


def test_extra_splits_are_evaluated_on_finished_runs_without_retraining(tmp_path, capsys):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_TRAINER_AND_EVALUATOR.format(python=sys.executable))
    fake.chmod(0o755)
    trainer = FAKE_TRAINER.format(python=sys.executable).split("\n", 1)[1]
    (tmp_path / "fake_python.train").write_text(trainer)
    root = tmp_path / "root"
    argv = ["--base_config", TINY, "--variants", "full", "--seeds", "0", "--num_steps", "3"]
    argv += ["--workdir_root", str(root), "--python", str(fake)]
    assert ablate.main(argv) == 0
    run_dir = root / "full" / "seed0"
    first = json.loads((run_dir / ablate.RESULT_NAME).read_text())
    assert list(first["test"]) == ["pcdes/test"]
    capsys.readouterr()

    assert ablate.main([*argv, "--extra_splits", "chebi20/test"]) == 0
    out = capsys.readouterr().out
    assert "done before, not retrained" in out and "evaluating chebi20/test" in out
    result = json.loads((run_dir / ablate.RESULT_NAME).read_text())
    assert list(result["test"]) == ["pcdes/test", "chebi20/test"]
    assert result["test"]["chebi20/test"]["t2m"]["hits@10"] == 0.6
    assert result["test_eval_s"] == {"pcdes/test": 1.5, "chebi20/test": 2.5}
    assert len((run_dir / ablate.ATTEMPTS_NAME).read_text().splitlines()) == 1
    markdown = (root / "ablation.md").read_text()
    assert "## ChEBI-20 test (zero-shot)" in markdown
    assert "| full | 1 | 30.00 | 60.00 | 40.00 | 30.00 | 60.00 | 40.00 |" in markdown

    assert ablate.main([*argv, "--extra_splits", "chebi20/test"]) == 0  # nothing left to do
    assert "evaluating" not in capsys.readouterr().out
    # a failed extra evaluation is reported, the split's cells stay empty, the run is kept
    assert ablate.main([*argv, "--extra_splits", "chebi20/test,chebi20/validation"]) == 1
    table = json.loads((root / "ablation.json").read_text())
    assert "evaluate.py on chebi20/validation exit status 4" in table["header"]["failed"][0]
    cell = table["table"]["variants"]["full"]["test"]["chebi20/validation"]["t2m"]["mrr"]
    assert cell["n"] == 0 and table["table"]["variants"]["full"]["seeds"] == [0]
    assert "evaluation error" in (run_dir / ablate.LOG_NAME).read_text()
    capsys.readouterr()
    # --table_only: the table of what is finished, nothing runs (not even the failed split)
    assert ablate.main([*argv, "--extra_splits", "chebi20/validation", "--table_only"]) == 0
    assert "evaluating" not in capsys.readouterr().out
    from jaxmol.workdir import WorkdirLock

    held = WorkdirLock(root)  # an ablation running on the root does not stop a table
    try:
        assert ablate.main([*argv, "--seeds", "0,1", "--table_only"]) == 0
    finally:
        held.release()
    assert "full seed 1: not finished" in capsys.readouterr().out
    assert not (root / "full" / "seed1").exists()
    header = json.loads((root / "ablation.json").read_text())["header"]
    assert header["missing"] == ["full seed 1"] and header["failed"] == []
    # a split name that does not exist fails at start
    assert ablate.main([*argv, "--extra_splits", "chebi20/tset"]) == 2
    assert "no split 'chebi20/tset'" in capsys.readouterr().err


# A stand-in trainer that waits to be stopped: counts the signals it gets, exits 0 on SIGTERM
# (as train.py after saving a checkpoint).
WAITING_TRAINER = """#!{python}
import signal, sys, time
from pathlib import Path
args = sys.argv[2:]
workdir = Path(args[args.index("--workdir") + 1])
got = []
def on_signal(signum, frame):
    got.append(signum)
    (workdir / "signals").write_text(" ".join(map(str, got)))
    if signum == signal.SIGTERM:
        sys.exit(0)
signal.signal(signal.SIGTERM, on_signal)
(workdir / "started").write_text("")
time.sleep(60)
"""


def test_sigterm_is_passed_on_once_and_the_tool_stops(tmp_path):
    fake = tmp_path / "fake_python"
    fake.write_text(WAITING_TRAINER.format(python=sys.executable))
    fake.chmod(0o755)
    root = tmp_path / "root"
    command = [sys.executable, str(SCRIPT), "--base_config", TINY, "--variants", "full,no_u2u"]
    command += ["--seeds", "0", "--num_steps", "3", "--workdir_root", str(root)]
    tool = subprocess.Popen([*command, "--python", str(fake)], stdout=subprocess.PIPE, text=True)
    started = root / "full" / "seed0" / "started"
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    tool.send_signal(signal.SIGTERM)
    out, _ = tool.communicate(timeout=60)
    assert tool.returncode == 128 + signal.SIGTERM, out
    assert (root / "full" / "seed0" / "signals").read_text() == str(int(signal.SIGTERM))
    assert not (root / "no_u2u").exists()  # nothing else started
    header = json.loads((root / "ablation.json").read_text())["header"]
    assert header["missing"] == ["full seed 0", "no_u2u seed 0"] and header["failed"] == []


@pytest.mark.slow
def test_a_half_finished_run_resumes_then_nothing_is_retrained(trained_run, tmp_path):
    """One real tiny run through the tool: a copy of the session's run cut back to step 2 of 4
    (half-finished) is resumed by train.py in a subprocess (same programs as the session's:
    compiled ones come from the cache), its table has finite numbers; the same command again
    trains nothing. (Two or more variants are planned by the dry-run test above.)"""
    source, _ = trained_run
    root = tmp_path / "ablation"
    run_dir = root / "full" / "seed0"
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns(".lock"))
    for step in ("3", "4"):
        shutil.rmtree(run_dir / "checkpoints" / step)
    shutil.rmtree(run_dir / "eval")  # no stale end-of-run evaluation
    command = [sys.executable, str(SCRIPT), "--base_config", TINY, "--variants", "full"]
    command += ["--seeds", "0", "--num_steps", str(conftest.IN_PROCESS_STEPS)]
    command += ["--workdir_root", str(root), "--out", str(tmp_path / "table.md")]
    for override in SMOKE_OVERRIDES:
        command += ["--override", override]
    env = conftest.subprocess_env()
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "resumed from step 2" in (run_dir / ablate.LOG_NAME).read_text()
    result = json.loads((run_dir / ablate.RESULT_NAME).read_text())
    table = json.loads((tmp_path / "table.json").read_text())
    assert list(table["table"]["variants"]) == ["full"]
    for direction in ("t2m", "m2t"):
        for metric in ("hits@1", "hits@10", "mrr"):
            stats = table["table"]["variants"]["full"]["test"]["pcdes/test"][direction][metric]
            assert stats["n"] == 1 and math.isfinite(stats["mean"])
    markdown = (tmp_path / "table.md").read_text()
    assert sum(line.startswith("| full | 1 |") for line in markdown.splitlines()) == 2
    # what the run logged: discriminator accuracy, reversal scale, validation modality gap
    assert result["attempts"] == 1 and result["wall_s"] > 0
    assert [s for s, _ in result["disc_accuracy"]["curve"]] == [1, 2, 3, 4]
    assert result["grl_scale_curve"][-1] == [4, 1.0]
    assert math.isfinite(result["val"]["val/modality_gap/gap"]) and result["val_step"] == 4
    assert "pcdes/test" in result["test_eval_s"]

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "done before, not retrained" in second.stdout
    assert len((run_dir / ablate.ATTEMPTS_NAME).read_text().splitlines()) == 1
    assert json.loads((run_dir / ablate.RESULT_NAME).read_text()) == result
