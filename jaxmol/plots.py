"""Figures of a training run and of an evaluation, each saved with the numbers it draws.

Every function writes ``<name>.png`` plus the data behind it (``.csv`` and/or ``.json``) into
``out_dir`` and returns their paths. Figures are drawn on `matplotlib.figure.Figure` objects
with the Agg canvas, never through pyplot, so nothing needs a display and no global backend
state is touched. The core package never imports this module (matplotlib is only needed here).

* `plot_training_curves`: losses, validation MRR, learning rate, throughput from metrics.jsonl.
* `plot_modality_gap`: CMTMR (Song et al. 2024) figure 5 — densities of the paired and unpaired
  text–molecule distances.
* `plot_rank_distribution`: histogram of the gold rank and hits@k against k, per direction.
* `plot_embedding_pca`: both modalities projected on their first two principal components.
* `plot_evaluation`: all three evaluation figures from an `evaluate.py` result (.npz + .json).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from jaxmol import metrics

logger = logging.getLogger(__name__)

# Directions of the evaluation JSON and how the figures name them.
DIRECTION_LABELS = {"t2m": "text → molecule", "m2t": "molecule → text"}
MODALITY_COLORS = {"text": "tab:blue", "molecule": "tab:orange"}
# Loss terms drawn in the "loss terms" panel when the run logged them (losses.cmtmr_loss and the
# WGAN-GP critic); 'first_order' is left out because it repeats 'triplet' or the InfoNCE sum.
LOSS_TERMS = (
    "triplet",
    "info_nce_t2m",
    "info_nce_m2t",
    "u2u",
    "u2c",
    "adversarial",
    "critic_loss",
)
VAL_MRR_KEYS = ("val/t2m/mrr", "val/m2t/mrr", "val/mean_mrr")
_DPI = 120


def _figure(nrows: int, ncols: int, size: tuple[float, float]):
    """A headless figure with an Agg canvas and its [nrows, ncols] axes array."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=_DPI, layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False)
    return figure, axes


def _save_png(figure, path: Path) -> Path:
    figure.savefig(path, dpi=_DPI)
    return path


def _write_json(path: Path, data: Mapping) -> Path:
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _write_csv(path: Path, header: Sequence[str], rows) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _csv_value(value) -> str:
    """A CSV cell: '' for a missing value, repr-exact text for a float (round-trips)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(float(value)) if isinstance(value, float | np.floating) else str(value)


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """[N, D] rows at unit L2 norm, in float64 (zero rows stay zero)."""
    embeddings = np.asarray(embeddings, np.float64)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)  # [N, 1]
    return embeddings / np.maximum(norms, 1e-12)


def _check_embeddings(embeddings: np.ndarray, name: str) -> np.ndarray:
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"{name} must have shape [N, D] with N >= 1, got {embeddings.shape}")
    if not np.isfinite(embeddings).all():
        raise ValueError(f"{name} contain NaN or inf")
    return embeddings


# ----------------------------------------------------------------------------------------------
# Training curves.


def read_metrics_jsonl(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Reads a run's metrics.jsonl into training and validation records, one per step.

    A resumed run can log a step twice (it re-runs the steps after its last checkpoint); the
    later record wins. Records are sorted by step.

    Args:
        path: WORKDIR/metrics.jsonl as `jaxmol.train_lib.MetricsLog` writes it.

    Returns:
        (train, val): train records hold 'loss' (and the loss terms, 'lr', 'pairs_per_s', ...);
        val records hold 'val/...' keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            # A run killed mid-write can leave a truncated last line; anything else is damage.
            logger.warning("%s line %d is not JSON (%s); skipped", path, number, error)
            continue
        if "step" not in record:
            continue
        step = int(record["step"])
        if "loss" in record:
            train[step] = {**train.get(step, {}), **record}
        if any(key.startswith("val/") for key in record):
            val[step] = {**val.get(step, {}), **record}
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that hold a finite number under `key`."""
    pairs = [
        (r["step"], float(r[key]))
        for r in records
        if isinstance(r.get(key), int | float) and math.isfinite(float(r[key]))
    ]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs, strict=True)
    return np.asarray(steps), np.asarray(values)


def _empty_panel(axis, message: str) -> None:
    axis.text(0.5, 0.5, message, ha="center", va="center", transform=axis.transAxes, color="gray")


def plot_training_curves(
    metrics_jsonl_path: str | Path, out_dir: str | Path, *, name: str = "training_curves"
) -> dict[str, Path]:
    """Draws a run's training curves against the step.

    Panels: total loss; each logged loss term (unweighted, as `losses.cmtmr_loss` reports
    them); validation MRR per direction and their mean; learning rate; throughput (pairs/s);
    global gradient norm (log scale).

    Args:
        metrics_jsonl_path: WORKDIR/metrics.jsonl.
        out_dir: created if missing.
        name: file stem of the outputs.

    Returns:
        {'png': <name>.png, 'csv': <name>.csv}; the CSV has one row per logged step and one
        column per drawn series (empty where a step did not log it).

    Raises:
        FileNotFoundError: no metrics file.
        ValueError: the file holds no training record.
    """
    train, val = read_metrics_jsonl(metrics_jsonl_path)
    if not train:
        raise ValueError(f"{metrics_jsonl_path} holds no training record (no 'loss' key)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    terms = [key for key in LOSS_TERMS if _series(train, key)[0].size]
    val_keys = [key for key in VAL_MRR_KEYS if _series(val, key)[0].size]
    train_keys = ["loss", *terms, "lr", "pairs_per_s", "grad_norm"]
    train_keys = [key for key in train_keys if _series(train, key)[0].size]

    figure, axes = _figure(2, 3, (15, 8))
    (loss_ax, terms_ax, mrr_ax), (lr_ax, speed_ax, grad_ax) = axes

    steps, values = _series(train, "loss")
    loss_ax.plot(steps, values, color="black")
    loss_ax.set(title="Total training loss", xlabel="step", ylabel="loss")

    for key in terms:
        terms_ax.plot(*_series(train, key), label=key)
    terms_ax.set(title="Loss terms (unweighted)", xlabel="step", ylabel="loss term")
    if terms:
        terms_ax.legend(fontsize="small")
    else:
        _empty_panel(terms_ax, "no loss terms logged")

    for key in val_keys:
        direction = key.split("/")[1]
        label = DIRECTION_LABELS.get(direction, "mean of both directions")
        steps, values = _series(val, key)
        mrr_ax.plot(steps, 100 * values, marker="o", label=label)
    mrr_ax.set(title="Validation MRR (pool protocol)", xlabel="step", ylabel="MRR (%)")
    if val_keys:
        mrr_ax.legend(fontsize="small")
    else:
        _empty_panel(mrr_ax, "no validation records")

    for axis, key, title, ylabel in (
        (lr_ax, "lr", "Learning rate (main parameter group)", "learning rate"),
        (speed_ax, "pairs_per_s", "Throughput", "pairs / s"),
        (grad_ax, "grad_norm", "Global gradient norm", "‖grad‖₂"),
    ):
        steps, values = _series(train, key)
        if steps.size:
            axis.plot(steps, values)
        else:
            _empty_panel(axis, f"'{key}' not logged")
        axis.set(title=title, xlabel="step", ylabel=ylabel)
    if _series(train, "grad_norm")[1].min(initial=np.inf) > 0:
        grad_ax.set_yscale("log")
    for axis in axes.flat:
        axis.grid(alpha=0.3)
    path = Path(metrics_jsonl_path)
    figure.suptitle(f"Training curves: {path.parent.name}/{path.name}")

    by_step: dict[int, dict] = {}
    for records, keys in ((train, train_keys), (val, val_keys)):
        for record in records:
            row = by_step.setdefault(int(record["step"]), {})
            row.update({key: record[key] for key in keys if key in record})
    columns = [*train_keys, *val_keys]
    rows = [
        [step, *(_csv_value(by_step[step].get(key)) for key in columns)] for step in sorted(by_step)
    ]
    return {
        "png": _save_png(figure, out_dir / f"{name}.png"),
        "csv": _write_csv(out_dir / f"{name}.csv", ["step", *columns], rows),
    }


# ----------------------------------------------------------------------------------------------
# Modality gap.


def modality_gap_distances(
    text_emb: np.ndarray, mol_emb: np.ndarray, *, num_unpaired: int = 20_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Paired and (sampled) unpaired text–molecule distances of L2-normalised embeddings.

    Args:
        text_emb: [N, D] text embeddings; row i pairs with row i of mol_emb.
        mol_emb: [N, D] molecule embeddings.
        num_unpaired: how many unpaired (text i, molecule j != i) combinations to sample, at
            most N * (N - 1); sampling keeps the cost O(num_unpaired * D) for any N.
        seed: seed of the sampling (`np.random.default_rng`).

    Returns:
        paired [N] ||t_i - m_i|| and unpaired [U] ||t_i - m_j|| (i != j), float64, in [0, 2].
    """
    text_emb = _check_embeddings(text_emb, "text_emb")
    mol_emb = _check_embeddings(mol_emb, "mol_emb")
    if text_emb.shape != mol_emb.shape:
        raise ValueError(
            f"text_emb and mol_emb must be aligned pairs of one shape, got {text_emb.shape} "
            f"and {mol_emb.shape}"
        )
    texts, molecules = _unit_rows(text_emb), _unit_rows(mol_emb)  # [N, D] each
    paired = np.linalg.norm(texts - molecules, axis=1)  # [N]
    n = texts.shape[0]
    count = min(int(num_unpaired), n * (n - 1))
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n, size=count)  # [U]
    # An offset in 1..n-1 picks any other molecule uniformly and never the partner.
    cols = (rows + rng.integers(1, max(n, 2), size=count)) % n  # [U]
    unpaired = np.linalg.norm(texts[rows] - molecules[cols], axis=1)  # [U]
    return paired, unpaired


def _density(values: np.ndarray, grid: np.ndarray) -> np.ndarray | None:
    """Gaussian KDE of `values` on `grid` (Scott's bandwidth); None when it is undefined."""
    if values.size < 2 or np.ptp(values) == 0:
        return None  # a single value or all equal: no bandwidth to estimate
    from scipy.stats import gaussian_kde

    return gaussian_kde(values)(grid)


def plot_modality_gap(
    text_emb: np.ndarray,
    mol_emb: np.ndarray,
    out_dir: str | Path,
    *,
    num_unpaired: int = 20_000,
    seed: int = 0,
    name: str = "modality_gap",
    title: str = "",
) -> dict[str, Path]:
    """CMTMR figure 5: densities of paired against unpaired text–molecule distances.

    Distances are Euclidean between L2-normalised embeddings, so in [0, 2] with d^2 = 2 - 2 cos.
    A well-aligned model puts the paired density well left of the unpaired one; the two means
    are the "modality gap" numbers.

    Args:
        text_emb: [N, D] text embeddings; row i pairs with row i of mol_emb.
        mol_emb: [N, D] molecule embeddings.
        out_dir: created if missing.
        num_unpaired: unpaired combinations sampled (see `modality_gap_distances`).
        seed: sampling seed.
        name: file stem of the outputs.
        title: appended to the figure title (e.g. the split).

    Returns:
        {'png': <name>.png, 'json': <name>.json}. The JSON holds paired_mean, unpaired_mean,
        their difference 'gap', standard deviations, counts, the seed, and the density curves.
    """
    paired, unpaired = modality_gap_distances(
        text_emb, mol_emb, num_unpaired=num_unpaired, seed=seed
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = np.linspace(0.0, 2.0, 401)  # the whole range of distances between unit vectors
    curves = {"paired": _density(paired, grid), "unpaired": _density(unpaired, grid)}

    figure, axes = _figure(1, 1, (7, 4.5))
    axis = axes[0, 0]
    colors = {"paired": "tab:green", "unpaired": "tab:red"}
    for kind, values in (("paired", paired), ("unpaired", unpaired)):
        label = f"{kind} (n={values.size:,}, mean {values.mean():.3f})"
        if curves[kind] is not None:
            axis.plot(grid, curves[kind], color=colors[kind], label=label)
            axis.fill_between(grid, curves[kind], color=colors[kind], alpha=0.2)
        elif values.size:
            axis.axvline(values[0], color=colors[kind], label=f"{label}, one value")
        if values.size:
            axis.axvline(values.mean(), color=colors[kind], linestyle="--", linewidth=1)
    axis.set(
        xlim=(0, 2),
        xlabel="Euclidean distance between L2-normalised text and molecule embeddings",
        ylabel="density (Gaussian KDE)",
        title="Modality gap: paired vs unpaired distances" + (f"\n{title}" if title else ""),
    )
    axis.legend()
    axis.grid(alpha=0.3)

    summary = {
        "distance": "Euclidean distance between L2-normalised embeddings (d^2 = 2 - 2 cos)",
        "num_pairs": int(paired.size),
        "num_unpaired_samples": int(unpaired.size),
        "seed": int(seed),
        "paired_mean": float(paired.mean()),
        "paired_std": float(paired.std()),
        "unpaired_mean": float(unpaired.mean()) if unpaired.size else None,
        "unpaired_std": float(unpaired.std()) if unpaired.size else None,
        "gap": float(unpaired.mean() - paired.mean()) if unpaired.size else None,
        "density_grid": grid.tolist(),
        "paired_density": None if curves["paired"] is None else curves["paired"].tolist(),
        "unpaired_density": None if curves["unpaired"] is None else curves["unpaired"].tolist(),
    }
    return {
        "png": _save_png(figure, out_dir / f"{name}.png"),
        "json": _write_json(out_dir / f"{name}.json", summary),
    }


# ----------------------------------------------------------------------------------------------
# Rank distribution.


def hits_at_every_k(ranks, pool_size: int) -> np.ndarray:
    """hits@k for k = 1..pool_size, from plain ranks or tie counts.

    Args:
        ranks: [Q] integer 1-based ranks (hits@k = mean [r <= k]), or `metrics.RankCounts`,
            whose hits@k is the expectation under random tie-breaking, as the headline of
            `metrics.metrics_from_ranks`.
        pool_size: C, the largest k.

    Returns:
        [C] float64; element k-1 is hits@k.
    """
    if isinstance(ranks, metrics.RankCounts):
        h, t = ranks.num_higher, ranks.num_tied
        # Each query's rank is uniform on h+1..h+t+1: add its probability mass 1/(t+1) to that
        # range with a difference array, then two cumulative sums give the CDF at every k.
        mass = np.zeros(pool_size + 2)
        np.add.at(mass, h + 1, 1.0 / (t + 1.0))
        np.add.at(mass, h + t + 2, -1.0 / (t + 1.0))
        cdf = np.cumsum(np.cumsum(mass))[1 : pool_size + 1]
        return np.minimum(cdf / h.size, 1.0)
    ranks = np.asarray(ranks, np.int64)
    counts = np.bincount(ranks, minlength=pool_size + 1)[1 : pool_size + 1]  # [C]
    return np.cumsum(counts) / ranks.size


def rank_bins(pool_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank bins 1, 2, 3-4, 5-8, ..., the last one ending at pool_size.

    Returns:
        (first rank, last rank) of each bin, int64 [B] each, both ends included.
    """
    bin_to = [1]
    while bin_to[-1] < pool_size:
        bin_to.append(min(2 * bin_to[-1], pool_size))
    bin_to = np.asarray(bin_to, np.int64)
    bin_from = np.concatenate([[1], bin_to[:-1] + 1])
    return bin_from, bin_to


def plot_rank_distribution(
    ranks_by_direction: Mapping[str, np.ndarray],
    out_dir: str | Path,
    *,
    pool_sizes: Mapping[str, int] | None = None,
    name: str = "rank_distribution",
    title: str = "",
) -> dict[str, Path]:
    """Histogram of the gold rank per direction (log x) and hits@k against k (log x).

    Args:
        ranks_by_direction: {direction: ranks}, e.g. {'t2m': ..., 'm2t': ...}; each value is
            [Q] plain 1-based ranks or `metrics.RankCounts`. The histogram shows optimistic ranks
            (1 + #higher) either way; hits@k is the expectation under random tie-breaking when
            tie counts are given (equal to the optimistic curve when nothing ties).
        out_dir: created if missing.
        pool_sizes: {direction: C}; default: the largest rank seen.
        name: file stem of the outputs.
        title: appended to the figure title.

    Returns:
        {'png', 'csv' (k and hits@k per direction, k = 1..max pool size; empty beyond a
        direction's pool), 'histogram_csv' (rank range of each bin, queries per direction)}.
    """
    if not ranks_by_direction:
        raise ValueError("ranks_by_direction is empty")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    optimistic, hits, tie_aware = {}, {}, {}
    for direction, ranks in ranks_by_direction.items():
        if isinstance(ranks, metrics.RankCounts):
            top = int(ranks.pessimistic.max())
            optimistic[direction] = np.asarray(ranks.optimistic, np.int64)
            tie_aware[direction] = True
        else:
            optimistic[direction] = np.asarray(ranks, np.int64)
            top = int(optimistic[direction].max())
            tie_aware[direction] = False
        if optimistic[direction].ndim != 1 or optimistic[direction].min() < 1:
            raise ValueError(f"{direction}: ranks must be [Q] integers >= 1")
        pool = int((pool_sizes or {}).get(direction, top))
        if pool < top:
            raise ValueError(f"{direction}: a rank of {top} in a pool of {pool}")
        hits[direction] = hits_at_every_k(ranks, pool)
    largest_pool = max(len(curve) for curve in hits.values())

    figure, axes = _figure(1, 2, (13, 4.8))
    hist_ax, hits_ax = axes[0]
    # Bins that double in width (rank 1, 2, 3-4, 5-8, ...): equal widths on a log axis, and
    # each bin reads as a plain range of ranks.
    bin_from, bin_to = rank_bins(largest_pool)
    bin_labels = [str(a) if a == b else f"{a}–{b}" for a, b in zip(bin_from, bin_to, strict=True)]
    positions = np.arange(len(bin_from))
    bar_width = 0.8 / len(optimistic)
    histogram_rows: dict[str, np.ndarray] = {}
    for index, (direction, ranks) in enumerate(optimistic.items()):
        label = DIRECTION_LABELS.get(direction, direction)
        # Bin b holds ranks bin_from[b]..bin_to[b]: searchsorted on the upper ends finds it.
        counts = np.bincount(np.searchsorted(bin_to, ranks), minlength=len(bin_from))
        histogram_rows[direction] = counts
        hist_ax.bar(
            positions + (index - (len(optimistic) - 1) / 2) * bar_width,
            100 * counts / ranks.size,
            width=bar_width,
            label=f"{label} (n={ranks.size:,})",
        )
        ks = np.arange(1, len(hits[direction]) + 1)
        tag = "expected" if tie_aware[direction] else "ranks as given"
        hits_ax.plot(
            ks,
            hits[direction],
            label=f"{label}: H@1 {100 * hits[direction][0]:.1f} %, "
            f"H@10 {100 * hits[direction][min(9, len(ks) - 1)]:.1f} % ({tag})",
        )
    hist_ax.set_xticks(positions, bin_labels, rotation=45, ha="right", fontsize="small")
    hist_ax.set(
        xlabel="rank of the gold item (bins double in width: a log scale)",
        ylabel="% of queries",
        title="Gold rank per query (optimistic ranks: 1 + #strictly higher)",
    )
    hist_ax.legend(fontsize="small")
    hits_ax.set_xscale("log")
    hits_ax.set(
        xlim=(1, largest_pool),
        ylim=(0, 1.02),
        xlabel="k",
        ylabel="hits@k (fraction of queries)",
        title="hits@k against k"
        + (" (ties broken at random, expectation)" if any(tie_aware.values()) else ""),
    )
    hits_ax.legend(fontsize="small", loc="best")
    for axis in (hist_ax, hits_ax):
        axis.grid(alpha=0.3, which="both")
    if title:
        figure.suptitle(title)

    directions = list(hits)
    rows = [
        [k, *(_csv_value(hits[d][k - 1]) if k <= len(hits[d]) else "" for d in directions)]
        for k in range(1, largest_pool + 1)
    ]
    histogram = [
        [int(bin_from[b]), int(bin_to[b]), *(int(histogram_rows[d][b]) for d in directions)]
        for b in range(len(bin_from))
    ]
    return {
        "png": _save_png(figure, out_dir / f"{name}.png"),
        "csv": _write_csv(
            out_dir / f"{name}.csv", ["k", *(f"{d}_hits@k" for d in directions)], rows
        ),
        "histogram_csv": _write_csv(
            out_dir / f"{name}_histogram.csv",
            ["rank_from", "rank_to", *(f"{d}_queries" for d in directions)],
            histogram,
        ),
    }


# ----------------------------------------------------------------------------------------------
# PCA.


def embedding_pca(
    text_emb: np.ndarray, mol_emb: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Projects both modalities' L2-normalised embeddings on their joint top-2 principal axes.

    Args:
        text_emb: [T, D]; mol_emb: [M, D].

    Returns:
        text_xy [T, 2], mol_xy [M, 2] and explained_variance_ratio [2].
    """
    text_emb = _check_embeddings(text_emb, "text_emb")
    mol_emb = _check_embeddings(mol_emb, "mol_emb")
    if text_emb.shape[1] != mol_emb.shape[1]:
        raise ValueError(f"embedding sizes differ: {text_emb.shape[1]} and {mol_emb.shape[1]}")
    joint = np.concatenate([_unit_rows(text_emb), _unit_rows(mol_emb)])  # [T + M, D]
    centred = joint - joint.mean(axis=0)
    # Economy SVD: the right singular vectors are the principal axes.
    _, singular, axes_t = np.linalg.svd(centred, full_matrices=False)
    variance = singular**2
    total = variance.sum()
    ratio = variance[:2] / total if total > 0 else np.zeros(2)
    ratio = np.pad(ratio, (0, 2 - ratio.size))
    # Fix each axis' sign (largest loading positive) so repeated runs draw the same picture.
    components = axes_t[:2]  # [<=2, D]
    pivot = np.abs(components).argmax(axis=1)  # the largest loading of each axis
    components = components * np.sign(components[np.arange(len(components)), pivot])[:, None]
    projected = centred @ components.T  # [T + M, <=2]
    projected = np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))
    return projected[: len(text_emb)], projected[len(text_emb) :], ratio


def plot_embedding_pca(
    text_emb: np.ndarray,
    mol_emb: np.ndarray,
    out_dir: str | Path,
    *,
    max_points: int = 5000,
    seed: int = 0,
    name: str = "embedding_pca",
    title: str = "",
) -> dict[str, Path]:
    """2-D PCA of text and molecule embeddings, coloured by modality.

    The axes are fitted on all rows of both modalities (L2-normalised, jointly centred); at most
    `max_points` rows per modality (a seeded sample) are drawn and written out.

    Args:
        text_emb: [T, D] text embeddings.
        mol_emb: [M, D] molecule embeddings.
        out_dir: created if missing.
        max_points: rows drawn per modality.
        seed: seed of the subsample.
        name: file stem of the outputs.
        title: appended to the figure title.

    Returns:
        {'png', 'csv' (modality, row, pc1, pc2 of every drawn point), 'json' (explained
        variance ratio, centroids, counts)}.
    """
    text_xy, mol_xy, ratio = embedding_pca(text_emb, mol_emb)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    drawn = {}
    for modality, xy in (("text", text_xy), ("molecule", mol_xy)):
        rows = np.arange(len(xy))
        if len(rows) > max_points:
            rows = np.sort(rng.choice(len(xy), size=max_points, replace=False))
        drawn[modality] = (rows, xy[rows])

    figure, axes = _figure(1, 1, (6.5, 6.8))
    axis = axes[0, 0]
    size = 12 if max(len(r) for r, _ in drawn.values()) <= 1000 else 4
    for modality, (rows, xy) in drawn.items():
        full = text_xy if modality == "text" else mol_xy
        axis.scatter(
            xy[:, 0],
            xy[:, 1],
            s=size,
            alpha=0.5,
            color=MODALITY_COLORS[modality],
            label=f"{modality} ({len(rows):,} of {len(full):,} shown)",
            linewidths=0,
        )
    for modality, full in (("text", text_xy), ("molecule", mol_xy)):
        centre = full.mean(axis=0)
        axis.scatter(
            *centre,
            marker="X",
            s=150,
            color=MODALITY_COLORS[modality],
            edgecolors="black",
            label=f"{modality} centroid",
        )
    axis.set(
        xlabel=f"PC 1 ({100 * ratio[0]:.1f} % of variance)",
        ylabel=f"PC 2 ({100 * ratio[1]:.1f} % of variance)",
        title="PCA of L2-normalised embeddings" + (f"\n{title}" if title else ""),
    )
    # Below the axes: real embeddings can fill any corner of the plot.
    legend = axis.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=2)
    for handle in legend.legend_handles:
        handle.set_sizes([40])  # the drawn dots are tiny; the legend's need not be
    axis.grid(alpha=0.3)

    csv_rows = [
        [modality, int(row), _csv_value(x), _csv_value(y)]
        for modality, (rows, xy) in drawn.items()
        for row, (x, y) in zip(rows, xy, strict=True)
    ]
    summary = {
        "explained_variance_ratio": [float(r) for r in ratio],
        "num_text": len(text_xy),
        "num_molecule": len(mol_xy),
        "num_drawn": {modality: len(rows) for modality, (rows, _) in drawn.items()},
        "text_centroid": [float(v) for v in text_xy.mean(axis=0)],
        "molecule_centroid": [float(v) for v in mol_xy.mean(axis=0)],
        "seed": int(seed),
    }
    return {
        "png": _save_png(figure, out_dir / f"{name}.png"),
        "csv": _write_csv(out_dir / f"{name}.csv", ["modality", "row", "pc1", "pc2"], csv_rows),
        "json": _write_json(out_dir / f"{name}.json", summary),
    }


# ----------------------------------------------------------------------------------------------
# Evaluation results.


def _pair_rows(ids: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """Row of each wanted id in `ids` (first occurrence)."""
    index: dict[str, int] = {}
    for row, identifier in enumerate(ids.tolist()):
        index.setdefault(str(identifier), row)
    missing = [str(i) for i in wanted.tolist() if str(i) not in index]
    if missing:
        raise ValueError(f"{len(missing)} query ids have no {what} row, e.g. {missing[:3]}")
    return np.asarray([index[str(i)] for i in wanted.tolist()], np.int64)


def evaluation_rank_counts(arrays: Mapping[str, np.ndarray]) -> dict[str, metrics.RankCounts]:
    """Recomputes both directions' `RankCounts` from an evaluation .npz's arrays.

    Queries are `query_ids` (or, without it, row i of both sides when text_ids == mol_ids);
    t2m ranks every row of mol_emb for each query text, m2t every row of text_emb for each
    query molecule. Scores are cosines of L2-normalised embeddings, except for
    `momu_sentence` results (they hold `sentence_emb`), whose text_emb is the mean unit
    sentence vector, scored unnormalised: score = text_emb @ unit(mol_emb).T (docs/evaluation.md).

    Returns:
        {'t2m': RankCounts, 'm2t': RankCounts}, queries in query order.
    """
    text_ids, mol_ids = np.asarray(arrays["text_ids"]), np.asarray(arrays["mol_ids"])
    text_emb, mol_emb = np.asarray(arrays["text_emb"]), np.asarray(arrays["mol_emb"])
    query_ids = np.asarray(arrays["query_ids"]) if "query_ids" in arrays else None
    if query_ids is None:
        if text_ids.tolist() != mol_ids.tolist():
            raise ValueError("without query_ids, text_ids and mol_ids must be the same pairs")
        query_ids = text_ids
    text_rows = _pair_rows(text_ids, query_ids, "text")  # [Q] gold of m2t
    mol_rows = _pair_rows(mol_ids, query_ids, "molecule")  # [Q] gold of t2m
    if "sentence_emb" in arrays:
        unit_mol = _unit_rows(mol_emb).astype(np.float32)
        scores = np.asarray(text_emb, np.float32) @ unit_mol.T  # [T, M] mean sentence cosines
        return {
            "t2m": metrics.rank_counts_from_scores(scores[text_rows], mol_rows),
            "m2t": metrics.rank_counts_from_scores(scores.T[mol_rows], text_rows),
        }
    return {
        "t2m": metrics.rank_counts_from_embeddings(text_emb[text_rows], mol_emb, mol_rows),
        "m2t": metrics.rank_counts_from_embeddings(mol_emb[mol_rows], text_emb, text_rows),
    }


def plot_evaluation(
    npz_path: str | Path, json_path: str | Path, out_dir: str | Path
) -> dict[str, dict[str, Path]]:
    """All evaluation figures of one `evaluate.py` result.

    Ranks are recomputed from the embeddings with `jaxmol.metrics` (see
    `evaluation_rank_counts`); the modality gap and the PCA use the query pairs (text and
    molecule with the same id; for `momu_sentence`, the paragraph's mean sentence vector, which
    these two figures L2-normalise). A summary JSON records the recomputed metrics next to the
    report's, so a figure that disagrees with the table is noticed.

    Args:
        npz_path: WORKDIR/eval/<stem>.npz (text_ids, text_emb, mol_ids, mol_emb, query_ids, ...).
        json_path: the report beside it (split, protocol, t2m / m2t metrics).
        out_dir: outputs are named <stem>__rank_distribution.png and so on.

    Returns:
        {'rank_distribution': paths, 'modality_gap': paths, 'embedding_pca': paths,
         'summary': {'json': <stem>__plots.json}}.
    """
    npz_path, json_path, out_dir = Path(npz_path), Path(json_path), Path(out_dir)
    report = json.loads(json_path.read_text())
    with np.load(npz_path, allow_pickle=False) as stored:
        arrays = {key: stored[key] for key in stored.files}
    stem = npz_path.stem
    title = f"{report.get('split', stem)}, {report.get('protocol', '?')} protocol"
    step = report.get("checkpoint_step")
    if step is not None:
        title += f", step {step}"

    counts = evaluation_rank_counts(arrays)
    pool_sizes = {"t2m": len(arrays["mol_emb"]), "m2t": len(arrays["text_emb"])}
    outputs: dict[str, dict[str, Path]] = {
        "rank_distribution": plot_rank_distribution(
            counts, out_dir, pool_sizes=pool_sizes, name=f"{stem}__rank_distribution", title=title
        )
    }
    query_ids = arrays.get("query_ids", arrays["text_ids"])
    text_rows = _pair_rows(arrays["text_ids"], query_ids, "text")
    mol_rows = _pair_rows(arrays["mol_ids"], query_ids, "molecule")
    text_pairs, mol_pairs = arrays["text_emb"][text_rows], arrays["mol_emb"][mol_rows]
    outputs["modality_gap"] = plot_modality_gap(
        text_pairs, mol_pairs, out_dir, name=f"{stem}__modality_gap", title=title
    )
    outputs["embedding_pca"] = plot_embedding_pca(
        text_pairs, mol_pairs, out_dir, name=f"{stem}__embedding_pca", title=title
    )

    recomputed = {
        direction: metrics.metrics_from_ranks(counts[direction], pool_size=pool_sizes[direction])
        for direction in counts
    }
    differences = {
        f"{direction}/{key}": abs(recomputed[direction][key] - report[direction][key])
        for direction in counts
        if isinstance(report.get(direction), dict)
        for key in ("hits@1", "hits@10", "mrr", "mean_rank")
        if isinstance(report[direction].get(key), int | float)
    }
    largest = max(differences.values(), default=0.0)
    if largest > 1e-6:
        logger.warning(
            "%s: metrics recomputed from the embeddings differ from %s by up to %.3g (%s); "
            "the report may predate tie-aware metrics or use another scoring",
            npz_path,
            json_path,
            largest,
            max(differences, key=differences.get),
        )
    summary = {
        "npz": str(npz_path),
        "json": str(json_path),
        "recomputed": recomputed,
        "abs_difference_vs_report": differences,
        "outputs": {kind: {k: str(v) for k, v in paths.items()} for kind, paths in outputs.items()},
    }
    outputs["summary"] = {"json": _write_json(out_dir / f"{stem}__plots.json", summary)}
    return outputs
