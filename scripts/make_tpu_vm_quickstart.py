"""Writes scripts/tpu_vm_quickstart.sh from notebooks/colab_tpu.ipynb: the notebook's code cells, in order, as one script.

    python scripts/make_tpu_vm_quickstart.py           # after editing the notebook
    python scripts/make_tpu_vm_quickstart.py --check   # exit 1 if the script is stale (tests/test_notebook.py)

The notebook is the source; the script runs exactly its cells (each under its markdown heading), so
a Cloud TPU VM and a Colab runtime take the same steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_tpu.ipynb")
SCRIPT = os.path.join(ROOT, "scripts", "tpu_vm_quickstart.sh")
END = "LLAMA_JAX_NOTEBOOK"  # the heredoc's delimiter

HEADER = f"""#!/usr/bin/env bash
# The Colab notebook's steps on a Cloud TPU VM: download + convert Llama-2-7b-hf (or the non-gated
# TinyLlama fallback), plan, QLoRA-fine-tune on Alpaca for a bounded time, evaluate before/after,
# export to Hugging Face. Run from a checkout (the install step installs requirements.txt with pip):
#   HF_TOKEN=hf_... bash scripts/tpu_vm_quickstart.sh
# Settings (environment): LLAMA_JAX_MODEL, LLAMA_JAX_TRAIN_MINUTES, LLAMA_JAX_TOPOLOGY, LLAMA_JAX_PUSH_TO,
# LLAMA_JAX_WORKDIR (default ./llama_jax_work); LLAMA_JAX_SMOKE=1 runs it on a CPU with tiny stand-ins.
# GENERATED from notebooks/colab_tpu.ipynb by scripts/make_tpu_vm_quickstart.py: edit the notebook.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${{PYTHON:-python3}}" - <<'{END}'
"""


def render(notebook: dict) -> str:
    """The script's text for a notebook (nbformat 4 JSON as a dict)."""
    parts, heading = [HEADER], "(no heading)"
    for cell in notebook["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            heading = source.lstrip("#").strip().splitlines()[0]
        elif cell["cell_type"] == "code":
            if any(line.strip() == END for line in source.splitlines()):
                raise ValueError(f"a code cell has a line {END!r}, which would end the script's heredoc")
            parts.append(f"\n# ---- {heading} ----\n{source.rstrip()}\n")
    parts.append(f"{END}\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the script is current")
    args = parser.parse_args(argv)
    with open(NOTEBOOK, encoding="utf-8") as f:
        text = render(json.load(f))
    if args.check:
        with open(SCRIPT, encoding="utf-8") as f:
            current = f.read() == text
        if not current:
            print(f"{SCRIPT} is stale: run python scripts/make_tpu_vm_quickstart.py", file=sys.stderr)
        return 0 if current else 1
    tmp = f"{SCRIPT}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, SCRIPT)
    print(f"wrote {SCRIPT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
