"""Print the rows of bench result files as one markdown table (the last thing bench/gpu.sh prints).

    python bench/table.py RESULT.json [...]
"""

from __future__ import annotations

import json
import sys


def main(paths: list[str]) -> None:
    print("| bench | config | metric | ours | peer | ratio | device |")
    print("|---|---|---|---|---|---|---|")
    for path in paths:
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError) as err:
            print(f"| {path} | not readable: {err} | | | | | |")
            continue
        rows = result.get("rows")
        if not isinstance(rows, list):  # a script with another format: show its top-level numbers
            flat = ", ".join(f"{k}={v}" for k, v in result.items() if isinstance(v, (int, float, str)))
            print(f"| {path} | {flat} | | | | | |")
            continue
        for r in rows:
            print(f"| {result.get('bench', path)} | {r.get('config')} | {r.get('metric')} | {r.get('ours')} | "
                  f"{r.get('peer')} | {r.get('ratio')} | {result.get('device', '')} |")


if __name__ == "__main__":
    main(sys.argv[1:])
