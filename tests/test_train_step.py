"""The train step against independent references: HF transformers' loss and a torch AdamW update,
hand-computed schedules and FLOPs, and invariances (loss mask, accumulation, sharding)."""

import functools
import math

import jax
import numpy as np
import pytest
import torch
from jax.sharding import Mesh

import llama_jax as lj
from llama_jax import flops
from llama_jax.layout import params_from_state_dict
from reference import hf_model, hf_params
from sharding import batch_sharding, chip_of
from train import data as data_lib
from train import step as step_lib

CFG = lj.LlamaConfig.preset("tiny-gqa")
B, T = 8, 32


def make_rows(seed=0, b=B, t=T):
    """Random rows of t+1 tokens with an uneven number of targets per row (so per-row means would differ)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, CFG.vocab_size, (b, t + 1)).astype(np.int32)
    mask = np.zeros((b, t + 1), np.int32)
    for i in range(b):
        mask[i, rng.integers(1, t):] = 1
    return {"tokens": tokens, "loss_mask": mask, "segment_ids": np.ones_like(tokens),
            "positions": np.tile(np.arange(t + 1, dtype=np.int32), (b, 1))}


def make_batch(seed=0, b=B, t=T):
    return data_lib.model_batch(make_rows(seed, b, t))


def one_device_mesh():
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


def run_steps(params, batches, mesh, grad_accum=1, lr=1e-3, clip=1.0, wd=0.1, eps=1e-5, cfg=CFG):
    schedule = step_lib.lr_schedule(lr, 10, "constant")
    opt = step_lib.make_optimizer(schedule, 0.9, 0.95, eps, wd, clip)
    shardings = step_lib.state_shardings(cfg, opt, mesh)
    fn = step_lib.make_train_step(cfg, opt, schedule, mesh, batches[0]["tokens"].shape, grad_accum)
    metrics = []
    with jax.set_mesh(mesh):
        state = jax.jit(lambda p: step_lib.init_state(p, opt), out_shardings=shardings)(params)
        for batch in batches:
            state, m = fn(state, jax.device_put(batch, batch_sharding(mesh, 2)))
            metrics.append(jax.device_get(m))
    return jax.device_get(state["params"]), metrics


def test_loss_and_adamw_update_match_hf_and_torch():
    """Token-level mean CE equals HF's loss (labels -100 on masked tokens, one mean over the
    whole batch); one clipped AdamW step (no decay on norms) equals torch.optim.AdamW."""
    model = hf_model(CFG, seed=1)
    params = hf_params(model, CFG)
    rows = make_rows(1)
    lr, wd, eps, clip = 1e-3, 0.1, 1e-5, 0.5
    new_params, metrics = run_steps(params, [data_lib.model_batch(rows)], one_device_mesh(), lr=lr, clip=clip,
                                    wd=wd, eps=eps)

    # HF's own loss, labels straight from the rows' loss mask (not from model_batch's weights): the
    # label of a token is itself where it is a target, -100 where not; HF shifts them by one itself.
    labels = torch.as_tensor(np.where(rows["loss_mask"] == 1, rows["tokens"], -100), dtype=torch.long)
    out = model(torch.as_tensor(rows["tokens"], dtype=torch.long), labels=labels)
    np.testing.assert_allclose(metrics[0]["loss"], out.loss.item(), rtol=1e-5)
    row_means = [torch.nn.functional.cross_entropy(out.logits[i, :-1], labels[i, 1:], ignore_index=-100).item()
                 for i in range(B)]
    assert abs(np.mean(row_means) - out.loss.item()) > 1e-3  # so a mean of row means would fail above

    decay = [p for n, p in model.named_parameters() if not n.endswith("norm.weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=eps)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    want = hf_params(model, CFG)
    for got_leaf, want_leaf in zip(jax.tree.leaves(new_params), jax.tree.leaves(want)):
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-4, atol=2e-6)


def hf_loss_and_grads(model, rows, z_loss=0.0):
    """Token-level mean cross-entropy (+ z_loss x mean logsumexp^2) of HF's float32 logits over the rows'
    targets, written out in torch, and its gradients in our layout."""
    model.zero_grad()
    tokens = torch.as_tensor(rows["tokens"], dtype=torch.long)
    logits = model(tokens[:, :-1]).logits
    w = torch.as_tensor(rows["loss_mask"][:, 1:], dtype=torch.float32)
    lse = torch.logsumexp(logits, -1)
    ce = ((lse - logits.gather(-1, tokens[:, 1:, None])[..., 0]) * w).sum()
    z = (lse**2 * w).sum()
    ((ce + z_loss * z) / w.sum()).backward()
    grads = params_from_state_dict({n: p.grad.numpy() for n, p in model.named_parameters()}, CFG, "hf")
    return (ce / w.sum()).item(), (z / w.sum()).item(), grads


def assert_grads_close(got, want, rel):
    """Every leaf within `rel` of its largest reference entry (float32 sums over 256 tokens)."""
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        err = float(np.max(np.abs(np.asarray(g, np.float64) - r)))
        assert err <= rel * float(np.max(np.abs(r))), (jax.tree_util.keystr(path), err)


def test_z_loss_value_and_gradient_match_torch():
    """z-loss (PaLM): z x logsumexp(logits)^2 summed over target tokens, added to the summed CE, both
    divided by the target count. Reference: torch on HF's logits. z = 0.3 makes the z term ~2x the CE
    (logsumexp ~ log 512), so a wrong z value or gradient moves the grads far beyond the float32 1e-4."""
    model = hf_model(CFG, seed=4)
    params = hf_params(model, CFG)
    rows = make_rows(2)
    batch = data_lib.model_batch(rows)
    z_loss = 0.3
    sums_fn = jax.jit(lambda p, z: step_lib.token_sums(p, batch, CFG, z))
    total, sums = sums_fn(params, z_loss)
    grads = jax.jit(jax.grad(lambda p: step_lib.token_sums(p, batch, CFG, z_loss)[0]))(params)
    ce, z, ref_grads = hf_loss_and_grads(model, rows, z_loss)
    count = float(sums["count"])
    assert count == rows["loss_mask"][:, 1:].sum()
    np.testing.assert_allclose(float(sums["z"]) / count, z, rtol=1e-5)
    np.testing.assert_allclose(float(total) / count, ce + z_loss * z, rtol=1e-5)
    assert z_loss * z > 1.5 * ce
    assert_grads_close(jax.tree.map(lambda g: g / count, grads), ref_grads, 1e-4)


def test_bf16_step_is_close_to_float32_and_keeps_float32_master_params():
    """dtype bfloat16: forward and backward in bf16 (float32 norms, softmax, logits, loss), float32
    master params. Reference: HF float32 loss and gradient norm of the same weights and targets.
    Measured: loss 1.4e-4 and grad norm 1.0e-4 relative, so 2e-3 is 15x headroom, while a float32
    forward (dtype ignored) is within 1e-6. lr 1e-6: Adam moves each entry by <= lr, which a bf16 master
    copy cannot hold (its spacing near 0.08 is 5e-4): at least half the entries must move by lr/2..lr.
    (Measured: 84% do.)"""
    model = hf_model(CFG, seed=1)
    params = hf_params(model, CFG)
    rows = make_rows(1)
    lr = 1e-6
    new_params, metrics = run_steps(params, [data_lib.model_batch(rows)], one_device_mesh(), lr=lr,
                                    cfg=CFG.replace(dtype="bfloat16"))
    ce, _, ref_grads = hf_loss_and_grads(model, rows)
    ref_norm = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(ref_grads))))
    loss_err = abs(float(metrics[0]["loss"]) / ce - 1)
    assert 1e-6 < loss_err < 2e-3
    assert abs(float(metrics[0]["grad_norm"]) / ref_norm - 1) < 2e-3
    moved = np.concatenate([np.abs(a - b).ravel() for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params))])
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(new_params))
    assert moved.max() <= 1.2 * lr and np.mean(moved > 0.5 * lr) > 0.5  # 1.2: float32 spacing near a norm's 1.0


def test_masked_labels_do_not_matter_and_eos_is_a_target():
    tok = lj.Tokenizer("data/tokenizer.model")
    tokens, mask = data_lib.alpaca_example(tok, {"instruction": "Reverse the digits.", "input": "123", "output": "321"})
    assert tokens[-1] == tok.eos_id and mask[-1] == 1
    batch = data_lib.model_batch(data_lib.pad_rows([(tokens, mask)] * 2, 97))
    params = lj.init_params(CFG, 0)
    loss = jax.jit(lambda b: step_lib.token_sums(params, b, CFG, 0.0))
    grads = jax.jit(lambda b: jax.grad(lambda p: step_lib.token_sums(p, b, CFG, 0.0)[0])(params))
    base_loss, base_grads = loss(batch)[0], grads(batch)
    prompt_pos = int(np.flatnonzero(batch["weights"][0] == 0)[5])  # a prompt position (target masked)
    changed = {**batch, "targets": batch["targets"].copy()}
    changed["targets"][0, prompt_pos] = (changed["targets"][0, prompt_pos] + 7) % CFG.vocab_size
    assert float(loss(changed)[0]) == float(base_loss)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), grads(changed), base_grads)
    answer_pos = int(np.flatnonzero(batch["weights"][0] > 0)[0])
    changed["targets"][0, answer_pos] = (changed["targets"][0, answer_pos] + 7) % CFG.vocab_size
    assert float(loss(changed)[0]) != float(base_loss)


@functools.lru_cache(maxsize=1)
def big_batch_reference():
    """Two steps on one device, one batch of 8 rows each: the reference for accumulation and sharding."""
    params = lj.init_params(CFG, 3)
    return params, run_steps(params, [make_batch(5), make_batch(6)], one_device_mesh(), grad_accum=1)


def assert_same_training(got, want, rtol, atol):
    for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(want[0])):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)


def test_gradient_accumulation_equals_big_batch():
    """4 microbatches of 2 rows (with different target counts) give the 8-row step (float32)."""
    params, want = big_batch_reference()
    # Parameters differ from the big batch's by float32 reduction order only (measured 2e-7 after two
    # steps); atol 1e-6 keeps 5x of headroom. A microbatch lost or mis-weighted moves the loss and grad
    # norm (compared to 1e-6 / 1e-5 relative) and the parameters by a sizeable part of an update (~lr = 1e-3).
    assert_same_training(run_steps(params, [make_batch(5), make_batch(6)], one_device_mesh(), grad_accum=4),
                         want, rtol=1e-5, atol=1e-6)


def test_sharded_step_equals_single_device():
    """data=2 x fsdp=2 x tensor=2 on 8 CPU devices (with 2 microbatches) equals one device."""
    params, want = big_batch_reference()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    got = run_steps(params, [make_batch(5), make_batch(6)], mesh, grad_accum=2)
    # Adam's first steps are ~lr * sign(g): a 1e-7 reduction-order difference in a tiny gradient
    # moves a parameter by ~1e-7, so parameters are compared to 1e-6 absolute (updates are 1e-3)
    assert_same_training(got, want, rtol=1e-5, atol=1e-6)


def test_schedule_and_decay_mask():
    s = step_lib.lr_schedule(1.0, 110, "cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert float(s(0)) == 0.0 and math.isclose(float(s(5)), 0.5, rel_tol=1e-6)
    assert math.isclose(float(s(10)), 1.0, rel_tol=1e-6)
    assert math.isclose(float(s(60)), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), rel_tol=1e-6)
    assert math.isclose(float(s(110)), 0.1, rel_tol=1e-6) and math.isclose(float(s(500)), 0.1, rel_tol=1e-6)
    assert float(step_lib.lr_schedule(2.0, 100, "constant")(77)) == 2.0
    # warmup_ratio: ceil(ratio x steps) warmup steps, unless warmup_steps is given
    assert [step_lib.warmup_steps_for(5, None, 0.5), step_lib.warmup_steps_for(100, None, 0.03),
            step_lib.warmup_steps_for(100, 7, 0.5)] == [3, 3, 7]
    mask = step_lib.decay_mask(lj.param_shapes(CFG))
    assert mask["tok_embeddings"] and mask["output"] and mask["layers"]["attention"]["wq"]
    assert not mask["norm"]["weight"] and not mask["layers"]["attention_norm"]["weight"]
    assert not mask["layers"]["ffn_norm"]["weight"]


NORM_WEIGHTS = {("norm", "weight"), ("layers", "attention_norm", "weight"), ("layers", "ffn_norm", "weight")}


def test_weight_decay_skips_exactly_the_rmsnorm_weights():
    """Decoupled AdamW (Loshchilov & Hutter, as torch.optim.AdamW): with decay wd an update is the wd=0
    update minus lr*wd*p for every matrix and exactly the wd=0 update for the RMSNorm weights (listed
    above by hand). lr*wd = 5e-3 moves a norm weight (~1) by ~5e-3 and a matrix entry (~0.02) by ~1e-4;
    the updates (~1e-2) agree with the formula to float32 rounding, so atol is 1e-7."""
    lr, wd = 1e-2, 0.5
    rng = np.random.default_rng(0)
    shapes = jax.tree_util.tree_flatten_with_path(lj.param_shapes(CFG))[0]
    keys = [tuple(k.key for k in path) for path, _ in shapes]
    params = {k: (1.0 if k in NORM_WEIGHTS else 0.0) + 0.02 * rng.standard_normal(s.shape).astype(np.float32)
              for k, (_, s) in zip(keys, shapes)}
    grads = {k: rng.standard_normal(s.shape).astype(np.float32) for k, (_, s) in zip(keys, shapes)}

    def update(weight_decay):
        opt = step_lib.make_optimizer(step_lib.lr_schedule(lr, 10, "constant"), weight_decay=weight_decay)
        return jax.device_get(opt.update(grads, opt.init(params), params)[0])

    decayed, plain = update(wd), update(0.0)
    assert len(keys) == 12
    for k in keys:
        expected = plain[k] - (0.0 if k in NORM_WEIGHTS else lr * wd * params[k])
        np.testing.assert_allclose(decayed[k], expected, rtol=0, atol=1e-7, err_msg=str(k))


def test_flops_per_token_formula():
    cfg = lj.LlamaConfig.preset("llama2-7b")
    want = 6 * (6_738_415_616 - 32000 * 4096) + 6 * 32 * 4096 * 2048
    assert flops.train_flops_per_token(cfg, 2048) == want
    # 1000 tokens/s on one chip of 100 TFLOP/s peak:
    assert math.isclose(flops.mfu(1000.0, cfg, 2048, 1, 100e12), 1000.0 * want / 100e12)
    assert math.isclose(flops.mfu(8000.0, cfg, 2048, 8, 100e12), 1000.0 * want / 100e12)  # per chip


def test_chip_lookup_by_device_kind():
    """jax's device_kind strings -> the chip and its dense bf16 peak from the vendors' data sheets
    (TFLOP/s per chip: v4 275, v5e 197, v5p 459, v6e 918, H100/H200 SXM 989, A100 312, L4 121).
    "TPU v5 lite" (v5e) also contains "TPU v5" (v5p): the longer name must win. CPUs have no peak."""
    class Device:
        def __init__(self, kind):
            self.device_kind = kind

    cases = {"TPU v4": ("v4", 275e12), "TPU v5 lite": ("v5e", 197e12), "TPU v5": ("v5p", 459e12),
             "TPU v5p": ("v5p", 459e12), "TPU v6 lite": ("v6e", 918e12), "NVIDIA H100 80GB HBM3": ("H100", 989e12),
             "NVIDIA H200": ("H200", 989e12), "NVIDIA A100-SXM4-80GB": ("A100", 312e12), "NVIDIA L4": ("L4", 121e12)}
    for kind, (name, peak) in cases.items():
        chip = chip_of(Device(kind))
        assert (chip.name, chip.peak_bf16_flops) == (name, peak), kind
    assert chip_of(jax.devices("cpu")[0]) is None
    assert flops.mfu(1000.0, CFG, 32, 8, None) is None


def test_nan_loss_stops_before_saving(tmp_path):
    """lr 1e30 with 4 warmup steps: step 1 runs at lr 0 (finite), step 2 at 2.5e29 (its loss, taken
    before the update, is finite; it is saved), step 3's loss overflows: the run stops there and step 2
    stays the newest checkpoint, never a state whose loss was not finite."""
    from train.config import load_config
    from train.loop import TrainingDiverged, run
    cfg = load_config(None, [f"output_dir={tmp_path}", "steps=6", "checkpoint_every=2", "batch_size=8",
                             "model.preset=tiny", "data.format=pretrain", "data.train=data/demo_pretrain.txt",
                             "data.max_len=16", "optim.lr=1e30", "optim.clip_norm=0", "optim.warmup_steps=4",
                             "log_every=1", "tensorboard=false", "async_checkpointing=false"])
    with pytest.raises(TrainingDiverged, match="step 3: .*the last good checkpoint is step 2"):
        run(cfg)
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2]
    _, params = lj.load_checkpoint(str(tmp_path))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
