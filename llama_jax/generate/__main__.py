"""`python -m llama_jax.generate`: generate text from a checkpoint, once or as an interactive chat."""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Sequence


from llama_jax import quant
from llama_jax.errors import one_line, run_cli
from llama_jax.generate.engine import PREFILL_CHUNK
from llama_jax.generate.generator import Generator
from sharding import inference_mesh


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (docs/reference/cli.md is generated from this parser)."""
    p = argparse.ArgumentParser(prog="python -m llama_jax.generate", description="Generate text from a llama_jax checkpoint: one prompt, or an interactive chat.")
    p.add_argument("--checkpoint", required=True, help="a llama_jax checkpoint directory (or a training run)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.model, tokenizer.json, a folder or a Hub repo id (default: the one the "
                        "checkpoint or run folder carries)")
    p.add_argument("--prompt", help="the prompt text (chat: the user message; alpaca: the instruction)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", action="store_true", help="the tokenizer's chat format (Llama-2-chat, or Llama 3's headers)")
    mode.add_argument("--alpaca", action="store_true", help="Stanford Alpaca prompt format")
    p.add_argument("--input", default="", help="alpaca: the optional input that goes with the instruction")
    p.add_argument("--system", default=None, help="chat: an optional system message")
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin in a loop (chat keeps history)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: up to the model's context")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling: keep the tokens whose preceding mass is <= p")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same text")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the answer where this text appears (not printed); repeat for several")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="cast params (default: as saved)")
    p.add_argument("--quantize", default=None, metavar="|".join(quant.FORMATS),
                   help="weight-only quantised projections: int8 (per-channel, half of bf16's bytes) or nf4")
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="split heads/MLP over this many devices (a (1, 1, N) data/fsdp/tensor mesh)")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, metavar="N",
                   help=f"prefill a long prompt N positions at a time: activations of N tokens, not the whole "
                        f"prompt (default {PREFILL_CHUNK}; 0 = the whole prompt at once)")
    return p


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.prefill_chunk < 0:
        p.error(f"--prefill-chunk must be >= 0 (0 = the whole prompt at once), got {args.prefill_chunk}")
    if not args.interactive and args.prompt is None:
        p.error("give --prompt TEXT or --interactive")
    if args.input and not args.alpaca:
        p.error("--input is the Alpaca input that goes with an instruction: add --alpaca")
    if args.system is not None and not args.chat:
        p.error("--system is a chat system message: add --chat")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    status = run_cli(_run, args)
    if status:
        raise SystemExit(status)


def _text(value: str | None, flag: str) -> str | None:
    """A command-line text as UTF-8 (the shell hands undecodable bytes over as surrogates)."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{flag}: not valid UTF-8 text (a byte that is not UTF-8 at character {e.start})") \
                from None
    return value


def _read_line(number: int) -> str | None:
    """One line of stdin as text (None at the end); a line that is not UTF-8 raises, naming it."""
    if sys.stdin.isatty():
        sys.stdout.write("> ")
        sys.stdout.flush()
    if not hasattr(sys.stdin, "buffer"):  # already text (e.g. io.StringIO)
        return sys.stdin.readline().rstrip("\r\n") or None
    raw = sys.stdin.buffer.readline()
    if not raw:
        return None
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"stdin line {number}: not valid UTF-8 text (byte {raw[e.start]:#04x} at offset "
                         f"{e.start}); line skipped") from None


def _fit_history(gen: Generator, history: list[dict], text: str, mode: str, input: str) -> list[int]:
    """Prompt ids for `text`; in a chat, the oldest (user, assistant) turns are dropped until the
    prompt leaves room to answer (a quarter of the context), so a long session never overflows."""
    ids = gen.prompt_ids(text, mode, input=input, history=history)
    first = 1 if history and history[0]["role"] == "system" else 0
    while mode == "chat" and len(ids) > gen.cfg.max_seq_len * 3 // 4 and len(history) >= first + 2:
        del history[first:first + 2]
        ids = gen.prompt_ids(text, mode, input=input, history=history)
    return ids


def _run(args: argparse.Namespace) -> None:
    for flag in ("prompt", "input", "system"):
        _text(getattr(args, flag), f"--{flag}")
    if args.quantize is not None:
        quant.check_format(args.quantize, "--quantize")
    mesh = inference_mesh(args.tensor_parallel)
    gen = Generator(args.checkpoint, args.tokenizer, mesh=mesh, dtype=args.dtype, quantize=args.quantize,
                    prefill_chunk=args.prefill_chunk or None)
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "seed": args.seed}
    mode = "chat" if args.chat else "alpaca" if args.alpaca else "complete"
    history: list[dict] = [{"role": "system", "content": args.system}] if args.chat and args.system else []

    def answer(text: str) -> str:
        ids = _fit_history(gen, history, text, mode, args.input)
        reply = ""
        for piece in gen.stream(ids, stop=args.stop, **sampling):
            reply += piece
            print(piece, end="", flush=True)
        print(flush=True)
        if not reply:
            print("(empty answer: the model's first new token was an end token)", file=sys.stderr)
        if mode == "chat":
            history.extend([{"role": "user", "content": text}, {"role": "assistant", "content": reply}])
        return reply

    if args.prompt is not None:
        answer(args.prompt)
    if args.interactive:
        for number in itertools.count(1):
            try:
                text = _read_line(number)
                if text is None or text.strip() in ("", "exit", "quit"):
                    break
                answer(text)
            except ValueError as e:  # e.g. a message with [INST] in it, or not UTF-8: say so, keep the session
                print(f"error: {one_line(e)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
