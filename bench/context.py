"""Context parallelism: what the load-balanced order and the K/V all-gather cost, read off compiled programs.

    python bench/context.py                        # v5p, Llama-3.1-8B at 32k and 128k over 8 context shards
    python bench/context.py --topology v5p-16 --seq 32768 --shards 4 8

Rows (libtpu compiles for the TPU; no TPU needed):
(1) balance: the splash kernel's own block schedule (the mask info `make_splash_mha` builds: the
    blocks each query shard computes; fully masked blocks are skipped) for one causal sequence over c
    shards, in the load-balanced order ("ours", sharding/context.py) against contiguous chunks ("peer").
    The step waits for the busiest shard, so the row is mean / max of the shards' blocks (1.0 = even).
(2) all-gather vs compute: per layer and chip, the bytes the compiled TPU program moves for K/V
    (every all-gather / reduce-scatter / all-reduce over the whole sequence in the HLO of one layer of
    the real model, splash attention, forward + backward with remat) against the layer's attention
    FLOPs (forward + backward, causal: llama_jax.flops) at the chip's peak: the interconnect bandwidth
    at which moving K/V takes as long as computing attention. A ring moves the same bytes in c-1 steps.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

import llama_jax as lj
from bench.common import row, sig, write_result
from llama_jax import flops
from sharding import balanced_order, make_mesh
from train.planner import lower_step, tpu_devices

BLOCK = 512  # the splash block the model uses for these lengths (llama_jax/attention.py)
BYTES = {"bf16": 2, "f32": 4, "s32": 4}


def shard_blocks(seq: int, shards: int, balanced: bool) -> list[int]:
    """Blocks of the splash kernel's forward grid that each query shard computes (not fully masked)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as info

    mask = masks.CausalMask((seq, seq))
    if balanced:
        mask.q_sequence = balanced_order(seq, shards).astype(np.int32)
    mask_info, _ = info.process_mask(masks.MultiHeadMask([mask]), (BLOCK, BLOCK), q_seq_shards=shards)
    active = np.asarray(mask_info.block_mask)[0] != 0  # (q blocks, kv blocks)
    return [int(part.sum()) for part in np.split(active, shards)]


def sequence_collectives(cfg: lj.LlamaConfig, devices: list, shards: int, seq: int) -> tuple[float, int]:
    """Bytes per chip moved by the collectives over the whole sequence in one layer's train step (the
    planner's program: train.step as the loop builds it), and how many such collectives it holds."""
    mesh = make_mesh(data=1, fsdp=len(devices) // shards, context=shards, devices=devices)
    lowered, _ = lower_step(cfg, mesh, mesh.shape["fsdp"], seq)
    text = lowered.compile().as_text()
    moved, count = 0.0, 0
    for line in text.splitlines():
        op = re.search(r"(all-gather|reduce-scatter|all-reduce)(-start)?\(", line)
        if not op or "=" not in line:
            continue
        for dtype, dims in re.findall(r"(bf16|f32|s32)\[([\d,]+)\]", line.split("=", 1)[1].split(op.group(0))[0]):
            dims = [int(d) for d in dims.split(",")]
            if seq in dims and len(dims) == 4:  # (batch, seq, kv heads, head dim): K, V or their gradients
                moved += math.prod(dims) * BYTES[dtype] * (shards - 1) / shards
                count += 1
                break
    return moved, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p-16", help="the TPU slice compiled for (libtpu)")
    parser.add_argument("--model", default="llama3.1-8b")
    parser.add_argument("--seq", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--shards", type=int, nargs="+", default=[8])
    parser.add_argument("--out")
    args = parser.parse_args()

    chip, devices = tpu_devices(args.topology)
    rows = []
    for seq in args.seq:
        for shards in args.shards:
            balanced, natural = shard_blocks(seq, shards, True), shard_blocks(seq, shards, False)
            rows.append(row(f"causal {seq} over {shards} shards: splash blocks per shard, mean / busiest",
                            "balance", np.mean(balanced) / max(balanced), np.mean(natural) / max(natural), "",
                            ours_blocks=balanced, peer_blocks=natural))
            cfg = lj.LlamaConfig.preset(args.model, n_layers=1, dtype="bfloat16", remat="full", attention="splash",
                                        max_seq_len=max(seq, 8))
            moved, count = sequence_collectives(cfg, devices, shards, seq)
            tokens = seq // shards  # one sequence's share per chip
            attention = 3 * flops.attention_flops_per_token(cfg, seq) * tokens  # forward + backward, causal
            seconds = attention / chip.peak_bf16_flops
            rows.append({"config": f"{args.model} layer, seq {seq}, context {shards} on {chip.name}",
                         "kv_collectives": count, "kv_bytes_per_layer_gib": sig(moved / 2**30),
                         "attention_tflop_per_layer": sig(attention / 1e12),
                         "attention_ms_at_peak": sig(seconds * 1e3),
                         "bandwidth_to_match_gb_s": sig(moved / seconds / 1e9)})
    write_result(args.out, {"bench": "context", "device": f"{chip.name} (compiled with libtpu, not run)",
                            "peer": "contiguous sequence chunks (no load balancing)", "rows": rows})


if __name__ == "__main__":
    main()
