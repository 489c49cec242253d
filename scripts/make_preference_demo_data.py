"""Write the preference demo's data: pairs of a right and a wrong answer to the digit tasks.

data/demo_preference_train.json, data/demo_preference_eval.json: TRL-style records {"prompt",
"input", "chosen", "rejected"} (the prompt is an Alpaca instruction: configs/demo-dpo.yaml uses
preference.template alpaca) on the demo's tasks over 4-digit strings (copy, reverse, sort: the same
inputs as scripts/make_demo_data.py's, so the 120 held-out inputs are data/demo_alpaca_eval.json's
and occur nowhere in the training pairs). "chosen" is the right answer; "rejected" a plausible
mistake: another task's answer to the same input (reverse -> the copy, sort -> the digits
reversed...) or the right answer with two neighbouring digits swapped.

    python scripts/make_preference_demo_data.py        # deterministic: same files on every run
"""

from __future__ import annotations

import argparse
import os
import random

from make_demo_data import SEED, TASKS, answer, make_splits, write_json  # same folder: on sys.path

TASK_OF = {instruction: task for task, instruction in TASKS.items()}


def mistake(task: str, x: str, rnd: random.Random) -> str:
    """A wrong answer to `task` on input x: another task's answer, or the right one with a neighbour swap."""
    right = answer(task, x)
    candidates = {answer(other, x) for other in TASKS if other != task}
    i = rnd.randrange(len(right) - 1)
    candidates.add(right[:i] + right[i + 1] + right[i] + right[i + 2:])
    wrong = sorted(c for c in candidates if c != right)
    return rnd.choice(wrong) if wrong else str((int(right) + 1) % 10 ** len(right)).zfill(len(right))


def pair(record: dict, rnd: random.Random) -> dict:
    task = TASK_OF[record["instruction"]]
    return {"prompt": record["instruction"], "input": record["input"], "chosen": record["output"],
            "rejected": mistake(task, record["input"], rnd)}


def main() -> None:
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=root, help="folder for the two files (default: the repo's data/)")
    root = parser.parse_args().out
    os.makedirs(root, exist_ok=True)
    train_records, eval_records = make_splits(random.Random(SEED))  # the SFT demo's inputs and held-out split
    rnd = random.Random(2468)
    train = [pair(r, rnd) for r in train_records[:3000]]
    evaluation = [pair(r, rnd) for r in eval_records]
    write_json(os.path.join(root, "demo_preference_train.json"), train)
    write_json(os.path.join(root, "demo_preference_eval.json"), evaluation)
    print(f"wrote {len(train)} training and {len(evaluation)} held-out pairs to {root}")


if __name__ == "__main__":
    main()
