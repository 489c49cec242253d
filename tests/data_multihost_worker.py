"""One host of the 2-process data test (tests/test_data_multihost.py starts two of these).

Usage: python tests/data_multihost_worker.py PROCESS_ID PORT OUT_DIR DATA_DIR. Each process reads
only its slice of every global batch from the tokenized DATA_DIR, places it in the global batch
array over both processes' devices, and writes the global row ids it read and the assembled global
batch (read back replicated) to OUT_DIR/host{PROCESS_ID}.npz.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import llama_jax as lj  # noqa: E402
import sharding  # noqa: E402
from train import data as data_lib  # noqa: E402
from train.config import DataConfig  # noqa: E402

BATCH, STEPS, SEED, MAX_LEN = 8, 3, 7, 48


def spec(data_dir: str) -> DataConfig:
    return DataConfig(format="tokens", train=[data_dir], max_len=MAX_LEN)


def main() -> None:
    process_id, port, out_dir, data_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    sharding.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2
    tokenizer = lj.Tokenizer(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                                          "tokenizer.model"))
    batches, _ = data_lib.make_batches(spec(data_dir), tokenizer, BATCH, SEED, jax.process_index(), jax.process_count())
    mesh = sharding.make_mesh(data=-1)
    replicate = jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, PartitionSpec()))
    result = {}
    for k in range(STEPS):
        local = batches(k)
        result[f"ids{k}"] = batches.global_rows(k)[batches.offset: batches.offset + batches.local]
        assembled = replicate(sharding.global_batch(local, mesh))
        for name, value in assembled.items():
            result[f"{name}{k}"] = np.asarray(value.addressable_data(0))
    np.savez(os.path.join(out_dir, f"host{process_id}.npz"), **result)


if __name__ == "__main__":
    main()
