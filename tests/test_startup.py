"""Start-up is quiet on a machine without TPU chips (sharding/platforms.py), TPU compile-only devices
still work, and the user's platform choice and attached TPU chips are left alone.

The checks run fresh interpreters without the JAX_PLATFORMS=cpu and compile settings that conftest sets,
as a user would.
"""

import os
import re
import subprocess
import sys

import pytest

from sharding import platforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = re.compile(r"^[IWEF]\d{4} |InitGoogle|Source Location Trace|tpu", re.IGNORECASE | re.MULTILINE)


def _user_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "JAX_DISABLE_MOST_OPTIMIZATIONS", "JAX_COMPILATION_CACHE_DIR")}
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # another process holding libtpu's lockfile must not hide the noise
    return env


def _run(*args):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=_user_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.skipif(platforms.tpu_chips_attached() is not False, reason="TPU chips attached (or PCI unreadable)")
def test_startup_prints_nothing_without_tpu_chips():
    runs = {"import": ("-c", "import llama_jax, jax; print(jax.devices()[0].platform)"),
            "cli --help": ("-m", "llama_jax.generate", "--help")}
    procs = {name: subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_user_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name, args in runs.items()}
    stdout = {}
    for name, proc in procs.items():
        stdout[name], stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, (name, stderr[-3000:])
        assert not NOISE.search(stderr), f"{name} wrote start-up noise:\n{stderr}"
    assert stdout["import"].split() == ["cpu"] and stdout["cli --help"].startswith("usage:")


@pytest.mark.skipif(platforms.tpu_chips_attached() is not False, reason="TPU chips attached (or PCI unreadable)")
def test_tpu_compile_only_topology_after_import():
    pytest.importorskip("libtpu", reason="libtpu is not installed: TPU AOT compilation is unavailable")
    out = _run("-c", "import llama_jax, jax\n"
                     "from jax.experimental import topologies\n"
                     "before = jax.devices()[0].platform\n"
                     "devs = topologies.get_topology_desc('v5e:2x2', 'tpu').devices\n"
                     "print(before, len(devs), {d.platform for d in devs}.pop(), jax.devices()[0].platform)")
    assert out.stdout.split() == ["cpu", "4", "tpu", "cpu"]


def test_tpu_chips_keep_jax_default_backends():
    """With TPU chips attached (simulated), JAX's own TPU backend factory stays registered."""
    out = _run("-c", "from jax._src import hardware_utils, xla_bridge\n"
                     "hardware_utils.num_available_tpu_chips_and_device_id = lambda: (4, None)\n"
                     "original = xla_bridge._backend_factories['tpu'].factory\n"
                     "import sharding\n"
                     "print(xla_bridge._backend_factories['tpu'].factory is original)")
    assert out.stdout.split() == ["True"]


def test_user_platform_choice_is_left_alone(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert platforms.skip_tpu_backend_without_chips() is False
