"""Write the demo data the repo ships: small generated tasks a tiny model can learn on a CPU.

data/demo_alpaca_train.json, data/demo_alpaca_eval.json: Alpaca records (instruction, input,
output) for four digit-string tasks (copy, reverse, sort, add). The eval inputs never occur in
the training set, so exact match measures learning the task, not memorising answers.
data/demo_pretrain.txt: short generated documents separated by blank lines (packed pretraining).

    python scripts/make_demo_data.py        # deterministic: same files on every run
"""

from __future__ import annotations

import json
import os
import random

TASKS = {
    "copy": "Copy the digits exactly.",
    "reverse": "Reverse the digits.",
    "sort": "Sort the digits in ascending order.",
    "add": "Add the two numbers.",
}


def inputs(task: str) -> list[str]:
    """Every input of a task (small spaces, so held-out inputs are a clean split)."""
    if task == "add":
        return [f"{a}+{b}" for a in range(10) for b in range(10)]
    n = 3 if task == "sort" else 2
    return [f"{i:0{n}d}" for i in range(10**n)]


def answer(task: str, x: str) -> str:
    if task == "add":
        a, b = x.split("+")
        return str(int(a) + int(b))
    return {"copy": x, "reverse": x[::-1], "sort": "".join(sorted(x))}[task]


def make_splits(n_train: int, n_eval: int, rnd: random.Random) -> tuple[list[dict], list[dict]]:
    """Per task: n_eval held-out inputs for eval, n_train training records drawn from the rest."""
    train, evaluation = [], []
    for task, instruction in TASKS.items():
        xs = inputs(task)
        rnd.shuffle(xs)
        held, rest = xs[:n_eval], xs[n_eval:]
        evaluation += [{"instruction": instruction, "input": x, "output": answer(task, x)} for x in held]
        train += [{"instruction": instruction, "input": x, "output": answer(task, x)}
                  for x in (rnd.choice(rest) for _ in range(n_train))]
    rnd.shuffle(train)
    rnd.shuffle(evaluation)
    return train, evaluation


def make_pretrain_docs(n: int, rnd: random.Random) -> list[str]:
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rnd.randint(1, 4)):
            task = rnd.choice(list(TASKS))
            x = rnd.choice(inputs(task))
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
    rnd = random.Random(1234)
    train_records, eval_records = make_splits(1000, 20, rnd)
    write_json(os.path.join(root, "demo_alpaca_train.json"), train_records)
    write_json(os.path.join(root, "demo_alpaca_eval.json"), eval_records)
    tmp = os.path.join(root, "demo_pretrain.txt.tmp")
    with open(tmp, "w") as f:
        f.write("\n\n".join(make_pretrain_docs(300, rnd)) + "\n")
    os.replace(tmp, os.path.join(root, "demo_pretrain.txt"))
    print(f"wrote {len(train_records)} train and {len(eval_records)} eval records, 300 pretraining documents to {root}")


if __name__ == "__main__":
    main()
