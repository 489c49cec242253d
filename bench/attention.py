"""Causal GQA attention, forward and forward+backward, for each implementation behind the switch.

    python bench/attention.py                      # B4 T2048 32q/8kv heads hd128 bf16 (the issue's shape)
    python bench/attention.py --smoke              # tiny shapes, runs on a CPU in seconds
    python bench/attention.py --segments 4         # packed rows: 4 documents per row (segment ids)

Implementations run where they exist: "xla" everywhere, "cudnn" on NVIDIA GPUs, "splash" on TPUs.
Each is first checked against float32 XLA attention on the same random inputs (output and the
three input gradients, relative error), then timed (median). The peer is PyTorch's
scaled_dot_product_attention (enable_gqa, is_causal) in the same process, on the same card.
FLOPs follow the FlashAttention convention: forward 4*B*H*T*T*hd/2 (causal), backward 2.5x that.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import device_name, median_seconds, row, sig, torch_sync, write_result
from llama_jax.attention import attend

AVAILABLE = {"cpu": ("xla",), "gpu": ("xla", "cudnn"), "tpu": ("xla", "splash")}


def inputs(seed: int, b: int, t: int, h: int, kv: int, hd: int, segments: int) -> tuple:
    r = np.random.default_rng(seed)
    q, k, v, dout = (r.standard_normal(s).astype(np.float32) for s in
                     ((b, t, h, hd), (b, t, kv, hd), (b, t, kv, hd), (b, t, h, hd)))
    ids = np.repeat(np.arange(segments), -(-t // segments))[:t]  # equal documents, packed
    return q, k, v, dout, np.broadcast_to(ids, (b, t)).astype(np.int32)


def rel_err(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b)) if np.isfinite(a).all() else float("nan")


def jax_functions(implementation: str, segments: bool):
    def out(q, k, v, ids):
        return attend(q, k, v, None, True, implementation, segment_ids=ids if segments else None)

    def out_and_grads(q, k, v, ids, dout):  # fwd+bwd: the vjp with a given output cotangent
        o, vjp = jax.vjp(lambda q, k, v: out(q, k, v, ids), q, k, v)
        return (o, *vjp(dout.astype(o.dtype)))

    return jax.jit(out), jax.jit(out_and_grads)


def torch_peer(q, k, v, dout, iters: int) -> tuple[float, float] | None:
    """PyTorch SDPA (B, H, T, hd layout, GQA, causal): (forward s, forward+backward s), or None."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, str(q.dtype))
    tq, tk, tv, tdo = (torch.as_tensor(np.asarray(x, np.float32)).to(device, dtype).transpose(1, 2).contiguous()
                       for x in (q, k, v, dout))
    for x in (tq, tk, tv):
        x.requires_grad_(True)
    run = lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)

    def forward():
        with torch.no_grad():
            run()
        torch_sync()

    def forward_backward():
        torch.autograd.grad(run(), (tq, tk, tv), tdo)
        torch_sync()

    return median_seconds(forward, iters), median_seconds(forward_backward, iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--segments", type=int, default=1, help="documents per row (>1 passes segment ids)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--no-peer", action="store_true", help="skip PyTorch SDPA")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes for a CPU check of the script")
    parser.add_argument("--out", help="write the JSON result here")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.seq, args.heads, args.kv_heads, args.head_dim, args.iters = 1, 128, 4, 2, 32, 3

    b, t, h, kv, hd = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    q, k, v, dout, ids = inputs(0, b, t, h, kv, hd, args.segments)
    as_dev = lambda x, dt=dtype: jnp.asarray(x, dt)
    segments = args.segments > 1
    _, ref_grad = jax_functions("xla", segments)
    reference = ref_grad(*(as_dev(x, jnp.float32) for x in (q, k, v)), as_dev(ids, jnp.int32), as_dev(dout, jnp.float32))
    q16, k16, v16, do16, ids_d = as_dev(q), as_dev(k), as_dev(v), as_dev(dout), as_dev(ids, jnp.int32)

    fwd_flops = 4 * b * h * t * t * hd / 2
    peer = None if args.no_peer or segments else torch_peer(q16, k16, v16, do16, args.iters)
    config = f"attention B{b} T{t} {h}q/{kv}kv hd{hd} {args.dtype}" + (f" {args.segments} segments" if segments else "")
    rows, checks = [], {}
    for implementation in AVAILABLE[jax.devices()[0].platform]:
        fwd, fwd_bwd = jax_functions(implementation, segments)
        got = fwd_bwd(q16, k16, v16, ids_d, do16)
        checks[implementation] = dict(zip(("out", "dq", "dk", "dv"), (round(rel_err(g, r), 6) for g, r in zip(got, reference))))
        fwd_s = median_seconds(lambda: fwd(q16, k16, v16, ids_d).block_until_ready(), args.iters)
        both_s = median_seconds(lambda: jax.block_until_ready(fwd_bwd(q16, k16, v16, ids_d, do16)), args.iters)
        for metric, seconds, flops, peer_s in (("fwd", fwd_s, fwd_flops, None if peer is None else peer[0]),
                                               ("fwd+bwd", both_s, 3.5 * fwd_flops, None if peer is None else peer[1])):
            rows.append(row(f"{config} {implementation}", f"{metric} TFLOP/s", flops / seconds / 1e12,
                            None if peer_s is None else flops / peer_s / 1e12, "TFLOP/s",
                            ms=sig(seconds * 1e3), peer_ms=None if peer_s is None else sig(peer_s * 1e3),
                            max_rel_err=max(checks[implementation].values())))
    write_result(args.out, {"bench": "attention", "device": device_name(), "peer": "torch SDPA (enable_gqa, causal)",
                            "rel_err_vs_float32_xla": checks, "rows": rows})
    bad = {name: c for name, c in checks.items() if not max(c.values()) < (1e-2 if dtype == jnp.bfloat16 else 1e-4)}
    if bad:
        sys.exit(f"attention: implementations differ from float32 XLA attention: {bad}")


if __name__ == "__main__":
    main()
