"""Write the LoRA demo's data: a task the base demo model never saw, in Alpaca JSON.

data/demo_lora_train.json, data/demo_lora_eval.json: "Repeat each digit twice." on 3-digit inputs
(472 -> 447722). The 40 eval inputs never occur in the training set. configs/demo-lora.yaml
teaches it to the model configs/demo.yaml trains, with LoRA adapters only.

    python scripts/make_lora_demo_data.py        # deterministic: same files on every run
"""

from __future__ import annotations

import os
import random

from make_demo_data import write_json  # same folder: `python scripts/...` puts it on sys.path

INSTRUCTION = "Repeat each digit twice."


def record(x: str) -> dict:
    return {"instruction": INSTRUCTION, "input": x, "output": "".join(d + d for d in x)}


def main() -> None:
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
    rnd = random.Random(4321)
    xs = [f"{i:03d}" for i in range(1000)]
    rnd.shuffle(xs)
    held, rest = xs[:40], xs[40:]
    write_json(os.path.join(root, "demo_lora_train.json"), [record(x) for x in rest])
    write_json(os.path.join(root, "demo_lora_eval.json"), [record(x) for x in held])


if __name__ == "__main__":
    main()
