"""Preference objectives on pairs: DPO, SimPO, ORPO and Llama 2's reward-model loss, as sums of
per-pair losses that the train step accumulates over microbatches (train/step.py), with the
metrics TRL reports.

A pair batch (train/data/pairs.py) holds (B, 2, T) tokens / targets / weights / positions /
segment_ids, [:, 0] the chosen and [:, 1] the rejected sequence, a margin (B,) and for DPO the
reference log-probs (B, 2). logp(y) is the sum of log pi(target) over an answer's tokens (weight
1: the answer and its EOS, never the prompt), in float32; |y| their number.

- dpo (Rafailov et al., 2023): r(y) = beta (logp(y) - logp_ref(y)); loss = -log sigmoid(r_c - r_r).
- simpo (Meng et al., 2024): r(y) = beta logp(y) / |y|; loss = -log sigmoid(r_c - r_r - gamma).
- orpo (Hong et al., 2024): a(y) = logp(y) / |y|, log odds(y) = a(y) - log(1 - exp(a(y)));
  loss = -a(y_c) - beta log sigmoid(log odds(y_c) - log odds(y_r)); r(y) = beta a(y) (TRL's report).
  The SFT term is the chosen answer's mean NLL per pair (the paper's expectation over pairs; TRL
  averages over all the batch's chosen tokens instead, which weights long answers more).
- reward (Llama 2, Touvron et al., 2023, eq. 1): r(y) = the reward model's score of prompt + y;
  loss = -log sigmoid(r_c - r_r - m), m the pair's margin (0 without one).
The metrics are means over pairs: loss, rewards_chosen, rewards_rejected, reward_accuracy
(r_c > r_r), reward_margin (r_c - r_r), and logps_chosen / logps_rejected for the LM objectives.
Pairs without answer tokens (the empty rows that pad a validation batch) count for nothing.

The DPO reference is the model training starts from, scored once over the whole data set before
the first step (`make_reference_fn`; train/loop.py stores the result in the run folder, so a
resumed run reads the same numbers): no second copy of the model is held while training. For
LoRA runs it is the frozen base alone (the adapters start at zero: the same model).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax import lora, reward
from llama_jax.config import LlamaConfig
from llama_jax.model import Llama

PAIR_OBJECTIVES = ("dpo", "orpo", "simpo", "reward")
SEQUENCE_KEYS = ("tokens", "targets", "weights", "positions", "segment_ids")  # (B, 2, T) each


def _flat(batch: dict, key: str) -> jax.Array:
    x = batch[key]
    return x.reshape(-1, x.shape[-1])


def sequence_logps(params: Any, batch: dict, cfg: LlamaConfig, base: Any = None,
                   dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(logp, |y|) per sequence, both (B, 2) float32: sums of log-probs of the weighted targets and
    their count. `params` are what is differentiated (LoRA: the adapters beside `base`)."""
    variables = {"params": params if base is None else lora.combine(base, params)}
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    logits = Llama(cfg).apply(variables, _flat(batch, "tokens"), _flat(batch, "positions"),
                              _flat(batch, "segment_ids"), rngs=rngs).astype(jnp.float32)
    targets, w = _flat(batch, "targets"), _flat(batch, "weights")
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logp = jnp.sum((target_logit - jax.nn.logsumexp(logits, axis=-1)) * w, axis=-1)
    shape = batch["weights"].shape[:2]
    return logp.reshape(shape), jnp.sum(w, axis=-1).reshape(shape)


def sequence_rewards(params: Any, batch: dict, cfg: LlamaConfig) -> jax.Array:
    """The reward model's score of each sequence (B, 2), at its last token."""
    segments = _flat(batch, "segment_ids")
    lengths = jnp.sum(segments > 0, axis=-1)
    scores = reward.rewards(params, _flat(batch, "tokens"), lengths, cfg, _flat(batch, "positions"), segments)
    return scores.reshape(batch["weights"].shape[:2])


def pair_losses(objective: str, logp: jax.Array, counts: jax.Array, beta: float, simpo_gamma: float = 0.0,
                reference: jax.Array | None = None, margin: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(loss (B,), rewards (B, 2)) of each pair from its sequences' log-probs (or, for `reward`, the
    reward model's scores in `logp`); the formulas of the module docstring."""
    safe = jnp.maximum(counts, 1.0)
    if objective == "dpo":
        rewards = beta * (logp - reference)
        return -jax.nn.log_sigmoid(rewards[:, 0] - rewards[:, 1]), rewards
    if objective == "simpo":
        rewards = beta * logp / safe
        return -jax.nn.log_sigmoid(rewards[:, 0] - rewards[:, 1] - simpo_gamma), rewards
    if objective == "orpo":
        mean = logp / safe
        log_odds = mean - jnp.log1p(-jnp.exp(jnp.minimum(mean, -1e-7)))  # mean < 0 always; exactly 0 would be log 0
        ratio = jax.nn.log_sigmoid(log_odds[:, 0] - log_odds[:, 1])
        return -mean[:, 0] - beta * ratio, beta * mean
    if objective == "reward":
        return -jax.nn.log_sigmoid(logp[:, 0] - logp[:, 1] - margin), logp
    raise ValueError(f"objective {objective!r} is not one of {PAIR_OBJECTIVES}")


def pair_sums(params: Any, batch: dict, cfg: LlamaConfig, objective: str, beta: float, simpo_gamma: float = 0.0,
              base: Any = None, dropout_rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Sum over the batch's pairs of the objective's loss, and the sums the metrics need ("count":
    the pairs that hold answer tokens on both sides)."""
    counts = jnp.sum(batch["weights"], axis=-1)  # (B, 2)
    if objective == "reward":
        logp = sequence_rewards(params, batch, cfg)
    else:
        logp, counts = sequence_logps(params, batch, cfg, base, dropout_rng)
    losses, rewards = pair_losses(objective, logp, counts, beta, simpo_gamma, batch.get("reference"),
                                  batch["margin"])
    valid = jnp.all(counts > 0, axis=-1).astype(jnp.float32)
    margin = rewards[:, 0] - rewards[:, 1]
    sums = {"loss": jnp.sum(losses * valid), "rewards_chosen": jnp.sum(rewards[:, 0] * valid),
            "rewards_rejected": jnp.sum(rewards[:, 1] * valid), "reward_accuracy": jnp.sum((margin > 0) * valid),
            "reward_margin": jnp.sum(margin * valid), "target_tokens": jnp.sum(counts), "count": jnp.sum(valid)}
    if objective != "reward":
        sums.update(logps_chosen=jnp.sum(logp[:, 0] * valid), logps_rejected=jnp.sum(logp[:, 1] * valid))
    return sums["loss"], sums


def pair_metrics(sums: dict) -> dict:
    """Means over pairs of `pair_sums`' sums (target_tokens stays a total)."""
    count = jnp.maximum(sums["count"], 1.0)
    return {k: (v if k == "target_tokens" else v / count) for k, v in sums.items() if k != "count"}


def make_reference_fn(cfg: LlamaConfig, mesh: Mesh) -> Callable:
    """The jitted (params, pair batch) -> reference log-probs (B, 2), replicated on every host. For a
    LoRA config `params` is the frozen base and the adapters are left out."""
    plain = lora.without_lora(cfg) if cfg.lora_rank else cfg
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(lambda params, batch: sequence_logps(params, batch, plain)[0], out_shardings=replicated)
