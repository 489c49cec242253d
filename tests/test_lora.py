"""LoRA and QLoRA against independent references: the real `peft` library (both directions), numpy
references of int8/nf4 with bitsandbytes' published NF4 table copied by hand, and invariances (step 0
equals the base, merged equals unmerged, sharded equals one device, resume after kill -9 is exact)."""

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from jax.sharding import Mesh

import llama_jax as lj
from llama_jax import layout, lora, quant
from llama_jax.checkpoint import leaf_paths
from llama_jax.checkpoint.orbax_glue import stored_arrays
from llama_jax.config import PROJECTIONS
from reference import hf_logits, hf_model, hf_params
from sharding import batch_sharding, tree_shardings
from train import data as data_lib
from train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = lj.LlamaConfig.preset("tiny-gqa")  # dim 64, 4 heads x 16 (2 kv heads), ffn 192, 2 layers, vocab 512
LORA = CFG.replace(lora_rank=4, lora_alpha=8.0)
TOKENS = np.random.default_rng(0).integers(3, CFG.vocab_size, (2, 24)).astype(np.int32)

# bitsandbytes' NF4 table (bitsandbytes/functional.py, get_4bit_type("nf4"); the QLoRA paper, Appendix E),
# copied by hand as numbers.
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def hf_base():
    """A random float32 HF Llama and the same weights as our params."""
    model = hf_model(CFG, seed=3)
    return model, hf_params(model, CFG)


# --- int8 / nf4 -------------------------------------------------------------------------------------


def test_nf4_table_is_bitsandbytes():
    """Built from the paper's construction, the table equals bitsandbytes' published values bit for bit
    (a wrong offset or spacing moves the values by > 1e-3)."""
    np.testing.assert_array_equal(quant.NF4_CODE, np.array(BNB_NF4, np.float32))


@pytest.mark.parametrize("shape, n_in", [((64, 4, 16), 1), ((4, 16, 64), 2), ((192, 64), 1)])
def test_int8_matches_numpy_reference(shape, n_in):
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    w[..., 0] = 0.0 if n_in == 1 and len(shape) == 2 else w[..., 0]  # an all-zero output channel must not divide by 0
    axes = tuple(range(n_in))
    scale = np.abs(w).max(axis=axes, keepdims=True) / np.float32(127)
    scale = np.where(scale > 0, scale, np.float32(1))
    values = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    q = quant.quantize(w, n_in, "int8")
    np.testing.assert_array_equal(np.asarray(q.values), values)
    np.testing.assert_allclose(np.asarray(quant.dequantize(q)), values.astype(np.float32) * scale, rtol=3e-7, atol=0)  # 2 ulps
    assert np.abs(np.asarray(quant.dequantize(q)) - w).max() <= np.abs(w).max() / 254 * 1.0001  # half a step


def nf4_reference(w, n_in, double_quant=False):
    """QLoRA's blockwise NF4 in numpy: blocks of 64 consecutive input values per output channel,
    absmax-normalised, each value -> the nearest entry of the hand-copied table."""
    table = np.array(BNB_NF4, np.float32)
    in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    blocks = w.reshape(-1, 64, *out_shape)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    index = np.abs((blocks / absmax)[..., None] - table).argmin(-1)
    if double_quant:  # uint8 between each output channel's smallest and largest absmax
        low, high = absmax.min(axis=0, keepdims=True), absmax.max(axis=0, keepdims=True)
        step = np.where(high > low, (high - low) / np.float32(255), np.float32(1))
        absmax = low + np.round((absmax - low) / step) * step
    return index, (table[index] * absmax).reshape(*in_shape, *out_shape)


@pytest.mark.parametrize("shape, n_in", [((256, 4, 16), 1), ((8, 32, 64), 2), ((192, 64), 1)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_matches_numpy_reference(shape, n_in, double_quant):
    w = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    index, want = nf4_reference(w, n_in, double_quant)
    q = quant.quantize(w, n_in, "nf4", double_quant)
    assert q.codes.dtype == jnp.uint8 and q.codes.size * 2 == w.size  # two 4-bit codes per byte
    got_index = np.concatenate([np.asarray(q.codes) & 15, np.asarray(q.codes) >> 4], axis=1)
    np.testing.assert_array_equal(got_index, index)
    np.testing.assert_allclose(np.asarray(quant.dequantize(q)), want, rtol=2e-6, atol=1e-7)
    if double_quant:
        assert q.absmax.dtype == jnp.uint8


def quantized_logits(params, cfg, fmt):
    return np.asarray(lj.forward(quant.quantize_params(params, cfg, fmt), TOKENS, cfg))


def test_quantized_forward_error_vs_bf16_base(hf_base):
    """int8 and nf4 logits against the bf16-weight model (all computed in float32): the error is bounded,
    and ordered as the formats' precision (nf4 > int8 > 0). Printed for the README."""
    _, params = hf_base
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    want = np.asarray(lj.forward(bf16, TOKENS, CFG))
    errors = {fmt: rel(quantized_logits(bf16, CFG, fmt), want) for fmt in ("int8", "nf4")}
    print(f"\nrelative logits error vs the bf16 base: {errors}")
    # Per matrix, int8's rounding error is ~0.6% of a weight's scale and nf4's ~10% (4 bits); through
    # the 9 matrices a token passes in this random 2-layer model they measure ~1.6% and ~25%.
    assert 0.002 < errors["int8"] < 0.03 and 5 * errors["int8"] < errors["nf4"] < 0.4


def test_quantized_load_equals_quantize_params_and_shards_like_the_weight(tmp_path, hf_base):
    """lj.load_checkpoint(quantize=) (layer by layer, into the mesh) gives the same arrays as quantising
    the loaded float params, each placed by the weight's logical axes."""
    _, params = hf_base
    lj.save_checkpoint(str(tmp_path / "base"), CFG, params)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    _, want = lj.load_checkpoint(str(tmp_path / "base"))
    want = quant.quantize_params(want, CFG, "nf4")
    _, got = lj.load_checkpoint(str(tmp_path / "base"), mesh=mesh, quantize="nf4")
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    axes, shapes = quant.layout_of(lj.param_axes(CFG), lj.param_shapes(CFG), "nf4")
    for a, sh in zip(jax.tree.leaves(got), jax.tree.leaves(tree_shardings(axes, shapes, mesh))):
        assert a.sharding.is_equivalent_to(sh, a.ndim)
    codes = got["layers"]["attention"]["wq"].codes  # (layers, embed blocks, 32, heads, head_dim)
    assert codes.sharding.spec[3] == "tensor"  # (dim 64 is one block: too few to split over fsdp, so replicated)
    assert got["layers"]["feed_forward"]["w1"].absmax.sharding.spec[3] == "tensor"


# --- LoRA in the model --------------------------------------------------------------------------------


def test_lora_a_init_is_pefts_kaiming_uniform():
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) like PEFT's kaiming_uniform_(a=sqrt(5)); B = 0."""
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(hf_model(CFG), peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    peft_a = {n: p.detach().numpy() for n, p in model.named_parameters() if "lora_A" in n}
    adapters = lora.init_adapters(LORA, 0)["layers"]["attention"]
    for ours, name in ((adapters["wq_lora_a"], "q_proj"), (adapters["wo_lora_a"], "o_proj")):
        theirs = np.concatenate([v.ravel() for k, v in peft_a.items() if name in k])
        bound = 1 / np.sqrt(64)
        assert np.abs(ours).max() <= bound and np.abs(theirs).max() <= bound
        assert abs(np.std(ours) / np.std(theirs) - 1) < 0.1 and abs(np.std(ours) - bound / np.sqrt(3)) < 0.1 * bound
    assert all(not np.any(adapters[k]) for k in adapters if k.endswith("_lora_b"))


def lora_batch(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, CFG.vocab_size, (8, 33)).astype(np.int32)
    rows = {"tokens": tokens, "loss_mask": np.ones_like(tokens), "segment_ids": np.ones_like(tokens),
            "positions": np.tile(np.arange(33, dtype=np.int32), (8, 1))}
    return data_lib.model_batch(rows)


def lora_steps(cfg, base, mesh, grad_accum=1, base_dtype="float32", steps=2, lr=1e-2):
    """`steps` LoRA updates with the real train step."""
    schedule = step_lib.lr_schedule(lr, 10, "constant")
    opt = step_lib.make_optimizer(schedule, 0.9, 0.95, 1e-5, 0.1, 1.0)
    fn = step_lib.make_train_step(cfg, opt, schedule, mesh, (8, 32), grad_accum, base_dtype=base_dtype, seed=7)
    base_sh = tree_shardings(*lora.base_layout(cfg, base_dtype), mesh)
    with jax.set_mesh(mesh):
        adapters = lora.init_adapters(cfg, 1)
        state = jax.jit(lambda p: step_lib.init_state(p, opt), out_shardings=step_lib.state_shardings(cfg, opt, mesh))(
            adapters)
        base = jax.device_put(base, base_sh)
        metrics = []
        for k in range(steps):
            state, m = fn(state, jax.device_put(lora_batch(k), batch_sharding(mesh, 2)), base)
            metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


def one_device():
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


def test_step0_equals_base_and_merged_equals_unmerged(hf_base):
    _, base = hf_base
    cfg = LORA.replace(lora_dropout=0.1)
    want = np.asarray(lj.forward(base, TOKENS, CFG))
    fresh = lora.combine(base, lora.init_adapters(cfg, 0))
    np.testing.assert_array_equal(np.asarray(lj.forward(fresh, TOKENS, cfg)), want)  # B = 0: exactly the base
    nf4 = quant.quantize_params(base, CFG, "nf4")  # ... also over a quantised base, targets a subset
    sub = cfg.replace(lora_targets=("wv", "w2"))
    np.testing.assert_array_equal(np.asarray(lj.forward(lora.combine(nf4, lora.init_adapters(sub, 0)), TOKENS, sub)),
                                  np.asarray(lj.forward(nf4, TOKENS, CFG)))

    state, metrics = lora_steps(cfg, base, one_device(), steps=3)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    trained = lora.combine(base, state["params"])
    unmerged = np.asarray(lj.forward(trained, TOKENS, cfg))
    assert rel(unmerged, want) > 1e-3  # the adapters did change the model
    merged_cfg, merged = lora.merge(trained, cfg)
    assert merged_cfg.lora_rank == 0 and jax.tree.structure(merged) == jax.tree.structure(base)
    assert rel(lj.forward(merged, TOKENS, merged_cfg), unmerged) <= 1e-6
    # A QLoRA model merges into its nf4-rounded weights: the same adapters over the nf4 base, merged, give
    # the unmerged QLoRA model's logits (the stacked nf4 layers dequantised layer by layer).
    qlora = lora.combine(nf4, state["params"])
    merged_cfg, merged = lora.merge(qlora, cfg)
    assert not any(quant.is_quantized(w) for w in jax.tree.leaves(merged, is_leaf=quant.is_quantized))
    assert rel(lj.forward(merged, TOKENS, merged_cfg), lj.forward(qlora, TOKENS, cfg)) <= 1e-6

    # Only adapters are trained: the state's params and every optimizer leaf are adapter-shaped.
    adapter_shapes = {tuple(s.shape) for s in jax.tree.leaves(lora.adapter_layout(cfg)[1])}
    assert {tuple(np.shape(x)) for x in jax.tree.leaves(state["params"])} == adapter_shapes
    assert {tuple(np.shape(x)) for x in jax.tree.leaves(state["opt_state"])} <= adapter_shapes | {()}
    assert lora.adapter_count(cfg) < CFG.num_params() / 10


def test_sharded_lora_step_equals_single_device(hf_base):
    """data=2 x fsdp=2 x tensor=2 (2 microbatches, dropout on, an nf4 base) equals one device."""
    _, base = hf_base
    cfg, base_dtype = LORA.replace(lora_dropout=0.1), "nf4"
    base = quant.quantize_params(jax.tree.map(lambda x: x.astype(jnp.bfloat16), base), CFG, "nf4")
    want, want_m = lora_steps(cfg, base, one_device(), grad_accum=2, base_dtype=base_dtype, lr=1e-3)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    got, got_m = lora_steps(cfg, base, mesh, grad_accum=2, base_dtype=base_dtype, lr=1e-3)
    # Adam's first steps are ~lr * sign(g): a 1e-7 reduction-order difference in a tiny gradient moves
    # an adapter weight by ~1e-7, so they are compared to 1e-6 absolute (updates are 1e-3).
    for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_m, want_m):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)


# --- PEFT, both directions ------------------------------------------------------------------------------


def peft_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_imports_and_merges(tmp_path, hf_base, rslora):
    """An adapter made by peft.get_peft_model (random non-zero A and B) -> `convert peft` -> our logits equal PEFT's."""
    import peft

    from llama_jax.convert.__main__ import main as convert

    base_model, params = hf_base
    lj.save_checkpoint(str(tmp_path / "base"), CFG, params)
    torch.manual_seed(1)
    model = peft.get_peft_model(hf_model(CFG, seed=3), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_rslora=rslora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "adapter"))
    want = peft_logits(model)
    assert rel(want, hf_logits(base_model, TOKENS)) > 1e-2  # the adapter matters

    convert(["peft", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), str(tmp_path / "merged"),
             "--no-progress"])
    cfg, merged = lj.load_checkpoint(str(tmp_path / "merged"))
    assert rel(lj.forward(merged, TOKENS, cfg), want) <= 1e-5

    bad = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    for change, message in (({"use_dora": True}, "use_dora"), ({"target_modules": ".*proj"}, "regular expressions"),
                            ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"), ({"r": 8}, "shape")):
        json.dump({**bad, **change}, open(tmp_path / "adapter" / "adapter_config.json", "w"))
        with pytest.raises(ValueError, match=message):
            convert(["peft", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), str(tmp_path / "m2")])


# --- end to end: python -m train with LoRA, kill -9, export ---------------------------------------------


def train_command(base, out, *extra):
    return [sys.executable, "-m", "train", "--config", "configs/demo.yaml", f"output_dir={out}", f"init_from={base}",
            "steps=14", "checkpoint_every=4", "log_every=1", "batch_size=4",  # demo.yaml's model.overrides: ignored
            "data.format=pretrain", "data.train=data/demo_pretrain.txt", "data.max_len=32", "eval.data=null",
            "eval.loss_data=null", "tensorboard=false", "optim.warmup_steps=2", "optim.lr=1e-2", "lora.rank=4", "lora.alpha=8",
            "lora.dropout=0.1", *extra]


def env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def folder_digest(folder):
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            digest.update(name.encode())
            with open(os.path.join(root, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, hf_base):
    """A base checkpoint (the HF model's weights) and a LoRA run on it that was killed with -9 and resumed,
    beside an uninterrupted reference run."""
    tmp = tmp_path_factory.mktemp("lora_run")
    base, run, ref = str(tmp / "base"), str(tmp / "run"), str(tmp / "ref")
    lj.save_checkpoint(base, CFG, hf_base[1])
    before = folder_digest(base)
    reference = subprocess.Popen(train_command(base, ref), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(train_command(base, run), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (os.path.exists(os.path.join(run, "metrics.jsonl")) and max(losses(run), default=0) >= 9):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # checkpoints at 4 and 8 exist (or are being written)
    proc.wait()
    resumed = subprocess.run(train_command(base, run), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err[-3000:]
    return {"base": base, "run": run, "ref": ref, "base_digest_before": before, "resumed": resumed}


def test_lora_run_resumes_exactly_and_keeps_the_base(lora_run):
    run, ref = lora_run["run"], lora_run["ref"]
    out = lora_run["resumed"].stdout
    assert "resumed from step" in out and "trainable parameters" in out and "gives the architecture" in out
    want, got = losses(ref), losses(run)
    assert sorted(got) == sorted(want) == list(range(1, 15))
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=1e-6, atol=0)  # dropout too
    assert want[14] < want[1]
    assert folder_digest(lora_run["base"]) == lora_run["base_digest_before"]  # the base is only read
    cfg = lj.checkpoint.read_config(run)
    adapter_shapes = {leaf: s.shape for leaf, s in leaf_paths(lora.adapter_layout(cfg)[1])}
    step_dir = os.path.join(run, "14")
    stored = stored_arrays(os.path.join(step_dir, "params"))
    assert {leaf: shape for leaf, (shape, _) in stored.items()} == adapter_shapes  # saved arrays: adapters only
    with ocp.PyTreeCheckpointer() as ckptr:
        opt = ckptr.metadata(os.path.join(step_dir, "opt_state"))
    opt_shapes = {tuple(m.shape) for m in jax.tree.leaves(getattr(opt, "item_metadata", opt).tree)}
    assert opt_shapes <= set(adapter_shapes.values()) | {()}  # moments of the adapters, counts


def test_lora_resume_refuses_changed_lora_settings(lora_run):
    before = sorted(os.listdir(lora_run["run"]))
    for change in ("lora.alpha=16", "lora.targets=[wq,wv]", "lora.base_dtype=nf4", "lora.rank=0"):
        again = subprocess.run(train_command(lora_run["base"], lora_run["run"], change), cwd=ROOT, env=env(),
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 2 and f"{change.split('=')[0]}: " in again.stderr, (change, again.stderr[-2000:])
        assert "Traceback" not in again.stderr
    assert sorted(os.listdir(lora_run["run"])) == before


def test_lora_run_loads_merged_and_exports_to_hf_and_peft(tmp_path, lora_run, hf_base):
    """lj.load_checkpoint(RUN) is the merged model (= base + adapters unmerged); export-hf writes it;
    export-peft writes an adapter that peft.PeftModel.from_pretrained loads (no missing keys) with equal logits."""
    import peft
    import transformers

    from llama_jax.convert.__main__ import main as convert

    run = lora_run["run"]
    cfg, merged = lj.load_checkpoint(run)
    assert cfg.lora_rank == 0 and jax.tree.structure(merged) == jax.tree.structure(hf_base[1])
    ours = np.asarray(lj.forward(merged, TOKENS, cfg))
    run_cfg = lj.checkpoint.read_config(run)
    adapters = lj.checkpoint.load_adapters(run, run_cfg)
    unmerged = np.asarray(lj.forward(lora.combine(hf_base[1], adapters), TOKENS, run_cfg))
    assert rel(ours, unmerged) <= 1e-6 and rel(ours, hf_logits(hf_base[0], TOKENS)) > 1e-3

    convert(["export-hf", run, str(tmp_path / "hf"), "--no-progress"])
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32,
                                                       attn_implementation="eager")
    assert rel(peft_logits(hf), ours) <= 1e-5

    convert(["export-peft", run, str(tmp_path / "adapter")])
    config = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj"])
    model = peft.PeftModel.from_pretrained(hf_model(CFG, seed=3), str(tmp_path / "adapter"))
    saved = peft.utils.load_peft_weights(str(tmp_path / "adapter"))
    result = peft.set_peft_model_state_dict(model, saved)
    assert not [k for k in result.missing_keys if "lora_" in k] and not result.unexpected_keys
    assert rel(peft_logits(model.eval()), ours) <= 1e-5


def test_lora_run_loads_int8_on_a_tensor_mesh_and_decodes(lora_run):
    """quantize="int8" on a LoRA run folder, on a tensor=2 mesh: merged, then quantised (the int8 values
    are numpy's per-output-channel rounding of the merged float weights), placed by the quantised layout;
    greedy decoding under the mesh equals one device's on the float model holding those rounded weights."""
    run = lora_run["run"]
    cfg, merged = lj.load_checkpoint(run)
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(1, 1, 2), ("data", "fsdp", "tensor"))
    qcfg, q = lj.load_checkpoint(run, mesh=mesh, quantize="int8")
    assert qcfg == cfg
    rounded = jax.tree.map(np.asarray, merged)
    for name in PROJECTIONS:
        entry = layout.projection(name)
        group, got = entry.path[-2], q["layers"][entry.path[-2]][name]
        w = rounded["layers"][group][name]  # (layers, *in, *out)
        scale = np.abs(w).max(axis=tuple(range(1, 1 + entry.n_in)), keepdims=True) / np.float32(127)
        values = np.clip(np.round(w / scale), -127, 127)
        # Equal, except where w / scale is a tie (x.5) to float32 rounding: the merged weights reach the
        # quantiser through another float path, and a tie may round either way (a wrong scale or
        # rounding rule moves thousands of values; these differ by 1 at a handful).
        differ = np.asarray(got.values) != values.astype(np.int8)
        tie = np.abs(np.abs(w / scale - np.trunc(w / scale)) - 0.5) < 1e-4
        assert not (differ & ~tie).any() and np.abs(np.asarray(got.values)[differ] - values[differ]).max(initial=0) <= 1
        assert differ.sum() <= 4, (name, differ.sum())
        rounded["layers"][group][name] = np.asarray(got.values, np.float32) * scale  # = values but at ties
    axes, shapes = quant.layout_of(lj.param_axes(cfg), lj.param_shapes(cfg), "int8")
    for a, sh in zip(jax.tree.leaves(q), jax.tree.leaves(tree_shardings(axes, shapes, mesh))):
        assert a.sharding.is_equivalent_to(sh, a.ndim)
    assert q["layers"]["attention"]["wq"].values.sharding.spec[2] == "tensor"
    prompts = TOKENS[:, :8].tolist()
    want = lj.generate(rounded, cfg, prompts, max_new_tokens=12, eos_id=None)
    with jax.set_mesh(mesh):
        assert lj.generate(q, cfg, prompts, max_new_tokens=12, eos_id=None) == want


# --- recipe keys and the planner ----------------------------------------------------------------------


def test_lora_recipe_keys_are_checked():
    from train.config import load_config

    cfg = load_config("configs/alpaca-qlora-7b.yaml")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.base_dtype) == (64, 16.0, "nf4")
    for override, message in ((["init_from=null", "model.preset=tiny"], "set init_from"), (["lora.targets=[wq,wx]"], "lora.targets"),
                              (["lora.base_dtype=int4"], "lora.base_dtype"), (["lora.dropout=1.0"], "lora.dropout"),
                              (["lora.rank=-1"], "lora.rank")):
        with pytest.raises(ValueError, match=message):
            load_config("configs/alpaca-qlora-7b.yaml", override)


def test_planner_compiles_the_qlora_step_for_a_tpu(monkeypatch):
    pytest.importorskip("libtpu", reason="libtpu is not installed: TPU AOT compilation is unavailable")
    from llama_jax import flops
    from sharding import make_mesh
    from train import plan as plan_cli
    from train import planner

    class Planned(Exception):
        pass

    asked = {}

    def fake_plan(*args, **kwargs):  # the CLI's flags reach plan(); the compile itself is checked below
        asked.update(kwargs)
        raise Planned

    monkeypatch.setattr(plan_cli, "plan", fake_plan)
    with pytest.raises(Planned):
        plan_cli.main(["--model", "tiny-gqa", "--topology", "v5e-1", "--batch", "8", "--lora-rank", "4",
                       "--base-dtype", "nf4", "--lora-targets", "wq,wv"])
    assert (asked["lora_rank"], asked["base_dtype"], asked["lora_targets"]) == (4, "nf4", ("wq", "wv"))

    cfg = lj.LlamaConfig.preset("tiny-gqa", dtype="bfloat16", remat="full", scan_layers=False, lora_rank=4)
    chip, devices = planner.tpu_devices("v5e-1")
    mesh = make_mesh(devices=devices)
    lowered, sizes = planner.lower_step(cfg, mesh, batch=8, seq=64, base_dtype="nf4")
    (state, batch, base), _ = lowered.args_info
    assert {leaf: a.shape for leaf, a in leaf_paths(state["params"])} == {
        leaf: s.shape for leaf, s in leaf_paths(lora.adapter_layout(cfg)[1])}
    assert all(a.donated for a in jax.tree.leaves(state)) and not any(a.donated for a in jax.tree.leaves(base))
    # By hand, the nf4 base: per layer 49,152 projection weights at half a byte plus a float32 absmax per
    # 64; bf16 embedding + output (2 x 512 x 64) and norms (2 per layer + the final one, 64 each).
    assert sizes["base"] == 2 * (49152 // 2 + 49152 // 64 * 4) + 2 * 512 * 64 * 2 + 5 * 64 * 2
    compiled, _ = planner.compile_step(cfg, mesh, batch=8, seq=64, base_dtype="nf4")
    smaller = dataclasses.replace(compiled, batch=4, temp_bytes=compiled.temp_bytes // 2)
    report = planner.Plan("tiny-gqa", "v5e-1", dict(mesh.shape), 64, "full", chip.hbm_bytes, sizes, compiled, smaller,
                          1, 1, 1, chip.peak_bf16_flops, 1.0, 2, "LoRA rank 4 on all, base nf4").report()
    assert "LoRA rank 4 on all, base nf4" in report and "base (frozen)" in report and "adapters" in report
    want = flops.compiled_train_step_flops(cfg, 8, 64)  # frozen weights: forward, input gradient, remat
    assert want <= compiled.xla_flops <= 1.1 * want  # XLA adds nf4 decoding and elementwise work
    # By hand: as tests/test_sharding.py's full step, but 3 passes of the weights (no weight gradient)
    # and the rank-4 adapters of all 7 projections: 4 x (in + out) each, 4 passes (fwd, 2x bwd, remat).
    weights, scores = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 192), 4 * 64 * 64
    adapters = 2 * 4 * (128 + 96 + 96 + 128 + 3 * 256)
    assert want == 8 * 64 * (2 * (weights * 3 + scores * 4 + adapters * 4) + 2 * 2 * 64 * 512)
