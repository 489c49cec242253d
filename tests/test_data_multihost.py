"""Two hosts (jax.distributed over localhost, one CPU device each) stream a tokenized data set:
each reads only its own rows, the hosts' rows are disjoint, and the global batch they assemble
equals the batch one process reads alone."""

import os
import socket
import subprocess
import sys

import numpy as np

import llama_jax as lj
from train import data as data_lib
from train.data.pretokenize import tokenize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data_multihost_worker as worker  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "data_multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_hosts_read_disjoint_rows_that_make_the_global_batch(tmp_path):
    data_dir = str(tmp_path / "tokens")
    tokenize(os.path.join(ROOT, "data", "tokenizer.model"), "text", [os.path.join(ROOT, "data", "demo_pretrain.txt")],
             data_dir, workers=1, shard_tokens=2048, progress=False)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(port), str(tmp_path), data_dir], env=env,
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
    hosts = [dict(np.load(tmp_path / f"host{i}.npz")) for i in range(2)]

    tokenizer = lj.Tokenizer(os.path.join(ROOT, "data", "tokenizer.model"))
    alone, _ = data_lib.make_batches(worker.spec(data_dir), tokenizer, worker.BATCH, worker.SEED)
    for k in range(worker.STEPS):
        ids = [h[f"ids{k}"] for h in hosts]
        assert len(ids[0]) == len(ids[1]) == worker.BATCH // 2 and not set(ids[0]) & set(ids[1])
        np.testing.assert_array_equal(np.concatenate(ids), alone.global_rows(k))
        for name, value in alone(k).items():  # both hosts assembled exactly the single-process batch
            for h in hosts:
                np.testing.assert_array_equal(h[f"{name}{k}"], value, err_msg=f"{name} step {k}")
