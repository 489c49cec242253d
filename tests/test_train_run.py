"""`python -m train` end to end on a tiny model with Alpaca data and evaluation on (seconds), and the
demo's exact-match evaluation against HF transformers' greedy answers.

The run's numbers are checked against values worked out by hand from the recipe: steps from
`epochs`, the warmup from `warmup_ratio` and the cosine that follows, the step folders that
`keep_checkpoints` leaves, and MFU from the FLOP formula and the given peak. A second run starts
from the first with `init_from` at learning rate 0 and must hold exactly its weights.
"""

import json
import math
import os

import jax
import numpy as np
import pytest

import llama_jax as lj
from reference import hf_greedy, hf_model, hf_params
from train.__main__ import main
from train.evaluate import exact_match

TOKENIZER = "data/tokenizer.model"
STANFORD_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                       "{instruction}\n\n### Input:\n{input}\n\n### Response:")
STANFORD_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def test_exact_match_scores_greedy_answers_after_strip():
    """Greedy answers (HF's, to the literal Stanford prompts, cut at EOS) equal to the expected output
    after stripping count; others do not. Two hits of four: 0.5."""
    cfg = lj.LlamaConfig.preset("tiny-gqa")
    model = hf_model(cfg, seed=1, sharpen=4.0)
    tok = lj.Tokenizer(TOKENIZER)
    records = [{"instruction": "Add the numbers.", "input": "2+3"}, {"instruction": "Name a colour."},
               {"instruction": "Copy the digits.", "input": "77"}, {"instruction": "Sort the digits.", "input": "321"}]
    answers = []
    for r in records:
        prompt = (STANFORD_WITH_INPUT if r.get("input") else STANFORD_NO_INPUT).format(**r)
        answers.append(tok.decode(hf_greedy(model, tok.encode(prompt, bos=True), 6, eos_id=tok.eos_id)))
    assert all(a.strip() for a in answers)
    records[0]["output"] = f"  {answers[0].strip()} "  # a hit: compared after strip
    records[1]["output"] = answers[1]  # a hit
    records[2]["output"] = answers[2].strip() + "0"  # a miss
    records[3]["output"] = answers[0].strip() if answers[0].strip() != answers[3].strip() else "x"  # a miss
    accuracy, rows = exact_match(hf_params(model, cfg), cfg, tok, records, max_new_tokens=6)
    assert accuracy == 0.5
    assert [row["got"] for row in rows] == answers
    assert [row["expected"] for row in rows] == [r["output"] for r in records]


@pytest.fixture(scope="module")
def alpaca_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("alpaca")
    with open("data/demo_alpaca_train.json") as f:
        train = json.load(f)[:24]
    with open("data/demo_alpaca_eval.json") as f:
        held_out = json.load(f)[:6]
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "eval.json").write_text(json.dumps(held_out))
    return str(folder / "train.json"), str(folder / "eval.json")


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run_cli(capsys, argv):
    assert main(["--config", "configs/demo.yaml", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_cli_alpaca_eval_epochs_warmup_keep_mfu_and_init_from(tmp_path, alpaca_files, capsys):
    train_file, eval_file = alpaca_files
    out = str(tmp_path / "run")
    lr = 1e-3
    summary = run_cli(capsys, [
        f"output_dir={out}", "steps=0", "epochs=1.5", "batch_size=8", "checkpoint_every=2", "keep_checkpoints=2",
        "log_every=1", "model.preset=tiny", "model.overrides={}", f"data.train=[{train_file}]", "data.max_len=80",
        f"eval.data={eval_file}", "eval.examples=3", "eval.max_new_tokens=4", "optim.warmup_steps=null",
        "optim.warmup_ratio=0.5", f"optim.lr={lr}", "optim.min_lr_ratio=0.1", "peak_tflops=1.0",
        "tensorboard=false", "async_checkpointing=false"])

    # 24 examples -> 24 rows -> 3 batches of 8 per epoch; 1.5 epochs -> ceil(4.5) = 5 steps.
    assert summary["steps"] == 5 and summary["start_step"] == 0
    log = records(os.path.join(out, "metrics.jsonl"))
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    # warmup_ratio 0.5 -> ceil(2.5) = 3 warmup steps: step s runs at lr(s - 1) = lr (s - 1) / 3, then a
    # cosine over the 2 steps left from lr down to 0.1 lr: lr at step 4, lr (0.1 + 0.9 (1 + cos(pi/2)) / 2) at 5.
    want_lr = [0.0, lr / 3, 2 * lr / 3, lr, lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))]
    np.testing.assert_allclose([r["lr"] for r in steps], want_lr, rtol=1e-6, atol=1e-12)
    # keep_checkpoints=2, saves at steps 2, 4 and 5 (the last): only the two newest step folders remain.
    assert sorted(int(p) for p in os.listdir(out) if p.isdigit()) == [4, 5]
    # MFU = tokens/s x training FLOPs per token / (8 devices x the given 1 TFLOP/s peak). The tiny model by
    # hand: 2 x 512 x 64 embedding/output + 2 layers x (4 x 64 x 64 attention + 3 x 64 x 192 FFN + 2 x 64
    # norms) + 64 = 172352 params; FLOPs/token = 6 x (172352 - 512 x 64) + 6 x 2 layers x 64 x 80 tokens.
    flops_per_token = 6 * (172352 - 512 * 64) + 6 * 2 * 64 * 80
    timed = [r for r in steps if "mfu" in r]
    assert len(timed) >= 3
    for r in timed:
        assert r["tokens_per_s"] == pytest.approx(8 * 80 / r["step_time_s"], rel=1e-6)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops_per_token / (8 * 1e12), rel=1e-6)
    # Exact match on the first 3 held-out records, before (step 0) and after (step 5).
    evals = [(r["step"], r["eval_exact_match"]) for r in log if "eval_exact_match" in r]
    assert evals == [(0, summary["eval_before"]), (5, summary["eval_after"])]
    cfg, params = lj.load_checkpoint(out)
    with open(eval_file) as f:
        held_out = json.load(f)[:3]
    accuracy, rows = exact_match(params, cfg.replace(dtype="float32"), lj.Tokenizer(TOKENIZER), held_out, 4)
    assert accuracy == summary["eval_after"] and len(rows) == 3

    # init_from: the architecture and the weights of the first run (its newest step). One step at lr 0
    # (the whole run is warmup) leaves the weights exactly as loaded. This run splits every sequence over 2
    # devices (mesh.context, long context): its held-out answers must be the first run's.
    second = str(tmp_path / "second")
    argv = [f"output_dir={second}", "steps=1", "batch_size=8", "model.preset=null", f"init_from={out}",
            f"data.train=[{train_file}]", "data.max_len=80", f"eval.data={eval_file}", "eval.examples=3",
            "eval.max_new_tokens=4", "optim.warmup_steps=1", "tensorboard=false", "async_checkpointing=false",
            "mesh.context=2"]
    # demo.yaml's model.overrides (dim 128 ...) do not fit the 64-wide checkpoint: the checkpoint gives
    # the architecture, and the run names the overrides it did not apply.
    assert main(["--config", "configs/demo.yaml", *argv]) == 0
    captured = capsys.readouterr()
    assert "model.overrides {'dim': 128" in captured.out + captured.err and "not applied" in captured.out + captured.err
    summary2 = json.loads(captured.out.strip().splitlines()[-1])
    cfg2, params2 = lj.load_checkpoint(second)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert summary2["eval_before"] == summary["eval_after"]
