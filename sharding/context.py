"""Context parallelism: one sequence split over the `context` mesh axis, in causal load-balanced order.

Under causal attention the last tokens of a sequence have the most keys to read. Cut a sequence of T
tokens into 2c chunks for c context shards; shard i holds chunks i and 2c-1-i, so every shard has
the same attention work (the Llama 3 paper's scheme; MaxText and Megatron do the same). The model
puts its tokens and positions into this order on entry and its final hidden states back into the
natural order before the output projection, so callers never see it; attention all-gathers K/V over
`context` and masks each query by its original index (`balanced_order`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sharding.rules import active_mesh


def context_shards(length: int) -> int:
    """How many context shards split a sequence of `length` under the active mesh: its `context` size,
    or 1 (no mesh, no context axis, or a length that 2 x context does not divide, e.g. one decode token)."""
    mesh = active_mesh()
    shards = 1 if mesh is None else int(mesh.shape.get("context", 1))
    return shards if shards > 1 and length % (2 * shards) == 0 else 1


def balanced_order(length: int, shards: int) -> np.ndarray:
    """The original index of every position of the load-balanced order: chunks 0, 2c-1, 1, 2c-2, ...
    (for 1 shard: the natural order)."""
    if shards == 1:
        return np.arange(length)
    chunks = np.arange(length).reshape(2 * shards, -1)
    return np.concatenate([chunks[j] for i in range(shards) for j in (i, 2 * shards - 1 - i)])


def to_balanced(x: jax.Array, shards: int) -> jax.Array:
    """(B, T, ...) in natural order -> load-balanced order along axis 1 (x[:, balanced_order(T, shards)])."""
    if shards == 1:
        return x
    b, t, rest = x.shape[0], x.shape[1], x.shape[2:]
    halves = x.reshape(b, 2, shards, t // (2 * shards), *rest)  # chunks 0..c-1 and c..2c-1
    pairs = jnp.stack([halves[:, 0], jnp.flip(halves[:, 1], axis=1)], axis=2)  # shard i: (chunk i, chunk 2c-1-i)
    return pairs.reshape(x.shape)


def from_balanced(x: jax.Array, shards: int) -> jax.Array:
    """The inverse of `to_balanced`: load-balanced order along axis 1 -> natural order."""
    if shards == 1:
        return x
    b, t, rest = x.shape[0], x.shape[1], x.shape[2:]
    pairs = x.reshape(b, shards, 2, t // (2 * shards), *rest)
    halves = jnp.stack([pairs[:, :, 0], jnp.flip(pairs[:, :, 1], axis=1)], axis=1)
    return halves.reshape(x.shape)
