"""Ablation of CMTMR's parts: train every variant at one budget for each seed, one run at a time,
evaluate PCdes test and ChEBI-20 test, and write one table (Markdown + JSON), mean ± spread.

    python tools/ablate.py --num_steps 300 --seeds 0,1 --workdir_root runs/ablation
    python tools/ablate.py --variants full,no_u2u --seeds 0 --dry_run   # print the commands
    python tools/ablate.py --list_variants
    python tools/ablate.py ... --extra_splits chebi20/test   # also evaluate finished runs on it
    python tools/ablate.py ... --table_only    # the table of what is finished; runs nothing

Every run is `python train.py --config BASE --workdir ROOT/<variant>/seed<seed> --config.k=v ...`
in a subprocess, its output in ``ROOT/<variant>/seed<seed>/train.log``; runs never overlap (a
lock on ROOT). train.py evaluates the data.test_splits of the base config (quickstart: PCdes test
and ChEBI-20 test) with the pool protocol, both directions, tie-aware, on the final weights; this
tool reads those results (``eval/*.json``), ``metrics.jsonl`` (discriminator accuracy over
training, the validation modality gap) and the log (seconds spent on the test evaluation).

Extra splits (``--extra_splits``): evaluated after training by ``evaluate.py`` on the run's final
checkpoint (pool protocol, ``--step`` = the budget), also for runs finished before, so a split can
be added to a finished ablation without training anything again; they are not part of a run's
settings. A failed extra evaluation is reported and leaves that split's cells empty.

Resuming: a run whose ``ablation_result.json`` exists is not trained again; an unfinished run
is started again with the same command, which resumes from its last checkpoint (train.py's own
resume). A run directory made with other settings (base config, budget, overrides) is refused
rather than mixed: use another --workdir_root. Ctrl-C / SIGTERM is passed on to the running
train.py once (it saves a checkpoint and stops), then the table of what is finished is written.

Table: for every variant, the mean over its finished seeds and, with two or more, the sample
standard deviation (ddof = 1), in %. The variants are config overrides over the base config;
``--list_variants`` prints them. The JSON holds every run's numbers.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python tools/ablate.py` from a checkout
    sys.path.insert(0, str(REPO))

RESULT_NAME = "ablation_result.json"
RUN_SPEC_NAME = "ablation_run.json"
ATTEMPTS_NAME = "ablation_attempts.jsonl"
LOG_NAME = "train.log"
HEADLINE_METRICS = ("hits@1", "hits@10", "mrr")
DIRECTIONS = ("t2m", "m2t")
SPLIT_TITLES = {"pcdes/test": "PCdes test", "chebi20/test": "ChEBI-20 test (zero-shot)"}
# Discriminator accuracy is summarised over the last this-fraction of the logged steps.
FINAL_WINDOW = 0.1
# train.py's log line for each evaluated split (jaxmol.evaluation.protocols.evaluate_split).
_EVAL_SECONDS = re.compile(r"(\S+) \(pool\) evaluated in ([0-9.]+) s")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the table.

    Attributes:
      description: what the variant tests, in words.
      overrides: {dotted config key: value} applied over the base config.
    """

    description: str
    overrides: Mapping[str, Any]


# The keys are those of configs/default.py (checked against the base config at start).
VARIANTS: dict[str, Variant] = {
    "full": Variant("the base config as it is (memory projector, triplet + u2u + u2c, GRL)", {}),
    "no_memory": Variant(
        "no memory-bank projector: masked mean pooling", {"model.projector": "pool"}
    ),
    "no_u2u": Variant("no uni-modal/uni-modal KL term", {"loss.u2u_weight": 0.0}),
    "no_u2c": Variant("no uni-modal/cross-modal KL term", {"loss.u2c_weight": 0.0}),
    "no_adversary": Variant("no adversary at all", {"loss.adversary": "none"}),
    "info_nce": Variant(
        "InfoNCE instead of the triplet, no second-order terms",
        {"loss.first_order": "info_nce", "loss.u2u_weight": 0.0, "loss.u2c_weight": 0.0},
    ),
    "info_nce_second_order": Variant(
        "InfoNCE instead of the triplet, with u2u and u2c", {"loss.first_order": "info_nce"}
    ),
    "wgan_gp": Variant(
        "the official WGAN-GP critic (generator term on molecules, weight loss.adv_weight)",
        {"loss.adversary": "wgan_gp"},
    ),
    "gcn_mol2vec": Variant(
        "the official molecule tower: GCN on mol2vec rows", {"model.mol_encoder": "gcn_mol2vec"}
    ),
    "gin": Variant(
        "our GIN on RDKit atom and bond features (the quickstart's tower before it took the GCN)",
        {"model.mol_encoder": "gin"},
    ),
    "grl_w1": Variant(
        "GRL at weight 1 (constant reversal scale): the weight alone",
        {"loss.adversary": "grl", "loss.adv_weight": 1.0},
    ),
    "grl_dann": Variant(
        "GRL at weight 1 with the DANN ramp of the reversal scale (0 -> 1)",
        {"loss.adversary": "grl", "loss.adv_weight": 1.0, "loss.grl_schedule": "dann"},
    ),
    "grl_dann_w0.1": Variant(
        "GRL at weight 0.1 with the DANN ramp of the reversal scale (0 -> 1)",
        {"loss.adversary": "grl", "loss.adv_weight": 0.1, "loss.grl_schedule": "dann"},
    ),
    "grl_dann_smooth": Variant(
        "grl_dann with discriminator label smoothing 0.1",
        {
            "loss.adversary": "grl",
            "loss.adv_weight": 1.0,
            "loss.grl_schedule": "dann",
            "loss.disc_label_smoothing": 0.1,
        },
    ),
    "grl_dann_embeddings": Variant(
        "grl_dann with the discriminator on the final embeddings (not the pre-memory features)",
        {
            "loss.adversary": "grl",
            "loss.adv_weight": 1.0,
            "loss.grl_schedule": "dann",
            "loss.adv_features": "embeddings",
        },
    ),
}


class AblationError(RuntimeError):
    """A setting this tool refuses (unknown variant or key, a run directory of other settings)."""


# ----------------------------------------------------------------------------------------------
# Commands.


def flag_value(value: Any) -> str:
    """A config value as train.py's ``--config.key=VALUE`` text (what ml_collections parses)."""
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return str(value)


def parse_override(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (``--override``) -> (key, value text)."""
    key, sep, value = text.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not sep or not key:
        raise AblationError(f"--override {text!r}: expected KEY=VALUE, e.g. optim.lr=2e-4")
    return key, value


def _lookup(config, dotted: str):
    """(parent ConfigDict, last name) of an existing dotted key; AblationError if missing."""
    parent = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        if part not in parent or not hasattr(parent[part], "keys"):
            raise AblationError(f"unknown config key {dotted!r}")
        parent = parent[part]
    if parts[-1] not in parent:
        raise AblationError(f"unknown config key {dotted!r}")
    return parent, parts[-1]


def _typed(current: Any, text: str) -> Any:
    """`text` as the type of the config's current value (for checking before training)."""
    if isinstance(current, str):
        return text
    if isinstance(current, bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"expected True or False, got {text!r}")
        return text.lower() == "true"
    value = ast.literal_eval(text)
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    return value


def resolved_config(base_config: str, overrides: Mapping[str, Any], texts: Mapping[str, str]):
    """The base config with the variant's typed `overrides` and the command-line `texts`,
    validated by `jaxmol.config.validate_config` (raises naming the key)."""
    from jaxmol import cli
    from jaxmol.config import validate_config

    config = cli.load_config_file(base_config)
    for key, value in overrides.items():
        parent, name = _lookup(config, key)
        parent[name] = value
    for key, text in texts.items():
        parent, name = _lookup(config, key)
        try:
            parent[name] = _typed(parent[name], text)
        except (ValueError, SyntaxError, TypeError) as error:
            raise AblationError(f"--override {key}={text}: {error}") from error
    validate_config(config)
    return config


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the ablation.

    Attributes:
      variant: name in `VARIANTS`.
      seed: config.seed.
      workdir: the run's train.py workdir.
      flags: the train.py config overrides, ``--config.key=value`` each.
      config_path: absolute path of the base config file.
      test_splits: the splits train.py evaluates at the end.
      num_steps: the budget.
      extra_splits: splits evaluate.py evaluates afterwards on the final checkpoint.
    """

    variant: str
    seed: int
    workdir: Path
    flags: tuple[str, ...]
    config_path: str
    test_splits: tuple[str, ...]
    num_steps: int
    extra_splits: tuple[str, ...] = ()

    @property
    def splits(self) -> tuple[str, ...]:
        """Every split of the run's results: train.py's, then the extra ones."""
        return (*self.test_splits, *(s for s in self.extra_splits if s not in self.test_splits))

    def command(self, python: str = sys.executable) -> list[str]:
        return [
            python,
            str(REPO / "train.py"),
            "--config",
            self.config_path,
            "--workdir",
            str(self.workdir),
            *self.flags,
        ]

    def evaluate_command(self, split: str, python: str = sys.executable) -> list[str]:
        """evaluate.py on the final checkpoint (``--step`` = the budget), pool protocol."""
        return [
            python,
            str(REPO / "evaluate.py"),
            "--workdir",
            str(self.workdir),
            "--split",
            split,
            "--protocol",
            "pool",
            "--step",
            str(self.num_steps),
        ]

    def spec(self) -> dict:
        """What must not change between the attempts of this run (the interpreter may)."""
        return {
            "variant": self.variant,
            "seed": self.seed,
            "config": self.config_path,
            "flags": list(self.flags),
        }


def plan_runs(
    base_config: str,
    variants: Sequence[str],
    seeds: Sequence[int],
    num_steps: int,
    workdir_root: Path,
    extra: Sequence[tuple[str, str]] = (),
    extra_splits: Sequence[str] = (),
) -> list[Run]:
    """Every (variant, seed) run, in the order they train (seed-major: every variant of the
    first seed before the second seed, so a partial ablation covers all variants).

    Every variant's config is built and validated now, before anything trains.
    """
    from jaxmol import cli

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise AblationError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if num_steps <= 0:
        raise AblationError(f"--num_steps must be > 0, got {num_steps}")
    from jaxmol.data.datasets import SPLIT_NAMES  # the split registry (standard library only)

    for split in extra_splits:
        if not split.startswith("tsv:") and split not in SPLIT_NAMES:
            raise AblationError(
                f"--extra_splits: no split {split!r}; known: {', '.join(SPLIT_NAMES)}, or tsv:PATH"
            )
    config_path = os.path.abspath(cli.resolve_config_path(base_config))
    texts = dict(extra)
    if "num_steps" in texts or "seed" in texts:
        raise AblationError("set the budget and the seeds with --num_steps and --seeds")
    configs = {}
    for name in variants:
        overrides = {**VARIANTS[name].overrides, "num_steps": num_steps}
        try:
            configs[name] = resolved_config(config_path, overrides, texts)
        except AblationError as error:
            raise AblationError(f"variant {name!r}: {error}") from error
        except ValueError as error:  # jaxmol.config.ConfigError names the key
            raise AblationError(f"variant {name!r}: {error}") from error
    runs = []
    for seed in seeds:
        for name in variants:
            flags = [f"--config.num_steps={num_steps}", f"--config.seed={seed}"]
            flags += [f"--config.{k}={flag_value(v)}" for k, v in VARIANTS[name].overrides.items()]
            flags += [f"--config.{k}={v}" for k, v in extra]
            runs.append(
                Run(
                    variant=name,
                    seed=int(seed),
                    workdir=(workdir_root / name / f"seed{seed}").absolute(),
                    flags=tuple(flags),
                    config_path=config_path,
                    test_splits=tuple(configs[name].data.test_splits),
                    num_steps=num_steps,
                    extra_splits=tuple(extra_splits),
                )
            )
    return runs


# ----------------------------------------------------------------------------------------------
# Running.


def _read_json(path: Path) -> Any:
    with path.open() as f:
        return json.load(f)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


def run_status(run: Run) -> str:
    """'done' (result written), 'resume' (started before) or 'new'. Raises AblationError when
    the run directory was made by other settings."""
    spec_path = run.workdir / RUN_SPEC_NAME
    if spec_path.exists():
        recorded = _read_json(spec_path)
        if recorded != run.spec():
            raise AblationError(
                f"{run.workdir} holds a run of other settings ({recorded['flags']} with "
                f"{recorded['config']}, now {list(run.flags)} with {run.config_path}); use "
                "another --workdir_root"
            )
    if (run.workdir / RESULT_NAME).exists():
        return "done"
    return "resume" if spec_path.exists() else "new"


def _end_with_parent_hook():
    """A `preexec_fn` that makes the child get SIGTERM when this tool dies (even by SIGKILL),
    or None: off Linux, and in a multithreaded process (a test process that loaded JAX, whose
    threads are native), where running Python code between fork and exec is not safe. The tool
    itself starts no thread and never imports JAX. The C function is looked up here, in the
    parent, so the child imports nothing."""
    if threading.active_count() > 1 or "jax" in sys.modules:
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def end_with_parent() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return end_with_parent


def _run_logged(
    command: Sequence[str], workdir: Path, title: str
) -> tuple[int, float, int | None, str]:
    """Runs `command` once in `workdir`'s log (appended, after a ``===== ablate: TITLE`` line).

    The child runs in its own session, so a Ctrl-C at the terminal reaches this tool only,
    which passes each SIGINT / SIGTERM on to the child exactly once (train.py saves a
    checkpoint on the first and leaves at once on a second).

    Returns:
      (return code, wall seconds, the first signal passed on or None, start time).
    """
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    received: list[int] = []
    with (workdir / LOG_NAME).open("a") as log:
        log.write(f"\n===== ablate: {title} {started}\n===== {shlex.join(command)}\n")
        log.flush()
        start = time.monotonic()
        child = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
            preexec_fn=_end_with_parent_hook(),
        )

        def pass_on(signum, frame):
            received.append(signum)
            child.send_signal(signum)

        previous = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            returncode = child.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        wall = time.monotonic() - start
        log.write(f"\n===== ablate: exit status {returncode} after {wall:.1f} s\n")
    return returncode, wall, (received[0] if received else None), started


def train_once(run: Run, python: str) -> tuple[int, float, int | None]:
    """Runs train.py for `run` once, output appended to its log (`_run_logged`).

    Returns:
      (return code, wall seconds, the first signal passed on or None).
    """
    run.workdir.mkdir(parents=True, exist_ok=True)
    _write_json(run.workdir / RUN_SPEC_NAME, run.spec())
    returncode, wall, signum, started = _run_logged(
        run.command(python), run.workdir, "attempt started"
    )
    received = [] if signum is None else [signum]
    with (run.workdir / ATTEMPTS_NAME).open("a") as f:
        f.write(
            json.dumps(
                {"started": started, "wall_s": wall, "returncode": returncode, "signal": received}
            )
            + "\n"
        )
    return returncode, wall, signum


def _final_result(run: Run, split: str) -> dict | None:
    """The run's pool report of `split` on the final weights, or None when there is none."""
    path = run.workdir / "eval" / f"{result_stem(split)}.json"
    if not path.exists():
        return None
    report = _read_json(path)
    return report if int(report.get("checkpoint_step", -1)) == run.num_steps else None


def evaluate_extra_splits(run: Run, python: str) -> tuple[list[str], int | None]:
    """Runs evaluate.py on the final checkpoint for each extra split without a final result.

    Returns:
      (failures, one line each; the first signal passed on or None: then nothing more runs).
    """
    failures = []
    for split in run.extra_splits:
        if split in run.test_splits or _final_result(run, split) is not None:
            continue
        returncode, _, signum, _ = _run_logged(
            run.evaluate_command(split, python), run.workdir, f"evaluate {split}"
        )
        if signum is not None:
            return failures, signum
        if returncode != 0 or _final_result(run, split) is None:
            failures.append(
                f"{run.variant} seed {run.seed}: evaluate.py on {split} exit status "
                f"{returncode}, see {run.workdir / LOG_NAME}"
            )
    return failures, None


def result_stem(split_name: str) -> str:
    """File stem of train.py's pool result (`jaxmol.evaluation.report.result_stem`)."""
    return f"{split_name.replace('/', '_').replace(':', '_')}__pool"


def _metrics_records(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            records.append(json.loads(line))
    return records


def _curve(records: Sequence[dict], key: str) -> list[list[float]]:
    """[[step, value], ...] of `key`, one per step (the last record wins: a resumed run logs
    its steps after the checkpoint again)."""
    by_step = {int(r["step"]): float(r[key]) for r in records if key in r}
    return [[step, by_step[step]] for step in sorted(by_step)]


def training_diagnostics(records: Sequence[dict]) -> dict:
    """Adversary and validation summaries from metrics.jsonl records.

    Returns:
      {'disc_accuracy': {'curve', 'final_window_mean', 'first_step_at_least_0.99'} (GRL runs),
      'grl_scale_curve', 'critic_loss_curve', 'adversarial_curve', 'val': the last
      validation record's 'val/...' values (mean MRR, modality gap), 'val_step'}.
    """
    out: dict[str, Any] = {}
    accuracy = _curve(records, "disc_accuracy")
    if accuracy:
        window = max(1, math.ceil(FINAL_WINDOW * len(accuracy)))
        out["disc_accuracy"] = {
            "curve": accuracy,
            "final_window_mean": sum(v for _, v in accuracy[-window:]) / window,
            "final_window_steps": [accuracy[-window][0], accuracy[-1][0]],
            "first_step_at_least_0.99": next((s for s, v in accuracy if v >= 0.99), None),
        }
    for key in ("grl_scale", "critic_loss", "adversarial"):
        curve = _curve(records, key)
        if curve:
            out[f"{key}_curve"] = curve
    validations = [r for r in records if any(k.startswith("val/") for k in r)]
    if validations:
        last = max(validations, key=lambda r: int(r["step"]))
        out["val_step"] = int(last["step"])
        out["val"] = {k: v for k, v in last.items() if k.startswith("val/")}
    return out


def eval_seconds(log_text: str) -> dict[str, float]:
    """{split: seconds} of the test evaluations in the last attempt of a log."""
    last = log_text.rsplit("===== ablate: attempt started", 1)[-1]  # and the extra splits after
    return {split: float(s) for split, s in _EVAL_SECONDS.findall(last)}


def collect_result(run: Run) -> dict | None:
    """The run's result from its files, or None when it has not finished (no final-weights
    evaluation of every split train.py evaluates). Extra splits are included where their
    final-weights result exists."""
    test = {}
    for split in run.splits:
        report = _final_result(run, split)
        if report is None:
            if split in run.test_splits:
                return None
            continue
        test[split] = {
            direction: {
                key: report[direction][key]
                for key in (*HEADLINE_METRICS, "mean_rank", "num_queries", "pool_size")
                if key in report[direction]
            }
            | {"num_tied_queries": report[direction].get("num_tied_queries")}
            for direction in DIRECTIONS
        }
    attempts = []
    if (run.workdir / ATTEMPTS_NAME).exists():
        attempts = [
            json.loads(line)
            for line in (run.workdir / ATTEMPTS_NAME).read_text().splitlines()
            if line.strip()
        ]
    log_path = run.workdir / LOG_NAME
    seconds = eval_seconds(log_path.read_text(errors="replace")) if log_path.exists() else {}
    return {
        "variant": run.variant,
        "seed": run.seed,
        "description": VARIANTS[run.variant].description,
        "overrides": dict(VARIANTS[run.variant].overrides),
        "command": run.command(),
        "num_steps": run.num_steps,
        "workdir": str(run.workdir),
        "wall_s": sum(a["wall_s"] for a in attempts),
        "attempts": len(attempts),
        "test_eval_s": seconds,
        "test": test,
        **training_diagnostics(_metrics_records(run.workdir)),
    }


# ----------------------------------------------------------------------------------------------
# The table.


def _mean_spread(values: Sequence[float]) -> dict:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return {"n": 0, "mean": None, "std": None, "values": []}
    mean = sum(values) / len(values)
    std = None
    if len(values) >= 2:
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return {"n": len(values), "mean": mean, "std": std, "values": values}


def _get(result: dict, path: Sequence[str]) -> Any:
    value: Any = result
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


# (column label, path into a run result, scale for display)
DIAGNOSTIC_COLUMNS = (
    ("wall min/run", ("wall_s",), 1 / 60),
    ("test eval s/run", ("test_eval_total_s",), 1.0),
    ("disc. acc. end %", ("disc_accuracy", "final_window_mean"), 100.0),
    ("val paired d", ("val", "val/modality_gap/paired_mean"), 1.0),
    ("val unpaired d", ("val", "val/modality_gap/unpaired_mean"), 1.0),
    ("val gap", ("val", "val/modality_gap/gap"), 1.0),
    ("val mean MRR %", ("val", "val/mean_mrr"), 100.0),
)


def aggregate(results: Iterable[dict], variants: Sequence[str], splits: Sequence[str]) -> dict:
    """Mean and spread over seeds per variant.

    Returns:
      {'variants': {name: {'seeds': [...], 'test': {split: {dir: {metric: stats}}},
      'diagnostics': {column: stats}}}} with stats = {'n', 'mean', 'std', 'values'}.
    """
    by_variant: dict[str, list[dict]] = {name: [] for name in variants}
    for result in results:
        result = dict(result)
        result["test_eval_total_s"] = sum(result.get("test_eval_s", {}).values()) or None
        by_variant.setdefault(result["variant"], []).append(result)
    table = {}
    for name, rows in by_variant.items():
        table[name] = {
            "seeds": sorted(r["seed"] for r in rows),
            "test": {
                split: {
                    direction: {
                        metric: _mean_spread(
                            [_get(r, ("test", split, direction, metric)) for r in rows]
                        )
                        for metric in HEADLINE_METRICS
                    }
                    for direction in DIRECTIONS
                }
                for split in splits
            },
            "diagnostics": {
                label: _mean_spread([_get(r, path) for r in rows])
                for label, path, _ in DIAGNOSTIC_COLUMNS
            },
        }
    return {"variants": table}


def _cell(stats: dict, scale: float, digits: int) -> str:
    if not stats["n"]:
        return "–"
    text = f"{stats['mean'] * scale:.{digits}f}"
    if stats["std"] is not None:
        text += f" ± {stats['std'] * scale:.{digits}f}"
    return text


def format_markdown(table: dict, header: dict) -> str:
    """The Markdown page of an aggregated table (`aggregate`) and the run settings `header`."""
    variants = table["variants"]
    lines = [
        "# CMTMR ablation",
        "",
        f"Base config `{header['base_config']}`, {header['num_steps']} steps per run, seeds "
        f"{', '.join(map(str, header['seeds']))}; written {header['written']} by "
        f"`{header['command']}`.",
        "",
        "Pool protocol (every test text ranks every test molecule and vice versa), tie-aware "
        "expected ranks, final weights. Cells: mean ± sample standard deviation over the "
        "finished seeds (n), in % for H@k and MRR; a cell without ± has one seed.",
    ]
    for split in header["splits"]:
        lines += ["", f"## {SPLIT_TITLES.get(split, split)}", ""]
        columns = [
            f"{d.upper()} {m.replace('hits@', 'H@').upper()}"
            for d in DIRECTIONS
            for m in HEADLINE_METRICS
        ]
        lines.append("| variant | n | " + " | ".join(columns) + " |")
        lines.append("|---|---|" + "---|" * len(columns))
        for name, row in variants.items():
            cells = [
                _cell(row["test"][split][d][m], 100.0, 2)
                for d in DIRECTIONS
                for m in HEADLINE_METRICS
            ]
            n = len(row["seeds"])
            lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Training diagnostics",
        "",
        "Wall time per run (training, validation and test evaluation; summed over resumed "
        "attempts); test evaluation seconds from train.py's log; discriminator accuracy: mean "
        f"over the last {FINAL_WINDOW:.0%} of the logged steps (GRL adversaries only); "
        "modality gap on the last validation: mean paired and unpaired text–molecule "
        "distance of the unit embeddings and gap = unpaired − paired "
        "(`jaxmol.metrics.modality_gap`).",
        "",
        "| variant | n | " + " | ".join(label for label, _, _ in DIAGNOSTIC_COLUMNS) + " |",
        "|---|---|" + "---|" * len(DIAGNOSTIC_COLUMNS),
    ]
    digits = {1 / 60: 1, 1.0: 3, 100.0: 1}
    for name, row in variants.items():
        cells = []
        for label, _, scale in DIAGNOSTIC_COLUMNS:
            places = 0 if label.startswith("test eval") else digits[scale]
            cells.append(_cell(row["diagnostics"][label], scale, places))
        lines.append(f"| {name} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "## Variants", "", "| variant | overrides of the base config | tests |"]
    lines.append("|---|---|---|")
    for name in variants:
        if name not in VARIANTS:
            continue
        overrides = (
            ", ".join(f"`{k}={flag_value(v)}`" for k, v in VARIANTS[name].overrides.items())
            or "(none)"
        )
        lines.append(f"| {name} | {overrides} | {VARIANTS[name].description} |")
    if header.get("extra_overrides"):
        lines += ["", "Every run also: " + ", ".join(f"`{o}`" for o in header["extra_overrides"])]
    if header.get("missing"):
        lines += ["", "## Not finished", ""]
        lines += [f"- {item}" for item in header["missing"]]
        lines += [f"- failed: {item}" for item in header.get("failed", [])]
    return "\n".join(lines) + "\n"


def write_table(out: Path, results: Sequence[dict], header: dict) -> tuple[Path, Path]:
    """Writes OUT.md and OUT.json (OUT without its .md/.json suffix)."""
    stem = out.with_suffix("") if out.suffix in (".md", ".json") else out
    stem.parent.mkdir(parents=True, exist_ok=True)
    table = aggregate(results, header["variants"], header["splits"])
    md_path, json_path = stem.with_suffix(".md"), stem.with_suffix(".json")
    md_path.write_text(format_markdown(table, header))
    _write_json(json_path, {"header": header, "table": table, "runs": list(results)})
    return md_path, json_path


# ----------------------------------------------------------------------------------------------
# Command line.


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base_config", default="configs/quickstart.py", help="config file or shipped name"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--seeds", default="0,1", help="comma-separated config.seed values")
    parser.add_argument("--num_steps", type=int, default=300, help="training steps of every run")
    parser.add_argument(
        "--workdir_root", default="runs/ablation", help="one workdir per run below it"
    )
    parser.add_argument(
        "--out", default=None, help="table path (.md and .json); default ROOT/ablation"
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run (repeatable), e.g. data.max_eval_pairs=100",
    )
    parser.add_argument(
        "--extra_splits",
        default="",
        help="comma-separated splits evaluate.py adds on every finished run, e.g. chebi20/test",
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs train.py")
    parser.add_argument(
        "--table_only",
        action="store_true",
        help="write the table of the finished runs; train and evaluate nothing",
    )
    parser.add_argument("--dry_run", action="store_true", help="print the commands, train nothing")
    parser.add_argument("--list_variants", action="store_true", help="print the variants and exit")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.list_variants:
        for name, variant in VARIANTS.items():
            overrides = " ".join(f"{k}={flag_value(v)}" for k, v in variant.overrides.items())
            print(f"{name:<22} {overrides or '(base config)'}\n{'':<22} {variant.description}")
        return 0
    try:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        extra = [parse_override(o) for o in args.override]
        root = Path(args.workdir_root).absolute()
        extra_splits = [s.strip() for s in args.extra_splits.split(",") if s.strip()]
        runs = plan_runs(
            args.base_config, variants, seeds, args.num_steps, root, extra, extra_splits
        )
        statuses = [run_status(run) for run in runs]
    except (AblationError, ValueError, FileNotFoundError) as error:
        print(f"ablate: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out).absolute() if args.out else root / "ablation"
    if args.dry_run:
        for run, status in zip(runs, statuses, strict=True):
            note = {"done": "# done, not retrained", "resume": "# resumes", "new": "# new"}[status]
            print(f"{note}: {run.variant} seed {run.seed}")
            log = shlex.quote(str(run.workdir / LOG_NAME))
            print(f"{shlex.join(run.command(args.python))} > {log} 2>&1")
        print(f"# table: {out.with_suffix('.md')} and .json")
        return 0

    from jaxmol.workdir import WorkdirLock, WorkdirLockedError

    lock = None  # --table_only reads finished results only, also while an ablation runs
    if not args.table_only:
        try:
            lock = WorkdirLock(root)  # one ablation (hence one training) at a time per root
        except WorkdirLockedError as error:
            print(f"ablate: error: {error}", file=sys.stderr)
            return 6
    results: list[dict] = []
    failed: list[str] = []
    stopped_by = None
    try:
        for index, run in enumerate(runs, start=1):
            label = f"[{index}/{len(runs)}] {run.variant} seed {run.seed}"
            result = None
            if (run.workdir / RESULT_NAME).exists():
                result = _read_json(run.workdir / RESULT_NAME)
                print(f"{label}: done before, not retrained", flush=True)
            elif args.table_only:
                print(f"{label}: not finished", flush=True)
            elif stopped_by is None:
                print(f"{label}: training ({run.workdir / LOG_NAME})", flush=True)
                returncode, wall, stopped_by = train_once(run, args.python)
                result = collect_result(run)
                if result is not None:
                    _write_json(run.workdir / RESULT_NAME, result)
                    print(f"{label}: finished in {wall / 60:.1f} min", flush=True)
                elif stopped_by is None:
                    failed.append(
                        f"{run.variant} seed {run.seed}: train.py exit status {returncode}, "
                        f"see {run.workdir / LOG_NAME}"
                    )
                    print(f"{label}: FAILED (exit status {returncode})", flush=True)
            missing_splits = (
                [] if result is None else [s for s in run.splits if s not in result["test"]]
            )
            if missing_splits and stopped_by is None and not args.table_only:
                print(f"{label}: evaluating {', '.join(missing_splits)}", flush=True)
                failures, stopped_by = evaluate_extra_splits(run, args.python)
                failed += failures
                updated = collect_result(run)
                if updated is not None and updated["test"] != result["test"]:
                    result = updated
                    _write_json(run.workdir / RESULT_NAME, result)
            if result is not None:
                results.append(result)
    finally:
        if lock is not None:
            lock.release()
    done = {(r["variant"], r["seed"]) for r in results}
    missing = [f"{r.variant} seed {r.seed}" for r in runs if (r.variant, r.seed) not in done]
    header = {
        "base_config": args.base_config,
        "num_steps": args.num_steps,
        "seeds": seeds,
        "variants": variants,
        "splits": list(runs[0].splits) if runs else [],
        "extra_overrides": [f"{k}={v}" for k, v in extra],
        "command": shlex.join(
            ["python", "tools/ablate.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "written": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "missing": missing,
        "failed": failed,
    }
    md_path, json_path = write_table(out, results, header)
    print(f"table: {md_path} and {json_path}")
    if stopped_by is not None:
        print(
            f"stopped by {signal.Signals(stopped_by).name}: run the same command to resume",
            file=sys.stderr,
        )
        return 128 + stopped_by
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
