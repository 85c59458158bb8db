"""Memory-bank feature projector of CMTMR (spec §2.3–2.4) and its mean-pooling ablation.

Per modality:

    text:      token states [b, L, H] → Linear(H→d) → LayerNorm            = H_t [b, L, d]
    molecule:  node states [N, d_mol] → Linear → ReLU → Linear → LayerNorm  = H_m [N, d]
               (GIN only; the GCN tower already ends with the official per-node head)
    pooled:    e = masked mean of H over the real tokens / atoms                  [b, d]
    memory:    z = mean_k MHA(query = M_k, key = value = H, key mask)             [b, d]

The memory M [K, d] (K = 28) and the 4-head attention are shared by both modalities. M is
initialised N(0, 1) with row 0 fixed at zero: the official `nn.Embedding(padding_idx=0)` keeps
that row zero with zero gradient, reproduced here by multiplying with a constant row mask.

Molecules are attended as a flat node array grouped by graph (segment softmax), so no molecule
is padded to the largest atom count. A text without real tokens or a graph without real nodes
gives z = e = 0, with finite gradients.

With ``mode='pool'`` the memory is unused and z = e (masked mean pooling of H).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxmol.models.layers import TorchDense, masked_token_mean, segment_mean_pool

_MASKED_LOGIT = -1e30  # finite, so an all-masked row has no inf - inf


class SharedCrossAttention(nn.Module):
    """Multi-head attention of learnable queries over a set of keys (PyTorch MHA semantics).

    `query`, `key`, `value` and `out` are Dense [d, d] layers with biases. Initialisation as
    PyTorch's `nn.MultiheadAttention`: the stacked q/k/v projection [3d, d] is xavier-uniform
    (bound sqrt(6 / 4d)) with zero biases; the output projection is U(±1/sqrt(d)) with a zero
    bias. Two entry points share these parameters: `attend_dense` (keys [b, L, d]) and
    `attend_segments` (keys = the flat node array, grouped by graph).

    Attributes:
      features: model width d.
      num_heads: attention heads (d must be divisible by it).
    """

    features: int
    num_heads: int = 4

    def setup(self):
        if self.features % self.num_heads:
            raise ValueError(f"features {self.features} not divisible by {self.num_heads} heads")
        bound = math.sqrt(6.0 / (4 * self.features))  # xavier on the stacked [3d, d] matrix

        def in_proj(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        zeros = nn.initializers.zeros
        self.query = TorchDense(self.features, kernel_init=in_proj, bias_init=zeros)
        self.key = TorchDense(self.features, kernel_init=in_proj, bias_init=zeros)
        self.value = TorchDense(self.features, kernel_init=in_proj, bias_init=zeros)
        self.out = TorchDense(self.features, bias_init=zeros)

    def _split_heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.num_heads, self.features // self.num_heads)

    def _queries(self, memory: jax.Array) -> jax.Array:
        head_dim = self.features // self.num_heads
        return self._split_heads(self.query(memory)) / math.sqrt(head_dim)  # [K, h, hd]

    def attend_dense(self, memory: jax.Array, keys: jax.Array, key_mask: jax.Array) -> jax.Array:
        """Attention of every memory slot over a padded sequence batch.

        Args:
          memory: [K, d] queries.
          keys: [b, L, d] token states (keys and values).
          key_mask: bool [b, L], True for real tokens.

        Returns:
          [b, K, d]; rows without any real token get the output bias only.
        """
        queries = self._queries(memory)  # [K, h, hd]
        key_heads = self._split_heads(self.key(keys))  # [b, L, h, hd]
        value_heads = self._split_heads(self.value(keys))  # [b, L, h, hd]
        logits = jnp.einsum("khd,blhd->bhkl", queries, key_heads)  # [b, h, K, L]
        visible = key_mask[:, None, None, :]  # [b, 1, 1, L]
        logits = jnp.where(visible, logits, _MASKED_LOGIT)
        peak = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
        unnormalised = jnp.exp(logits - peak) * visible  # [b, h, K, L]
        total = jnp.sum(unnormalised, axis=-1, keepdims=True)
        weights = unnormalised / jnp.maximum(total, 1e-30)
        mixed = jnp.einsum("bhkl,blhd->bkhd", weights, value_heads)  # [b, K, h, hd]
        return self.out(mixed.reshape(*mixed.shape[:2], self.features))

    def attend_segments(
        self,
        memory: jax.Array,
        nodes: jax.Array,
        node_mask: jax.Array,
        graph_index: jax.Array,
        num_graphs: int,
    ) -> jax.Array:
        """Attention of every memory slot over the nodes of each graph of a flat node array.

        The softmax of graph g runs over its real nodes only (max-subtracted per graph), so the
        result equals dense attention over that graph's nodes without padding them to a common
        length.

        Args:
          memory: [K, d] queries.
          nodes: [N, d] node states (keys and values).
          node_mask: bool [N], True for real nodes.
          graph_index: int [N], graph of each node.
          num_graphs: G (static).

        Returns:
          [G, K, d]; graphs without any real node get the output bias only.
        """
        queries = self._queries(memory)  # [K, h, hd]
        key_heads = self._split_heads(self.key(nodes))  # [N, h, hd]
        value_heads = self._split_heads(self.value(nodes))  # [N, h, hd]
        logits = jnp.einsum("khd,nhd->nhk", queries, key_heads)  # [N, h, K]
        visible = node_mask[:, None, None]  # [N, 1, 1]
        logits = jnp.where(visible, logits, _MASKED_LOGIT)
        peak = jax.ops.segment_max(logits, graph_index, num_segments=num_graphs)  # [G, h, K]
        peak = lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))  # empty graphs: -inf
        unnormalised = jnp.exp(logits - peak[graph_index]) * visible  # [N, h, K]
        total = jax.ops.segment_sum(unnormalised, graph_index, num_segments=num_graphs)
        # The weighted sum over each graph's nodes as one matmul with a graph one-hot [N, G]:
        # its largest intermediate is [G, h, K, N] rather than segment_sum's [N, h, K, hd].
        membership = jax.nn.one_hot(graph_index, num_graphs, dtype=nodes.dtype)  # [N, G]
        mixed = jnp.einsum(
            "ng,nhk,nhd->gkhd", membership, unnormalised, value_heads
        )  # [G, K, h, hd]
        mixed = mixed / jnp.maximum(total, 1e-30).transpose(0, 2, 1)[..., None]
        return self.out(mixed.reshape(*mixed.shape[:2], self.features))


class Projector(nn.Module):
    """Per-token / per-node projections, pooled features and the memory-bank projector.

    Attributes:
      features: output width d (300).
      num_memory: memory slots K (28).
      num_heads: attention heads (4).
      mode: 'memory' (CMTMR) or 'pool' (masked mean pooling; the memory is not created).
      project_nodes: apply the per-node molecule projection (False when the molecule tower
        already ends with its own per-node head, as the official GCN does).
    """

    features: int = 300
    num_memory: int = 28
    num_heads: int = 4
    mode: str = "memory"
    project_nodes: bool = True

    def setup(self):
        if self.mode not in ("memory", "pool"):
            raise ValueError(f"projector mode must be 'memory' or 'pool', got {self.mode!r}")
        self.text_linear = TorchDense(self.features)
        self.text_norm = nn.LayerNorm(epsilon=1e-5)
        if self.project_nodes:
            self.node_linear_0 = TorchDense(self.features)
            self.node_linear_1 = TorchDense(self.features)
            self.node_norm = nn.LayerNorm(epsilon=1e-5)
        if self.mode == "memory":
            self.memory = self.param("memory", self._memory_init, (self.num_memory, self.features))
            self.attention = SharedCrossAttention(self.features, self.num_heads)

    @staticmethod
    def _memory_init(key, shape, dtype=jnp.float32):
        return jax.random.normal(key, shape, dtype).at[0].set(0.0)

    def _memory_slots(self) -> jax.Array:
        # Slot 0 is constant zero, like the official padding_idx=0 row; multiplying by a
        # constant mask also zeroes its gradient.
        keep = jnp.ones((self.num_memory, 1), jnp.float32).at[0].set(0.0)
        return self.memory * keep  # [K, d]

    def project_text(self, token_states: jax.Array) -> jax.Array:
        """Per-token projection: [b, L, H] -> H_t [b, L, d]."""
        return self.text_norm(self.text_linear(token_states))

    def project_molecule(self, node_states: jax.Array) -> jax.Array:
        """Per-node projection: [N, d_mol] -> H_m [N, d] (identity if project_nodes is False)."""
        if not self.project_nodes:
            return node_states
        hidden = nn.relu(self.node_linear_0(node_states))
        return self.node_norm(self.node_linear_1(hidden))

    def embed_text(
        self, token_states: jax.Array, text_mask: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Text side of the projector.

        Args:
          token_states: [b, L, H] last hidden states of the text tower.
          text_mask: [b, L], nonzero for real tokens ([CLS] and [SEP] included).

        Returns:
          z: [b, d] memory-projected (or pooled) features, 0 for rows without real tokens.
          pooled: [b, d] e_t, the masked mean of H_t (the adversary's input).
        """
        mask = text_mask.astype(bool)  # [b, L]
        projected = self.project_text(token_states)  # [b, L, d]
        pooled = masked_token_mean(projected, mask)  # [b, d]
        if self.mode == "pool":
            return pooled, pooled
        slots = self.attention.attend_dense(self._memory_slots(), projected, mask)  # [b, K, d]
        z = jnp.mean(slots, axis=1)  # [b, d]
        return jnp.where(mask.any(axis=-1)[:, None], z, 0.0), pooled

    def embed_molecules(
        self,
        node_states: jax.Array,
        node_mask: jax.Array,
        graph_index: jax.Array,
        num_graphs: int,
    ) -> tuple[jax.Array, jax.Array]:
        """Molecule side of the projector.

        Args:
          node_states: [N, d_mol] per-node states of the molecule tower.
          node_mask: bool [N], True for real nodes.
          graph_index: int [N], graph of each node.
          num_graphs: G (static).

        Returns:
          z: [G, d] memory-projected (or pooled) features, 0 for graphs without real nodes.
          pooled: [G, d] e_m, the mean of H_m over each graph's real nodes.
        """
        projected = self.project_molecule(node_states)  # [N, d]
        projected = jnp.where(node_mask[:, None], projected, 0.0)
        pooled = segment_mean_pool(projected, node_mask, graph_index, num_graphs)  # [G, d]
        if self.mode == "pool":
            return pooled, pooled
        slots = self.attention.attend_segments(
            self._memory_slots(), projected, node_mask, graph_index, num_graphs
        )  # [G, K, d]
        z = jnp.mean(slots, axis=1)  # [G, d]
        has_nodes = jax.ops.segment_sum(node_mask.astype(jnp.int32), graph_index, num_graphs) > 0
        return jnp.where(has_nodes[:, None], z, 0.0), pooled

    def __call__(self, token_states, text_mask, node_states, node_mask, graph_index, num_graphs):
        """Both sides at once (used for `init`); see `embed_text` and `embed_molecules`."""
        return (
            self.embed_text(token_states, text_mask),
            self.embed_molecules(node_states, node_mask, graph_index, num_graphs),
        )
