"""The ONE table that maps logical axis names to mesh axes, and the helpers that apply it.

Parameters and optimizer state use the parameter names (embed, vocab, heads, ...); activations
use the act_* names. The `context` axis splits the sequence (act_seq, sharding/context.py) and, like
fsdp, every parameter along `embed`: its devices would otherwise each hold a whole copy. A logical
axis is left unsharded where its size does not divide the mesh axes it maps to (e.g. a 32001-token
vocabulary), so odd shapes still run, just replicated.

This floor knows no model: a model library registers how to get its parameters' logical axes
and shapes from its config (`param_layout.register`), and `param_shardings` / `shard_params`
then work on that config.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.compat import current_mesh

MESH_AXES = ("data", "fsdp", "context", "tensor")  # the device order: tensor on the fastest links

LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "embed": ("fsdp", "context"),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": (),
    "layers": (),
    "lora_rank": (),  # LoRA adapters: A shards like its weight's input axes, B like its outputs, rank never
    # activations
    "act_batch": ("data", "fsdp"),
    "act_seq": ("context",),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}


def active_mesh() -> Mesh | None:
    """The mesh of an enclosing `jax.set_mesh(mesh)` (or `with mesh:`), also inside jit; None outside any."""
    return current_mesh()


def logical_to_spec(names: tuple, shape: tuple, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose axes have logical `names`.

    Each mesh axis is used at most once; mesh axes of size 1 are dropped; a dimension that the
    mapped mesh axes do not divide is replicated instead of sharded unevenly.
    """
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        axes = tuple(a for a in LOGICAL_RULES.get(name, ()) if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        while axes and size % int(np.prod([mesh.shape[a] for a in axes])) != 0:
            axes = axes[:-1]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: tuple) -> jax.Array:
    """with_sharding_constraint by logical names; does nothing outside a mesh."""
    mesh = active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh)))


def tree_shardings(axes: Any, shapes: Any, mesh: Mesh) -> Any:
    """NamedSharding for every leaf of a tree, from its logical axis names (a tuple per leaf) and shape."""
    return jax.tree.map(lambda names, s: NamedSharding(mesh, logical_to_spec(names, np.shape(s), mesh)),
                        axes, shapes, is_leaf=lambda x: isinstance(x, tuple))


# --- the batch: rows over the mesh axes of "act_batch" -------------------------------------------


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes that split batch rows (the "act_batch" rule: data, fsdp)."""
    return tuple(a for a in LOGICAL_RULES["act_batch"] if a in mesh.shape)


def batch_groups(mesh: Mesh) -> int:
    """How many groups of batch rows the mesh holds (data x fsdp): a global batch must be a multiple."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch rows split over the batch axes (data, fsdp); the other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh), *([None] * (ndim - 1))))


# --- a model's parameters --------------------------------------------------------------------------


@functools.singledispatch
def param_layout(model_config: Any) -> tuple[Any, Any]:
    """(logical axes tree, shapes tree) of a model's parameters, from its config.

    A model library registers its config type (llama_jax.model does it for LlamaConfig).
    """
    raise TypeError(f"no parameter layout is registered for {type(model_config).__name__}; "
                    "expected a model config such as llama_jax.LlamaConfig")


def param_shardings(model_config: Any, mesh: Mesh) -> Any:
    """NamedSharding for every parameter of the model `model_config` describes (a tree like its params)."""
    return tree_shardings(*param_layout(model_config), mesh)


def check_shapes(tree: Any, shapes: Any, where: str) -> None:
    """Raise a clear error when `tree`'s structure or leaf shapes differ from `shapes`' (a different model)."""
    got = jax.tree.map(lambda x: tuple(np.shape(x)), tree)
    expected = jax.tree.map(lambda s: tuple(np.shape(s)), shapes)
    if jax.tree.structure(got) != jax.tree.structure(expected) or got != expected:
        raise ValueError(f"{where}: params do not match the config's parameter shapes (a different model?)")


def shard_params(params: Any, model_config: Any, mesh: Mesh) -> Any:
    """Place every parameter leaf on `mesh` by the logical-axis rules."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"shard_params needs a jax.sharding.Mesh (see sharding.make_mesh), got {type(mesh).__name__}")
    axes, shapes = param_layout(model_config)
    check_shapes(params, shapes, "shard_params")
    return jax.device_put(params, tree_shardings(axes, shapes, mesh))
