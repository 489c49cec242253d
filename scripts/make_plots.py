"""Draws the docs' plots (docs/img/*.png) from the measurements in bench/plots/ (matplotlib).

    python scripts/make_plots.py               # after a bench/plots/ file changes
    python scripts/make_plots.py --out DIR     # somewhere else (tests/test_docs.py draws into a temp dir)

Sources, each written by the command that measured it (the file says which):
- bench/plots/demo_seed0_metrics.jsonl: `step`/`loss`/`eval_loss` of runs/demo/metrics.jsonl from
  `python -m train --config configs/demo.yaml` (seed 0) -> demo_loss.png
- bench/plots/lora_plans.jsonl: `python bench/lora_plans.py --out ...` rows -> lora_fit.png
- bench/plots/serve_cpu.json: `python bench/serve.py` stats, continuous vs static -> serving.png
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = os.path.join(ROOT, "bench", "plots")
OURS, PEER = "#1f77b4", "#b0b0b0"  # ours in colour, the baseline in grey, in every plot


def _jsonl(name: str) -> list[dict]:
    with open(os.path.join(SOURCES, name)) as f:
        return [json.loads(line) for line in f if line.strip()]


def demo_loss(out: str) -> str:
    rows = _jsonl("demo_seed0_metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(*zip(*train), color=OURS, lw=1.2, label="training loss (each step)")
    ax.plot(*zip(*val), "o-", color="#d62728", lw=1.5, label="validation loss (120 held-out answers)")
    ax.set_yscale("log")
    ax.set_xlabel("step (batch 64)")
    ax.set_ylabel("cross-entropy, nats (log scale)")
    ax.set_title("configs/demo.yaml, seed 0: held-out exact match 0% -> 97.5%", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out, "demo_loss.png")


def lora_fit(out: str) -> str:
    rows = [r for r in _jsonl("lora_plans.jsonl") if r["seq"] == 512]
    labels = [f"{r['model']} {'LoRA bf16' if r['base'] == 'bfloat16' else 'QLoRA ' + r['base']} {r['topology']}"
              for r in rows]
    colours = ["#ff7f0e" if r["base"] == "bfloat16" else OURS for r in rows]
    y = range(len(rows))[::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 5.2), sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    left.barh(list(y), [r["max_batch"] for r in rows], color=colours)
    for yi, r in zip(y, rows):
        left.text(r["max_batch"] + 4, yi, str(r["max_batch"]) if r["fits"] else "none: base > HBM",
                  va="center", fontsize=7)
    left.set_yticks(list(y), labels, fontsize=7)
    left.set_xlabel("largest batch x 512 tokens that fits (rank 16, all 7 projections)")
    right.barh(list(y), [r["base_gib"] for r in rows], color=colours)
    right.scatter([r["hbm_gib"] for r in rows], list(y), marker="|", s=120, color="black", label="chip HBM")
    right.set_xscale("log")
    right.set_xlabel("frozen base per chip, GiB (log)")
    right.legend(fontsize=7, loc="lower right")
    fig.suptitle("LoRA (orange, bf16 base) vs QLoRA (blue, nf4 base) on TPU slices: compiler plans "
                 "(python bench/lora_plans.py)", fontsize=9)
    return _save(fig, out, "lora_fit.png")


def serving(out: str) -> str:
    with open(os.path.join(SOURCES, "serve_cpu.json")) as f:
        runs = json.load(f)["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    x = range(len(runs))
    width = 0.38
    left.bar([i - width / 2 for i in x], [r["stats"]["continuous"]["tokens_per_s"] for r in runs], width,
             color=OURS, label="continuous batching (ours)")
    left.bar([i + width / 2 for i in x], [r["stats"]["static"]["tokens_per_s"] for r in runs], width,
             color=PEER, label="static lj.generate batches")
    for i, r in zip(x, runs):
        ratio = r["stats"]["continuous"]["tokens_per_s"] / r["stats"]["static"]["tokens_per_s"]
        left.text(i, r["stats"]["continuous"]["tokens_per_s"] + 10, f"{ratio:.2f}x", ha="center", fontsize=8)
    left.set_xticks(list(x), [f"--steps-per-call {r['steps_per_call']}\n(load ~{r['load']})" for r in runs], fontsize=7)
    left.set_ylabel("tokens/s")
    left.set_ylim(0, 1.15 * max(r["stats"]["continuous"]["tokens_per_s"] for r in runs))
    left.legend(fontsize=7, loc="lower left")
    timed = [r for r in runs if "ttft_p50_ms" in r["stats"]["continuous"]]
    labels = []
    for i, r in enumerate(timed):
        for j, (mode, colour) in enumerate((("continuous", OURS), ("static", PEER))):
            s = r["stats"][mode]
            right.bar(2 * i + j * 0.8, s["ttft_p50_ms"] / 1e3, 0.7, color=colour, label=mode if i == 0 else None)
            right.plot([2 * i + j * 0.8] * 2, [s["ttft_p50_ms"] / 1e3, s["ttft_p99_ms"] / 1e3], color="black", lw=1)
        labels.append((2 * i + 0.4, f"--steps-per-call {r['steps_per_call']}"))
    right.set_xticks([p for p, _ in labels], [t for _, t in labels], fontsize=7)
    right.legend(fontsize=7, loc="upper left")
    right.set_ylabel("time to first token, s (bar p50, line to p99)")
    fig.suptitle("python bench/serve.py: demo preset, 96 ragged requests, 32 clients, 16 slots, 2-core CPU "
                 "(2026-11-27)", fontsize=9)
    return _save(fig, out, "serving.png")


def _save(fig: plt.Figure, out: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(out, name)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110, metadata={"Software": None})  # no version stamp: a rerun gives the same file
    plt.close(fig)
    os.replace(tmp, path)
    return path


PLOTS = (demo_loss, lora_fit, serving)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "img"), help="folder for the PNGs")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for plot in PLOTS:
        print(f"wrote {plot(args.out)}")


if __name__ == "__main__":
    main()
