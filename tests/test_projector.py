"""Memory-bank projector: shared cross-attention (dense and segment forms), pooling, masking."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmol.models.layers import masked_token_mean
from jaxmol.models.projector import Projector, SharedCrossAttention

D, HEADS, K, H_TXT = 16, 4, 5, 12


def _numpy_attention(params, memory, keys, key_mask, num_heads):
    """PyTorch nn.MultiheadAttention(batch_first) forward with key_padding_mask = ~key_mask."""
    d = memory.shape[-1]
    hd = d // num_heads

    def dense(name, x):
        return x @ np.asarray(params[name]["kernel"]) + np.asarray(params[name]["bias"])

    q = dense("query", memory).reshape(-1, num_heads, hd)  # [K, h, hd]
    outputs = []
    for b in range(keys.shape[0]):
        k = dense("key", keys[b]).reshape(-1, num_heads, hd)  # [L, h, hd]
        v = dense("value", keys[b]).reshape(-1, num_heads, hd)
        logits = np.einsum("khd,lhd->hkl", q, k) / np.sqrt(hd)
        logits = np.where(key_mask[b][None, None, :], logits, -np.inf)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        mixed = np.einsum("hkl,lhd->khd", weights, v).reshape(-1, d)
        outputs.append(dense("out", mixed))
    return np.stack(outputs)  # [b, K, d]


@pytest.fixture(scope="module")
def attention():
    module = SharedCrossAttention(D, HEADS)
    memory = np.random.default_rng(0).normal(size=(K, D)).astype(np.float32)
    keys = np.zeros((1, 3, D), np.float32)
    variables = module.init(
        jax.random.key(0), memory, keys, np.ones((1, 3), bool), method="attend_dense"
    )
    # Non-zero biases, so that the test also checks where they enter.
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), variables["params"]
    )
    return module, {"params": params}, memory


def test_dense_attention_matches_pytorch_semantics(attention):
    module, variables, memory = attention
    rng = np.random.default_rng(2)
    keys = rng.normal(size=(3, 7, D)).astype(np.float32)
    key_mask = np.arange(7)[None, :] < np.array([[7], [3], [1]])
    got = module.apply(variables, memory, keys, key_mask, method="attend_dense")
    expected = _numpy_attention(variables["params"], memory, keys, key_mask, HEADS)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_segment_attention_equals_dense_attention_per_graph(attention):
    module, variables, memory = attention
    rng = np.random.default_rng(3)
    sizes = [4, 0, 1, 6]  # graph 1 is empty; the trailing padding graph has 3 nodes
    num_real = sum(sizes)
    nodes = rng.normal(size=(num_real + 3, D)).astype(np.float32)
    nodes[num_real:] = 1e4  # padding nodes with absurd values
    graph_index = np.repeat(np.arange(len(sizes) + 1), [*sizes, 3])
    node_mask = np.arange(num_real + 3) < num_real
    got = module.apply(
        variables,
        memory,
        nodes,
        node_mask,
        graph_index,
        len(sizes) + 1,
        method="attend_segments",
    )
    assert got.shape == (len(sizes) + 1, K, D)
    start = 0
    for g, size in enumerate(sizes):
        if size == 0:  # no keys: the attention output is the output bias alone
            np.testing.assert_allclose(
                got[g], np.broadcast_to(variables["params"]["out"]["bias"], (K, D)), atol=1e-6
            )
            continue
        expected = _numpy_attention(
            variables["params"],
            memory,
            nodes[None, start : start + size],
            np.ones((1, size), bool),
            HEADS,
        )[0]
        np.testing.assert_allclose(got[g], expected, atol=1e-5)
        start += size
    assert np.all(np.isfinite(got))


def test_attention_init_follows_pytorch_mha():
    d = 300
    module = SharedCrossAttention(d, 4)
    variables = module.init(
        jax.random.key(0),
        np.zeros((28, d), np.float32),
        np.zeros((1, 2, d), np.float32),
        np.ones((1, 2), bool),
        method="attend_dense",
    )
    params = variables["params"]
    in_bound = np.sqrt(6.0 / (4 * d))
    for name in ("query", "key", "value"):
        kernel = np.abs(np.asarray(params[name]["kernel"]))
        assert 0.95 * in_bound < kernel.max() <= in_bound
        np.testing.assert_array_equal(params[name]["bias"], 0.0)
    out = np.abs(np.asarray(params["out"]["kernel"]))
    assert 0.95 / np.sqrt(d) < out.max() <= 1.0 / np.sqrt(d)
    np.testing.assert_array_equal(params["out"]["bias"], 0.0)


def _projector_inputs(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(3, 6, H_TXT)).astype(np.float32)
    text_mask = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    sizes = [3, 0, 5]  # graph 1 empty; the padding graph has 4 nodes
    nodes = rng.normal(size=(12, D)).astype(np.float32)
    graph_index = np.repeat(np.arange(4), [*sizes, 4]).astype(np.int32)
    node_mask = np.arange(12) < sum(sizes)
    return tokens, text_mask, nodes, node_mask, graph_index


@functools.cache
def _projector(mode):
    module = Projector(features=D, num_memory=K, num_heads=HEADS, mode=mode)
    tokens, text_mask, nodes, node_mask, graph_index = _projector_inputs()
    variables = module.init(jax.random.key(0), tokens, text_mask, nodes, node_mask, graph_index, 4)
    apply = jax.jit(module.apply, static_argnums=6)
    return module, variables, apply


def test_memory_slot_zero_is_zero_with_zero_gradient():
    module, variables, apply = _projector("memory")
    memory = np.asarray(variables["params"]["memory"])
    assert memory.shape == (K, D)
    np.testing.assert_array_equal(memory[0], 0.0)
    assert 0.5 < memory[1:].std() < 1.5
    inputs = _projector_inputs()

    def loss(params):
        (z_t, _), (z_m, _) = module.apply({"params": params}, *inputs, 4)
        return jnp.sum(z_t**2) + jnp.sum(jnp.sin(z_m))

    grads = jax.jit(jax.grad(loss))(variables["params"])
    np.testing.assert_array_equal(grads["memory"][0], 0.0)
    assert np.abs(np.asarray(grads["memory"][1:])).sum() > 0
    # Even a non-zero stored row 0 (e.g. an imported table) acts as zero.
    params = dict(variables["params"])
    params["memory"] = params["memory"].at[0].set(5.0)
    out = apply({"params": params}, *inputs, 4)
    jax.tree.map(np.testing.assert_array_equal, out, apply(variables, *inputs, 4))


@pytest.mark.parametrize("mode", ["memory", "pool"])
def test_empty_rows_give_zeros_and_finite_gradients(mode):
    module, variables, apply = _projector(mode)
    inputs = _projector_inputs()
    (z_t, e_t), (z_m, e_m) = apply(variables, *inputs, 4)
    for array in (z_t, e_t, z_m, e_m):
        assert array.shape[-1] == D
        assert np.all(np.isfinite(array))
    np.testing.assert_array_equal(z_t[1], 0.0)  # all-masked text
    np.testing.assert_array_equal(e_t[1], 0.0)
    np.testing.assert_array_equal(z_m[1], 0.0)  # empty graph
    np.testing.assert_array_equal(e_m[1], 0.0)
    assert not np.allclose(z_t[0], 0.0) and not np.allclose(z_m[2], 0.0)

    def loss(params, tokens, nodes):
        (z_t, e_t), (z_m, e_m) = module.apply(
            {"params": params}, tokens, inputs[1], nodes, inputs[3], inputs[4], 4
        )
        return jnp.sum(z_t**2) + jnp.sum(e_t) + jnp.sum(z_m**3) + jnp.sum(e_m**2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(variables["params"], inputs[0], inputs[2])
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(leaf))
    # Nothing flows into masked tokens or padding nodes.
    np.testing.assert_array_equal(grads[1][1], 0.0)
    np.testing.assert_array_equal(grads[1][0, 4:], 0.0)
    np.testing.assert_array_equal(grads[2][8:], 0.0)


@pytest.mark.parametrize("mode", ["memory", "pool"])
def test_padded_values_change_nothing(mode):
    _, variables, apply = _projector(mode)
    tokens, text_mask, nodes, node_mask, graph_index = _projector_inputs()
    reference = apply(variables, tokens, text_mask, nodes, node_mask, graph_index, 4)
    tokens2 = np.where(text_mask[..., None] == 0, 1e6, tokens).astype(np.float32)
    nodes2 = np.where(node_mask[:, None], nodes, -3e5).astype(np.float32)
    changed = apply(variables, tokens2, text_mask, nodes2, node_mask, graph_index, 4)
    jax.tree.map(np.testing.assert_array_equal, changed, reference)


def test_pool_mode_is_masked_mean_of_projections():
    module, variables, apply = _projector("pool")
    assert "memory" not in variables["params"]
    tokens, text_mask, nodes, node_mask, graph_index = _projector_inputs()
    (z_t, e_t), (z_m, e_m) = apply(variables, tokens, text_mask, nodes, node_mask, graph_index, 4)
    np.testing.assert_array_equal(z_t, e_t)
    np.testing.assert_array_equal(z_m, e_m)
    projected = module.apply(variables, tokens, method="project_text")
    np.testing.assert_allclose(e_t, masked_token_mean(projected, text_mask.astype(bool)), atol=1e-6)
    nodes_projected = np.asarray(module.apply(variables, nodes, method="project_molecule"))
    np.testing.assert_allclose(e_m[0], nodes_projected[:3].mean(0), atol=1e-5)
    np.testing.assert_allclose(e_m[2], nodes_projected[3:8].mean(0), atol=1e-5)


def test_node_projection_can_be_skipped():
    module = Projector(features=D, num_memory=K, num_heads=HEADS, project_nodes=False)
    inputs = _projector_inputs()
    variables = module.init(jax.random.key(0), *inputs, 4)
    assert not any(name.startswith("node_") for name in variables["params"])
    _, (_, e_m) = module.apply(variables, *inputs, 4)
    np.testing.assert_allclose(e_m[0], inputs[2][:3].mean(0), atol=1e-6)
