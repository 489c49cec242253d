"""Decode benchmark: time to first token, decode tokens/s and achieved memory bandwidth of
llama_jax generation, beside Hugging Face transformers' `generate` on the same machine.

    python bench/decode.py            # on a GPU: llama2-7b bf16, batch 1 and 32, prompt 128, 256 new
                                      # elsewhere (or --smoke): the tiny "demo" model, batch 1 and 8
    python bench/decode.py --preset llama2-7b --dtype bfloat16 --batch 1 16 --prompt-len 128 --new 256
    python bench/decode.py --quantize int8 --dtype bfloat16 --batch 1        # int8 weights vs the bf16 model
    python bench/decode.py --quantize int8 --checkpoint runs/demo --dtype bfloat16 --batch 1   # trained weights

Random weights (decode speed does not depend on their values). Decode runs with no EOS so every
row produces exactly --new tokens. Bandwidth = (weight bytes + KV-cache bytes read per step) /
step time: every step reads all weights once and the whole cache (all slots, as the attention
does). The JAX numbers exclude compilation (reported separately); HF runs the same shapes in
the same dtype on the same device (torch CUDA when available, else CPU).

With --quantize, the peer is our own --dtype model instead of HF's: the same prompts decoded with
the projections held quantised (compute still in --dtype), plus greedy agreement with the float
model over a fixed prompt set (--agree-prompts, --agree-new; no EOS): the fraction of identical
tokens when both decode freely, and of identical next tokens when the quantised model reads the
float model's own greedy text (one forward). Prompts: the first Alpaca prompts of
data/demo_alpaca_eval.json for 512-piece vocabularies, else seeded random token ids.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import llama_jax as lj  # noqa: E402
from llama_jax import quant  # noqa: E402
from llama_jax.generate import engine as gen  # noqa: E402
from bench.common import device_name, free_torch, hf_peer_model, row, write_result  # noqa: E402



def bench_jax(params, cfg, batch: int, prompt_len: int, new: int, repeats: int) -> dict:
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt_len)).tolist()

    def run():
        t0 = time.perf_counter()
        _, state, _, sampling = gen._start(params, cfg, prompts, new, 0.0, 1.0, 0, 0, None)
        jax.block_until_ready(state["tokens"])
        t1 = time.perf_counter()
        state = gen._decode(params, state, jnp.int32(new), sampling, cfg=cfg)
        jax.block_until_ready(state["tokens"])
        t2 = time.perf_counter()
        assert int(state["step"]) == new
        return t1 - t0, t2 - t1, state["cache"]

    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    ttft, decode_s, cache = min((run() for _ in range(repeats)), key=lambda r: r[0] + r[1])
    steps = new - 1
    step_s = decode_s / steps
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))  # padded batch, all slots
    return {"impl": "llama_jax", "batch": batch, "ttft_ms": ttft * 1e3, "step_ms": step_s * 1e3,
            "tokens_per_s": batch * steps / decode_s, "bandwidth_gb_s": (weight_bytes + cache_bytes) / step_s / 1e9,
            "weight_gb": weight_bytes / 1e9, "cache_gb": cache_bytes / 1e9, "compile_s": compile_s}


def agreement(params, qparams, cfg, prompts: list[list[int]], new: int) -> tuple[float, float]:
    """Greedy agreement of the quantised model with the float one: (free-running identical tokens,
    next-token argmax agreement on the float model's own greedy continuation)."""
    want = lj.generate(params, cfg, prompts, max_new_tokens=new, eos_id=None)
    got = lj.generate(qparams, cfg, prompts, max_new_tokens=new, eos_id=None)
    free = np.mean([a == b for w, g in zip(want, got) for a, b in zip(w, g)])
    rows = [p + w for p, w in zip(prompts, want)]
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)  # right-padded: causal, padding is never read
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    predicted = np.asarray(jnp.argmax(lj.forward(qparams, tokens, cfg), axis=-1))
    forced = np.mean([predicted[i, len(p) - 1 + j] == w[j] for i, (p, w) in enumerate(zip(prompts, want))
                      for j in range(new)])
    return float(free), float(forced)


def agreement_prompts(cfg, count: int, prompt_len: int) -> tuple[list[list[int]], str]:
    if cfg.vocab_size == 512:
        import json

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        tok = lj.Tokenizer(os.path.join(root, "data", "tokenizer.model"))
        with open(os.path.join(root, "data", "demo_alpaca_eval.json")) as f:
            examples = json.load(f)[:count]
        return [tok.encode(lj.format_alpaca(e["instruction"], e["input"]), bos=True) for e in examples], \
            f"{len(examples)} Alpaca prompts of demo_alpaca_eval.json"
    rng = np.random.default_rng(1)
    return [[1] + rng.integers(3, cfg.vocab_size, prompt_len - 1).tolist() for _ in range(count)], \
        f"{count} random-token prompts of {prompt_len}"


def bench_quantized(params, cfg, args) -> tuple[list[dict], list[dict]]:
    """Our --dtype model (the peer) vs the same weights quantised: tokens/s per batch, weight bytes,
    greedy agreement."""
    qparams = quant.quantize_params(params, cfg, args.quantize)
    label = f"{args.checkpoint or args.preset} {args.dtype}"
    rows, results = [], []
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    for batch in args.batch:
        peer = bench_jax(params, cfg, batch, args.prompt_len, args.new, args.repeats)
        ours = bench_jax(qparams, cfg, batch, args.prompt_len, args.new, args.repeats)
        ours["impl"], peer["impl"] = f"llama_jax {args.quantize}", f"llama_jax {args.dtype}"
        results += [ours, peer]
        rows.append(row(f"{label} b{batch} prompt {args.prompt_len} +{args.new}",
                        f"decode tokens/s, {args.quantize} weights vs {args.dtype}", ours["tokens_per_s"],
                        peer["tokens_per_s"], "tok/s", step_ms=ours["step_ms"], peer_step_ms=peer["step_ms"]))
    projections = lambda tree: nbytes({k: tree["layers"][k] for k in ("attention", "feed_forward")})  # noqa: E731
    rows.append(row(label, f"weights x smaller than {args.dtype} (all; projections: "
                    f"{projections(params) / projections(qparams):.3f}x)", nbytes(params) / nbytes(qparams), None, "x",
                    weight_gb=nbytes(qparams) / 1e9, peer_weight_gb=nbytes(params) / 1e9))
    prompts, what = agreement_prompts(cfg, args.agree_prompts, args.prompt_len)
    free, forced = agreement(params, qparams, cfg, prompts, args.agree_new)
    rows.append(row(f"{label}, {what}, {args.agree_new} new", f"greedy tokens identical to {args.dtype} "
                    "(free-running)", free, None, "fraction"))
    rows.append(row(f"{label}, {what}, {args.agree_new} new", f"next token identical to {args.dtype} "
                    "(on its greedy text)", forced, None, "fraction"))
    return rows, results


def bench_hf(model, cfg, batch: int, prompt_len: int, new: int, repeats: int, dtype: str) -> dict:
    import torch

    device = next(model.parameters()).device.type
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    ids = torch.as_tensor(np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt_len)), device=device)

    def run(n):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == prompt_len + n
        return time.perf_counter() - t0

    run(2)
    ttft = min(run(1) for _ in range(repeats))
    total = min(run(new) for _ in range(repeats))
    steps = new - 1
    step_s = (total - ttft) / steps
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cache_bytes = 2 * cfg.n_layers * batch * (prompt_len + new / 2) * cfg.n_kv_heads * cfg.head_dim * \
        torch.tensor([], dtype=torch_dtype).element_size()  # HF's growing cache: its average size
    return {"impl": f"hf-transformers ({device})", "batch": batch, "ttft_ms": ttft * 1e3, "step_ms": step_s * 1e3,
            "tokens_per_s": batch * steps / (total - ttft),
            "bandwidth_gb_s": (weight_bytes + cache_bytes) / step_s / 1e9, "weight_gb": weight_bytes / 1e9,
            "cache_gb": cache_bytes / 1e9, "compile_s": 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="the tiny demo sizes whatever the device (CPU check)")
    p.add_argument("--preset", help="default: llama2-7b on a GPU, demo elsewhere")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on a GPU, float32 elsewhere")
    p.add_argument("--batch", type=int, nargs="+", help="default: 1 32 on a GPU, 1 8 elsewhere")
    p.add_argument("--prompt-len", type=int, help="default: 128 on a GPU, 32 elsewhere")
    p.add_argument("--new", type=int, help="default: 256 on a GPU, 64 elsewhere")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--quantize", choices=quant.FORMATS, help="bench these quantised weights against our --dtype model")
    p.add_argument("--checkpoint", help="weights (and model) from this checkpoint, cast to --dtype (default: random)")
    p.add_argument("--agree-prompts", type=int, default=16, help="--quantize: prompts in the agreement set")
    p.add_argument("--agree-new", type=int, default=32, help="--quantize: greedy tokens per agreement prompt")
    p.add_argument("--out", help="write the JSON result here")
    args = p.parse_args()
    big = jax.default_backend() == "gpu" and not args.smoke
    defaults = (("preset", "llama2-7b", "demo"), ("dtype", "bfloat16", "float32"), ("batch", [1, 32], [1, 8]),
                ("prompt_len", 128, 32), ("new", 256, 64))
    for name, gpu_value, small_value in defaults:
        if getattr(args, name) is None:
            setattr(args, name, gpu_value if big else small_value)

    if args.checkpoint:
        cfg, params = lj.load_checkpoint(args.checkpoint, dtype=args.dtype)
        cfg = cfg.replace(dtype=args.dtype)
    else:
        cfg = lj.LlamaConfig.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype)
        params = lj.init_params(cfg, 0) if args.quantize else None
    if args.quantize:
        rows, results = bench_quantized(params, cfg, args)
        report(args, rows, results)
        return
    # The PyTorch peer first (built once, in its dtype, on the device), then freed for JAX.
    peers = {}
    model = None if args.no_hf else hf_peer_model(cfg, args.dtype)
    if model is not None:
        peers = {b: bench_hf(model, cfg, b, args.prompt_len, args.new, args.repeats, args.dtype) for b in args.batch}
        del model
        free_torch()
    params = params if params is not None else lj.init_params(cfg, 0)
    rows, results = [], []
    for batch in args.batch:
        ours = bench_jax(params, cfg, batch, args.prompt_len, args.new, args.repeats)
        peer = peers.get(batch)
        results += [ours] + ([peer] if peer else [])
        config = f"{args.checkpoint or args.preset} {args.dtype} b{batch} prompt {args.prompt_len} +{args.new}"
        rows.append(row(config, "decode tokens/s", ours["tokens_per_s"], peer and peer["tokens_per_s"], "tok/s",
                        bandwidth_gb_s=ours["bandwidth_gb_s"], step_ms=ours["step_ms"]))
        rows.append(row(config, "1 / time to first token", 1e3 / ours["ttft_ms"], peer and 1e3 / peer["ttft_ms"],
                        "1/s", ttft_ms=ours["ttft_ms"]))

    report(args, rows, results)


def report(args, rows: list[dict], results: list[dict]) -> None:
    print(f"# {args.checkpoint or args.preset} {args.dtype}, prompt {args.prompt_len}, {args.new} new tokens, "
          f"device {device_name()}")
    print(f"{'impl':26} {'batch':>5} {'TTFT ms':>9} {'step ms':>9} {'tok/s':>10} {'GB/s':>8} {'weights GB':>10} "
          f"{'cache GB':>9} {'compile s':>9}")
    for r in results:
        print(f"{r['impl']:26} {r['batch']:>5} {r['ttft_ms']:>9.2f} {r['step_ms']:>9.3f} {r['tokens_per_s']:>10.1f} "
              f"{r['bandwidth_gb_s']:>8.2f} {r['weight_gb']:>10.4f} {r['cache_gb']:>9.4f} {r['compile_s']:>9.1f}")
    for r in rows:
        if r["unit"] == "fraction":
            print(f"{r['config']}: {r['metric']} {r['ours']:.3f}")
        elif r["unit"] == "x":
            print(f"{r['metric']}: {r['ours']}x ({r['weight_gb']:.4f} GB vs {r['peer_weight_gb']:.4f} GB)")
    write_result(args.out, {"bench": "decode", "device": device_name(), "args": vars(args), "rows": rows,
                            "measurements": results})


if __name__ == "__main__":
    main()
