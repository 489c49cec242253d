"""The README's LoRA/QLoRA fit table: train.planner's compiled LoRA step for each model x base x TPU slice x seq.

    python bench/lora_plans.py [--out lora_plans.jsonl] [--only llama2-7b] [--seqs 512]   # libtpu, no TPU needed

Each plan (fsdp over all chips, remat full, splash attention as the TPU recipes use, LoRA rank 16 on all
seven projections) compiles the real sharded LoRA step twice (the requested batch and the smallest one) and
extrapolates the largest batch that fits; a base that alone exceeds a chip's HBM is reported without
compiling. Results are appended to --out as JSON lines (a rerun skips the rows already there) and the
table is printed at the end. Big compiles take minutes each on a small CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama_jax import lora  # noqa: E402
from llama_jax.config import LlamaConfig  # noqa: E402
from sharding import make_mesh, tree_shardings  # noqa: E402
from sharding.hardware import GiB  # noqa: E402
from train import planner  # noqa: E402

RANK = 16  # on all seven projections (the QLoRA paper's setting; alpaca-lora's r 8 on q/v is lighter)
# The goals first (7B on one v5e chip, 70B QLoRA on one host), then the rest of the table.
FIRST = [("llama2-7b", "bfloat16", "v5e-1"), ("llama2-7b", "nf4", "v5e-1"), ("llama2-70b", "nf4", "v5e-8"),
         ("llama2-70b", "nf4", "v5p-8")]
PLANS = FIRST + [(model, base, topology) for model in ("llama2-7b", "llama2-13b") for topology in ("v5e-1", "v5e-8", "v4-8")
                 for base in ("bfloat16", "nf4") if (model, base, topology) not in FIRST]
ORDER = [(m, b, t) for m in ("llama2-7b", "llama2-13b", "llama2-70b") for t in ("v5e-1", "v5e-8", "v4-8", "v5p-8")
         for b in ("bfloat16", "nf4") if (m, b, t) in PLANS]  # the table's row order
SEQS = (512, 2048)


def base_bytes_per_chip(model: str, base: str, topology: str) -> tuple[int, int]:
    """(bytes of the frozen base per chip under fsdp over all chips, chip HBM), without compiling."""
    chip, devices = planner.tpu_devices(topology)
    cfg = LlamaConfig.preset(model, lora_rank=RANK)
    axes, shapes = lora.base_layout(cfg, base)
    mesh = make_mesh(data=1, fsdp=-1, tensor=1, devices=devices)
    return planner._bytes_per_device(shapes, tree_shardings(axes, shapes, mesh)), chip.hbm_bytes


def one(model: str, base: str, topology: str, seq: int) -> dict:
    row = {"model": model, "base": base, "topology": topology, "seq": seq, "rank": RANK}
    held, hbm = base_bytes_per_chip(model, base, topology)
    if held > hbm:
        return {**row, "fits": False, "max_batch": 0, "base_gib": held / GiB, "note": "base alone exceeds HBM"}
    chips = planner.parse_topology(topology)[2]
    batch = chips * (4 if seq == 512 else 1)  # both compiles fit where anything does: a measured slope
    started = time.time()
    p = planner.plan(model, topology, {"data": 1, "fsdp": -1, "tensor": 1}, batch, seq, "full", attention="splash", lora_rank=RANK, base_dtype=base,
                     say=lambda line: print(line, file=sys.stderr, flush=True))
    print(p.report(), file=sys.stderr, flush=True)
    return {**row, "batch": batch, "fits": p.fits, "max_batch": p.max_batch, "peak_gib": p.at_batch.peak_bytes / GiB,
            "min_batch": p.at_min.batch, "min_peak_gib": p.at_min.peak_bytes / GiB, "base_gib": p.sizes["base"] / GiB,
            "per_row_gib": p.bytes_per_row / GiB, "hbm_gib": p.hbm_bytes / GiB, "compile_s": time.time() - started}


def table(rows: list[dict]) -> str:
    lines = ["| model | method | slice | per-chip base | largest batch x 512 | largest batch x 2048 |",
             "|---|---|---|---|---|---|"]
    for model, base, topology in ORDER:
        got = {r["seq"]: r for r in rows if (r["model"], r["base"], r["topology"]) == (model, base, topology)}
        if not got:
            continue
        def cell(seq: int) -> str:
            r = got.get(seq)
            if r is None:
                return "-"
            if r.get("note"):
                return f"none ({r['note']})"
            if not r["max_batch"]:
                return f"none (batch {r['min_batch']} needs {r['min_peak_gib']:.1f} GiB)"
            return f"{r['max_batch']} ({r['peak_gib']:.1f} GiB at {r['batch']})"
        method = "LoRA, bf16 base" if base == "bfloat16" else f"QLoRA, {base} base"
        first = next(iter(got.values()))
        lines.append(f"| {model} | {method} | {topology} | {first['base_gib']:.2f} GiB | {cell(512)} | {cell(2048)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="lora_plans.jsonl")
    parser.add_argument("--only", default=None, help="only this model (e.g. llama2-7b)")
    parser.add_argument("--seqs", type=int, nargs="+", default=list(SEQS), help="sequence lengths (512 2048)")
    args = parser.parse_args()
    done = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = [json.loads(line) for line in f if line.strip()]
    seen = {(r["model"], r["base"], r["topology"], r["seq"]) for r in done}
    for model, base, topology in PLANS:
        for seq in args.seqs:
            if (model, base, topology, seq) in seen or (args.only and model != args.only):
                continue
            row = one(model, base, topology, seq)
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            done.append(row)
    print(table(done))


if __name__ == "__main__":
    main()
