"""The ONE table of accelerator chips: peak dense bf16 FLOP/s and memory per chip (+ TPU slice naming).

Used by the trainer's MFU, the TPU planner and every benchmark. Peaks are the vendors' data-sheet
dense bf16 numbers per chip; HBM is what the runtime reports per device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator kind: its peak bf16 FLOP/s and HBM per chip (MFU, the planner) and its TPU slice naming."""

    name: str  # short name: v5p, H100, ...
    device_kinds: tuple[str, ...]  # jax `device.device_kind` strings of this chip
    peak_bf16_flops: float  # dense, per chip
    hbm_bytes: int  # per chip
    # TPU slices only (the planner's topology names):
    cores_in_name: int = 0  # v4-8 / v5p-8 count TensorCores (2 per chip); v5e-8 / v6e-8 count chips
    torus_dims: int = 0  # 3 (v4, v5p) or 2 (v5e, v6e)
    chip_config: str = ""  # libtpu chip config: "megacore" = one JAX device per chip (both cores)

    @property
    def is_tpu(self) -> bool:
        return self.torus_dims > 0


CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", ("TPU v4",), 275e12, 32 * GiB, 2, 3, "megacore"),
    Chip("v5p", ("TPU v5p", "TPU v5"), 459e12, 95 * GiB, 2, 3, "megacore"),
    Chip("v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16 * GiB, 1, 2, "default"),
    Chip("v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32 * GiB, 1, 2, "default"),
    Chip("H200", ("H200",), 989e12, 141 * 10**9),
    Chip("H100", ("H100",), 989e12, 80 * 10**9),
    Chip("A100", ("A100",), 312e12, 80 * 10**9),
    Chip("L4", ("L4",), 121e12, 24 * 10**9),
)}

TPU_GENERATIONS = tuple(name for name, chip in CHIPS.items() if chip.is_tpu)


def chip_of(device: Any) -> Chip | None:
    """The table's chip for a jax device (by its device_kind), or None for CPUs and unknown chips.

    "TPU v5 lite" must not match v5p's "TPU v5": the longest matching kind wins.
    """
    kind = getattr(device, "device_kind", "")
    matches = [(len(k), chip) for chip in CHIPS.values() for k in chip.device_kinds if k in kind]
    return max(matches, key=lambda m: m[0])[1] if matches else None
