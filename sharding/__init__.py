"""Meshes, logical-axis sharding rules, placement of params and batches, multi-host start-up."""

from sharding.platforms import skip_tpu_backend_without_chips

skip_tpu_backend_without_chips()  # before any device query: no libtpu start-up without TPU chips

from sharding.distributed import batch_sharding, global_batch, initialize, is_main_process
from sharding.mesh import check_mesh, make_mesh, parse_mesh
from sharding.rules import (LOGICAL_RULES, MESH_AXES, active_mesh, constrain, logical_to_spec,
                            param_shardings, shard_params)

__all__ = ["LOGICAL_RULES", "MESH_AXES", "active_mesh", "batch_sharding", "check_mesh", "constrain",
           "global_batch", "initialize", "is_main_process", "logical_to_spec", "make_mesh", "param_shardings",
           "parse_mesh", "shard_params"]
