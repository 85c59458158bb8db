"""Pure-JAX losses of CMTMR (Song et al., BIBM 2024), reusable outside jaxmol.

The module imports only `jax`, `jax.numpy` and `jax.lax`: no Flax, no optax, no config. Every
function is a pure function of arrays and follows the optax conventions:

* Outputs are per example (unreduced). The official code averages over the batch; with a mask,
  `masked_mean(values, where)` gives exactly the official scalar computed on the valid pairs.
* `where` is a boolean mask [B] of valid (text, molecule) pairs. A masked pair is neither an
  anchor, nor a negative, nor a column of any distribution, and its own output is 0. On the valid
  rows the result equals the result on the arrays sliced to the valid pairs. Masked rows may hold
  any values, NaN included: they are replaced by zeros before use, so no gradient leaks from them.
* Inputs are checked at trace time (rank, leading-dimension match, floating dtype); errors are
  `ValueError` / `TypeError` with the offending shape or dtype in the message.
* Computation runs in float32 at least (half-precision inputs are promoted): the 1e-12 clamp of
  the Euclidean distance underflows in float16.

Numerics of the Euclidean distance, `sqrt(max(|x|² + |y|² − 2 x·y, 1e-12))` (official formula):

* The dot products use `lax.Precision.HIGHEST`. The formula cancels catastrophically for close
  points, and reduced-precision matmul passes (TF32 / bf16 on accelerators) would turn that
  into distance errors of order 1e-2.
* Where a matrix pairs row i of one batch with row i of another (TT, MM, TM and the triplet's
  2B×2B matrix), the diagonal is computed from the difference, `|x_i − y_i|²`, instead of the
  expanded form. The value is the same formula evaluated without cancellation: a self-distance
  is exactly `sqrt(1e-12) = 1e-6` with zero gradient, where the expanded form yields rounding
  noise up to ~5e-4 for unit vectors whose gradient is that noise amplified by 1/(2·5e-4).
  It also makes TM equal TT bit for bit when both modalities are identical.

References:
  Song et al., "Towards Cross-Modal Text-Molecule Retrieval with Better Modality Alignment",
  IEEE BIBM 2024 (arXiv 2410.23715) and its official code (DeepLearnXMU/CMTMR).
  Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person Re-Identification", 2017.
  Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015.
  Gulrajani et al., "Improved Training of Wasserstein GANs", NeurIPS 2017.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "batch_hard_triplet",
    "cmtmr_loss",
    "dann_grl_scale",
    "gradient_reversal",
    "info_nce",
    "masked_mean",
    "modality_adversarial_loss",
    "pairwise_euclidean",
    "second_order_kl",
    "wgan_generator_loss",
    "wgan_gp_critic_loss",
]

# Clamp inside the square root of the official Euclidean distance.
DISTANCE_CLAMP = 1e-12
# Floor of the vector norms in the cosine similarity (torch.nn.functional.cosine_similarity).
COSINE_EPS = 1e-8

_SIMILARITIES = ("distance", "neg_distance")
_METRICS = ("euclidean", "cosine")
_FIRST_ORDER = ("triplet", "info_nce")
_ADVERSARIES = ("grl", "wgan_gp", "none")
# Official adversarial weight (gan_weight in scripts/train.sh) for the WGAN generator term.
_DEFAULT_ADV_WEIGHT = {"grl": 1.0, "wgan_gp": 2e-4, "none": 0.0}


# ---------------------------------------------------------------------------------------------
# Input checks and masking helpers.
# ---------------------------------------------------------------------------------------------


def _compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    return jnp.result_type(*(a.dtype for a in arrays), jnp.float32)


def _as_float_array(x: Any, name: str, rank: int, shape_doc: str) -> jax.Array:
    """Converts to an array; raises if the rank is not `rank` or the dtype is not floating."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} {shape_doc}, got shape {x.shape}")
    return x


def _check_embedding_pair(z_txt: Any, z_mol: Any) -> tuple[jax.Array, jax.Array]:
    """Checks that z_txt and z_mol are float [B, D] with equal B and D; promotes the dtype."""
    z_txt = _as_float_array(z_txt, "z_txt", 2, "[B, D]")
    z_mol = _as_float_array(z_mol, "z_mol", 2, "[B, D]")
    if z_txt.shape[0] != z_mol.shape[0]:
        raise ValueError(
            "z_txt and z_mol must hold the same number of pairs (leading dimension), got "
            f"{z_txt.shape[0]} and {z_mol.shape[0]} (shapes {z_txt.shape} and {z_mol.shape})"
        )
    if z_txt.shape[1] != z_mol.shape[1]:
        raise ValueError(
            f"z_txt and z_mol must have the same feature size, got shapes {z_txt.shape} and "
            f"{z_mol.shape}"
        )
    dtype = _compute_dtype(z_txt, z_mol)
    return z_txt.astype(dtype), z_mol.astype(dtype)


def _check_where(where: Any, batch: int) -> jax.Array:
    """Returns the validity mask [batch] (all True when `where` is None)."""
    if where is None:
        return jnp.ones((batch,), dtype=bool)
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean mask of valid pairs, got dtype {where.dtype}")
    if where.ndim != 1 or where.shape[0] != batch:
        raise ValueError(
            f"where must have shape [B] = [{batch}] (one flag per pair), got {where.shape}"
        )
    return where


def _check_logits(logits: Any, name: str) -> jax.Array:
    """Accepts logits [B] or [B, 1]; returns float [B]."""
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {logits.dtype}")
    if logits.ndim == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.ndim != 1:
        raise ValueError(f"{name} must have shape [B] or [B, 1], got {logits.shape}")
    return logits.astype(_compute_dtype(logits))


def _check_temperature(temperature: Any, name: str) -> None:
    if isinstance(temperature, int | float) and temperature <= 0:
        raise ValueError(f"{name} must be positive, got {temperature}")


def _zero_invalid_rows(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Replaces masked rows by zeros so that NaN/inf padding can't reach values or gradients."""
    valid = valid.reshape(valid.shape + (1,) * (x.ndim - 1))
    return jnp.where(valid, x, jnp.zeros((), x.dtype))


def masked_mean(values: Any, where: Any = None) -> jax.Array:
    """Mean of `values` over the entries where `where` is True (0 if none is).

    This is the reduction of the official code applied to the valid pairs:
    `masked_mean(loss, where) == mean(loss[where])`.

    Args:
      values: float array of any shape, e.g. [B] per-pair losses.
      where: optional boolean mask broadcastable to `values.shape`; None means all valid.
        For the [2B] outputs of `batch_hard_triplet` and `modality_adversarial_loss` pass
        `jnp.concatenate([where, where])`.

    Returns:
      Scalar mean over the valid entries; 0 when no entry is valid (finite gradient).

    Example:
      >>> import jax.numpy as jnp
      >>> print(masked_mean(jnp.array([1.0, 2.0, 100.0]), jnp.array([True, True, False])))
      1.5
    """
    values = jnp.asarray(values)
    if where is None:
        return jnp.mean(values)
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}")
    try:
        where = jnp.broadcast_to(where, values.shape)
    except ValueError as error:
        raise ValueError(
            f"where of shape {where.shape} does not broadcast to values of shape {values.shape}"
        ) from error
    total = jnp.sum(jnp.where(where, values, jnp.zeros((), values.dtype)))
    count = jnp.sum(where)
    return total / jnp.maximum(count, 1).astype(total.dtype)


def _masked_log_softmax(logits: jax.Array, column_valid: jax.Array) -> jax.Array:
    """Row-wise log-softmax over the valid columns. [N, M], [M] -> [N, M].

    Masked columns get a huge *finite* negative logit: their probability is exactly 0, and no
    inf reaches the arithmetic, so `p · (log p − log q)` and its gradient stay finite.
    """
    very_negative = jnp.asarray(jnp.finfo(logits.dtype).min / 2, logits.dtype)
    logits = jnp.where(column_valid[None, :], logits, very_negative)
    return jax.nn.log_softmax(logits, axis=-1)


def _row_kl(log_p: jax.Array, log_q: jax.Array, column_valid: jax.Array) -> jax.Array:
    """KL(p‖q) per row, summed over the valid columns. [N, M] x2, [M] -> [N]."""
    terms = jnp.exp(log_p) * (log_p - log_q)  # [N, M]
    return jnp.sum(jnp.where(column_valid[None, :], terms, 0.0), axis=-1)


# ---------------------------------------------------------------------------------------------
# Distances.
# ---------------------------------------------------------------------------------------------


def _expanded_squared_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """|a_i|² + |b_j|² − 2 a_i·b_j, as the official code computes it. [N, D], [M, D] -> [N, M]."""
    cross = jnp.dot(a, b.T, precision=lax.Precision.HIGHEST)  # [N, M]
    return jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * cross


def _clamped_sqrt(squared: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.maximum(squared, DISTANCE_CLAMP))


def pairwise_euclidean(a: Any, b: Any) -> jax.Array:
    """Pairwise Euclidean distances with the official clamp: [N, D], [M, D] -> [N, M].

    Formula: `dist[i, j] = sqrt(max(|a_i|² + |b_j|² − 2 a_i·b_j, 1e-12))`, so every distance is
    at least 1e-6 and the gradient is 0 where the clamp is active. This is the official CMTMR
    `euclidean_dist` (ACME / open-reid lineage); the dot products run at highest precision.

    Args:
      a: float [N, D].
      b: float [M, D].

    Returns:
      float [N, M] distances.

    Example:
      >>> import jax.numpy as jnp
      >>> print(pairwise_euclidean(jnp.array([[0.0, 0.0]]), jnp.array([[3.0, 4.0], [0.0, 0.0]])))
      [[5.e+00 1.e-06]]

    Reference: Song et al., BIBM 2024 (official code, `euclidean_dist`).
    """
    a = _as_float_array(a, "a", 2, "[N, D]")
    b = _as_float_array(b, "b", 2, "[M, D]")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same feature size, got {a.shape} and {b.shape}")
    dtype = _compute_dtype(a, b)
    return _clamped_sqrt(_expanded_squared_distance(a.astype(dtype), b.astype(dtype)))


def _paired_squared_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """Like `_expanded_squared_distance` for a [B, D] x [B, D] pairing, exact on the diagonal."""
    expanded = _expanded_squared_distance(a, b)  # [B, B]
    diagonal = jnp.sum(jnp.square(a - b), axis=1)  # [B]; 0 exactly when a is b
    on_diagonal = jnp.eye(a.shape[0], dtype=bool)
    return jnp.where(on_diagonal, diagonal[:, None], expanded)


def _euclidean_blocks(z_txt: jax.Array, z_mol: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """TT, MM, TM distance matrices [B, B] (MT = TM.T), exact on their diagonals."""
    tt = _clamped_sqrt(_paired_squared_distance(z_txt, z_txt))
    mm = _clamped_sqrt(_paired_squared_distance(z_mol, z_mol))
    tm = _clamped_sqrt(_paired_squared_distance(z_txt, z_mol))
    return tt, mm, tm


def _cosine_blocks(z_txt: jax.Array, z_mol: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Official `cos_dist` matrices 0.5·(cos + 1) for TT, MM, TM [B, B]."""

    def unit(z: jax.Array) -> jax.Array:
        # sqrt(max(|z|², eps²)) == max(|z|, eps), with a finite gradient at z = 0.
        norm = jnp.sqrt(jnp.maximum(jnp.sum(z * z, axis=1, keepdims=True), COSINE_EPS**2))
        return z / norm

    u_txt, u_mol = unit(z_txt), unit(z_mol)

    def cos_dist(a: jax.Array, b: jax.Array) -> jax.Array:
        return 0.5 * (jnp.dot(a, b.T, precision=lax.Precision.HIGHEST) + 1.0)

    return cos_dist(u_txt, u_txt), cos_dist(u_mol, u_mol), cos_dist(u_txt, u_mol)


# ---------------------------------------------------------------------------------------------
# First-order losses.
# ---------------------------------------------------------------------------------------------


def batch_hard_triplet(
    z_txt: Any, z_mol: Any, *, margin: float = 0.3, where: Any = None
) -> jax.Array:
    """Batch-hard triplet loss over 2B anchors (texts, then molecules), CMTMR's first-order loss.

    With X = [t_1..t_B, m_1..m_B] and D = the Euclidean distances of `pairwise_euclidean`:

        loss_a = max(0, D[a, partner(a)] − min_{n ∉ {a, partner(a)}} D[a, n] + margin)

    The positive of t_i is m_i and vice versa. The hardest negative is searched among the other
    2B − 2 embeddings of *both* modalities. (The official code takes the max over the two
    same-label entries, the anchor itself at 1e-6 and its partner, which is the partner.)
    The official scalar is the mean over the 2B anchors (MarginRankingLoss).

    Args:
      z_txt: float [B, D] text embeddings.
      z_mol: float [B, D] molecule embeddings; row i is the partner of text i.
      margin: triplet margin (official 0.3).
      where: optional bool [B] mask of valid pairs. A masked pair is neither an anchor nor a
        negative. An anchor without any valid negative (a single valid pair) gets loss 0.

    Returns:
      float [2B] per-anchor losses: entries 0..B−1 for text anchors, B..2B−1 for molecule
      anchors; 0 for masked anchors. Reduce with `masked_mean(loss, concatenate([where, where]))`.

    Example:
      >>> import jax.numpy as jnp
      >>> z_txt = jnp.array([[0.0, 0.0], [1.0, 0.0]])
      >>> z_mol = jnp.array([[0.0, 0.5], [1.0, 0.0]])
      >>> print(batch_hard_triplet(z_txt, z_mol))
      [0. 0. 0. 0.]
      >>> [round(float(v), 4) for v in batch_hard_triplet(z_txt, z_mol, margin=1.0)]
      [0.5, 0.0, 0.382, 0.0]

    References: Song et al., BIBM 2024 (official `global_euc_loss`); Hermans et al., 2017.
    """
    z_txt, z_mol = _check_embedding_pair(z_txt, z_mol)
    batch = z_txt.shape[0]
    valid = _check_where(where, batch)
    z_txt, z_mol = _zero_invalid_rows(z_txt, valid), _zero_invalid_rows(z_mol, valid)

    tt, mm, tm = _euclidean_blocks(z_txt, z_mol)
    dist = jnp.block([[tt, tm], [tm.T, mm]])  # [2B, 2B]
    positive = jnp.concatenate([jnp.diagonal(tm), jnp.diagonal(tm)])  # [2B]

    anchor_valid = jnp.concatenate([valid, valid])  # [2B]
    pair_id = jnp.concatenate([jnp.arange(batch), jnp.arange(batch)])  # [2B]
    is_negative = (pair_id[:, None] != pair_id[None, :]) & anchor_valid[None, :]  # [2B, 2B]
    far = jnp.asarray(jnp.finfo(dist.dtype).max, dist.dtype)
    hardest_negative = jnp.min(jnp.where(is_negative, dist, far), axis=1)  # [2B]
    has_negative = jnp.any(is_negative, axis=1)

    loss = jax.nn.relu(positive - hardest_negative + margin)
    return jnp.where(anchor_valid & has_negative, loss, 0.0)


def info_nce(
    z_txt: Any, z_mol: Any, *, temperature: Any, where: Any = None
) -> tuple[jax.Array, jax.Array]:
    """Bidirectional InfoNCE (cross-entropy over in-batch candidates), the `cl` option of CMTMR.

        s_ij = t_i·m_j / temperature
        t2m_i = −log softmax_j(s_i·)[i]        m2t_i = −log softmax_j(s_·i)[i]

    The official `contrastive_loss` is `mean(t2m) + mean(m2t)` with temperature 1 (no
    temperature, no label smoothing) on the unit embeddings.

    Args:
      z_txt: float [B, D] text embeddings.
      z_mol: float [B, D] molecule embeddings; row i is the partner of text i.
      temperature: positive scalar dividing the dot products.
      where: optional bool [B] mask; masked pairs are neither queries nor candidates.

    Returns:
      (t2m, m2t): two float [B] arrays of per-query losses, 0 for masked pairs.

    Example:
      >>> import jax.numpy as jnp
      >>> z = jnp.eye(2)
      >>> t2m, m2t = info_nce(z, z, temperature=1.0)
      >>> [round(float(v), 4) for v in t2m]  # log(1 + e^-1)
      [0.3133, 0.3133]

    Reference: Song et al., BIBM 2024 (official `cl_loss.contrastive_loss`); van den Oord et
    al., 2018 (InfoNCE).
    """
    _check_temperature(temperature, "temperature")
    z_txt, z_mol = _check_embedding_pair(z_txt, z_mol)
    valid = _check_where(where, z_txt.shape[0])
    z_txt, z_mol = _zero_invalid_rows(z_txt, valid), _zero_invalid_rows(z_mol, valid)

    logits = jnp.dot(z_txt, z_mol.T, precision=lax.Precision.HIGHEST) / temperature  # [B, B]
    t2m = -jnp.diagonal(_masked_log_softmax(logits, valid))
    m2t = -jnp.diagonal(_masked_log_softmax(logits.T, valid))
    return jnp.where(valid, t2m, 0.0), jnp.where(valid, m2t, 0.0)


# ---------------------------------------------------------------------------------------------
# Second-order similarity losses.
# ---------------------------------------------------------------------------------------------


def second_order_kl(
    z_txt: Any,
    z_mol: Any,
    *,
    temperature: Any = 1.0,
    where: Any = None,
    similarity: str = "distance",
    metric: str = "euclidean",
) -> dict[str, jax.Array]:
    """CMTMR's second-order losses: KL divergences between in-batch similarity distributions.

    From the four matrices TT[i,j] = d(t_i, t_j), MM = d(m_i, m_j), TM = d(t_i, m_j) and
    MT = d(m_i, t_j) = TM.T, each row gives a distribution over the batch:

        P_X(i, ·) = softmax_j(s · X[i, j] / temperature)

    with s = +1 for `similarity='distance'` (official: the softmax is over the raw *distances*,
    so farther items get more mass; diagonals are kept) and s = −1 for `'neg_distance'`. Then,
    with KL(p‖q) = Σ_j p_j (log p_j − log q_j) per row:

        u2u_i = KL(P_MM(i)‖P_TT(i)) + KL(P_TT(i)‖P_MM(i))         gradients through both sides
        u2c_i = KL(sg P_MM(i)‖P_TM(i)) + KL(sg P_TT(i)‖P_MT(i))   sg = stop-gradient target

    The official scalars are the means over rows: `masked_mean(out['u2u'], where)`.

    `metric='euclidean'` (official) uses d = `pairwise_euclidean`. `metric='cosine'` uses the
    official `cos_dist`, d = 0.5·(cos(x, y) + 1) in [0, 1] with cos = x·y / (max(|x|, 1e-8)
    max(|y|, 1e-8)); despite its name this value *grows* with similarity, so `'distance'`
    gives the usual softmax over similarities there. The official code logs this cosine
    variant but does not optimise it.

    Args:
      z_txt: float [B, D] text embeddings.
      z_mol: float [B, D] molecule embeddings; row i is the partner of text i.
      temperature: positive scalar (official 1.0).
      where: optional bool [B] mask. A masked pair is neither a row nor a column of any of the
        four distributions, and its outputs are 0.
      similarity: `'distance'` (official) or `'neg_distance'`.
      metric: `'euclidean'` (official) or `'cosine'`.

    Returns:
      dict of float [B] per-row values: `'u2u'`, `'u2c'` and the four directions
      `'u2u_mm_tt'` = KL(P_MM‖P_TT) (official `loss_t2m`), `'u2u_tt_mm'` = KL(P_TT‖P_MM)
      (`loss_m2t`), `'u2c_mm_tm'` = KL(sg P_MM‖P_TM) (`loss_2m`), `'u2c_tt_mt'` =
      KL(sg P_TT‖P_MT) (`loss_2t`).

    Example:
      >>> import jax.numpy as jnp
      >>> z = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> out = second_order_kl(z, z)
      >>> print(out['u2u'], out['u2c'])
      [0. 0.] [0. 0.]
      >>> out = second_order_kl(z, jnp.array([[1.0, 0.0], [0.0, 2.0]]))
      >>> [round(float(v), 4) for v in out['u2u']]
      [0.0814, 0.0814]

    Reference: Song et al., BIBM 2024 (official `u2u_euc_loss`, `u2c_euc_loss`, `kl_loss`).
    """
    if similarity not in _SIMILARITIES:
        raise ValueError(f"similarity must be one of {_SIMILARITIES}, got {similarity!r}")
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    _check_temperature(temperature, "temperature")
    z_txt, z_mol = _check_embedding_pair(z_txt, z_mol)
    valid = _check_where(where, z_txt.shape[0])
    z_txt, z_mol = _zero_invalid_rows(z_txt, valid), _zero_invalid_rows(z_mol, valid)

    blocks = _euclidean_blocks if metric == "euclidean" else _cosine_blocks
    tt, mm, tm = blocks(z_txt, z_mol)  # [B, B] each
    sign = 1.0 if similarity == "distance" else -1.0

    def log_dist(matrix: jax.Array) -> jax.Array:
        return _masked_log_softmax(sign * matrix / temperature, valid)

    log_tt, log_mm = log_dist(tt), log_dist(mm)
    log_tm, log_mt = log_dist(tm), log_dist(tm.T)

    terms = {
        "u2u_mm_tt": _row_kl(log_mm, log_tt, valid),
        "u2u_tt_mm": _row_kl(log_tt, log_mm, valid),
        "u2c_mm_tm": _row_kl(lax.stop_gradient(log_mm), log_tm, valid),
        "u2c_tt_mt": _row_kl(lax.stop_gradient(log_tt), log_mt, valid),
    }
    terms = {name: jnp.where(valid, value, 0.0) for name, value in terms.items()}
    terms["u2u"] = terms["u2u_mm_tt"] + terms["u2u_tt_mm"]
    terms["u2c"] = terms["u2c_mm_tm"] + terms["u2c_tt_mt"]
    return terms


# ---------------------------------------------------------------------------------------------
# Adversarial losses.
# ---------------------------------------------------------------------------------------------


@jax.custom_vjp
def _reverse_gradient(x: Any, scale: jax.Array) -> Any:
    return x


def _reverse_gradient_fwd(x: Any, scale: jax.Array) -> tuple[Any, jax.Array]:
    return x, scale


def _reverse_gradient_bwd(scale: jax.Array, cotangent: Any) -> tuple[Any, jax.Array]:
    flipped = jax.tree.map(lambda g: (-scale * g).astype(g.dtype), cotangent)
    # `scale` is a hyper-parameter (it may be traced, e.g. a schedule): it gets no gradient.
    return flipped, jnp.zeros_like(scale)


_reverse_gradient.defvjp(_reverse_gradient_fwd, _reverse_gradient_bwd)


def gradient_reversal(x: Any, scale: Any = 1.0) -> Any:
    """Gradient-reversal layer: identity forward, −scale·grad backward.

        forward: y = x          backward: dL/dx = −scale · dL/dy

    Put it between the encoder features and a modality discriminator trained with
    `modality_adversarial_loss`: the discriminator learns to tell the modalities apart while the
    encoders receive the reversed gradient and learn modality-invariant features.

    Args:
      x: a float array (or a pytree of float arrays), any shape.
      scale: non-negative scalar, a Python float or a traced array (e.g. a schedule);
        it receives a zero gradient.

    Returns:
      `x` unchanged (same shape and dtype).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> print(jax.grad(lambda x: jnp.sum(gradient_reversal(x, 0.5) * 3.0))(jnp.ones(2)))
      [-1.5 -1.5]

    Reference: Ganin & Lempitsky, ICML 2015.
    """
    return _reverse_gradient(x, jnp.asarray(scale, dtype=jnp.float32))


def dann_grl_scale(progress: Any, gamma: Any = 10.0) -> jax.Array:
    """The DANN schedule of the gradient-reversal scale: 0 at the start, → 1 at the end.

        λ(p) = 2 / (1 + exp(−γ·p)) − 1,   p = training progress in [0, 1]

    λ(0) = 0 exactly (the encoders get no adversarial gradient while the discriminator is
    still random), λ rises fastest at the start and λ(1) = tanh(γ/2) (0.99991 for γ = 10).
    Written as tanh(γ·p / 2), the same value without the cancellation of `2/(1+e) − 1`.

    Args:
      progress: float scalar (or array) p, e.g. step / total_steps; may be traced.
      gamma: positive steepness γ (10 in the paper).

    Returns:
      float32 λ(p), the shape of `progress`.

    Example:
      >>> print(dann_grl_scale(0.0), round(float(dann_grl_scale(1.0)), 5))
      0.0 0.99991

    Reference: Ganin & Lempitsky, ICML 2015 (section 5.2.2, the schedule of λ_p).
    """
    _check_temperature(gamma, "gamma")
    progress = jnp.asarray(progress, jnp.float32)
    return jnp.tanh(0.5 * jnp.asarray(gamma, jnp.float32) * progress)


def modality_adversarial_loss(
    logits_txt: Any, logits_mol: Any, *, where: Any = None, label_smoothing: Any = 0.0
) -> jax.Array:
    """Sigmoid binary cross-entropy of a modality discriminator: text = 1, molecule = 0.

        loss(text i) = −log σ(l_t,i) = softplus(−l_t,i)
        loss(mol i)  = −log(1 − σ(l_m,i)) = softplus(l_m,i)

    With `label_smoothing` ε > 0 the targets become 1 − ε (text) and ε (molecule):

        loss(text i) = (1 − ε)·softplus(−l_t,i) + ε·softplus(l_t,i)
        loss(mol i)  = (1 − ε)·softplus(l_m,i) + ε·softplus(−l_m,i)

    so the discriminator's optimum is the finite logit ±log((1 − ε)/ε) instead of ±∞: a
    confident discriminator keeps a gradient (σ(l) − target) instead of saturating.

    With `gradient_reversal` applied to the discriminator's input features, minimising the
    mean of this loss trains the discriminator and pushes the encoders adversarially.

    Args:
      logits_txt: float [B] or [B, 1] discriminator logits on text features.
      logits_mol: float [B] or [B, 1] discriminator logits on molecule features.
      where: optional bool [B] mask of valid pairs.
      label_smoothing: ε in [0, 0.5); 0 (default) is the plain cross-entropy, computed
        exactly as before the option existed.

    Returns:
      float [2B]: text losses then molecule losses; 0 for masked pairs. Reduce with
      `masked_mean(loss, concatenate([where, where]))`.

    Example:
      >>> import jax.numpy as jnp
      >>> print(modality_adversarial_loss(jnp.zeros(1), jnp.zeros((1, 1))))
      [0.6931472 0.6931472]

    Reference: Ganin & Lempitsky, ICML 2015; Salimans et al., "Improved Techniques for
    Training GANs", NeurIPS 2016 (label smoothing of a discriminator).
    """
    if isinstance(label_smoothing, int | float) and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    logits_txt = _check_logits(logits_txt, "logits_txt")
    logits_mol = _check_logits(logits_mol, "logits_mol")
    if logits_txt.shape != logits_mol.shape:
        raise ValueError(
            f"logits_txt and logits_mol must have the same length, got {logits_txt.shape} and "
            f"{logits_mol.shape}"
        )
    valid = _check_where(where, logits_txt.shape[0])
    logits_txt = _zero_invalid_rows(logits_txt, valid)
    logits_mol = _zero_invalid_rows(logits_mol, valid)
    # Signed logits: positive = the right modality. [2B]
    signed = jnp.concatenate([logits_txt, -logits_mol])
    loss = jax.nn.softplus(-signed)
    if not (isinstance(label_smoothing, int | float) and label_smoothing == 0):
        epsilon = jnp.asarray(label_smoothing, signed.dtype)
        loss = (1.0 - epsilon) * loss + epsilon * jax.nn.softplus(signed)
    return jnp.where(jnp.concatenate([valid, valid]), loss, 0.0)


def _safe_norm(x: jax.Array) -> jax.Array:
    """Row L2 norm [B, F] -> [B] whose gradient at 0 is 0 (as torch.norm's), not NaN."""
    squared = jnp.sum(x * x, axis=-1)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def wgan_gp_critic_loss(
    critic_fn: Callable[[jax.Array], jax.Array],
    real: Any,
    fake: Any,
    key: jax.Array,
    *,
    gp_weight: float = 10.0,
    where: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """WGAN-GP critic loss per example (official adversary: text = real, molecule = fake).

        loss_i = −D(r_i) + D(f_i) + gp_weight · (‖∇_x D(x̂_i)‖₂ − 1)²
        x̂_i = α_i r_i + (1 − α_i) f_i,   α_i ~ U(0, 1) drawn from `key`, one per example

    Its mean is the official critic loss `−mean D(real) + mean D(fake) + 10·GP`. The features
    are constants here (stop-gradient), as in the official critic step; differentiate with
    respect to the critic's parameters captured by `critic_fn`. The input gradient is taken
    per example (`vmap(grad)`), so `critic_fn` must act on each row independently (an MLP,
    no BatchNorm), as the official critic does.

    Args:
      critic_fn: maps float [N, F] -> [N] or [N, 1] critic values.
      real: float [B, F] real features (official: pooled pre-memory text features).
      fake: float [B, F] fake features (official: pooled pre-memory molecule features).
      key: a JAX PRNG key for the interpolation coefficients.
      gp_weight: weight of the gradient penalty (official 10).
      where: optional bool [B] mask of valid pairs.

    Returns:
      (loss, aux): loss is float [B] per-example critic losses (0 where masked); aux holds
      float [B] arrays `'critic_real'` = D(r_i), `'critic_fake'` = D(f_i) and
      `'gradient_penalty'` = (‖∇D(x̂_i)‖ − 1)², all 0 where masked.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> critic = lambda x: x @ jnp.array([3.0, 4.0])      # |∇D| = 5 everywhere
      >>> loss, aux = wgan_gp_critic_loss(critic, jnp.ones((1, 2)), jnp.zeros((1, 2)),
      ...                                 jax.random.key(0))
      >>> print(aux['gradient_penalty'], loss)
      [16.] [153.]

    Reference: Gulrajani et al., NeurIPS 2017; Song et al., BIBM 2024 (official
    `compute_gradient_penalty` and critic step).
    """
    real = _as_float_array(real, "real", 2, "[B, F]")
    fake = _as_float_array(fake, "fake", 2, "[B, F]")
    if real.shape != fake.shape:
        raise ValueError(
            f"real and fake must have the same shape [B, F], got {real.shape} and {fake.shape}"
        )
    dtype = _compute_dtype(real, fake)
    valid = _check_where(where, real.shape[0])
    real = lax.stop_gradient(_zero_invalid_rows(real.astype(dtype), valid))
    fake = lax.stop_gradient(_zero_invalid_rows(fake.astype(dtype), valid))

    def critic_values(x: jax.Array, name: str) -> jax.Array:
        return _check_logits(critic_fn(x), f"critic_fn({name})")

    critic_real = critic_values(real, "real")  # [B]
    critic_fake = critic_values(fake, "fake")  # [B]
    if critic_real.shape[0] != real.shape[0]:
        raise ValueError(
            f"critic_fn must return one value per row: got {critic_real.shape[0]} values for "
            f"{real.shape[0]} rows"
        )

    alpha = jax.random.uniform(key, (real.shape[0], 1), dtype=dtype)  # [B, 1]
    interpolates = alpha * real + (1.0 - alpha) * fake  # [B, F]

    def critic_single(x: jax.Array) -> jax.Array:
        return jnp.reshape(critic_fn(x[None, :]), ())

    input_grads = jax.vmap(jax.grad(critic_single))(interpolates)  # [B, F]
    penalty = jnp.square(_safe_norm(input_grads) - 1.0)  # [B]

    loss = -critic_real + critic_fake + gp_weight * penalty
    aux = {"critic_real": critic_real, "critic_fake": critic_fake, "gradient_penalty": penalty}
    loss = jnp.where(valid, loss, 0.0)
    aux = {name: jnp.where(valid, value, 0.0) for name, value in aux.items()}
    return loss, aux


def wgan_generator_loss(critic_logits_fake: Any, *, where: Any = None) -> jax.Array:
    """WGAN generator loss per example: `−D(fake_i)`.

    The official generator term is its mean, computed with the just-updated critic on the
    (not detached) molecule features, weighted by 2e-4 in the total objective.

    Args:
      critic_logits_fake: float [B] or [B, 1] critic values on the fake (molecule) features.
      where: optional bool [B] mask of valid pairs.

    Returns:
      float [B] per-example losses, 0 where masked.

    Example:
      >>> import jax.numpy as jnp
      >>> print(wgan_generator_loss(jnp.array([[1.5], [-2.0]])))
      [-1.5  2. ]

    Reference: Gulrajani et al., NeurIPS 2017; Song et al., BIBM 2024.
    """
    values = _check_logits(critic_logits_fake, "critic_logits_fake")
    valid = _check_where(where, values.shape[0])
    return jnp.where(valid, -_zero_invalid_rows(values, valid), 0.0)


# ---------------------------------------------------------------------------------------------
# Fused CMTMR objective.
# ---------------------------------------------------------------------------------------------


def cmtmr_loss(
    z_txt: Any,
    z_mol: Any,
    *,
    where: Any = None,
    first_order: str = "triplet",
    first_order_weight: Any = 1.0,
    margin: float = 0.3,
    info_nce_temperature: Any = 1.0,
    kl_temperature: Any = 1.0,
    kl_similarity: str = "distance",
    kl_metric: str = "euclidean",
    u2u_weight: Any = 1.0,
    u2c_weight: Any = 1.0,
    adversary: str = "grl",
    adv_weight: Any = None,
    disc_label_smoothing: Any = 0.0,
    disc_logits_txt: Any = None,
    disc_logits_mol: Any = None,
    critic_logits_fake: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The full CMTMR training objective on one (global) batch, plus every term for logging.

        L = w_1 · L_first + w_u2u · mean_i u2u_i + w_u2c · mean_i u2c_i + w_adv · L_adv

    where the means run over the valid pairs and

    * `L_first` is the batch-hard triplet mean over the 2B anchors (`first_order='triplet'`,
      official) or `mean(t2m) + mean(m2t)` of `info_nce` (`'info_nce'`, the official `cl`);
    * u2u and u2c come from `second_order_kl`;
    * `L_adv` is, for `adversary='grl'` (default), the mean over 2B entries of
      `modality_adversarial_loss(disc_logits_txt, disc_logits_mol)`, the logits being computed
      by the model on *gradient-reversed* features; for `'wgan_gp'` (official), the mean of
      `wgan_generator_loss(critic_logits_fake)` with the just-updated critic (the critic itself
      is trained separately with `wgan_gp_critic_loss`); for `'none'`, 0.

    Official settings: weights 1 / 1 / 1, margin 0.3, KL temperature 1, Euclidean distances,
    softmax over positive distances, WGAN generator weight 2e-4.

    Args:
      z_txt: float [B, D] final text embeddings.
      z_mol: float [B, D] final molecule embeddings; row i is the partner of text i.
      where: optional bool [B] mask of valid pairs (padding of a partial batch).
      first_order: `'triplet'` or `'info_nce'`.
      first_order_weight: weight of the first-order term (official 1.0).
      margin: triplet margin (official 0.3).
      info_nce_temperature: InfoNCE temperature (1.0 = the official temperature-free `cl`).
      kl_temperature: temperature of the second-order distributions (official 1.0).
      kl_similarity: `'distance'` (official) or `'neg_distance'`, see `second_order_kl`.
      kl_metric: `'euclidean'` (official) or `'cosine'`.
      u2u_weight: weight of u2u (official 1.0).
      u2c_weight: weight of u2c (official 1.0).
      adversary: `'grl'`, `'wgan_gp'` or `'none'`.
      adv_weight: weight of the adversarial term; None means 1.0 for `'grl'` and the official
        2e-4 for `'wgan_gp'`.
      disc_label_smoothing: ε of `modality_adversarial_loss` for `'grl'` (0: none).
      disc_logits_txt: float [B] or [B, 1], required for `'grl'`.
      disc_logits_mol: float [B] or [B, 1], required for `'grl'`.
      critic_logits_fake: float [B] or [B, 1] critic values on molecule features, required
        for `'wgan_gp'`.

    Returns:
      (loss, terms): loss is the float scalar total; terms maps names to float scalars:
      `'total'`, `'first_order'`, `'triplet'` or `'info_nce_t2m'`/`'info_nce_m2t'`, `'u2u'`,
      `'u2c'`, `'u2u_mm_tt'`, `'u2u_tt_mm'`, `'u2c_mm_tm'`, `'u2c_tt_mt'`, `'adversarial'`
      (unweighted), `'num_valid'`, and for `'grl'` `'disc_accuracy'` (fraction of valid
      entries the discriminator classifies correctly).

    Example:
      >>> import jax.numpy as jnp
      >>> z = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> loss, terms = cmtmr_loss(z, z, adversary='none')
      >>> print(terms['triplet'], terms['u2u'], terms['u2c'])
      0.0 0.0 0.0

    Reference: Song et al., BIBM 2024 (official `main.py` loss assembly, `scripts/train.sh`).
    """
    if first_order not in _FIRST_ORDER:
        raise ValueError(f"first_order must be one of {_FIRST_ORDER}, got {first_order!r}")
    if adversary not in _ADVERSARIES:
        raise ValueError(f"adversary must be one of {_ADVERSARIES}, got {adversary!r}")
    if adversary == "grl" and (disc_logits_txt is None or disc_logits_mol is None):
        raise ValueError("adversary='grl' needs disc_logits_txt and disc_logits_mol")
    if adversary == "wgan_gp" and critic_logits_fake is None:
        raise ValueError("adversary='wgan_gp' needs critic_logits_fake")
    if adv_weight is None:
        adv_weight = _DEFAULT_ADV_WEIGHT[adversary]

    z_txt, z_mol = _check_embedding_pair(z_txt, z_mol)
    valid = _check_where(where, z_txt.shape[0])
    valid_twice = jnp.concatenate([valid, valid])  # [2B]
    terms: dict[str, jax.Array] = {}

    if first_order == "triplet":
        triplet = batch_hard_triplet(z_txt, z_mol, margin=margin, where=valid)
        terms["triplet"] = masked_mean(triplet, valid_twice)
        terms["first_order"] = terms["triplet"]
    else:
        t2m, m2t = info_nce(z_txt, z_mol, temperature=info_nce_temperature, where=valid)
        terms["info_nce_t2m"] = masked_mean(t2m, valid)
        terms["info_nce_m2t"] = masked_mean(m2t, valid)
        terms["first_order"] = terms["info_nce_t2m"] + terms["info_nce_m2t"]

    second_order = second_order_kl(
        z_txt,
        z_mol,
        temperature=kl_temperature,
        where=valid,
        similarity=kl_similarity,
        metric=kl_metric,
    )
    for name, per_row in second_order.items():
        terms[name] = masked_mean(per_row, valid)

    if adversary == "grl":
        bce = modality_adversarial_loss(
            disc_logits_txt, disc_logits_mol, where=valid, label_smoothing=disc_label_smoothing
        )
        terms["adversarial"] = masked_mean(bce, valid_twice)
        # Text is class 1, molecule class 0: a positive signed logit is a correct call.
        signed_logits = jnp.concatenate(
            [
                _check_logits(disc_logits_txt, "disc_logits_txt"),
                -_check_logits(disc_logits_mol, "disc_logits_mol"),
            ]
        )
        correct = (lax.stop_gradient(signed_logits) > 0).astype(z_txt.dtype)
        terms["disc_accuracy"] = masked_mean(correct, valid_twice)
    elif adversary == "wgan_gp":
        generator = wgan_generator_loss(critic_logits_fake, where=valid)
        terms["adversarial"] = masked_mean(generator, valid)
    else:
        terms["adversarial"] = jnp.zeros((), z_txt.dtype)

    total = (
        first_order_weight * terms["first_order"]
        + u2u_weight * terms["u2u"]
        + u2c_weight * terms["u2c"]
        + adv_weight * terms["adversarial"]
    )
    terms["total"] = total
    terms["num_valid"] = jnp.sum(valid).astype(z_txt.dtype)
    return total, terms
