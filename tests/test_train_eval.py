"""Validation during training: eval_loss against HF transformers' cross-entropy over the Alpaca
targets (prompt masked by hand), against the train step's own loss on the same batch, and a run
(start, every N steps, end) whose resumed twin logs the same numbers."""

import json
import math
import os
import signal

import jax
import numpy as np
import pytest
import torch

import llama_jax as lj
from reference import hf_model, hf_params
from sharding import batch_sharding, make_mesh
from train import data as data_lib
from train import loop
from train import step as step_lib
from train.config import load_config
from train.data import validation_batches
from train.evaluate import make_validation_loss, validation_loss

CFG = lj.LlamaConfig.preset("tiny-gqa")
HELD_OUT = "data/demo_alpaca_eval.json"


def test_eval_loss_equals_hf_on_alpaca_targets_and_the_train_step_loss():
    tok = lj.Tokenizer("data/tokenizer.model")
    records = json.load(open(HELD_OUT))[:11]  # 11 rows: the last batch of 8 is padded with empty rows
    model = hf_model(CFG, seed=3)
    ce = count = 0.0
    for r in records:  # the reference: Stanford Alpaca's masking written out, scored by HF
        prompt = lj.format_alpaca(r["instruction"], r.get("input", ""))
        ids = tok.encode(prompt + r["output"], bos=True, eos=True)
        first = len(tok.encode(prompt, bos=True))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        ce -= sum(logp[i - 1, ids[i]].item() for i in range(first, len(ids)))
        count += len(ids) - first

    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"held_out_{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump(records, f)
    rows, _ = data_lib.build_rows("alpaca", [path], tok, 80, pack=False)
    os.remove(path)
    batches = validation_batches(rows, 8)
    assert len(batches) == 2
    mesh = make_mesh(2, 2, 2)  # batch rows over data x fsdp, heads over tensor
    params = hf_params(model, CFG)
    fn = make_validation_loss(CFG)
    with jax.set_mesh(mesh):
        loss, ppl = validation_loss(fn, params, batches, mesh)
        assert abs(loss / (ce / count) - 1) < 1e-5 and ppl == pytest.approx(math.exp(loss))
        assert validation_loss(fn, params, validation_batches(rows, 8, limit=1), mesh)[0] != loss

        # The train step's loss on the same (first) batch, before its update: same targets, same masking.
        schedule = step_lib.lr_schedule(1e-3, 10, "constant")
        opt = step_lib.make_optimizer(schedule)
        train_step = step_lib.make_train_step(CFG, opt, schedule, mesh, batches[0]["tokens"].shape)
        state = jax.jit(lambda p: step_lib.init_state(p, opt),
                        out_shardings=step_lib.state_shardings(CFG, opt, mesh))(params)
        _, metrics = train_step(state, jax.device_put(batches[0], batch_sharding(mesh, 2)))
        first_batch = validation_loss(fn, params, batches[:1], mesh)[0]
    assert abs(first_batch / float(metrics["loss"]) - 1) < 1e-6


def recipe(out, **extra):
    overrides = dict(output_dir=out, steps=4, checkpoint_every=2, log_every=1, batch_size=8, tensorboard=False,
                     async_checkpointing=False, **{"model.preset": "tiny", "model.overrides": "{}",
                                                  "data.max_len": 80, "eval.data": "null",
                                                  "eval.loss_data": HELD_OUT, "eval.every": 2, "eval.batches": 2})
    overrides.update(extra)
    return load_config("configs/demo.yaml", [f"{k}={v}" for k, v in overrides.items()])


def eval_lines(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "eval_loss" in r]


def test_run_logs_validation_at_start_every_and_end_and_resume_logs_the_same(tmp_path, monkeypatch):
    whole = loop.run(recipe(str(tmp_path / "whole")))
    logged = eval_lines(str(tmp_path / "whole"))
    assert [r["step"] for r in logged] == [0, 2, 4]
    assert all(r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"])) for r in logged)
    assert whole["eval_loss"] == logged[-1]["eval_loss"] and logged[-1]["eval_loss"] < logged[0]["eval_loss"]

    set_up = loop.set_up

    def preempted_at_step_3(cfg):  # SIGTERM arrives during step 3: it is saved, then the run stops
        run = set_up(cfg)
        step_fn, calls = run.train_step, []

        def step(state, batch):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return step_fn(state, batch)

        run.train_step = step
        return run

    monkeypatch.setattr(loop, "set_up", preempted_at_step_3)
    first = loop.run(recipe(str(tmp_path / "resumed")))
    assert first["preempted_at"] == 3
    monkeypatch.setattr(loop, "set_up", set_up)
    loop.run(recipe(str(tmp_path / "resumed")))
    resumed = eval_lines(str(tmp_path / "resumed"))
    assert [r["step"] for r in resumed] == [0, 2, 4]
    np.testing.assert_allclose([r["eval_loss"] for r in resumed], [r["eval_loss"] for r in logged], rtol=1e-6)

    with pytest.raises(ValueError, match=r"eval.every must be in \[0, inf\)"):
        recipe(str(tmp_path / "bad"), **{"eval.every": -1})
