"""One way to turn a split into model inputs: tokenised texts and featurised molecules.

`SplitEncoder` is what training, validation, the end-of-run test splits and `evaluate.py` all
use, so every one of them follows the run's ``data.on_invalid`` policy, tokenizer length and
featuriser. Build one from a run config with `jaxmol.builders.split_encoder`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxmol.data.datasets import PairDataset
from jaxmol.data.featurize import FeaturizedSplit, featurize_split
from jaxmol.data.tokenize import TokenizedTexts, Tokenizer, tokenize_texts

ON_INVALID = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
    """A split ready for batching: tokenised texts and featurised graphs, aligned by row.

    Attributes:
      dataset: the `PairDataset` it came from (M rows).
      tokens: the M tokenised texts.
      graphs: the M featurised molecules (invalid ones have ``valid`` False).
      rows: int64 [M'], the rows that can be batched (molecule featurised); M' <= M.
    """

    dataset: PairDataset
    tokens: TokenizedTexts
    graphs: FeaturizedSplit
    rows: np.ndarray

    @property
    def skipped(self) -> tuple[tuple[str, str, str], ...]:
        """(id, SMILES, reason) of every pair left out because its molecule failed."""
        return self.graphs.failures


@dataclasses.dataclass(frozen=True)
class SplitEncoder:
    """Tokenises texts and featurises molecules the way a model expects.

    Calling it on a `PairDataset` gives the `EncodedSplit` of its pairs; `molecules` and
    `texts` encode one modality alone.

    Attributes:
      tokenizer: the run's tokenizer (its max length is the run's).
      featurizer: 'ogb' (GIN) or 'mol2vec' (official GCN).
      on_invalid: 'error' (a molecule RDKit cannot read stops with an error naming it) or
        'skip' (it is reported, counted in ``failures`` and left out).
      cache_dir: the feature cache (None: the default one).
    """

    tokenizer: Tokenizer
    featurizer: str = "ogb"
    on_invalid: str = "error"
    cache_dir: str | None = None

    def __post_init__(self):
        if self.on_invalid not in ON_INVALID:
            raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {self.on_invalid!r}")

    def __call__(self, dataset: PairDataset) -> EncodedSplit:
        if dataset.texts is None:
            raise ValueError(f"{dataset.name} has no texts; it cannot be encoded as pairs")
        tokens = self.texts(dataset.texts, ids=dataset.ids)
        graphs = self.molecules(dataset)
        return EncodedSplit(dataset, tokens, graphs, np.flatnonzero(graphs.valid))

    def molecules(self, dataset: PairDataset) -> FeaturizedSplit:
        """Featurises every molecule of `dataset` (cached on disk, see `featurize_split`)."""
        return featurize_split(
            dataset.ids,
            dataset.smiles,
            featurizer=self.featurizer,
            on_invalid=self.on_invalid,
            cache_dir=self.cache_dir,
        )

    def texts(self, texts: Sequence[str], ids: Sequence[str] | None = None) -> TokenizedTexts:
        """Tokenises `texts` ([CLS] text [SEP], cut at the tokenizer's max length)."""
        return tokenize_texts(self.tokenizer, texts, ids=ids)
