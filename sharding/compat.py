"""The one shim over JAX's private APIs that sharding/ needs (a JAX upgrade is mended here only)."""

from __future__ import annotations

from jax.sharding import Mesh


def current_mesh() -> Mesh | None:
    """The mesh of an enclosing `jax.set_mesh(mesh)` or legacy `with mesh:`, also inside jit; else None.

    `jax.sharding.get_mesh` returns an abstract mesh under jit, and the legacy context lives in
    thread resources; both are reached through jax._src.mesh.
    """
    from jax._src import mesh as mesh_lib

    legacy = mesh_lib.thread_resources.env.physical_mesh
    if not legacy.empty:
        return legacy
    concrete = mesh_lib.get_concrete_mesh()
    return None if concrete is None or concrete.empty else concrete


def attached_tpu_chips() -> int:
    """How many TPU chips are attached to this host (PCI ids, the check JAX itself makes); 0 elsewhere."""
    from jax._src import hardware_utils

    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    return int(chips)
