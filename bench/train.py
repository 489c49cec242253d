"""Training throughput: tokens/s and MFU of our jit train step, next to HF transformers' PyTorch
training of the same model on the same card (when PyTorch + CUDA are present, or with --peer-cpu).

    python bench/train.py                  # llama-1b seq 2048 bs 8, and llama2-7b shape with 8 layers seq 4096
    python bench/train.py --smoke          # tiny shapes, runs on a CPU in about a minute
    python bench/train.py --preset llama-1b --batch 4 --seq 1024 --layers 4 --grad-accum 2

Our step: bfloat16 compute (float32 on CPU), float32 master params and AdamW moments, remat "full",
global-norm clipping, one device mesh over all devices (data parallel). The peer: a random
LlamaForCausalLM in float32 under torch.autocast(bfloat16) with fused AdamW, the usual HF recipe.
MFU = tokens/s * (6 * (params - input embedding) + 6 * layers * dim * seq) / (chips * peak); peak
from the chip table (sharding/hardware.py) or --peak-tflops (e.g. a CPU's measured matmul rate).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

import llama_jax as lj
from bench.common import device_name, free_torch, hf_peer_model, median_seconds, row, write_result
from llama_jax import flops
from sharding import batch_sharding, chip_of, make_mesh
from train import step as step_lib

FULL = [("llama-1b", None, 8, 2048), ("llama2-7b", 8, 1, 4096)]  # (preset, layers, batch, seq)
SMOKE = [("demo", None, 4, 128), ("tiny-gqa", 4, 4, 256)]


def random_batch(cfg: lj.LlamaConfig, batch: int, seq: int) -> dict:
    r = np.random.default_rng(0)
    tokens = r.integers(3, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((batch, seq), np.float32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "segment_ids": np.ones((batch, seq), np.int32)}


def ours(cfg: lj.LlamaConfig, batch: int, seq: int, grad_accum: int, iters: int) -> tuple[float, float]:
    """(median step seconds, compile seconds) of the sharded, donated train step."""
    mesh = make_mesh(-1, 1, 1)
    schedule = step_lib.lr_schedule(1e-4, 1000, "constant")
    opt = step_lib.make_optimizer(schedule)
    shardings = step_lib.state_shardings(cfg, opt, mesh)
    fn = step_lib.make_train_step(cfg, opt, schedule, mesh, (batch, seq), grad_accum)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda p: step_lib.init_state(p, opt), out_shardings=shardings, donate_argnums=0)(
            lj.init_params(cfg, 0))
        data = jax.device_put(random_batch(cfg, batch, seq), batch_sharding(mesh, 2))
        holder = {"state": state}

        def one():
            holder["state"], metrics = fn(holder["state"], data)
            jax.block_until_ready(metrics["loss"])

        start = time.perf_counter()
        one()
        compile_s = time.perf_counter() - start
        return median_seconds(one, iters, warmup=1), compile_s


def peer(cfg: lj.LlamaConfig, batch: int, seq: int, iters: int, allow_cpu: bool) -> float | None:
    """Median step seconds of HF transformers training the same model, or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() and not allow_cpu:
        return None
    model = hf_peer_model(cfg, dtype="float32")
    if model is None:
        return None
    model.train()
    model.gradient_checkpointing_enable()
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1,
                            fused=device.type == "cuda")
    tokens = torch.as_tensor(random_batch(cfg, batch, seq)["tokens"], dtype=torch.long, device=device)
    amp = torch.bfloat16 if device.type == "cuda" else torch.float32

    def one():
        with torch.autocast(device.type, dtype=amp, enabled=device.type == "cuda"):
            loss = model(tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    seconds = median_seconds(one, iters, warmup=1)
    del model, opt
    free_torch()
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check)")
    p.add_argument("--preset", help="one model instead of the default pair")
    p.add_argument("--layers", type=int, help="override n_layers (a 7B shape with fewer layers)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="per-chip peak for MFU (default: data sheet)")
    p.add_argument("--peer-cpu", action="store_true", help="also time the HF peer on a CPU (slow)")
    p.add_argument("--out", help="write the JSON result here")
    args = p.parse_args()

    on_cpu = jax.devices()[0].platform == "cpu"
    shapes = [(args.preset, args.layers, args.batch, args.seq)] if args.preset else (SMOKE if args.smoke else FULL)
    peak = args.peak_tflops * 1e12 or getattr(chip_of(jax.devices()[0]), "peak_bf16_flops", None)
    rows = []
    for preset, layers, batch, seq in shapes:
        overrides = {"n_layers": layers} if layers else {}
        cfg = lj.LlamaConfig.preset(preset, **overrides, dtype="float32" if on_cpu else "bfloat16",
                                    remat="full", max_seq_len=max(seq, 256))
        peer_s = peer(cfg, batch, seq, args.iters, args.peer_cpu)
        step_s, compile_s = ours(cfg, batch, seq, args.grad_accum, args.iters)
        tokens = batch * seq
        name = f"train {preset}{f' {layers} layers' if layers else ''} bs {batch} seq {seq} {cfg.dtype}"
        n = jax.device_count()
        ours_mfu = flops.mfu(tokens / step_s, cfg, seq, n, peak)
        peer_mfu = None if peer_s is None else flops.mfu(tokens / peer_s, cfg, seq, n, peak)
        rows.append(row(name, "tokens/s", tokens / step_s, None if peer_s is None else tokens / peer_s, "tok/s",
                        mfu=ours_mfu, peer_mfu=peer_mfu, step_s=step_s, compile_s=compile_s,
                        params=cfg.num_params(), flops_per_token=flops.train_flops_per_token(cfg, seq)))
        print(f"{name}: {tokens / step_s:,.0f} tok/s, step {step_s * 1e3:.1f} ms, MFU "
              f"{'n/a' if ours_mfu is None else f'{ours_mfu:.1%}'}; HF peer "
              f"{'n/a' if peer_s is None else f'{tokens / peer_s:,.0f} tok/s'}", flush=True)
    write_result(args.out, {"bench": "train", "device": device_name(), "peak_tflops": peak and peak / 1e12,
                            "rows": rows})


if __name__ == "__main__":
    main()
