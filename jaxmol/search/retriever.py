"""A trained checkpoint as an encoder of free texts and SMILES strings.

`Retriever.from_workdir` restores the parameters and BatchNorm statistics only (no optimiser,
`jaxmol.evaluation.restore_for_eval`) and embeds through the evaluation `Embedder` on all local
devices (or all devices of all processes, `join_processes`), with the run's tokenizer and
featuriser: a query embedded here is the vector the evaluation protocols would compute for the
same text or molecule. A library build embeds through the same `Embedder.embed_molecules`,
with graph budgets kept across its pieces (`LibraryMoleculeEncoder`).

Every embedding it returns is L2-normalised with `jaxmol.metrics.l2_normalize_rows` (float64
division, one rounding to float32), exactly as the protocols normalise before their cosine, so
a dot product of two rows is the protocols' score.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from rdkit import rdBase

from jaxmol import builders
from jaxmol.data import batching, featurize
from jaxmol.data.featurize import FeaturizedSplit
from jaxmol.evaluation.embedder import Embedder
from jaxmol.evaluation.restore import describe_weights, restore_for_eval
from jaxmol.metrics import l2_normalize_rows
from jaxmol.parallel import DataParallel, select_devices

logger = logging.getLogger(__name__)


def params_hash(variables: dict) -> str:
    """SHA-256 over every array of {'params', 'batch_stats'}: path, dtype, shape and bytes.

    Two checkpoints hash alike only when every weight and statistic is bit-identical, whatever
    device they were restored on.
    """
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def join_processes(join: bool | None = None) -> bool:
    """Joins this process to the other processes of a multi-process search (once).

    Then the retriever's devices are those of all processes: every process must make the same
    calls (encode, build, search) with the same inputs, and each gets every result back; only
    process 0 writes index files (`jaxmol.search.index`). Call it before anything else uses
    JAX. Settings come from ``$JAXMOL_COORDINATOR_ADDRESS``, ``$JAXMOL_NUM_PROCESSES`` and
    ``$JAXMOL_PROCESS_ID`` (`python -m jaxmol.launch` sets them), else from JAX's cluster
    detection (`jaxmol.distributed.initialize`). Processes other than 0 then log warnings and
    errors only.

    Args:
      join: True to join; None = only when ``$JAXMOL_PROCESS_ID`` is set; False: never.

    Returns:
      Whether this process joined (or had joined) a run of several processes.
    """
    from jaxmol import distributed
    from jaxmol.config import default_config

    if join is None:
        join = distributed.requested()
    if join:
        distributed.initialize(default_config())
        distributed.quiet_unless_primary()
    return bool(join) and jax.process_count() > 1


class _DropFeaturizeChatter(logging.Filter):
    """Drops `featurize_split`'s per-call log lines while the search reports failures itself
    (its warning would list every failing id of every chunk)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("skipping ", "featurised "))


@contextlib.contextmanager
def quiet_featurizer() -> Iterator[None]:
    """Silences the per-call lines of `jaxmol.data.featurize` inside the block."""
    featurize_logger = logging.getLogger(featurize.__name__)
    chatter = _DropFeaturizeChatter()
    featurize_logger.addFilter(chatter)
    try:
        yield
    finally:
        featurize_logger.removeFilter(chatter)


class Retriever:
    """Embeds texts and molecules with a trained model, in eval mode, on all devices (of all
    processes, once `join_processes` joined several).

    Build one with `from_workdir`; the constructor takes already restored pieces.

    Args:
      model: the eval-mode `RetrievalModel` (no device axis).
      variables: its {'params', 'batch_stats'} (one copy, any device).
      config: the run config (tokenizer, featuriser, eval batch size).
      step: the checkpoint step the variables come from.
      workdir: the training workdir (recorded in index metadata), or None.
      num_devices: devices to embed on (-1: all local devices; with several processes, all
        devices of all of them).
      parallel: 'shard_map' or 'pmap'.
      batch_size: texts or molecules per embedding batch; 0 = the run's ``eval_batch_size``.
      weights: a description of which weights these are (for messages).

    Attributes:
      params_hash: `params_hash` of the variables (an index records it).
      embed_dim: D, the embedding size.
      featurizer: 'ogb' or 'mol2vec'.
    """

    def __init__(
        self,
        model,
        variables: dict,
        config,
        *,
        step: int,
        workdir: str | os.PathLike | None = None,
        num_devices: int = -1,
        parallel: str = "shard_map",
        batch_size: int = 0,
        weights: str = "",
    ):
        self.model = model
        self.config = config
        self.step = int(step)
        self.workdir = str(Path(workdir).expanduser().absolute()) if workdir else None
        self.weights = weights or f"checkpoint of step {self.step}"
        self.params_hash = params_hash(variables)
        self.runner = DataParallel(parallel, select_devices(num_devices))
        self.embedder = Embedder(model, self.runner)
        self.variables = self.embedder.replicate(variables)
        self.encoder = builders.split_encoder(config)
        self.featurizer = builders.featurizer_for(config)
        self.batch_size = int(batch_size) if batch_size > 0 else int(config.eval_batch_size)
        self.embed_dim = self.embedder.embed_dim

    @classmethod
    def from_workdir(
        cls,
        workdir: str | os.PathLike,
        step: int | str = "best",
        *,
        num_devices: int = -1,
        parallel: str = "shard_map",
        batch_size: int = 0,
        join: bool | None = None,
    ) -> Retriever:
        """Restores a training workdir's checkpoint (parameters and batch statistics only).

        Args:
          workdir: a training workdir (holds ``checkpoints/``).
          step: 'best' (best validation checkpoint; the latest when none was validated),
            'latest', or a step number.
          num_devices, parallel, batch_size: as the constructor.
          join: join the other processes of a multi-process run first (`join_processes`);
            None = when started by `python -m jaxmol.launch` (``$JAXMOL_PROCESS_ID`` set).

        Raises:
          jaxmol.checkpointing.CheckpointError: no workdir, no checkpoint, or an unreadable one.
          jaxmol.distributed.DistributedError: the other processes cannot be joined.
        """
        join_processes(join)
        model, variables, config, restored = restore_for_eval(workdir, step)
        return cls(
            model,
            variables,
            config,
            step=restored,
            workdir=workdir,
            num_devices=num_devices,
            parallel=parallel,
            batch_size=batch_size,
            weights=describe_weights(step, restored, config),
        )

    def checkpoint_info(self) -> dict:
        """What an index records about the weights that embedded it."""
        return {"workdir": self.workdir, "step": self.step, "params_sha256": self.params_hash}

    def model_info(self) -> dict:
        """What an index records about the model and its inputs."""
        return {
            "featurizer": self.featurizer,
            "featurizer_version": featurize.FEATURIZER_VERSION,
            "rdkit_version": rdBase.rdkitVersion,
            "mol_encoder": self.config.model.mol_encoder,
            "max_text_length": int(self.config.data.max_text_length),
            "text_model_dir": builders.text_model_dir(self.config),
            "embed_dim": self.embed_dim,
        }

    def _batch_for(self, count: int) -> int:
        """The embedding batch for `count` items: the run's batch, or the next power of two
        when fewer (a single query is not padded to a whole batch; few shapes compile)."""
        return min(self.batch_size, 1 << max(count - 1, 0).bit_length())

    # -----------------------------------------------------------------------------------------
    # Texts.

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embeds texts (cut at the run's max text length).

        Args:
          texts: [N] strings.

        Returns:
          float32 [N, D], unit rows.

        Raises:
          ValueError: a text is empty or blank (naming its position), or not a string.
        """
        texts = list(texts)
        for position, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"text {position} is not a string: {text!r}")
            if not text.strip():
                raise ValueError(f"text {position} is empty: give a description to search with")
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        tokens = self.encoder.texts(texts)
        raw = self.embedder.embed_texts(
            self.variables, tokens, batch_size=self._batch_for(len(texts))
        )
        return l2_normalize_rows(raw, "text embeddings")

    # -----------------------------------------------------------------------------------------
    # Molecules.

    def featurize(self, smiles: Sequence[str], ids: Sequence[str] | None = None) -> FeaturizedSplit:
        """Featurises SMILES with the run's featuriser; unreadable ones are marked invalid and
        listed in ``failures`` (nothing is cached on disk)."""
        smiles = [s if isinstance(s, str) else "" for s in smiles]
        ids = [str(i) for i in (ids if ids is not None else range(len(smiles)))]
        with quiet_featurizer():
            return featurize.featurize_split(
                ids, smiles, featurizer=self.featurizer, on_invalid="skip", use_cache=False
            )

    def embed_featurized(self, graphs: FeaturizedSplit) -> np.ndarray:
        """Embeds the valid molecules of `graphs`, in order: float32 [num_valid, D], unit rows."""
        rows = np.flatnonzero(graphs.valid)
        if len(rows) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        raw = self.embedder.embed_molecules(
            self.variables, graphs, rows, batch_size=self._batch_for(len(rows))
        )
        return l2_normalize_rows(raw, "molecule embeddings")

    def encode_smiles(self, smiles: Sequence[str]) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
        """Embeds molecules given as SMILES.

        Args:
          smiles: [N] SMILES strings.

        Returns:
          (embeddings, failures): float32 [N, D] with unit rows, row i for smiles[i]; the row of
          a molecule RDKit cannot read is NaN, and `failures` lists each of those as
          (position, SMILES, reason).
        """
        smiles = list(smiles)
        out = np.full((len(smiles), self.embed_dim), np.nan, np.float32)
        if not smiles:
            return out, []
        graphs = self.featurize(smiles)
        out[graphs.valid] = self.embed_featurized(graphs)
        bad = np.flatnonzero(~graphs.valid)
        failures = [
            (int(position), smiles[position], reason)
            for position, (_, _, reason) in zip(bad, graphs.failures, strict=True)
        ]
        return out, failures


@dataclasses.dataclass(frozen=True)
class PreparedPiece:
    """A featurised piece of a library and the graph budgets it is packed into.

    Attributes:
      graphs: the piece's featurised molecules.
      rows: int64 [n] its valid molecules, in order.
      budgets: the levels to pack them into (None when there is no valid molecule yet).
    """

    graphs: FeaturizedSplit
    rows: np.ndarray
    budgets: batching.GraphBudgets | None


def budgets_to_json(budgets: batching.GraphBudgets | None) -> dict | None:
    """Graph budget levels as JSON (recorded in an index's metadata)."""
    if budgets is None:
        return None
    return {"nodes": list(budgets.nodes), "edges": list(budgets.edges)}


def budgets_from_json(value: dict | None) -> batching.GraphBudgets | None:
    """The inverse of `budgets_to_json`."""
    if not value:
        return None
    return batching.GraphBudgets(tuple(value["nodes"]), tuple(value["edges"]))


class LibraryMoleculeEncoder:
    """Keeps a library build's graph budgets across its pieces; the evaluation `Embedder`
    embeds.

    `Retriever.embed_featurized` derives graph budget levels from the molecules of each call,
    so every piece of a large library would bring new shapes and new compilations. Here the
    levels come from the first piece and only grow at the top (`Embedder.molecule_budgets`)
    when a later piece needs more: a whole library compiles a handful of shapes, and every
    piece is embedded at the retriever's full batch size. The levels are recorded in the
    index metadata after every shard; since they only grow at the top, a resumed build packs
    (and so embeds) every molecule exactly as an uninterrupted one. Batching, packing and
    streaming are the Embedder's (`embed_molecules`), so with several processes every process
    walks the same batches, packs only its own devices' chunks and gets every row back.

    `prepare` (host work: the levels) may run in the build's reader thread and `embed` (device
    work) in the main thread: a prepared piece carries the levels it was prepared with.

    Args:
      retriever: the `Retriever` whose embedder, variables and batch size embed the library.
      budgets: levels to start from (`budgets_to_json` of a resumed build), or None.
    """

    def __init__(self, retriever: Retriever, budgets: dict | None = None):
        self._retriever = retriever
        self.budgets = budgets_from_json(budgets)

    def budgets_dict(self) -> dict | None:
        """The current budget levels as JSON (a resumed build starts from them)."""
        return budgets_to_json(self.budgets)

    def prepare(self, graphs: FeaturizedSplit) -> PreparedPiece:
        """Grows the levels to fit the valid molecules of `graphs` (host work only)."""
        rows = np.flatnonzero(graphs.valid)
        if len(rows):
            self.budgets = self._retriever.embedder.molecule_budgets(
                graphs, rows, batch_size=self._retriever.batch_size, start=self.budgets
            )
        return PreparedPiece(graphs, rows, self.budgets)

    def embed(self, prepared: PreparedPiece, num_valid: int | None = None) -> np.ndarray:
        """Embeds a prepared piece: float32 [num_valid, D] unit rows, in molecule order.

        Args:
          prepared: from `prepare`.
          num_valid: the piece's valid molecules, if the caller wants that checked.
        """
        retriever, rows = self._retriever, prepared.rows
        if num_valid is not None and num_valid != len(rows):
            raise ValueError(f"the prepared piece holds {len(rows)} molecules, not {num_valid}")
        if len(rows) == 0:
            return np.zeros((0, retriever.embed_dim), np.float32)
        raw = retriever.embedder.embed_molecules(
            retriever.variables,
            prepared.graphs,
            rows,
            batch_size=retriever.batch_size,
            budgets=prepared.budgets,
        )
        return l2_normalize_rows(raw, "molecule embeddings")
