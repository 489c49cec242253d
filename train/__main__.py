"""`python -m train --config configs/NAME.yaml [key=value ...]`: train, or resume from output_dir."""

from __future__ import annotations

import argparse
import json
import sys

from llama_jax.errors import one_line, run_cli
from train.config import load_config


def _train(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)

    import sharding

    sharding.initialize()  # joins the other hosts of a TPU pod (or JAX_COORDINATOR_ADDRESS...); else nothing
    from train.loop import run  # imports jax: after the config is known to be good

    summary = run(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "data"}, default=str))


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (docs/reference/cli.md is generated from this parser)."""
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nesting (optim.lr=1e-4)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # bad recipe, data, tokenizer, mesh, resume settings, a locked output_dir: one line, exit 2
        return run_cli(_train, args)
    except RuntimeError as e:
        from train.loop import TrainingDiverged

        if not isinstance(e, TrainingDiverged):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
