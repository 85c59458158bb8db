"""Tests of jaxmol.losses: hand-computed values, gradients, masks, stop-gradients, vmap."""

import doctest
import functools
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmol import losses

# ---------------------------------------------------------------------------------------------
# Helpers: plain-Python references (loops over the formulas of cmtmr_spec.md §3) and inputs.
# ---------------------------------------------------------------------------------------------


def _dist(x, y):
    return math.sqrt(max(sum((a - b) ** 2 for a, b in zip(x, y, strict=True)), 1e-12))


def _softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def _triplet_by_hand(texts, mols, margin):
    points = list(texts) + list(mols)
    batch = len(texts)
    losses_ = []
    for a, anchor in enumerate(points):
        partner = (a + batch) % (2 * batch)
        negatives = [_dist(anchor, points[n]) for n in range(2 * batch) if n % batch != a % batch]
        losses_.append(max(0.0, _dist(anchor, points[partner]) - min(negatives) + margin))
    return losses_


def _second_order_by_hand(texts, mols, temperature=1.0, sign=1.0):
    def rows(xs, ys):
        return [_softmax([sign * _dist(x, y) / temperature for y in ys]) for x in xs]

    p_tt, p_mm = rows(texts, texts), rows(mols, mols)
    p_tm, p_mt = rows(texts, mols), rows(mols, texts)
    return {
        "u2u_mm_tt": [_kl(p, q) for p, q in zip(p_mm, p_tt, strict=True)],
        "u2u_tt_mm": [_kl(p, q) for p, q in zip(p_tt, p_mm, strict=True)],
        "u2c_mm_tm": [_kl(p, q) for p, q in zip(p_mm, p_tm, strict=True)],
        "u2c_tt_mt": [_kl(p, q) for p, q in zip(p_tt, p_mt, strict=True)],
    }


TEXTS3 = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
MOLS3 = [[0.2, 0.1], [1.1, -0.3], [0.5, 1.5]]


def _random_pairs(seed, batch=6, dim=8, unit=True):
    rng = np.random.default_rng(seed)
    z_txt = rng.standard_normal((batch, dim)).astype(np.float32)
    z_mol = (0.5 * z_txt + rng.standard_normal((batch, dim))).astype(np.float32)
    if unit:
        z_txt /= np.linalg.norm(z_txt, axis=1, keepdims=True)
        z_mol /= np.linalg.norm(z_mol, axis=1, keepdims=True)
    return jnp.asarray(z_txt), jnp.asarray(z_mol)


def _with_garbage(z, where, fill):
    """Puts `fill` (e.g. NaN) in the masked rows, which must never matter."""
    return jnp.where(jnp.asarray(where)[:, None], z, fill)


# ---------------------------------------------------------------------------------------------
# Module hygiene.
# ---------------------------------------------------------------------------------------------


def test_import_pulls_no_flax_nor_optax():
    code = (
        "import sys, jaxmol.losses; "
        "top = {m.split('.')[0] for m in sys.modules}; "
        "print(sorted(top & {'flax', 'optax', 'ml_collections'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_docstring_examples_run():
    result = doctest.testmod(losses, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 10
    assert result.failed == 0


# ---------------------------------------------------------------------------------------------
# Hand-computed values under jit.
# ---------------------------------------------------------------------------------------------


def test_pairwise_euclidean_hand_values_and_clamp():
    a = jnp.array([[0.0, 0.0], [1.0, 1.0]])
    b = jnp.array([[3.0, 4.0], [0.0, 0.0], [1.0, 1.0]])
    dist = jax.jit(losses.pairwise_euclidean)(a, b)
    expected = [[5.0, 1e-6, math.sqrt(2)], [math.sqrt(13), math.sqrt(2), 1e-6]]
    np.testing.assert_allclose(dist, expected, rtol=1e-6, atol=1e-7)
    # the clamp is active at zero distance: zero gradient there, not NaN
    grad = jax.grad(lambda x: losses.pairwise_euclidean(x, b[1:2])[0, 0])(a[:1])
    np.testing.assert_array_equal(grad, np.zeros((1, 2)))


def test_batch_hard_triplet_two_pairs_literal():
    z_txt = jnp.array([[0.0, 0.0], [3.0, 0.0]])
    z_mol = jnp.array([[0.0, 1.0], [3.0, 2.0]])
    loss = jax.jit(functools.partial(losses.batch_hard_triplet, margin=0.3))(z_txt, z_mol)
    # margin 0.3: every anchor has its partner closer than its hardest negative by > 0.3
    # t0: partner 1, negatives t1 = 3, m1 = sqrt(13)        -> max(0, 1 - 3 + 0.3) = 0
    # t1: partner 2, negatives t0 = 3, m0 = sqrt(10)        -> max(0, 2 - 3 + 0.3) = 0
    # m0: partner 1, negatives t1 = m1 = sqrt(10)           -> 0
    # m1: partner 2, negatives t0 = sqrt(13), m0 = sqrt(10) -> max(0, 2 - sqrt(10) + 0.3) = 0
    np.testing.assert_allclose(loss, [0.0, 0.0, 0.0, 0.0])
    loss = losses.batch_hard_triplet(z_txt, z_mol, margin=1.5)
    np.testing.assert_allclose(loss, [0.0, 0.5, 0.0, 3.5 - math.sqrt(10)], rtol=1e-6)


def test_batch_hard_triplet_three_pairs_matches_hand_loops():
    loss = jax.jit(functools.partial(losses.batch_hard_triplet, margin=0.8))(
        jnp.array(TEXTS3), jnp.array(MOLS3)
    )
    expected = _triplet_by_hand(TEXTS3, MOLS3, 0.8)
    assert any(v > 0 for v in expected) and any(v == 0 for v in expected)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)


def test_second_order_kl_two_pairs_literal():
    # TT off-diagonal sqrt(2), MM off-diagonal sqrt(5), diagonals 1e-6.
    z_txt = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    z_mol = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    out = jax.jit(losses.second_order_kl)(z_txt, z_mol)
    p_tt = 1.0 / (1.0 + math.exp(math.sqrt(2) - 1e-6))  # mass on the diagonal
    p_mm = 1.0 / (1.0 + math.exp(math.sqrt(5) - 1e-6))

    def kl2(p, q):
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))

    np.testing.assert_allclose(out["u2u_mm_tt"], [kl2(p_mm, p_tt)] * 2, rtol=1e-5)
    np.testing.assert_allclose(out["u2u_tt_mm"], [kl2(p_tt, p_mm)] * 2, rtol=1e-5)
    np.testing.assert_allclose(out["u2u"], [kl2(p_mm, p_tt) + kl2(p_tt, p_mm)] * 2, rtol=1e-5)
    # row 0 of TM = [1e-6, sqrt(5)] equals row 0 of MM: no u2c there
    np.testing.assert_allclose(out["u2c_mm_tm"][0], 0.0, atol=1e-7)
    # row 1: MM = [sqrt(5), 1e-6], TM = [d(t1, m0), d(t1, m1)] = [sqrt(2), 1],
    #        TT = [sqrt(2), 1e-6], MT = [d(m1, t0), d(m1, t1)] = [sqrt(5), 1]
    p_mm1, p_tt1 = _softmax([math.sqrt(5), 1e-6]), _softmax([math.sqrt(2), 1e-6])
    p_tm1, p_mt1 = _softmax([math.sqrt(2), 1.0]), _softmax([math.sqrt(5), 1.0])
    np.testing.assert_allclose(out["u2c_mm_tm"][1], _kl(p_mm1, p_tm1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["u2c_tt_mt"][1], _kl(p_tt1, p_mt1), rtol=1e-5, atol=1e-6)
    assert _kl(p_mm1, p_tm1) > 0.1


@pytest.mark.parametrize(("similarity", "sign"), [("distance", 1.0), ("neg_distance", -1.0)])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_second_order_kl_three_pairs_matches_hand_loops(similarity, sign, temperature):
    fn = functools.partial(losses.second_order_kl, temperature=temperature, similarity=similarity)
    out = jax.jit(fn)(jnp.array(TEXTS3), jnp.array(MOLS3))
    expected = _second_order_by_hand(TEXTS3, MOLS3, temperature, sign)
    for name, values in expected.items():
        np.testing.assert_allclose(out[name], values, rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(out["u2u"], out["u2u_mm_tt"] + out["u2u_tt_mm"])
    np.testing.assert_allclose(out["u2c"], out["u2c_mm_tm"] + out["u2c_tt_mt"])


def test_second_order_kl_cosine_metric_uses_half_cos_plus_one():
    texts = [[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]]
    mols = [[0.5, 0.5], [2.0, 0.1], [-1.0, -1.0]]

    def cos_dist(x, y):
        dot = sum(a * b for a, b in zip(x, y, strict=True))
        return 0.5 * (dot / (math.hypot(*x) * math.hypot(*y)) + 1.0)

    def rows(xs, ys):
        return [_softmax([cos_dist(x, y) for y in ys]) for x in xs]

    p_tt, p_mm, p_tm = rows(texts, texts), rows(mols, mols), rows(texts, mols)
    out = jax.jit(functools.partial(losses.second_order_kl, metric="cosine"))(
        jnp.array(texts), jnp.array(mols)
    )
    np.testing.assert_allclose(
        out["u2u_mm_tt"], [_kl(p, q) for p, q in zip(p_mm, p_tt, strict=True)], rtol=1e-4, atol=1e-7
    )
    np.testing.assert_allclose(
        out["u2c_mm_tm"], [_kl(p, q) for p, q in zip(p_mm, p_tm, strict=True)], rtol=1e-4, atol=1e-7
    )


def test_info_nce_two_pairs_literal():
    z_txt = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    z_mol = jnp.array([[0.6, 0.8], [0.0, 1.0]])
    t2m, m2t = jax.jit(functools.partial(losses.info_nce, temperature=0.5))(z_txt, z_mol)
    # logits / 0.5: [[1.2, 0.0], [1.6, 2.0]]
    np.testing.assert_allclose(
        t2m, [-math.log(_softmax([1.2, 0.0])[0]), -math.log(_softmax([1.6, 2.0])[1])], rtol=1e-5
    )
    np.testing.assert_allclose(
        m2t, [-math.log(_softmax([1.2, 1.6])[0]), -math.log(_softmax([0.0, 2.0])[1])], rtol=1e-5
    )


def test_info_nce_swapping_towers_swaps_directions():
    z_txt, z_mol = _random_pairs(3)
    t2m, m2t = losses.info_nce(z_txt, z_mol, temperature=0.1)
    t2m_swapped, m2t_swapped = losses.info_nce(z_mol, z_txt, temperature=0.1)
    np.testing.assert_allclose(t2m, m2t_swapped, rtol=1e-6)
    np.testing.assert_allclose(m2t, t2m_swapped, rtol=1e-6)


def test_modality_adversarial_loss_hand_values_and_stability():
    loss = jax.jit(losses.modality_adversarial_loss)(
        jnp.array([0.0, 2.0, 1e4]), jnp.array([[0.0], [2.0], [-1e4]])
    )
    expected = [math.log(2), math.log1p(math.exp(-2)), 0.0]  # text label 1
    expected += [math.log(2), math.log1p(math.exp(2)), 0.0]  # molecule label 0
    np.testing.assert_allclose(loss, expected, rtol=1e-6, atol=1e-7)


def test_wgan_gp_critic_loss_linear_critic_by_hand():
    weight = jnp.array([3.0, 4.0])  # |grad D| = 5 for every input

    def critic(x):
        return (x @ weight + 1.0)[:, None]  # [N, 1]

    real = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    fake = jnp.array([[0.0, 0.0], [2.0, 2.0]])
    loss, aux = jax.jit(lambda r, f: losses.wgan_gp_critic_loss(critic, r, f, jax.random.key(1)))(
        real, fake
    )
    np.testing.assert_allclose(aux["critic_real"], [4.0, 5.0])
    np.testing.assert_allclose(aux["critic_fake"], [1.0, 15.0])
    np.testing.assert_allclose(aux["gradient_penalty"], [16.0, 16.0])
    np.testing.assert_allclose(loss, [-4.0 + 1.0 + 160.0, -5.0 + 15.0 + 160.0])


def test_wgan_gp_penalty_uses_per_sample_interpolates():
    # D(x) = 0.5 |x|^2 has grad x: the penalty reveals the interpolate x = a r + (1 - a) f.
    real = jnp.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    fake = jnp.zeros_like(real)
    key = jax.random.key(7)
    _, aux = losses.wgan_gp_critic_loss(
        lambda x: 0.5 * jnp.sum(x * x, axis=1), real, fake, key, gp_weight=1.0
    )
    alpha = jax.random.uniform(key, (3, 1))[:, 0]
    norms = alpha * jnp.linalg.norm(real, axis=1)
    np.testing.assert_allclose(aux["gradient_penalty"], (norms - 1.0) ** 2, rtol=1e-5)
    assert len(set(np.asarray(alpha).tolist())) == 3  # one coefficient per sample


def test_wgan_gp_critic_loss_treats_features_as_constants():
    def loss_fn(params, real, fake):
        per_example, _ = losses.wgan_gp_critic_loss(
            lambda x: jnp.tanh(x @ params), real, fake, jax.random.key(0)
        )
        return jnp.mean(per_example)

    params = jnp.array([0.5, -1.0, 2.0])
    real, fake = jnp.ones((4, 3)), jnp.full((4, 3), -0.5)
    g_params, g_real, g_fake = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2)))(params, real, fake)
    assert np.all(np.isfinite(g_params)) and np.any(g_params != 0)
    np.testing.assert_array_equal(g_real, 0.0)
    np.testing.assert_array_equal(g_fake, 0.0)


def test_wgan_generator_loss():
    out = jax.jit(losses.wgan_generator_loss)(jnp.array([[2.0], [-1.0], [0.5]]))
    np.testing.assert_allclose(out, [-2.0, 1.0, -0.5])
    out = losses.wgan_generator_loss(jnp.array([2.0, jnp.nan]), where=jnp.array([True, False]))
    np.testing.assert_array_equal(out, [-2.0, 0.0])


def test_masked_mean():
    values = jnp.array([1.0, 2.0, jnp.nan, 4.0])
    where = jnp.array([True, True, False, False])
    assert float(losses.masked_mean(values, where)) == 1.5
    assert float(losses.masked_mean(values, jnp.zeros(4, bool))) == 0.0
    assert float(losses.masked_mean(jnp.array([1.0, 3.0]))) == 2.0
    grad = jax.grad(losses.masked_mean)(values, where)
    np.testing.assert_array_equal(grad, [0.5, 0.5, 0.0, 0.0])


# ---------------------------------------------------------------------------------------------
# Gradients.
# ---------------------------------------------------------------------------------------------


def _check_grads_of(fn, *args):
    check_grads(fn, args, order=1, modes=("rev",), atol=5e-3, rtol=5e-3, eps=1e-3)


def test_check_grads_triplet():
    z_txt, z_mol = _random_pairs(0, batch=4, dim=3, unit=False)
    loss = jax.jit(lambda a, b: jnp.mean(losses.batch_hard_triplet(a, b, margin=2.0)))
    assert float(loss(z_txt, z_mol)) > 0
    _check_grads_of(loss, z_txt, z_mol)


@pytest.mark.parametrize(
    ("metric", "similarity"), [("euclidean", "distance"), ("cosine", "neg_distance")]
)
def test_check_grads_second_order(metric, similarity):
    z_txt, z_mol = _random_pairs(1, batch=4, dim=3, unit=False)
    kl = functools.partial(
        losses.second_order_kl, temperature=0.5, metric=metric, similarity=similarity
    )
    _check_grads_of(jax.jit(lambda a, b: jnp.mean(kl(a, b)["u2u"])), z_txt, z_mol)
    # u2c has stop-gradient targets: differentiate each term only w.r.t. the embeddings that
    # do not build its target (P_MM depends on z_mol only, P_TT on z_txt only).
    _check_grads_of(jax.jit(lambda a: jnp.mean(kl(a, z_mol)["u2c_mm_tm"])), z_txt)
    _check_grads_of(jax.jit(lambda b: jnp.mean(kl(z_txt, b)["u2c_tt_mt"])), z_mol)


def test_check_grads_info_nce_and_modality_bce():
    z_txt, z_mol = _random_pairs(2, batch=4, dim=3)
    nce = jax.jit(lambda a, b: sum(jnp.mean(v) for v in losses.info_nce(a, b, temperature=0.2)))
    _check_grads_of(nce, z_txt, z_mol)
    bce = jax.jit(lambda a, b: jnp.mean(losses.modality_adversarial_loss(a, b)))
    _check_grads_of(bce, z_txt[:, 0], z_mol[:, 0])


def test_u2u_sends_gradient_into_both_distributions():
    z_txt, z_mol = _random_pairs(4)
    g_mm_tt = jax.jit(jax.grad(lambda b: jnp.sum(losses.second_order_kl(z_txt, b)["u2u_mm_tt"])))(
        z_mol
    )
    g_tt_mm = jax.jit(jax.grad(lambda a: jnp.sum(losses.second_order_kl(a, z_mol)["u2u_tt_mm"])))(
        z_txt
    )
    # the first argument of each KL is its "target": u2u differentiates through it
    assert float(jnp.max(jnp.abs(g_mm_tt))) > 1e-4
    assert float(jnp.max(jnp.abs(g_tt_mm))) > 1e-4


def test_u2c_sends_no_gradient_into_its_targets():
    z_txt, z_mol = _random_pairs(5)

    def row_log_softmax(dist):
        return jax.nn.log_softmax(dist, axis=-1)

    # The same KL written with the targets as numpy constants (no way to differentiate them).
    target_mm = np.asarray(row_log_softmax(losses.pairwise_euclidean(z_mol, z_mol)))
    target_tt = np.asarray(row_log_softmax(losses.pairwise_euclidean(z_txt, z_txt)))

    def constant_target_u2c(a, b):
        log_tm = row_log_softmax(losses.pairwise_euclidean(a, b))
        log_mt = row_log_softmax(losses.pairwise_euclidean(b, a))
        kl_m = jnp.sum(np.exp(target_mm) * (target_mm - log_tm), axis=1)
        kl_t = jnp.sum(np.exp(target_tt) * (target_tt - log_mt), axis=1)
        return jnp.mean(kl_m + kl_t)

    def library_u2c(a, b):
        return jnp.mean(losses.second_order_kl(a, b)["u2c"])

    def no_stop_gradient_u2c(a, b):  # what u2c would give if gradients reached the targets
        log_tm = row_log_softmax(losses.pairwise_euclidean(a, b))
        log_mt = row_log_softmax(losses.pairwise_euclidean(b, a))
        log_mm = row_log_softmax(losses.pairwise_euclidean(b, b))
        log_tt = row_log_softmax(losses.pairwise_euclidean(a, a))
        kl_m = jnp.sum(jnp.exp(log_mm) * (log_mm - log_tm), axis=1)
        kl_t = jnp.sum(jnp.exp(log_tt) * (log_tt - log_mt), axis=1)
        return jnp.mean(kl_m + kl_t)

    got = jax.jit(jax.grad(library_u2c, argnums=(0, 1)))(z_txt, z_mol)
    want = jax.jit(jax.grad(constant_target_u2c, argnums=(0, 1)))(z_txt, z_mol)
    leaky = jax.jit(jax.grad(no_stop_gradient_u2c, argnums=(0, 1)))(z_txt, z_mol)
    for g, w, bad in zip(got, want, leaky, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5)
        assert float(jnp.max(jnp.abs(g - bad))) > 1e-3


def test_gradient_reversal_identity_forward_negated_backward():
    x = jnp.array([1.0, -2.0, 3.0])
    upstream = jnp.array([0.5, 1.0, -4.0])

    @jax.jit
    def vjp(x, scale):
        y, pullback = jax.vjp(lambda v: losses.gradient_reversal(v, scale), x)
        return y, pullback(upstream)[0]

    for scale in (1.0, 0.25):
        y, grad = vjp(x, jnp.float32(scale))  # traced scale
        np.testing.assert_array_equal(y, x)
        np.testing.assert_allclose(grad, -scale * upstream)
    # Python float scale, pytree input, preserved dtype, zero gradient for the scale itself
    tree = {"a": jnp.ones(2, jnp.bfloat16), "b": jnp.ones((1, 2))}
    grads = jax.grad(
        lambda t: jnp.sum(losses.gradient_reversal(t, 2.0)["b"]) + jnp.sum(t["a"] * 0)
    )(tree)
    np.testing.assert_array_equal(grads["b"], -2.0 * np.ones((1, 2)))
    assert losses.gradient_reversal(tree)["a"].dtype == jnp.bfloat16
    scale_grad = jax.grad(lambda s: jnp.sum(losses.gradient_reversal(x, s)))(1.5)
    assert float(scale_grad) == 0.0


# ---------------------------------------------------------------------------------------------
# Masks.
# ---------------------------------------------------------------------------------------------

WHERE6 = np.array([True, False, True, True, False, True])


def _triplet(a, b, where=None):
    return losses.batch_hard_triplet(a, b, margin=0.6, where=where)


def _info_nce(a, b, where=None):
    return jnp.concatenate(losses.info_nce(a, b, temperature=0.1, where=where))


def _kl_stack(a, b, where=None, **kwargs):
    out = losses.second_order_kl(a, b, where=where, **kwargs)
    return jnp.concatenate([out[k] for k in sorted(out)])


MASKED_FNS = {
    "triplet": _triplet,
    "info_nce": _info_nce,
    "kl_euclidean": _kl_stack,
    "kl_cosine_neg": functools.partial(_kl_stack, metric="cosine", similarity="neg_distance"),
    "modality_bce": lambda a, b, where=None: losses.modality_adversarial_loss(
        a[:, 0], b[:, 1], where=where
    ),
    "modality_bce_smoothed": lambda a, b, where=None: losses.modality_adversarial_loss(
        a[:, 0], b[:, 1], where=where, label_smoothing=0.2
    ),
}


@pytest.mark.parametrize("name", sorted(MASKED_FNS))
def test_mask_equals_slicing_for_values_and_gradients(name):
    fn = MASKED_FNS[name]
    z_txt, z_mol = _random_pairs(6)
    where = jnp.asarray(WHERE6)
    valid = np.flatnonzero(WHERE6)
    # outputs are stacked blocks of B rows; compare block by block
    z_txt_garbage = _with_garbage(z_txt, where, 1e4)
    z_mol_garbage = _with_garbage(z_mol, where, jnp.nan)

    masked = jax.jit(lambda a, b: fn(a, b, where))(z_txt_garbage, z_mol_garbage)
    sliced = jax.jit(fn)(z_txt[valid], z_mol[valid])
    batch, n_valid = len(WHERE6), len(valid)
    assert masked.shape[0] % batch == 0 and sliced.shape[0] % n_valid == 0
    masked_blocks = masked.reshape(-1, batch)
    sliced_blocks = sliced.reshape(-1, n_valid)
    np.testing.assert_allclose(masked_blocks[:, valid], sliced_blocks, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(masked_blocks[:, ~WHERE6], 0.0)
    assert float(jnp.max(sliced)) > 0

    weights = jnp.asarray(np.random.default_rng(0).uniform(size=sliced.shape), jnp.float32)
    masked_weights = jnp.zeros(masked_blocks.shape).at[:, valid].set(weights.reshape(-1, n_valid))

    def weighted(f_out, w):
        return jnp.sum(f_out * w.reshape(f_out.shape))

    g_masked = jax.jit(
        jax.grad(lambda a, b: weighted(fn(a, b, where), masked_weights), argnums=(0, 1))
    )(z_txt_garbage, z_mol_garbage)
    g_sliced = jax.jit(jax.grad(lambda a, b: weighted(fn(a, b), weights), argnums=(0, 1)))(
        z_txt[valid], z_mol[valid]
    )
    for gm, gs in zip(g_masked, g_sliced, strict=True):
        np.testing.assert_allclose(gm[valid], gs, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(gm[~WHERE6], 0.0)


def test_masked_mean_of_masked_losses_equals_official_mean_on_slice():
    z_txt, z_mol = _random_pairs(7)
    where = jnp.asarray(WHERE6)
    valid = np.flatnonzero(WHERE6)

    @jax.jit
    def masked_means(a, b):
        kl = losses.second_order_kl(a, b, where=where)
        triplet = losses.batch_hard_triplet(a, b, where=where)
        return (
            losses.masked_mean(triplet, jnp.concatenate([where, where])),
            losses.masked_mean(kl["u2u"], where),
            losses.masked_mean(kl["u2c"], where),
        )

    @jax.jit
    def official_means(a, b):
        kl = losses.second_order_kl(a, b)
        return jnp.mean(losses.batch_hard_triplet(a, b)), jnp.mean(kl["u2u"]), jnp.mean(kl["u2c"])

    got = masked_means(z_txt, z_mol)
    want = official_means(z_txt[valid], z_mol[valid])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(want[0]) > 0 and float(want[1]) > 0


def test_wgan_gp_mask_zeroes_rows_and_keeps_valid_terms():
    rng = np.random.default_rng(8)
    real = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
    fake = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
    where = jnp.array([True, False, True, True, False])
    fake = _with_garbage(fake, where, jnp.nan)
    params = jnp.asarray(rng.standard_normal(3), jnp.float32)

    def loss(p):
        per_example, aux = losses.wgan_gp_critic_loss(
            lambda x: jnp.sin(x @ p), real, fake, jax.random.key(3), where=where
        )
        return losses.masked_mean(per_example, where), (per_example, aux)

    (_, (per_example, aux)), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(per_example[~np.asarray(where)], 0.0)
    np.testing.assert_allclose(aux["critic_real"][np.asarray(where)], np.sin(real @ params)[where])
    assert np.all(np.isfinite(per_example))


def test_second_order_kl_is_zero_for_identical_modalities():
    z, _ = _random_pairs(9)
    where = jnp.asarray(WHERE6)
    for kwargs in (
        {},
        {"metric": "cosine"},
        {"similarity": "neg_distance", "temperature": 0.3},
        {"where": where},
    ):
        out = jax.jit(lambda a, b, kwargs=kwargs: losses.second_order_kl(a, b, **kwargs))(z, z)
        for key, value in out.items():
            np.testing.assert_allclose(value, 0.0, atol=1e-7, err_msg=f"{key} {kwargs}")


def test_finite_gradients_with_all_but_one_pair_masked():
    z_txt, z_mol = _random_pairs(10)
    where = jnp.array([False, False, True, False, False, False])
    z_txt = _with_garbage(z_txt, where, jnp.inf)
    z_mol = _with_garbage(z_mol, where, jnp.nan)
    logits_txt = _with_garbage(z_txt[:, :1], where, jnp.nan)
    logits_mol = z_mol[:, :1]

    def total(a, b, first_order, metric):
        return losses.cmtmr_loss(
            a,
            b,
            where=where,
            first_order=first_order,
            kl_metric=metric,
            disc_logits_txt=logits_txt,
            disc_logits_mol=logits_mol,
        )

    for first_order, metric in (("triplet", "euclidean"), ("info_nce", "cosine")):
        value_and_grad = jax.value_and_grad(
            functools.partial(total, first_order=first_order, metric=metric),
            argnums=(0, 1),
            has_aux=True,
        )
        (loss, terms), grads = jax.jit(value_and_grad)(z_txt, z_mol)
        assert np.isfinite(float(loss))
        for key in ("first_order", "u2u", "u2c"):
            assert float(terms[key]) == 0.0, (key, first_order, metric)
        for grad in grads:
            assert np.all(np.isfinite(grad))
            np.testing.assert_array_equal(grad[~np.asarray(where)], 0.0)


def test_all_pairs_masked_gives_zero_loss_and_gradient():
    z_txt, z_mol = _random_pairs(11)
    where = jnp.zeros(6, bool)
    loss, grads = jax.jit(
        jax.value_and_grad(
            lambda a, b: losses.cmtmr_loss(a, b, where=where, adversary="none")[0], argnums=(0, 1)
        )
    )(z_txt, z_mol)
    assert float(loss) == 0.0
    for grad in grads:
        np.testing.assert_array_equal(grad, 0.0)


# ---------------------------------------------------------------------------------------------
# vmap and jit.
# ---------------------------------------------------------------------------------------------


def test_vmap_matches_python_loop():
    pairs = [_random_pairs(20 + k) for k in range(3)]
    z_txt = jnp.stack([p[0] for p in pairs])  # [K, B, D]
    z_mol = jnp.stack([p[1] for p in pairs])
    where = jnp.asarray(np.stack([WHERE6, np.ones(6, bool), WHERE6[::-1]]))  # [K, B]

    def all_terms(a, b, w):
        nce_t2m, nce_m2t = losses.info_nce(a, b, temperature=0.2, where=w)
        out = losses.second_order_kl(a, b, where=w)
        return {
            "triplet": losses.batch_hard_triplet(a, b, where=w),
            "nce_t2m": nce_t2m,
            "nce_m2t": nce_m2t,
            "u2u": out["u2u"],
            "u2c": out["u2c"],
            "total": losses.cmtmr_loss(a, b, where=w, adversary="none")[0],
        }

    batched = jax.jit(jax.vmap(all_terms))(z_txt, z_mol, where)
    for k in range(3):
        single = all_terms(z_txt[k], z_mol[k], where[k])
        for key, value in single.items():
            np.testing.assert_allclose(batched[key][k], value, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Fused objective.
# ---------------------------------------------------------------------------------------------


def test_cmtmr_loss_official_defaults_equal_sum_of_terms():
    z_txt, z_mol = _random_pairs(30)
    where = jnp.asarray(WHERE6)
    twice = jnp.concatenate([where, where])
    critic = jnp.linspace(-1.0, 2.0, 6)
    loss, terms = jax.jit(
        lambda a, b: losses.cmtmr_loss(
            a, b, where=where, adversary="wgan_gp", critic_logits_fake=critic
        )
    )(z_txt, z_mol)
    kl = losses.second_order_kl(z_txt, z_mol, where=where)
    triplet = losses.masked_mean(losses.batch_hard_triplet(z_txt, z_mol, where=where), twice)
    generator = losses.masked_mean(-critic, where)
    u2u, u2c = losses.masked_mean(kl["u2u"], where), losses.masked_mean(kl["u2c"], where)
    np.testing.assert_allclose(loss, triplet + 2e-4 * generator + u2u + u2c, rtol=1e-6)
    np.testing.assert_allclose(terms["triplet"], triplet, rtol=1e-6)
    np.testing.assert_allclose(terms["adversarial"], generator, rtol=1e-6)
    np.testing.assert_allclose(terms["total"], loss)
    assert float(terms["num_valid"]) == 4.0
    for key in ("u2u", "u2c", "u2u_mm_tt", "u2u_tt_mm", "u2c_mm_tm", "u2c_tt_mt"):
        assert terms[key].shape == ()


def test_cmtmr_loss_grl_and_info_nce_options():
    z_txt, z_mol = _random_pairs(31)
    logits_txt = jnp.array([2.0, -1.0, 0.5, 3.0, -0.2, 1.0])
    logits_mol = jnp.array([-2.0, -1.0, 0.5, 1.0, -0.2, -3.0])[:, None]
    loss, terms = losses.cmtmr_loss(
        z_txt,
        z_mol,
        first_order="info_nce",
        info_nce_temperature=0.1,
        u2u_weight=0.5,
        u2c_weight=0.25,
        adv_weight=0.1,
        disc_logits_txt=logits_txt,
        disc_logits_mol=logits_mol,
    )
    t2m, m2t = losses.info_nce(z_txt, z_mol, temperature=0.1)
    kl = losses.second_order_kl(z_txt, z_mol)
    bce = jnp.mean(losses.modality_adversarial_loss(logits_txt, logits_mol))
    expected = (
        jnp.mean(t2m) + jnp.mean(m2t) + 0.5 * jnp.mean(kl["u2u"]) + 0.25 * jnp.mean(kl["u2c"])
    )
    np.testing.assert_allclose(loss, expected + 0.1 * bce, rtol=1e-6)
    np.testing.assert_allclose(terms["adversarial"], bce, rtol=1e-6)
    # text logits > 0: 4 of 6 right; molecule logits < 0: 4 of 6 right
    np.testing.assert_allclose(terms["disc_accuracy"], 8 / 12)
    assert "triplet" not in terms and "info_nce_t2m" in terms


def test_cmtmr_loss_default_adv_weight_is_one_for_grl():
    z_txt, z_mol = _random_pairs(32)
    logits = jnp.ones(6)
    with_adv, terms = losses.cmtmr_loss(
        z_txt, z_mol, disc_logits_txt=logits, disc_logits_mol=logits
    )
    without_adv, _ = losses.cmtmr_loss(z_txt, z_mol, adversary="none")
    np.testing.assert_allclose(with_adv - without_adv, terms["adversarial"], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Input checks at trace time.
# ---------------------------------------------------------------------------------------------


def test_input_checks_raise_clear_errors():
    z = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"rank 2"):
        losses.batch_hard_triplet(jnp.ones(4), z)
    with pytest.raises(ValueError, match=r"same number of pairs"):
        losses.second_order_kl(z, jnp.ones((5, 3)))
    with pytest.raises(ValueError, match=r"feature size"):
        losses.info_nce(z, jnp.ones((4, 2)), temperature=1.0)
    with pytest.raises(TypeError, match=r"floating dtype"):
        losses.batch_hard_triplet(jnp.ones((4, 3), jnp.int32), z)
    with pytest.raises(TypeError, match=r"boolean"):
        losses.second_order_kl(z, z, where=jnp.ones(4))
    with pytest.raises(ValueError, match=r"where must have shape"):
        losses.second_order_kl(z, z, where=jnp.ones(5, bool))
    with pytest.raises(ValueError, match=r"similarity"):
        losses.second_order_kl(z, z, similarity="cosine")
    with pytest.raises(ValueError, match=r"metric"):
        losses.second_order_kl(z, z, metric="manhattan")
    with pytest.raises(ValueError, match=r"temperature must be positive"):
        losses.info_nce(z, z, temperature=0.0)
    with pytest.raises(ValueError, match=r"\[B\] or \[B, 1\]"):
        losses.modality_adversarial_loss(jnp.ones((4, 2)), jnp.ones(4))
    with pytest.raises(ValueError, match=r"disc_logits_txt"):
        losses.cmtmr_loss(z, z)
    with pytest.raises(ValueError, match=r"critic_logits_fake"):
        losses.cmtmr_loss(z, z, adversary="wgan_gp")
    with pytest.raises(ValueError, match=r"first_order"):
        losses.cmtmr_loss(z, z, first_order="contrastive", adversary="none")
    # the checks fire while tracing, i.e. under jit too
    with pytest.raises(ValueError, match=r"same number of pairs"):
        jax.jit(losses.batch_hard_triplet)(z, jnp.ones((3, 3)))


# ---------------------------------------------------------------------------------------------
# Adversary options: the DANN reversal schedule and discriminator label smoothing.
# ---------------------------------------------------------------------------------------------


def test_dann_grl_scale_values_and_schedule():
    # λ(p) = 2 / (1 + exp(−γ p)) − 1, the formula of Ganin & Lempitsky (2015)
    def by_hand(p, gamma):
        return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0

    schedule = jax.jit(losses.dann_grl_scale)
    assert float(schedule(0.0, 10.0)) == 0.0  # exactly: no adversarial gradient at the start
    for gamma in (10.0, 3.0):
        for p in (0.01, 0.1, 0.25, 0.5, 1.0):
            np.testing.assert_allclose(schedule(p, gamma), by_hand(p, gamma), rtol=1e-6)
    np.testing.assert_allclose(schedule(1.0, 10.0), 0.9999092, rtol=1e-6)
    ramp = np.asarray(schedule(jnp.linspace(0.0, 1.0, 101), 10.0))
    assert ramp.dtype == np.float32 and np.all(np.diff(ramp) > 0) and ramp[-1] < 1.0
    with pytest.raises(ValueError, match=r"gamma must be positive"):
        losses.dann_grl_scale(0.5, 0.0)


def test_modality_adversarial_loss_label_smoothing_values_and_gradients():
    eps = 0.1
    logits_txt = jnp.array([0.0, 2.0, -1.5])
    logits_mol = jnp.array([0.0, -3.0, 0.7])
    loss = jax.jit(functools.partial(losses.modality_adversarial_loss, label_smoothing=eps))(
        logits_txt, logits_mol
    )

    def softplus(x):
        return math.log1p(math.exp(x))

    expected = [(1 - eps) * softplus(-lt) + eps * softplus(lt) for lt in [0.0, 2.0, -1.5]]
    expected += [(1 - eps) * softplus(lm) + eps * softplus(-lm) for lm in [0.0, -3.0, 0.7]]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)

    # d loss / d logit = σ(l) − target with targets 1 − ε (text) and ε (molecule)
    grad_txt, grad_mol = jax.grad(
        lambda a, b: jnp.sum(losses.modality_adversarial_loss(a, b, label_smoothing=eps)),
        argnums=(0, 1),
    )(logits_txt, logits_mol)
    np.testing.assert_allclose(grad_txt, jax.nn.sigmoid(logits_txt) - (1 - eps), rtol=1e-5)
    np.testing.assert_allclose(grad_mol, jax.nn.sigmoid(logits_mol) - eps, rtol=1e-5, atol=1e-7)
    # the optimum is the finite logit ±log((1 − ε) / ε): no gradient there
    optimum = math.log((1 - eps) / eps)
    at_optimum = jax.grad(
        lambda a, b: jnp.sum(losses.modality_adversarial_loss(a, b, label_smoothing=eps)),
        argnums=(0, 1),
    )(jnp.array([optimum]), jnp.array([-optimum]))
    np.testing.assert_allclose(at_optimum, [[0.0], [0.0]], atol=1e-6)
    # ε = 0 is the plain cross-entropy, bit for bit; a traced ε works
    plain = losses.modality_adversarial_loss(logits_txt, logits_mol)
    np.testing.assert_array_equal(
        losses.modality_adversarial_loss(logits_txt, logits_mol, label_smoothing=0.0), plain
    )
    traced = jax.jit(
        lambda e: losses.modality_adversarial_loss(logits_txt, logits_mol, label_smoothing=e)
    )(jnp.float32(eps))
    np.testing.assert_allclose(traced, expected, rtol=1e-6)
    for bad in (-0.1, 0.5):
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
            losses.modality_adversarial_loss(logits_txt, logits_mol, label_smoothing=bad)


def test_cmtmr_loss_passes_discriminator_label_smoothing_under_a_mask():
    z_txt, z_mol = _random_pairs(33)
    where = jnp.asarray(WHERE6)
    logits_txt = _with_garbage(jnp.array([2.0, -1.0, 0.5, 3.0, -0.2, 1.0])[:, None], where, 1e4)
    logits_mol = _with_garbage(jnp.array([-2.0, -1.0, 0.5, 1.0, -0.2, -3.0])[:, None], where, 1e4)

    def total(logits_txt, logits_mol, smoothing):
        return losses.cmtmr_loss(
            z_txt,
            z_mol,
            where=where,
            adv_weight=0.5,
            disc_label_smoothing=smoothing,
            disc_logits_txt=logits_txt,
            disc_logits_mol=logits_mol,
        )

    loss, terms = total(logits_txt, logits_mol, 0.2)
    plain_loss, plain_terms = total(logits_txt, logits_mol, 0.0)
    valid = np.flatnonzero(WHERE6)
    smoothed = losses.modality_adversarial_loss(
        logits_txt[valid], logits_mol[valid], label_smoothing=0.2
    )
    np.testing.assert_allclose(terms["adversarial"], jnp.mean(smoothed), rtol=1e-6)
    np.testing.assert_allclose(
        loss - plain_loss, 0.5 * (terms["adversarial"] - plain_terms["adversarial"]), rtol=1e-5
    )
    assert terms["disc_accuracy"] == plain_terms["disc_accuracy"]  # smoothing moves no call
    grads = jax.grad(lambda a, b: total(a, b, 0.2)[0], argnums=(0, 1))(logits_txt, logits_mol)
    for g in grads:
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(np.asarray(g)[~WHERE6], 0.0)  # masked logits: no gradient
