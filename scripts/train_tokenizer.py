"""Train the small demo/test tokenizer shipped as data/tokenizer.model.

The real LLaMA tokenizer (32000 pieces) cannot be shipped or downloaded in tests, so we train a tiny
one with the same SentencePiece options Meta used (BPE, byte fallback, split digits, identity
normalization, unk 0 / bos 1 / eos 2 / no pad). It behaves like LLaMA's on everything the code
relies on (ids of the specials, digits one per token, whitespace and byte handling), only with
fewer merges.

Regenerate (deterministic: one thread, no sampling or shuffling of the input):

    python scripts/train_tokenizer.py --write-corpus   # rewrites data/tokenizer_corpus.txt
    python scripts/train_tokenizer.py                  # rewrites data/tokenizer.model (512 pieces)

Options: --vocab-size N (must be > 259: 256 byte pieces + 3 specials), --corpus PATH, --out PATH.
The corpus is synthetic English made by `make_corpus` below (seeded), nothing copied from elsewhere.
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

import sentencepiece as spm

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO / "data" / "tokenizer_corpus.txt"
DEFAULT_OUT = REPO / "data" / "tokenizer.model"

# 256 byte-fallback pieces + <unk>, <s>, </s>.
MIN_VOCAB = 256 + 3


def trainer_options(vocab_size: int) -> dict:
    """LLaMA's SentencePiece trainer options, plus the ones that make training deterministic."""
    return dict(
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        split_by_whitespace=True,
        split_by_unicode_script=True,
        split_by_number=True,
        treat_whitespace_as_suffix=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=0.99995,
        max_sentence_length=1 << 16,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )


def train(corpus: Path, out: Path, vocab_size: int = 512) -> None:
    """Train on `corpus` (one sentence per line) and write the .model file to `out`."""
    if vocab_size <= MIN_VOCAB:
        raise ValueError(f"vocab_size must be > {MIN_VOCAB} (256 byte pieces + 3 specials), got {vocab_size}")
    if not corpus.is_file():
        raise FileNotFoundError(f"corpus not found: {corpus} (run with --write-corpus to create it)")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(input=str(corpus), model_writer=model, **trainer_options(vocab_size))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())


# ----------------------------------------------------------------------------- synthetic corpus

_NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory",
          "Nina", "Oscar", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Yara"]
_THINGS = ["apples", "books", "chairs", "coins", "boxes", "letters", "stones", "trees", "birds", "cups",
           "pencils", "shells", "tickets", "lamps", "cards", "keys", "plates", "ships", "clouds", "rivers"]
_WORDS = ["apple", "banana", "window", "garden", "river", "planet", "silver", "orange", "teacher",
          "number", "simple", "little", "yellow", "market", "winter", "summer", "travel", "kitchen",
          "computer", "language", "question", "answer", "program", "function", "example", "student",
          "morning", "evening", "mountain", "library", "picture", "history", "weather", "machine"]
_ADJS = ["small", "large", "quiet", "bright", "careful", "quick", "slow", "happy", "old", "new",
         "clear", "strange", "useful", "simple", "warm", "cold", "green", "blue", "red", "heavy"]
_PLACES = ["the city", "the village", "the school", "the lab", "the park", "the station", "the museum",
           "the office", "the harbor", "the farm", "the market", "the library"]
_VERBS = ["found", "counted", "painted", "carried", "sorted", "bought", "sold", "wrote", "read",
          "opened", "closed", "moved", "cleaned", "measured", "checked", "collected"]
_TOPICS = ["the weather", "a good breakfast", "learning to code", "the solar system", "saving money",
           "a healthy habit", "the history of trains", "how plants grow", "writing clear emails",
           "the rules of chess", "a short trip", "sleeping well", "reading every day"]
_SYSTEMS = ["Be brief.", "You are a helpful assistant.", "Answer in one sentence.",
            "You are a careful math tutor.", "Always explain your reasoning.", "Reply politely."]


def _sentence(r: random.Random) -> str:
    n = r.randint(2, 999)
    kinds = [
        lambda: f"{r.choice(_NAMES)} {r.choice(_VERBS)} {n} {r.choice(_THINGS)} in {r.choice(_PLACES)}.",
        lambda: f"The {r.choice(_ADJS)} {r.choice(_WORDS)} was {r.choice(_ADJS)}, and it stayed that way.",
        lambda: f"Why is the {r.choice(_WORDS)} so {r.choice(_ADJS)}? Nobody knows!",
        lambda: f"In {r.randint(1800, 2030)}, {r.choice(_NAMES)} moved to {r.choice(_PLACES)}.",
        lambda: f"There are {n} {r.choice(_THINGS)}; {r.randint(1, n)} of them are {r.choice(_ADJS)}.",
        lambda: f"\"{r.choice(_WORDS).capitalize()}!\" said {r.choice(_NAMES)}. \"That's {r.choice(_ADJS)}.\"",
        lambda: f"The price is ${r.randint(1, 500)}.{r.randint(0, 99):02d} (about {r.randint(1, 99)}% off).",
        lambda: f"{r.choice(_NAMES)}'s {r.choice(_WORDS)} weighs {r.randint(1, 90)}.{r.randint(0, 9)} kg.",
        lambda: (f"Call {r.choice(_NAMES)} at {r.randint(100, 999)}-{r.randint(1000, 9999)} "
                 f"before {r.randint(1, 12)}:{r.randint(0, 59):02d} pm."),
        lambda: f"First, {r.choice(_VERBS)} the {r.choice(_THINGS)}. Then, {r.choice(_VERBS)} the {r.choice(_THINGS)}.",
    ]
    return r.choice(kinds)()


def _task(r: random.Random) -> tuple[str, str, str]:
    """One (instruction, input, output) triple of a simple, checkable task."""
    a, b = r.randint(0, 999), r.randint(0, 999)
    nums = [r.randint(0, 99) for _ in range(r.randint(3, 7))]
    word = r.choice(_WORDS)
    kind = r.randrange(8)
    if kind == 0:
        return f"Add {a} and {b}.", "", f"{a} + {b} = {a + b}."
    if kind == 1:
        return f"Subtract {b} from {a}.", "", f"{a} - {b} = {a - b}."
    if kind == 2:
        return "Multiply the two numbers.", f"{a % 50}, {b % 50}", f"The product is {(a % 50) * (b % 50)}."
    if kind == 3:
        return "Reverse the letters of the word.", word, word[::-1]
    if kind == 4:
        listed = ", ".join(map(str, nums))
        return "Sort the numbers from smallest to largest.", listed, ", ".join(map(str, sorted(nums)))
    if kind == 5:
        return "Count the letters in the word.", word, f"The word \"{word}\" has {len(word)} letters."
    if kind == 6:
        return f"Write a short sentence about {r.choice(_TOPICS)}.", "", _sentence(r)
    return "Find the largest number in the list.", ", ".join(map(str, nums)), f"The largest number is {max(nums)}."


def _code(r: random.Random) -> list[str]:
    name, var = r.choice(_WORDS), r.choice(["x", "y", "n", "total", "count", "items", "i", "value"])
    k = r.randint(1, 20)
    snippets = [
        [f"def {name}_{k}({var}):", f"    return {var} * {k} + 1"],
        [f"for i in range({k}):", f"    print(i, {var}[i])"],
        [f"if {var} >= {k} and not done:", f"    {var} = {var} - {k}", "else:", "    pass"],
        [f"{var} = [{', '.join(str(r.randint(0, 9)) for _ in range(4))}]", f"{var}.sort(reverse=True)"],
        [f"int {name}(int {var}) {{ return {var} % {k}; }}"],
        [f"const {name} = ({var}) => {var}.map((v) => v + {k});"],
        [f"# {name}: keep this under {k} lines", f"assert len({var}) == {k}, \"bad length\""],
        [f"x = {{\"{name}\": {k}, \"ok\": true}}  // JSON-like"],
    ]
    return r.choice(snippets)


def make_corpus(seed: int = 0, n_blocks: int = 2500) -> str:
    """Synthetic, varied English + numbers + code + the prompt-format words, one sentence per line."""
    r = random.Random(seed)
    lines: list[str] = []
    for _ in range(n_blocks):
        kind = r.randrange(6)
        if kind in (0, 1):
            lines += [_sentence(r) for _ in range(r.randint(1, 4))]
        elif kind == 2:
            instruction, inp, out = _task(r)
            if inp:
                lines += ["Below is an instruction that describes a task, paired with an input that provides "
                          "further context. Write a response that appropriately completes the request.",
                          "### Instruction:", instruction, "### Input:", inp, "### Response:", out]
            else:
                lines += ["Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.", "### Instruction:", instruction, "### Response:", out]
        elif kind == 3:
            instruction, inp, out = _task(r)
            user = f"{instruction} {inp}".strip()
            if r.random() < 0.5:
                lines += ["[INST] <<SYS>>", r.choice(_SYSTEMS), "<</SYS>>", f"{user} [/INST] {out} "]
            else:
                lines.append(f"[INST] {user} [/INST] {out} ")
        elif kind == 4:
            lines += _code(r)
        else:
            nums = [r.randint(0, 10**r.randint(1, 6)) for _ in range(r.randint(2, 5))]
            lines.append(f"The numbers {', '.join(map(str, nums))} add up to {sum(nums)}.")
    # A little non-ASCII so common accented letters get pieces; everything else goes through bytes.
    lines += ["Café, naïve, résumé, façade and déjà vu are borrowed words."] * 3
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--write-corpus", action="store_true", help="(re)generate the synthetic corpus and stop")
    args = p.parse_args()
    if args.write_corpus:
        args.corpus.parent.mkdir(parents=True, exist_ok=True)
        args.corpus.write_text(make_corpus(), encoding="utf-8")
        print(f"wrote {args.corpus} ({args.corpus.stat().st_size} bytes)")
        return
    train(args.corpus, args.out, args.vocab_size)
    sp = spm.SentencePieceProcessor(model_file=str(args.out))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {sp.vocab_size()} pieces)")


if __name__ == "__main__":
    main()
