"""`python -m train.tokenize`: raw text or SFT records -> fixed-size token shards for training
(`data.format: tokens`). Running it again finishes an interrupted run or does nothing."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from llama_jax.errors import run_cli
from train.data.pretokenize import FORMATS


def peak_rss_mb() -> int:
    """This process's peak resident memory (VmHWM: ru_maxrss would carry the launching process's
    peak across exec)."""
    with open("/proc/self/status") as f:
        return round(next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0) / 1024)


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (docs/reference/cli.md is generated from this parser)."""
    parser = argparse.ArgumentParser(prog="python -m train.tokenize", description=__doc__)
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="files, globs or URLs (gs://...); hf:NAME for a Hub data set (alpaca/chat)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.model, tokenizer.json or a folder (path or URL), or a Hub repo id")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS),
                        help="text: blank-line separated documents; jsonl/parquet: documents in --text-key; "
                             "alpaca/chat: instruction records (.json, .jsonl, .parquet, save_to_disk folders, hf:)")
    parser.add_argument("--output", required=True, help="folder (or URL) for shard-NNNNN.bin + manifest.json")
    parser.add_argument("--text-key", default="text", help="field holding a document (jsonl, parquet)")
    parser.add_argument("--workers", type=int, default=None, help="encoding processes, 1-1024 (default: one per CPU)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 25,
                        help="tokens per shard, 1024 to 2^30 (default 2^25)")
    parser.add_argument("--overwrite", action="store_true", help="replace a folder holding another data set")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(_tokenize, build_parser().parse_args(argv))


def _tokenize(args: argparse.Namespace) -> None:
    from train.data.pretokenize import tokenize

    start, started = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    manifest = tokenize(args.tokenizer, args.format, args.inputs, args.output, args.text_key, args.workers,
                        args.shard_tokens, args.overwrite, not args.no_progress)
    if manifest.get("already"):
        print(f"{args.output} is already tokenized from these inputs: nothing to do", file=sys.stderr)
    summary = {k: manifest[k] for k in ("tokens", "docs", "records", "skipped", "shards", "dtype", "kind")}
    seconds = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF)
    cpu = {"main": round(own.ru_utime + own.ru_stime - started.ru_utime - started.ru_stime, 2),  # after start-up
           "workers": round(manifest.get("workers_cpu_s", 0.0), 2)}
    print(json.dumps({"output": args.output, **summary, "seconds": round(seconds, 2), "cpu_s": cpu,
                      "peak_rss_mb": max(peak_rss_mb(), manifest.get("workers_peak_rss_mb", 0))}))


if __name__ == "__main__":
    sys.exit(main())
