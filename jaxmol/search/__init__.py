"""Search a library by description (text -> molecules) or a text corpus by molecule.

    from jaxmol.search import Index, Retriever

    retriever = Retriever.from_workdir("runs/quickstart", step="latest")
    index = Index.build(retriever, "library.smi", "runs/quickstart/index/library")
    index = Index.load("runs/quickstart/index/library", retriever)
    (result,) = index.search(["an aromatic amine that is a ligand of dopamine receptors"], k=5)
    for hit in result.hits():
        print(hit["rank"], hit["score"], hit["id"], hit["smiles"])

`Retriever` embeds texts and SMILES with a trained checkpoint (`retriever`); `Index` stores a
library's embeddings in shard files, built streamed and resumable, and searches them exactly
(`index`, `topk`); `readers` reads SMILES, CSV/TSV and SD files (gzipped too) and registered
splits; `server` is the web page (`python search.py serve`). Started by `python -m jaxmol.launch`,
`Retriever.from_workdir` joins the other processes (`join_processes`): every process then builds
and searches together over all their devices, and process 0 writes. See docs/search.md.
"""

from jaxmol.search.index import (
    DEFAULT_SHARD_SIZE,
    FORMAT_VERSION,
    MAX_K,
    BuildError,
    Index,
    IndexFileError,
    SearchError,
    SearchResult,
    WrongCheckpointError,
)
from jaxmol.search.readers import (
    ReaderError,
    Record,
    Source,
    molecule_source,
    sequence_source,
    split_source,
    text_source,
)
from jaxmol.search.retriever import Retriever, join_processes, params_hash
from jaxmol.search.topk import ExactTopK

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "FORMAT_VERSION",
    "MAX_K",
    "BuildError",
    "ExactTopK",
    "Index",
    "IndexFileError",
    "ReaderError",
    "Record",
    "Retriever",
    "SearchError",
    "SearchResult",
    "Source",
    "WrongCheckpointError",
    "join_processes",
    "molecule_source",
    "params_hash",
    "sequence_source",
    "split_source",
    "text_source",
]
