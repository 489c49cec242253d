"""Forward-pass benchmark: compile time and steady-state run time of the jitted forward, HF beside it.

    python bench/forward.py --preset llama-1b --batch 1 --seq 128 [--dtype bfloat16]
    python bench/forward.py --smoke          # a tiny model, seconds on a CPU

Params are random (nothing is downloaded). On a 2-core CPU use small batch/seq: a 1B-sized model
is ~4 GB in float32. The peer is HF transformers' LlamaForCausalLM of the same shape and dtype
(eager attention on a CPU, sdpa on a GPU), timed in the same process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

import llama_jax as lj
from bench.common import device_name, free_torch, hf_peer_model, median_seconds, row, torch_sync, write_result
from llama_jax.flops import forward_flops_per_token


def peer_seconds(cfg: lj.LlamaConfig, batch: int, seq: int, iters: int) -> float | None:
    """The same forward in HF transformers (PyTorch) on this machine, or None without torch."""
    import torch

    model = hf_peer_model(cfg, cfg.dtype, "eager" if jax.devices()[0].platform == "cpu" else "sdpa")
    if model is None:
        return None
    tokens = torch.zeros((batch, seq), dtype=torch.long, device=next(model.parameters()).device)

    def run():
        with torch.no_grad():
            model(tokens)
        torch_sync()

    seconds = median_seconds(run, iters, warmup=1)
    del model
    free_torch()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true", help="skip HF transformers (PyTorch) in the same run")
    parser.add_argument("--smoke", action="store_true", help="the tiny demo preset (a CPU check)")
    parser.add_argument("--out", help="write the JSON result here")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.seq = "demo", min(args.seq, 64)

    cfg = lj.LlamaConfig.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype)
    peer_s = None if args.no_peer else peer_seconds(cfg, args.batch, args.seq, args.iters)
    params = lj.init_params(cfg, 0)
    tokens = jnp.zeros((args.batch, args.seq), jnp.int32)
    start = time.perf_counter()
    compiled = jax.jit(lambda p, t: lj.forward(p, t, cfg)).lower(params, tokens).compile()
    compile_s = time.perf_counter() - start
    run_s = median_seconds(lambda: compiled(params, tokens).block_until_ready(), args.iters, warmup=1)

    tokens_n = args.batch * args.seq
    flops = forward_flops_per_token(cfg, args.seq) * tokens_n
    config = f"forward {args.preset} {args.batch}x{args.seq} {args.dtype}"
    rows = [row(config, "tokens/s", tokens_n / run_s, None if peer_s is None else tokens_n / peer_s, "tok/s",
                run_s=run_s, peer_run_s=peer_s, compile_s=compile_s, tflops=flops / run_s / 1e12)]
    print(f"{config}: compile {compile_s:.2f} s, run {run_s:.4f} s ({tokens_n / run_s:,.0f} tok/s, "
          f"{flops / run_s / 1e9:,.1f} GFLOP/s); HF torch {'n/a' if peer_s is None else f'{peer_s:.4f} s'}", flush=True)
    write_result(args.out, {"bench": "forward", "device": device_name(), "rows": rows})


if __name__ == "__main__":
    main()
