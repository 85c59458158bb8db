"""Training: state, optimiser, the fused per-device train step, and the training loop.

One jit-compiled program per batch shape does everything of a step: both towers, the projector
and head, the adversary, `jaxmol.losses.cmtmr_loss` on the *global* batch (embeddings are
all-gathered over the 'data' axis, so negatives come from every device), gradient averaging,
the optax update and the BatchNorm statistics. With ``loss.adversary='wgan_gp'`` the same program
first updates the critic (its own Adam) on stop-gradient features, then computes the generator
term with the updated critic, the order of the official code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import jraph
import ml_collections
import numpy as np
import optax
from jax import lax

from jaxmol import checkpointing, evaluation, losses
from jaxmol.config import validate_config
from jaxmol.data import batching, datasets
from jaxmol.data.tokenize import load_tokenizer
from jaxmol.models import bert
from jaxmol.models.retrieval import ModelConfig, RetrievalModel, count_params
from jaxmol.parallel import AXIS, DataParallel, select_devices

logger = logging.getLogger(__name__)


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


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step."""


# ----------------------------------------------------------------------------------------------
# Model and optimiser.


def text_model_dir(config: ml_collections.ConfigDict) -> str:
    return config.model.text_model_dir or bert.default_model_dir()


def bert_config_for(config: ml_collections.ConfigDict) -> bert.BertConfig:
    """The text tower's config: from the pretrained directory, or the small random one."""
    model_dir = text_model_dir(config)
    base = bert.BertConfig.from_json(os.path.join(model_dir, "config.json"))
    if config.model.text_init == "random":
        base = dataclasses.replace(base, **dict(config.model.text_random))
    return dataclasses.replace(
        base,
        hidden_dropout_prob=config.model.text_dropout,
        attention_probs_dropout_prob=config.model.text_dropout,
    )


def model_config_for(
    config: ml_collections.ConfigDict, axis_name: str | None = AXIS
) -> ModelConfig:
    m = config.model
    return ModelConfig(
        bert=bert_config_for(config),
        bert_frozen_layers=config.optim.freeze_bert_layers,
        mol_encoder=m.mol_encoder,
        gin_layers=m.gin_layers,
        gin_dim=m.gin_dim,
        gin_dropout=m.gin_dropout,
        # Added after the first checkpoints were written: older run configs lack the key.
        gin_mlp_batch_norm=m.get("gin_mlp_batch_norm", False),
        embed_dim=m.embed_dim,
        num_memory=m.num_memory,
        num_heads=m.num_heads,
        projector=m.projector,
        head_bn_stats=m.head_bn_stats,
        grl_scale=m.grl_scale,
        axis_name=axis_name,
    )


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
    """Adam (β 0.9/0.999, ε 1e-8, no weight decay) with per-group learning rates."""
    adam = functools.partial(optax.adam, b1=0.9, b2=0.999, eps=1e-8)
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
      example_chunk: one device's chunk of a batch (no leading device axis).
      total_steps: for the learning-rate schedule.
    """
    init_model = RetrievalModel(dataclasses.replace(model.config, axis_name=None))
    rng = jax.random.PRNGKey(config.seed)
    init_rng, state_rng = jax.random.split(rng)
    example_chunk = jax.tree.map(jnp.asarray, example_chunk)
    variables = jax.jit(
        lambda key, chunk: init_model.init(
            {"params": key, "dropout": key},
            chunk["text_ids"],
            chunk["text_mask"],
            chunk["graphs"],
            train=False,
        )
    )(init_rng, example_chunk)
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


def abstract_train_state(config: ml_collections.ConfigDict) -> tuple[RetrievalModel, TrainState]:
    """The eval model and the shapes/dtypes of the run's TrainState, computed abstractly (no
    weights are read, no arrays are made), as a restore target."""
    eval_model = RetrievalModel(model_config_for(config, axis_name=None))
    random_text = config.copy_and_resolve_references()
    with random_text.unlocked():
        random_text.model.text_init = "random"  # same shapes; never touches the weights file
        base = bert_config_for(config)
        random_text.model.text_random = {
            f.name: getattr(base, f.name)
            for f in dataclasses.fields(base)
            if f.name
            in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        }
    width = 9 if config.model.mol_encoder == "gin" else 1
    chunk = {
        "text_ids": jnp.zeros((2, 8), jnp.int32),
        "text_mask": jnp.ones((2, 8), jnp.int32),
        "graphs": jraph.GraphsTuple(
            nodes=jnp.zeros((4, width), jnp.int32),
            edges=jnp.zeros((2, 3), jnp.int32),
            senders=jnp.array([0, 1], jnp.int32),
            receivers=jnp.array([1, 0], jnp.int32),
            n_node=jnp.array([2, 1, 1], jnp.int32),
            n_edge=jnp.array([2, 0, 0], jnp.int32),
            globals=None,
        ),
    }
    abstract = jax.eval_shape(lambda: init_state(random_text, eval_model, chunk, total_steps=1)[0])
    return eval_model, abstract


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
# The per-device train step.


def make_train_step(
    config: ml_collections.ConfigDict,
    model: RetrievalModel,
    tx: optax.GradientTransformation,
    critic_tx: optax.GradientTransformation | None,
    *,
    return_grads: bool = False,
):
    """The per-device step `(state, chunk) -> (state, metrics)` over the device axis 'data'.

    With `return_grads`, metrics also holds the averaged gradient tree under 'grads' (tests).
    """
    loss_cfg = config.loss
    adversary = loss_cfg.adversary

    def gather(x):
        return lax.all_gather(x, AXIS, tiled=True)  # [b, ...] -> [B, ...]

    def step(state: TrainState, chunk: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.rng, state.step)
        # Dropout differs per device; the WGAN-GP interpolation must agree on every device.
        dropout_key = jax.random.fold_in(jax.random.fold_in(key, 1), lax.axis_index(AXIS))
        gp_key = jax.random.fold_in(key, 2)
        pair_mask = gather(chunk["pair_mask"])  # [B]

        def loss_fn(params):
            (z_txt, z_mol, extras), updated = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                chunk["text_ids"],
                chunk["text_mask"],
                chunk["graphs"],
                train=True,
                rngs={"dropout": dropout_key},
                mutable=["batch_stats"],
            )
            adversary_inputs: dict = {}
            critic_out: tuple = ()
            if adversary == "grl":
                adversary_inputs = dict(
                    disc_logits_txt=gather(extras["disc_logits_txt"]),
                    disc_logits_mol=gather(extras["disc_logits_mol"]),
                )
            elif adversary == "wgan_gp":
                critic_out, critic_logits_fake = _wgan_critic_update(
                    model, critic_tx, state, params, extras, gather, pair_mask, gp_key, loss_cfg
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


def _wgan_critic_update(model, critic_tx, state, params, extras, gather, pair_mask, key, cfg):
    """Official order: update the critic on stop-gradient features, then score the molecule
    features (with gradient) with the updated, stop-gradient critic."""
    real = gather(lax.stop_gradient(extras["pooled_txt"]))  # [B, d]
    fake = gather(lax.stop_gradient(extras["pooled_mol"]))  # [B, d]
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
    critic_logits_fake = critic_fn(new_critic, gather(extras["pooled_mol"]))  # [B]
    return (new_critic, critic_opt_state, {"critic_loss": critic_loss}), critic_logits_fake


# ----------------------------------------------------------------------------------------------
# The loop.


def _chunk0(batch: dict) -> dict:
    return jax.tree.map(lambda x: x[0], batch)


def _json_ready(value: Any) -> Any:
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    return json.loads(
        json.dumps(value, default=lambda x: list(x) if isinstance(x, tuple) else str(x))
    )


class MetricsLog:
    """Appends one JSON object per line to workdir/metrics.jsonl, and writes TensorBoard
    scalars to workdir/tensorboard when the optional `tensorboardX` package is installed."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            self._tensorboard = None
        else:
            self._tensorboard = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        record = {
            "step": int(step),
            "time": time.time(),
            **{k: _to_float(v) for k, v in values.items()},
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, float):
                    self._tensorboard.add_scalar(key, value, int(step))
            self._tensorboard.flush()


def _to_float(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from `workdir` when it holds a checkpoint), then evaluates.

    Returns:
      The final test metrics: {split: {'t2m': {...}, 'm2t': {...}}}.
    """
    validate_config(config)
    if config.distributed:
        jax.distributed.initialize()
    workdir_path = Path(workdir).expanduser().absolute()
    workdir_path.mkdir(parents=True, exist_ok=True)
    devices = select_devices(config.num_devices)
    runner = DataParallel(config.parallel, devices)
    if config.batch_size % runner.num_devices:
        raise ValueError(
            f"batch_size {config.batch_size} is not a multiple of the {runner.num_devices} devices"
        )

    tokenizer = load_tokenizer(text_model_dir(config), max_length=config.data.max_text_length)
    featurizer = "ogb" if config.model.mol_encoder == "gin" else "mol2vec"
    encode = functools.partial(
        batching.encode_split,
        tokenizer=tokenizer,
        featurizer=featurizer,
        on_invalid=config.data.on_invalid,
        cache_dir=config.data.cache_dir or None,
    )
    train_data = datasets.load_split(config.data.train_split)
    if config.data.max_train_pairs > 0:
        train_data = train_data.select(range(min(config.data.max_train_pairs, len(train_data))))
    train_split = encode(train_data)
    batcher = batching.PairBatcher(
        train_split,
        batch_size=config.batch_size,
        num_devices=runner.num_devices,
        seed=config.seed,
        group_by_length=config.data.group_by_length,
        text_buckets=config.data.text_buckets,
        single_graph_budget=config.data.single_graph_budget,
    )
    total_steps = (
        config.num_steps if config.num_steps > 0 else config.num_epochs * batcher.num_batches
    )

    model = RetrievalModel(model_config_for(config))
    example = _chunk0(batcher.make_batch(batcher.epoch_batches(0)[0]))
    state, tx, critic_tx = init_state(config, model, example, total_steps)
    logger.info("model parameters: %s", f"{count_params(state.params):,}")

    resolved = _json_ready(config)
    checkpointer = checkpointing.Checkpointer(
        workdir_path / "checkpoints",
        keep=config.keep_checkpoints,
        best_metric=config.best_metric,
    )
    position = batching.Position()
    latest = checkpointer.latest_step()
    if latest is not None:
        saved_config = checkpointer.restore_json(latest, "config")
        _check_resume_compatible(saved_config, resolved)
        state = checkpointer.restore_state(latest, state)
        position = batching.Position.from_dict(checkpointer.restore_json(latest, "data_position"))
        logger.info(
            "resumed from step %d (epoch %d, batch %d)", latest, position.epoch, position.step
        )
    checkpointing.write_json(workdir_path / "config.json", resolved)

    train_step = runner.run(
        make_train_step(config, model, tx, critic_tx),
        replicated_args=(0,),
        out_kinds=("replicated", "replicated"),
        donate_argnums=(0,),
    )
    state = runner.replicate(state)
    eval_model = RetrievalModel(model_config_for(config, axis_name=None))
    embedder = evaluation.Embedder(eval_model, runner)
    val_split = None
    if config.data.val_split:
        val_data = datasets.load_split(config.data.val_split)
        if config.data.max_eval_pairs > 0:
            val_data = val_data.select(range(min(config.data.max_eval_pairs, len(val_data))))
        val_split = encode(val_data)

    log = MetricsLog(workdir_path / "metrics.jsonl")
    step = int(runner.unreplicate(state).step)
    stream = batching.prefetch(batcher.iterate(position), size=config.data.prefetch)
    pending: list[tuple[int, Any]] = []  # (step, device metrics) not yet checked for NaN
    val_metrics: dict = {}
    interrupted = False
    previous_handler = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum, frame):
        nonlocal interrupted
        interrupted = True  # finish the current step, save, then stop

    signal.signal(signal.SIGINT, on_interrupt)
    progress = _progress_bar(total_steps, step)
    window_start, window_pairs = time.perf_counter(), 0
    try:
        while step < total_steps and not interrupted:
            position, batch = next(stream)
            state, metrics = train_step(state, runner.shard(batch))
            step += 1
            window_pairs += int(batch["pair_mask"].sum())
            pending.append((step, metrics))
            last_of_run = step == total_steps
            log_now = step % config.log_every_steps == 0 or last_of_run
            # Fetching (blocking) at least every 8 steps also avoids a known shard_map dispatch
            # deadlock on CPU.
            if len(pending) >= 8 or log_now:
                host = _check_finite(pending, runner)
                pending = []
                if log_now:
                    elapsed = time.perf_counter() - window_start
                    record = {**host, "pairs_per_s": window_pairs / max(elapsed, 1e-9)}
                    record["lr"] = float(
                        learning_rate_schedule(config, config.optim.lr, total_steps)(step - 1)
                    )
                    log.write(step, record)
                    progress.set_postfix(
                        loss=f"{host['loss']:.4f}", pairs_s=f"{record['pairs_per_s']:.1f}"
                    )
                    window_start, window_pairs = time.perf_counter(), 0
            progress.update(1)
            if val_split is not None and (step % config.eval_every_steps == 0 or last_of_run):
                val_metrics = _validate(embedder, runner, state, val_split, config)
                log.write(step, val_metrics)
                logger.info("step %d validation: %s", step, _short(val_metrics))
            if step % config.checkpoint_every_steps == 0 or last_of_run:
                _save(checkpointer, step, runner, state, position, resolved, val_metrics)
        if interrupted:
            if pending:
                _check_finite(pending, runner)
            if checkpointer.latest_step() != step:  # not saved by the loop already
                _save(checkpointer, step, runner, state, position, resolved, val_metrics)
            checkpointer.close()
            logger.warning("interrupted: saved a checkpoint at step %d", step)
            raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        progress.close()
    checkpointer.close()

    results = {}
    variables = evaluation.eval_variables(runner.unreplicate(state))
    for split_name in config.data.test_splits:
        results[split_name] = evaluation.evaluate_split(
            embedder,
            variables,
            split_name,
            protocol="pool",
            encode=encode,
            batch_size=config.eval_batch_size,
            max_pairs=config.data.max_eval_pairs,
            workdir=workdir_path,
            checkpoint_step=step,
        )
    print(evaluation.format_table(results))
    return results


def _short(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _progress_bar(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=2.0)


def _check_finite(pending: list, runner: DataParallel) -> dict:
    """Fetches pending step metrics; raises naming the first step whose loss is not finite."""
    host_values = None
    for step, metrics in pending:
        host_values = {k: float(np.asarray(runner.unreplicate(v))) for k, v in metrics.items()}
        if not math.isfinite(host_values["loss"]):
            terms = {k: v for k, v in host_values.items() if not math.isfinite(v)}
            raise NonFiniteLossError(
                f"loss is {host_values['loss']} at step {step} (non-finite terms: {terms}); "
                "stopping without saving this state"
            )
    return host_values


def _validate(embedder, runner, state, split, config) -> dict:
    variables = evaluation.eval_variables(runner.unreplicate(state))
    result = evaluation.pool_metrics(embedder, variables, split, batch_size=config.eval_batch_size)
    flat = {
        f"val/{direction}/{k}": v
        for direction in ("t2m", "m2t")
        for k, v in result[direction].items()
        if isinstance(v, (int, float))
    }
    flat["val/mean_mrr"] = 0.5 * (result["t2m"]["mrr"] + result["m2t"]["mrr"])
    return flat


def _save(checkpointer, step, runner, state, position, resolved, val_metrics) -> None:
    checkpointer.save(
        step,
        runner.unreplicate(state),
        data_position=position.to_dict(),
        config=resolved,
        metrics=val_metrics,
    )


# Settings that may change between a run and its resumption (they do not affect training).
_RESUME_FREE_KEYS = {
    "data.prefetch",
    "data.test_splits",
    "data.max_eval_pairs",
    "data.cache_dir",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval_batch_size",
    "parallel",
    "num_devices",
    "distributed",
}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _check_resume_compatible(saved: dict, current: dict) -> None:
    """A workdir resumes only with the same model, loss, optimiser, data and schedule; device
    count, parallel mode and logging cadence may change."""
    old, new = _flatten(saved), _flatten(current)
    differences = [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if key not in _RESUME_FREE_KEYS and old.get(key) != new.get(key)
    ]
    if differences:
        raise checkpointing.CheckpointError(
            "the workdir holds a checkpoint of a different run; use another --workdir or the "
            "same config. Differences: " + "; ".join(differences)
        )
