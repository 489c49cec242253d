"""LLaMA / Llama 2 / Llama 3 as functional Flax linen modules.

Read top to bottom: RMSNorm, rotary embeddings (their frequencies, with the config's RoPE scaling,
in `rope_frequencies`), attention (projections + KV cache here; the attention kernel itself is
`attend` in llama_jax/attention.py), the SwiGLU feed-forward, the pre-norm block, and the causal
LM that scans the blocks (its output projection is the embedding when tied); then the functional API.

Layout decisions that matter for checkpoints and sharding:
- Parameters are named after Meta's code (wq, wk, wv, wo, w1, w2, w3, ...) and stored as
  (in, ..., out) kernels with separate head axes, e.g. wq is (dim, n_heads, head_dim).
- RoPE rotates the half-split pairs (i, i + head_dim/2) as Hugging Face does; Meta checkpoints
  have their wq/wk rows permuted at conversion (llama_jax/layout.py), never inside the model.
- Every parameter carries logical axis names and activations are constrained with logical
  names; `sharding/` maps them to mesh axes. Outside a mesh the constraints do nothing.
- The layers are one `nn.scan` over a stacked "layers" axis, so compile time does not grow
  with depth; `scan_layers=False` unrolls the same loop (same parameters).
- Under a mesh with a `context` axis (long context) the blocks see the sequence in causal
  load-balanced order (sharding/context.py): `Llama` reorders tokens and positions on entry and the
  hidden states back before the output projection; attention gathers K/V over `context`.
- Every projection goes through `project`: its weight is a float array or an int8/nf4 one
  (llama_jax/quant.py, multiplied by `quant.matmul` right there), and with `cfg.lora_rank > 0` the targeted ones
  add a LoRA update from their adapters `{name}_lora_a` / `{name}_lora_b` (llama_jax/lora.py).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.layout import Layout, with_layout_constraint

from llama_jax import quant
from llama_jax.attention import attend
from llama_jax.config import LlamaConfig
from sharding import (active_mesh, check_shapes, constrain, context_shards, from_balanced,  # no-ops outside a mesh
                      param_layout, param_shardings, to_balanced)

Array = jax.Array
KVCache = dict  # {"k": (layers, batch, slots, kv_heads, head_dim), "v": same}
CACHE_AXES = ("layers", "act_batch", "act_seq", "act_kv_heads", None)  # logical axes of a KVCache leaf


def _param(module: nn.Module, name: str, shape: tuple, axes: tuple, init=None) -> Array:
    init = init or nn.initializers.normal(stddev=0.02)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, module.cfg.weight_dtype)


def lora_a_init(key: Array, shape: tuple, dtype: Any = jnp.float32) -> Array:
    """PEFT's A init, torch's kaiming_uniform_(a=sqrt(5)): uniform in +-1/sqrt(fan_in), fan_in = the input size."""
    bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _as_stored(w: Array) -> Array:
    """A weight used in the dtype it is stored in (a bf16 LoRA base), pinned to its stored row-major
    layout here, inside the layer loop. Otherwise XLA's TPU layouts transpose the whole stacked
    (layers, dim, heads, head_dim) weight before the loop for the backward matmul: a second copy of
    the base (3 GiB of Llama-2-7B's wq/wk/wv). Converted weights (fp32 params) get their layout free."""
    return with_layout_constraint(w, Layout(major_to_minor=tuple(range(w.ndim))))


def project(module: nn.Module, name: str, x: Array, ins: dict, outs: dict) -> Array:
    """x (batch, seq, *ins) @ the module's weight `name` (*ins, *outs) -> (batch, seq, *outs).

    `ins`/`outs` map logical axis names to sizes. The weight is a float param or a quantised one
    (llama_jax/quant.py) stored in its place, multiplied in the compute dtype (`quant.matmul`). For LoRA
    targets the adapters A (*ins, rank) and B (rank, *outs) add (alpha / rank) * dropout(x) A B;
    A is sharded like the weight's input axes, B like its output axes, rank never. B starts at
    zero, so a new adapter leaves the output exactly unchanged. Dropout runs only when the caller
    passes a "dropout" RNG (the train step), never in `forward` or generation.
    """
    cfg, dt = module.cfg, module.cfg.compute_dtype
    in_axes, out_axes = tuple(ins), tuple(outs)
    stored = module.get_variable("params", name) if module.has_variable("params", name) else None
    if quant.is_quantized(stored):  # (flax's `param` would check it against a float array's shape)
        y = quant.matmul(x, stored, len(ins), dt)
    else:
        w = _param(module, name, (*ins.values(), *outs.values()), in_axes + out_axes)
        y = jnp.tensordot(x, _as_stored(w) if w.dtype == dt else w.astype(dt), len(ins))
    if cfg.lora_rank and name in cfg.lora_targets:
        a = _param(module, f"{name}_lora_a", (*ins.values(), cfg.lora_rank), (*in_axes, "lora_rank"), lora_a_init)
        b = _param(module, f"{name}_lora_b", (cfg.lora_rank, *outs.values()), ("lora_rank", *out_axes),
                   nn.initializers.zeros)
        if cfg.lora_dropout and module.has_rng("dropout"):
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - cfg.lora_dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - cfg.lora_dropout), 0.0).astype(x.dtype)
        y = y + cfg.lora_scale * jnp.tensordot(jnp.tensordot(x, a.astype(dt), len(ins)), b.astype(dt), 1)
    return y


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps), statistics in float32, then scaled by a learned weight."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = _param(self, "weight", (self.cfg.dim,), ("embed",), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.cfg.norm_eps)
        return normed.astype(self.cfg.compute_dtype) * weight.astype(self.cfg.compute_dtype)


def rope_frequencies(cfg: LlamaConfig) -> Array:
    """RoPE's inverse frequencies (head_dim/2,) in float32, as transformers computes them
    (modeling_rope_utils: default, `linear`, `llama3`): the same float32 operations in the same order
    (torch's `c / t` is reciprocal(t) * c), so they agree bit for bit but for pow's own rounding
    (at most 1 ulp apart from torch's on CPU).
    """
    hd, scaling = cfg.head_dim, cfg.rope_scaling
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":  # position interpolation: the angles of position p / factor
        return inv_freq / scaling.factor
    # llama3: long wavelengths (low frequencies) slowed by `factor`, short ones kept, a smooth blend between
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    context = scaling.original_max_position_embeddings
    wavelen = (1.0 / inv_freq) * (2 * math.pi)
    slowed = jnp.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = ((1.0 / wavelen) * context - low) / (high - low)
    blended = (1 - smooth) * slowed / factor + smooth * slowed
    between = ~(wavelen < context / high) & ~(wavelen > context / low)
    return jnp.where(between, blended, slowed)


def rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotary embedding on (batch, seq, heads, head_dim) at integer `positions` (batch, seq), with the
    inverse frequencies of `rope_frequencies`. Pairs are (i, i + head_dim/2) (HF's layout); angles
    and rotation in float32.
    """
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # (B, T, 1, hd/2)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def _write_cache(cache: Array, new: Array, start: Array) -> Array:
    """Write new (B, T, KV, hd) into cache (B, S, KV, hd) at per-row slot `start` (B,)."""
    return jax.vmap(lambda c, n, s: lax.dynamic_update_slice(c, n, (s, 0, 0)))(cache, new.astype(cache.dtype), start)


class Attention(nn.Module):
    cfg: LlamaConfig
    context: int = 1  # context shards: the sequence is in their load-balanced order (sharding/context.py)

    @nn.compact
    def __call__(self, x: Array, positions: Array, segment_ids: Array | None, cache: KVCache | None):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        d, h, kv, hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        embed, heads, kv_heads = {"embed": d}, {"heads": h, "head_dim": hd}, {"kv_heads": kv, "head_dim": hd}
        q = constrain(project(self, "wq", x, embed, heads), ("act_batch", "act_seq", "act_heads", None))
        k = constrain(project(self, "wk", x, embed, kv_heads), ("act_batch", "act_seq", "act_kv_heads", None))
        v = constrain(project(self, "wv", x, embed, kv_heads), ("act_batch", "act_seq", "act_kv_heads", None))
        inv_freq = rope_frequencies(cfg)
        q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)

        if cache is None:  # training / full forward: causal by index, never across segments
            out = attend(q, k, v, None, causal=True, implementation=cfg.attention, segment_ids=segment_ids,
                         context_shards=self.context)
        else:  # decoding: slot = position; attend to every slot at or before the query position
            cache = {"k": _write_cache(cache["k"], k, positions[:, 0]),
                     "v": _write_cache(cache["v"], v, positions[:, 0])}
            slots = jnp.arange(cache["k"].shape[1])
            mask = slots[None, None, :] <= positions[:, :, None]
            out = attend(q, cache["k"].astype(dt), cache["v"].astype(dt), mask, causal=False,
                         implementation=cfg.attention)
        out = constrain(out, ("act_batch", "act_seq", "act_heads", None))
        return project(self, "wo", out, heads, embed), cache


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        embed, mlp = {"embed": self.cfg.dim}, {"mlp": self.cfg.hidden_dim}
        gate = jax.nn.silu(project(self, "w1", x, embed, mlp)) * project(self, "w3", x, embed, mlp)
        gate = constrain(gate, ("act_batch", "act_seq", "act_mlp"))
        return project(self, "w2", gate, mlp, embed)


class Block(nn.Module):
    """Pre-norm transformer block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    cfg: LlamaConfig
    context: int = 1

    @nn.compact
    def __call__(self, x: Array, positions: Array, segment_ids: Array | None, cache: KVCache | None):
        h, cache = Attention(self.cfg, self.context, name="attention")(
            RMSNorm(self.cfg, name="attention_norm")(x), positions, segment_ids, cache)
        x = x + h
        x = x + FeedForward(self.cfg, name="feed_forward")(RMSNorm(self.cfg, name="ffn_norm")(x))
        return constrain(x, ("act_batch", "act_seq", "act_embed")), cache


REMAT_POLICY = {
    "full": None,  # save nothing inside a block, recompute it all
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


class Llama(nn.Module):
    """The causal LM. `apply({"params": p}, tokens)` -> float32 logits (B, T, vocab).

    positions: (B, T) int, default 0..T-1 per row (packed rows restart per document).
    segment_ids: (B, T) int, tokens attend only within their segment (packing, padding).
    cache: a KVCache from `init_cache`; then returns (logits, new_cache) (see llama_jax/generate/engine.py).
    return_hidden: return the final (normed) hidden states (B, T, dim) instead of logits, without the
    output projection (a reward model's scalar head reads them: llama_jax/reward.py).
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, tokens: Array, positions: Array | None = None, segment_ids: Array | None = None,
                 cache: KVCache | None = None, return_hidden: bool = False):
        cfg = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        shards = context_shards(tokens.shape[1]) if cache is None else 1  # context parallelism (long sequences)
        tokens, positions = to_balanced(tokens, shards), to_balanced(positions, shards)
        segment_ids = None if segment_ids is None else to_balanced(segment_ids, shards)
        embedding = _param(self, "tok_embeddings", (cfg.vocab_size, cfg.dim), ("vocab", "embed"))
        # The lookup reads a table whole along `embed` (split over vocab only): a table split over fsdp /
        # context would give rows split along embed, which XLA can only re-split by gathering all of them.
        table = constrain(embedding.astype(cfg.compute_dtype), ("vocab", None))
        x = jnp.take(table, tokens, axis=0)
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICY[cfg.remat], prevent_cse=not cfg.scan_layers)
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, 0),
            length=cfg.n_layers,
            unroll=1 if cfg.scan_layers else cfg.n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, cache = stack(cfg, shards, name="layers")(x, positions, segment_ids, cache)
        x = constrain(from_balanced(x, shards), ("act_batch", "act_seq", "act_embed"))
        if cache is not None:
            cache = jax.tree.map(lambda c: constrain(c, CACHE_AXES), cache)

        x = RMSNorm(cfg, name="norm")(x)
        if return_hidden:
            return x
        if cfg.tie_word_embeddings:  # Llama 3.2 1B/3B: the output projection is the embedding
            output = embedding.T
        else:
            output = _param(self, "output", (cfg.dim, cfg.vocab_size), ("embed", "vocab"))
        logits = jnp.einsum("btd,dv->btv", x, output.astype(cfg.compute_dtype),
                            preferred_element_type=jnp.float32)
        logits = constrain(logits, ("act_batch", "act_seq", "act_vocab"))
        return logits if cache is None else (logits, cache)


def init_cache(cfg: LlamaConfig, batch: int, slots: int) -> KVCache:
    """An empty KV cache: kv heads (not query heads) x `slots` positions, in the compute dtype.

    Under a mesh its batch rows and kv heads are split like the activations (CACHE_AXES)."""
    shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.head_dim)
    return {name: constrain(jnp.zeros(shape, cfg.compute_dtype), CACHE_AXES) for name in ("k", "v")}


# --- public functional API ------------------------------------------------------------------


def _boxed_init(cfg: LlamaConfig, rng: Array) -> Any:
    """Parameters with their logical-axis boxes, from a one-token trace (with the xla attention,
    which every shape takes: the attention implementation owns no parameters)."""
    return Llama(cfg.replace(attention="xla")).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def param_axes(cfg: LlamaConfig) -> Any:
    """The logical axis names of every parameter, as a pytree shaped like the params."""
    boxed = jax.eval_shape(lambda: _boxed_init(cfg, jax.random.key(0)))
    return jax.tree.map(lambda p: tuple(p.names), boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _init(cfg: LlamaConfig, rng: Array) -> Any:
    return nn.meta.unbox(_boxed_init(cfg, rng))


@functools.cache  # configs are frozen and hashable; tracing init is not free for big models
def param_shapes(cfg: LlamaConfig) -> Any:
    """jax.ShapeDtypeStruct of every parameter, computed without allocating anything."""
    return jax.eval_shape(functools.partial(_init, cfg), jax.random.key(0))


def check_params(params: Any, cfg: LlamaConfig, where: str) -> None:
    """Raise a clear error when `params` is not a parameter tree of the model `cfg` describes."""
    check_shapes(params, param_shapes(cfg), where)


# sharding.param_shardings / shard_params(params, cfg, mesh) find a LlamaConfig's axes here.
param_layout.register(LlamaConfig, lambda cfg: (param_axes(cfg), param_shapes(cfg)))


def init_params(cfg: LlamaConfig, rng: Array | int = 0) -> Any:
    """Random parameters (normal(0.02) weights, unit norms) as a plain pytree in param_dtype.

    Under an active mesh (`with mesh:`) the parameters are created already sharded by the
    logical-axis rules, so a model larger than one host's memory is never materialised.
    """
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    mesh = active_mesh()
    out_shardings = None if mesh is None else param_shardings(cfg, mesh)
    return jax.jit(_init, static_argnums=0, out_shardings=out_shardings)(cfg, rng)


@functools.partial(jax.jit, static_argnames="cfg")
def _forward(params: Any, tokens: Array, cfg: LlamaConfig, positions: Array | None, segment_ids: Array | None):
    return Llama(cfg).apply({"params": params}, tokens, positions, segment_ids)


def check_tokens(tokens: Any, cfg: LlamaConfig) -> None:
    """Raise a clear error for token arrays the model cannot take (shape, dtype, length, and the id
    range of host arrays: device arrays are not copied back to check, that would stall the device)."""
    shape, dtype = jnp.shape(tokens), jnp.result_type(tokens)
    if len(shape) != 2:
        raise ValueError(f"tokens must be 2-D (batch, seq), got shape {shape}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"tokens must be an integer array (int32), got dtype {dtype}")
    if shape[1] > cfg.max_seq_len:
        raise ValueError(f"sequence length {shape[1]} exceeds the model's max_seq_len {cfg.max_seq_len}")
    if isinstance(tokens, np.ndarray) and tokens.size > 0:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got range [{low}, {high}]")


def forward(params: Any, tokens: Array, cfg: LlamaConfig, positions: Array | None = None,
            segment_ids: Array | None = None) -> Array:
    """Jit-compiled forward pass: int tokens (B, T) -> float32 logits (B, T, vocab)."""
    if isinstance(tokens, (list, tuple)):
        tokens = np.asarray(tokens)
    check_tokens(tokens, cfg)
    for name, extra in (("positions", positions), ("segment_ids", segment_ids)):
        if extra is not None and tuple(jnp.shape(extra)) != tuple(jnp.shape(tokens)):
            raise ValueError(f"{name} must have the tokens' shape {tuple(jnp.shape(tokens))}, got {jnp.shape(extra)}")
    return _forward(params, jnp.asarray(tokens, jnp.int32), cfg, positions, segment_ids)
