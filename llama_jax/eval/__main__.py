"""`python -m llama_jax.eval perplexity|harness|reward`: perplexity of held-out text, lm-evaluation-harness
tasks, or a reward model's accuracy on held-out preference pairs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from llama_jax.checkpoint import is_remote, write_text
from llama_jax.eval.loading import eval_mesh, load_for_eval, tokenizer_path
from llama_jax.eval.perplexity import perplexity, read_texts
from llama_jax.eval.reward import RewardScorer, score_pairs
from llama_jax.eval.scoring import Scorer
from llama_jax.preference import TEMPLATES, pair_of, read_records
from llama_jax.tokenizer import Tokenizer


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (docs/reference/cli.md is generated from this parser)."""
    p = argparse.ArgumentParser(prog="python -m llama_jax.eval", description=__doc__)
    commands = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="a llama_jax checkpoint directory (or a training run)")
    common.add_argument("--tokenizer", default=None,
                        help="tokenizer.model, tokenizer.json, a folder or a Hub repo id (default: the "
                             "checkpoint's or run folder's)")
    common.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (a multiple of --fsdp)")
    common.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="params and compute dtype (default: as saved); logits are float32")
    common.add_argument("--tensor-parallel", type=int, default=1, help="split heads/MLP over this many devices")
    common.add_argument("--fsdp", type=int, default=1, help="split params and batch rows over this many devices")

    ppl = commands.add_parser("perplexity", parents=[common], help="sliding-window perplexity of a text file",
                              description="Perplexity with the transformers guide's sliding window; the last "
                                          'line printed is {"ppl": .., "nll": .., "tokens": ..}.')
    ppl.add_argument("--data", required=True, help="a text file (one document) or .jsonl (one per line)")
    ppl.add_argument("--text-key", default="text", help=".jsonl: the field holding each document")
    ppl.add_argument("--max-len", type=int, default=None, help="window length in tokens (default: the model's context)")
    ppl.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: max-len / 2)")

    harness = commands.add_parser("harness", parents=[common], help="lm-evaluation-harness tasks",
                                  description="Run lm-evaluation-harness tasks on the checkpoint (model "
                                              "`llama_jax`) and print the harness's table.")
    harness.add_argument("--tasks", required=True, help="comma-separated task names, e.g. hellaswag,arc_easy")
    harness.add_argument("--include-path", default=None, help="a folder of extra task YAMLs")
    harness.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    harness.add_argument("--limit", type=float, default=None, help="at most this many documents per task "
                                                                   "(a fraction < 1: that share)")
    harness.add_argument("--output", default=None, help="write the results JSON (the harness's own shape) here")

    pairs = commands.add_parser("reward", parents=[common], help="a reward model's accuracy on preference pairs",
                                description="Score both answers of each held-out pair with a reward model (objective: "
                                            "reward); the last line printed is "
                                            '{"accuracy": .., "margin": .., "pairs": .., "skipped": ..}.')
    pairs.add_argument("--data", required=True, help="preference pairs: .json, .jsonl, .parquet or hf:NAME[:SPLIT] "
                                                     "(the schemas of data.format preference)")
    pairs.add_argument("--template", choices=TEMPLATES, default="chat",
                       help="how a string prompt is laid out: the model's training recipe's preference.template")
    pairs.add_argument("--max-len", type=int, default=None,
                       help="tokens per side, the prompt cut first (default: the model's context)")
    return p


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    try:
        {"perplexity": _perplexity, "harness": _harness, "reward": _reward}[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as e:  # user errors: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _perplexity(args: argparse.Namespace) -> None:
    tokenizer = Tokenizer(tokenizer_path(args.checkpoint, args.tokenizer))
    texts = read_texts(args.data, args.text_key)  # bad data fails before the model loads
    mesh = eval_mesh(args.tensor_parallel, args.fsdp)
    cfg, params = load_for_eval(args.checkpoint, args.dtype, mesh)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is {cfg.vocab_size}")
    documents = [tokenizer.encode(t, bos=True, eos=False) for t in texts]
    result = perplexity(Scorer(params, cfg, args.batch_size, mesh), documents, args.max_len, args.stride,
                        progress=True)
    print(json.dumps(result))


def _reward(args: argparse.Namespace) -> None:
    tokenizer = Tokenizer(tokenizer_path(args.checkpoint, args.tokenizer))
    pairs = [(where, pair_of(record, where)) for where, record in read_records(args.data)]  # bad data fails first
    if not pairs:
        raise ValueError(f"{args.data}: no preference pairs")
    mesh = eval_mesh(args.tensor_parallel, args.fsdp)
    cfg, params = load_for_eval(args.checkpoint, args.dtype, mesh, head="reward")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is {cfg.vocab_size}")
    print(json.dumps(score_pairs(RewardScorer(params, cfg, args.batch_size, mesh), tokenizer, pairs, args.template,
                                 args.max_len)))


def _harness(args: argparse.Namespace) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    from llama_jax.eval.harness import LlamaJaxLM

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager = None
    if args.include_path:  # only tasks of --include-path: skip indexing lm-eval's ~20,000 built-in files (10 s)
        local = TaskManager(include_path=args.include_path, include_defaults=False)
        manager = local if all(t in local.all_subtasks for t in tasks) else None
    manager = manager or TaskManager(include_path=args.include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; see `lm_eval ls tasks`, or give --include-path for your YAMLs")
    lm = LlamaJaxLM(args.checkpoint, args.tokenizer, batch_size=args.batch_size, dtype=args.dtype,
                    tensor_parallel=args.tensor_parallel, fsdp=args.fsdp)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                      task_manager=manager, log_samples=False)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output:
        if not is_remote(args.output):  # like mkdir -p, as the other commands' outputs
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        write_text(args.output, json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))


if __name__ == "__main__":
    main()
