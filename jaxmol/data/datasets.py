"""Split registry: the shipped ChEBI-20 / PCdes files, user TSV files, and manifest checks.

Every shipped file is listed in ``data/MANIFEST.json`` with its SHA-256 and row count; loading a
split verifies its file first, so a truncated or edited copy fails loudly, naming the file.

Split names (see ``data/README.md`` for where each file comes from):

* ``chebi20/validation``, ``chebi20/test``: ChEBI-20 pairs (cid, SMILES, description).
* ``chebi20/train``: needs MolT5's ``ChEBI-20_data/train.txt`` placed at
  ``data/chebi20/train.txt`` by the user (checked by its git blob id).
* ``chebi20/train_molecules``: the 26,408 ChEBI-20 train molecules, without texts.
* ``pcdes/train``, ``pcdes/validation``, ``pcdes/test``: PCdes in KV-PLM file order.
* ``pcdes_momu/<split>``: the MoMu/CMTMR variant without 8 ids MoMu could not parse.
* ``tsv:<path>``: any user file with the header ``id<TAB>smiles<TAB>description``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

DATA_DIR = Path(os.environ.get("JAXMOL_DATA_DIR", Path(__file__).resolve().parents[2] / "data"))
MANIFEST_NAME = "MANIFEST.json"

# Ids that MoMu's kv_data omits (its RDKit could not parse them); see data/README.md.
PCDES_MOMU_EXCLUDED_IDS = frozenset(
    {"924", "3714", "5716", "6163", "9954", "10073", "12073", "12503"}
)
# `git hash-object` of MolT5's ChEBI-20_data/train.txt.
CHEBI20_TRAIN_BLOB_ID = "c1b42b82fdc8fb5287614e159196e25370763aac"

_SHIPPED_SPLITS = {
    "chebi20/validation": "chebi20/validation.tsv",
    "chebi20/test": "chebi20/test.tsv",
    "chebi20/train_molecules": "chebi20/train_cid_smiles_only.tsv",
    "pcdes/train": "pcdes/train.tsv",
    "pcdes/validation": "pcdes/validation.tsv",
    "pcdes/test": "pcdes/test.tsv",
}
_PCDES_SPLITS = ("train", "validation", "test")
SPLIT_NAMES = (
    *_SHIPPED_SPLITS,
    "chebi20/train",
    *(f"pcdes_momu/{s}" for s in _PCDES_SPLITS),
)


class DataError(ValueError):
    """A data file is missing, malformed, or does not match the manifest."""


@dataclasses.dataclass(frozen=True)
class PairDataset:
    """Aligned (id, SMILES, text) rows of one split; row i of each field is one pair.

    Attributes:
      name: the split name it was loaded as.
      ids: [M] string identifiers (PubChem CID for ChEBI-20, line number for PCdes).
      smiles: [M] SMILES strings.
      texts: [M] descriptions, or None for molecule-only splits.
    """

    name: str
    ids: tuple[str, ...]
    smiles: tuple[str, ...]
    texts: tuple[str, ...] | None

    def __post_init__(self):
        lengths = {len(self.ids), len(self.smiles)}
        if self.texts is not None:
            lengths.add(len(self.texts))
        if len(lengths) != 1:
            raise DataError(f"{self.name}: fields have different lengths {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, rows: Sequence[int], name: str | None = None) -> PairDataset:
        """The rows `rows` (in that order) as a new dataset."""
        return PairDataset(
            name=name or self.name,
            ids=tuple(self.ids[r] for r in rows),
            smiles=tuple(self.smiles[r] for r in rows),
            texts=None if self.texts is None else tuple(self.texts[r] for r in rows),
        )


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_blob_id(path: Path) -> str:
    """What `git hash-object PATH` prints: SHA-1 of ``b"blob <size>\\0" + content``."""
    content = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def count_rows(path: Path) -> int:
    """Data rows of a TSV file (lines minus the header) or entries of an .npz table."""
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path) as table:
            return int(table["keys"].shape[0])
    with path.open("rb") as f:
        return sum(1 for _ in f) - 1


def load_manifest(data_dir: Path = DATA_DIR) -> dict:
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"data manifest not found: {path}")
    return json.loads(path.read_text())["files"]


@functools.cache
def _verified(path: Path, size: int, mtime_ns: int, sha256: str, rows: int) -> None:
    actual = sha256_file(path)
    if actual != sha256:
        raise DataError(
            f"{path} does not match data/{MANIFEST_NAME}: sha256 {actual} != {sha256} "
            "(the file was modified or truncated; restore it from the repository)"
        )
    actual_rows = count_rows(path)
    if actual_rows != rows:
        raise DataError(f"{path}: {actual_rows} rows, manifest says {rows}")


def verify_file(relative: str, data_dir: Path = DATA_DIR) -> Path:
    """Checks one shipped file against the manifest (cached per size and mtime) and returns it."""
    manifest = load_manifest(data_dir)
    if relative not in manifest:
        raise DataError(f"{relative} is not listed in data/{MANIFEST_NAME}")
    path = data_dir / relative
    if not path.is_file():
        raise DataError(f"missing data file {path} (listed in data/{MANIFEST_NAME})")
    stat = path.stat()
    entry = manifest[relative]
    _verified(path, stat.st_size, stat.st_mtime_ns, entry["sha256"], entry["rows"])
    return path


def read_tsv(
    path: Path,
    *,
    columns: Sequence[str],
    name: str,
    require_text: bool = True,
) -> PairDataset:
    """Reads a header + rows TSV (no quoting), checking every row; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{name}: file not found: {path}")
    ids, smiles, texts = [], [], []
    seen: dict[str, int] = {}
    # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first column name.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file (expected the header {'<TAB>'.join(columns)})")
        if [h.strip().lower() for h in header] != [c.lower() for c in columns]:
            raise DataError(
                f"{path}:1: bad header {header}; expected the columns {list(columns)}, "
                "tab-separated"
            )
        for row in reader:
            line = reader.line_num
            if not row or row == [""]:
                raise DataError(f"{path}:{line}: empty line")
            if len(row) != len(columns):
                raise DataError(
                    f"{path}:{line}: {len(row)} tab-separated fields, expected {len(columns)} "
                    f"({', '.join(columns)})"
                )
            identifier, smi = row[0].strip(), row[1].strip()
            if not identifier:
                raise DataError(f"{path}:{line}: empty id")
            if identifier in seen:
                raise DataError(
                    f"{path}:{line}: duplicate id {identifier!r} (first on line {seen[identifier]})"
                )
            seen[identifier] = line
            if not smi:
                raise DataError(f"{path}:{line}: empty SMILES for id {identifier!r}")
            ids.append(identifier)
            smiles.append(smi)
            if len(columns) == 3:
                text = row[2].strip()
                if require_text and not text:
                    raise DataError(f"{path}:{line}: empty description for id {identifier!r}")
                texts.append(text)
    return PairDataset(
        name=name,
        ids=tuple(ids),
        smiles=tuple(smiles),
        texts=tuple(texts) if len(columns) == 3 else None,
    )


def _load_chebi20_train(data_dir: Path) -> PairDataset:
    path = data_dir / "chebi20" / "train.txt"
    if not path.is_file():
        raise DataError(
            f"chebi20/train needs MolT5's ChEBI-20 train file, which jaxmol cannot ship: download "
            "ChEBI-20_data/train.txt from the blender-nlp/MolT5 GitHub repository (10.2 MB) and "
            f"place it at {path}. Its `git hash-object` must be {CHEBI20_TRAIN_BLOB_ID}. "
            "Until then, 'chebi20/train_molecules' has the train molecules without texts."
        )
    blob = git_blob_id(path)
    if blob != CHEBI20_TRAIN_BLOB_ID:
        raise DataError(
            f"{path} is not MolT5's ChEBI-20_data/train.txt: git blob id {blob}, expected "
            f"{CHEBI20_TRAIN_BLOB_ID}"
        )
    raw = read_tsv(path, columns=("cid", "smiles", "description"), name="chebi20/train")
    # MolT5 stores every SMILES backslash twice; the shipped splits have the same fix.
    return dataclasses.replace(raw, smiles=tuple(s.replace("\\\\", "\\") for s in raw.smiles))


def load_split(name: str, data_dir: str | os.PathLike | None = None) -> PairDataset:
    """Loads a split by name (see the module docstring for the list).

    Args:
      name: e.g. 'pcdes/train', 'chebi20/test', 'pcdes_momu/test', 'tsv:/path/file.tsv'.
      data_dir: the data folder; default the project's ``data/`` (or ``$JAXMOL_DATA_DIR``).

    Returns:
      A `PairDataset` (texts None for 'chebi20/train_molecules').

    Raises:
      DataError: unknown name, missing file, manifest mismatch, or a malformed row.
    """
    data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
    if name.startswith("tsv:"):
        return read_tsv(
            Path(name[4:]).expanduser(), columns=("id", "smiles", "description"), name=name
        )
    if name in _SHIPPED_SPLITS:
        path = verify_file(_SHIPPED_SPLITS[name], data_dir)
        first = "cid" if name.startswith("chebi20/") else "id"
        if name == "chebi20/train_molecules":
            return read_tsv(path, columns=(first, "smiles"), name=name)
        return read_tsv(path, columns=(first, "smiles", "description"), name=name)
    if name == "chebi20/train":
        return _load_chebi20_train(data_dir)
    prefix, _, split = name.partition("/")
    if prefix == "pcdes_momu" and split in _PCDES_SPLITS:
        full = load_split(f"pcdes/{split}", data_dir)
        keep = [r for r, i in enumerate(full.ids) if i not in PCDES_MOMU_EXCLUDED_IDS]
        return full.select(keep, name=name)
    raise DataError(f"unknown split {name!r}; known: {', '.join(SPLIT_NAMES)}, or 'tsv:<path>'")


def load_split_head(name: str, max_pairs: int = -1) -> PairDataset:
    """`load_split(name)`, cut to its first `max_pairs` rows when `max_pairs` > 0 (smoke tests
    and the small configs)."""
    dataset = load_split(name)
    if max_pairs > 0:
        dataset = dataset.select(range(min(max_pairs, len(dataset))))
    return dataset
