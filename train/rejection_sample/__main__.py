"""`python -m train.rejection_sample --policy C --reward RM --tokenizer T --prompts FILE --k K --output FILE`:
K answers per prompt from the policy, scored by the reward model; the best as SFT data (--keep best) or
the best and the worst as preference pairs (--keep pairs)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from llama_jax.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (docs/reference/cli.md is generated from this parser)."""
    p = argparse.ArgumentParser(prog="python -m train.rejection_sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="the policy: a llama_jax checkpoint or training run folder")
    p.add_argument("--reward", required=True, help="the reward model: a checkpoint or run of objective reward")
    p.add_argument("--tokenizer", default=None, help="default: the policy checkpoint's")
    p.add_argument("--prompts", required=True,
                   help="prompt records {'prompt': str or chat messages} or {'messages': [...]} (+ 'input' for "
                        "alpaca): .json, .jsonl, .parquet, hf:NAME")
    p.add_argument("--k", type=int, default=4, help="answers sampled per prompt")
    p.add_argument("--output", required=True, help=".jsonl (one record per line) or .json (a list)")
    p.add_argument("--keep", choices=("best", "pairs"), default="best",
                   help="best: the best answer as SFT data; pairs: best and worst as a preference pair")
    p.add_argument("--template", choices=("chat", "alpaca"), default="chat",
                   help="how a string prompt is laid out (for the policy and the reward model)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per sampled answer at most")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy, K equal answers)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the tokens whose preceding mass is <= p")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same answers")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generation call and reward batch")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="cast both models (default: as saved)")
    return p


def _run(args: argparse.Namespace) -> None:
    from llama_jax.checkpoint import write_text
    from llama_jax.eval.loading import load_for_eval, tokenizer_path
    from llama_jax.eval.reward import RewardScorer
    from llama_jax.preference import prompt_of
    from llama_jax.tokenizer import Tokenizer
    from train.data import storage
    from train.data.formats import iter_records
    from train.rejection_sample import Sampling, rejection_sample

    if not args.output.endswith((".jsonl", ".json")):
        raise ValueError(f"--output {args.output!r}: expected a .jsonl or .json file name")
    tokenizer = Tokenizer(tokenizer_path(args.policy, args.tokenizer))
    prompts = [(where, *prompt_of(record, where)) for path in storage.expand([args.prompts])
               for where, record in iter_records(path)]
    if not prompts:
        raise ValueError(f"{args.prompts}: no prompts")
    policy = load_for_eval(args.policy, args.dtype)
    reward_cfg, reward_params = load_for_eval(args.reward, args.dtype, head="reward")
    for name, cfg in (("policy", policy[0]), ("reward model", reward_cfg)):
        if cfg.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"the {name}'s vocab_size {cfg.vocab_size} is not the tokenizer's {tokenizer.vocab_size}")
    sampling = Sampling(args.k, args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed,
                        args.batch_size)
    records, summary = rejection_sample(policy, RewardScorer(reward_params, reward_cfg, args.batch_size), tokenizer,
                                        prompts, sampling, args.template, args.keep)
    folder = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(folder, exist_ok=True)
    text = ("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) if args.output.endswith(".jsonl")
            else json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    write_text(args.output, text)  # a temporary sibling, then a rename: never half a file
    print(json.dumps({**summary, "output": args.output}))


def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
