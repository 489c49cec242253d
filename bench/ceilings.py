"""The two ceilings every other number is judged against, measured on this card in this run.

    python bench/ceilings.py [--smoke] [--out FILE]

bf16 matrix product (n x n x n, random data, 2*n^3 FLOPs) and device memory bandwidth (x + 1 over
a large array: bytes read plus bytes written), in JAX and in PyTorch on the same card.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from bench.common import device_name, median_seconds, row, torch_sync, write_result


def torch_ceilings(n: int, elements: int, iters: int) -> tuple[float, float] | None:
    """(matmul s, x+1 s) in PyTorch, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    x = torch.randn(elements, device=device, dtype=torch.bfloat16)

    def matmul():
        a @ b
        torch_sync()

    def add():
        x + 1
        torch_sync()

    return median_seconds(matmul, iters), median_seconds(add, iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192, help="matrix size")
    parser.add_argument("--gib", type=float, default=2.0, help="GiB of bf16 read by the bandwidth test")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.gib, args.iters = 256, 1 / 256, 3

    elements = int(args.gib * 2**30 / 2)
    ka, kb, kx = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(ka, (args.n, args.n), jnp.bfloat16)
    b = jax.random.normal(kb, (args.n, args.n), jnp.bfloat16)
    x = jax.random.normal(kx, (elements,), jnp.bfloat16)
    matmul = jax.jit(lambda a, b: a @ b)
    add = jax.jit(lambda x: x + jnp.bfloat16(1))
    matmul_s = median_seconds(lambda: matmul(a, b).block_until_ready(), args.iters)
    add_s = median_seconds(lambda: add(x).block_until_ready(), args.iters)
    del a, b, x
    peer = torch_ceilings(args.n, elements, args.iters)

    flops, moved = 2 * args.n**3, 2 * elements * 2
    rows = [
        row(f"bf16 matmul {args.n}^3", "TFLOP/s", flops / matmul_s / 1e12, None if peer is None else flops / peer[0] / 1e12,
            "TFLOP/s"),
        row(f"bf16 x+1 over {args.gib:g} GiB", "GB/s (read+write)", moved / add_s / 1e9,
            None if peer is None else moved / peer[1] / 1e9, "GB/s"),
    ]
    write_result(args.out, {"bench": "ceilings", "device": device_name(), "peer": "torch", "rows": rows,
                            "matmul_tflops": rows[0]["ours"], "bandwidth_gbs": rows[1]["ours"]})


if __name__ == "__main__":
    main()
