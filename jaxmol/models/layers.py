"""Layers shared by the molecule towers, the projector and the head.

* `MaskedBatchNorm`: BatchNorm over the real rows of a padded batch, with statistics that are
  exact over the global batch when the rows are spread over several devices, PyTorch's running
  statistics convention, and optionally several named sets of running statistics.
* `TorchDense`: a Dense layer with PyTorch's default `nn.Linear` initialisation, used wherever
  the official model uses a plain `nn.Linear`.
* Graph helpers: the graph of each node and masked mean pooling per graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
from jax import lax


def torch_linear_init(fan_in: int):
    """PyTorch's default `nn.Linear` init: weight and bias ~ U(±1/sqrt(fan_in)).

    (kaiming_uniform with a = sqrt(5) on the weight reduces to exactly this bound.)
    """
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TorchDense(nn.Module):
    """`nn.Dense` with PyTorch-default initialisation (params `kernel` [in, out], `bias` [out]).

    The parameter names and layout are those of `nn.Dense`, so PyTorch weights import as
    `kernel = weight.T`.

    Attributes:
      features: output width.
      use_bias: add a bias.
      kernel_init: overrides the PyTorch-default kernel init when given.
      bias_init: overrides the PyTorch-default bias init when given.
    """

    features: int
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer | None = None
    bias_init: nn.initializers.Initializer | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        default = torch_linear_init(fan_in)
        kernel = self.param("kernel", self.kernel_init or default, (fan_in, self.features))
        y = jnp.dot(x, kernel)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init or default, (self.features,))
        return y


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the rows selected by a mask, synced exactly across devices.

    Training mode normalises with the biased batch variance of the real rows of the *global*
    batch: masked sums and counts are `lax.psum`'d over `axis_name` (when given), so a batch split
    over devices with different numbers of real rows gets the same statistics as on one device.
    (Flax's `nn.BatchNorm(axis_name=...)` averages per-device means instead, which differs when
    devices hold different numbers of real rows.) Padding rows never enter the statistics and
    their outputs are zero.

    Running statistics follow PyTorch's `BatchNorm1d`: ``new = (1 - momentum)·old +
    momentum·batch`` with momentum 0.1, where the running variance takes the *unbiased* batch
    variance (count/(count − 1)·biased; a batch with one real row counts as unbiased = biased)
    and normalisation uses the biased one. A batch without any real row leaves the running
    statistics unchanged. During `init` the running statistics are not updated.

    Several named sets of running statistics can share one scale/bias (`stat_sets`, chosen per
    call with `stats=`); every set is created on every call, so a model initialised with one
    modality already holds the variables of the other.

    Variables: params `scale` [F] (ones) and `bias` [F] (zeros); batch_stats `mean` / `var`
    [F] for the set named ``''`` (the default), else `<set>_mean` / `<set>_var`.

    Attributes:
      momentum: PyTorch-style momentum (weight of the new batch statistic).
      epsilon: added to the variance.
      axis_name: the device axis to sync statistics over (None: one device).
      stat_sets: names of the sets of running statistics.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    axis_name: str | None = None
    stat_sets: Sequence[str] = ("",)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        *,
        use_running_average: bool,
        stats: str | None = None,
    ) -> jax.Array:
        """Normalises x [R, F] over its rows.

        Args:
          x: float [R, F].
          mask: bool [R], True for real rows (None: all rows are real).
          use_running_average: True in eval mode (normalise with the running statistics).
          stats: which set of running statistics to use/update (default: the first set).

        Returns:
          float [R, F], zero on masked rows.
        """
        features = x.shape[-1]
        names = tuple(self.stat_sets)
        stats = names[0] if stats is None else stats
        if stats not in names:
            raise ValueError(f"unknown statistics set {stats!r}; have {names}")
        if mask is None:
            mask = jnp.ones(x.shape[:1], bool)
        running = {
            name: (
                self.variable("batch_stats", _stat_name(name, "mean"), jnp.zeros, (features,)),
                self.variable("batch_stats", _stat_name(name, "var"), jnp.ones, (features,)),
            )
            for name in names
        }
        running_mean, running_var = running[stats]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        weights = mask.astype(x.dtype)[:, None]  # [R, 1]

        if use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            count = self._sum(jnp.sum(weights))
            mean = self._sum(jnp.sum(x * weights, axis=0)) / jnp.maximum(count, 1.0)  # [F]
            # Two passes (sum of squared deviations from the global mean) rather than
            # E[x²] − E[x]²: exact across devices and free of cancellation.
            centred = (x - mean) * weights
            var = self._sum(jnp.sum(centred * centred, axis=0)) / jnp.maximum(count, 1.0)
            if not self.is_initializing():
                unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
                has_rows = count > 0
                keep = 1.0 - self.momentum
                new_mean = keep * running_mean.value + self.momentum * lax.stop_gradient(mean)
                new_var = keep * running_var.value + self.momentum * lax.stop_gradient(unbiased)
                running_mean.value = jnp.where(has_rows, new_mean, running_mean.value)
                running_var.value = jnp.where(has_rows, new_var, running_var.value)

        y = (x - mean) * lax.rsqrt(var + self.epsilon) * scale + bias
        return jnp.where(mask[:, None], y, 0.0)

    def _sum(self, value: jax.Array) -> jax.Array:
        return value if self.axis_name is None else lax.psum(value, self.axis_name)


def _stat_name(stat_set: str, statistic: str) -> str:
    return f"{stat_set}_{statistic}" if stat_set else statistic


def node_padding_mask(graphs: jraph.GraphsTuple) -> jax.Array:
    """bool [N]: True for real nodes.

    The layout is jraph's `pad_with_graphs` with one trailing padding graph that holds every
    padding node, so the real nodes are the first sum(n_node[:-1]). Same result as
    `jraph.get_node_padding_mask` for that layout, but also jit-safe when the graph arrays are
    NumPy constants closed over by a traced function.
    """
    num_nodes = jax.tree.leaves(graphs.nodes)[0].shape[0]
    return jnp.arange(num_nodes) < jnp.sum(jnp.asarray(graphs.n_node)[:-1])


def edge_padding_mask(graphs: jraph.GraphsTuple) -> jax.Array:
    """bool [E]: True for real edges (see `node_padding_mask` for the layout)."""
    num_edges = graphs.senders.shape[0]
    return jnp.arange(num_edges) < jnp.sum(jnp.asarray(graphs.n_edge)[:-1])


def node_graph_index(graphs: jraph.GraphsTuple) -> jax.Array:
    """int32 [N]: the graph each node belongs to (static length, jit-safe)."""
    num_nodes = jax.tree.leaves(graphs.nodes)[0].shape[0]
    num_graphs = graphs.n_node.shape[0]
    return jnp.repeat(
        jnp.arange(num_graphs, dtype=jnp.int32),
        jnp.asarray(graphs.n_node),
        total_repeat_length=num_nodes,
    )


def segment_mean_pool(
    node_values: jax.Array, node_mask: jax.Array, graph_index: jax.Array, num_graphs: int
) -> jax.Array:
    """Mean of node_values [N, D] over the real nodes of each graph -> [G, D].

    Graphs without real nodes get zeros (no NaN in the value or the gradient).
    """
    weights = node_mask.astype(node_values.dtype)  # [N]
    totals = jax.ops.segment_sum(
        jnp.where(node_mask[:, None], node_values, 0.0), graph_index, num_segments=num_graphs
    )  # [G, D]
    counts = jax.ops.segment_sum(weights, graph_index, num_segments=num_graphs)  # [G]
    return totals / jnp.maximum(counts, 1.0)[:, None]


def masked_token_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of values [B, L, D] over the positions where mask [B, L] is true -> [B, D].

    Rows without any true position give zeros.
    """
    totals = jnp.sum(jnp.where(mask[..., None], values, 0.0), axis=1)  # [B, D]
    counts = jnp.sum(mask.astype(values.dtype), axis=1, keepdims=True)  # [B, 1]
    return totals / jnp.maximum(counts, 1.0)
