"""Forward-pass benchmark: compile time and steady-state run time of the jitted forward.

    python bench/forward.py --preset llama-1b --batch 1 --seq 128 [--dtype bfloat16]

Prints one table row; params are random (nothing is downloaded). On a 2-core CPU use small
batch/seq: a 1B-sized model is ~4 GB in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

import llama_jax as lj


def hf_forward_seconds(cfg: lj.LlamaConfig, batch: int, seq: int, iters: int) -> float | None:
    """The same forward in HF transformers (PyTorch, eager attention) on this machine, or None."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_config().items() if k != "architectures"})
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    model = transformers.LlamaForCausalLM(hf_cfg).to(dtype).eval()
    tokens = torch.zeros((batch, seq), dtype=torch.long)
    with torch.no_grad():
        model(tokens)  # warm-up
        start = time.perf_counter()
        for _ in range(iters):
            model(tokens)
    seconds = (time.perf_counter() - start) / iters
    del model
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true", help="skip HF transformers (PyTorch) in the same run")
    args = parser.parse_args()

    cfg = lj.LlamaConfig.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype)
    params = lj.init_params(cfg, 0)
    tokens = jnp.zeros((args.batch, args.seq), jnp.int32)

    start = time.perf_counter()
    compiled = jax.jit(lambda p, t: lj.forward(p, t, cfg)).lower(params, tokens).compile()
    compile_s = time.perf_counter() - start
    compiled(params, tokens).block_until_ready()  # warm-up
    start = time.perf_counter()
    for _ in range(args.iters):
        compiled(params, tokens).block_until_ready()
    run_s = (time.perf_counter() - start) / args.iters

    peer_s = None if args.no_peer else hf_forward_seconds(cfg, args.batch, args.seq, args.iters)
    flops = 2 * (cfg.num_params() - cfg.vocab_size * cfg.dim) * args.batch * args.seq  # matmul FLOPs
    row = {
        "preset": args.preset, "params": cfg.num_params(), "batch": args.batch, "seq": args.seq,
        "dtype": args.dtype, "compile_s": round(compile_s, 2), "run_s": round(run_s, 4),
        "tokens_per_s": round(args.batch * args.seq / run_s, 1), "gflops_per_s": round(flops / run_s / 1e9, 1),
        "hf_torch_run_s": None if peer_s is None else round(peer_s, 4),
        "speedup_vs_hf": None if peer_s is None else round(peer_s / run_s, 2),
        "device": f"{jax.devices()[0].device_kind} ({os.cpu_count()} cores, {platform.machine()})",
    }
    print(json.dumps(row))
    print(f"| {row['preset']} | {row['batch']}x{row['seq']} | {row['dtype']} | compile {row['compile_s']} s | "
          f"run {row['run_s']} s (HF torch {row['hf_torch_run_s']} s, x{row['speedup_vs_hf']}) | {row['tokens_per_s']} tok/s | {row['gflops_per_s']} GFLOP/s | {row['device']} |")


if __name__ == "__main__":
    main()
