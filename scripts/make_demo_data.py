"""Write the demo data the repo ships: small generated tasks a tiny model can learn on a CPU.

data/demo_alpaca_train.json, data/demo_alpaca_eval.json: Alpaca records (instruction, input,
output) for three tasks on 4-digit strings (copy, reverse, sort): the same kind of input, so the
model must read the instruction to know what to answer. The eval inputs never occur anywhere in
the training set (under any instruction), and the training set covers only part of the 10,000
possible inputs, so exact match measures learning the tasks, not remembering answers.
data/demo_pretrain.txt: short generated documents separated by blank lines (packed pretraining).

    python scripts/make_demo_data.py        # deterministic: same files on every run
"""

from __future__ import annotations

import argparse
import json
import os
import random

TASKS = {
    "copy": "Copy the digits.",
    "reverse": "Reverse the digits.",
    "sort": "Sort the digits.",
}
# Every input is a string of 4 digits (10,000 of them): 120 held out for eval (40 per task), and
# distinct training inputs drawn from the rest. Sort is the hardest task (it compares all four
# digits), so it gets twice the examples. Short instructions keep every example within 67 tokens
# (the Alpaca template is most of them): the demo's cost per example. Why: configs/demo.yaml.
DIGITS = 4
N_TRAIN = {"copy": 1500, "reverse": 1500, "sort": 3000}
N_EVAL = 40  # held-out records per task
SEED = 1234


def random_input(rnd: random.Random, digits: int = DIGITS) -> str:
    return "".join(rnd.choice("0123456789") for _ in range(digits))


def answer(task: str, x: str) -> str:
    return {"copy": x, "reverse": x[::-1], "sort": "".join(sorted(x))}[task]


def record(task: str, x: str) -> dict:
    return {"instruction": TASKS[task], "input": x, "output": answer(task, x)}


def make_splits(rnd: random.Random, n_train: dict[str, int] = N_TRAIN, n_eval: int = N_EVAL,
                digits: int = DIGITS) -> tuple[list[dict], list[dict]]:
    """n_eval held-out and n_train[task] training records per task, each task's inputs distinct;
    no held-out input string (of any task) occurs anywhere in the training set."""
    held: dict[str, list[str]] = {}
    used: set[str] = set()
    for task in n_train:
        held[task] = []
        while len(held[task]) < n_eval:
            x = random_input(rnd, digits)
            if x not in used:
                used.add(x)
                held[task].append(x)
    train, evaluation = [], []
    for task, n in n_train.items():
        if n > 10 ** digits - len(used):
            raise ValueError(f"{task}: {n} distinct training inputs asked, {10 ** digits - len(used)} exist")
        seen: set[str] = set()
        while len(seen) < n:
            x = random_input(rnd, digits)
            if x not in used and x not in seen:
                seen.add(x)
                train.append(record(task, x))
        evaluation += [record(task, x) for x in held[task]]
    rnd.shuffle(train)
    rnd.shuffle(evaluation)
    return train, evaluation


def make_pretrain_docs(n: int, rnd: random.Random) -> list[str]:
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rnd.randint(1, 4)):
            task = rnd.choice(list(TASKS))
            x = random_input(rnd)
            lines.append(f"{TASKS[task]} {x} gives {answer(task, x)}.")
        docs.append("\n".join(lines))
    return docs


def write_json(path: str, obj: object) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main() -> None:
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=root, help="folder for the three files (default: the repo's data/)")
    args = parser.parse_args()
    rnd = random.Random(SEED)
    train_records, eval_records = make_splits(rnd)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "demo_alpaca_train.json"), train_records)
    write_json(os.path.join(args.out, "demo_alpaca_eval.json"), eval_records)
    tmp = os.path.join(args.out, "demo_pretrain.txt.tmp")
    with open(tmp, "w") as f:
        f.write("\n\n".join(make_pretrain_docs(300, rnd)) + "\n")
    os.replace(tmp, os.path.join(args.out, "demo_pretrain.txt"))
    print(f"wrote {len(train_records)} train and {len(eval_records)} eval records, "
          f"300 pretraining documents to {args.out}")


if __name__ == "__main__":
    main()
