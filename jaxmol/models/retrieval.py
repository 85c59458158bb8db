"""The CMTMR retrieval model: text and molecule towers, memory projector, shared head, adversary.

    text_ids, text_mask ─▶ txt (BERT) ─▶ projector.embed_text ──────┐ z_t, e_t
    graphs ─▶ mol (GIN | official GCN) ─▶ projector.embed_molecules ─┤ z_m, e_m
                                                                     ▼
    head (shared): z·exp(temp) → Linear → MaskedBatchNorm (own call per modality) → tanh → L2
    discriminator(gradient_reversal(e)) → one logit per row (text = 1, molecule = 0 targets)

Submodule names (the parameter tree): `txt`, `mol`, `projector`, `head`, `discriminator`.
BatchNorm running statistics live in the `batch_stats` collection (GIN layers and the head);
dropout uses the `dropout` rng. In training, call `apply(..., mutable=['batch_stats'])`.

Texts come either padded, one per row (`text_ids`, `text_mask` [b, L]), or packed several per
row (`PackedTexts`, from `jaxmol.data.batching.pack_texts`): BERT then runs on the R packed rows
with block-diagonal attention and per-text positions, and each pair's token states are gathered
back to [b, L] with its mask before the projector, so everything after BERT is the same code.

Row validity is read from the inputs: a text row is valid iff its mask has a real token; a
molecule is valid iff its graph has nodes (the trailing jraph padding graph is dropped). Invalid
rows give z = 0 and finite everything, take no part in any BatchNorm statistic, and do not
change any valid row. `init` needs both modalities, so that every parameter is created.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

from jaxmol.losses import gradient_reversal
from jaxmol.models.bert import BertConfig, BertEncoder
from jaxmol.models.gcn import GCNMol2Vec
from jaxmol.models.gin import GIN
from jaxmol.models.layers import MaskedBatchNorm, TorchDense, node_graph_index
from jaxmol.models.projector import Projector

# all-MiniLM-L6-v2, the default text tower (its weights come from `bert.load_pretrained`).
MINILM_BERT_CONFIG = BertConfig(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
)

MOL_ENCODERS = ("gin", "gcn_mol2vec")
PROJECTORS = ("memory", "pool")
HEAD_BN_STATS = ("per_modality", "shared")
DTYPES = ("float32", "bfloat16")


PACKED_TEXT_KEYS = (
    "text_segments",
    "text_positions",
    "text_row",
    "text_start",
    "text_length",
)


@flax.struct.dataclass
class PackedTexts:
    """The packing of one device chunk's texts (`jaxmol.data.batching.pack_texts`).

    The packed token ids themselves are `text_ids` [R, L].

    Attributes:
      segments: int32 [R, L], 0 = padding, k = the k-th text of the row.
      positions: int32 [R, L], each token's position within its own text.
      row: int32 [b], the packed row of pair i's text.
      start: int32 [b], its offset in that row.
      length: int32 [b], its tokens (0 = a padded pair).
    """

    segments: jax.Array
    positions: jax.Array
    row: jax.Array
    start: jax.Array
    length: jax.Array

    def mask(self, length: int) -> jax.Array:
        """int32 [b, length]: 1 on the first `self.length[i]` positions of pair i."""
        return (jnp.arange(length)[None, :] < self.length[:, None]).astype(jnp.int32)

    def unpack(self, states: jax.Array) -> jax.Array:
        """Packed per-token states [R, L, H] -> each pair's own tokens [b, L, H], zeros beyond
        its length (a padded pair is all zeros)."""
        R, L, H = states.shape
        offsets = jnp.arange(L)[None, :]  # [1, L]
        # Positions past a text's end point at whatever follows it; they are masked (zeroed),
        # and clipping keeps the index inside the row.
        index = self.row[:, None] * L + jnp.minimum(self.start[:, None] + offsets, L - 1)
        gathered = states.reshape(R * L, H)[index]  # [b, L, H]
        return jnp.where(self.mask(L)[..., None].astype(bool), gathered, 0.0)


def text_inputs(chunk: dict) -> tuple[jax.Array, jax.Array | None, PackedTexts | None]:
    """(text_ids, text_mask, packed) of a batch chunk, padded or packed: the first three
    arguments a `RetrievalModel` call takes for its texts (see `RetrievalModel.__call__`)."""
    if "text_segments" not in chunk:
        return chunk["text_ids"], chunk["text_mask"], None
    packed = PackedTexts(*(chunk[key] for key in PACKED_TEXT_KEYS))
    return chunk["text_ids"], None, packed


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every knob of `RetrievalModel`.

    Attributes:
      bert: the text tower's `BertConfig` (must match the imported weights).
      bert_frozen_layers: no gradient flows into the BERT embeddings and bottom k layers.
      mol_encoder: 'gin' (OGB features, default) or 'gcn_mol2vec' (official GCN on mol2vec rows).
      gin_layers, gin_dim, gin_dropout, gin_learn_eps: GIN depth, width, dropout rate, learnable ε.
      gin_mlp_batch_norm: BatchNorm inside each GIN MLP (as MoleculeSTM's GINConv; off by default).
      gcn_hidden, gcn_layers: width and depth of the official GCN.
      mol2vec_table: path of the mol2vec table for the GCN (None: the shipped one).
      embed_dim: d, the width of the shared space (300).
      num_memory: memory slots K (28).
      num_heads: heads of the shared cross-attention (4).
      projector: 'memory' (CMTMR) or 'pool' (masked mean pooling ablation).
      head_bn_stats: 'per_modality' (separate running statistics for texts and molecules, the
        default, docs/design.md §3) or 'shared' (one set, updated text then molecule: the
        official code).
      temperature_init: initial value of the learnable `temp` (z is scaled by exp(temp)).
      disc_hidden: hidden widths of the modality discriminator.
      disc_negative_slope: LeakyReLU slope of the discriminator.
      grl_scale: gradient-reversal scale between the pooled features and the discriminator.
      axis_name: device axis for exact cross-device BatchNorm statistics (None: one device).
      dtype: compute dtype of the text tower's matmuls, 'float32' or 'bfloat16' (for
        accelerators). Parameters, the BERT residual stream, LayerNorm and softmax, the towers'
        outputs, the projector, the head, the molecule tower and the losses stay float32.
    """

    bert: BertConfig = MINILM_BERT_CONFIG
    bert_frozen_layers: int = 0
    mol_encoder: str = "gin"
    gin_layers: int = 5
    gin_dim: int = 300
    gin_dropout: float = 0.0
    gin_learn_eps: bool = True
    gin_mlp_batch_norm: bool = False
    gcn_hidden: int = 600
    gcn_layers: int = 3
    mol2vec_table: str | None = None
    embed_dim: int = 300
    num_memory: int = 28
    num_heads: int = 4
    projector: str = "memory"
    head_bn_stats: str = "per_modality"
    temperature_init: float = 0.07
    disc_hidden: Sequence[int] = (512, 256)
    disc_negative_slope: float = 0.2
    grl_scale: float = 1.0
    axis_name: str | None = None
    dtype: str = "float32"

    def __post_init__(self):
        for field, value, allowed in (
            ("dtype", self.dtype, DTYPES),
            ("mol_encoder", self.mol_encoder, MOL_ENCODERS),
            ("projector", self.projector, PROJECTORS),
            ("head_bn_stats", self.head_bn_stats, HEAD_BN_STATS),
        ):
            if value not in allowed:
                raise ValueError(f"{field}={value!r}; expected one of {allowed}")
        # Sequences from a config system arrive as lists; tuples keep the config hashable.
        object.__setattr__(self, "disc_hidden", tuple(self.disc_hidden))


class SharedHead(nn.Module):
    """Shared output head: z·exp(temp) → Linear → BatchNorm → tanh → L2 normalisation.

    The Linear and the BatchNorm affine parameters are shared by both modalities; the BatchNorm
    is called once per modality, with its own running statistics ('per_modality': sets `txt` and
    `mol`) or one common set ('shared').

    Attributes:
      features: d.
      bn_stats: 'per_modality' or 'shared'.
      temperature_init: initial `temperature` (the official `temp`, 0.07).
      axis_name: device axis for the BatchNorm statistics.
    """

    features: int = 300
    bn_stats: str = "per_modality"
    temperature_init: float = 0.07
    axis_name: str | None = None

    def setup(self):
        self.temperature = self.param(
            "temperature", nn.initializers.constant(self.temperature_init), ()
        )
        self.linear = TorchDense(self.features)
        stat_sets = ("txt", "mol") if self.bn_stats == "per_modality" else ("",)
        self.norm = MaskedBatchNorm(axis_name=self.axis_name, stat_sets=stat_sets)

    def __call__(self, z: jax.Array, valid: jax.Array, *, modality: str, train: bool) -> jax.Array:
        """Maps z [b, d] of one modality ('txt' | 'mol') to unit vectors [b, d].

        Rows where valid [b] is False give zeros and take no part in the BatchNorm statistics.
        """
        z = z * jnp.exp(self.temperature)
        z = self.linear(z)
        stats = modality if self.bn_stats == "per_modality" else ""
        z = self.norm(z, valid, use_running_average=not train, stats=stats)
        z = jnp.tanh(z)
        # max(‖z‖, 1e-12) as the official F.normalize; clamping the squared norm keeps the
        # gradient finite at z = 0 (padded rows), where sqrt's derivative is infinite.
        norm = jnp.sqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), 1e-24))
        return jnp.where(valid[:, None], z / norm, 0.0)

    def get_temperature(self) -> jax.Array:
        return self.temperature


class ModalityDiscriminator(nn.Module):
    """MLP critic on pooled features: Linear → LeakyReLU → ... → Linear(1) (no sigmoid).

    Attributes:
      hidden: hidden widths (512, 256).
      negative_slope: LeakyReLU slope (0.2).
    """

    hidden: Sequence[int] = (512, 256)
    negative_slope: float = 0.2

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        """features [b, d] -> logits [b]."""
        x = features
        for i, width in enumerate(self.hidden):
            x = nn.leaky_relu(TorchDense(width, name=f"dense_{i}")(x), self.negative_slope)
        return TorchDense(1, name=f"dense_{len(self.hidden)}")(x)[:, 0]


class RetrievalModel(nn.Module):
    """CMTMR text–molecule retrieval model (see the module docstring).

    Attributes:
      config: a `ModelConfig`.
    """

    config: ModelConfig = ModelConfig()

    def setup(self):
        cfg = self.config
        self.txt = BertEncoder(
            cfg.bert, dtype=jnp.dtype(cfg.dtype), frozen_layers=cfg.bert_frozen_layers
        )
        if cfg.mol_encoder == "gin":
            self.mol = GIN(
                num_layers=cfg.gin_layers,
                features=cfg.gin_dim,
                dropout_rate=cfg.gin_dropout,
                learn_eps=cfg.gin_learn_eps,
                mlp_batch_norm=cfg.gin_mlp_batch_norm,
                axis_name=cfg.axis_name,
            )
        else:
            self.mol = GCNMol2Vec(
                hidden_features=cfg.gcn_hidden,
                num_layers=cfg.gcn_layers,
                out_features=cfg.embed_dim,
                table_path=cfg.mol2vec_table,
            )
        self.projector = Projector(
            features=cfg.embed_dim,
            num_memory=cfg.num_memory,
            num_heads=cfg.num_heads,
            mode=cfg.projector,
            # The official GCN ends with its own per-node head (graph_proj_head).
            project_nodes=cfg.mol_encoder == "gin",
        )
        self.head = SharedHead(
            features=cfg.embed_dim,
            bn_stats=cfg.head_bn_stats,
            temperature_init=cfg.temperature_init,
            axis_name=cfg.axis_name,
        )
        self.discriminator = ModalityDiscriminator(cfg.disc_hidden, cfg.disc_negative_slope)

    def __call__(
        self,
        text_ids: jax.Array | None,
        text_mask: jax.Array | None,
        graphs: jraph.GraphsTuple | None,
        *,
        train: bool,
        packed: PackedTexts | None = None,
    ) -> tuple[jax.Array | None, jax.Array | None, dict[str, Any]]:
        """Embeds a chunk of b pairs; either modality may be None.

        Args:
          text_ids: int32 [b, L] token ids, or None; with `packed`, the packed rows [R, L].
          text_mask: int32 [b, L], 1 for real tokens ([CLS]/[SEP] included); an all-zero row is
            a padded pair. None with `packed` (the mask comes from its lengths).
          graphs: padded `jraph.GraphsTuple` with b + 1 graphs (graph b is the jraph padding
            graph; a padded pair has 0 nodes), or None.
          train: dropout and batch statistics (True) or eval mode (False).
          packed: the packing of the texts (`text_inputs`), or None for padded texts.

        Returns:
          z_txt: [b, d] unit vectors (zeros on padded rows), or None.
          z_mol: [b, d] unit vectors (zeros on padded rows), or None.
          extras: 'temperature' (scalar) and, per present modality m in {'txt', 'mol'}:
            'pooled_m' [b, d] pre-memory pooled features (e_t / e_m),
            'disc_logits_m' [b] discriminator logits of gradient_reversal(pooled_m, grl_scale),
            'valid_m' bool [b] row validity.
        """
        extras: dict[str, Any] = {"temperature": self.head.get_temperature()}
        z_txt = z_mol = None
        if text_ids is not None:
            if (text_mask is None) == (packed is None):
                raise ValueError("text_ids need exactly one of text_mask and packed")
            z_txt, pooled, valid = self.embed_text(text_ids, text_mask, train=train, packed=packed)
            extras.update(pooled_txt=pooled, valid_txt=valid)
            extras["disc_logits_txt"] = self._adversary(pooled)
        if graphs is not None:
            z_mol, pooled, valid = self.embed_molecules(graphs, train=train)
            extras.update(pooled_mol=pooled, valid_mol=valid)
            extras["disc_logits_mol"] = self._adversary(pooled)
        return z_txt, z_mol, extras

    def embed_text(
        self,
        text_ids: jax.Array,
        text_mask: jax.Array | None,
        *,
        train: bool,
        packed: PackedTexts | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """-> (z_txt [b, d], pooled e_t [b, d], valid bool [b]).

        text_ids [b, L] with text_mask [b, L]; or packed rows text_ids [R, L] with `packed`
        (text_mask None), whose per-pair token states are gathered back to [b, L, H].
        """
        if packed is None:
            token_states = self.txt(text_ids, text_mask, deterministic=not train)  # [b, L, H]
        else:
            packed_states = self.txt(
                text_ids,
                packed.segments > 0,
                position_ids=packed.positions,
                segment_ids=packed.segments,
                deterministic=not train,
            )  # [R, L, H]
            token_states = packed.unpack(packed_states)  # [b, L, H]
            text_mask = packed.mask(text_ids.shape[1])  # [b, L]
        valid = text_mask.astype(bool).any(axis=-1)  # [b]
        z, pooled = self.projector.embed_text(token_states, text_mask)
        z = self.head(z, valid, modality="txt", train=train)
        return z, jnp.where(valid[:, None], pooled, 0.0), valid

    def embed_molecules(
        self, graphs: jraph.GraphsTuple, *, train: bool
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """-> (z_mol [b, d], pooled e_m [b, d], valid bool [b]) for the b real graph slots."""
        num_graphs = graphs.n_node.shape[0]  # b + 1
        node_states, node_mask = self.mol(graphs, train=train)  # [N, d_mol], [N]
        graph_index = node_graph_index(graphs)  # [N]
        z, pooled = self.projector.embed_molecules(
            node_states, node_mask, graph_index, num_graphs
        )  # [b + 1, d] each
        z, pooled = z[:-1], pooled[:-1]  # drop the jraph padding graph
        valid = graphs.n_node[:-1] > 0  # [b]
        z = self.head(z, valid, modality="mol", train=train)
        return z, jnp.where(valid[:, None], pooled, 0.0), valid

    def _adversary(self, pooled: jax.Array) -> jax.Array:
        return self.discriminator(gradient_reversal(pooled, self.config.grl_scale))

    def discriminate(self, features: jax.Array) -> jax.Array:
        """The discriminator alone, without gradient reversal: features [b, d] -> logits [b].

        For the WGAN-GP critic step:
        ``model.apply({'params': params}, feats, method=RetrievalModel.discriminate)``.
        """
        return self.discriminator(features)


def count_params(tree: Any) -> int:
    """Number of scalars in a (possibly abstract) parameter tree."""
    return sum(int(x.size) for x in jax.tree.leaves(tree))
