"""The official CMTMR molecule tower: a 3-layer GCN over mol2vec node features (spec §2.2).

    x⁰_i = mol2vec[row_i]                                  (fixed 300-d table, not trained)
    GCNConv: x'_i = Σ_{j ∈ N(i) ∪ {i}} (x_j W) / sqrt(deg_i · deg_j) + b,   deg = in-degree + 1
    300 → 600, ReLU → 600, ReLU → 600            (glorot W, zero b: PyG's defaults)
    per-node head: 600 → 600, ReLU → 600, ReLU → 300 → LayerNorm(eps 1e-5)   (PyTorch-default init)

The per-node head is the official `graph_proj_head`; it plays the role that the projector's
molecule projection plays for the GIN, so `RetrievalModel` skips that projection for this tower.

The mol2vec table is stored as the parameter `mol2vec_table` [V, 300], initialised from the
shipped Text2Mol table and used through `stop_gradient`: its gradient is exactly zero, so plain
Adam leaves it unchanged. An optimiser with weight decay must mask it (label it frozen); keeping
it in the params means a checkpoint is self-contained.

Padding: padding edges count in no degree and send no message; padding node states are zero.
"""

from __future__ import annotations

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np
from jax import lax

from jaxmol.models.layers import TorchDense, edge_padding_mask, node_padding_mask


def load_mol2vec_table(path: str | None = None) -> np.ndarray:
    """float32 [V, 300]: the mol2vec table (default: the Text2Mol table of the data folder in
    use, `jaxmol.data.featurize.default_mol2vec_table`)."""
    from jaxmol.data.featurize import default_mol2vec_table

    return _load_mol2vec_embeddings(str(Path(path) if path else default_mol2vec_table()))


@functools.lru_cache(maxsize=4)
def _load_mol2vec_embeddings(path: str) -> np.ndarray:
    """Cached by the resolved path, so moving the data folder is never masked by the cache."""
    from jaxmol.data.featurize import Mol2VecVocabulary

    return Mol2VecVocabulary.load(path).embeddings


class GCNConv(nn.Module):
    """PyG-style GCNConv with self-loops and symmetric normalisation, over a padded batch."""

    features: int

    @nn.compact
    def __call__(
        self,
        node_states: jax.Array,
        senders: jax.Array,
        receivers: jax.Array,
        edge_mask: jax.Array,
        inv_sqrt_degree: jax.Array,
    ) -> jax.Array:
        """One layer.

        Args:
          node_states: [N, F].
          senders, receivers, edge_mask: [E] (edge_mask float, 0 on padding edges).
          inv_sqrt_degree: [N], 1/sqrt(in-degree + 1).

        Returns:
          [N, features].
        """
        num_nodes = node_states.shape[0]
        transformed = nn.Dense(
            self.features,
            use_bias=False,
            kernel_init=nn.initializers.glorot_uniform(),
            name="linear",
        )(node_states)  # [N, features]
        edge_weight = inv_sqrt_degree[senders] * inv_sqrt_degree[receivers] * edge_mask  # [E]
        neighbours = jax.ops.segment_sum(
            transformed[senders] * edge_weight[:, None], receivers, num_segments=num_nodes
        )  # [N, features]
        self_loops = transformed * jnp.square(inv_sqrt_degree)[:, None]
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return neighbours + self_loops + bias


class GCNMol2Vec(nn.Module):
    """Official CMTMR GCN over mol2vec ids plus its per-node projection head.

    Attributes:
      hidden_features: GCN width (600).
      num_layers: GCNConv layers (3).
      out_features: width of the per-node head output (300).
      table_path: mol2vec .npz table (None: the shipped one).
    """

    hidden_features: int = 600
    num_layers: int = 3
    out_features: int = 300
    table_path: str | None = None

    @nn.compact
    def __call__(self, graphs: jraph.GraphsTuple, *, train: bool) -> tuple[jax.Array, jax.Array]:
        """Encodes a padded batch of graphs.

        Args:
          graphs: nodes int32 [N, 1] (mol2vec table rows), senders/receivers int32 [E],
            n_node/n_edge int32 [G]; the last graph holds the padding (jraph layout). Edge
            features are ignored.
          train: unused (the tower has no dropout or BatchNorm); kept for a uniform tower API.

        Returns:
          node_states: float32 [N, out_features], zero on padding nodes.
          node_mask: bool [N], True for real nodes.
        """
        del train
        table = self.param(
            "mol2vec_table",
            lambda key: jnp.asarray(load_mol2vec_table(self.table_path)),
        )
        table = lax.stop_gradient(table)  # [V, 300]
        node_mask = node_padding_mask(graphs)  # [N]
        edge_mask = edge_padding_mask(graphs).astype(jnp.float32)  # [E]
        num_nodes = node_mask.shape[0]
        rows = jnp.clip(graphs.nodes[:, 0], 0, table.shape[0] - 1)
        states = jnp.where(node_mask[:, None], table[rows], 0.0)  # [N, 300]

        in_degree = jax.ops.segment_sum(edge_mask, graphs.receivers, num_segments=num_nodes)
        inv_sqrt_degree = lax.rsqrt(in_degree + 1.0)  # [N]; the +1 is the self-loop
        for layer in range(self.num_layers):
            states = GCNConv(self.hidden_features, name=f"conv_{layer}")(
                states, graphs.senders, graphs.receivers, edge_mask, inv_sqrt_degree
            )
            if layer < self.num_layers - 1:
                states = nn.relu(states)
            states = jnp.where(node_mask[:, None], states, 0.0)

        states = nn.relu(TorchDense(self.hidden_features, name="head_0")(states))
        states = nn.relu(TorchDense(self.hidden_features, name="head_1")(states))
        states = TorchDense(self.out_features, name="head_2")(states)
        states = nn.LayerNorm(epsilon=1e-5, name="head_norm")(states)
        return jnp.where(node_mask[:, None], states, 0.0), node_mask
