"""The ground floor: meshes, the logical-axis rules table, placement of params and batches,
multi-host start-up, and the chip table. Imports nothing else of the project."""

from sharding.platforms import skip_tpu_backend_without_chips

skip_tpu_backend_without_chips()  # before any device query: no libtpu start-up without TPU chips

from sharding.distributed import global_batch, initialize, is_main_process  # noqa: E402
from sharding.context import balanced_order, context_shards, from_balanced, to_balanced  # noqa: E402
from sharding.hardware import CHIPS, Chip, chip_of  # noqa: E402
from sharding.mesh import check_mesh, inference_mesh, make_mesh, parse_mesh  # noqa: E402
from sharding.rules import (LOGICAL_RULES, MESH_AXES, active_mesh, batch_groups, batch_sharding,  # noqa: E402
                            check_shapes, constrain, logical_to_spec, param_layout, param_shardings, shard_params,
                            tree_shardings)

__all__ = ["CHIPS", "Chip", "LOGICAL_RULES", "MESH_AXES", "active_mesh", "balanced_order", "batch_groups",
           "batch_sharding", "check_mesh", "check_shapes", "chip_of", "constrain", "context_shards", "from_balanced",
           "global_batch", "initialize", "is_main_process", "inference_mesh", "logical_to_spec", "make_mesh",
           "param_layout", "param_shardings", "parse_mesh", "shard_params", "to_balanced", "tree_shardings"]
