"""Official CMTMR GCN tower over mol2vec node features."""

import functools

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from jaxmol.data.featurize import Mol2VecVocabulary, MolGraph, smiles_to_mol2vec_graph
from jaxmol.models.gcn import GCNMol2Vec, load_mol2vec_table
from jaxmol.models.retrieval import count_params

SMILES = ("CC(=O)Nc1ccc(O)cc1", "[Na+].[Cl-]", "OC(=O)C=CC(=O)O", "C")


@pytest.fixture(scope="module")
def vocab():
    return Mol2VecVocabulary.load()


def mol2vec_graphs(items, vocab, num_nodes, num_edges):
    """Padded jraph batch of mol2vec graphs (None = an empty pair) + the padding graph."""
    parts = []
    for item in items:
        mol = MolGraph.empty(1) if item is None else smiles_to_mol2vec_graph(item, vocab)
        parts.append(mol.as_graphs_tuple())
    batch = jraph.pad_with_graphs(jraph.batch_np(parts), num_nodes, num_edges, len(items) + 1)
    return batch._replace(
        n_node=batch.n_node.astype(np.int32), n_edge=batch.n_edge.astype(np.int32)
    )


@pytest.fixture(scope="module")
def gcn(vocab):
    model = GCNMol2Vec()
    graphs = mol2vec_graphs(SMILES[:2], vocab, 32, 48)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), graphs)
    return model, variables, jax.jit(functools.partial(model.apply, train=False))


def _reference_forward(params, table, rows, senders, receivers):
    """Dense NumPy forward of one molecule: Â = D^-1/2 (A + I) D^-1/2, spec §2.2 / §11."""
    n = len(rows)
    adjacency = np.eye(n)
    for s, r in zip(senders, receivers, strict=True):
        adjacency[r, s] += 1.0  # message s -> r
    degree = adjacency.sum(1)  # in-degree + 1
    norm_adjacency = adjacency / np.sqrt(degree[:, None] * degree[None, :])
    x = table[rows].astype(np.float64)
    for layer in range(3):
        conv = params[f"conv_{layer}"]
        x = norm_adjacency @ (x @ np.asarray(conv["linear"]["kernel"])) + np.asarray(conv["bias"])
        if layer < 2:
            x = np.maximum(x, 0.0)
    for layer in range(3):
        dense = params[f"head_{layer}"]
        x = x @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
        if layer < 2:
            x = np.maximum(x, 0.0)
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    norm = params["head_norm"]
    return (x - mean) / np.sqrt(var + 1e-5) * np.asarray(norm["scale"]) + np.asarray(norm["bias"])


def test_gcn_matches_dense_reference(gcn, vocab):
    _, variables, apply = gcn
    items = [SMILES[0], None, SMILES[1], SMILES[2]]  # includes a 0-edge molecule and an empty pair
    graphs = mol2vec_graphs(items, vocab, 48, 64)
    states, mask = apply(variables, graphs)
    assert states.shape == (48, 300)
    table = load_mol2vec_table()
    offset = 0
    for item in items:
        if item is None:
            continue
        mol = smiles_to_mol2vec_graph(item, vocab)
        expected = _reference_forward(
            variables["params"], table, mol.atom_features[:, 0], mol.senders, mol.receivers
        )
        np.testing.assert_allclose(states[offset : offset + mol.num_nodes], expected, atol=2e-4)
        offset += mol.num_nodes
    assert int(mask.sum()) == offset
    assert np.all(np.asarray(states)[offset:] == 0.0)


def test_gcn_padding_invariance(gcn, vocab):
    _, variables, apply = gcn
    alone = mol2vec_graphs([SMILES[2]], vocab, 16, 24)
    crowded = mol2vec_graphs([SMILES[0], None, SMILES[2]], vocab, 64, 96)
    rng = np.random.default_rng(0)
    node_mask = np.asarray(jraph.get_node_padding_mask(crowded))
    nodes = np.array(crowded.nodes)
    nodes[~node_mask, 0] = rng.integers(0, 3000, (~node_mask).sum())  # scrambled padding values
    crowded = crowded._replace(nodes=nodes)
    s1, _ = apply(variables, alone)
    s2, _ = apply(variables, crowded)
    n = int(alone.n_node[0])
    start = int(crowded.n_node[0])
    np.testing.assert_allclose(s1[:n], s2[start : start + n], atol=1e-5)


def test_gcn_table_is_fixed_and_glorot_init(gcn, vocab):
    model, variables, _ = gcn
    params = variables["params"]
    np.testing.assert_array_equal(params["mol2vec_table"], vocab.embeddings)
    graphs = mol2vec_graphs(SMILES[:2], vocab, 32, 48)

    def loss(params):
        states, _ = model.apply({"params": params}, graphs, train=True)
        return jnp.sum(states**2)

    grads = jax.jit(jax.grad(loss))(params)
    assert np.all(np.asarray(grads["mol2vec_table"]) == 0.0)
    assert np.abs(np.asarray(grads["conv_0"]["linear"]["kernel"])).sum() > 0
    assert np.all(np.isfinite(np.asarray(grads["head_2"]["kernel"])))
    kernel = np.asarray(params["conv_0"]["linear"]["kernel"])
    bound = np.sqrt(6.0 / (300 + 600))
    assert kernel.shape == (300, 600)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
    np.testing.assert_array_equal(params["conv_0"]["bias"], 0.0)


def test_gcn_parameter_count(gcn, capsys):
    _, variables, _ = gcn
    params = dict(variables["params"])
    table = params.pop("mol2vec_table")
    trainable = count_params(params)
    expected = (
        (300 * 600 + 600)
        + 2 * (600 * 600 + 600)  # three GCNConv
        + 2 * (600 * 600 + 600)
        + (600 * 300 + 300)
        + 600  # per-node head + LayerNorm
    )
    with capsys.disabled():
        print(f"\n[param count] official GCN + head: {trainable:,} trainable, {table.size:,} fixed")
    assert trainable == expected


def test_the_default_mol2vec_table_follows_the_data_folder(tmp_path, monkeypatch):
    """--data_dir / $JAXMOL_DATA_DIR move the mol2vec table with the splits (the featuriser's
    vocabulary and the GCN's table), and the cache never serves the other folder's table."""
    from jaxmol.data import datasets, featurize

    shipped = load_mol2vec_table()
    table = tmp_path / featurize.MOL2VEC_TABLE_NAME
    table.parent.mkdir(parents=True)
    embeddings = np.arange(2 * 300, dtype=np.float32).reshape(2, 300)
    np.savez(table, keys=np.asarray(["UNK", "123"]), embeddings=embeddings)
    monkeypatch.setattr(datasets, "DATA_DIR", tmp_path)
    assert featurize.default_mol2vec_table() == table
    assert featurize.Mol2VecVocabulary.load().row_of == {"UNK": 0, "123": 1}
    np.testing.assert_array_equal(load_mol2vec_table(), embeddings)
    monkeypatch.setattr(datasets, "DATA_DIR", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="mol2vec table not found"):
        load_mol2vec_table()
    monkeypatch.undo()
    np.testing.assert_array_equal(load_mol2vec_table(), shipped)
