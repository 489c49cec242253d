"""`python -m llama_jax.convert`: PyTorch LLaMA weights (Meta or Hugging Face) -> llama_jax, and back to HF.

    python -m llama_jax.convert meta SRC OUT [--dtype bfloat16|float32] [--tokenizer PATH] [--verify]
    python -m llama_jax.convert hf SRC OUT [--dtype ...] [--verify] [--revision REV]  # SRC: a folder or ORG/NAME on the Hub
    python -m llama_jax.convert export-hf CKPT OUT [--dtype ...] [--verify]     # a LoRA run exports merged
    python -m llama_jax.convert export-peft RUN OUT                             # LoRA run -> PEFT adapter folder
    python -m llama_jax.convert peft ADAPTER --base CKPT OUT [--dtype ...]      # PEFT adapter -> merged checkpoint
"""

from __future__ import annotations

import argparse
import sys

from llama_jax.checkpoint import OutputExists, is_remote
from llama_jax.config import LlamaConfig
from llama_jax.convert import hub
from llama_jax.convert.export_hf import export_hf
from llama_jax.convert.peft import export_peft, import_peft
from llama_jax.convert.reference import verify
from llama_jax.convert.sources import HFSource, MetaSource
from llama_jax.convert.streaming import OUT_DTYPES, convert
from llama_jax.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (docs/reference/cli.md is generated from this parser)."""
    parser = argparse.ArgumentParser(prog="python -m llama_jax.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("meta", "Meta params.json + consolidated.NN.pth -> llama_jax checkpoint"),
                            ("hf", "Hugging Face folder (safetensors or .bin) or Hub repo id (safetensors) -> llama_jax checkpoint"),
                            ("export-hf", "llama_jax checkpoint (converted or trained) -> Hugging Face folder")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("src", help="source folder" if name != "export-hf" else "llama_jax checkpoint or run folder")
        p.add_argument("out", help="output folder (must not exist unless --overwrite); gs:// etc. for meta/hf")
        p.add_argument("--dtype", choices=OUT_DTYPES, default=None, help="output dtype (default: keep the source's)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing OUT once conversion succeeds")
        p.add_argument("--verify", action="store_true", help="compare logits of source and result on 8 tokens")
        p.add_argument("--verify-layers", type=int, default=None, help="verify with only the first N layers")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name != "export-hf":
            p.add_argument("--tokenizer", default=None,
                           help="tokenizer to copy: tokenizer.model, tokenizer.json, a folder or a Hub repo id "
                                "(default: found next to SRC)")
        if name == "hf":
            p.add_argument("--revision", default=None,
                           help="when SRC is a Hub repo id (ORG/NAME): the branch, tag or commit (default: main)")
        if name == "meta":  # params.json does not say the context length
            p.add_argument("--max-seq-len", type=int, default=4096,
                           help="context length to record: 4096 for Llama 2 (default), 2048 for LLaMA-1")
    p = sub.add_parser("export-peft", help="LoRA training run -> Hugging Face PEFT adapter folder")
    p.add_argument("src", help="a LoRA training run folder (lora.rank > 0)")
    p.add_argument("out", help="output folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p = sub.add_parser("peft", help="PEFT LoRA adapter folder + llama_jax base -> merged llama_jax checkpoint")
    p.add_argument("src", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors or .bin)")
    p.add_argument("--base", required=True, help="the llama_jax checkpoint the adapter was trained on")
    p.add_argument("out", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=OUT_DTYPES, default=None, help="output dtype (default: the base's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT once merging succeeds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> LlamaConfig:
    """Run one conversion; raises a clear exception on bad input (the CLI prints it)."""
    args = parse_args(argv)
    if getattr(args, "verify_layers", None) is not None and args.verify_layers < 1:
        raise ValueError(f"--verify-layers must be >= 1, got {args.verify_layers}")
    if args.command == "export-peft":
        cfg = export_peft(args.src, args.out, args.overwrite)
        print(f"wrote {args.out} (PEFT LoRA adapter: r {cfg.lora_rank}, alpha {cfg.lora_alpha:g}, "
              f"{' '.join(cfg.lora_targets)})")
        return cfg
    progress = not args.no_progress
    if args.command == "peft":
        cfg = import_peft(args.src, args.base, args.out, args.dtype, args.overwrite, progress)
        print(f"wrote {args.out} ({args.src} merged into {args.base}, {cfg.param_dtype})")
        return cfg
    if args.command == "export-hf":
        if is_remote(args.out):
            raise ValueError(f"{args.out}: export-hf writes a local folder")
        cfg = export_hf(args.src, args.out, args.dtype, args.overwrite, progress=progress)
    else:
        if args.command == "hf":  # a local folder as it is; a Hub repo id -> its snapshot in the HF cache
            args.src = hub.resolve(args.src, "model", args.revision)
        source = MetaSource(args.src, args.max_seq_len) if args.command == "meta" else HFSource(args.src)
        cfg = convert(source, args.out, args.dtype, args.tokenizer, args.overwrite, progress)
    print(f"wrote {args.out} ({cfg.n_layers} layers, dim {cfg.dim}, {cfg.num_params():,} params, {cfg.param_dtype})")
    if args.verify:
        verify(args.command, args.src, args.out, cfg, args.verify_layers,
               source if args.command == "meta" else None, progress)
    return cfg


def cli() -> int:
    def run() -> None:
        try:
            main()
        except OutputExists as e:  # the library says overwrite=True; here the flag is --overwrite
            raise FileExistsError(f"{e.path} already exists; pass --overwrite to replace it") from None

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(cli())
