"""The README's demo table: run the demo recipe once per seed and report held-out exact match.

    python bench/demo_seeds.py                        # seeds 0 1 2 of configs/demo.yaml (~3.5 min each on a quiet 2-core CPU)
    python bench/demo_seeds.py --seeds 0 1 2 3 4 --out bench/results/demo_seeds.json
    python bench/demo_seeds.py --seeds 0 -- steps=200  # extra key=value overrides go to every run

Each seed is a separate `python -m train --config CONFIG seed=S output_dir=DIR` (a fresh process,
so the wall time is the whole command a user runs: start-up, both evaluations and training), in
its own folder under a temporary directory (or --dir). Prints a markdown table: per seed the
held-out accuracy overall and per task, the mean loss of the last 50 steps, the wall time, the
CPU time (user + sys of the run's process) and the 1-minute load average when it started; then the
mean and the minimum; then one JSON line (bench/common.py write_result). Wall times depend on what
else the machine runs; CPU seconds much less (a quiet 2-core machine needs about CPU / 2 of wall).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_seed(config: str, seed: int, out_dir: str, overrides: list[str]) -> dict:
    """One training run in a fresh process; its summary (the last stdout line) plus wall time."""
    cmd = [sys.executable, "-m", "train", "--config", config, f"seed={seed}", f"output_dir={out_dir}", *overrides]
    load_before = os.getloadavg()[0]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"seed {seed}: `{' '.join(cmd)}` exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    if "eval_after" not in summary:
        raise RuntimeError(f"seed {seed}: the run reported no held-out accuracy (does the config have eval.data?)")
    return {"seed": seed, "exact_match": summary["eval_after"], "per_task": summary["eval_after_per_task"],
            "exact_match_before": summary.get("eval_before"), "first_loss": summary.get("first_loss"),
            "loss_last50": summary.get("loss_last50"), "train_s": summary.get("train_s"), "wall_s": wall, "cpu_s": cpu,
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def short_names(tasks: list[str]) -> dict[str, str]:
    """Column names: the instruction's first word ("Reverse the digits." -> "reverse"), unless two clash."""
    first = {t: t.split()[0].strip(".:").lower() if t.split() else t for t in tasks}
    return first if len(set(first.values())) == len(tasks) else {t: t for t in tasks}


def table(runs: list[dict]) -> str:
    tasks = list(runs[0]["per_task"])
    names = short_names(tasks)
    head = ["seed", "exact match", *names.values(), "loss (last 50 steps)", "wall s", "CPU s", "load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [str(r["seed"]), f"**{r['exact_match']:.1%}**", *(f"{r['per_task'].get(t, float('nan')):.1%}" for t in tasks),
                 f"{r['loss_last50']:.4f}", f"{r['wall_s']:.0f}", f"{r['cpu_s']:.0f}", f"{r['load_before']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    accs = [r["exact_match"] for r in runs]
    for label, fn in (("mean", lambda xs: sum(xs) / len(xs)), ("min", min)):
        cells = [label, f"**{fn(accs):.1%}**", *(f"{fn([r['per_task'].get(t, 0.0) for r in runs]):.1%}" for t in tasks),
                 f"{fn([r['loss_last50'] for r in runs]):.4f}", f"{fn([r['wall_s'] for r in runs]):.0f}",
                 f"{fn([r['cpu_s'] for r in runs]):.0f}", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--dir", help="keep the runs in DIR/seed-S (default: a temporary folder, removed)")
    parser.add_argument("--out", help="write the JSON result here")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run (after --)")
    args = parser.parse_args()

    base = args.dir or tempfile.mkdtemp(prefix="demo_seeds_")
    runs = []
    try:
        for seed in args.seeds:
            out_dir = os.path.join(base, f"seed-{seed}")
            if os.path.exists(out_dir):  # a finished run there would only be resumed (0 steps)
                raise SystemExit(f"{out_dir} exists; remove it or use another --dir")
            r = run_seed(args.config, seed, out_dir, args.overrides)
            runs.append(r)
            print(f"seed {seed}: exact match {r['exact_match']:.1%} "
                  f"({', '.join(f'{t} {a:.0%}' for t, a in r['per_task'].items())}), "
                  f"loss {r['loss_last50']:.4f}, {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU "
                  f"(load {r['load_before']:.1f})",
                  file=sys.stderr, flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)

    from bench.common import device_name, row, write_result  # imports jax: after the runs

    print(table(runs))
    accs = [r["exact_match"] for r in runs]
    mean, low = sum(accs) / len(accs), min(accs)
    print(f"\nheld-out exact match over {len(runs)} seeds: mean {mean:.1%}, min {low:.1%}; "
          f"wall time per run {min(r['wall_s'] for r in runs):.0f}-{max(r['wall_s'] for r in runs):.0f} s, "
          f"CPU {min(r['cpu_s'] for r in runs):.0f}-{max(r['cpu_s'] for r in runs):.0f} s "
          f"(1-min load average {min(r['load_before'] for r in runs):.1f}-{max(r['load_after'] for r in runs):.1f})")
    rows = [row(f"{args.config} seed {r['seed']}", "held-out exact match", r["exact_match"], None, "fraction")
            for r in runs]
    write_result(args.out, {"bench": "demo_seeds", "device": device_name(), "config": args.config,
                            "overrides": args.overrides, "date": time.strftime("%Y-%m-%d"),
                            "mean_exact_match": mean, "min_exact_match": low, "runs": runs, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
