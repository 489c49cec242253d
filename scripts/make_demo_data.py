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


def make_record(task: str, rnd: random.Random) -> dict:
    if task == "add":
        a, b = rnd.randint(10, 99), rnd.randint(10, 99)
        return {"instruction": TASKS[task], "input": f"{a}+{b}", "output": str(a + b)}
    digits = "".join(rnd.choice("0123456789") for _ in range(4))  # one length: a fixed RoPE offset to learn
    output = {"copy": digits, "reverse": digits[::-1], "sort": "".join(sorted(digits))}[task]
    return {"instruction": TASKS[task], "input": digits, "output": output}


def make_split(n_per_task: int, rnd: random.Random, exclude: set) -> list[dict]:
    records, seen = [], set(exclude)
    for task in TASKS:
        count = 0
        while count < n_per_task:
            r = make_record(task, rnd)
            if (task, r["input"]) in seen:
                continue
            seen.add((task, r["input"]))
            records.append(r)
            count += 1
    rnd.shuffle(records)
    return records


def make_pretrain_docs(n: int, rnd: random.Random) -> list[str]:
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rnd.randint(1, 4)):
            r = make_record(rnd.choice(list(TASKS)), rnd)
            lines.append(f"{r['instruction']} {r['input']} gives {r['output']}.")
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
    eval_records = make_split(25, rnd, exclude=set())
    held_out = {(next(t for t, ins in TASKS.items() if ins == r["instruction"]), r["input"]) for r in eval_records}
    train_records = make_split(1000, rnd, exclude=held_out)
    write_json(os.path.join(root, "demo_alpaca_train.json"), train_records)
    write_json(os.path.join(root, "demo_alpaca_eval.json"), eval_records)
    tmp = os.path.join(root, "demo_pretrain.txt.tmp")
    with open(tmp, "w") as f:
        f.write("\n\n".join(make_pretrain_docs(300, rnd)) + "\n")
    os.replace(tmp, os.path.join(root, "demo_pretrain.txt"))
    print(f"wrote {len(train_records)} train and {len(eval_records)} eval records, 300 pretraining documents to {root}")


if __name__ == "__main__":
    main()
