"""Retrieval evaluation: batched embedding (`embedder`), the protocols (`protocols`), result files
and tables (`report`), and restoring a checkpoint for evaluation (`restore`).

The pure NumPy scoring these build on is `jaxmol.scoring` and `jaxmol.metrics`. Evaluation never
imports training code: the training loop hands it an `Embedder` and variables.
"""

from jaxmol.evaluation.embedder import Embedder, ReplicatedVariables
from jaxmol.evaluation.protocols import (
    PROTOCOLS,
    TEXT2MOL_KS,
    TEXT2MOL_MOLECULE_SPLITS,
    TEXT2MOL_QUERY_SPLITS,
    TEXT2MOL_TEXT_SPLITS,
    EvalContext,
    ProtocolError,
    ProtocolOutput,
    check_protocol,
    evaluate_split,
    text2mol_text_splits,
)
from jaxmol.evaluation.report import format_table, result_stem, write_result
from jaxmol.evaluation.restore import evaluate_checkpoint, restore_for_eval

__all__ = [
    "PROTOCOLS",
    "TEXT2MOL_KS",
    "TEXT2MOL_MOLECULE_SPLITS",
    "TEXT2MOL_QUERY_SPLITS",
    "TEXT2MOL_TEXT_SPLITS",
    "Embedder",
    "EvalContext",
    "ProtocolError",
    "ProtocolOutput",
    "ReplicatedVariables",
    "check_protocol",
    "evaluate_checkpoint",
    "evaluate_split",
    "format_table",
    "restore_for_eval",
    "result_stem",
    "text2mol_text_splits",
    "write_result",
]
