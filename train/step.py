"""The train step: one jit-compiled function from (state, batch) to (new state, metrics).

- float32 master params; the forward runs in the model config's `dtype` (bfloat16 on chips).
- loss = sum of per-token cross-entropy over target tokens / number of target tokens in the
  whole (global) batch: a token-level mean, not a mean of per-sequence means. Optional z-loss
  adds z * mean(logsumexp(logits)^2) over the same tokens.
- Gradient accumulation splits the batch into `grad_accum` microbatches inside the step and sums
  token-level sums, so N x b microbatches give the same update as one batch of N*b.
- AdamW (Optax) after global-norm clipping; weight decay on every matrix (embeddings and output
  included, as Megatron and most LLaMA re-implementations do) but never on the RMSNorm weights.
- Under a mesh, the state keeps the parameters' logical-axis shardings (optimizer moments shard
  like their parameters), the batch is split over ("data", "fsdp"), and the state is donated.
- LoRA (`cfg.lora_rank > 0`): the state's params are the adapters only; the frozen base (float or
  quantised) is a separate, non-donated argument `step(state, batch, base)`, so no gradient,
  moment or checkpoint of it exists. Dropout keys are fold_in(key(seed), step, microbatch): a
  resumed run draws the same masks.
- Preference objectives (`objective` dpo | orpo | simpo | reward, train/objectives.py): the batch
  holds pairs of sequences, (B, 2, T) each (+ margin (B,), DPO's reference log-probs (B, 2)); the
  loss is the mean over pairs of the objective's per-pair loss, accumulated the same way (sums over
  microbatches / pairs in the global batch). A reward model's params are the backbone + its head.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax import lora, reward
from llama_jax.config import LlamaConfig
from llama_jax.model import Llama, param_axes, param_shapes
from sharding import batch_sharding, tree_shardings
from train import objectives

State = dict  # {"params": pytree (the adapters for LoRA), "opt_state": optax state, "step": int32 scalar}
BATCH_KEYS = ("tokens", "targets", "weights", "positions", "segment_ids")


def lr_schedule(lr: float, steps: int, schedule: str = "cosine", warmup_steps: int = 0,
                min_lr_ratio: float = 0.1) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine or linear down to lr * min_lr_ratio at `steps` (or constant)."""
    warmup_steps = min(warmup_steps, steps)
    if schedule == "constant":
        after = optax.constant_schedule(lr)
    elif schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, max(steps - warmup_steps, 1), alpha=min_lr_ratio)
    elif schedule == "linear":  # HF Trainer's default (alpaca-lora)
        after = optax.linear_schedule(lr, lr * min_lr_ratio, max(steps - warmup_steps, 1))
    else:
        raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}")
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after], [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: everything except the RMSNorm weights."""
    def decays(path, _):
        return not any("norm" in str(getattr(k, "key", k)) for k in path)
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(schedule: optax.Schedule, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-5,
                   weight_decay: float = 0.1, clip_norm: float = 1.0) -> optax.GradientTransformation:
    """Global-norm clipping (clip_norm > 0) then AdamW with the decay mask."""
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm > 0 else adamw


def token_sums(params: Any, batch: dict, cfg: LlamaConfig, z_loss: float, base: Any = None,
               dropout_rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Sum over target tokens of cross-entropy (+ z-loss), and the counts the metrics need.

    `params` are what is differentiated: the whole model, or (LoRA) the adapters beside `base`."""
    variables = {"params": params if base is None else lora.combine(base, params)}
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    logits = Llama(cfg).apply(variables, batch["tokens"], batch["positions"], batch["segment_ids"], rngs=rngs)
    logits = logits.astype(jnp.float32)
    w = batch["weights"]
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    ce = jnp.sum((lse - target_logit) * w)
    z = jnp.sum(jnp.square(lse) * w)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == batch["targets"]) * w)
    return ce + z_loss * z, {"ce": ce, "z": z, "correct": correct, "count": jnp.sum(w)}


def train_step(state: State, batch: dict, base: Any = None, *, cfg: LlamaConfig,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule, grad_accum: int = 1,
               z_loss: float = 0.0, seed: int = 0, objective: str = "sft", beta: float = 0.0,
               simpo_gamma: float = 0.0) -> tuple[State, dict]:
    """One optimizer update on a global batch, as `grad_accum` microbatches (LoRA: of the adapters on `base`)."""
    params = state["params"]
    if objective == "sft":
        def loss_sums(p, mb, rng):
            return token_sums(p, mb, cfg, z_loss, base, rng)
    else:
        def loss_sums(p, mb, rng):
            return objectives.pair_sums(p, mb, cfg, objective, beta, simpo_gamma, base, rng)
    grad_fn = jax.grad(loss_sums, has_aux=True)
    step_key = jax.random.fold_in(jax.random.key(seed), state["step"])

    def dropout_rng(j: Any) -> jax.Array | None:
        return jax.random.fold_in(step_key, j) if cfg.lora_rank and cfg.lora_dropout else None

    if grad_accum == 1:
        grads, sums = grad_fn(params, batch, dropout_rng(0))
    else:
        # Microbatch j = rows j, j+A, j+2A, ...: each device keeps its own rows (no reshuffle).
        micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, grad_accum, *x.shape[1:]), 0, 1), batch)

        def body(carry, j_mb):
            j, mb = j_mb
            g, s = grad_fn(params, mb, dropout_rng(j))
            return jax.tree.map(jnp.add, carry, (g, s)), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first, None))
        (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
    count = jnp.maximum(sums["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    if objective == "sft":
        metrics = {"loss": sums["ce"] / count, "z_loss": sums["z"] / count, "accuracy": sums["correct"] / count,
                   "target_tokens": sums["count"]}
    else:
        metrics = objectives.pair_metrics(sums)
    metrics.update(grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(new_params),
                   lr=schedule(state["step"]))
    return {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


def init_state(params: Any, optimizer: optax.GradientTransformation) -> State:
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


def trainable_layout(cfg: LlamaConfig, objective: str = "sft") -> tuple[Any, Any]:
    """(logical axes, shapes) of what the step trains: every param (a reward model's: backbone and
    head), or (LoRA) the adapters."""
    if objective == "reward":
        return reward.param_layout(cfg)
    if cfg.lora_rank:
        return lora.adapter_layout(cfg)
    return param_axes(cfg), param_shapes(cfg)


def batch_layout(objective: str, batch: int, seq: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of each array of a global batch: (batch, seq) rows for SFT, (batch, 2, seq)
    pairs (+ margin, and DPO's reference log-probs) for the preference objectives."""
    rows = (batch, seq) if objective == "sft" else (batch, 2, seq)
    out = {k: jax.ShapeDtypeStruct(rows, jnp.float32 if k == "weights" else jnp.int32) for k in BATCH_KEYS}
    if objective != "sft":
        out["margin"] = jax.ShapeDtypeStruct((batch,), jnp.float32)
    if objective == "dpo":
        out["reference"] = jax.ShapeDtypeStruct((batch, 2), jnp.float32)
    return out


def state_shardings(cfg: LlamaConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    objective: str = "sft") -> State:
    """NamedShardings of the whole train state: moments like their params, scalars replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    axes, shapes = trainable_layout(cfg, objective)
    params = tree_shardings(axes, shapes, mesh)
    opt_shapes = jax.eval_shape(optimizer.init, shapes)
    opt = optax.tree_map_params(optimizer, lambda _, s: s, opt_shapes, params,
                                transform_non_params=lambda _: replicated)
    return {"params": params, "opt_state": opt, "step": replicated}


def make_train_step(cfg: LlamaConfig, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh, batch_shape: tuple, grad_accum: int = 1, z_loss: float = 0.0,
                    base_dtype: str = "bfloat16", seed: int = 0, objective: str = "sft", beta: float = 0.0,
                    simpo_gamma: float = 0.0) -> Callable:
    """The jit-compiled step with explicit in/out shardings and the state donated.

    Full fine-tuning: step(state, batch). LoRA: step(state, batch, base), the base laid out as
    `lora.base_layout(cfg, base_dtype)` says (lj.load_checkpoint(..., mesh=) places it so).
    batch_shape is (batch, seq); a preference objective's batch is `batch_layout`'s pairs.
    Call it inside `with jax.set_mesh(mesh):` so the model's activation constraints apply.
    """
    state_sh = state_shardings(cfg, optimizer, mesh, objective)
    batch_sh = {k: batch_sharding(mesh, len(s.shape)) for k, s in batch_layout(objective, *batch_shape).items()}
    replicated = NamedSharding(mesh, PartitionSpec())
    fn = functools.partial(train_step, cfg=cfg, optimizer=optimizer, schedule=schedule, grad_accum=grad_accum,
                           z_loss=z_loss, seed=seed, objective=objective, beta=beta, simpo_gamma=simpo_gamma)
    in_shardings = (state_sh, batch_sh)
    if cfg.lora_rank:
        in_shardings += (tree_shardings(*lora.base_layout(cfg, base_dtype), mesh),)
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=(state_sh, replicated), donate_argnums=0)


def warmup_steps_for(steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    return warmup_steps if warmup_steps is not None else int(math.ceil(warmup_ratio * steps))
