"""Streaming readers of the files people keep molecules and texts in.

Every reader yields `Record`s one at a time (a library of millions of molecules is never held in
memory) and never drops a row silently: a row it cannot use becomes a record with ``error`` set,
which the index build lists in its failure report with the row's line number.

Molecule files (`molecule_source`):

* ``.smi`` / ``.smiles`` / ``.txt``: one molecule per line, ``SMILES [whitespace id]``; the id
  defaults to the line number. Blank lines and lines starting with ``#`` are skipped; a first
  line whose first field is ``smiles`` (any case) is taken as a header.
* ``.csv`` / ``.tsv``: a header row and named columns (``smiles_col``, default ``smiles``;
  ``id_col``, default ``id`` when the header has it, else the line number). Quoting follows the
  csv module's defaults (RFC 4180).
* ``.sdf`` / ``.sd`` / ``.mol``: records separated by ``$$$$``, each parsed by RDKit's SD
  supplier (one record at a time, so a bad record is reported with its line) and written as
  its canonical isomeric SMILES; the id is the record's name line (first line), or the property
  ``id_col`` when given, else the line number where the record starts.
* Any of these with ``.gz`` appended is read through gzip.

Text files (`text_source`), for an index over descriptions (molecule -> text search): ``.txt``
(one text per line, the id is the line number) or ``.csv`` / ``.tsv`` (``text_col``, default
``text``, and ``id_col``), gzipped or not.

Registered splits (`split_source`, e.g. ``chebi20/train_molecules,chebi20/validation,
chebi20/test``) yield their molecules (or texts) in order, deduplicated by id across the splits
(the first occurrence wins, as the text2mol protocol deduplicates ChEBI-20 by CID).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from jaxmol.data.datasets import DataError

MOLECULE_FORMATS = ("smi", "csv", "tsv", "sdf")
TEXT_FORMATS = ("txt", "csv", "tsv")
_SUFFIX_FORMATS = {
    ".smi": "smi",
    ".smiles": "smi",
    ".txt": "smi",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".sdf": "sdf",
    ".sd": "sdf",
    ".mol": "sdf",
}


class ReaderError(DataError):
    """An input that cannot be read at all (missing file, unknown format, bad header).

    A `DataError`, so the command line exits with the data status (3), as for a bad split file.
    """


@dataclasses.dataclass(frozen=True)
class Record:
    """One row of an input.

    Attributes:
      line: the 1-based line of the input where the row starts (for splits: the row number).
      id: the row's identifier.
      value: the SMILES (molecule inputs) or the text (text inputs); '' when unreadable.
      error: why the row cannot be used (None for a good row).
    """

    line: int
    id: str
    value: str
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Source:
    """A re-readable input: `records(skip)` starts afresh every time it is called.

    Attributes:
      records: ``records(skip=0)`` returns a fresh iterator of `Record`s, leaving out the
        first `skip` records (a resumed build skips what its finished shards hold).
      description: a JSON-able description stored in the index metadata; a resumed build
        checks that it is unchanged (a file's path, size and modification time).
      kind: 'molecules' or 'texts'.
    """

    records: Callable[..., Iterator[Record]]
    description: dict
    kind: str


def _skipping(make: Callable[[], Iterator[Record]]) -> Callable[..., Iterator[Record]]:
    def records(skip: int = 0) -> Iterator[Record]:
        return itertools.islice(make(), skip, None)

    return records


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return path.open(encoding="utf-8-sig", newline="")


def detect_format(path: str | os.PathLike, kind: str = "molecules") -> str:
    """The format named by a file's suffix (``.gz`` stripped first)."""
    path = Path(path)
    suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    fmt = _SUFFIX_FORMATS.get(suffix.lower())
    if kind == "texts" and fmt == "smi" and suffix.lower() == ".txt":
        fmt = "txt"
    allowed = MOLECULE_FORMATS if kind == "molecules" else TEXT_FORMATS
    if fmt not in allowed:
        raise ReaderError(
            f"{path}: cannot tell the format from the suffix {suffix!r}; "
            f"use one of {', '.join(allowed)} (optionally .gz) or pass the format explicitly"
        )
    return fmt


def _file_description(path: Path, fmt: str, **options) -> dict:
    stat = path.stat()
    return {
        "type": "file",
        "path": str(path.absolute()),
        "format": fmt,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        **options,
    }


def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ReaderError(f"input file not found: {path}")
    return path


# ---------------------------------------------------------------------------------------------
# Molecules.
# ---------------------------------------------------------------------------------------------


def read_smi(path: Path) -> Iterator[Record]:
    """``SMILES [whitespace id]`` per line (see the module docstring)."""
    with _open_text(path) as f:
        for line_number, line in enumerate(f, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            fields = text.split(None, 1)
            if line_number == 1 and fields[0].lower() == "smiles":
                continue  # a header line
            identifier = fields[1].strip() if len(fields) > 1 else str(line_number)
            yield Record(line_number, identifier, fields[0])


def _column(header: list[str], name: str, path: Path, flag: str) -> int:
    lowered = [h.strip().lower() for h in header]
    if name.lower() not in lowered:
        raise ReaderError(
            f"{path}:1: no column {name!r} in the header {header} (choose one with {flag})"
        )
    return lowered.index(name.lower())


def read_table(
    path: Path,
    *,
    delimiter: str,
    value_col: str,
    id_col: str | None,
    value_flag: str = "--smiles_col",
) -> Iterator[Record]:
    """CSV/TSV with a header; `value_col` holds the SMILES (or the text), `id_col` the id."""
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise ReaderError(f"{path}: empty file (expected a header row)")
        value_index = _column(header, value_col, path, value_flag)
        if id_col is None:
            lowered = [h.strip().lower() for h in header]
            id_index = lowered.index("id") if "id" in lowered else None
        else:
            id_index = _column(header, id_col, path, "--id_col")
        start = reader.line_num + 1
        for row in reader:
            line_number, start = start, reader.line_num + 1  # a quoted field may span lines
            if not row or all(not field.strip() for field in row):
                continue
            identifier = str(line_number)
            if id_index is not None and id_index < len(row) and row[id_index].strip():
                identifier = row[id_index].strip()
            if len(row) != len(header):
                yield Record(
                    line_number,
                    identifier,
                    "",
                    f"{len(row)} fields, the header has {len(header)}",
                )
                continue
            value = row[value_index].strip()
            if not value:
                yield Record(line_number, identifier, "", f"empty {header[value_index]!r} field")
                continue
            yield Record(line_number, identifier, value)


def _sdf_blocks(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line number, lines) of every ``$$$$``-terminated record (the last may lack it)."""
    with _open_text(path) as f:
        lines: list[str] = []
        start = 1
        for line_number, line in enumerate(f, start=1):
            if line.rstrip("\r\n") == "$$$$":
                yield start, lines
                lines, start = [], line_number + 1
            else:
                lines.append(line)
        if any(line.strip() for line in lines):
            yield start, lines


def read_sdf(path: Path, *, id_col: str | None = None, skip: int = 0) -> Iterator[Record]:
    """SD records parsed one at a time by RDKit's SD supplier; SMILES are canonical isomeric
    (see the module docstring). The first `skip` records are passed over without parsing."""
    from rdkit import Chem, rdBase

    supplier = Chem.SDMolSupplier()
    for start, lines in itertools.islice(_sdf_blocks(path), skip, None):
        name = lines[0].strip() if lines else ""
        identifier = name or str(start)
        blocker = rdBase.BlockLogs()  # the failure goes to the report, not to stderr
        try:
            supplier.SetData("".join(lines) + "$$$$\n", sanitize=True, removeHs=True)
            mol = supplier[0]
        except Exception:  # RDKit raises several types for malformed records
            mol = None
        finally:
            del blocker
        if mol is None:
            yield Record(start, identifier, "", "RDKit cannot parse this SD record")
            continue
        if id_col is not None:
            if not mol.HasProp(id_col):
                yield Record(start, identifier, "", f"no property {id_col!r} (--id_col)")
                continue
            identifier = mol.GetProp(id_col).strip() or identifier
        if mol.GetNumAtoms() == 0:
            yield Record(start, identifier, "", "SD record without atoms")
            continue
        yield Record(start, identifier, Chem.MolToSmiles(mol))


def molecule_source(
    path: str | os.PathLike,
    *,
    fmt: str | None = None,
    smiles_col: str = "smiles",
    id_col: str | None = None,
) -> Source:
    """A molecule file as a `Source` (format from the suffix unless `fmt` is given)."""
    path = _check_file(path)
    fmt = fmt or detect_format(path, "molecules")
    if fmt not in MOLECULE_FORMATS:
        raise ReaderError(f"unknown molecule format {fmt!r}; use one of {MOLECULE_FORMATS}")
    if fmt == "smi":
        records = _skipping(lambda: read_smi(path))
    elif fmt in ("csv", "tsv"):
        delimiter = "," if fmt == "csv" else "\t"
        records = _skipping(
            lambda: read_table(path, delimiter=delimiter, value_col=smiles_col, id_col=id_col)
        )
    else:

        def records(skip: int = 0) -> Iterator[Record]:
            return read_sdf(path, id_col=id_col, skip=skip)

    options = {"smiles_col": smiles_col} if fmt in ("csv", "tsv") else {}
    return Source(records, _file_description(path, fmt, id_col=id_col, **options), "molecules")


# ---------------------------------------------------------------------------------------------
# Texts.
# ---------------------------------------------------------------------------------------------


def read_text_lines(path: Path) -> Iterator[Record]:
    """One text per line; the id is the line number; a blank line is an error record."""
    with _open_text(path) as f:
        for line_number, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                yield Record(line_number, str(line_number), "", "empty text")
                continue
            yield Record(line_number, str(line_number), text)


def text_source(
    path: str | os.PathLike,
    *,
    fmt: str | None = None,
    text_col: str = "text",
    id_col: str | None = None,
) -> Source:
    """A text file as a `Source` (format from the suffix unless `fmt` is given)."""
    path = _check_file(path)
    fmt = fmt or detect_format(path, "texts")
    if fmt not in TEXT_FORMATS:
        raise ReaderError(f"unknown text format {fmt!r}; use one of {TEXT_FORMATS}")
    if fmt == "txt":
        records = _skipping(lambda: read_text_lines(path))
    else:
        delimiter = "," if fmt == "csv" else "\t"
        flag = "--text_col"
        records = _skipping(
            lambda: read_table(
                path, delimiter=delimiter, value_col=text_col, id_col=id_col, value_flag=flag
            )
        )

    options = {"text_col": text_col} if fmt in ("csv", "tsv") else {}
    return Source(records, _file_description(path, fmt, id_col=id_col, **options), "texts")


# ---------------------------------------------------------------------------------------------
# Registered splits.
# ---------------------------------------------------------------------------------------------


def split_source(names: str | Sequence[str], kind: str = "molecules") -> Source:
    """The molecules (or texts) of registered splits, deduplicated by id (first one wins).

    Args:
      names: split names, or one comma-separated string of them (e.g. 'chebi20/test').
      kind: 'molecules' or 'texts' (a split without texts is an error for 'texts').
    """
    from jaxmol.data import datasets

    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    if not names:
        raise ReaderError("no split named")
    for name in names:  # fail before the build starts, with the registry's message
        try:
            dataset = datasets.load_split(name)
        except datasets.DataError as error:
            raise ReaderError(str(error)) from error
        if kind == "texts" and dataset.texts is None:
            raise ReaderError(f"split {name} has no texts")

    def all_records():
        seen: set[str] = set()
        for name in names:
            dataset = datasets.load_split(name)
            values = dataset.smiles if kind == "molecules" else dataset.texts
            for row, (identifier, value) in enumerate(zip(dataset.ids, values, strict=True)):
                if identifier in seen:
                    continue
                seen.add(identifier)
                yield Record(row + 1, identifier, value)

    return Source(_skipping(all_records), {"type": "splits", "splits": names}, kind)


def sequence_source(items: Sequence, kind: str = "molecules") -> Source:
    """A Python list as a `Source`: strings (ids are the 1-based positions) or (id, value)
    pairs. Its description holds a SHA-256 of the items, so a resumed build checks them."""
    import hashlib
    import json

    items = list(items)
    pairs = [
        (str(position + 1), item) if isinstance(item, str) else (str(item[0]), item[1])
        for position, item in enumerate(items)
    ]
    digest = hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()

    def all_records():
        for position, (identifier, value) in enumerate(pairs, start=1):
            if not isinstance(value, str) or not value.strip():
                yield Record(position, identifier, "", f"empty or not a string: {value!r}")
            else:
                yield Record(position, identifier, value.strip())

    return Source(
        _skipping(all_records), {"type": "list", "count": len(pairs), "sha256": digest}, kind
    )
