"""Multi-host start-up and per-host data: how one program drives a whole TPU pod.

On a pod every host runs the same script as its own Python process. `initialize()` joins them
into one JAX runtime (after it, `jax.devices()` lists every chip of the pod); then each host
feeds only its share of the batch and `global_batch` assembles the global array without any
host ever holding all of it. Only `is_main_process()` should log or write non-array files
(array checkpoints are written by Orbax from every host, each writing its own shards).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from sharding.compat import attached_tpu_chips
from sharding.rules import batch_groups, batch_sharding


def _on_tpu_vm() -> bool:
    """A Cloud TPU VM: TPU chips are attached (the check jax itself uses), or the pod's workers are named.

    (Not TPU_SKIP_MDS_QUERY: importing jax sets that on machines *without* TPUs.)
    """
    return attached_tpu_chips() > 0 or "TPU_WORKER_HOSTNAMES" in os.environ


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None) -> None:
    """Join this process to the multi-host job (call once, before anything touches devices).

    - Cloud TPU VMs / pods: call with no arguments; `jax.distributed.initialize()` finds the
      other workers from the TPU metadata.
    - Elsewhere (GPU clusters, CPU tests): pass coordinator "host:port", the number of processes
      and this process's id, or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
      CPU processes exchange data with gloo collectives.
    - With none of that (a laptop, one GPU box) it does nothing: single-process JAX needs no set-up.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = _env_int("JAX_PROCESS_ID")
    explicit = (coordinator_address, num_processes, process_id)
    if all(v is None for v in explicit):
        if _on_tpu_vm():
            jax.distributed.initialize()
        return
    if any(v is None for v in explicit):
        raise ValueError(
            "sharding.initialize: coordinator_address, num_processes and process_id must be given together "
            f"(or via JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); got "
            f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, process_id={process_id!r}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"sharding.initialize: process_id {process_id} is not in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by CPU devices
    jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=local_device_ids)


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={os.environ[name]!r} is not an int") from None


def is_main_process() -> bool:
    """True on process 0 only: the one that logs, prints and writes non-array files."""
    return jax.process_index() == 0


def global_batch(local: Any, mesh: Mesh) -> Any:
    """A global jax.Array (or pytree of them) from this host's rows of the batch.

    Every process passes its own `local` rows (same shape on each host: global batch / number
    of processes); rows are split over data x fsdp. No host ever holds the global batch.
    """
    groups = batch_groups(mesh)

    def one(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim < 1:
            raise ValueError(f"global_batch: expected arrays with a batch axis, got shape {x.shape}")
        rows = x.shape[0] * jax.process_count()
        if rows % groups:
            raise ValueError(f"global batch {rows} ({x.shape[0]} rows x {jax.process_count()} processes) is not "
                             f"divisible by data x fsdp = {groups}")
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(one, local)
