"""A search index: a library's embeddings in shard files, built streamed and resumable.

Layout of an index directory (format version 1; docs/search.md):

    meta.json                 what the index is and how it was built (below); written last
    failures.tsv              every input row that could not be embedded: line, id, value, reason
    shards/000000.emb.npy     float32 (or float16) [n, D] unit rows, one .npy per shard
    shards/000000.ids.txt     n lines, one JSON string each: the row ids
    shards/000000.values.txt  n lines, one JSON string each: the SMILES (or the texts)
    shards/000000.failures.tsv  this shard's failures

``meta.json`` names the checkpoint (workdir, step, SHA-256 of the parameters and batch
statistics), the featuriser and RDKit versions, the embedding dimension, dtype and count, the
input and the shard size, and lists every finished shard with its sizes and SHA-256 sums. It is
the commit point: a shard counts once meta.json lists it (written atomically after the shard's
files are on disk). An interrupted build leaves ``"status": "building"``; building again into
the same directory removes the files of the unfinished shard and goes on from the next input
record, so a resumed index equals an uninterrupted one. `Index.load` refuses an unfinished or
damaged index and, given a retriever, one built from other weights.

With several processes (`jaxmol.search.join_processes`; the retriever's devices are those of
every process) every process reads and featurises the same input, embeds its own devices'
share of every batch and gets every embedding back; process 0 alone writes the index files,
and the others wait for it at a barrier where they need its files (the start of a build, its
end, `save`). The index directory must then be on storage every process sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from jaxmol import distributed
from jaxmol.checkpointing import CheckpointError
from jaxmol.config import ConfigError
from jaxmol.data import batching
from jaxmol.data.datasets import DataError, sha256_file
from jaxmol.search import readers
from jaxmol.search.readers import Record, Source
from jaxmol.search.topk import DeviceLibrary, ExactTopK, competition_ranks

logger = logging.getLogger(__name__)

FORMAT = "jaxmol-search-index"
FORMAT_VERSION = 1
META = "meta.json"
SHARDS = "shards"
FAILURES = "failures.tsv"
KINDS = ("molecules", "texts")
DTYPES = ("float32", "float16")
DEFAULT_SHARD_SIZE = 16_384
# Records read, featurised and embedded together: the reader thread works on the next piece
# while the devices embed this one, so reading overlaps compute from the first piece on.
PIECE_SIZE = 1_024
MAX_K = 10_000
_FILES = ("emb", "ids", "values", "failures")
_SUFFIX = {"emb": ".emb.npy", "ids": ".ids.txt", "values": ".values.txt"}
_SUFFIX["failures"] = ".failures.tsv"


# Each error below is also the project error of its kind, so the command line
# (`jaxmol.cli.run_guarded`) exits with the documented status without knowing search exists.


class SearchError(ValueError):
    """Base class of the search errors below."""


class IndexFileError(SearchError, DataError):
    """Not an index, an unfinished one, or a damaged one (a data error: exit status 3)."""


class WrongCheckpointError(SearchError, CheckpointError):
    """The index was embedded with other weights (or another featuriser) than the retriever's
    (a checkpoint error: exit status 4)."""


class BuildError(SearchError, ConfigError):
    """A build that cannot start or resume (an existing index, a changed input or setting): a
    usage error, exit status 2."""


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The hits of one query, best first.

    Attributes:
      query: the query text (or SMILES).
      kind: what the hits are: 'molecules' (values are SMILES) or 'texts'.
      ids: hit ids.
      values: hit SMILES (molecule index) or texts (text index).
      scores: float32 [n] cosine scores, descending.
      ranks: int64 [n] competition ranks: 1 + (indexed rows scoring strictly higher); tied
        hits share a rank (the optimistic rank of the evaluation protocols).
      rows: int64 [n] index rows.
      error: why the query could not be searched (then no hits), else None.
    """

    query: str
    kind: str
    ids: list[str]
    values: list[str]
    scores: np.ndarray
    ranks: np.ndarray
    rows: np.ndarray
    error: str | None = None

    @property
    def smiles(self) -> list[str] | None:
        return self.values if self.kind == "molecules" else None

    @property
    def texts(self) -> list[str] | None:
        return self.values if self.kind == "texts" else None

    def hits(self) -> list[dict]:
        """[{'rank', 'score', 'id', 'smiles' | 'text'}] (JSON-able)."""
        field = "smiles" if self.kind == "molecules" else "text"
        return [
            {"rank": int(rank), "score": float(score), "id": identifier, field: value}
            for rank, score, identifier, value in zip(
                self.ranks, self.scores, self.ids, self.values, strict=True
            )
        ]

    def to_dict(self) -> dict:
        return {"query": self.query, "error": self.error, "results": self.hits()}


# ---------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, write: Callable) -> dict:
    """Writes `path` through `write(file)`, syncs it, returns {'bytes', 'sha256'}."""
    with path.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n")
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _tsv_field(value) -> str:
    return " ".join(str(value).split("\t")).replace("\r", " ").replace("\n", " ")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class _Lines:
    """A file of one JSON string per line, read through mmap; item i decoded on demand."""

    def __init__(self, path: Path, expected: int):
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        ends = np.flatnonzero(np.frombuffer(self._data, np.uint8) == ord("\n"))
        if len(ends) != expected or (size and self._data[size - 1] != ord("\n")):
            raise IndexFileError(f"{path}: {len(ends)} lines, the index lists {expected} rows")
        self._ends = ends
        self.path = path

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = int(self._ends[i - 1]) + 1 if i > 0 else 0
        try:
            return json.loads(bytes(self._data[start : int(self._ends[i])]))
        except ValueError as error:
            raise IndexFileError(f"{self.path}: line {i + 1} is damaged ({error})") from error


@dataclasses.dataclass
class _Shard:
    name: str
    first_row: int
    count: int
    emb: np.ndarray  # [count, D] memory-mapped
    ids: _Lines
    values: _Lines


def _shard_path(directory: Path, name: str, part: str) -> Path:
    return directory / SHARDS / f"{name}{_SUFFIX[part]}"


def _read_meta(directory: Path) -> dict:
    path = directory / META
    if not directory.is_dir():
        raise IndexFileError(f"no index at {directory} (not a directory)")
    if not path.is_file():
        raise IndexFileError(f"{directory} is not a search index (no {META})")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise IndexFileError(f"{path} is damaged: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IndexFileError(f"{path} is not a jaxmol search index ({FORMAT})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise IndexFileError(
            f"{directory}: index format version {meta.get('format_version')}, this jaxmol "
            f"reads version {FORMAT_VERSION}; rebuild the index"
        )
    return meta


def read_meta(path: str | os.PathLike) -> dict:
    """The meta.json of an index directory (finished or not), checked for format and version."""
    return _read_meta(Path(path).expanduser().absolute())


def _open_shard(directory: Path, entry: dict, meta: dict, first_row: int, verify: bool) -> _Shard:
    name, count = entry["name"], int(entry["count"])
    for part in _FILES:
        path = _shard_path(directory, name, part)
        if not path.is_file():
            raise IndexFileError(f"{directory}: shard file {path.name} is missing")
        recorded = entry["files"][part]
        if path.stat().st_size != recorded["bytes"]:
            raise IndexFileError(
                f"{directory}: shard file {path.name} has {path.stat().st_size} bytes, the "
                f"index lists {recorded['bytes']} (damaged or partly written)"
            )
        if verify and sha256_file(path) != recorded["sha256"]:
            raise IndexFileError(f"{directory}: shard file {path.name} fails its SHA-256 check")
    emb_path = _shard_path(directory, name, "emb")
    try:
        emb = np.load(emb_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise IndexFileError(f"{directory}: {emb_path.name} is damaged: {error}") from error
    expected = (count, int(meta["dimension"]))
    if emb.shape != expected or emb.dtype != np.dtype(meta["dtype"]):
        raise IndexFileError(
            f"{directory}: {emb_path.name} holds {emb.dtype} {emb.shape}, the index lists "
            f"{meta['dtype']} {expected}"
        )
    return _Shard(
        name,
        first_row,
        count,
        emb,
        _Lines(_shard_path(directory, name, "ids"), count),
        _Lines(_shard_path(directory, name, "values"), count),
    )


# ---------------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------------


def as_source(items, kind: str) -> Source:
    """A `Source` from a Source, a file path, a list of strings / (id, value) pairs, or any
    other iterable of those (read once, so a build from it cannot resume)."""
    if isinstance(items, Source):
        if items.kind != kind:
            raise BuildError(f"the input holds {items.kind}, an index of {kind} was asked for")
        return items
    if isinstance(items, str | os.PathLike):
        make = readers.molecule_source if kind == "molecules" else readers.text_source
        return make(items)
    if isinstance(items, Sequence):
        return readers.sequence_source(items, kind)
    iterator = iter(items)
    used = False

    def records(skip: int = 0) -> Iterator[Record]:
        nonlocal used
        if used:
            raise BuildError("an iterator input can be read only once")
        used = True
        for position, item in enumerate(iterator, start=1):
            if position <= skip:
                continue
            identifier, value = (str(position), item) if isinstance(item, str) else item
            if not isinstance(value, str) or not value.strip():
                yield Record(position, str(identifier), "", f"empty or not a string: {value!r}")
            else:
                yield Record(position, str(identifier), value.strip())

    return Source(records, {"type": "iterable"}, kind)


def _chunks(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------
# The index.
# ---------------------------------------------------------------------------------------------


class Index:
    """Embeddings of a library (molecules or texts) with exact top-k search.

    Make one with `build` (molecules), `build_texts` (a text corpus) or `load`.

    Attributes:
      path: the index directory.
      meta: the contents of meta.json.
      kind: 'molecules' (queries are texts) or 'texts' (queries are SMILES).
      count: indexed rows.
      dimension: D.
      retriever: the attached `Retriever` (None: `search_embeddings` only).
    """

    def __init__(self, path: Path, meta: dict, shards: list[_Shard], retriever=None, owner=None):
        self.path = Path(path)
        self.meta = meta
        self._shards = shards
        self._starts = np.asarray([s.first_row for s in shards], np.int64)
        self._owner = owner  # a TemporaryDirectory for an index built without a path
        self.kind = meta["kind"]
        self.count = int(meta["count"])
        self.dimension = int(meta["dimension"])
        self.retriever = None
        self._topk: ExactTopK | None = None
        self._device_library: DeviceLibrary | None = None
        if retriever is not None:
            self.attach(retriever)

    # -----------------------------------------------------------------------------------------
    # Building.

    @classmethod
    def build(
        cls,
        retriever,
        molecules,
        path: str | os.PathLike | None = None,
        **options,
    ) -> Index:
        """Embeds a molecule library into an index (text queries find molecules).

        Args:
          retriever: the `Retriever` whose weights embed the library.
          molecules: a `readers.Source` (a file: `readers.molecule_source`; registered splits:
            `readers.split_source`), a file path, a list of SMILES or (id, SMILES) pairs, or an
            iterable of those.
          path: the index directory (created; an unfinished build there is resumed). None
            builds into a temporary directory; `save` then writes it somewhere.
          **options: see `build_from_source`.

        Returns:
          The finished `Index`, with the retriever attached.
        """
        return cls.build_from_source(retriever, as_source(molecules, "molecules"), path, **options)

    @classmethod
    def build_texts(
        cls, retriever, texts, path: str | os.PathLike | None = None, **options
    ) -> Index:
        """Embeds a text corpus into an index (SMILES queries find texts); as `build`."""
        return cls.build_from_source(retriever, as_source(texts, "texts"), path, **options)

    @classmethod
    def build_from_source(
        cls,
        retriever,
        source: Source,
        path: str | os.PathLike | None = None,
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
        dtype: str = "float32",
        overwrite: bool = False,
        progress: Callable[[int, int], None] | None = None,
        on_shard: Callable[[dict], None] | None = None,
    ) -> Index:
        """Builds (or resumes building) an index of `source` into `path`.

        The input is read in a background thread, which also parses, featurises and packs the
        next `PIECE_SIZE` records while the devices embed the previous ones; every `shard_size`
        records become one shard. Rows that cannot be embedded are listed in ``failures.tsv``.

        Args:
          retriever: the `Retriever`.
          source: the input (`readers.Source`).
          path: the index directory; None = a temporary one.
          shard_size: input records per shard (the unit of resumption).
          dtype: 'float32' or 'float16' (half the size; scores move by < 1e-4 on ChEBI-20).
          overwrite: replace a finished index (or an unfinished one of other settings) there.
          progress: called as progress(records, embedded) after every piece of at most
            `PIECE_SIZE` records.
          on_shard: called with each finished shard's entry of meta.json (on every process;
            on processes other than 0 its ``files`` are None: process 0 wrote them).

        Raises:
          BuildError: the directory holds a finished index (without `overwrite`), something that
            is not an index, or an unfinished build of another input or setting.
        """
        if dtype not in DTYPES:
            raise BuildError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if shard_size < 1:
            raise BuildError(f"shard_size must be >= 1, got {shard_size}")
        owner = None
        if path is None:
            if retriever.runner.multiprocess:
                raise BuildError(
                    "a build over several processes needs an index path that every process "
                    "sees (a temporary directory is private to one process)"
                )
            owner = tempfile.TemporaryDirectory(prefix="jaxmol-index-")
            path = owner.name
        directory = Path(path).expanduser().absolute()
        settings = {
            "kind": source.kind,
            "checkpoint": retriever.checkpoint_info(),
            "model": retriever.model_info(),
            "dtype": dtype,
            "dimension": retriever.embed_dim,
            "normalized": True,
            "shard_size": int(shard_size),
            "source": source.description,
        }
        meta = _start_or_resume(directory, settings, overwrite)
        _build_shards(retriever, source, directory, meta, progress, on_shard)
        if distributed.is_primary():
            _finish(directory, meta)
        distributed.barrier("search_index_finished")  # the others read what process 0 wrote
        return cls.load(directory, retriever, _owner=owner)

    # -----------------------------------------------------------------------------------------
    # Loading and saving.

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        retriever=None,
        *,
        verify: bool = False,
        _owner=None,
    ) -> Index:
        """Opens a finished index (embeddings memory-mapped, strings decoded on demand).

        Args:
          path: the index directory.
          retriever: attach this `Retriever` (its weights must be the index's); None allows
            `search_embeddings` only.
          verify: also check every file's SHA-256 (sizes, shapes and line counts are always
            checked).

        Raises:
          IndexFileError: not an index, unfinished, or damaged.
          WrongCheckpointError: `retriever` holds other weights than the index was built with.
        """
        directory = Path(path).expanduser().absolute()
        meta = _read_meta(directory)
        if meta.get("status") != "complete":
            raise IndexFileError(
                f"{directory} is an unfinished index ({len(meta.get('shards', []))} shards, "
                f"{meta.get('num_records', 0)} input records done): run the same build again "
                "to resume it"
            )
        shards, first_row = [], 0
        try:
            for entry in meta["shards"]:
                shards.append(_open_shard(directory, entry, meta, first_row, verify))
                first_row += int(entry["count"])
        except (KeyError, TypeError) as error:
            raise IndexFileError(f"{directory}/{META} is damaged: missing {error}") from error
        if first_row != int(meta["count"]):
            raise IndexFileError(
                f"{directory}: the shards hold {first_row} rows, {META} says {meta['count']}"
            )
        failures = directory / FAILURES
        if not failures.is_file():
            raise IndexFileError(f"{directory}: {FAILURES} is missing")
        return cls(directory, meta, shards, retriever, owner=_owner)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Copies the index directory to `path` (which must not exist unless `overwrite`).

        With several processes every process calls it; process 0 copies, the others wait.
        """
        target = Path(path).expanduser().absolute()
        if target == self.path:
            return target
        if target.exists() and not overwrite:
            raise BuildError(f"{target} exists; pass overwrite=True to replace it")
        distributed.barrier("search_index_save_checked")  # every process saw the target first
        if distributed.is_primary():
            self._copy_to(target)
        distributed.barrier("search_index_saved")
        return target

    def _copy_to(self, target: Path) -> None:
        if target.exists():
            _remove_index(target)
        (target / SHARDS).mkdir(parents=True)
        for entry in self.meta["shards"]:
            for part in _FILES:
                source = _shard_path(self.path, entry["name"], part)
                shutil.copyfile(source, _shard_path(target, entry["name"], part))
        shutil.copyfile(self.path / FAILURES, target / FAILURES)
        _write_json_atomic(target / META, self.meta)  # last: the copy counts once it is there

    # -----------------------------------------------------------------------------------------
    # Checkpoint.

    def attach(self, retriever) -> None:
        """Uses `retriever` to embed queries; it must hold the weights the index was built with.

        Raises:
          WrongCheckpointError: other parameters (hash), featuriser or dimension.
        """
        built = self.meta["checkpoint"]
        if retriever.params_hash != built["params_sha256"]:
            raise WrongCheckpointError(
                f"index {self.path} was built with the checkpoint of step {built['step']} in "
                f"{built['workdir']} (params sha256 {built['params_sha256'][:12]}), but the "
                f"retriever holds step {retriever.step} of {retriever.workdir} (params sha256 "
                f"{retriever.params_hash[:12]}): embeddings of different weights cannot be "
                "compared; rebuild the index or use its checkpoint"
            )
        model = self.meta["model"]
        if retriever.featurizer != model["featurizer"] or retriever.embed_dim != self.dimension:
            raise WrongCheckpointError(
                f"index {self.path} was built with featuriser {model['featurizer']} and "
                f"dimension {self.dimension}; the retriever has {retriever.featurizer} and "
                f"{retriever.embed_dim}"
            )
        self.retriever = retriever
        self._topk = None

    # -----------------------------------------------------------------------------------------
    # Rows.

    def __len__(self) -> int:
        return self.count

    def _locate(self, row: int) -> tuple[_Shard, int]:
        if not 0 <= row < self.count:
            raise IndexError(f"row {row} out of range [0, {self.count})")
        shard = self._shards[int(np.searchsorted(self._starts, row, side="right")) - 1]
        return shard, row - shard.first_row

    def item(self, row: int) -> tuple[str, str]:
        """(id, value) of index row `row` (value: SMILES or text)."""
        shard, local = self._locate(int(row))
        return shard.ids[local], shard.values[local]

    def embeddings(self) -> np.ndarray:
        """All embeddings as one float32 [count, D] array (small indexes, tests)."""
        if not self._shards:
            return np.zeros((0, self.dimension), np.float32)
        return np.concatenate([np.asarray(s.emb, np.float32) for s in self._shards])

    def failures(self) -> list[dict]:
        """The rows that could not be embedded: [{'line', 'id', 'value', 'reason'}]."""
        lines = (self.path / FAILURES).read_text(encoding="utf-8").splitlines()[1:]
        out = []
        for line in lines:
            number, identifier, value, reason = line.split("\t", 3)
            out.append({"line": int(number), "id": identifier, "value": value, "reason": reason})
        return out

    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[np.ndarray, int]]:
        """(embeddings [<= chunk_rows, D], first row) over the whole index, in row order."""
        pieces: list[np.ndarray] = []
        filled, first = 0, 0
        for shard in self._shards:
            position = 0
            while position < shard.count:
                take = min(chunk_rows - filled, shard.count - position)
                pieces.append(shard.emb[position : position + take])
                filled += take
                position += take
                if filled == chunk_rows:
                    yield _joined(pieces), first
                    first += filled
                    pieces, filled = [], 0
        if filled:
            yield _joined(pieces), first

    # -----------------------------------------------------------------------------------------
    # Search.

    def topk(self) -> ExactTopK:
        """The top-k engine (on the retriever's devices, or all local devices)."""
        if self._topk is None:
            devices = self.retriever.runner.devices if self.retriever is not None else None
            self._topk = ExactTopK(devices)
        return self._topk

    def configure(self, *, chunk_rows: int | None = None, query_batch: int | None = None) -> None:
        """Sets the top-k chunk size and query batch (drops a device copy made before)."""
        current = self.topk()
        self._topk = ExactTopK(
            current.devices,
            chunk_rows=chunk_rows or current.max_chunk_rows,
            query_batch=query_batch or current.query_batch,
        )
        self._device_library = None

    def place_on_device(self) -> None:
        """Keeps a copy of the embeddings on the devices (fast repeated queries: a server)."""
        engine = self.topk()
        chunk_rows = engine.chunk_rows_for(self.count)
        self._device_library = engine.place(self.iter_chunks(chunk_rows), self.count)

    def search_embeddings(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of unit query vectors: scores float32 [Q, k'] and rows int64 [Q, k'],
        k' = min(k, count), best first, ties in row order."""
        _check_k(k)
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise ValueError(f"queries must be [Q, {self.dimension}], got {queries.shape}")
        library = self._device_library or self.iter_chunks
        return self.topk().search(queries, library, k, num_rows=self.count)

    def search(self, queries: str | Sequence[str], k: int = 10) -> list[SearchResult]:
        """Finds the k best rows for each query, in one batched pass.

        Args:
          queries: texts for a molecule index, SMILES for a text index (or one string).
          k: hits per query (1 ... 10,000; at most the index size are returned).

        Returns:
          One `SearchResult` per query. A SMILES query RDKit cannot read gets a result with
          ``error`` set and no hits; an empty text raises ValueError.
        """
        if self.retriever is None:
            raise SearchError("no retriever attached: use Index.load(path, retriever)")
        _check_k(k)
        if isinstance(queries, str):
            queries = [queries]
        queries = list(queries)
        if not queries:
            return []
        errors: list[str | None] = [None] * len(queries)
        if self.kind == "molecules":
            query_emb = self.retriever.encode_texts(queries)
        else:
            query_emb, failures = self.retriever.encode_smiles(queries)
            for position, _, reason in failures:
                errors[position] = reason
        good = [i for i, error in enumerate(errors) if error is None]
        scores = np.zeros((len(queries), 0), np.float32)
        rows = np.zeros((len(queries), 0), np.int64)
        if good:
            found_scores, found_rows = self.search_embeddings(query_emb[good], k)
            scores = np.zeros((len(queries), found_scores.shape[1]), np.float32)
            rows = np.zeros((len(queries), found_rows.shape[1]), np.int64)
            scores[good], rows[good] = found_scores, found_rows
        results = []
        for i, query in enumerate(queries):
            if errors[i] is not None:
                empty = np.zeros(0)
                results.append(
                    SearchResult(
                        query, self.kind, [], [], empty.astype(np.float32), empty.astype(np.int64),
                        empty.astype(np.int64), errors[i],
                    )
                )  # fmt: skip
                continue
            items = [self.item(int(r)) for r in rows[i]]
            results.append(
                SearchResult(
                    query,
                    self.kind,
                    [identifier for identifier, _ in items],
                    [value for _, value in items],
                    scores[i],
                    competition_ranks(scores[i]),
                    rows[i],
                )
            )
        return results

    def describe(self) -> str:
        """One line: what is indexed, by which checkpoint."""
        built = self.meta["checkpoint"]
        return (
            f"{self.count:,} {self.kind} ({self.meta['dtype']}, D={self.dimension}, "
            f"{len(self._shards)} shards; {self.meta['num_failures']} input rows not indexed), "
            f"checkpoint step {built['step']} of {built['workdir']}"
        )


def _joined(pieces: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(pieces) if len(pieces) > 1 else np.asarray(pieces[0])


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an integer in [1, {MAX_K}], got {k!r}")


# ---------------------------------------------------------------------------------------------
# Build steps.
# ---------------------------------------------------------------------------------------------


def _remove_index(directory: Path) -> None:
    """Deletes an index directory's own files (nothing else there), then the directory if empty."""
    for name in (META, FAILURES, f".{META}.tmp"):
        (directory / name).unlink(missing_ok=True)
    if (directory / SHARDS).is_dir():
        shutil.rmtree(directory / SHARDS)
    with contextlib.suppress(OSError):
        directory.rmdir()


def _start_or_resume(directory: Path, settings: dict, overwrite: bool) -> dict:
    """The meta.json to build under: a new one, or the unfinished one to resume.

    Every process checks the directory (and raises the same error); then process 0 alone
    clears it and writes the new meta.json, while the others wait.
    """
    meta, clear = _check_start(directory, settings, overwrite)
    distributed.barrier("search_index_checked")  # nobody reads what process 0 is changing
    if meta is None:
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "status": "building",
            **settings,
            "count": 0,
            "num_records": 0,
            "num_failures": 0,
            "shards": [],
            "created": _now(),
        }
        if distributed.is_primary():
            if clear:
                _remove_index(directory)
            (directory / SHARDS).mkdir(parents=True, exist_ok=True)
            _write_json_atomic(directory / META, meta)
    distributed.barrier("search_index_started")
    return meta


def _check_start(directory: Path, settings: dict, overwrite: bool) -> tuple[dict | None, bool]:
    """Reads the directory only: (the unfinished build's meta.json to resume, or None to
    start anew; whether an old index must be removed first)."""
    if directory.exists() and not directory.is_dir():
        raise BuildError(f"{directory} exists and is not a directory")
    if not (directory.is_dir() and any(directory.iterdir())):
        return None, False
    if not (directory / META).is_file():
        raise BuildError(
            f"{directory} is not empty and holds no index: choose a new or empty directory"
        )
    try:
        meta = _read_meta(directory)
    except IndexFileError:
        if not overwrite:
            raise
        return None, True
    if overwrite:
        return None, True
    if meta.get("status") == "complete":
        raise BuildError(
            f"{directory} already holds a finished index; pass overwrite=True "
            "(--overwrite) to rebuild it"
        )
    changed = [key for key, value in settings.items() if meta.get(key) != value]
    if changed:
        raise BuildError(
            f"{directory} holds an unfinished build with other "
            f"{', '.join(changed)}; build with the same settings to resume it, or "
            "pass overwrite=True (--overwrite) to start again"
        )
    if settings["source"].get("type") == "iterable":
        raise BuildError(
            f"{directory} holds an unfinished build from a Python iterator, which "
            "cannot be read again: pass overwrite=True to start again"
        )
    logger.info(
        "resuming the build in %s after %d shards (%d input records)",
        directory,
        len(meta["shards"]),
        meta["num_records"],
    )
    return meta, False


def _build_shards(retriever, source: Source, directory: Path, meta: dict, progress, on_shard):
    """Reads, embeds and writes the shards after those `meta` lists (every process reads and
    embeds; process 0 alone writes)."""
    from jaxmol.search.retriever import LibraryMoleculeEncoder, budgets_to_json

    primary = distributed.is_primary()
    if primary:
        known = {entry["name"] for entry in meta["shards"]}
        for path in (directory / SHARDS).iterdir():  # files of a shard that never finished
            if path.name.split(".")[0] not in known:
                path.unlink()
        (directory / FAILURES).unlink(missing_ok=True)
    molecules = meta["kind"] == "molecules"
    encoder = LibraryMoleculeEncoder(retriever, meta.get("graph_budgets")) if molecules else None

    def produce():
        # Reader thread: read, parse and featurise the next pieces of a shard (and fit the
        # graph budgets; the embedder packs them in its own thread).
        for chunk in _chunks(source.records(meta["num_records"]), meta["shard_size"]):
            for first in range(0, len(chunk), PIECE_SIZE):
                piece = chunk[first : first + PIECE_SIZE]
                last = first + PIECE_SIZE >= len(chunk)
                good = [record for record in piece if record.error is None]
                if molecules:
                    graphs = retriever.featurize([r.value for r in good], [r.id for r in good])
                    yield piece, good, graphs, encoder.prepare(graphs), last
                else:
                    yield piece, good, None, None, last

    shard_records, shard_kept, shard_embeddings, shard_failed = [], [], [], []
    for piece, good, graphs, prepared, last in batching.prefetch(produce(), size=2):
        failed = [(r.line, r.id, r.value, r.error) for r in piece if r.error is not None]
        if molecules:
            valid = graphs.valid
            embeddings = encoder.embed(prepared, int(valid.sum()))
            kept = [record for record, ok in zip(good, valid, strict=True) if ok]
            rejected = [record for record, ok in zip(good, valid, strict=True) if not ok]
            failed += [
                (record.line, record.id, record.value, reason)
                for record, (_, _, reason) in zip(rejected, graphs.failures, strict=True)
            ]
        else:
            kept = good
            embeddings = (
                retriever.encode_texts([r.value for r in good])
                if good
                else np.zeros((0, meta["dimension"]), np.float32)
            )
        shard_records += piece
        shard_kept += kept
        shard_embeddings.append(embeddings)
        shard_failed += failed
        if progress is not None:
            progress(len(piece), len(kept))
        if not last:
            continue
        shard_failed.sort(key=lambda row: row[0])
        if molecules:  # the levels this shard was packed with (the reader may be ahead)
            meta["graph_budgets"] = budgets_to_json(prepared.budgets)
        entry = _write_shard(
            directory,
            meta,
            shard_records,
            shard_kept,
            np.concatenate(shard_embeddings),
            shard_failed,
            write=primary,
        )
        shard_records, shard_kept, shard_embeddings, shard_failed = [], [], [], []
        if on_shard is not None:
            on_shard(entry)


def _write_shard(
    directory: Path, meta: dict, chunk, kept, embeddings, failed, *, write: bool = True
) -> dict:
    """Writes one shard's files, then meta.json listing it (the commit point); `write=False`
    (processes other than 0) only updates `meta` in memory, without the files' sums."""
    name = f"{len(meta['shards']):06d}"
    embeddings = np.ascontiguousarray(embeddings, dtype=np.dtype(meta["dtype"]))

    def lines(values):
        def write(f):
            for value in values:
                f.write(json.dumps(value, ensure_ascii=False).encode("utf-8"))
                f.write(b"\n")

        return write

    def failure_rows(f):
        for row in failed:
            f.write(("\t".join(_tsv_field(x) for x in row) + "\n").encode("utf-8"))

    def npy(f):
        np.save(f, embeddings)

    files = None
    if write:
        files = {
            "emb": _write_file(_shard_path(directory, name, "emb"), npy),
            "ids": _write_file(_shard_path(directory, name, "ids"), lines(r.id for r in kept)),
            "values": _write_file(
                _shard_path(directory, name, "values"), lines(r.value for r in kept)
            ),
            "failures": _write_file(_shard_path(directory, name, "failures"), failure_rows),
        }
        _fsync_dir(directory / SHARDS)
    entry = {
        "name": name,
        "first_record": meta["num_records"],
        "num_records": len(chunk),
        "count": len(kept),
        "num_failures": len(failed),
        "files": files,
    }
    meta["shards"].append(entry)
    meta["num_records"] += len(chunk)
    meta["count"] += len(kept)
    meta["num_failures"] += len(failed)
    if write:
        _write_json_atomic(directory / META, meta)
    return entry


def _finish(directory: Path, meta: dict) -> None:
    value = "smiles" if meta["kind"] == "molecules" else "text"
    header = f"line\tid\t{value}\treason\n"
    with (directory / FAILURES).open("wb") as out:
        out.write(header.encode())
        for entry in meta["shards"]:
            with _shard_path(directory, entry["name"], "failures").open("rb") as part:
                shutil.copyfileobj(part, out)
        out.flush()
        os.fsync(out.fileno())
    meta["status"] = "complete"
    meta["completed"] = _now()
    _write_json_atomic(directory / META, meta)
