"""Harness benchmark: lm-evaluation-harness loglikelihood requests per second through our `llama_jax`
model beside lm-eval's own `hf` model, on the same machine, for a synthetic multiple-choice task.

    python bench/eval.py              # llama-1b (0.95B) float32 on a CPU, bfloat16 on a GPU; random weights
    python bench/eval.py --smoke      # the tiny demo preset (a quick end-to-end check)
    python bench/eval.py --questions 64 --batch 16 --dtype bfloat16

The task: --questions questions of 20-40 words, each with 4 answers of 2-8 words (4 loglikelihood
requests per question, as HellaSwag or ARC produce). Both models get the same requests through the
harness's own `loglikelihood` (tokenising, sorting, batching, scoring) with the same batch size.
The text is tokenised with the shipped 512-piece tokenizer (its ids are valid in the 32000-entry
vocabulary; the speed does not depend on which ids). Ours is timed after one untimed pass that
compiles its length buckets (reported as compile s); the hf model after one untimed batch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import llama_jax as lj  # noqa: E402
from bench.common import device_name, free_torch, hf_peer_model, row, write_result  # noqa: E402

TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tokenizer.model")
WORDS = ("the clear picture was blue and it stayed that way why is silver so heavy nobody knows there are ships "
         "of them heavy evening said mallory office moved river mountain computer banana orange cold large slow "
         "answer question numbers add copy reverse sort digits village measured coins happy travel").split()


def requests(questions: int, seed: int = 0) -> list:
    from lm_eval.api.instance import Instance

    rng = np.random.default_rng(seed)
    out = []
    for q in range(questions):
        context = "Question: " + " ".join(rng.choice(WORDS, int(rng.integers(20, 41)))) + "\nAnswer:"
        for a in range(4):
            answer = " " + " ".join(rng.choice(WORDS, int(rng.integers(2, 9))))
            out.append(Instance("loglikelihood", doc={}, arguments=(context, answer), idx=a, doc_id=q))
    return out


class WideTokenizer(lj.Tokenizer):
    """The 512-piece tokenizer in front of a model with a larger vocabulary (its ids stay valid)."""

    def __init__(self, path: str, vocab_size: int) -> None:
        super().__init__(path)
        self._vocab = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab


def hf_tokenizer_dir() -> str:
    """A folder transformers loads our tokenizer from (the files export-hf writes)."""
    folder = tempfile.mkdtemp(prefix="bench_eval_tok_")
    shutil.copyfile(TOKENIZER, os.path.join(folder, "tokenizer.model"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}, f)
    return folder


def timed(lm, reqs: list) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = lm.loglikelihood(reqs, disable_tqdm=True)
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="the tiny demo preset, 8 questions")
    p.add_argument("--preset", help="default: llama-1b (demo with --smoke)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on a GPU/TPU, else float32")
    p.add_argument("--questions", type=int, help="default: 8 on a CPU, 128 on an accelerator")
    p.add_argument("--batch", type=int, default=8, help="rows per forward pass, both models")
    p.add_argument("--no-hf", action="store_true", help="skip lm-eval's hf model")
    p.add_argument("--out", help="write the JSON result here")
    args = p.parse_args()
    accelerator = jax.default_backend() != "cpu"
    args.preset = args.preset or ("demo" if args.smoke else "llama-1b")
    args.dtype = args.dtype or ("bfloat16" if accelerator and not args.smoke else "float32")
    args.questions = args.questions or (128 if accelerator and not args.smoke else 8)

    cfg = lj.LlamaConfig.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype)
    reqs = requests(args.questions)
    peer = None
    if not args.no_hf:  # the PyTorch peer first, freed before JAX allocates
        from lm_eval.models.huggingface import HFLM

        model = hf_peer_model(cfg, args.dtype)
        if model is not None:
            folder = hf_tokenizer_dir()
            hf = HFLM(pretrained=model, tokenizer=folder, batch_size=args.batch,
                      device=str(next(model.parameters()).device))
            timed(hf, reqs[:args.batch])  # warm-up
            peer_s, _ = timed(hf, reqs)
            peer = {"seconds": peer_s, "requests_per_s": len(reqs) / peer_s}
            del hf, model
            shutil.rmtree(folder)
            free_torch()

    from llama_jax.eval.harness import LlamaJaxLM

    params = lj.init_params(cfg, 0)
    lm = LlamaJaxLM((cfg, params), WideTokenizer(TOKENIZER, cfg.vocab_size), batch_size=args.batch)
    compile_s, _ = timed(lm, reqs)  # first pass: compiles each length bucket
    ours_s, _ = timed(lm, reqs)
    ours = {"seconds": ours_s, "requests_per_s": len(reqs) / ours_s, "first_pass_s": compile_s}

    config = f"{args.preset} {args.dtype}, {args.questions} questions x 4 answers, batch {args.batch}"
    print(f"# harness loglikelihood, {config}, device {device_name()}")
    print(f"{'model':24} {'requests':>8} {'seconds':>8} {'req/s':>8}")
    print(f"{'llama_jax':24} {len(reqs):>8} {ours_s:>8.2f} {ours['requests_per_s']:>8.2f}   "
          f"(first pass with compiles: {compile_s:.1f} s)")
    if peer:
        print(f"{'lm-eval hf (transformers)':24} {len(reqs):>8} {peer['seconds']:>8.2f} {peer['requests_per_s']:>8.2f}")
        print(f"ratio (ours / hf): {ours['requests_per_s'] / peer['requests_per_s']:.2f}")
    rows = [row(config, "harness loglikelihood requests/s", ours["requests_per_s"],
                peer and peer["requests_per_s"], "req/s", first_pass_s=compile_s)]
    write_result(args.out, {"bench": "eval", "device": device_name(), "args": vars(args), "rows": rows,
                            "ours": ours, "peer": peer})


if __name__ == "__main__":
    main()
