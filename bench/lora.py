"""LoRA and QLoRA against full fine-tuning of the same model: step time, peak memory, bytes of trained state.

    python bench/lora.py [--preset llama-1b --layers 4 --batch 4 --seq 512] [--smoke] [--out FILE]

All three run train.step's real sharded step on one device: full fine-tuning (fp32 params, grads,
Adam moments), LoRA (rank 16 on all seven projections, base frozen in the compute dtype) and QLoRA
(the base in nf4). Peak memory is XLA's for the compiled step (arguments + outputs not aliased +
temporaries + code, as the planner counts it); "trained state" is params + optimizer state.
The ratio column is LoRA / full fine-tuning (higher is better: faster, or less memory).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

import llama_jax as lj
from bench.common import device_name, median_seconds, row, write_result
from bench.train import random_batch
from llama_jax import lora, quant
from sharding import batch_sharding, make_mesh
from train import step as step_lib

GiB = 2**30
MODES = (("full", None), ("lora", "float32"), ("qlora", "nf4"))  # (name, frozen base dtype); GPU: bfloat16 base


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def measure(cfg: lj.LlamaConfig, base_dtype: str | None, batch: int, seq: int, iters: int) -> dict:
    """Step seconds, compile seconds, XLA peak bytes and state bytes of one mode's compiled step."""
    mesh = make_mesh(-1, 1, 1)
    schedule = step_lib.lr_schedule(1e-4, 1000, "constant")
    opt = step_lib.make_optimizer(schedule)
    if base_dtype is not None:
        cfg = cfg.replace(lora_rank=16, lora_alpha=32.0, lora_dropout=0.05)
    fn = step_lib.make_train_step(cfg, opt, schedule, mesh, (batch, seq), base_dtype=base_dtype or "bfloat16")
    with jax.set_mesh(mesh):
        full = lj.init_params(lora.without_lora(cfg), 0)
        args = []
        if base_dtype is None:
            trained = full
        else:
            trained = lora.init_adapters(cfg, 1)
            base = jax.tree.map(lambda x: x.astype(base_dtype if base_dtype in ("float32", "bfloat16") else "bfloat16"),
                                full)
            if base_dtype in quant.FORMATS:
                base = quant.quantize_params(base, cfg, base_dtype)
            args = [base]
        del full
        state = jax.jit(lambda p: step_lib.init_state(p, opt), out_shardings=step_lib.state_shardings(cfg, opt, mesh))(
            trained)
        data = jax.device_put(random_batch(cfg, batch, seq), batch_sharding(mesh, 2))
        state_bytes, base_bytes = nbytes(state), nbytes(args)
        start = time.perf_counter()
        compiled = fn.lower(state, data, *args).compile()
        compile_s = time.perf_counter() - start
        mem = compiled.memory_analysis()
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
        holder = {"state": state}

        def one():
            holder["state"], metrics = compiled(holder["state"], data, *args)
            jax.block_until_ready(metrics["loss"])

        step_s = median_seconds(one, iters, warmup=1)
    return {"step_s": step_s, "compile_s": compile_s, "peak_bytes": peak, "state_bytes": state_bytes,
            "base_bytes": base_bytes, "trained_params": sum(x.size for x in jax.tree.leaves(state["params"]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-1b")
    p.add_argument("--layers", type=int, default=4, help="override n_layers (a smaller model of the preset's width)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check)")
    p.add_argument("--out", help="write the JSON result here")
    args = p.parse_args()
    on_cpu = jax.devices()[0].platform == "cpu"
    preset, layers, batch, seq = ("tiny-gqa", 2, 4, 64) if args.smoke else (args.preset, args.layers, args.batch, args.seq)
    cfg = lj.LlamaConfig.preset(preset, n_layers=layers, dtype="float32" if on_cpu else "bfloat16", remat="full")
    results = {}
    for name, base_dtype in MODES:
        if base_dtype == "float32" and not on_cpu:
            base_dtype = "bfloat16"
        results[name] = measure(cfg, base_dtype, batch, seq, args.iters)
        r = results[name]
        print(f"{name:5s}: step {r['step_s']:.3f} s, peak {r['peak_bytes'] / GiB:.3f} GiB, trained state "
              f"{r['state_bytes'] / GiB:.4f} GiB ({r['trained_params']:,} params), frozen base "
              f"{r['base_bytes'] / GiB:.3f} GiB, compile {r['compile_s']:.1f} s", flush=True)
    full = results["full"]
    shape = f"{preset} {layers} layers bs {batch} seq {seq} {cfg.dtype}, rank 16 all projections"
    rows = []
    for name in ("lora", "qlora"):
        r = results[name]
        label = "LoRA (base " + ("float32" if on_cpu else "bfloat16") + ")" if name == "lora" else "QLoRA (nf4 base)"
        rows.append(row(f"{label} vs full FT, {shape}", "steps/s", 1 / r["step_s"], 1 / full["step_s"], "1/s"))
        rows.append(row(f"{label} vs full FT, {shape}", "1 / peak GiB", GiB / r["peak_bytes"], GiB / full["peak_bytes"],
                        "1/GiB", peak_gib=r["peak_bytes"] / GiB, full_peak_gib=full["peak_bytes"] / GiB))
        rows.append(row(f"{label} vs full FT, {shape}", "1 / trained-state GiB", GiB / r["state_bytes"],
                        GiB / full["state_bytes"], "1/GiB", state_bytes=r["state_bytes"],
                        full_state_bytes=full["state_bytes"], base_bytes=r["base_bytes"]))
    write_result(args.out, {"bench": "lora", "device": device_name(), "results": results, "rows": rows})


if __name__ == "__main__":
    main()
