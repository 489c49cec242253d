"""`python -m llama_jax.serve`: serve a checkpoint over OpenAI's HTTP API with continuous batching."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time
from typing import Sequence

import jax

from llama_jax import quant
from llama_jax.checkpoint import checkpoint_tokenizer, load_checkpoint
from llama_jax.generate.batcher import Batcher
from llama_jax.generate.engine import PREFILL_CHUNK
from llama_jax.serve.app import check_api_key, create_app, listen, serve
from llama_jax.tokenizer import Tokenizer
from sharding import inference_mesh


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (docs/reference/cli.md is generated from this parser)."""
    p = argparse.ArgumentParser(prog="python -m llama_jax.serve",
                                description="Serve a llama_jax checkpoint over the OpenAI API (/v1/completions, "
                                            "/v1/chat/completions, /v1/models, /health) with continuous batching.")
    p.add_argument("--checkpoint", required=True, help="a llama_jax checkpoint directory (or a training run)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.model, tokenizer.json, a folder or a Hub repo id (default: the one the "
                        "checkpoint or run folder carries)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--max-batch", type=int, default=16, help="decode slots: requests decoded together")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="KV-cache positions per slot, prompt + answer (default: the model's context)")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond this get 503")
    p.add_argument("--steps-per-call", type=int, default=1,
                   help="decode steps per device call (more: less host overhead, later admission)")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, metavar="N",
                   help=f"prefill a long prompt N positions at a time: activations of N tokens, not the whole "
                        f"prompt (default {PREFILL_CHUNK}; 0 = the whole prompt at once)")
    p.add_argument("--no-warmup", action="store_true",
                   help="compile lazily: the first request of each new length bucket waits for a compile")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="cast params and compute to this dtype (default: as saved)")
    p.add_argument("--quantize", default=None, metavar="|".join(quant.FORMATS),
                   help="weight-only quantised projections: int8 (per-channel, half of bf16's bytes) or nf4")
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="split heads/MLP over this many devices (a (1, 1, N) data/fsdp/tensor mesh)")
    p.add_argument("--api-key", default=os.environ.get("LLAMA_JAX_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $LLAMA_JAX_API_KEY; none = open)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the checkpoint folder's name)")
    return p


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("max_batch", "max_waiting", "steps_per_call", "tensor_parallel"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.prefill_chunk < 0:
        p.error(f"--prefill-chunk must be >= 0 (0 = the whole prompt at once), got {args.prefill_chunk}")
    if not 0 <= args.port < 65536:
        p.error(f"--port must be in [0, 65535], got {args.port}")
    try:
        check_api_key(args.api_key, "--api-key (default $LLAMA_JAX_API_KEY)")
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    try:
        app, sock, banner = _build(args)
    except (ValueError, TypeError, OSError) as e:  # user errors: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(banner, file=sys.stderr, flush=True)
    try:
        serve(app, sock)
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then passed Ctrl-C on
        pass


def _warm(batcher: Batcher) -> None:
    print("compiling the prefill and decode programs (--no-warmup skips this)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    count = batcher.warmup()
    print(f"compiled {count} programs in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def _build(args: argparse.Namespace):
    if args.quantize is not None:
        quant.check_format(args.quantize, "--quantize")
    mesh = inference_mesh(args.tensor_parallel)
    cfg, params = load_checkpoint(args.checkpoint, mesh=mesh, dtype=args.dtype, quantize=args.quantize)
    tokenizer_path = args.tokenizer or checkpoint_tokenizer(args.checkpoint)
    if tokenizer_path is None:
        raise ValueError(f"--tokenizer not given and {args.checkpoint} carries no tokenizer (tokenizer.model or "
                         "tokenizer.json); pass --tokenizer")
    tokenizer = Tokenizer(tokenizer_path)
    if args.dtype is not None:
        cfg = cfg.replace(dtype=args.dtype)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                         f"{cfg.vocab_size}: they do not belong together")
    sock = listen(args.host, args.port)  # before compiling anything: a taken port fails at once
    batcher = Batcher(params, cfg, slots=args.max_batch, max_seq_len=args.max_seq_len, decode=tokenizer.decode,
                      eos_id=tokenizer.eos_ids, max_waiting=args.max_waiting, steps_per_call=args.steps_per_call,
                      mesh=mesh, prefill_chunk=args.prefill_chunk or None)
    if not args.no_warmup:
        _warm(batcher)
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
    cache_gb = sum(x.nbytes for x in jax.tree.leaves(batcher.state["cache"])) / 1e9
    weights_gb = sum(x.nbytes for x in jax.tree.leaves(params)) / 1e9
    host, port = sock.getsockname()[:2]
    banner = (f"serving {name!r} on http://{host}:{port}/v1: {args.max_batch} slots x {batcher.max_seq_len} "
              f"positions (weights {weights_gb:.2f} GB{' ' + args.quantize if args.quantize else ''}, KV cache "
              f"{cache_gb:.2f} GB), {'API key required' if args.api_key else 'no API key'}")
    if not ipaddress.ip_address(host).is_loopback and not args.api_key:
        banner += f"\nwarning: listening on {host} without --api-key: anyone who can reach it can use the model"
    return create_app(batcher, tokenizer, name, args.api_key), sock, banner


if __name__ == "__main__":
    main()
