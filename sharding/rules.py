"""The ONE table that maps logical axis names to mesh axes, and the helpers that apply it.

Parameters and optimizer state use the parameter names (embed, vocab, heads, ...); activations
use the act_* names. A logical axis is left unsharded where its size does not divide the mesh
axes it maps to (e.g. a 32001-token vocabulary), so odd shapes still run, just replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": (),
    "layers": (),
    # activations
    "act_batch": ("data", "fsdp"),
    "act_seq": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}


def active_mesh() -> Mesh | None:
    """The mesh of an enclosing `with mesh:` (or `jax.set_mesh`), or None outside any."""
    from jax._src import mesh as mesh_lib

    legacy = mesh_lib.thread_resources.env.physical_mesh
    if not legacy.empty:
        return legacy
    concrete = mesh_lib.get_concrete_mesh()  # works inside jit, unlike jax.sharding.get_mesh
    return None if concrete.empty else concrete


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


def param_shardings(cfg: Any, mesh: Mesh) -> Any:
    """NamedSharding for every parameter of a model with config `cfg` (a pytree like params)."""
    from llama_jax.model import param_axes, param_shapes

    axes, shapes = param_axes(cfg), param_shapes(cfg)
    return jax.tree.map(
        lambda names, s: NamedSharding(mesh, logical_to_spec(names, s.shape, mesh)),
        axes, shapes, is_leaf=lambda x: isinstance(x, tuple),
    )


def shard_params(params: Any, cfg: Any, mesh: Mesh) -> Any:
    """Place every parameter leaf on `mesh` by the logical-axis rules."""
    from llama_jax.model import check_params

    if not isinstance(mesh, Mesh):
        raise TypeError(f"shard_params needs a jax.sharding.Mesh (see sharding.make_mesh), got {type(mesh).__name__}")
    check_params(params, cfg, "shard_params")
    return jax.device_put(params, param_shardings(cfg, mesh))
