"""Benchmark: what checkpoint checksums cost at load time, two ways, on a ~1 GB float32 model.

    python bench/integrity.py                # ~1.1 GB (270M params); needs ~4 GB of free disk
    python bench/integrity.py --dim 128      # seconds: a smoke test of this script

(a) Our manifest (llama_jax/checkpoint/integrity.py): `checksums.json` with each file's xxh3-64,
    verified by reading every file once before Orbax restores it. Measured: save_checkpoint's
    manifest write, verify() alone, and load_checkpoint with and without the verify, cold (pages
    dropped with posix_fadvise) and warm.
(b) zarr3's crc32c codec inside TensorStore: the same arrays written as zarr3, one chunk per
    layer, with codecs [bytes] and with [bytes, crc32c]; every array read back, cold and warm.
The page cache is dropped per file (fsync + POSIX_FADV_DONTNEED), no root needed. Prints one
JSON line (and writes it with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorstore as ts  # noqa: E402

import llama_jax as lj  # noqa: E402
from llama_jax.checkpoint import format as ckpt_format  # noqa: E402
from llama_jax.checkpoint.integrity import verify, write_manifest  # noqa: E402
from llama_jax.checkpoint.orbax_glue import leaf_paths  # noqa: E402


def drop_cache(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(fn, folder: str | None = None, repeat: int = 3) -> float:
    """Best of `repeat` wall times of fn(); cold (cache dropped first) when folder is given."""
    best = float("inf")
    for _ in range(repeat):
        if folder:
            drop_cache(folder)
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def zarr3(folder: str, leaves: dict, crc: bool) -> dict:
    codecs = [{"name": "bytes", "configuration": {"endian": "little"}}] + ([{"name": "crc32c"}] if crc else [])
    stores = {}
    for path, value in leaves.items():
        chunks = (1, *value.shape[1:]) if path[0] == "layers" else value.shape
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(folder, ".".join(path))},
                "metadata": {"shape": list(value.shape), "data_type": "float32", "codecs": codecs,
                             "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}}}}
        stores[path] = ts.open(spec, create=True).result()
        stores[path].write(value).result()
    return stores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cfg = lj.LlamaConfig(vocab_size=32000, dim=args.dim, n_layers=args.layers, n_heads=max(1, args.dim // 64),
                         hidden_dim=args.dim * 11 // 4, max_seq_len=2048)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32), lj.param_shapes(cfg))
    size = sum(x.nbytes for x in jax.tree.leaves(params))
    work = tempfile.mkdtemp(prefix="integrity-", dir=os.environ.get("BENCH_DIR"))
    try:
        ckpt = os.path.join(work, "ckpt")
        start = time.perf_counter()
        lj.save_checkpoint(ckpt, cfg, params)
        save_s = time.perf_counter() - start
        manifest_s = timed(lambda: write_manifest(ckpt), ckpt, 1)
        load = lambda: jax.block_until_ready(lj.load_checkpoint(ckpt)[1])  # noqa: E731
        rows = {"verify_cold_s": timed(lambda: verify(ckpt, under=("params/",)), ckpt),
                "verify_warm_s": timed(lambda: verify(ckpt, under=("params/",))),
                "load_cold_s": timed(load, ckpt), "load_warm_s": timed(load)}
        with mock.patch.object(ckpt_format, "verify", lambda *a, **k: True):
            rows.update(load_unverified_cold_s=timed(load, ckpt), load_unverified_warm_s=timed(load))
        leaves = dict(leaf_paths(params))
        for crc in (False, True):
            folder = os.path.join(work, f"zarr3-{'crc32c' if crc else 'plain'}")
            stores = zarr3(folder, leaves, crc)
            read = lambda: [s.read().result() for s in stores.values()]  # noqa: E731
            name = "zarr3_crc32c" if crc else "zarr3_plain"
            rows[f"{name}_read_cold_s"], rows[f"{name}_read_warm_s"] = timed(read, folder), timed(read)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"bench": "integrity", "device": f"cpu ({os.cpu_count()} cores)", "checkpoint_bytes": size,
              "params": cfg.num_params(), "save_checkpoint_s": round(save_s, 3),
              "write_manifest_s": round(manifest_s, 3),
              **{k: round(v, 3) for k, v in rows.items()},
              "note": "best of 3; cold = page cache dropped per file; machine load at start: "
                      f"{os.getloadavg()[0]:.1f}"}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
