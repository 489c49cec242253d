"""Time to first token: a P-token prompt at batch 1, Llama-2-7B-shaped, bf16, random weights.

    python bench/prefill.py                                  # llama2-7b, 2048-token prompt
    python bench/prefill.py --ceilings OUT/ceilings.json     # + MFU against the measured matmul peak
    python bench/prefill.py --smoke                          # tiny preset, runs on a CPU

Rows: (1) `lj.generate(..., max_new_tokens=1)`, the product path (prefill into the KV cache,
first token sampled on device, back on the host); (2) the plain forward over the prompt with each
attention implementation of this backend (the compute without the cache). The peer is HF
transformers (PyTorch, sdpa, bf16) running its prefill forward (use_cache=True) on the same card.
Model FLOPs of a prefill: 2*(N - 2*V*D)*P matmuls + 2*L*P*P*D causal attention + 2*D*V for the
last token's logits.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

import llama_jax as lj
from llama_jax.flops import prefill_flops
from bench.common import (device_name, free_torch, hf_peer_model, median_seconds, read_ceilings, row, sig,
                          torch_sync, write_result)

AVAILABLE = {"cpu": ("xla",), "gpu": ("xla", "cudnn"), "tpu": ("xla", "splash")}


def peer_seconds(cfg: lj.LlamaConfig, prompt: np.ndarray, iters: int) -> float | None:
    import torch

    model = hf_peer_model(cfg)
    if model is None:
        return None
    tokens = torch.as_tensor(prompt[None], device=next(model.parameters()).device)

    def run():
        with torch.no_grad():
            model(tokens, use_cache=True).logits[:, -1].argmax(-1).cpu()
        torch_sync()

    seconds = median_seconds(run, iters)
    del model
    free_torch()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--prompt", type=int, default=2048, help="prompt length P")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--ceilings", help="bench/ceilings.py JSON: adds MFU of the measured matmul peak")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny preset and prompt, for a CPU check")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.prompt, args.iters = "tiny", 64, 2

    cfg = lj.LlamaConfig.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype)
    if args.prompt >= cfg.max_seq_len:
        raise SystemExit(f"--prompt {args.prompt} must be below the model's max_seq_len {cfg.max_seq_len}")
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, args.prompt).astype(np.int32)
    peer_s = None if args.no_peer else peer_seconds(cfg, prompt, args.iters)  # torch first, then free its memory

    params = lj.init_params(cfg, 0)
    flops = prefill_flops(cfg, args.prompt)
    peak = read_ceilings(args.ceilings).get("matmul_tflops")
    mfu = lambda seconds: None if peak is None else sig(flops / seconds / (peak * 1e12))
    config = f"{args.preset} prompt {args.prompt} batch 1 {args.dtype}"
    rows = []
    ttft_s = median_seconds(lambda: lj.generate(params, cfg, [prompt.tolist()], max_new_tokens=1), args.iters)
    rows.append(row(f"{config} generate()", "time to first token, 1/s", 1 / ttft_s, None if peer_s is None else 1 / peer_s,
                    "1/s", ms=sig(ttft_s * 1e3), peer_ms=None if peer_s is None else sig(peer_s * 1e3),
                    mfu=mfu(ttft_s), peer_mfu=None if peer_s is None else mfu(peer_s)))
    tokens = np.asarray(prompt[None])
    for implementation in AVAILABLE[jax.devices()[0].platform]:
        run_cfg = cfg.replace(attention=implementation)
        seconds = median_seconds(lambda: lj.forward(params, tokens, run_cfg).block_until_ready(), args.iters)
        rows.append(row(f"{config} forward {implementation}", "prefill forward, 1/s", 1 / seconds,
                        None if peer_s is None else 1 / peer_s, "1/s", ms=sig(seconds * 1e3), mfu=mfu(seconds)))
    write_result(args.out, {"bench": "prefill", "device": device_name(), "model_flops": flops,
                            "matmul_peak_tflops": peak, "peer": "HF transformers sdpa forward (use_cache)",
                            "rows": rows})


if __name__ == "__main__":
    main()
