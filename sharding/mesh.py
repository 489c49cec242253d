"""Building the (data, fsdp, context, tensor) device mesh, with the checks users most often need.

One mesh shape picks the parallelism: `data` copies the model and splits the batch, `fsdp`
splits the batch AND every parameter / gradient / optimizer state along `embed`, `context` splits
each sequence (long context: sharding/context.py) and, like fsdp, the parameters, `tensor`
splits attention heads and MLP columns inside each layer. Devices are ordered by
`mesh_utils.create_device_mesh`, which on TPU puts the last (tensor) axis on the fastest
links; with several pod slices (`dcn_*` > 1) the slow data-centre network is only crossed by
the mesh axes given a dcn factor (normally `dcn_data`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from sharding.rules import MESH_AXES, batch_groups


def _resolve(sizes: dict[str, int], total: int, what: str) -> tuple[int, ...]:
    """Replace a single -1 by whatever fills `total`; check the product."""
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name}={size!r}: expected a positive int or -1 (fill the rest)")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {fill} ({what})")
    known = math.prod(size for size in sizes.values() if size != -1)
    shape = dict(sizes)
    if fill:
        if total % known:
            raise ValueError(f"cannot fill {fill[0]}=-1: {total} {what} is not divisible by the other "
                             f"axes' product {known} ({_show(sizes)})")
        shape[fill[0]] = total // known
    if math.prod(shape.values()) != total:
        raise ValueError(f"mesh {_show(shape)} has {math.prod(shape.values())} devices but there are "
                         f"{total} {what}; the product of the axes must equal the device count "
                         f"(use -1 on one axis to fill the rest)")
    return tuple(int(shape[a]) for a in sizes)


def _show(sizes: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items())


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None, *,
              context: int = 1, dcn_data: int = 1, dcn_fsdp: int = 1, dcn_context: int = 1, dcn_tensor: int = 1,
              cfg: Any = None, batch: int | None = None, seq: int | None = None) -> Mesh:
    """A Mesh with axes ("data", "fsdp", "context", "tensor"); -1 on one axis fills the rest.

    `data`/`fsdp`/`context`/`tensor` are per slice when `dcn_*` are given (several TPU slices joined
    by the data-centre network; total size of an axis = ici size x dcn size). `devices` defaults to
    all devices of all processes. With `cfg` (a LlamaConfig), `batch` and/or `seq` (the sequence
    length) the mesh is also checked against the model (`check_mesh`).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: no devices given")
    n_slices = _num_slices(devices)
    dcn = _resolve({"dcn_data": dcn_data, "dcn_fsdp": dcn_fsdp, "dcn_context": dcn_context, "dcn_tensor": dcn_tensor},
                   n_slices, "slices (device.slice_index)")
    ici = _resolve({"data": data, "fsdp": fsdp, "context": context, "tensor": tensor}, len(devices) // n_slices,
                   "devices" if n_slices == 1 else "devices per slice")
    if n_slices == 1:
        device_array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:
        device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    mesh = Mesh(device_array, MESH_AXES)
    if cfg is not None or batch is not None or seq is not None:
        check_mesh(mesh, cfg=cfg, batch=batch, seq=seq)
    return mesh


def inference_mesh(tensor_parallel: int = 1, fsdp: int = 1) -> Mesh | None:
    """A (1, fsdp, tensor_parallel) mesh over the first fsdp x tensor_parallel devices, or None for one
    device: how generate, serve and eval place a model (`--tensor-parallel`, `--fsdp`)."""
    for flag, n in (("--tensor-parallel", tensor_parallel), ("--fsdp", fsdp)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{flag} must be an int >= 1, got {n!r}")
    n = tensor_parallel * fsdp
    if n == 1:
        return None
    visible = jax.device_count()
    if n > visible:
        asked = " x ".join(f"{flag} {k}" for flag, k in (("--fsdp", fsdp), ("--tensor-parallel", tensor_parallel)) if k > 1)
        raise ValueError(f"{asked} needs {n} devices; only {visible} {'is' if visible == 1 else 'are'} visible")
    return make_mesh(1, fsdp, tensor_parallel, devices=jax.devices()[:n])


def _num_slices(devices: Sequence[Any]) -> int:
    return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def check_mesh(mesh: Mesh, cfg: Any = None, batch: int | None = None, seq: int | None = None) -> None:
    """Raise a clear error when a model or batch cannot be split over `mesh` as asked.

    - tensor must divide n_heads and the FFN width (they are what tensor parallelism splits);
      if it does not divide n_kv_heads (GQA, e.g. 70B has 8 kv heads), the small K/V
      projections are replicated over `tensor` instead (correct, a little more memory).
    - the global batch must divide data x fsdp (every batch row lives on one group).
    - the sequence length must divide 2 x context (context parallelism cuts it into 2 x context
      chunks, two per shard: sharding/context.py).
    """
    shape = dict(mesh.shape)
    tensor = shape.get("tensor", 1)
    if cfg is not None:
        if cfg.n_heads % tensor:
            raise ValueError(f"tensor={tensor} does not divide n_heads={cfg.n_heads}: tensor parallelism "
                             f"splits attention heads; choose tensor from the divisors of {cfg.n_heads}")
        if cfg.n_kv_heads % tensor:
            warnings.warn(f"tensor={tensor} does not divide n_kv_heads={cfg.n_kv_heads}: the K/V projections "
                          f"are replicated over the tensor axis (correct, a little more memory)", stacklevel=3)
        if cfg.hidden_dim % tensor:
            raise ValueError(f"tensor={tensor} does not divide the FFN width hidden_dim={cfg.hidden_dim}")
    context = shape.get("context", 1)
    if seq is not None and context > 1 and seq % (2 * context):
        raise ValueError(f"sequence length {seq} is not divisible by 2 x context = {2 * context}: context "
                         f"parallelism gives each of the {context} shards two chunks of the sequence; use a "
                         f"length that is a multiple of {2 * context}")
    if batch is not None:
        groups = batch_groups(mesh)
        if batch % groups:
            raise ValueError(f"global batch {batch} is not divisible by data x fsdp = "
                             f"{shape.get('data', 1)} x {shape.get('fsdp', 1)} = {groups}; "
                             f"use a batch that is a multiple of {groups}")


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=-1,context=2' -> {'data': 2, 'fsdp': -1, 'context': 2} (missing axes: data=-1 rule)."""
    sizes: dict[str, int] = {}
    for part in filter(None, text.replace(" ", "").split(",")):
        name, sep, value = part.partition("=")
        allowed = MESH_AXES + tuple("dcn_" + a for a in MESH_AXES)
        if not sep or name not in allowed:
            raise ValueError(f"bad mesh entry {part!r}: expected NAME=INT with NAME in {allowed}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"bad mesh entry {part!r}: {value!r} is not an int") from None
    if any(v == -1 for k, v in sizes.items() if k in MESH_AXES):
        sizes.setdefault("data", 1)
    return sizes
