"""GIN molecule tower over OGB-style integer atom and bond features (jraph graphs).

The GIN of MoleculeSTM's `GNN` (OGB's `GINConv` with edge features, Hu et al. 2020):

    h⁰_i   = Σ_c AtomEmbed_c(x_ic)                      (one table per atom feature column)
    m_i    = Σ_{j→i} ReLU(hˡ_j + Σ_c BondEmbedˡ_c(e_jic))
    hˡ⁺¹_i = Dropout(ReLU(BN(MLP((1 + εˡ)·hˡ_i + m_i))))  (no ReLU after the last layer)
    MLP    = Dense(2d) → [BN] → ReLU → Dense(d)   (PyTorch-default Linear init)

ε is a learnable scalar initialised to 0 (as `self.eps = Parameter([0])` in OGB's GINConv); with
`learn_eps=False` it is the constant 0. JK = 'last'. Embedding tables are xavier-uniform.

The BatchNorm inside the MLP ([BN], `mlp_batch_norm`) is in OGB's and MoleculeSTM's GINConv but
off by default here (the project's design: MLP = Dense(2d) → ReLU → Dense(d)); turn it on to match
MoleculeSTM's layer exactly, e.g. to import its pretrained GIN.

Padding (jraph `pad_with_graphs` layout): BatchNorm statistics use real nodes only, padding edges
send no message, and padding node states are zero after every layer, so nothing about the padding
(its feature values, its size) can reach a real node.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

from jaxmol.models.layers import (
    MaskedBatchNorm,
    TorchDense,
    edge_padding_mask,
    node_padding_mask,
)


def _default_atom_dims() -> tuple[int, ...]:
    from jaxmol.data.featurize import ATOM_FEATURE_DIMS

    return ATOM_FEATURE_DIMS


def _default_bond_dims() -> tuple[int, ...]:
    from jaxmol.data.featurize import BOND_FEATURE_DIMS

    return BOND_FEATURE_DIMS


class CategoricalEmbedding(nn.Module):
    """Sum of one embedding table per integer feature column (OGB's Atom/BondEncoder).

    Attributes:
      vocab_sizes: vocabulary size of each column.
      features: embedding width.
    """

    vocab_sizes: Sequence[int]
    features: int

    @nn.compact
    def __call__(self, codes: jax.Array) -> jax.Array:
        """codes int [R, C] -> float [R, features]."""
        if codes.shape[-1] != len(self.vocab_sizes):
            raise ValueError(
                f"expected {len(self.vocab_sizes)} feature columns, got shape {codes.shape}"
            )
        total = jnp.zeros((*codes.shape[:-1], self.features), jnp.float32)
        for column, size in enumerate(self.vocab_sizes):
            table = nn.Embed(
                size,
                self.features,
                embedding_init=nn.initializers.xavier_uniform(),
                name=f"embed_{column}",
            )
            total = total + table(codes[..., column])
        return total


class GINLayer(nn.Module):
    """One GINConv with edge features, before normalisation (see the module docstring)."""

    features: int
    bond_vocab_sizes: Sequence[int]
    learn_eps: bool = True
    mlp_batch_norm: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(
        self,
        node_states: jax.Array,
        edge_codes: jax.Array,
        senders: jax.Array,
        receivers: jax.Array,
        node_mask: jax.Array,
        edge_mask: jax.Array,
        *,
        train: bool,
    ) -> jax.Array:
        """One layer.

        Args:
          node_states: [N, d].
          edge_codes: int [E, C] bond features.
          senders, receivers: int [E].
          node_mask: bool [N], False on padding nodes.
          edge_mask: bool [E], False on padding edges.
          train: batch statistics (True) or running statistics of the MLP's BatchNorm.

        Returns:
          [N, d].
        """
        num_nodes = node_states.shape[0]
        edge_states = CategoricalEmbedding(self.bond_vocab_sizes, self.features, name="bond")(
            edge_codes
        )  # [E, d]
        messages = nn.relu(node_states[senders] + edge_states)  # [E, d]
        messages = jnp.where(edge_mask[:, None], messages, 0.0)
        aggregated = jax.ops.segment_sum(messages, receivers, num_segments=num_nodes)  # [N, d]
        if self.learn_eps:
            eps = self.param("eps", nn.initializers.zeros, ())
        else:
            eps = 0.0
        hidden = (1.0 + eps) * node_states + aggregated
        hidden = TorchDense(2 * self.features, name="mlp_0")(hidden)
        if self.mlp_batch_norm:
            hidden = MaskedBatchNorm(axis_name=self.axis_name, name="mlp_norm")(
                hidden, node_mask, use_running_average=not train
            )
        hidden = nn.relu(hidden)
        return TorchDense(self.features, name="mlp_1")(hidden)


class GIN(nn.Module):
    """GIN encoder: per-node states of a padded jraph batch.

    Attributes:
      num_layers: message-passing layers (default 5).
      features: node state width d (default 300).
      dropout_rate: dropout after each layer in training (default 0, as MoMu).
      learn_eps: learnable ε (init 0) or the constant 0.
      mlp_batch_norm: BatchNorm between the two Dense layers of each MLP (MoleculeSTM/OGB).
      atom_vocab_sizes: vocabulary size per atom feature column (default OGB's 9 columns).
      bond_vocab_sizes: vocabulary size per bond feature column (default OGB's 3 columns).
      axis_name: device axis to sync BatchNorm statistics over (None: one device).
    """

    num_layers: int = 5
    features: int = 300
    dropout_rate: float = 0.0
    learn_eps: bool = True
    mlp_batch_norm: bool = False
    atom_vocab_sizes: Sequence[int] = ()
    bond_vocab_sizes: Sequence[int] = ()
    axis_name: str | None = None

    @nn.compact
    def __call__(self, graphs: jraph.GraphsTuple, *, train: bool) -> tuple[jax.Array, jax.Array]:
        """Encodes a padded batch of graphs.

        Args:
          graphs: nodes int32 [N, 9], edges int32 [E, 3], senders/receivers int32 [E],
            n_node/n_edge int32 [G]; the last graph holds the padding (jraph layout).
          train: batch statistics and dropout (True) or running statistics (False).

        Returns:
          node_states: float32 [N, d], zero on padding nodes.
          node_mask: bool [N], True for real nodes.
        """
        atom_dims = tuple(self.atom_vocab_sizes) or _default_atom_dims()
        bond_dims = tuple(self.bond_vocab_sizes) or _default_bond_dims()
        node_mask = node_padding_mask(graphs)  # [N]
        edge_mask = edge_padding_mask(graphs)  # [E]
        states = CategoricalEmbedding(atom_dims, self.features, name="atom")(graphs.nodes)
        states = jnp.where(node_mask[:, None], states, 0.0)  # [N, d]
        for layer in range(self.num_layers):
            states = GINLayer(
                self.features,
                bond_dims,
                learn_eps=self.learn_eps,
                mlp_batch_norm=self.mlp_batch_norm,
                axis_name=self.axis_name,
                name=f"conv_{layer}",
            )(
                states,
                graphs.edges,
                graphs.senders,
                graphs.receivers,
                node_mask,
                edge_mask,
                train=train,
            )
            states = MaskedBatchNorm(axis_name=self.axis_name, name=f"norm_{layer}")(
                states, node_mask, use_running_average=not train
            )
            if layer < self.num_layers - 1:
                states = nn.relu(states)
            states = nn.Dropout(self.dropout_rate, deterministic=not train)(states)
            states = jnp.where(node_mask[:, None], states, 0.0)
        return states, node_mask
