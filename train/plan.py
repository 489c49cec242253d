"""`python -m train.plan`: will a training run fit a TPU slice? Compiles the real sharded step for it.

    python -m train.plan --model llama2-70b --topology v5p-128 --mesh fsdp=-1 --batch 256 --seq 4096
    python -m train.plan --model llama2-7b --topology v5e-1 --batch 16 --seq 512 --lora-rank 16 --base-dtype nf4
    python -m train.plan --model llama2-7b --topology v5e-1 --batch 8 --seq 512 --lora-rank 16 --base-dtype nf4 --objective dpo
    python -m train.plan --model llama3.1-8b --topology v5p-16 --mesh fsdp=1 --context 8 --batch 1 --seq 131072 --attention splash
"""

from __future__ import annotations

import argparse
import sys

from llama_jax.config import ATTENTION_IMPLEMENTATIONS, PROJECTIONS, REMAT_POLICIES
from sharding import parse_mesh
from train.config import OBJECTIVES
from train.planner import plan


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (docs/reference/cli.md is generated from this parser)."""
    parser = argparse.ArgumentParser(
        prog="python -m train.plan",
        description="Compile the sharded training step for a TPU slice on this machine (libtpu, no TPU needed) "
                    "and report per-chip memory against the chip's HBM. Exit status 0 = fits.")
    parser.add_argument("--model", required=True, help="a LlamaConfig preset, e.g. llama2-7b, llama2-70b")
    parser.add_argument("--topology", required=True, help="TPU slice, e.g. v5p-8, v4-256, v5e-8, v5p:4x4x4")
    parser.add_argument("--mesh", default="fsdp=-1", help="mesh axes, e.g. fsdp=-1 or data=2,fsdp=-1,tensor=4")
    parser.add_argument("--context", type=int, default=None,
                        help="context parallelism: split every sequence over N chips (the mesh's context axis; "
                             "--seq a multiple of 2N)")
    parser.add_argument("--batch", type=int, required=True, help="global batch (sequences per step)")
    parser.add_argument("--seq", type=int, default=2048, help="sequence length")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="override the preset's context length (a long-context fine-tune, e.g. Llama-2-70B at "
                             "32768; memory only, the RoPE settings stay the preset's)")
    parser.add_argument("--remat", default="full", choices=REMAT_POLICIES, help="what the backward pass recomputes")
    parser.add_argument("--attention", default="xla", choices=ATTENTION_IMPLEMENTATIONS,
                        help="attention implementation (splash: the Pallas TPU kernel; needs seq %% 128 == 0)")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="microbatches per step (train's grad_accum): activations of batch / grad-accum rows")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers (quick looks)")
    parser.add_argument("--lora-rank", type=int, default=0, help="plan LoRA with adapters of this rank (0: full)")
    parser.add_argument("--base-dtype", default="bfloat16", choices=("bfloat16", "float32", "int8", "nf4"),
                        help="LoRA: how the frozen base is stored (nf4 = QLoRA)")
    parser.add_argument("--lora-targets", default=",".join(PROJECTIONS),
                        help="LoRA: comma-separated projections to adapt (default: all seven)")
    parser.add_argument("--objective", default="sft", choices=OBJECTIVES,
                        help="the training objective: preference ones train on pairs (--batch pairs, two sequences "
                             "each); dpo adds its reference pass")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        mesh = parse_mesh(args.mesh)
        if args.context is not None:
            if mesh.get("context", args.context) != args.context:
                raise ValueError(f"--context {args.context} and --mesh context={mesh['context']} disagree; give one")
            mesh["context"] = args.context
        result = plan(args.model, args.topology, mesh, args.batch, args.seq, args.remat, args.layers,
                      grad_accum=args.grad_accum, attention=args.attention,
                      say=lambda line: print(line, file=sys.stderr, flush=True), lora_rank=args.lora_rank,
                      base_dtype=args.base_dtype, lora_targets=tuple(t for t in args.lora_targets.split(",") if t),
                      objective=args.objective, max_seq_len=args.max_seq_len)
    except ValueError as e:  # bad model / topology / mesh / batch: say what, no traceback
        parser.error(str(e))
    print(result.report())
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
