"""`python -m train --config configs/NAME.yaml [key=value ...]`: train, or resume from output_dir."""

from __future__ import annotations

import argparse
import json
import sys

from train.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nesting (optim.lr=1e-4)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import sharding

    sharding.initialize()  # joins the other hosts of a TPU pod (or JAX_COORDINATOR_ADDRESS...); else nothing
    from train.loop import TrainingDiverged, run  # imports jax: after the config is known to be good

    try:
        summary = run(cfg)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:  # bad data paths, tokenizer, mesh, resume settings
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "data"}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
