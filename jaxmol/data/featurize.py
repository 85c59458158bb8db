"""SMILES -> molecular graphs with integer features, and cached featurisation of whole splits.

Two node featurisers share one graph layout (`MolGraph`):

* ``'ogb'`` (default, for the GIN): 9 integer atom features and 3 integer bond features, as in
  OGB's ``ogb.utils.features`` (the convention of MoleculeSTM/MoMu/GraphMVP). Out-of-vocabulary
  values go to each feature's last ("misc") bucket.
* ``'mol2vec'`` (for the official CMTMR GCN): one integer per atom, the row of the atom's
  Morgan radius-1 identifier in the shipped Text2Mol mol2vec table, falling back to the
  radius-0 identifier and then to ``UNK``.

Both directions of every bond are edges. A SMILES that RDKit cannot parse, an empty string and a
molecule with zero atoms raise `InvalidSmilesError`; when a whole split is featurised the failures
are collected into a report, and the policy ``on_invalid`` decides between raising and skipping
(skipped rows are logged and listed in the result, never dropped silently).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jraph
import numpy as np
from rdkit import Chem, rdBase
from rdkit.Chem import rdFingerprintGenerator

logger = logging.getLogger(__name__)

# Bump when the features produced for a given SMILES change: it invalidates every cache file.
FEATURIZER_VERSION = "1"

_MISC = "misc"
ATOM_VOCAB: tuple[tuple[str, tuple], ...] = (
    ("atomic_num", (*range(1, 119), _MISC)),
    (
        "chirality",
        ("CHI_UNSPECIFIED", "CHI_TETRAHEDRAL_CW", "CHI_TETRAHEDRAL_CCW", "CHI_OTHER", _MISC),
    ),
    ("degree", (*range(11), _MISC)),
    ("formal_charge", (*range(-5, 6), _MISC)),
    ("num_hs", (*range(9), _MISC)),
    ("num_radical_electrons", (*range(5), _MISC)),
    ("hybridization", ("SP", "SP2", "SP3", "SP3D", "SP3D2", _MISC)),
    ("is_aromatic", (False, True)),
    ("is_in_ring", (False, True)),
)
BOND_VOCAB: tuple[tuple[str, tuple], ...] = (
    ("bond_type", ("SINGLE", "DOUBLE", "TRIPLE", "AROMATIC", _MISC)),
    # OGB has no misc bucket here; RDKit now also knows atropisomer stereo, which goes to misc.
    (
        "bond_stereo",
        ("STEREONONE", "STEREOZ", "STEREOE", "STEREOCIS", "STEREOTRANS", "STEREOANY", _MISC),
    ),
    ("is_conjugated", (False, True)),
)
# Vocabulary size of each integer feature column, for the embedding tables of the GIN.
ATOM_FEATURE_DIMS: tuple[int, ...] = tuple(len(values) for _, values in ATOM_VOCAB)
BOND_FEATURE_DIMS: tuple[int, ...] = tuple(len(values) for _, values in BOND_VOCAB)

_ATOM_INDEX = [{value: i for i, value in enumerate(values)} for _, values in ATOM_VOCAB]
_BOND_INDEX = [{value: i for i, value in enumerate(values)} for _, values in BOND_VOCAB]

FEATURIZERS = ("ogb", "mol2vec")

_DATA_DIR = Path(__file__).resolve().parents[2] / "data"
MOL2VEC_TABLE_NAME = Path("text2mol") / "mol2vec_token_embeddings.npz"
# The checkout's table. What the code reads by default is `default_mol2vec_table()`, which
# follows --data_dir / $JAXMOL_DATA_DIR like the splits do.
DEFAULT_MOL2VEC_TABLE = _DATA_DIR / MOL2VEC_TABLE_NAME


def default_mol2vec_table() -> Path:
    """The mol2vec table of the data folder in use (`jaxmol.data.datasets.DATA_DIR`, which
    `jaxmol.cli.use_data_dir` points at --data_dir or $JAXMOL_DATA_DIR)."""
    from jaxmol.data import datasets  # at call time: use_data_dir may have moved DATA_DIR

    return Path(datasets.DATA_DIR) / MOL2VEC_TABLE_NAME


class InvalidSmilesError(ValueError):
    """A SMILES string that cannot become a graph: unparseable, empty, or without atoms."""


@dataclasses.dataclass(frozen=True)
class MolGraph:
    """One molecule as a directed graph with integer features.

    Attributes:
      atom_features: int32 [N, F]; F = 9 for 'ogb', 1 (mol2vec table row) for 'mol2vec'.
      bond_features: int32 [E, 3]; both directions of every bond.
      senders: int32 [E], source atom of each directed edge.
      receivers: int32 [E], target atom of each directed edge.
    """

    atom_features: np.ndarray
    bond_features: np.ndarray
    senders: np.ndarray
    receivers: np.ndarray

    @property
    def num_nodes(self) -> int:
        return int(self.atom_features.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.senders.shape[0])

    @classmethod
    def empty(cls, node_width: int = len(ATOM_VOCAB)) -> MolGraph:
        """A graph without nodes: the molecule slot of a masked pair."""
        no_edges = np.zeros(0, np.int32)
        return cls(
            np.zeros((0, node_width), np.int32),
            np.zeros((0, len(BOND_VOCAB)), np.int32),
            no_edges,
            no_edges,
        )

    def as_graphs_tuple(self) -> jraph.GraphsTuple:
        """This molecule as a one-graph `jraph.GraphsTuple` (for `jraph.batch_np`)."""
        return jraph.GraphsTuple(
            nodes=self.atom_features,
            edges=self.bond_features,
            senders=self.senders,
            receivers=self.receivers,
            n_node=np.array([self.num_nodes], np.int32),
            n_edge=np.array([self.num_edges], np.int32),
            globals=None,
        )


def _index(table: dict, value) -> int:
    return table.get(value, len(table) - 1)


def parse_smiles(smiles: str) -> Chem.Mol:
    """Parses a SMILES string with RDKit, raising `InvalidSmilesError` naming it on failure."""
    if not isinstance(smiles, str) or not smiles.strip():
        raise InvalidSmilesError(f"empty SMILES string: {smiles!r}")
    log_blocker = rdBase.BlockLogs()  # failures are reported by our exception, not on stderr
    try:
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            raise InvalidSmilesError(f"RDKit cannot parse SMILES {smiles!r}: {_why(smiles)}")
    finally:
        del log_blocker
    if mol.GetNumAtoms() == 0:
        raise InvalidSmilesError(f"SMILES {smiles!r} has no atoms")
    return mol


def _why(smiles: str) -> str:
    """The reason a SMILES failed: a syntax error, or the sanitisation error RDKit raises."""
    unsanitized = Chem.MolFromSmiles(smiles, sanitize=False)
    if unsanitized is None:
        return "syntax error"
    try:
        Chem.SanitizeMol(unsanitized)
    except Exception as error:  # RDKit raises several exception types; all are just reasons
        return str(error)
    return "unknown RDKit error"


def _edges(mol: Chem.Mol) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    num_bonds = mol.GetNumBonds()
    bond_features = np.empty((2 * num_bonds, len(BOND_VOCAB)), np.int32)
    senders = np.empty(2 * num_bonds, np.int32)
    receivers = np.empty(2 * num_bonds, np.int32)
    for k, bond in enumerate(mol.GetBonds()):
        begin, end = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        features = (
            _index(_BOND_INDEX[0], str(bond.GetBondType())),
            _index(_BOND_INDEX[1], str(bond.GetStereo())),
            _index(_BOND_INDEX[2], bond.GetIsConjugated()),
        )
        bond_features[2 * k] = bond_features[2 * k + 1] = features
        senders[2 * k], receivers[2 * k] = begin, end
        senders[2 * k + 1], receivers[2 * k + 1] = end, begin
    return bond_features, senders, receivers


def ogb_atom_features(mol: Chem.Mol) -> np.ndarray:
    """int32 [N, 9] OGB-style atom features of a parsed molecule."""
    rows = []
    for atom in mol.GetAtoms():
        rows.append(
            (
                _index(_ATOM_INDEX[0], atom.GetAtomicNum()),
                _index(_ATOM_INDEX[1], str(atom.GetChiralTag())),
                _index(_ATOM_INDEX[2], atom.GetTotalDegree()),
                _index(_ATOM_INDEX[3], atom.GetFormalCharge()),
                _index(_ATOM_INDEX[4], atom.GetTotalNumHs()),
                _index(_ATOM_INDEX[5], atom.GetNumRadicalElectrons()),
                _index(_ATOM_INDEX[6], str(atom.GetHybridization())),
                _index(_ATOM_INDEX[7], atom.GetIsAromatic()),
                _index(_ATOM_INDEX[8], atom.IsInRing()),
            )
        )
    return np.asarray(rows, np.int32).reshape(-1, len(ATOM_VOCAB))


def smiles_to_graph(smiles: str) -> MolGraph:
    """Featurises one SMILES with OGB-style integer atom and bond features.

    Args:
      smiles: a SMILES string; salts and other disconnected molecules are fine.

    Returns:
      A `MolGraph` with atom_features int32 [N, 9], bond_features int32 [E, 3] and both
      directions of every bond (E = 2 * number of bonds).

    Raises:
      InvalidSmilesError: RDKit cannot parse the string, it is empty, or it has no atoms.
    """
    mol = parse_smiles(smiles)
    bond_features, senders, receivers = _edges(mol)
    return MolGraph(ogb_atom_features(mol), bond_features, senders, receivers)


@dataclasses.dataclass(frozen=True)
class Mol2VecVocabulary:
    """Morgan identifier -> row of the mol2vec embedding table (`keys` of the shipped .npz)."""

    row_of: dict
    unk_row: int
    embeddings: np.ndarray  # float32 [V, 300]
    sha256: str

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> Mol2VecVocabulary:
        """Reads the table at `path` (None: `default_mol2vec_table()`)."""
        path = Path(path) if path is not None else default_mol2vec_table()
        if not path.is_file():
            raise FileNotFoundError(f"mol2vec table not found: {path}")
        with np.load(path) as table:
            keys = [str(k) for k in table["keys"]]
            embeddings = np.asarray(table["embeddings"], np.float32)
        if "UNK" not in keys:
            raise ValueError(f"mol2vec table {path} has no 'UNK' row")
        row_of = {key: row for row, key in enumerate(keys)}
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return cls(row_of=row_of, unk_row=row_of["UNK"], embeddings=embeddings, sha256=digest)


_MORGAN_RADIUS1 = None


def mol2vec_atom_rows(mol: Chem.Mol, vocab: Mol2VecVocabulary) -> tuple[np.ndarray, np.ndarray]:
    """Per-atom mol2vec table rows and the level each came from.

    Returns:
      rows: int32 [N, 1], table row of the radius-1 identifier, else radius-0, else UNK.
      level: int8 [N], 1 = radius-1 hit, 0 = radius-0 fallback, -1 = UNK.
    """
    global _MORGAN_RADIUS1
    if _MORGAN_RADIUS1 is None:
        _MORGAN_RADIUS1 = rdFingerprintGenerator.GetMorganGenerator(radius=1)
    output = rdFingerprintGenerator.AdditionalOutput()
    output.AllocateBitInfoMap()
    _MORGAN_RADIUS1.GetSparseCountFingerprint(mol, additionalOutput=output)
    identifiers: list[dict[int, str]] = [{} for _ in range(mol.GetNumAtoms())]
    for identifier, environments in output.GetBitInfoMap().items():
        for atom, radius in environments:
            identifiers[atom][radius] = str(identifier)
    rows = np.empty((mol.GetNumAtoms(), 1), np.int32)
    level = np.empty(mol.GetNumAtoms(), np.int8)
    for atom, by_radius in enumerate(identifiers):
        for radius in (1, 0):
            row = vocab.row_of.get(by_radius.get(radius, ""))
            if row is not None:
                rows[atom, 0], level[atom] = row, radius
                break
        else:
            rows[atom, 0], level[atom] = vocab.unk_row, -1
    return rows, level


def smiles_to_mol2vec_graph(smiles: str, vocab: Mol2VecVocabulary) -> MolGraph:
    """Featurises one SMILES with mol2vec-id nodes (atom_features int32 [N, 1]) for the GCN."""
    mol = parse_smiles(smiles)
    bond_features, senders, receivers = _edges(mol)
    rows, _ = mol2vec_atom_rows(mol, vocab)
    return MolGraph(rows, bond_features, senders, receivers)


@dataclasses.dataclass(frozen=True)
class FeaturizedSplit:
    """All graphs of a split in flat (CSR-like) arrays; row i is molecule i of the split.

    Invalid molecules keep their row with zero nodes and ``valid[i] = False``.

    Attributes:
      featurizer: 'ogb' or 'mol2vec'.
      atom_features: int32 [total_nodes, F].
      bond_features: int32 [total_edges, 3].
      senders, receivers: int32 [total_edges], indices local to each molecule.
      node_offsets: int64 [M + 1]; molecule i owns nodes node_offsets[i]:node_offsets[i + 1].
      edge_offsets: int64 [M + 1]; same for edges.
      valid: bool [M].
      failures: ((id, smiles, reason), ...) for every invalid molecule.
      coverage: mol2vec only: atom counts per lookup level ('radius1', 'radius0', 'unk').
      cache_hit: whether the arrays came from the on-disk cache.
    """

    featurizer: str
    atom_features: np.ndarray
    bond_features: np.ndarray
    senders: np.ndarray
    receivers: np.ndarray
    node_offsets: np.ndarray
    edge_offsets: np.ndarray
    valid: np.ndarray
    failures: tuple[tuple[str, str, str], ...]
    coverage: dict
    cache_hit: bool = False

    def __len__(self) -> int:
        return int(self.valid.shape[0])

    @property
    def n_node(self) -> np.ndarray:
        """int64 [M], atoms per molecule (0 for invalid rows)."""
        return np.diff(self.node_offsets)

    @property
    def n_edge(self) -> np.ndarray:
        """int64 [M], directed edges per molecule."""
        return np.diff(self.edge_offsets)

    @property
    def skipped_ids(self) -> tuple[str, ...]:
        return tuple(identifier for identifier, _, _ in self.failures)

    def graph(self, i: int) -> MolGraph:
        n0, n1 = self.node_offsets[i], self.node_offsets[i + 1]
        e0, e1 = self.edge_offsets[i], self.edge_offsets[i + 1]
        return MolGraph(
            self.atom_features[n0:n1],
            self.bond_features[e0:e1],
            self.senders[e0:e1],
            self.receivers[e0:e1],
        )


def default_cache_dir() -> Path:
    """`$JAXMOL_CACHE_DIR`, else ``~/.cache/jaxmol``."""
    return Path(os.environ.get("JAXMOL_CACHE_DIR", Path.home() / ".cache" / "jaxmol"))


def _cache_key(featurizer: str, smiles: Sequence[str], extra: str) -> str:
    digest = hashlib.sha256()
    header = f"{featurizer}|v{FEATURIZER_VERSION}|rdkit {rdBase.rdkitVersion}|{extra}\n"
    digest.update(header.encode())
    for s in smiles:
        digest.update(s.encode())
        digest.update(b"\n")
    return digest.hexdigest()


_ARRAY_FIELDS = (
    "atom_features",
    "bond_features",
    "senders",
    "receivers",
    "node_offsets",
    "edge_offsets",
    "valid",
)


def _save_cache(path: Path, split: FeaturizedSplit) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    failures = np.asarray(split.failures, dtype=str).reshape(-1, 3)
    coverage = np.asarray(sorted(split.coverage.items()), dtype=object).reshape(-1, 2)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(
        tmp,
        featurizer=np.asarray(split.featurizer),
        failures=failures,
        coverage_keys=np.asarray(coverage[:, 0], dtype=str),
        coverage_values=np.asarray(coverage[:, 1], dtype=np.int64),
        **{name: getattr(split, name) for name in _ARRAY_FIELDS},
    )
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file


def _load_cache(path: Path) -> FeaturizedSplit | None:
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in _ARRAY_FIELDS}
            failures = tuple(tuple(str(x) for x in row) for row in stored["failures"])
            coverage = dict(
                zip(
                    (str(k) for k in stored["coverage_keys"]),
                    (int(v) for v in stored["coverage_values"]),
                    strict=True,
                )
            )
            featurizer = str(stored["featurizer"])
    except Exception as error:  # a corrupted cache file is recomputed, not trusted
        logger.warning("ignoring unreadable feature cache %s (%s)", path, error)
        return None
    return FeaturizedSplit(
        featurizer=featurizer, failures=failures, coverage=coverage, cache_hit=True, **arrays
    )


def featurize_split(
    ids: Sequence[str],
    smiles: Sequence[str],
    *,
    featurizer: str = "ogb",
    on_invalid: str = "error",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    mol2vec_table: str | os.PathLike | None = None,
) -> FeaturizedSplit:
    """Featurises every molecule of a split, with an on-disk cache.

    The cache key is the SHA-256 of the featuriser name and version, the RDKit version, the
    mol2vec table hash (for 'mol2vec') and the SMILES strings in order, so any change to the data
    or the code that produces features misses the cache.

    Args:
      ids: [M] row identifiers, used in failure reports.
      smiles: [M] SMILES strings.
      featurizer: 'ogb' (9 atom + 3 bond features) or 'mol2vec' (table row per atom).
      on_invalid: 'error' raises `InvalidSmilesError` listing every failing id and SMILES;
        'skip' logs the count and the ids and marks the rows invalid (see `failures`).
      cache_dir: where cache files live; default `default_cache_dir()`.
      use_cache: False always recomputes (and does not write).
      mol2vec_table: the mol2vec .npz table (for 'mol2vec'); None: `default_mol2vec_table()`.

    Returns:
      A `FeaturizedSplit`.
    """
    if featurizer not in FEATURIZERS:
        raise ValueError(f"unknown featurizer {featurizer!r}; expected one of {FEATURIZERS}")
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    if len(ids) != len(smiles):
        raise ValueError(f"{len(ids)} ids but {len(smiles)} SMILES")
    vocab = Mol2VecVocabulary.load(mol2vec_table) if featurizer == "mol2vec" else None
    extra = vocab.sha256 if vocab is not None else ""
    cache_path = Path(cache_dir or default_cache_dir()) / (
        f"{featurizer}-{_cache_key(featurizer, smiles, extra)[:32]}.npz"
    )
    split = _load_cache(cache_path) if use_cache and cache_path.is_file() else None
    if split is None:
        start = time.perf_counter()
        split = _featurize_all(ids, smiles, featurizer, vocab)
        elapsed = time.perf_counter() - start
        logger.info(
            "featurised %d molecules (%s) in %.1f s (%.0f molecules/s)",
            len(smiles),
            featurizer,
            elapsed,
            len(smiles) / max(elapsed, 1e-9),
        )
        if use_cache:
            _save_cache(cache_path, split)
    # Ids are not part of the cache key (the same molecules under other ids share a file), so
    # failure reports are re-labelled with the caller's ids.
    if split.failures:
        bad_rows = np.flatnonzero(~split.valid)
        failures = tuple(
            (str(ids[row]), smiles[row], reason)
            for row, (_, _, reason) in zip(bad_rows, split.failures, strict=True)
        )
        split = dataclasses.replace(split, failures=failures)
        listing = "; ".join(f"id {i}: {s!r}" for i, s, _ in failures)
        if on_invalid == "error":
            details = "\n".join(f"  id {i}: {reason}" for i, _, reason in failures)
            raise InvalidSmilesError(
                f"{len(failures)} of {len(smiles)} molecules cannot be featurised "
                f"(use on_invalid='skip' to exclude them):\n{details}"
            )
        logger.warning(
            "skipping %d of %d molecules that cannot be featurised: %s",
            len(failures),
            len(smiles),
            listing,
        )
    if vocab is not None and split.coverage:
        total = max(sum(split.coverage.values()), 1)
        logger.info(
            "mol2vec coverage: radius-1 %.2f%%, radius-0 fallback %.2f%%, UNK %.2f%% of %d atoms",
            100 * split.coverage["radius1"] / total,
            100 * split.coverage["radius0"] / total,
            100 * split.coverage["unk"] / total,
            total,
        )
    return split


def _featurize_all(ids, smiles, featurizer, vocab) -> FeaturizedSplit:
    atom_blocks, bond_blocks, sender_blocks, receiver_blocks = [], [], [], []
    n_node = np.zeros(len(smiles), np.int64)
    n_edge = np.zeros(len(smiles), np.int64)
    valid = np.ones(len(smiles), bool)
    failures = []
    coverage = {"radius1": 0, "radius0": 0, "unk": 0} if featurizer == "mol2vec" else {}
    for row, s in enumerate(smiles):
        try:
            mol = parse_smiles(s)
        except InvalidSmilesError as error:
            valid[row] = False
            failures.append((str(ids[row]), s, str(error)))
            continue
        bond_features, senders, receivers = _edges(mol)
        if featurizer == "ogb":
            atoms = ogb_atom_features(mol)
        else:
            atoms, level = mol2vec_atom_rows(mol, vocab)
            coverage["radius1"] += int(np.sum(level == 1))
            coverage["radius0"] += int(np.sum(level == 0))
            coverage["unk"] += int(np.sum(level == -1))
        atom_blocks.append(atoms)
        bond_blocks.append(bond_features)
        sender_blocks.append(senders)
        receiver_blocks.append(receivers)
        n_node[row], n_edge[row] = atoms.shape[0], senders.shape[0]
    width = len(ATOM_VOCAB) if featurizer == "ogb" else 1

    def concat(blocks, shape):
        return np.concatenate(blocks) if blocks else np.zeros(shape, np.int32)

    return FeaturizedSplit(
        featurizer=featurizer,
        atom_features=concat(atom_blocks, (0, width)),
        bond_features=concat(bond_blocks, (0, len(BOND_VOCAB))),
        senders=concat(sender_blocks, (0,)),
        receivers=concat(receiver_blocks, (0,)),
        node_offsets=np.concatenate([[0], np.cumsum(n_node)]),
        edge_offsets=np.concatenate([[0], np.cumsum(n_edge)]),
        valid=valid,
        failures=tuple(failures),
        coverage=coverage,
    )
