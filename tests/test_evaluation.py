"""Evaluation: sentence splitting and scores, protocol pools, evaluate.py end to end.

The model is the session's tiny in-process run (8 fake devices; `trained_workdir` is a copy);
evaluate.py restores it in a subprocess that sees a single device.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxmol import evaluation, scoring
from jaxmol import metrics as metrics_lib
from tests import conftest

ROOT = Path(__file__).resolve().parents[1]
MAX_PAIRS = 24


# ----------------------------------------------------------------------------------------------
# No model.


def test_check_protocol_rejects_unknown_and_misapplied_protocols():
    with pytest.raises(evaluation.ProtocolError, match="unknown protocol"):
        evaluation.check_protocol("pcdes/test", "inbatch")
    with pytest.raises(evaluation.ProtocolError, match="chebi20/test"):
        evaluation.check_protocol("pcdes/test", "text2mol")
    evaluation.check_protocol("chebi20/validation", "text2mol")


# ----------------------------------------------------------------------------------------------
# A tiny trained model.


@pytest.fixture(scope="session")
def trained_workdir(trained_run, tmp_path_factory):
    """A copy of the session's tiny in-process run (4 steps on 8 fake devices, validated at
    steps 2 and 4); tests write their eval/ and plots/ into the copy."""
    source, _ = trained_run
    workdir = tmp_path_factory.mktemp("tiny_eval") / "run"
    shutil.copytree(source, workdir)
    return workdir


@pytest.fixture(scope="module")
def restored(trained_workdir):
    """(8-device embedder, variables, encoder, step) of the trained workdir."""
    from jaxmol import builders
    from jaxmol.parallel import DataParallel, select_devices

    model, variables, config, step = evaluation.restore_for_eval(trained_workdir)
    embedder = evaluation.Embedder(model, DataParallel("shard_map", select_devices(-1)))
    return embedder, variables, builders.split_encoder(config), step


def _write_tsv(path: Path) -> Path:
    """Nine pairs from PCdes test plus one unparsable SMILES (id 'bad')."""
    from jaxmol.data import datasets

    source = datasets.load_split("pcdes/test")
    rows = [r for r, i in enumerate(source.ids) if i != "12073"][:9]
    lines = ["id\tsmiles\tdescription"]
    lines += [f"m{r}\t{source.smiles[r]}\t{source.texts[r]}" for r in rows[:4]]
    lines.append("bad\tC1CC(\tThis molecule cannot be parsed. It has an open ring bond.")
    lines += [f"m{r}\t{source.smiles[r]}\t{source.texts[r]}" for r in rows[4:]]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_protocol_pools_and_query_counts(restored, tmp_path):
    embedder, variables, encoder, step = restored
    split_name = f"tsv:{_write_tsv(tmp_path / 'pairs.tsv')}"
    common = dict(encoder=encoder, batch_size=4, workdir=tmp_path, checkpoint_step=step)

    reports = {
        protocol: evaluation.evaluate_split(
            embedder, variables, split_name, protocol=protocol, inbatch_size=4, **common
        )
        for protocol in ("pool", "momu", "momu_sentence")
    }
    for protocol, report in reports.items():
        for direction in ("t2m", "m2t"):
            assert report[direction]["pool_size"] == 9, protocol
            assert report[direction]["num_queries"] == 9, protocol
        assert [s["id"] for s in report["skipped"]] == ["bad"]
        stored = np.load(tmp_path / "eval" / f"{evaluation.result_stem(split_name, protocol)}.npz")
        assert "bad" not in stored["mol_ids"] and len(stored["text_ids"]) == 9
    assert "inbatch_acc@4" in reports["momu"]["t2m"]
    assert "inbatch_acc@4" not in reports["pool"]["t2m"]
    # Same embeddings, same pool: the momu full-pool numbers are the pool protocol's.
    assert reports["momu"]["t2m"]["mrr"] == reports["pool"]["t2m"]["mrr"]
    rows = [line.split("\t") for line in (tmp_path / "pairs.tsv").read_text().splitlines()[1:]]
    expected_sentences = sum(len(scoring.split_sentences(t)) for i, _, t in rows if i != "bad")
    assert reports["momu_sentence"]["num_sentences"] == expected_sentences > 9

    # text2mol on the first 5 rows of each ChEBI-20 split: 3 molecule splits, 2 text splits.
    report = evaluation.evaluate_split(
        embedder, variables, "chebi20/test", protocol="text2mol", max_pairs=5, **common
    )
    assert report["t2m"]["num_queries"] == report["m2t"]["num_queries"] == 5
    assert report["t2m"]["pool_size"] == 15
    assert report["t2m_pool_splits"] == list(evaluation.TEXT2MOL_MOLECULE_SPLITS)
    has_train = "chebi20/train" in evaluation.text2mol_text_splits()
    assert report["m2t"]["pool_size"] == (15 if has_train else 10)
    stored = np.load(tmp_path / "eval" / "chebi20_test__text2mol.npz")
    assert sorted(set(stored["mol_split"])) == sorted(evaluation.TEXT2MOL_MOLECULE_SPLITS)
    assert set(stored["query_ids"]) <= set(stored["text_ids"]) & set(stored["mol_ids"])


def test_text_embeddings_do_not_depend_on_the_length_buckets(restored):
    from jaxmol.data import batching, datasets

    embedder, variables, encoder, _ = restored
    split = encoder(datasets.load_split_head("pcdes/test", 40))
    tokens = split.tokens
    assert batching.eval_text_buckets(128) == (32, 64, 96, 128)
    assert batching.eval_text_buckets(100, 16) == (16, 32, 48, 64, 80, 96, 100)
    # Shuffled rows: the output must follow `rows`, not the length order of the batches.
    rows = np.random.default_rng(0).permutation(split.rows)
    texts_before, seconds_before = embedder.rows["texts"], embedder.seconds["texts"]
    default = embedder.embed_texts(variables, tokens, rows, batch_size=8)  # every 32 tokens
    # The evaluation log's time split counts this call.
    assert embedder.rows["texts"] == texts_before + len(rows)
    assert embedder.seconds["texts"] > seconds_before
    one_length = embedder.embed_texts(
        variables, tokens, rows, batch_size=8, buckets=(tokens.max_length,)
    )
    assert np.abs(default).max() > 0.1
    np.testing.assert_allclose(default, one_length, atol=1e-5)
    # Every length a bucket: each batch padded to exactly its longest text.
    per_text = embedder.embed_texts(
        variables, tokens, rows[:8], batch_size=8, buckets=tuple(range(1, tokens.max_length + 1))
    )
    np.testing.assert_allclose(per_text, default[:8], atol=1e-5)


def test_evaluate_checkpoint_errors_are_clear(tmp_path, trained_workdir):
    from jaxmol.checkpointing import CheckpointError
    from jaxmol.data.datasets import DataError

    with pytest.raises(CheckpointError, match="no checkpoints"):
        evaluation.evaluate_checkpoint(tmp_path / "missing", "pcdes/test")
    with pytest.raises(DataError, match="unknown split"):
        evaluation.evaluate_checkpoint(trained_workdir, "pcdes/tset")
    with pytest.raises(CheckpointError, match="no checkpoint at step 7"):
        evaluation.evaluate_checkpoint(trained_workdir, "pcdes/test", step=7)


def _recompute(stored) -> dict:
    """Full-pool metrics from the .npz alone, by brute force (independent of jaxmol.metrics)."""

    def unit(x):
        x = x.astype(np.float64)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    assert list(stored["text_ids"]) == list(stored["mol_ids"])
    text, mol = unit(stored["text_emb"]), unit(stored["mol_emb"])  # [N, d] each
    out = {}
    for direction, (queries, candidates) in (("t2m", (text, mol)), ("m2t", (mol, text))):
        matrix = queries @ candidates.T  # [N, N] float32 cosines, pair i on the diagonal
        gold = np.diag(matrix)
        ranks = np.array([1 + np.sum(row > g) for row, g in zip(matrix, gold, strict=True)])
        out[direction] = {
            "hits@1": np.mean(ranks <= 1),
            "hits@10": np.mean(ranks <= 10),
            "mrr": np.mean(1 / ranks),
            "mean_rank": np.mean(ranks),
            "pool_size": matrix.shape[1],
            "num_queries": matrix.shape[0],
        }
    return out


@pytest.mark.slow
def test_evaluate_cli_on_one_device_matches_eight_devices(trained_workdir, tmp_path):
    # 8 devices, in process.
    eight = evaluation.evaluate_checkpoint(
        trained_workdir, "pcdes/test", batch_size=8, max_pairs=MAX_PAIRS
    )
    json_path = trained_workdir / eight["files"]["json"]
    npz_path = trained_workdir / eight["files"]["npz"]
    assert json_path.name == "pcdes_test__pool.json"
    shutil.copy(npz_path, tmp_path / "eight.npz")

    # 1 device, through the CLI; --data_dir wins over a $JAXMOL_DATA_DIR that has no data.
    env = {**os.environ, "XLA_FLAGS": conftest.xla_flags(1)}
    env["JAXMOL_DATA_DIR"] = str(tmp_path / "no_data_here")
    command = [sys.executable, str(ROOT / "evaluate.py"), f"--workdir={trained_workdir}"]
    command += ["--split=pcdes/test", "--protocol=pool", "--batch_size=6"]
    command += [f"--data_dir={ROOT / 'data'}"]
    command += [f"--max_pairs={MAX_PAIRS}", "--plots"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pcdes/test" in done.stdout and "t2m" in done.stdout and "m2t" in done.stdout

    one = json.loads(json_path.read_text())
    best = eight["checkpoint_step"]  # the better validated step of the run
    assert one["checkpoint_step"] == best and best in (2, 4)
    assert one["protocol"] == "pool" and one["split"] == "pcdes/test"
    assert one["tie_policy"] == metrics_lib.TIE_POLICY
    stored_one, stored_eight = np.load(npz_path), np.load(tmp_path / "eight.npz")
    np.testing.assert_array_equal(stored_one["text_ids"], stored_eight["text_ids"])
    for key in ("text_emb", "mol_emb"):
        np.testing.assert_allclose(stored_one[key], stored_eight[key], atol=1e-5)
    for direction in ("t2m", "m2t"):
        for key, value in one[direction].items():
            if isinstance(value, float):
                assert value == pytest.approx(eight[direction][key], abs=1e-5), key
        recomputed = _recompute(stored_one)[direction]
        for key, value in recomputed.items():  # brute-force ranks are the optimistic ones
            stored = one[direction]["optimistic"].get(key, one[direction][key])
            assert stored == pytest.approx(value, abs=1e-9), (direction, key)
        assert one[direction]["num_queries"] == MAX_PAIRS - one["num_skipped"]
    assert one["weights"].startswith(f"best validation checkpoint: step {best}")

    # --plots: every picture is a non-empty PNG, and the data behind them holds the JSON's numbers.
    plots_dir = trained_workdir / "plots"
    pngs = sorted(plots_dir.glob("pcdes_test__pool__*.png"))
    assert len(pngs) >= 3
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000 for p in pngs)
    summary = json.loads((plots_dir / "pcdes_test__pool__plots.json").read_text())
    assert max(summary["abs_difference_vs_report"].values()) < 1e-6
    for direction in ("t2m", "m2t"):
        for metric in ("hits@1", "hits@10", "mrr", "mean_rank"):
            recomputed = summary["recomputed"][direction][metric]
            assert recomputed == pytest.approx(one[direction][metric], abs=1e-6), metric


def test_a_bad_step_flag_is_a_usage_error_with_status_2():
    from jaxmol import cli
    from jaxmol.cli import evaluate as evaluate_cli
    from jaxmol.config import ConfigError

    assert evaluate_cli._parse_step("latest") == "latest" and evaluate_cli._parse_step("7") == 7
    with pytest.raises(ConfigError, match="--step must be") as error:
        evaluate_cli._parse_step("foo")
    assert cli.exit_status(error.value) == cli.EXIT_CONFIG


def test_evaluate_cli_without_a_data_folder_says_what_to_do(tmp_path):
    from jaxmol import cli

    command = [sys.executable, str(ROOT / "evaluate.py"), f"--workdir={tmp_path}"]
    command += ["--split=pcdes/test", f"--data_dir={tmp_path / 'empty'}"]
    env = {**os.environ, "XLA_FLAGS": conftest.xla_flags(1)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == cli.EXIT_CONFIG, done.stderr[-3000:]
    assert "--data_dir" in done.stderr and "MANIFEST.json" in done.stderr
