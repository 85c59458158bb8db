"""GIN molecule tower and the shared MaskedBatchNorm layer."""

import functools

import jax
import jraph
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxmol.data.featurize import (
    ATOM_FEATURE_DIMS,
    BOND_FEATURE_DIMS,
    MolGraph,
    smiles_to_graph,
)
from jaxmol.models.gin import GIN
from jaxmol.models.layers import node_graph_index, segment_mean_pool
from jaxmol.models.retrieval import count_params

SMILES = ("CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "[Na+].[Cl-]", "C", "OC(=O)C=CC(=O)O")


def padded_graphs(items, num_nodes, num_edges):
    """jraph batch of `items` (SMILES, a MolGraph, or None for an empty pair) + padding graph."""
    parts = []
    for item in items:
        if item is None:
            mol = MolGraph.empty()
        else:
            mol = smiles_to_graph(item) if isinstance(item, str) else item
        parts.append(mol.as_graphs_tuple())
    batch = jraph.pad_with_graphs(jraph.batch_np(parts), num_nodes, num_edges, len(items) + 1)
    return batch._replace(
        n_node=batch.n_node.astype(np.int32), n_edge=batch.n_edge.astype(np.int32)
    )


def scramble_padding(graphs, seed=0):
    """Random (valid) feature codes on every padding node and padding edge."""
    rng = np.random.default_rng(seed)
    node_mask = np.asarray(jraph.get_node_padding_mask(graphs))
    edge_mask = np.asarray(jraph.get_edge_padding_mask(graphs))
    nodes = np.array(graphs.nodes)
    edges = np.array(graphs.edges)
    for column, size in enumerate(ATOM_FEATURE_DIMS):
        nodes[~node_mask, column] = rng.integers(0, size, (~node_mask).sum())
    for column, size in enumerate(BOND_FEATURE_DIMS):
        edges[~edge_mask, column] = rng.integers(0, size, (~edge_mask).sum())
    return graphs._replace(nodes=nodes, edges=edges)


def pooled(states, mask, graphs):
    return segment_mean_pool(states, mask, node_graph_index(graphs), graphs.n_node.shape[0])


def data_mesh():
    """1-D mesh 'data' over all devices; Auto axes so host arrays are sharded by in_specs."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.fixture(scope="module")
def gin_small():
    model = GIN(num_layers=3, features=16)
    graphs = padded_graphs(SMILES[:3], 40, 80)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), graphs)
    return model, variables


@functools.cache
def _jitted(model, train):
    if train:
        return jax.jit(
            lambda v, g, key: model.apply(
                v, g, train=True, mutable=["batch_stats"], rngs={"dropout": key}
            )
        )
    return jax.jit(lambda v, g: model.apply(v, g, train=False))


def test_gin_outputs_follow_the_input_topology(gin_small):
    model, variables = gin_small
    graphs = padded_graphs([SMILES[0], None, SMILES[1]], 24, 40)
    n_node_before = np.array(graphs.n_node)
    states, mask = _jitted(model, False)(variables, graphs)
    assert states.shape == (24, 16)
    np.testing.assert_array_equal(graphs.n_node, n_node_before)
    np.testing.assert_array_equal(mask, np.asarray(jraph.get_node_padding_mask(graphs)))
    assert int(mask.sum()) == sum(n_node_before[:-1])
    assert np.all(np.asarray(states)[~np.asarray(mask)] == 0.0)
    assert np.all(np.isfinite(states))


def test_gin_pooled_embedding_is_permutation_invariant(gin_small):
    model, variables = gin_small
    mol = smiles_to_graph(SMILES[2])
    perm = np.random.default_rng(0).permutation(mol.num_nodes)
    inverse = np.argsort(perm)  # old index -> new index
    permuted = type(mol)(
        atom_features=mol.atom_features[perm],
        bond_features=mol.bond_features,
        senders=inverse[mol.senders].astype(np.int32),
        receivers=inverse[mol.receivers].astype(np.int32),
    )
    g1 = padded_graphs([mol], 16, 32)
    g2 = padded_graphs([permuted], 16, 32)
    s1, m1 = _jitted(model, False)(variables, g1)
    s2, m2 = _jitted(model, False)(variables, g2)
    np.testing.assert_allclose(pooled(s1, m1, g1)[0], pooled(s2, m2, g2)[0], atol=1e-5)
    # Node states are permutation-equivariant.
    np.testing.assert_allclose(s2[: mol.num_nodes], s1[: mol.num_nodes][perm], atol=1e-5)
    assert not np.allclose(pooled(s1, m1, g1)[0], 0.0)


def test_gin_same_molecule_same_embedding_in_any_batch(gin_small):
    model, variables = gin_small
    alone = padded_graphs([SMILES[2]], 24, 48)
    crowded = padded_graphs([SMILES[0], None, SMILES[2], SMILES[5]], 96, 160)
    s1, m1 = _jitted(model, False)(variables, alone)
    s2, m2 = _jitted(model, False)(variables, crowded)
    np.testing.assert_allclose(pooled(s1, m1, alone)[0], pooled(s2, m2, crowded)[2], atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_gin_padding_values_change_nothing(gin_small, train):
    model, variables = gin_small
    graphs = padded_graphs([SMILES[1], None, SMILES[3]], 32, 48)
    scrambled = scramble_padding(graphs)
    assert not np.array_equal(scrambled.nodes, graphs.nodes)
    if train:
        key = jax.random.key(5)
        (s1, _), st1 = _jitted(model, True)(variables, graphs, key)
        (s2, _), st2 = _jitted(model, True)(variables, scrambled, key)
        jax.tree.map(np.testing.assert_array_equal, st1, st2)
    else:
        s1, _ = _jitted(model, False)(variables, graphs)
        s2, _ = _jitted(model, False)(variables, scrambled)
    np.testing.assert_array_equal(s1, s2)


def test_gin_batchnorm_statistics_ignore_padding_nodes(gin_small):
    model, variables = gin_small
    key = jax.random.key(0)
    small = padded_graphs([SMILES[1], SMILES[2]], 24, 48)
    big = scramble_padding(padded_graphs([SMILES[1], None, SMILES[2], None], 128, 256), seed=4)
    (_, _), stats_small = _jitted(model, True)(variables, small, key)
    (_, _), stats_big = _jitted(model, True)(variables, big, key)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        stats_small,
        stats_big,
    )
    # The statistics did move away from their initial values.
    assert not np.allclose(stats_small["batch_stats"]["norm_0"]["mean"], 0.0)


def test_gin_eval_deterministic_and_train_dropout():
    model = GIN(num_layers=2, features=8, dropout_rate=0.5)
    graphs = padded_graphs(SMILES[:2], 16, 32)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), graphs)
    eval_fn = _jitted(model, False)
    np.testing.assert_array_equal(eval_fn(variables, graphs)[0], eval_fn(variables, graphs)[0])
    train_fn = _jitted(model, True)
    (a, _), _ = train_fn(variables, graphs, jax.random.key(1))
    (b, _), _ = train_fn(variables, graphs, jax.random.key(2))
    (c, _), _ = train_fn(variables, graphs, jax.random.key(1))
    assert np.all(np.isfinite(a))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, c)


def test_gin_synced_batchnorm_across_devices_equals_single_device():
    """Training-mode GIN over 8 device chunks == one device on the whole batch.

    Checks the forward pass, the running statistics, and the parameter gradient of a loss summed
    over all molecules (per-device gradients psum'd, shard_map with check_vma=False).
    """
    # With the MLP's inner BatchNorm too, so that both BatchNorms are checked.
    model_single = GIN(num_layers=2, features=8, mlp_batch_norm=True)
    model_synced = GIN(num_layers=2, features=8, mlp_batch_norm=True, axis_name="data")
    # Uneven molecules per device (sizes 0..19 atoms), b = 2 pair slots per device.
    chunks = [
        [SMILES[0], SMILES[2]],
        [None, None],
        [SMILES[3], None],
        [SMILES[1], SMILES[5]],
        [SMILES[4], SMILES[0]],
        [None, SMILES[2]],
        [SMILES[5], SMILES[5]],
        [SMILES[1], None],
    ]
    per_device = [padded_graphs(c, 40, 64) for c in chunks]
    stacked = jax.tree.map(lambda *xs: np.concatenate(xs), *per_device)
    whole = padded_graphs([s for c in chunks for s in c], 320, 512)
    variables = model_single.init(jax.random.key(0), whole, train=False)

    def forward(model, params, graphs):
        (states, mask), stats = model.apply(
            {**variables, "params": params}, graphs, train=True, mutable=["batch_stats"]
        )
        per_graph = pooled(states, mask, graphs)[:-1]  # [b, 8]
        return jax.numpy.sum(jax.numpy.sin(3.0 * per_graph)), (per_graph, stats)

    grad_fn = jax.value_and_grad(forward, argnums=1, has_aux=True)
    (_, (pooled_ref, stats_ref)), grads_ref = jax.jit(grad_fn, static_argnums=0)(
        model_single, variables["params"], whole
    )

    def step(params, graphs):
        (_, (per_graph, stats)), grads = grad_fn(model_synced, params, graphs)
        return per_graph, stats, jax.lax.psum(grads, "data")

    fn = jax.jit(
        jax.shard_map(
            step,
            mesh=data_mesh(),
            in_specs=(P(), P("data")),
            out_specs=(P("data"), P(), P()),
            check_vma=False,
        )
    )
    got, stats, grads = fn(variables["params"], stacked)
    np.testing.assert_allclose(np.asarray(got), np.asarray(pooled_ref), atol=1e-5)
    # Gradients reach ~20; a bias feeding a BatchNorm has an exactly-zero gradient that float32
    # leaves as rounding noise of ~1e-5 of that scale, hence the absolute tolerance for grads.
    for ref_tree, got_tree, atol in ((stats_ref, stats, 1e-5), (grads_ref, grads, 2e-4)):
        jax.tree.map(
            lambda a, b, atol=atol: np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol
            ),
            got_tree,
            ref_tree,
        )
    assert float(np.abs(np.asarray(grads_ref["conv_0"]["mlp_0"]["kernel"])).sum()) > 0


def test_gin_default_parameter_count(capsys):
    graphs = padded_graphs(SMILES[:1], 8, 8)
    shapes = jax.eval_shape(functools.partial(GIN().init, train=False), jax.random.key(0), graphs)
    d = 300
    per_layer = d * sum(BOND_FEATURE_DIMS) + 1 + (d * 2 * d + 2 * d) + (2 * d * d + d) + 2 * d
    expected = d * sum(ATOM_FEATURE_DIMS) + 5 * per_layer
    got = count_params(shapes["params"])
    with_mlp_norm = jax.eval_shape(
        functools.partial(GIN(mlp_batch_norm=True).init, train=False), jax.random.key(0), graphs
    )
    with capsys.disabled():
        print(f"\n[param count] GIN 5x300 (default): {got:,}")
    assert got == expected
    assert count_params(with_mlp_norm["params"]) == expected + 5 * 2 * (2 * d)
    assert set(with_mlp_norm["batch_stats"]["conv_0"]["mlp_norm"]) == {"mean", "var"}
