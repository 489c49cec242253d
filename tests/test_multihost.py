"""A real 2-process run: jax.distributed over localhost, gloo collectives, 2 processes x 4 CPU
devices driving one (2, 2, 2) mesh -- how TPU pod hosts run -- compared with this process's
single-device results."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

import llama_jax as lj

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multihost_worker as worker  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
    got = dict(np.load(tmp_path / "result.npz"))

    # Single process, single device: the same model, rows and loss.
    cfg = worker.CFG
    tokens = worker.global_tokens()
    np.testing.assert_array_equal(got["['tokens']"], tokens)  # host p's rows landed at rows p*4..p*4+3
    params = lj.init_params(cfg, 0)
    loss, logits, grads = worker.loss_logits_grads(params, jax.numpy.asarray(tokens), worker.CFG)

    def close(actual, expected):
        expected = np.asarray(expected)
        assert np.max(np.abs(actual - expected)) <= 1e-5 * np.max(np.abs(expected))

    assert abs(float(got["['loss']"]) - float(loss)) <= 1e-5 * abs(float(loss))
    close(got["['logits']"], logits)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = jax.tree_util.keystr(path)
        np.testing.assert_array_equal(got["['params']" + key], leaf)  # sharded init = single-device init
        np.testing.assert_array_equal(got["['restored']" + key], leaf)  # saved + restored on 2 processes
        np.testing.assert_array_equal(got["['resaved']" + key], leaf)  # lj.save_checkpoint on 2 processes
    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
        close(got["['grads']" + jax.tree_util.keystr(path)], leaf)

    # The checkpoint the two processes wrote is complete: one process restores it unsharded.
    cfg2, restored = lj.load_checkpoint(str(tmp_path / "checkpoint"))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, restored, params)
    _, resaved = lj.load_checkpoint(str(tmp_path / "saved"))
    jax.tree.map(np.testing.assert_array_equal, resaved, params)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # the staging folder was renamed
