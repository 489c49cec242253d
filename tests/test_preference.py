"""Preference tuning against independent references: DPO, SimPO and ORPO losses and gradients equal the
papers' formulas written out in torch on HF's LlamaForCausalLM (same weights); the reward loss
and accuracy equal torch on HF's LlamaForSequenceClassification; the reference log-probs
equal HF's sums over answer tokens; a sharded LoRA DPO step equals one device; LoRA and QLoRA DPO learn;
full DPO steps on a 2x2x2 mesh equal torch's SGD; a full DPO run killed with -9 resumes exactly and its
held-out metrics equal HF's; a QLoRA DPO run (nf4 base) killed with -9 resumes exactly, its reference
scored again from the frozen base with the adapters off, as HF scores the nf4-rounded base; a reward
model is refused as a language model and scored by `llama_jax.eval reward` as torch scores it; a reward
model trained by `python -m train` logs and scores its held-out pairs as HF does; rejection sampling
keeps what the reward model prefers (as pairs or best)."""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
import transformers
from jax.sharding import Mesh

import llama_jax as lj
from llama_jax import layout, lora, quant
from llama_jax.layout import params_from_state_dict
from reference import hf_model, hf_params
from sharding import batch_sharding, tree_shardings
from train import objectives, reference
from train import step as step_lib
from train.data.pairs import build_pair_rows, pair_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = lj.LlamaConfig.preset("tiny-gqa")
TOK = lj.Tokenizer(os.path.join(ROOT, "data", "tokenizer.model"))
BETA, GAMMA = 0.7, 0.3  # away from the defaults, so a beta or gamma that is not passed through shows
RECORDS = [  # answers of different lengths, one multi-turn prompt: padding and masks differ per row
    {"prompt": "Sort the digits 4 1 3.", "chosen": "1 3 4", "rejected": "4 3 1 and more words", "margin": 1.0},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "Name a colour."}], "chosen": "Blue.", "rejected": "No."},
    {"prompt": "Reverse 1234.", "chosen": "4321", "rejected": "1234", "margin": 0.5},
    {"prompt": "Say yes.", "chosen": "Yes.", "rejected": "I would rather not say anything at all."},
]


def one_device():
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    rows, _ = build_pair_rows([str(path)], TOK, 40)
    return str(path), rows


@pytest.fixture(scope="module")
def models():
    """The policy and a different reference model (HF float32) and the policy's weights as our params."""
    policy, ref = hf_model(CFG, seed=5), hf_model(CFG, seed=6)
    return policy, ref, hf_params(policy, CFG), hf_params(ref, CFG)


def torch_logps(model, batch):
    """Sums of log-softmax at the targets over the answer tokens, and their counts, (B, 2) each."""
    b, _, t = batch["tokens"].shape
    tokens = torch.as_tensor(batch["tokens"].reshape(2 * b, t), dtype=torch.long)
    targets = torch.as_tensor(batch["targets"].reshape(2 * b, t), dtype=torch.long)
    weights = torch.as_tensor(batch["weights"].reshape(2 * b, t))
    logp = torch.log_softmax(model(tokens).logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
    return (logp * weights).sum(-1).reshape(b, 2), weights.sum(-1).reshape(b, 2)


def torch_loss(objective, logp, counts, ref_logp, beta=BETA):
    """The papers' losses (means over pairs)."""
    c, r = logp[:, 0], logp[:, 1]
    if objective == "dpo":  # Rafailov et al. 2023, eq. 7
        return -F.logsigmoid(beta * ((c - ref_logp[:, 0]) - (r - ref_logp[:, 1]))).mean()
    ac, ar = c / counts[:, 0], r / counts[:, 1]
    if objective == "simpo":  # Meng et al. 2024, eq. 6
        return -F.logsigmoid(BETA * ac - BETA * ar - GAMMA).mean()
    # ORPO, Hong et al. 2024, eq. 6-8: odds(y) = P / (1 - P) with P the length-normalised likelihood
    log_odds = (ac - torch.log1p(-torch.exp(ac))) - (ar - torch.log1p(-torch.exp(ar)))
    return (-ac - BETA * F.logsigmoid(log_odds)).mean()


def grads_as_ours(model, cfg=CFG):
    state = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().numpy()
             for k, p in model.named_parameters()}
    return params_from_state_dict(state, cfg, "hf")


def as_hf(params, cfg, model):
    """`model` (HF LlamaForCausalLM or LlamaForSequenceClassification, float32) holding our params, written
    into HF's layout by hand from layout.py's table (a reward model's head is `score`, HF's too)."""
    state = {}
    for entry, i, name in layout.names(cfg, "hf"):
        if entry.path == ("output",) and "output" not in params:
            continue
        node = params
        for key in entry.path:
            node = node[key]
        leaf = np.asarray(node if i is None else node[i], np.float32)
        state[name] = torch.tensor(layout.from_ours(entry, leaf, cfg))
    if "score" in params:
        state["score.weight"] = torch.tensor(np.asarray(params["score"], np.float32)[None])
    model.load_state_dict(state, strict=True)
    return model.eval()


def assert_tree_close(got, want, rtol=1e-5):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(np.abs(b).max(), 1e-12)
        assert np.abs(a - b).max() <= rtol * scale, f"{jax.tree_util.keystr(path)}: {np.abs(a - b).max() / scale:.2e}"


def test_losses_and_gradients_equal_the_papers_formulas_on_hf(pairs, models):
    """For each objective: pair_sums' loss, and its gradient (the chain rule through the log-probs: one
    compiled vector-Jacobian product serves the three) equal torch's on HF's model."""
    _, rows = pairs
    policy, ref, params, _ = models
    with torch.no_grad():
        ref_logp = torch_logps(ref, pair_batch(rows))[0]
    batch = dict(pair_batch(rows), reference=ref_logp.numpy())

    @jax.jit
    def logps_and_vjp(p, cotangent):
        (logp, counts), vjp = jax.vjp(lambda q: objectives.sequence_logps(q, batch, CFG), p)
        return logp, counts, vjp((cotangent, jnp.zeros_like(counts)))[0]

    padded = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in batch.items()}  # + an empty pair

    @jax.jit
    def summed(p):  # the train step's loss sums, every objective, over the batch + a padding pair
        return {o: objectives.pair_sums(p, padded, CFG, o, BETA, GAMMA)[1] for o in ("dpo", "simpo", "orpo")}

    logp, counts, _ = logps_and_vjp(params, jnp.zeros((len(RECORDS), 2)))
    sums = summed(params)
    for objective in ("dpo", "simpo", "orpo"):
        policy.zero_grad()
        t_logp, t_counts = torch_logps(policy, batch)
        want = torch_loss(objective, t_logp, t_counts, ref_logp)
        want.backward()
        assert float(sums[objective]["count"]) == len(RECORDS)
        np.testing.assert_allclose(float(sums[objective]["loss"]) / len(RECORDS), want.item(), rtol=1e-5)
        mean_loss = lambda lp: jnp.mean(objectives.pair_losses(objective, lp, counts, BETA, GAMMA,  # noqa: E731
                                                               batch["reference"], batch["margin"])[0])
        _, _, grads = logps_and_vjp(params, jax.grad(mean_loss)(logp))
        assert_tree_close(grads, grads_as_ours(policy))
    # TRL's DPO metrics: implicit rewards beta * (logp - ref), accuracy r_c > r_r, margin r_c - r_r
    rewards = BETA * (t_logp.detach().numpy() - ref_logp.numpy())
    metrics = objectives.pair_metrics(sums["dpo"])
    atol = 1e-5 * BETA * float(np.abs(rewards / BETA).max() + np.abs(ref_logp.numpy()).max())  # the rewards are differences of log-prob sums
    np.testing.assert_allclose(metrics["rewards_chosen"], rewards[:, 0].mean(), atol=atol)
    np.testing.assert_allclose(metrics["reward_margin"], (rewards[:, 0] - rewards[:, 1]).mean(), atol=atol)
    assert float(metrics["reward_accuracy"]) == np.mean(rewards[:, 0] > rewards[:, 1])


def test_reference_logps_equal_hf_sums_over_answer_tokens(pairs, models):
    """The loop's reference pass (batches of 2 pairs, the last one padded) = HF's sums, pair by pair."""
    _, rows = pairs
    _, ref, _, ref_params = models
    mesh = one_device()
    with jax.set_mesh(mesh):
        got = reference.score_rows(objectives.make_reference_fn(CFG, mesh), ref_params, rows, 3, mesh)
    with torch.no_grad():
        want = torch_logps(ref, pair_batch(rows))[0].numpy()
    assert got.shape == (len(RECORDS), 2)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.fixture(scope="module")
def reward_model(models):
    """HF's LlamaForSequenceClassification (1 label, pad id 0) on the policy's backbone, and our reward params."""
    policy = models[0]
    config = transformers.LlamaConfig(**{**policy.config.to_dict(), "num_labels": 1, "pad_token_id": 0})
    config._attn_implementation = "eager"
    torch.manual_seed(7)
    model = transformers.LlamaForSequenceClassification(config).float().eval()
    model.model.load_state_dict(policy.model.state_dict())
    params = {k: v for k, v in models[2].items() if k != "output"}
    params["score"] = model.score.weight.detach().numpy()[0].copy()
    return model, params


def torch_rewards(model, batch):
    b, _, t = batch["tokens"].shape
    return model(torch.as_tensor(batch["tokens"].reshape(2 * b, t), dtype=torch.long)).logits[:, 0].reshape(b, 2)


def test_reward_loss_and_accuracy_equal_torch(pairs, reward_model):
    _, rows = pairs
    model, params = reward_model
    batch = pair_batch(rows)
    assert not np.any(batch["tokens"][batch["segment_ids"] > 0] == 0)  # HF pools at the last non-pad (id 0) token
    with torch.no_grad():
        r = torch_rewards(model, batch)
    want = -F.logsigmoid(r[:, 0] - r[:, 1] - torch.as_tensor(batch["margin"])).mean()  # Llama 2, eq. 2
    sums = jax.jit(lambda p: objectives.pair_sums(p, batch, CFG, "reward", 0.0)[1])(params)
    metrics = objectives.pair_metrics(sums)
    np.testing.assert_allclose(float(metrics["loss"]), want.item(), rtol=1e-5)
    r = r.numpy()
    assert float(metrics["reward_accuracy"]) == np.mean(r[:, 0] > r[:, 1])
    np.testing.assert_allclose(float(metrics["rewards_chosen"]), r[:, 0].mean(), rtol=1e-5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, models, reward_model):
    """The policy and the reward model as checkpoints."""
    root = tmp_path_factory.mktemp("saved")
    lj.save_checkpoint(str(root / "policy"), CFG, models[2])
    lj.save_checkpoint(str(root / "rm"), CFG, reward_model[1], head="reward")
    return str(root / "policy"), str(root / "rm")


def test_reward_checkpoint_is_no_lm_and_eval_reward_scores_as_torch(pairs, reward_model, saved, capsys):
    from llama_jax.eval.__main__ import main as eval_main

    path, rows = pairs
    model = reward_model[0]
    ckpt = saved[1]
    with pytest.raises(ValueError, match="is a reward model"):
        lj.load_checkpoint(ckpt)
    with pytest.raises(SystemExit) as exit_:
        eval_main(["perplexity", "--checkpoint", ckpt, "--tokenizer", "data/tokenizer.model", "--data", "README.md"])
    assert exit_.value.code == 2 and "is a reward model" in capsys.readouterr().err
    eval_main(["reward", "--checkpoint", ckpt, "--tokenizer", "data/tokenizer.model", "--data", path,
               "--max-len", "40", "--batch-size", "2"])
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with torch.no_grad():
        r = torch_rewards(model, pair_batch(rows)).numpy()
    assert got["pairs"] == len(RECORDS) and got["accuracy"] == np.mean(r[:, 0] > r[:, 1])
    np.testing.assert_allclose(got["margin"], np.mean(r[:, 0] - r[:, 1]), rtol=1e-5)


@pytest.fixture(scope="module")
def demo_pairs(tmp_path_factory):
    """24 of the demo's training pairs and 8 of its held-out pairs (Alpaca records), as files."""
    folder = tmp_path_factory.mktemp("demo_pairs")
    for name, n in (("train", 24), ("eval", 8)):
        with open(os.path.join(ROOT, "data", f"demo_preference_{name}.json")) as f:
            (folder / f"{name}.json").write_text(json.dumps(json.load(f)[:n]))
    return str(folder / "train.json"), str(folder / "eval.json")


def held_out_batch(path):
    """The held-out pairs as the loop lays them out (demo-dpo.yaml's alpaca template, max_len 40)."""
    return pair_batch(build_pair_rows([path], TOK, 40, template="alpaca")[0])


def eval_records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "eval_loss" in r}


def test_reward_run_from_an_lm_checkpoint_scores_as_hf(tmp_path, demo_pairs, reward_model, saved, capsys):
    """`python -m train` with objective reward on data=2 x fsdp=2 x tensor=2: a fresh head on init_from's
    LM backbone, 3 steps, saved as a reward model. Its held-out numbers in metrics.jsonl (eval.loss_data)
    and `llama_jax.eval reward`'s equal HF's LlamaForSequenceClassification holding the saved weights."""
    from llama_jax.eval.__main__ import main as eval_main
    from train.__main__ import main as train_main

    train_file, eval_file = demo_pairs
    out = str(tmp_path / "rm")
    assert train_main(["--config", "configs/demo-dpo.yaml", f"output_dir={out}", "steps=3", "log_every=1",
                       "batch_size=4", f"init_from={saved[0]}", "model.preset=null", "model.overrides={}",
                       "objective=reward", "preference.beta=null", f"data.train=[{train_file}]", "data.max_len=40",
                       f"eval.loss_data={eval_file}", "eval.every=0", "eval.batches=0", "optim.lr=1e-2",
                       "optim.warmup_steps=1", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "tensorboard=false",
                       "async_checkpointing=false"]) == 0
    assert "a fresh reward head on its backbone" in capsys.readouterr().out
    cfg, params = lj.load_checkpoint(out, head="reward")
    model = as_hf(params, cfg, copy.deepcopy(reward_model[0]))  # HF's reward model class, the run's weights
    batch = held_out_batch(eval_file)
    with torch.no_grad():
        r = torch_rewards(model, batch)
    loss = -F.logsigmoid(r[:, 0] - r[:, 1] - torch.as_tensor(batch["margin"])).mean().item()
    r = r.numpy()
    accuracy, margin = np.mean(r[:, 0] > r[:, 1]), np.mean(r[:, 0] - r[:, 1])
    logged = eval_records(out)
    assert sorted(logged) == [0, 3]  # before training and at the last step
    np.testing.assert_allclose([logged[3][k] for k in ("eval_loss", "eval_reward_margin", "eval_rewards_chosen")],
                               [loss, margin, r[:, 0].mean()], rtol=1e-5, atol=1e-6)
    assert logged[3]["eval_reward_accuracy"] == accuracy
    eval_main(["reward", "--checkpoint", out, "--tokenizer", "data/tokenizer.model", "--data", eval_file,
               "--template", "alpaca", "--max-len", "40", "--batch-size", "4"])
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["pairs"] == 8 and got["accuracy"] == accuracy
    np.testing.assert_allclose(got["margin"], margin, rtol=1e-5, atol=1e-6)


def train_steps(cfg, state_params, batch, mesh, steps, grad_accum=1, lr=0.1, base=None, base_dtype="bfloat16"):
    """`steps` DPO updates by the real train step, with plain SGD (Adam would divide rounding-level
    differences of tiny gradients by |g|, so two meshes could only be compared to lr-sized tolerances)."""
    schedule = step_lib.lr_schedule(lr, 10, "constant")
    opt = optax.sgd(schedule)
    fn = step_lib.make_train_step(cfg, opt, schedule, mesh, (len(batch["tokens"]), batch["tokens"].shape[-1]),
                                  grad_accum, base_dtype=base_dtype, seed=3, objective="dpo", beta=BETA)
    shardings = step_lib.state_shardings(cfg, opt, mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda p: step_lib.init_state(p, opt), out_shardings=shardings)(state_params)
        placed = {k: jax.device_put(v, batch_sharding(mesh, np.ndim(v))) for k, v in batch.items()}
        base = () if base is None else (  # full fine-tuning: step(state, batch)
            jax.device_put(base, tree_shardings(*lora.base_layout(cfg, base_dtype), mesh)),)
        metrics, params = [], []
        for _ in range(steps):
            state, m = fn(state, placed, *base)
            metrics.append(jax.device_get(m))
            params.append(jax.device_get(state["params"]))
    return params, metrics


def test_lora_and_qlora_dpo_learn_and_sharded_equals_one_device(pairs, models):
    """LoRA (bf16 base) and QLoRA (nf4 base) DPO learn on one device; the reference is the frozen base alone
    (the adapters start at zero), so step 1's loss is log 2. The LoRA step on data=2 x fsdp=2 x tensor=2
    with 2 microbatches equals one device with one."""
    _, rows = pairs
    cfg = CFG.replace(lora_rank=4, lora_alpha=8.0)
    bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), models[2])
    adapters = jax.device_get(lora.init_adapters(cfg, 1))
    mesh = one_device()
    runs = {}
    for base_dtype, base in (("bfloat16", bf16), ("nf4", quant.quantize_params(bf16, CFG, "nf4"))):
        with jax.set_mesh(mesh):
            ref = reference.score_rows(objectives.make_reference_fn(cfg, mesh), base, rows, 4, mesh)
        batch = pair_batch({k: np.concatenate([v, v]) for k, v in rows.items()})
        batch["reference"] = np.concatenate([ref, ref])
        params, metrics = train_steps(cfg, adapters, batch, mesh, 4, base=base, base_dtype=base_dtype)
        np.testing.assert_allclose(metrics[0]["loss"], np.log(2), rtol=1e-6)
        assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.05 and metrics[-1]["reward_accuracy"] > 0.5, base_dtype
        runs[base_dtype] = batch, params, metrics
    batch, want, want_m = runs["bfloat16"]
    eight = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    got, got_m = train_steps(cfg, adapters, batch, eight, 4, grad_accum=2, base=bf16)
    assert_tree_close(got, want, rtol=1e-5)  # every step's adapters, to 1e-5 of each leaf's largest entry
    for k, (a, b) in enumerate(zip(got_m, want_m)):
        np.testing.assert_allclose([a["loss"], a["grad_norm"]], [b["loss"], b["grad_norm"]], rtol=1e-5)
        for key in ("rewards_chosen", "reward_margin", "logps_chosen"):  # differences of sums of ~100
            np.testing.assert_allclose(a[key], b[key], atol=1e-5 * abs(b["logps_chosen"]))
        assert k == 0 or a["reward_accuracy"] == b["reward_accuracy"]  # step 1's rewards are 0 +- rounding


def test_full_dpo_on_a_2x2x2_mesh_steps_as_torch_sgd(pairs, models):
    """Full fine-tuning DPO, 2 steps of the train step on data=2 x fsdp=2 x tensor=2 with 2 microbatches:
    each step's loss, gradient norm and update equal torch's (SGD on HF's model, the formula written out),
    so the sharded full step equals one device (whose gradient equals torch's, the first test)."""
    _, rows = pairs
    policy, ref, params, _ = models
    lr = 1.0  # updates the size of the weights: their float32 rounding (~1e-7) stays far below 1e-5 of an update
    with torch.no_grad():
        ref_logp = torch_logps(ref, pair_batch(rows))[0]
    batch = pair_batch({k: np.concatenate([v, v]) for k, v in rows.items()})  # 2 microbatches of 4 pairs
    batch["reference"] = np.concatenate([ref_logp.numpy()] * 2)
    eight = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    got, got_m = train_steps(CFG, params, batch, eight, 2, grad_accum=2, lr=lr)
    model, before = copy.deepcopy(policy), params
    for step in range(2):
        model.zero_grad()
        logp, counts = torch_logps(model, batch)
        loss = torch_loss("dpo", logp, counts, torch.as_tensor(batch["reference"]))
        loss.backward()
        grads = grads_as_ours(model)
        norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads)))
        np.testing.assert_allclose([got_m[step]["loss"], got_m[step]["grad_norm"]], [loss.item(), norm], rtol=1e-5)
        update = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), got[step], before)
        assert_tree_close(update, jax.tree.map(lambda g: -lr * g, grads), rtol=1e-5)
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
        before = got[step]


def test_planner_lays_out_the_pair_step():
    """The planner lowers the loop's own pair step ((B, 2, T) batches, margins, DPO's reference) and the
    reference pass (forward only, the frozen nf4 base for QLoRA)."""
    from sharding import make_mesh
    from train import planner

    cfg = CFG.replace(dtype="bfloat16", lora_rank=4)
    mesh = make_mesh(devices=jax.devices()[:1])
    lowered, sizes = planner.lower_step(cfg, mesh, batch=8, seq=64, base_dtype="nf4", objective="dpo")
    (_, batch, _), _ = lowered.args_info
    assert {k: a.shape for k, a in batch.items()} == {
        **{k: (8, 2, 64) for k in ("tokens", "targets", "weights", "positions", "segment_ids")},
        "margin": (8,), "reference": (8, 2)}
    assert sizes["batch"] == 8 * 2 * 64 * 4 * 5 + 8 * 4 + 8 * 2 * 4
    (params, pairs), _ = planner.lower_reference(cfg, mesh, 4, 64, "nf4").args_info
    assert quant.is_quantized(params["layers"]["attention"]["wq"]) and pairs["tokens"].shape == (4, 2, 64)
    with pytest.raises(ValueError, match="--objective must be one of"):
        planner.lower_step(cfg, mesh, 8, 64, objective="ppo")


def test_rejection_sampling_keeps_what_the_reward_model_prefers(tmp_path, reward_model, saved, capsys):
    from train.rejection_sample.__main__ import main as sample_main

    model = reward_model[0]
    policy_dir, rm_dir = saved
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Say yes.", "Count to three.")))
    out = str(tmp_path / "pairs.jsonl")
    assert sample_main(["--policy", policy_dir, "--reward", rm_dir, "--tokenizer", "data/tokenizer.model",
                        "--prompts", str(prompts), "--k", "2", "--output", out, "--keep", "pairs",
                        "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["prompts"], summary["samples"]) == (2, 4)
    records = [json.loads(line) for line in open(out)]
    assert len(records) == summary["kept"] == 2  # K = 2: each pair holds both of its prompt's samples
    rows, _ = build_pair_rows([out], TOK, 64)  # the trainer reads them back as preference pairs
    with torch.no_grad():
        r = torch_rewards(model, pair_batch(rows)).numpy()
    for record, (chosen, rejected) in zip(records, r):
        assert record["reward_chosen"] > record["reward_rejected"]
        np.testing.assert_allclose([record["reward_chosen"], record["reward_rejected"]], [chosen, rejected],
                                   rtol=1e-5, atol=1e-6)

    # --keep best, same seed (the same samples): the sample HF scores highest, as chat SFT data
    best = str(tmp_path / "best.jsonl")
    assert sample_main(["--policy", policy_dir, "--reward", rm_dir, "--tokenizer", "data/tokenizer.model",
                        "--prompts", str(prompts), "--k", "2", "--output", best, "--keep", "best",
                        "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kept"] == 2
    kept = [json.loads(line) for line in open(best)]
    for record, pair, scores in zip(kept, records, r):
        answer = (pair["chosen"], pair["rejected"])[int(np.argmax(scores))]
        assert record["messages"] == [{"role": "user", "content": pair["prompt"]},
                                      {"role": "assistant", "content": answer}]
        np.testing.assert_allclose(record["reward"], scores.max(), rtol=1e-5, atol=1e-6)
    from train import data as data_lib

    assert data_lib.build_rows("chat", [best], TOK, 64, pack=False)[1]["examples"] == 2  # SFT data as it is


# --- resume after kill -9 (one end-to-end run of `python -m train`) ---------------------------------------

STEPS = 12


def command(out, base, data, held_out, steps=STEPS):
    """Full DPO from `base` on 24 demo pairs, a checkpoint every 4 steps: a resumed run no longer has its
    starting model, so its reference log-probs (of the training and the held-out pairs) can only come
    from the run folder. The held-out pairs are scored at steps 0 and 12 (held_out "null": none)."""
    return [sys.executable, "-m", "train", "--config", "configs/demo-dpo.yaml", f"output_dir={out}", f"steps={steps}",
            "checkpoint_every=4", "log_every=1", "batch_size=4", f"init_from={base}", "model.preset=null",
            "model.overrides={}", f"data.train=[{data}]", "data.max_len=40", "eval.data=null",
            f"eval.loss_data={held_out}", "eval.every=0", "eval.batches=0", "tensorboard=false",
            "optim.warmup_steps=2", "async_checkpointing=false"]


def env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}


def metrics_of(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: (r["loss"], r["reward_margin"]) for r in map(json.loads, f) if "reward_margin" in r}


def test_dpo_run_resumes_exactly_after_kill9(tmp_path, models, saved, demo_pairs):
    """A full DPO run killed with -9 and resumed logs what an uninterrupted one logs, held-out pairs included;
    those held-out numbers (eval.loss_data: loss, reward accuracy, margin) at the last step equal DPO's
    formulas on HF's model holding the final weights, with HF's starting model as the reference."""
    data, held_out = demo_pairs
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    uninterrupted = subprocess.Popen(command(ref_dir, saved[0], data, held_out), cwd=ROOT, env=env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(command(run_dir, saved[0], data, held_out), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline, path = time.time() + 300, os.path.join(run_dir, "metrics.jsonl")
    while not (os.path.exists(path) and max([json.loads(x).get("step", 0) for x in open(path) if x.endswith("\n")]
                                            or [0]) >= 5):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(os.path.join(run_dir, reference.FILE))  # written before step 1
    again = subprocess.run(command(run_dir, saved[0], data, held_out), cwd=ROOT, env=env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step" in again.stdout and "scored" not in again.stdout  # read back, not scored again
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err[-3000:]
    want, got = metrics_of(ref_dir), metrics_of(run_dir)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=1e-6, atol=0)
    assert want[1][0] == pytest.approx(np.log(2), rel=1e-5)  # step 1: the policy is the reference
    assert want[STEPS][0] < want[1][0] and want[STEPS][1] > 0.1  # it learned: the margin grew

    logged, resumed = eval_records(ref_dir), eval_records(run_dir)
    assert sorted(logged) == sorted(resumed) == [0, STEPS]
    for step in logged:
        assert logged[step].keys() == resumed[step].keys()
        np.testing.assert_allclose([resumed[step][k] for k in logged[step]], list(logged[step].values()), rtol=1e-6)
    assert logged[0]["eval_loss"] == pytest.approx(np.log(2), rel=1e-5)
    cfg, params = lj.load_checkpoint(ref_dir)
    final = as_hf(params, cfg, copy.deepcopy(models[0]))
    batch = held_out_batch(held_out)
    with torch.no_grad():
        logp, counts = torch_logps(final, batch)
        ref_logp = torch_logps(models[0], batch)[0]  # saved[0], the run's starting model
    beta = 0.1  # demo-dpo.yaml's
    rewards = (beta * (logp - ref_logp)).numpy()
    np.testing.assert_allclose(logged[STEPS]["eval_loss"], torch_loss("dpo", logp, counts, ref_logp, beta).item(),
                               rtol=1e-5)
    atol = 1e-5 * beta * float(np.abs(ref_logp.numpy()).max())  # the rewards are differences of log-prob sums
    np.testing.assert_allclose([logged[STEPS]["eval_reward_margin"], logged[STEPS]["eval_rewards_chosen"]],
                               [np.mean(rewards[:, 0] - rewards[:, 1]), rewards[:, 0].mean()], atol=atol)
    assert logged[STEPS]["eval_reward_accuracy"] == np.mean(rewards[:, 0] > rewards[:, 1])


# --- QLoRA DPO through `python -m train`: an nf4 base, killed with -9, resumed --------------------------

# All seven projections held as nf4, adapters on two of them (all seven: +4 s of compiling); lora.dropout left
# at its default (0.05), so the dropout masks must resume too
QLORA = ["lora.rank=4", "lora.alpha=8", "lora.targets=[wq,wv]", "lora.base_dtype=nf4", "optim.lr=3e-2", "mesh.data=2",
         "mesh.fsdp=2", "mesh.tensor=2"]
# `python -m train` with a SIGKILL of its own right after step 6's line reaches metrics.jsonl: a kill at a
# known point (between the checkpoints of steps 4 and 8), where the test's own kill could land anywhere
KILLED_AT_6 = """import os, signal, runpy, sys
import train.loop
write = train.loop.MetricsLog.write
def write_then_die(self, record):
    write(self, record)
    if record.get("step") == 6:
        os.kill(os.getpid(), signal.SIGKILL)
train.loop.MetricsLog.write = write_then_die
sys.argv[0] = "train"
runpy.run_module("train", run_name="__main__", alter_sys=True)
"""


def hf_nf4_base(model):
    """A copy of HF's `model` as a QLoRA run holds its base, written in numpy/torch on HF's (out, in) layout:
    each projection row cut into blocks of 64, every value -> absmax * the nearest of bitsandbytes' NF4 values
    (copied by hand); the embeddings, norms and output rounded to bfloat16 (lora.base_dtype's float part)."""
    table = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                      -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                      0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                      0.7229568362236023, 1.0], np.float32)
    base = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                w = p.detach().numpy()
                blocks = w.reshape(w.shape[0], -1, 64)
                absmax = np.abs(blocks).max(-1, keepdims=True)
                rounded = table[np.abs((blocks / absmax)[..., None] - table).argmin(-1)] * absmax
                p.copy_(torch.from_numpy(rounded.reshape(w.shape)))
            else:
                p.copy_(p.bfloat16().float())
    return base


def run_record(out):
    """metrics.jsonl by step, without the timings (each step once: a resumed run drops the lines it repeats)."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = list(map(json.loads, f))
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)), out
    return {r["step"]: {k: v for k, v in r.items() if k not in ("step_time_s", "tokens_per_s", "mfu")} for r in records}


def test_qlora_dpo_run_killed_and_resumed_equals_uninterrupted(tmp_path, models, saved, demo_pairs, capsys):
    """QLoRA DPO by `python -m train` (init_from loaded as an nf4 base, rank-4 adapters with dropout) on
    data=2 x fsdp=2 x tensor=2, killed with -9 after step 6 (checkpoint 4) and resumed with its
    reference_logps.npz deleted: the resumed run scores the reference again from the frozen base, its adapters
    (trained by now) off, and logs and saves exactly what an uninterrupted run does. That reference equals
    HF's sums over the answer tokens on the base as nf4 holds it (from the unquantised base, or with the
    adapters on, it is off by far more than the tolerance)."""
    from train.__main__ import main as train_main

    data = demo_pairs[0]
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    argv = lambda out: command(out, saved[0], data, "null", steps=8)[3:] + QLORA  # noqa: E731
    assert train_main(argv(ref_dir)) == 0  # first: the killed run then reads its programs from the compilation cache
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_6, *argv(run_dir)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert max(run_record(run_dir)) == 6 and os.path.isdir(os.path.join(run_dir, "4"))
    assert not os.path.exists(os.path.join(run_dir, "8"))
    os.remove(os.path.join(run_dir, reference.FILE))
    capsys.readouterr()
    assert train_main(argv(run_dir)) == 0
    out = capsys.readouterr().out
    assert "resumed from step 4" in out and "reference log-probs of 24 pairs scored" in out, out
    assert f"base {saved[0]} held as nf4, frozen" in out

    want, got = run_record(ref_dir), run_record(run_dir)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    assert got == want  # every metric of every step, exactly (steps 5 and 6 were logged twice)
    assert want[1]["loss"] == pytest.approx(np.log(2), rel=1e-6)  # step 1: the policy is the reference
    assert want[8]["loss"] < want[1]["loss"]
    cfg = lj.checkpoint.read_config(ref_dir)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(lj.checkpoint.load_adapters(run_dir, cfg)),
                 jax.device_get(lj.checkpoint.load_adapters(ref_dir, cfg)))

    with np.load(os.path.join(ref_dir, reference.FILE)) as f:
        scored = dict(f)
    with np.load(os.path.join(run_dir, reference.FILE)) as f:
        rescored = dict(f)
    assert scored.keys() == rescored.keys() == {"train", "train_fingerprint"}
    np.testing.assert_array_equal(rescored["train"], scored["train"])
    rows = build_pair_rows([data], TOK, 40, template="alpaca")[0]
    assert str(scored["train_fingerprint"]) == reference.fingerprint(rows)  # the same pairs, in the same order
    with torch.no_grad():
        hf = torch_logps(hf_nf4_base(models[0]), pair_batch(rows))[0].numpy()
        f32 = torch_logps(models[0], pair_batch(rows))[0].numpy()
    np.testing.assert_allclose(scored["train"], hf, rtol=1e-5)  # measured: 2e-7
    assert np.abs(f32 - hf).max() > 100 * 1e-5 * np.abs(hf).max()  # the unquantised base's: 3.6e-2
