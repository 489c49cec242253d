"""The preference step against the SFT step of the same model: step time per row, and what DPO's reference costs.

    python bench/preference.py [--preset demo --batch 8 --seq 128] [--lora] [--smoke] [--out FILE]

All run train.step's real compiled step on one device, on random tokens: SFT on `batch` rows (the
baseline), DPO / SimPO / reward-model steps on `batch` pairs (2 x batch sequences of `seq`), and
DPO's reference pass (train/reference.py: the starting model's forward over `batch` pairs, run once
per pair before training). The last row prices the design not taken: a reference model run inside
every step (the LoRA base with adapters switched off) would add that forward to every step; the
precomputed pass pays it once per pair instead of once per pair per epoch. "ratio" is ours / the
SFT baseline as rates (steps/s; per sequence: sequences/s).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

import llama_jax as lj
from bench.common import device_name, median_seconds, row, write_result
from bench.train import random_batch
from llama_jax import lora, reward
from sharding import batch_sharding, make_mesh
from train import objectives
from train import step as step_lib

OBJECTIVES = ("sft", "dpo", "simpo", "reward")


def pair_batch(cfg: lj.LlamaConfig, batch: int, seq: int) -> dict:
    """`batch` random pairs: each side's second half is its answer (weights 1)."""
    flat = random_batch(cfg, 2 * batch, seq)
    flat["weights"][:, : seq // 2] = 0.0
    out = {k: v.reshape(batch, 2, seq) for k, v in flat.items()}
    return {**out, "margin": np.zeros((batch,), np.float32), "reference": np.full((batch, 2), -50.0, np.float32)}


def measure(cfg: lj.LlamaConfig, objective: str, batch: int, seq: int, iters: int, use_lora: bool) -> dict:
    mesh = make_mesh(-1, 1, 1)
    schedule = step_lib.lr_schedule(1e-5, 1000, "constant")
    opt = step_lib.make_optimizer(schedule)
    if use_lora:
        cfg = cfg.replace(lora_rank=16, lora_alpha=32.0)
    fn = step_lib.make_train_step(cfg, opt, schedule, mesh, (batch, seq), base_dtype="float32", objective=objective,
                                  beta=0.1 if objective == "dpo" else 2.0)
    with jax.set_mesh(mesh):
        full = lj.init_params(lora.without_lora(cfg), 0)
        base = [full] if use_lora else []
        trained = lora.init_adapters(cfg, 1) if use_lora else (reward.from_lm(full, cfg) if objective == "reward"
                                                               else full)
        state = jax.jit(lambda p: step_lib.init_state(p, opt),
                        out_shardings=step_lib.state_shardings(cfg, opt, mesh, objective))(trained)
        data = random_batch(cfg, batch, seq) if objective == "sft" else pair_batch(cfg, batch, seq)
        if objective != "dpo":
            data.pop("reference", None)
        data = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in data.items()}
        holder = {"state": state}

        def one() -> None:
            holder["state"], metrics = fn(holder["state"], data, *base)
            jax.block_until_ready(metrics["loss"])

        step_s = median_seconds(one, iters, warmup=1)
        out = {"step_s": step_s, "sequences": batch * (1 if objective == "sft" else 2)}
        if objective == "dpo":  # the reference pass over the same pairs: forward only, the starting model
            score = objectives.make_reference_fn(cfg, mesh)
            params = full if use_lora else holder["state"]["params"]
            out["reference_s"] = median_seconds(lambda: jax.block_until_ready(score(params, data)), iters, warmup=1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--layers", type=int, default=None, help="override n_layers")
    p.add_argument("--batch", type=int, default=8, help="SFT rows, or preference pairs (2 sequences each)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--lora", action="store_true", help="LoRA rank 16 on a frozen float32 base")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check)")
    p.add_argument("--out", help="write the JSON result here")
    args = p.parse_args()
    preset, batch, seq, iters = ("tiny-gqa", 2, 32, 2) if args.smoke else (args.preset, args.batch, args.seq, args.iters)
    on_cpu = jax.devices()[0].platform == "cpu"
    extra = {} if args.layers is None else {"n_layers": args.layers}
    cfg = lj.LlamaConfig.preset(preset, dtype="float32" if on_cpu else "bfloat16", **extra)
    results = {}
    for objective in OBJECTIVES:
        if objective == "reward" and args.lora:
            continue
        results[objective] = r = measure(cfg, objective, batch, seq, iters, args.lora)
        print(f"{objective:6s}: step {r['step_s'] * 1e3:8.1f} ms ({r['sequences']} sequences)"
              + (f", reference pass {r['reference_s'] * 1e3:.1f} ms" if "reference_s" in r else ""), flush=True)
    sft = results["sft"]
    shape = f"{preset} ({cfg.num_params() / 1e6:.2f}M){' LoRA r16' if args.lora else ''}, {batch} rows/pairs x seq {seq}"
    rows = []
    for objective, r in results.items():
        if objective == "sft":
            continue
        rows.append(row(f"{objective} step vs SFT step, {shape}", "steps/s", 1 / r["step_s"], 1 / sft["step_s"], "1/s",
                        step_s=r["step_s"], sft_step_s=sft["step_s"]))
        rows.append(row(f"{objective} step vs SFT step per sequence, {shape}", "sequences/s",
                        r["sequences"] / r["step_s"], sft["sequences"] / sft["step_s"], "1/s"))
    dpo = results["dpo"]
    rows.append(row(f"DPO step + an in-step reference forward vs DPO step (precomputed), {shape}", "steps/s",
                    1 / (dpo["step_s"] + dpo["reference_s"]), 1 / dpo["step_s"], "1/s", reference_s=dpo["reference_s"]))
    write_result(args.out, {"bench": "preference", "device": device_name(), "load": os.getloadavg()[0],
                            "results": results, "rows": rows})


if __name__ == "__main__":
    main()
