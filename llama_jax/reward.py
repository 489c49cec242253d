"""The reward model: the Llama backbone with a scalar head in place of the LM output, as Llama 2's.

reward(x) = score . h(x)[last token], h the final normed hidden states (`Llama(...,
return_hidden=True)`), score a (dim,) vector: transformers' LlamaForSequenceClassification with
num_labels=1 (its `score` Linear has no bias) pooled at the last token of each sequence, as TRL's
reward trainer and the Llama 2 paper use it. The params are the LM's without `output` plus
`score` (logical axis `embed`). A checkpoint records its head in config.json ("head": "reward"):
`lj.load_checkpoint(path)` refuses it (it is no language model), `lj.load_checkpoint(path,
head="reward")` loads it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig
from llama_jax.model import Llama, param_axes, param_shapes
from sharding import active_mesh, tree_shardings

HEAD = "score"
HEADS = ("lm", "reward")  # what a checkpoint's params compute: next-token logits, or one reward per sequence


def _check(cfg: LlamaConfig) -> None:
    if cfg.lora_rank:
        raise ValueError("a reward model with LoRA adapters is not supported: train it with lora.rank 0")


def param_layout(cfg: LlamaConfig) -> tuple[Any, Any]:
    """(logical axes, shapes) of a reward model's params: the LM's without `output`, plus `score`."""
    _check(cfg)
    axes, shapes = dict(param_axes(cfg)), dict(param_shapes(cfg))
    axes.pop("output", None)
    shapes.pop("output", None)
    axes[HEAD] = ("embed",)
    shapes[HEAD] = jax.ShapeDtypeStruct((cfg.dim,), cfg.weight_dtype)
    return axes, shapes


def init_head(cfg: LlamaConfig, rng: jax.Array | int = 0) -> jax.Array:
    """A fresh head: normal(0, 0.02) like every other weight (transformers' initializer_range)."""
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    return (0.02 * jax.random.normal(rng, (cfg.dim,), jnp.float32)).astype(cfg.weight_dtype)


def from_lm(params: Any, cfg: LlamaConfig, rng: jax.Array | int = 0) -> Any:
    """Reward params from a language model's: the backbone kept, `output` dropped, a fresh head
    (placed like the params' embedding axis under an active mesh)."""
    _check(cfg)
    out = {k: v for k, v in params.items() if k != "output"}
    head = init_head(cfg, rng)
    mesh = active_mesh()
    if mesh is not None:
        head = jax.device_put(head, tree_shardings(*param_layout(cfg), mesh)[HEAD])
    out[HEAD] = head
    return out


def rewards(params: Any, tokens: jax.Array, lengths: jax.Array, cfg: LlamaConfig, positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None) -> jax.Array:
    """float32 (B,) rewards of (B, T) right-padded rows of `lengths` (B,) tokens each: the head on the
    hidden state of each row's last token. Not jitted (the train step and the scorer jit around it)."""
    backbone = {k: v for k, v in params.items() if k != HEAD}
    hidden = Llama(cfg).apply({"params": backbone}, tokens, positions, segment_ids, return_hidden=True)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    return last.astype(jnp.float32) @ params[HEAD].astype(jnp.float32)
