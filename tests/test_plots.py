"""Tests for jaxmol.plots and tools/plot_run.py on synthetic runs (no training, no data files)."""

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

from jaxmol import metrics, plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def _assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, f"{path} is suspiciously small ({len(data)} bytes)"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def _write_metrics_jsonl(path: Path) -> None:
    """A run of 20 steps: logs every 2 steps, validation every 10, and a resumed step 12."""
    lines = []
    for step in range(2, 21, 2):
        lines.append(
            {
                "step": step,
                "time": 1000.0 + step,
                "loss": 1.0 / step,
                "first_order": 0.5 / step,
                "triplet": 0.5 / step,
                "u2u": 0.2 / step,
                "u2c": 0.3 / step,
                "adversarial": 0.69,
                "lr": 1e-4 * step / 20,
                "pairs_per_s": 16.0 + step,
                "grad_norm": 2.0 / step,
            }
        )
        if step % 10 == 0:
            lines.append(
                {
                    "step": step,
                    "time": 1000.5 + step,
                    "val/t2m/mrr": 0.01 * step,
                    "val/m2t/mrr": 0.02 * step,
                    "val/mean_mrr": 0.015 * step,
                    "val/t2m/num_tied_queries": 0,
                }
            )
    # The run was killed after logging step 12 and resumed from step 10: step 12 again.
    step_12 = next(line for line in lines if line["step"] == 12 and "loss" in line)
    lines.append({**step_12, "loss": 0.123, "time": 2000.0})
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    path.write_text(text + '{"step": 22, "loss": 0.0')  # a truncated line from a killed write


def test_training_curves(tmp_path):
    _write_metrics_jsonl(tmp_path / "metrics.jsonl")
    paths = plots.plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "plots")
    _assert_png(paths["png"])
    rows = _read_csv(paths["csv"])
    assert [int(r["step"]) for r in rows] == list(range(2, 21, 2))
    columns = set(rows[0])
    assert {"loss", "triplet", "u2u", "u2c", "adversarial", "lr", "pairs_per_s"} <= columns
    assert {"val/t2m/mrr", "val/m2t/mrr", "val/mean_mrr"} <= columns
    assert "first_order" not in columns  # it repeats 'triplet'
    by_step = {int(r["step"]): r for r in rows}
    assert float(by_step[12]["loss"]) == 0.123  # the resumed run's record wins
    assert float(by_step[4]["lr"]) == 1e-4 * 4 / 20
    assert float(by_step[20]["val/m2t/mrr"]) == 0.02 * 20
    assert by_step[4]["val/t2m/mrr"] == ""  # no validation at step 4


def test_training_curves_without_records_raises(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "val/mean_mrr": 0.1}) + "\n")
    with pytest.raises(ValueError, match="no training record"):
        plots.plot_training_curves(tmp_path / "metrics.jsonl", tmp_path)
    with pytest.raises(FileNotFoundError):
        plots.plot_training_curves(tmp_path / "missing.jsonl", tmp_path)


def _aligned_embeddings(num_pairs: int = 240, dim: int = 16, seed: int = 0):
    """Noisy aligned pairs with two exact duplicates (ties) on each side."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(num_pairs, dim))
    text = (shared + 0.9 * rng.normal(size=(num_pairs, dim)) + 0.5).astype(np.float32)
    mol = (shared + 0.9 * rng.normal(size=(num_pairs, dim)) - 0.5).astype(np.float32)
    mol[11] = mol[10]  # texts 10 and 11 each see their gold molecule tied with the other
    text[21] = text[20]
    return text, mol


def _write_evaluation(directory: Path, text, mol, stem="synthetic_test__pool") -> tuple:
    ids = np.asarray([f"id{i}" for i in range(len(text))])
    gold = np.arange(len(text))
    report = {
        "split": "synthetic/test",
        "protocol": "pool",
        "checkpoint_step": 7,
        "tie_policy": metrics.TIE_POLICY,
        "t2m": metrics.retrieval_metrics_from_embeddings(text, mol, gold),
        "m2t": metrics.retrieval_metrics_from_embeddings(mol, text, gold),
    }
    directory.mkdir(parents=True, exist_ok=True)
    npz_path, json_path = directory / f"{stem}.npz", directory / f"{stem}.json"
    np.savez(npz_path, text_ids=ids, text_emb=text, mol_ids=ids, mol_emb=mol, query_ids=ids)
    json_path.write_text(json.dumps(report))
    return npz_path, json_path, report


def test_evaluation_plots_hold_the_reported_numbers(tmp_path):
    text, mol = _aligned_embeddings()
    npz_path, json_path, report = _write_evaluation(tmp_path / "eval", text, mol)
    assert report["t2m"]["num_tied_queries"] == 2 and report["m2t"]["num_tied_queries"] == 2
    outputs = plots.plot_evaluation(npz_path, json_path, tmp_path / "plots")
    for kind in ("rank_distribution", "modality_gap", "embedding_pca"):
        _assert_png(outputs[kind]["png"])
        assert outputs[kind]["png"].name == f"synthetic_test__pool__{kind}.png"

    # hits@k per k: k = 1 and 10 are the report's (tie-aware) headline numbers.
    rows = _read_csv(outputs["rank_distribution"]["csv"])
    assert len(rows) == len(text)  # k = 1..pool size
    for direction in ("t2m", "m2t"):
        for k in (1, 10):
            value = float(rows[k - 1][f"{direction}_hits@k"])
            assert value == pytest.approx(report[direction][f"hits@{k}"], abs=1e-12)
        assert float(rows[-1][f"{direction}_hits@k"]) == pytest.approx(1.0)

    # The histogram counts optimistic ranks, all queries once.
    histogram = _read_csv(outputs["rank_distribution"]["histogram_csv"])
    optimistic = metrics.ranks_from_embeddings(text, mol, np.arange(len(text)))
    for row in histogram:
        low, high = int(row["rank_from"]), int(row["rank_to"])
        expected = np.count_nonzero((optimistic >= low) & (optimistic <= high))
        assert int(row["t2m_queries"]) == expected, row
    assert sum(int(row["m2t_queries"]) for row in histogram) == len(text)

    # Modality gap: the paired mean straight from numpy.
    gap = json.loads(outputs["modality_gap"]["json"].read_text())
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    paired = np.linalg.norm(unit(text.astype(np.float64)) - unit(mol.astype(np.float64)), axis=1)
    assert gap["paired_mean"] == pytest.approx(paired.mean(), rel=1e-12)
    assert gap["num_pairs"] == len(text)
    assert gap["unpaired_mean"] > gap["paired_mean"]  # the synthetic pairs are aligned
    assert gap["gap"] == pytest.approx(gap["unpaired_mean"] - gap["paired_mean"])

    summary = json.loads(outputs["summary"]["json"].read_text())
    assert max(summary["abs_difference_vs_report"].values()) < 1e-12
    assert summary["recomputed"]["t2m"]["num_tied_queries"] == 2


def test_rank_distribution_of_plain_ranks_matches_metrics(tmp_path):
    rng = np.random.default_rng(1)
    ranks = {"t2m": rng.integers(1, 51, size=80), "m2t": rng.integers(1, 31, size=80)}
    paths = plots.plot_rank_distribution(ranks, tmp_path, pool_sizes={"t2m": 50, "m2t": 30})
    _assert_png(paths["png"])
    rows = _read_csv(paths["csv"])
    assert len(rows) == 50
    for k in (1, 2, 10, 30):
        for direction in ("t2m", "m2t"):
            assert float(rows[k - 1][f"{direction}_hits@k"]) == metrics.recall_at_k(
                ranks[direction], k
            )
    assert rows[40]["m2t_hits@k"] == ""  # beyond the m2t pool of 30


def test_expected_hits_at_every_k_matches_metrics():
    counts = metrics.RankCounts(np.array([0, 0, 2, 0, 7]), np.array([4, 2, 1, 0, 2]))
    curve = plots.hits_at_every_k(counts, pool_size=10)
    for k in range(1, 11):
        assert curve[k - 1] == pytest.approx(metrics.recall_at_k(counts, k), abs=1e-12)


def test_modality_gap_never_samples_a_pair():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(30, 8))
    paired, unpaired = plots.modality_gap_distances(emb, emb, num_unpaired=5000, seed=3)
    np.testing.assert_allclose(paired, 0.0, atol=1e-12)  # text i == molecule i
    assert unpaired.size == 30 * 29 and unpaired.min() > 1e-6  # capped at N (N - 1), no pair
    again = plots.modality_gap_distances(emb, emb, num_unpaired=100, seed=3)[1]
    np.testing.assert_array_equal(
        again, plots.modality_gap_distances(emb, emb, num_unpaired=100, seed=3)[1]
    )


def test_embedding_pca_matches_covariance_eigenvalues(tmp_path):
    text, mol = _aligned_embeddings(num_pairs=120, dim=6, seed=4)
    paths = plots.plot_embedding_pca(text, mol, tmp_path, max_points=50)
    _assert_png(paths["png"])
    summary = json.loads(paths["json"].read_text())
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    joint = np.concatenate([unit(text.astype(np.float64)), unit(mol.astype(np.float64))])
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(joint.T)))[::-1]
    np.testing.assert_allclose(
        summary["explained_variance_ratio"], eigenvalues[:2] / eigenvalues.sum(), rtol=1e-9
    )
    rows = _read_csv(paths["csv"])
    assert sum(r["modality"] == "text" for r in rows) == 50  # subsampled for drawing
    assert summary["num_text"] == summary["num_molecule"] == 120


def test_text2mol_and_sentence_layouts(tmp_path):
    rng = np.random.default_rng(5)
    pool_text = rng.normal(size=(12, 4)).astype(np.float32)
    pool_mol = rng.normal(size=(20, 4)).astype(np.float32)
    text_ids = np.asarray([f"t{i}" for i in range(12)])
    mol_ids = np.asarray([f"t{i}" for i in range(8, 12)] + [f"m{i}" for i in range(16)])
    query_ids = np.asarray(["t9", "t11", "t8"])  # queries sit in different rows on each side
    arrays = dict(
        text_ids=text_ids,
        text_emb=pool_text,
        mol_ids=mol_ids,
        mol_emb=pool_mol,
        query_ids=query_ids,
    )
    counts = plots.evaluation_rank_counts(arrays)
    t2m = metrics.rank_counts_from_embeddings(pool_text[[9, 11, 8]], pool_mol, np.array([1, 3, 0]))
    m2t = metrics.rank_counts_from_embeddings(pool_mol[[1, 3, 0]], pool_text, np.array([9, 11, 8]))
    np.testing.assert_array_equal(counts["t2m"].num_higher, t2m.num_higher)
    np.testing.assert_array_equal(counts["m2t"].num_higher, m2t.num_higher)

    # momu_sentence: text_emb is the mean unit sentence vector and is scored unnormalised, so
    # the molecule -> text ranking differs from a cosine one.
    ids = np.asarray([str(i) for i in range(6)])
    paragraph = rng.normal(size=(6, 4)).astype(np.float32)
    paragraph[0] *= 0.1  # a short mean vector: low scores for every molecule
    molecules = rng.normal(size=(6, 4)).astype(np.float32)
    sentence = dict(
        text_ids=ids,
        text_emb=paragraph,
        mol_ids=ids,
        mol_emb=molecules,
        query_ids=ids,
        sentence_emb=paragraph,
        sentence_paragraph=np.arange(6),
    )
    unit_mol = (molecules / np.linalg.norm(molecules, axis=1, keepdims=True)).astype(np.float32)
    scores = paragraph @ unit_mol.T
    counts = plots.evaluation_rank_counts(sentence)
    expected = metrics.rank_counts_from_scores(scores.T, np.arange(6))
    np.testing.assert_array_equal(counts["m2t"].num_higher, expected.num_higher)


def _load_plot_run():
    spec = importlib.util.spec_from_file_location("plot_run", ROOT / "tools" / "plot_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_run_tool(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    _write_metrics_jsonl(workdir / "metrics.jsonl")
    text, mol = _aligned_embeddings(num_pairs=60)
    _write_evaluation(workdir / "eval", text, mol)
    (workdir / "eval" / "orphan.npz").write_bytes(b"")  # no .json beside it: skipped
    plot_run = _load_plot_run()
    assert plot_run.main([str(workdir)]) == 0
    printed = capsys.readouterr().out.split()
    for name in (
        "training_curves.png",
        "synthetic_test__pool__rank_distribution.png",
        "synthetic_test__pool__modality_gap.png",
        "synthetic_test__pool__embedding_pca.png",
    ):
        assert str(workdir / "plots" / name) in printed
        _assert_png(workdir / "plots" / name)
    # A workdir with only metrics.jsonl, written elsewhere.
    curves_only = tmp_path / "curves_only"
    curves_only.mkdir()
    _write_metrics_jsonl(curves_only / "metrics.jsonl")
    assert plot_run.main([str(curves_only), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "training_curves.csv").is_file()
    assert not (curves_only / "plots").exists()
    assert plot_run.main([str(tmp_path / "missing")]) == 2
    assert plot_run.main([str(tmp_path / "elsewhere")]) == 2  # nothing to plot there


def test_plot_run_png_only_with_a_palette(tmp_path, capsys):
    from PIL import Image

    workdir = tmp_path / "run"
    workdir.mkdir()
    _write_metrics_jsonl(workdir / "metrics.jsonl")
    text, mol = _aligned_embeddings(num_pairs=60)
    _write_evaluation(workdir / "eval", text, mol)
    plot_run = _load_plot_run()
    assert plot_run.main([str(workdir)]) == 0  # full colour, with data, for comparison
    small = tmp_path / "figures"
    assert plot_run.main([str(workdir), "--out", str(small), "--png_only", "--palette", "64"]) == 0
    names = sorted(p.name for p in small.iterdir())
    assert names == sorted(p.name for p in (workdir / "plots").glob("*.png")) and len(names) == 4
    for name in names:
        _assert_png(small / name)
        with Image.open(small / name) as reduced, Image.open(workdir / "plots" / name) as full:
            assert reduced.mode == "P" and len(reduced.getcolors(256)) <= 64
            assert reduced.size == full.size
            difference = np.abs(
                np.asarray(reduced.convert("RGB"), np.float64)
                - np.asarray(full.convert("RGB"), np.float64)
            )
            assert difference.mean() < 2.0, name  # of 255: the same picture
        assert (small / name).stat().st_size < (workdir / "plots" / name).stat().st_size
    assert plot_run.main([str(workdir), "--out", str(small), "--palette", "1"]) == 2
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    assert plot_run.main([str(empty_run), "--png_only"]) == 2  # nothing to plot
    assert not (empty_run / "plots").exists()
