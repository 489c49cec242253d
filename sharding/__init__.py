"""Meshes, logical-axis sharding rules and placement of params and batches."""

from sharding.rules import (LOGICAL_RULES, MESH_AXES, active_mesh, constrain, logical_to_spec,
                            param_shardings, shard_params)

__all__ = ["LOGICAL_RULES", "MESH_AXES", "active_mesh", "constrain", "logical_to_spec",
           "param_shardings", "shard_params"]
