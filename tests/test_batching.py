"""Exact-B pair batches: masks, buckets, graph budgets, device chunks, determinism, resume."""

import itertools

import jraph
import numpy as np
import pytest

from jaxmol.data.batching import (
    GraphBudgets,
    PairBatcher,
    Position,
    graph_budgets_for,
    padding_fractions,
    prefetch,
)
from jaxmol.data.datasets import load_split
from jaxmol.data.encoding import SplitEncoder
from jaxmol.data.tokenize import load_tokenizer


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    # 203 rows (a prime: never a multiple of the batch size) incl. id 924, which RDKit rejects.
    dataset = load_split("pcdes/train").select(range(850, 1053), name="pcdes/train[850:1053]")
    encoder = SplitEncoder(
        load_tokenizer(), on_invalid="skip", cache_dir=tmp_path_factory.mktemp("features")
    )
    return encoder(dataset)


def test_invalid_molecule_is_reported_not_batched(encoded):
    assert [failure[0] for failure in encoded.skipped] == ["924"]
    assert len(encoded.rows) == 202
    bad_row = encoded.dataset.ids.index("924")
    assert bad_row not in encoded.rows


def _all_batches(batcher, epoch=0):
    return [batcher.make_batch(rows) for rows in batcher.epoch_batches(epoch)]


@pytest.mark.parametrize("num_devices", [1, 4])
def test_every_pair_once_per_epoch_in_exact_b_batches(encoded, num_devices):
    batcher = PairBatcher(encoded, batch_size=16, num_devices=num_devices, seed=3)
    batches = _all_batches(batcher)
    assert len(batches) == batcher.num_batches == 13  # ceil(202 / 16)
    seen = []
    for batch in batches:
        assert batch["text_ids"].shape[:2] == (num_devices, 16 // num_devices)
        assert batch["pair_mask"].shape == (num_devices, 16 // num_devices)
        seen += batch["rows"][batch["pair_mask"]].tolist()
    assert sorted(seen) == sorted(encoded.rows.tolist())
    last = batches[-1]
    assert last["pair_mask"].sum() == 202 - 12 * 16
    assert (last["rows"][~last["pair_mask"]] == -1).all()
    assert all(b["pair_mask"].all() for b in batches[:-1])


def test_masked_pairs_have_no_tokens_and_empty_graphs(encoded):
    batcher = PairBatcher(encoded, batch_size=16, num_devices=2, seed=0)
    last = batcher.make_batch(batcher.epoch_batches(0)[-1])
    masked = ~last["pair_mask"]
    assert (last["text_mask"][masked] == 0).all()
    assert (last["text_mask"][~masked].sum(-1) >= 2).all()  # at least [CLS] [SEP]
    assert (last["graphs"].n_node[:, :-1][masked] == 0).all()
    assert (last["graphs"].n_edge[:, :-1][masked] == 0).all()


def test_texts_and_graphs_match_the_rows(encoded):
    batcher = PairBatcher(encoded, batch_size=8, num_devices=2, seed=0)
    batch = batcher.make_batch(batcher.epoch_batches(0)[0])
    graphs = batch["graphs"]
    for d in range(2):
        offset = 0
        for i, row in enumerate(batch["rows"][d]):
            tokens = encoded.tokens.text(row)
            n = len(tokens)
            np.testing.assert_array_equal(batch["text_ids"][d, i, :n], tokens)
            assert batch["text_mask"][d, i].sum() == n
            expected = encoded.graphs.graph(row)
            assert graphs.n_node[d, i] == expected.num_nodes
            np.testing.assert_array_equal(
                graphs.nodes[d, offset : offset + expected.num_nodes], expected.atom_features
            )
            offset += expected.num_nodes


def test_text_bucket_is_the_smallest_that_fits(encoded):
    batcher = PairBatcher(encoded, batch_size=8, seed=0, text_buckets=(32, 64, 128, 256))
    for rows in batcher.epoch_batches(0):
        batch = batcher.make_batch(rows)
        longest = encoded.tokens.lengths[rows].max()
        width = batch["text_ids"].shape[-1]
        assert width >= longest
        smaller = [b for b in (32, 64, 128, 256) if b < width]
        assert not smaller or longest > max(smaller)


def test_device_chunks_are_self_contained_jraph_batches(encoded):
    batcher = PairBatcher(encoded, batch_size=16, num_devices=4, seed=1)
    batch = batcher.make_batch(batcher.epoch_batches(0)[-1])
    graphs = batch["graphs"]
    N, E = graphs.nodes.shape[1], graphs.edges.shape[1]
    for d in range(4):
        rows = batch["rows"][d]
        chunk = jraph.GraphsTuple(*(None if x is None else x[d] for x in graphs))
        assert chunk.n_node.sum() == N and chunk.n_edge.sum() == E
        # Local indices only, and each edge stays inside its own graph.
        graph_of_node = np.repeat(np.arange(len(chunk.n_node)), chunk.n_node)
        assert (chunk.senders < N).all() and (chunk.receivers < N).all()
        np.testing.assert_array_equal(graph_of_node[chunk.senders], graph_of_node[chunk.receivers])
        # Equal to what jraph itself builds from the same molecules.
        members = []
        for row in rows:
            g = encoded.graphs.graph(row) if row >= 0 else None
            members.append(
                jraph.GraphsTuple(
                    nodes=g.atom_features if g else np.zeros((0, 9), np.int32),
                    edges=g.bond_features if g else np.zeros((0, 3), np.int32),
                    senders=g.senders if g else np.zeros(0, np.int32),
                    receivers=g.receivers if g else np.zeros(0, np.int32),
                    n_node=np.array([g.num_nodes if g else 0]),
                    n_edge=np.array([g.num_edges if g else 0]),
                    globals=None,
                )
            )
        reference = jraph.pad_with_graphs(
            jraph.batch_np(members), n_node=N, n_edge=E, n_graph=len(rows) + 1
        )
        for ours, theirs in zip(chunk[:6], reference[:6], strict=True):
            np.testing.assert_array_equal(ours, theirs)
        mask = jraph.get_node_padding_mask(chunk)
        assert int(np.asarray(mask).sum()) == chunk.n_node[:-1].sum()


def test_graph_budget_levels_and_overflow():
    n_node = np.array([10, 12, 8, 300])
    n_edge = np.array([20, 22, 14, 600])
    budgets = graph_budgets_for(n_node, n_edge, pairs_per_chunk=2)
    assert budgets.nodes == tuple(sorted(budgets.nodes))
    assert budgets.level_for(22, 42) == 0
    assert budgets.level_for(312, 622) == len(budgets.nodes) - 1  # the two largest fit
    with pytest.raises(ValueError, match="exceeds the largest graph budget"):
        budgets.level_for(budgets.nodes[-1], 0)  # no room for the padding node


def test_oversized_chunk_moves_to_a_larger_budget(encoded):
    small = GraphBudgets(nodes=(64, 4096), edges=(128, 8192))
    batcher = PairBatcher(encoded, batch_size=8, seed=0, graph_budgets=small)
    batches = [batcher.make_batch(r) for r in batcher.epoch_batches(0)]
    for batch in batches:
        real_nodes = batch["graphs"].n_node[0, :-1].sum()
        expected = 64 if real_nodes < 64 else 4096
        assert batch["graphs"].nodes.shape[1] == expected
    assert sum(int(b["pair_mask"].sum()) for b in batches) == 202  # nothing dropped
    assert any(b["graphs"].nodes.shape[1] == 4096 for b in batches)


def test_order_is_a_function_of_seed_and_epoch(encoded):
    def order(seed, epoch, **kwargs):
        batcher = PairBatcher(encoded, batch_size=16, seed=seed, **kwargs)
        return np.concatenate(batcher.epoch_batches(epoch)).tolist()

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert order(5, 2, group_by_length=True) == order(5, 2, group_by_length=True)
    assert sorted(order(5, 2, group_by_length=True)) == sorted(encoded.rows.tolist())
    eval_order = PairBatcher(encoded, batch_size=16, shuffle=False).epoch_batches(0)
    assert np.concatenate(eval_order).tolist() == encoded.rows.tolist()


def test_group_by_length_reduces_text_padding(encoded):
    plain = PairBatcher(encoded, batch_size=16, seed=0)
    grouped = PairBatcher(encoded, batch_size=16, seed=0, group_by_length=True)
    batches = grouped.epoch_batches(0)
    assert all(len(b) == 16 for b in batches[:-1]) and len(batches[-1]) == 202 % 16
    assert padding_fractions(grouped)["text_padding"] < padding_fractions(plain)["text_padding"]


def test_restored_position_continues_like_an_uninterrupted_stream(encoded):
    batcher = PairBatcher(encoded, batch_size=16, num_devices=2, seed=7, group_by_length=True)
    uninterrupted = list(itertools.islice(batcher.iterate(), 30))  # crosses an epoch boundary
    saved_position, _ = uninterrupted[16]
    assert saved_position == Position(epoch=1, step=4)
    restored = Position.from_dict(saved_position.to_dict())
    fresh = PairBatcher(encoded, batch_size=16, num_devices=2, seed=7, group_by_length=True)
    resumed = list(itertools.islice(fresh.iterate(restored), 13))
    for (pos_a, a), (pos_b, b) in zip(uninterrupted[17:], resumed, strict=True):
        assert pos_a == pos_b
        np.testing.assert_array_equal(a["rows"], b["rows"])
        np.testing.assert_array_equal(a["text_ids"], b["text_ids"])
        np.testing.assert_array_equal(a["graphs"].nodes, b["graphs"].nodes)


def test_prefetch_preserves_order_and_propagates_errors():
    assert list(prefetch(iter(range(10)), size=3)) == list(range(10))

    def failing():
        yield 1
        raise RuntimeError("boom")

    stream = prefetch(failing())
    assert next(stream) == 1
    with pytest.raises(RuntimeError, match="boom"):
        next(stream)


def test_bad_batch_configuration_is_rejected(encoded):
    with pytest.raises(ValueError, match="multiple of num_devices"):
        PairBatcher(encoded, batch_size=10, num_devices=4)
    with pytest.raises(ValueError, match="largest text bucket"):
        PairBatcher(encoded, batch_size=8, text_buckets=(32, 64))
