"""The fused train step (pure JAX, no I/O): state, optimiser, initialisation, per-device step.

One jit-compiled program per batch shape does everything of a step: both towers, the projector
and head, the adversary, `jaxmol.losses.cmtmr_loss` on the *global* batch (embeddings are
all-gathered over the 'data' axis, so negatives come from every device), gradient averaging,
the optax update and the BatchNorm statistics. With ``loss.adversary='wgan_gp'`` the same program
first updates the critic (its own Adam) on stop-gradient features, then computes the generator
term with the updated critic, the order of the official code. With ``loss.adversary='grl'`` the
discriminator reads gradient-reversed features, reversed with the scale of `grl_scale_at` (the
``loss.grl_schedule`` of the step).

`compile_train_step` turns the per-device step into the callable that training, the benchmark
and the tests run.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax

from jaxmol import losses
from jaxmol.builders import text_model_dir
from jaxmol.models import bert
from jaxmol.models.retrieval import RetrievalModel, text_inputs
from jaxmol.parallel import AXIS, DataParallel


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; one replicated copy per device.

    Attributes:
      step: int32 scalar, optimiser steps taken.
      params: the model parameters (`txt`, `mol`, `projector`, `head`, `discriminator`).
      batch_stats: BatchNorm running statistics.
      opt_state: the main optimiser's state.
      critic_opt_state: the WGAN-GP critic's Adam state (empty otherwise).
      rng: uint32 [2] base key; the step's key is fold_in(rng, step).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    critic_opt_state: Any
    rng: jax.Array

    def eval_variables(self) -> dict:
        """What an eval-mode forward needs: {'params', 'batch_stats'} (no optimiser state)."""
        return {"params": self.params, "batch_stats": self.batch_stats}


# ----------------------------------------------------------------------------------------------
# Optimiser and initialisation.


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def param_labels(params: Any, config: ml_collections.ConfigDict) -> Any:
    """Optimiser group of every parameter, from its path.

    'bert' (the text tower, BERT lr), 'frozen' (embeddings and the bottom
    `optim.freeze_bert_layers` BERT layers), 'critic' (the discriminator when it is a WGAN-GP
    critic with its own optimiser), 'rest' (everything else, lr).
    """
    frozen_layers = config.optim.freeze_bert_layers
    wgan = config.loss.adversary == "wgan_gp"

    def label(path, _):
        names = _path_names(path)
        if names[0] == "txt":
            index = bert.layer_index_of_path(names[1:])
            if frozen_layers > 0 and (
                names[1] == "embeddings" or (index is not None and index < frozen_layers)
            ):
                return "frozen"
            return "bert"
        if names[0] == "discriminator" and wgan:
            return "critic"
        if names[-1] == "mol2vec_table":  # a fixed lookup table, never trained
            return "frozen"
        return "rest"

    return jax.tree_util.tree_map_with_path(label, params)


def learning_rate_schedule(
    config: ml_collections.ConfigDict, peak: float, total_steps: int
) -> optax.Schedule:
    """Linear warm-up to `peak`, then linear decay to 0 (or constant).

    With ``optim.decay_ends_warmup_early`` the decay reaches 0 at ``total - warmup`` steps and
    stays there, as the official code (HF ``get_linear_schedule_with_warmup`` called with
    ``total - warmup`` training steps).
    """
    optim = config.optim
    if optim.schedule == "constant":
        return optax.constant_schedule(peak)
    warmup = optim.warmup_steps
    end = total_steps - warmup if optim.decay_ends_warmup_early else total_steps
    decay = max(end - warmup, 1)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak, max(warmup, 1)),
            optax.linear_schedule(peak, 0.0, decay),
        ],
        [warmup],
    )


def make_optimizer(
    config: ml_collections.ConfigDict, params: Any, total_steps: int
) -> optax.GradientTransformation:
    """Adam (β 0.9/0.999, ε ``optim.adam_eps`` = 1e-8, no weight decay) with per-group
    learning rates."""
    adam = functools.partial(optax.adam, b1=0.9, b2=0.999, eps=config.optim.adam_eps)
    return optax.multi_transform(
        {
            "bert": adam(learning_rate_schedule(config, config.optim.bert_lr, total_steps)),
            "rest": adam(learning_rate_schedule(config, config.optim.lr, total_steps)),
            "frozen": optax.set_to_zero(),
            "critic": optax.set_to_zero(),
        },
        param_labels(params, config),
    )


def make_critic_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The official critic optimiser: Adam, constant lr 1e-4, default betas."""
    return optax.adam(config.loss.critic_lr, b1=0.9, b2=0.999, eps=1e-8)


def init_state(
    config: ml_collections.ConfigDict,
    model: RetrievalModel,
    example_chunk: dict,
    total_steps: int,
) -> tuple[TrainState, optax.GradientTransformation, optax.GradientTransformation | None]:
    """Initialises parameters (importing pretrained BERT weights strictly) and optimisers.

    Args:
      config: the run config.
      model: the per-device model (its axis name is ignored for initialisation).
      example_chunk: one device's chunk of a batch (no leading device axis), texts padded or
        packed.
      total_steps: for the learning-rate schedule.
    """
    init_model = RetrievalModel(dataclasses.replace(model.config, axis_name=None))
    rng = jax.random.PRNGKey(config.seed)
    init_rng, state_rng = jax.random.split(rng)
    example_chunk = jax.tree.map(jnp.asarray, example_chunk)

    def init(key, chunk):
        text_ids, text_mask, packed = text_inputs(chunk)  # padded or packed: same parameters
        return init_model.init(
            {"params": key, "dropout": key},
            text_ids,
            text_mask,
            chunk["graphs"],
            train=False,
            packed=packed,
        )

    variables = jax.jit(init)(init_rng, example_chunk)
    params = flax.core.unfreeze(variables["params"])
    if config.model.text_init == "pretrained":
        _, pretrained = bert.load_pretrained(text_model_dir(config))
        params["txt"] = _merge_strict(params["txt"], pretrained)
    tx = make_optimizer(config, params, total_steps)
    critic_tx = make_critic_optimizer(config) if config.loss.adversary == "wgan_gp" else None
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=flax.core.unfreeze(variables.get("batch_stats", {})),
        opt_state=tx.init(params),
        critic_opt_state=critic_tx.init(params["discriminator"]) if critic_tx else (),
        rng=state_rng,
    )
    return state, tx, critic_tx


def _merge_strict(initialised: Any, pretrained: Any) -> Any:
    """Returns `pretrained` after checking it has exactly the structure and shapes of the
    text tower (a mismatch names every differing parameter)."""
    want = {
        jax.tree_util.keystr(p): x.shape
        for p, x in jax.tree_util.tree_flatten_with_path(initialised)[0]
    }
    have = {
        jax.tree_util.keystr(p): x.shape
        for p, x in jax.tree_util.tree_flatten_with_path(pretrained)[0]
    }
    problems = sorted(want.keys() ^ have.keys()) + [
        f"{k}: {have[k]} != {want[k]}"
        for k in sorted(want.keys() & have.keys())
        if have[k] != want[k]
    ]
    if problems:
        raise ValueError(
            "pretrained text weights do not fit the text tower: " + "; ".join(problems)
        )
    return jax.tree.map(jnp.asarray, pretrained)


# ----------------------------------------------------------------------------------------------
# The adversary.


def grl_scale_at(
    config: ml_collections.ConfigDict, step: Any, total_steps: int | None
) -> jax.Array:
    """The gradient-reversal scale of the step that starts at `step` steps taken.

    ``model.grl_scale`` times 1 (``loss.grl_schedule='constant'``) or times the DANN ramp
    `jaxmol.losses.dann_grl_scale` of the progress p = step / total_steps with
    γ = ``loss.grl_gamma`` (``'dann'``): 0 at the first step, 0.9999 (γ = 10) at the end.

    Args:
      config: the run config (keys missing from older configs take the defaults).
      step: int scalar (may be traced), optimiser steps taken before this one.
      total_steps: steps of the whole run; required for ``'dann'``.

    Returns:
      float32 scalar.
    """
    loss_cfg = config.loss
    base = jnp.asarray(config.model.grl_scale, jnp.float32)
    if loss_cfg.get("grl_schedule", "constant") == "constant":
        return base
    if not total_steps or total_steps <= 0:
        raise ValueError("loss.grl_schedule='dann' needs the run's total_steps (> 0)")
    progress = jnp.asarray(step, jnp.float32) / float(total_steps)
    return base * losses.dann_grl_scale(progress, loss_cfg.get("grl_gamma", 10.0))


def adversary_features(
    config: ml_collections.ConfigDict, z_txt: jax.Array, z_mol: jax.Array, extras: dict
) -> tuple[jax.Array, jax.Array]:
    """What the discriminator / critic reads (``loss.adv_features``), each [b, d]: the
    pre-memory pooled features e_t, e_m (``'pooled'``, official) or the final unit embeddings
    z_t, z_m (``'embeddings'``)."""
    if config.loss.get("adv_features", "pooled") == "embeddings":
        return z_txt, z_mol
    return extras["pooled_txt"], extras["pooled_mol"]


def grl_discriminator_logits(
    model: RetrievalModel,
    params: Any,
    features_txt: jax.Array,
    features_mol: jax.Array,
    scale: Any,
) -> tuple[jax.Array, jax.Array]:
    """Discriminator logits of gradient-reversed features.

    Forward: ``discriminator(features)``. Backward: the discriminator's parameters get the
    plain gradient of the loss on these logits, the features (hence the encoders) −scale
    times theirs (`jaxmol.losses.gradient_reversal`).

    Args:
      model: the `RetrievalModel` (only its discriminator is applied).
      params: the model parameters (at least ``{'discriminator': ...}``).
      features_txt: float [b, d] text features.
      features_mol: float [b, d] molecule features.
      scale: float scalar reversal scale (may be traced, e.g. `grl_scale_at`).

    Returns:
      (logits_txt [b], logits_mol [b]).
    """

    def discriminate(features: jax.Array) -> jax.Array:
        reversed_features = losses.gradient_reversal(features, scale)
        return model.apply(
            {"params": params}, reversed_features, method=RetrievalModel.discriminate
        )

    return discriminate(features_txt), discriminate(features_mol)


# ----------------------------------------------------------------------------------------------
# The per-device train step.


def with_compute_dtype(model: RetrievalModel, config: ml_collections.ConfigDict) -> RetrievalModel:
    """`model` computing in the run's ``model.dtype`` ('float32' when the key is absent).

    The compute dtype changes no parameter (shapes and float32 values are the same), so the
    state initialised with any dtype fits; the step applies it here so that every caller of
    `compile_train_step` gets it.
    """
    dtype = config.model.get("dtype", "float32")
    if model.config.dtype == dtype:
        return model
    return RetrievalModel(dataclasses.replace(model.config, dtype=dtype))


def make_train_step(
    config: ml_collections.ConfigDict,
    model: RetrievalModel,
    tx: optax.GradientTransformation,
    critic_tx: optax.GradientTransformation | None,
    *,
    return_grads: bool = False,
    total_steps: int | None = None,
):
    """The per-device step `(state, chunk) -> (state, metrics)` over the device axis 'data'.

    With `return_grads`, metrics also holds the averaged gradient tree under 'grads' (tests).
    `total_steps` (the run's steps) is needed by ``loss.grl_schedule='dann'`` only.
    """
    model = with_compute_dtype(model, config)
    loss_cfg = config.loss
    adversary = loss_cfg.adversary
    if adversary == "grl":
        grl_scale_at(config, 0, total_steps)  # fails now, not inside the trace

    def gather(x):
        return lax.all_gather(x, AXIS, tiled=True)  # [b, ...] -> [B, ...]

    def step(state: TrainState, chunk: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.rng, state.step)
        # Dropout differs per device; the WGAN-GP interpolation must agree on every device.
        dropout_key = jax.random.fold_in(jax.random.fold_in(key, 1), lax.axis_index(AXIS))
        gp_key = jax.random.fold_in(key, 2)
        pair_mask = gather(chunk["pair_mask"])  # [B]
        grl_scale = grl_scale_at(config, state.step, total_steps) if adversary == "grl" else None

        def loss_fn(params):
            text_ids, text_mask, packed = text_inputs(chunk)  # padded or packed texts
            (z_txt, z_mol, extras), updated = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                text_ids,
                text_mask,
                chunk["graphs"],
                train=True,
                packed=packed,
                rngs={"dropout": dropout_key},
                mutable=["batch_stats"],
            )
            adversary_inputs: dict = {}
            critic_out: tuple = ()
            features = adversary_features(config, z_txt, z_mol, extras)
            if adversary == "grl":
                logits_txt, logits_mol = grl_discriminator_logits(
                    model, params, *features, grl_scale
                )
                adversary_inputs = dict(
                    disc_logits_txt=gather(logits_txt),
                    disc_logits_mol=gather(logits_mol),
                    disc_label_smoothing=loss_cfg.get("disc_label_smoothing", 0.0),
                )
            elif adversary == "wgan_gp":
                critic_out, critic_logits_fake = _wgan_critic_update(
                    model, critic_tx, state, params, features, gather, pair_mask, gp_key, loss_cfg
                )
                adversary_inputs = dict(critic_logits_fake=critic_logits_fake)
            loss, terms = losses.cmtmr_loss(
                gather(z_txt),
                gather(z_mol),
                where=pair_mask,
                first_order=loss_cfg.first_order,
                margin=loss_cfg.margin,
                info_nce_temperature=loss_cfg.info_nce_temperature,
                kl_temperature=loss_cfg.kl_temperature,
                kl_similarity=loss_cfg.kl_similarity,
                kl_metric=loss_cfg.kl_metric,
                u2u_weight=loss_cfg.u2u_weight,
                u2c_weight=loss_cfg.u2c_weight,
                adversary=adversary,
                adv_weight=None if loss_cfg.adv_weight < 0 else loss_cfg.adv_weight,
                **adversary_inputs,
            )
            terms["temperature"] = extras["temperature"]
            if adversary == "grl":
                terms["grl_scale"] = grl_scale
            return loss, (terms, updated["batch_stats"], critic_out)

        (loss, (terms, batch_stats, critic_out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        # Every device computed the same global loss; its gradient w.r.t. the local
        # embeddings came back summed over devices, so the mean over devices is exact.
        grads = lax.pmean(grads, AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        critic_opt_state = state.critic_opt_state
        if adversary == "wgan_gp":
            new_critic, critic_opt_state, critic_terms = critic_out
            params = {**params, "discriminator": new_critic}
            terms.update(critic_terms)
        metrics = {
            **terms,
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
        }
        if return_grads:
            metrics["grads"] = grads
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            critic_opt_state=critic_opt_state,
        )
        return new_state, metrics

    return step


def _wgan_critic_update(model, critic_tx, state, params, features, gather, pair_mask, key, cfg):
    """Official order: update the critic on stop-gradient features, then score the molecule
    features (with gradient) with the updated, stop-gradient critic. `features` are the
    (text, molecule) features of `adversary_features`, [b, d] each."""
    features_txt, features_mol = features
    real = gather(lax.stop_gradient(features_txt))  # [B, d]
    fake = gather(lax.stop_gradient(features_mol))  # [B, d]
    critic_params = lax.stop_gradient(params["discriminator"])

    def critic_fn(cp, x):
        return model.apply(
            {"params": {**params, "discriminator": cp}}, x, method=RetrievalModel.discriminate
        )

    def critic_objective(cp):
        per_example, aux = losses.wgan_gp_critic_loss(
            functools.partial(critic_fn, cp),
            real,
            fake,
            key,
            gp_weight=cfg.gp_weight,
            where=pair_mask,
        )
        return losses.masked_mean(per_example, pair_mask), aux

    (critic_loss, _), critic_grads = jax.value_and_grad(critic_objective, has_aux=True)(
        critic_params
    )
    updates, critic_opt_state = critic_tx.update(
        critic_grads, state.critic_opt_state, critic_params
    )
    new_critic = lax.stop_gradient(optax.apply_updates(critic_params, updates))
    critic_logits_fake = critic_fn(new_critic, gather(features_mol))  # [B]
    return (new_critic, critic_opt_state, {"critic_loss": critic_loss}), critic_logits_fake


def compile_train_step(
    runner: DataParallel,
    config: ml_collections.ConfigDict,
    model: RetrievalModel,
    tx: optax.GradientTransformation,
    critic_tx: optax.GradientTransformation | None,
    *,
    return_grads: bool = False,
    donate_state: bool = True,
    total_steps: int | None = None,
) -> Callable:
    """The train step over all devices of `runner`: `(state, sharded batch) -> (state, metrics)`.

    The state is in the runner's replicated layout (`runner.replicate`), the batch in its
    split layout (`runner.shard`); both outputs are replicated. With `donate_state` the old
    state's buffers are reused for the new one (do not touch it after the call).
    `total_steps` (the run's steps) is needed by ``loss.grl_schedule='dann'`` only.
    """
    return runner.run(
        make_train_step(
            config, model, tx, critic_tx, return_grads=return_grads, total_steps=total_steps
        ),
        replicated_args=(0,),
        out_kinds=("replicated", "replicated"),
        donate_argnums=(0,) if donate_state else (),
    )
