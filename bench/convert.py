"""Benchmark: convert a synthetic Meta checkpoint (random bf16) and compare with plain I/O.

    python bench/convert.py --shape 7b              # 13.5 GB, one file: needs ~45 GB free disk
    python bench/convert.py --shape 13b-layers      # 13B shapes, 2 shards, first 8 layers
    python bench/convert.py --shape tiny            # seconds; a smoke test of this script
    python bench/convert.py --shape 7b --layers 4   # 7B shapes, first 4 layers (quick profiling)

Measures, on the same files: `cat SRC > /dev/null` (read), `cp SRC` + sync (read + write of the
same bytes), `python -m llama_jax.convert meta` + sync (wall time and peak RSS from
/usr/bin/time -v), and loading the whole state dict into RAM the way peers' converters do
(peak RSS ~ checkpoint size). Prints a table and writes bench/results/convert.json; deletes
the files afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llama_jax import layout  # noqa: E402
from llama_jax.config import LlamaConfig  # noqa: E402

SHAPES = {
    "7b": (LlamaConfig.preset("llama2-7b"), 1),
    "13b-layers": (LlamaConfig.preset("llama2-13b", n_layers=8), 2),
    "tiny": (LlamaConfig.preset("demo", n_layers=2), 2),
}


def write_meta(folder: str, cfg: LlamaConfig, shards: int) -> int:
    """params.json + consolidated.NN.pth of random bf16 weights split like Meta's; returns bytes."""
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    total = 0
    for rank in range(shards):
        sd = {}
        for entry, _, name in layout.names(cfg, "meta"):
            shape = list(layout.torch_shape(entry, cfg))
            if entry.meta_split_dim is None:  # replicated (norms): the same on every rank
                sd[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                shape[entry.meta_split_dim] //= shards
                sd[name] = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
            total += sd[name].nbytes
        sd["rope.freqs"] = torch.zeros(cfg.head_dim // 2, dtype=torch.bfloat16)
        torch.save(sd, os.path.join(folder, f"consolidated.{rank:02d}.pth"))
        del sd
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "multiple_of": cfg.multiple_of,
              "norm_eps": cfg.norm_eps, "vocab_size": -1, "n_kv_heads": cfg.n_kv_heads}
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f)
    return total


def timed(command: list[str] | str, shell: bool = False) -> dict:
    """Wall time and peak RSS (GNU time -v) of a command, followed by `sync`."""
    cmd = ["/usr/bin/time", "-v"] + (["sh", "-c", command] if shell else command)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"wall_s": round(wall, 2), "peak_rss_gb": round(rss_kb / 2**20, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--dir", default="/tmp/llama_jax_bench_convert")
    parser.add_argument("--layers", type=int, default=None, help="only the first N layers of the shape")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args()
    cfg, shards = SHAPES[args.shape]
    if args.layers is not None:
        if not 1 <= args.layers <= cfg.n_layers:
            raise SystemExit(f"--layers {args.layers}: expected 1..{cfg.n_layers} for --shape {args.shape}")
        cfg = cfg.replace(n_layers=args.layers)
    label = args.shape if args.layers is None else f"{args.shape}-{args.layers}layers"
    src, out, copy = (os.path.join(args.dir, n) for n in ("meta", "out", "copy"))
    shutil.rmtree(args.dir, ignore_errors=True)
    try:
        start = time.perf_counter()
        nbytes = write_meta(src, cfg, shards)
        print(f"wrote {nbytes / 1e9:.2f} GB of random bf16 ({shards} shard(s)) in {time.perf_counter() - start:.0f}s")
        files = " ".join(os.path.join(src, f) for f in sorted(os.listdir(src)) if f.endswith(".pth"))
        python = sys.executable
        results = {
            "read (cat > /dev/null)": timed(f"cat {files} > /dev/null", shell=True),
            "read + write (cp + sync)": timed(f"mkdir -p {copy} && cp {files} {copy}/", shell=True),
            "llama_jax.convert meta": timed([python, "-m", "llama_jax.convert", "meta", src, out, "--no-progress"]),
            "whole state dict in RAM (peers)": timed(
                [python, "-c", "import glob, sys, torch; sds = [torch.load(f, weights_only=True) for f in "
                 "sorted(glob.glob(sys.argv[1] + '/consolidated.*.pth'))]; print(sum(t.nbytes for sd in sds for t in "
                 "sd.values()))", src]),
        }
        ratio = results["llama_jax.convert meta"]["wall_s"] / results["read + write (cp + sync)"]["wall_s"]
        print(f"\n{label}: {nbytes / 1e9:.2f} GB, {shards} shard(s), {os.cpu_count()} CPU cores")
        print(f"{'step':36s} {'wall s':>8s} {'peak RSS GB':>12s}")
        for name, r in results.items():
            print(f"{name:36s} {r['wall_s']:8.2f} {r['peak_rss_gb']:12.3f}")
        print(f"convert / (read + write) = {ratio:.2f}x")
        os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
        with open(os.path.join(ROOT, "bench", "results", f"convert_{label}.json"), "w") as f:
            json.dump({"shape": label, "bytes": nbytes, "shards": shards, "results": results,
                       "convert_over_read_write": round(ratio, 3)}, f, indent=2)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
