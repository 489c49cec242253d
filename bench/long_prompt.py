"""Long prompts: the prefill in one step against `prefill_chunk` steps, memory and time.

    python bench/long_prompt.py                                   # tiny shape, 8k prompt run here, 32k compiled
    python bench/long_prompt.py --topology v5p-2                  # + Llama-3.1-8B bf16, 32k, compiled for a v5p chip
    python bench/long_prompt.py --smoke                           # a 1k prompt, seconds

Rows, each one-step ("peer") against chunked ("ours") in the same run:
(1) XLA's scratch memory of the generate prefill program itself (`memory_analysis().temp_size_in_bytes`
    of engine._prefill: activations, attention scores, logits; the weights and the KV cache are
    arguments/outputs, the same for both), for the run prompt and for --compile-prompt (compiled only);
(2) on the CPU the run prompt through `lj.generate(..., max_new_tokens=1)`: wall time after a warm-up,
    and the process's peak resident memory, each variant in a fresh process (ru_maxrss);
(3) with --topology (libtpu, no TPU needed): the same program compiled for one chip of that TPU slice,
    Llama-3.1-8B in bfloat16 at --tpu-prompt tokens; XLA says how much the one step would need when it
    does not fit the chip's HBM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

import llama_jax as lj
from bench.common import device_name, median_seconds, row, sig, write_result
from llama_jax.generate import engine
from llama_jax.model import param_shapes

GiB = 2**30
NEW = 16  # the program's new-token bucket (max_new_tokens=1 rounds to 1; 16 is a realistic request)


def prefill_scratch(cfg: lj.LlamaConfig, prompt: int, chunk: int | None, sharding=None) -> float | str:
    """GiB of scratch XLA allocates for engine._prefill of one `prompt`-token row (compile only), or
    XLA's out-of-memory message when it does not fit the device."""
    place = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    params = jax.tree.map(lambda s: place(s.shape, s.dtype), param_shapes(cfg))
    sampling = {"temperature": place((), jnp.float32), "top_p": place((), jnp.float32),
                "top_k": place((), jnp.int32), "seed": place((), jnp.uint32),
                "eos_ids": place((engine.EOS_SLOTS,), jnp.int32)}
    try:
        compiled = engine._prefill.lower(
            params, place((1, prompt), jnp.int32), place((1,), jnp.int32), place((1,), jnp.bool_), sampling,
            cfg=cfg, slots=prompt + NEW, new_bucket=NEW, chunk=engine.prefill_step(chunk, prompt)).compile()
    except Exception as e:  # noqa: BLE001 - XLA's RESOURCE_EXHAUSTED carries the size it needed
        found = re.search(r"RESOURCE_EXHAUSTED.*?\(([\d.]+)G\)", str(e))
        if found is None:
            raise
        return f"needs {found.group(1)} GiB (OOM)"
    return compiled.memory_analysis().temp_size_in_bytes / GiB


def run_one(args: argparse.Namespace) -> None:
    """Child process: one variant through lj.generate; prints {"seconds", "peak_rss_gib"}."""
    cfg = lj.LlamaConfig.preset(args.preset, max_seq_len=args.prompt + NEW, dtype=args.dtype, param_dtype=args.dtype)
    params = lj.init_params(cfg, 0)
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, args.prompt).tolist()
    chunk = args.one or None
    seconds = median_seconds(lambda: lj.generate(params, cfg, [prompt], max_new_tokens=1, prefill_chunk=chunk),
                             args.iters, warmup=1)
    print(json.dumps({"seconds": seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def run_child(args: argparse.Namespace, chunk: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--preset", args.preset, "--prompt", str(args.prompt),
           "--dtype", args.dtype, "--iters", str(args.iters), "--one", str(chunk)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="the model shape run on this machine")
    parser.add_argument("--prompt", type=int, default=8192, help="prompt length run through lj.generate")
    parser.add_argument("--compile-prompt", type=int, default=32768, help="prompt length compiled only (row 1)")
    parser.add_argument("--chunk", type=int, default=engine.PREFILL_CHUNK, help="prefill_chunk measured")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--topology", help="also compile Llama-3.1-8B for one chip of this TPU slice (libtpu)")
    parser.add_argument("--tpu-prompt", type=int, default=32768)
    parser.add_argument("--smoke", action="store_true", help="a 1k prompt, 4k compiled, one iteration")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one variant (0 = one step)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.one is not None:
        return run_one(args)
    if args.smoke:
        args.prompt, args.compile_prompt, args.iters, args.chunk = 1024, 4096, 1, 256

    rows = []
    for prompt in (args.prompt, args.compile_prompt):
        cfg = lj.LlamaConfig.preset(args.preset, max_seq_len=prompt + NEW, dtype=args.dtype, param_dtype=args.dtype)
        whole, chunked = prefill_scratch(cfg, prompt, None), prefill_scratch(cfg, prompt, args.chunk)
        rows.append(row(f"{args.preset} {args.dtype} prompt {prompt}: prefill scratch, chunk {args.chunk} vs one step",
                        "1/GiB", 1 / chunked, 1 / whole, "1/GiB", ours_gib=sig(chunked), peer_gib=sig(whole)))
    one, chunked = run_child(args, 0), run_child(args, args.chunk)
    if "error" in one or "error" in chunked:
        rows.append({"config": f"{args.preset} prompt {args.prompt} generate()", "error": one.get("error") or chunked["error"]})
    else:
        rows.append(row(f"{args.preset} {args.dtype} prompt {args.prompt}: generate() time to first token, chunk "
                        f"{args.chunk} vs one step", "1/s", 1 / chunked["seconds"], 1 / one["seconds"], "1/s",
                        ours_s=sig(chunked["seconds"]), peer_s=sig(one["seconds"])))
        rows.append(row(f"{args.preset} {args.dtype} prompt {args.prompt}: process peak RSS", "1/GiB",
                        1 / chunked["peak_rss_gib"], 1 / one["peak_rss_gib"], "1/GiB",
                        ours_gib=sig(chunked["peak_rss_gib"]), peer_gib=sig(one["peak_rss_gib"])))
    if args.topology:
        from jax.sharding import SingleDeviceSharding

        from train.planner import tpu_devices  # bench sits above train: this import is allowed

        chip, devices = tpu_devices(args.topology)
        cfg = lj.LlamaConfig.preset("llama3.1-8b", dtype="bfloat16", param_dtype="bfloat16")
        one_chip = SingleDeviceSharding(devices[0])
        for chunk in (args.chunk, None):
            scratch = prefill_scratch(cfg, args.tpu_prompt, chunk, one_chip)
            label = "one step" if chunk is None else f"chunk {chunk}"
            rows.append({"config": f"llama3.1-8b bf16 prompt {args.tpu_prompt} on one {chip.name} "
                                   f"({chip.hbm_bytes / GiB:.0f} GiB HBM): prefill scratch, {label}",
                         "gib": scratch if isinstance(scratch, str) else sig(scratch)})
    load = os.getloadavg()[0]
    write_result(args.out, {"bench": "long_prompt", "device": device_name(), "load_average": round(load, 1),
                            "peer": "the same prefill in one step (prefill_chunk=None), same run", "rows": rows})


if __name__ == "__main__":
    main()
