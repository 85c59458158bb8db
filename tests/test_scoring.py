"""Pure NumPy scoring of the protocols: sentence splitting, paragraph scores, MoMu metrics."""

import subprocess
import sys

import numpy as np

from jaxmol import metrics, scoring


def test_scoring_imports_no_jax():
    code = (
        "import sys; import jaxmol.scoring; "
        "bad = [m for m in ('jax', 'flax', 'optax', 'rdkit') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_split_sentences_drops_short_pieces_while_more_than_one_remains():
    paragraph = (
        "The molecule is a beta-diketone found in plants. It is red. "
        "It is a conjugate acid of an anion."
    )
    assert scoring.split_sentences(paragraph) == [
        "The molecule is a beta-diketone found in plants",
        "It is a conjugate acid of an anion",
    ]
    # All pieces short: the longest one survives (the others go shortest first).
    assert scoring.split_sentences("Tiny. A bit longer.") == ["A bit longer"]
    # No '.': the paragraph is its own sentence, however short.
    assert scoring.split_sentences("Benzene") == ["Benzene"]
    # Fields are counted as the official code counts them: split(' ') on the raw piece, so the
    # space after a '.' is a field ("x. a b c d" -> " a b c d" has 5 fields and stays).
    assert scoring.split_sentences("Five words are right here. a b c d") == [
        "Five words are right here",
        "a b c d",
    ]
    assert scoring.split_sentences("Five words are right here.a b c d") == [
        "Five words are right here"
    ]


def test_sentence_scores_are_mean_cosines():
    rng = np.random.default_rng(0)
    sentence_emb = rng.normal(size=(7, 5))  # [S, d]
    mol_emb = rng.normal(size=(3, 5))  # [M, d]
    sentence_paragraph = np.array([0, 0, 1, 2, 2, 2, 1])
    _, scores = scoring.sentence_paragraph_scores(sentence_emb, sentence_paragraph, mol_emb)

    def cosine(a, b):
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    expected = np.array(
        [
            [
                np.mean([cosine(s, m) for s in sentence_emb[sentence_paragraph == p]])
                for m in mol_emb
            ]
            for p in range(3)
        ]
    )
    np.testing.assert_allclose(scores, expected, atol=1e-6)


def test_momu_metrics_from_scores_match_embedding_version():
    rng = np.random.default_rng(1)
    text_emb = rng.normal(size=(23, 4)).astype(np.float32)
    mol_emb = text_emb + rng.normal(scale=1.5, size=(23, 4)).astype(np.float32)
    from_emb = scoring.momu_metrics_from_embeddings(text_emb, mol_emb, inbatch_size=8)
    scores = metrics.l2_normalize_rows(text_emb) @ metrics.l2_normalize_rows(mol_emb).T  # [N, N]
    from_scores = scoring.momu_metrics_from_scores(scores, inbatch_size=8)
    for direction in ("t2m", "m2t"):
        assert from_emb[direction] == from_scores[direction]
        assert 0 < from_emb[direction]["inbatch_acc@8"] < 1
    # In-batch accuracy only counts candidates of the query's own batch.
    assert from_emb["t2m"]["inbatch_acc@8"] >= from_emb["t2m"]["hits@1"]
    assert from_emb["t2m"]["recall@20"] == from_emb["t2m"]["hits@20"]
