"""Text packing (``data.pack_texts``): host packing, block-diagonal BERT, the model's gather back
to one row per pair, and the train step on one and on 8 devices, each against the padded path."""

import itertools

import jax
import numpy as np
import optax
import pytest

from configs import tiny
from jaxmol import builders, train_step
from jaxmol.config import ConfigError, validate_config
from jaxmol.data import batching
from jaxmol.data.batching import PairBatcher
from jaxmol.data.datasets import load_split
from jaxmol.data.encoding import SplitEncoder
from jaxmol.data.tokenize import load_tokenizer
from jaxmol.models import bert
from jaxmol.models.retrieval import (
    MINILM_BERT_CONFIG,
    ModelConfig,
    RetrievalModel,
    text_inputs,
)
from jaxmol.parallel import DataParallel, select_devices

PACKED_KEYS = {"text_segments", "text_positions", "text_row", "text_start", "text_length"}


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """61 PCdes train pairs tokenised to at most 64 tokens (lengths 15..64)."""
    encoder = SplitEncoder(
        load_tokenizer(max_length=64),
        on_invalid="skip",
        cache_dir=str(tmp_path_factory.mktemp("features")),
    )
    return encoder(load_split("pcdes/train").select(range(61)))


# ----------------------------------------------------------------------------------------------
# Host side.


def test_row_levels_and_first_fit_decreasing():
    assert batching.text_row_levels(32) == (4, 8, 12, 16, 20, 24, 28, 32)
    assert batching.text_row_levels(4) == (1, 2, 3, 4)
    assert batching.text_row_levels(2) == (1, 2)
    lengths = np.array([60, 0, 10, 50, 64, 5, 0, 30])
    row, start, used = batching.pack_lengths(lengths, 64)
    assert used == 4  # 64 | 60 + 0 | 50 + 10 | 30 + 5 (first fit, longest first)
    for r in range(used):
        spans = sorted(
            (start[i], start[i] + lengths[i]) for i in range(8) if lengths[i] and row[i] == r
        )
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # no overlap
        assert spans[-1][1] <= 64
    assert (row[lengths == 0] == 0).all() and (start[lengths == 0] == 0).all()
    with pytest.raises(ValueError, match="exceeds the row"):
        batching.pack_lengths(np.array([65]), 64)


def _check_packed(batch, batcher):
    tokens = batcher.split.tokens
    ids, segments, positions = batch["text_ids"], batch["text_segments"], batch["text_positions"]
    D, R, _ = ids.shape
    assert R in batcher.text_row_levels
    assert batch["text_row"].shape == batch["text_length"].shape == batch["pair_mask"].shape
    covered = np.zeros_like(segments)
    for d in range(D):
        for i in range(batch["rows"].shape[1]):
            row, start = batch["text_row"][d, i], batch["text_start"][d, i]
            n = batch["text_length"][d, i]
            if not batch["pair_mask"][d, i]:
                assert n == 0 and batch["rows"][d, i] == -1  # a padded pair: an empty mask
                continue
            text = tokens.text(batch["rows"][d, i])
            assert n == len(text)
            span = slice(start, start + n)
            np.testing.assert_array_equal(ids[d, row, span], text)
            np.testing.assert_array_equal(positions[d, row, span], np.arange(n))
            assert (segments[d, row, span] == segments[d, row, start]).all()
            assert segments[d, row, start] > 0
            covered[d, row, span] += 1
        for r in range(R):  # segment ids count the row's texts from the left: 1, 2, ...
            seen = segments[d, r][segments[d, r] > 0]
            if not len(seen):
                continue  # an empty row (another chunk of the batch needed more rows)
            firsts = seen[np.r_[True, seen[1:] != seen[:-1]]]
            np.testing.assert_array_equal(firsts, np.arange(1, len(firsts) + 1))
    # Every real token belongs to exactly one text; the rest is padding, segment 0, pad id.
    assert covered.max() <= 1
    np.testing.assert_array_equal(covered > 0, segments > 0)
    assert (ids[segments == 0] == tokens.pad_id).all()
    assert (positions[segments == 0] == 0).all()


@pytest.mark.parametrize("num_devices", [1, 4])
def test_packed_batches_hold_every_text_once(split, num_devices):
    kwargs = dict(batch_size=16, num_devices=num_devices, seed=1, text_buckets=(32, 128))
    packed = PairBatcher(split, pack_texts=True, **kwargs)
    padded = PairBatcher(split, **kwargs)
    seen = []
    for rows in packed.epoch_batches(0):
        batch, reference = packed.make_batch(rows), padded.make_batch(rows)
        _check_packed(batch, packed)
        assert set(batch) == PACKED_KEYS | {"text_ids", "graphs", "pair_mask", "rows"}
        # The same pairs, graphs and masks as the padded batch; the texts' row length is the
        # padded batch's bucket.
        assert batch["text_ids"].shape[2] == reference["text_ids"].shape[2]
        np.testing.assert_array_equal(batch["rows"], reference["rows"])
        np.testing.assert_array_equal(batch["pair_mask"], reference["pair_mask"])
        graphs = zip(
            jax.tree.leaves(batch["graphs"]), jax.tree.leaves(reference["graphs"]), strict=True
        )
        for a, b in graphs:
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(batch["text_length"], reference["text_mask"].sum(-1))
        seen += batch["rows"][batch["pair_mask"]].tolist()
    assert sorted(seen) == sorted(split.rows.tolist())
    # Packing rows of 128 with texts of <= 64 tokens: at least two texts per row.
    fractions = batching.padding_fractions(packed)
    assert fractions["text_padding"] < batching.padding_fractions(padded)["text_padding"]


def test_packed_chunks_of_several_processes_agree(split):
    """Each process packs only its chunks, into the R of the whole global batch."""
    kwargs = dict(batch_size=16, num_devices=4, seed=2, text_buckets=(128,), pack_texts=True)
    whole = PairBatcher(split, **kwargs)
    parts = [PairBatcher(split, local_chunks=s, **kwargs) for s in (slice(0, 3), slice(3, 4))]
    own_rows_differ = False
    for rows in whole.epoch_batches(0):
        batch = whole.make_batch(rows)
        pieces = [part.make_batch(rows) for part in parts]
        # The case that matters: a process whose own chunks would need fewer rows.
        for piece in pieces:
            rows_used = (piece["text_segments"] > 0).any(-1).sum(-1)  # [D_local] own FFD rows
            assert piece["text_ids"].shape[1] == batch["text_ids"].shape[1]  # R
            own_rows_differ |= bool(rows_used.max() < piece["text_ids"].shape[1])
        for key in PACKED_KEYS | {"text_ids", "rows", "pair_mask"}:
            np.testing.assert_array_equal(
                np.concatenate([p[key] for p in pieces]), batch[key], err_msg=key
            )
    assert own_rows_differ


def test_padded_batches_are_unchanged_by_the_option(split):
    """pack_texts=False builds exactly the arrays of a batcher that never heard of it."""
    batcher = PairBatcher(split, batch_size=16, num_devices=2, seed=4, pack_texts=False)
    plain = PairBatcher(split, batch_size=16, num_devices=2, seed=4)
    for rows in batcher.epoch_batches(0):
        a, b = batcher.make_batch(rows), plain.make_batch(rows)
        assert set(a) == {"text_ids", "text_mask", "graphs", "pair_mask", "rows"}
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def test_config_key_is_validated():
    config = tiny.get_config()
    validate_config(config)
    config.data.pack_texts = True
    validate_config(config)
    with config.unlocked():
        del config.data["pack_texts"]  # what a hand-edited config.json could hold
        with pytest.raises(ConfigError, match=r"'data\.pack_texts' is missing"):
            validate_config(config)
        config.data.pack_texts = "yes"
    with pytest.raises(ConfigError, match=r"config\.data\.pack_texts must be True or False"):
        validate_config(config)


def test_pack_texts_may_change_on_resume():
    """Packing changes the texts' layout only: a workdir resumes with it switched either way
    (and a config saved before the key existed resumes under today's default)."""
    from jaxmol import checkpointing, train_lib

    config = tiny.get_config()
    saved = train_lib._json_ready(config)
    config.data.pack_texts = not config.data.pack_texts
    train_lib._check_resume_compatible(saved, train_lib._json_ready(config))
    del saved["data"]["pack_texts"]
    train_lib._check_resume_compatible(saved, train_lib._json_ready(config))
    # A run saved before the key existed trained on padded texts, whatever today's default.
    from jaxmol import builders

    assert builders.run_config_from_saved(saved).data.pack_texts is False
    saved["data"]["pack_texts"] = True
    assert builders.run_config_from_saved(saved).data.pack_texts is True
    config.data.group_by_length = not config.data.group_by_length  # changes the batches
    with pytest.raises(checkpointing.CheckpointError, match="group_by_length"):
        train_lib._check_resume_compatible(saved, train_lib._json_ready(config))


# ----------------------------------------------------------------------------------------------
# BERT and the model in eval mode, real MiniLM weights.


@pytest.fixture(scope="module")
def minilm():
    module, params = bert.load_pretrained(bert.default_model_dir())
    return module, params


def _one_packed_chunk(split, rows, row_length):
    """A packed chunk of `rows` (one device) and the same texts padded to `row_length`."""
    chunk_rows = np.asarray(rows, np.int64)[None]  # [1, b]
    need = batching.pack_lengths(
        np.where(chunk_rows[0] >= 0, split.tokens.lengths[np.maximum(chunk_rows[0], 0)], 0),
        row_length,
    )[2]
    packed = batching.pack_texts(split.tokens, chunk_rows, row_length, need + 1)  # + an empty row
    ids, mask = batching.pad_texts(split.tokens, chunk_rows[0], row_length)
    packed = {k: v[0] for k, v in packed.items()}
    return packed, ids, mask


def test_bert_hidden_states_of_packed_texts_equal_unpacked(split, minilm):
    module, params = minilm
    rows = split.rows[[0, 3, 5, 8, 13, 21, 34, 40]]
    packed, ids, mask = _one_packed_chunk(split, rows, 128)
    assert packed["text_ids"].shape[0] < len(rows)  # several texts share rows
    apply = jax.jit(module.apply)
    unpacked = np.asarray(apply({"params": params}, ids, mask))  # [b, 128, H]
    states = np.asarray(
        apply(
            {"params": params},
            packed["text_ids"],
            packed["text_segments"] > 0,
            position_ids=packed["text_positions"],
            segment_ids=packed["text_segments"],
        )
    )  # [R, 128, H]
    assert np.isfinite(states).all()  # the empty last row included
    for i in range(len(rows)):
        row, start, n = (packed[k][i] for k in ("text_row", "text_start", "text_length"))
        np.testing.assert_allclose(states[row, start : start + n], unpacked[i, :n], atol=1e-5)


def test_packed_text_embeddings_equal_unpacked(split, minilm):
    """Eval mode, MiniLM weights: each text's z and pooled e_t, packed or padded, within 1e-5;
    padded pairs are zeros and invalid either way."""
    _, pretrained = minilm
    config = ModelConfig(bert=MINILM_BERT_CONFIG, gin_layers=1, gin_dim=16, num_memory=5)
    model = RetrievalModel(config)
    rows = np.r_[split.rows[[1, 2, 7, 11, 19, 30, 44]], -1]  # the last slot: a padded pair
    packed, ids, mask = _one_packed_chunk(split, rows, 128)
    variables = jax.jit(
        lambda key: model.init(key, ids[:1], mask[:1], train=False, method="embed_text")
    )(jax.random.key(0))
    variables = {**variables, "params": {**variables["params"], "txt": pretrained}}

    def embed_text(v, chunk):
        text_ids, text_mask, packing = text_inputs(chunk)
        return model.apply(v, text_ids, text_mask, train=False, packed=packing, method="embed_text")

    embed = jax.jit(embed_text)
    z_ref, pooled_ref, valid_ref = embed(variables, {"text_ids": ids, "text_mask": mask})
    z, pooled, valid = embed(variables, packed)
    np.testing.assert_array_equal(valid, valid_ref)
    assert valid[:-1].all() and not valid[-1]
    np.testing.assert_allclose(z, z_ref, atol=1e-5)
    np.testing.assert_allclose(pooled, pooled_ref, atol=1e-5)
    assert not np.asarray(z[-1]).any()


# ----------------------------------------------------------------------------------------------
# The train step.


def _one_step(config, split, mode, num_devices, pack):
    """One train step (plain SGD) on a global batch of 16: 13 pairs + 3 padded ones."""
    runner = DataParallel(mode, select_devices(num_devices))
    batcher = PairBatcher(
        split,
        batch_size=16,
        num_devices=num_devices,
        shuffle=False,
        text_buckets=(128,),  # texts of <= 64 tokens: two or more per packed row
        pack_texts=pack,
    )
    batch = batcher.make_batch(split.rows[:13])
    model = RetrievalModel(builders.model_config_for(config))
    state, _, critic_tx = train_step.init_state(
        config, model, jax.tree.map(lambda x: x[0], batch), total_steps=10
    )
    tx = optax.sgd(0.05)
    state = state.replace(opt_state=tx.init(state.params))
    step = train_step.compile_train_step(
        runner, config, model, tx, critic_tx, return_grads=True, donate_state=False
    )
    _, metrics = step(runner.replicate(state), runner.shard(batch))
    return batch, jax.device_get(runner.unreplicate(metrics))


def _assert_trees_close(a, b, atol):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    worst = 0.0
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))
        worst = max(worst, float(np.abs(np.asarray(x) - np.asarray(y)).max()))
    print(f"largest gradient difference {worst:.2e}")


def test_train_step_packed_equals_padded(split):
    config = tiny.get_config()  # text dropout 0
    assert config.model.text_dropout == 0.0
    padded_batch, reference = _one_step(config, split, "shard_map", 1, pack=False)
    packed_batch, packed = _one_step(config, split, "shard_map", 1, pack=True)
    assert packed_batch["text_ids"].shape[1] < padded_batch["text_ids"].shape[1]
    np.testing.assert_allclose(packed["loss"], reference["loss"], atol=1e-6, rtol=0)
    # Exact in real arithmetic; in float32 the token sums run in another order (e.g. the
    # token-type embedding's gradient sums ~700 tokens: entries ~0.25 differ by ~1e-5).
    _assert_trees_close(packed["grads"], reference["grads"], atol=2e-5)


def test_packed_step_shard_map_equals_pmap_on_eight_devices(split):
    assert jax.device_count() == 8
    config = tiny.get_config()
    config.model.text_dropout = 0.1  # the same per-device dropout draws in both runners
    batch, sharded = _one_step(config, split, "shard_map", 8, pack=True)
    # Two texts of <= 64 tokens per chunk: one packed row of 128 each; the last chunk holds
    # only padded pairs (an all-padding row).
    assert batch["text_ids"].shape == (8, 1, 128) and not batch["pair_mask"][-1].any()
    _, mapped = _one_step(config, split, "pmap", 8, pack=True)
    np.testing.assert_allclose(mapped["loss"], sharded["loss"], atol=1e-6, rtol=0)
    _assert_trees_close(mapped["grads"], sharded["grads"], atol=5e-6)
    assert np.isfinite(sharded["loss"])
