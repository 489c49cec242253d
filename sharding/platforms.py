"""No TPU runtime start-up on machines without TPU chips.

requirements.txt installs libtpu so that TPU programs compile ahead of time on any machine (the
memory planner, the splash-attention test). With libtpu importable, JAX also tries a TPU *backend*
at the first device query on every machine; without TPU chips libtpu then writes raw lines to
stderr before failing quietly (`E0000 ... unexpected worker hostname`, `WARNING: Logging before
InitGoogle()`, `could not determine TPU accelerator type`; no log-level variable silences them),
and it holds /tmp/libtpu_lockfile for the life of the process.

`skip_tpu_backend_without_chips()` (run by `import sharding`, before anything asks for devices)
replaces JAX's TPU backend factory by one that fails at once, but only when the user has not chosen
platforms (`JAX_PLATFORMS`, `jax_platforms`, `JAX_FORCE_TPU_INIT`) and no TPU chip is attached:
none of JAX's TPU PCI ids in /sys/bus/pci (JAX's own count) and no /dev/accel* or /dev/vfio/<n>
node (how TPU VMs expose chips, so an unlisted chip keeps JAX's default). CPU and GPU backends are
chosen exactly as before. Compile-only TPU devices (`jax.experimental.topologies`) load libtpu by
another path and still work.
"""

from __future__ import annotations

import glob
import os

import jax

from sharding.compat import attached_tpu_chips


def tpu_chips_attached() -> bool | None:
    """True/False when the PCI bus can be read; None when it cannot (then nothing is assumed)."""
    try:
        if not os.listdir("/sys/bus/pci/devices"):
            return None
        chips = attached_tpu_chips()  # the count JAX itself uses to pick 'tpu,cpu'
    except Exception:  # another JAX version or no sysfs: do not guess
        return None
    return chips > 0 or bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _no_tpu():
    raise RuntimeError("no TPU chips are attached to this machine (sharding/platforms.py did not start "
                       "libtpu; set JAX_PLATFORMS=tpu to try anyway)")


def skip_tpu_backend_without_chips() -> bool:
    """Keep JAX from starting libtpu's TPU backend on a machine without TPU chips; True if it did."""
    if (os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_FORCE_TPU_INIT")
            or jax.config.jax_platforms):  # the user chose (on a TPU VM, JAX itself set 'tpu,cpu')
        return False
    if tpu_chips_attached() is not False:
        return False
    from jax.extend.backend import register_backend_factory
    try:
        register_backend_factory("tpu", _no_tpu, priority=300, fail_quietly=True)  # JAX's priority
    except RuntimeError:  # a TPU backend is already up: leave it
        return False
    return True
