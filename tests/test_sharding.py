"""Sharding on 8 forced CPU devices: sharded runs equal the single-device run, FSDP really splits
params, bad meshes fail clearly, and the TPU planner compiles for a real topology (libtpu)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import NamedSharding, PartitionSpec as P

import llama_jax as lj
from model_loss import loss_logits_grads
from sharding import (batch_sharding, check_mesh, global_batch, initialize, make_mesh, parse_mesh, param_shardings,
                      shard_params)

MHA_ODD = lj.LlamaConfig.preset("tiny", vocab_size=301)  # 301 divides by nothing: vocab replicated
GQA = lj.LlamaConfig.preset("tiny-gqa")  # 4 heads, 2 kv heads, vocab 512: vocab sharded over tensor


def _tokens(cfg):
    return jax.random.randint(jax.random.key(7), (8, 17), 0, cfg.vocab_size, jnp.int32)


@functools.lru_cache(maxsize=None)
def single_device(cfg):
    """Reference: everything on device 0, no mesh."""
    params = lj.init_params(cfg, 0)
    assert len(jax.tree.leaves(params)[0].devices()) == 1
    loss, logits, grads = loss_logits_grads(params, _tokens(cfg), cfg)
    return params, float(loss), np.asarray(logits), jax.tree.map(np.asarray, grads)


def assert_rel_close(actual, expected, rel=1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    assert float(np.max(np.abs(actual - expected))) <= rel * scale


# --- the layout each mesh gives every parameter kind, written out by hand -----------------------------
# The rules (sharding/rules.py): embed -> fsdp; vocab, heads, kv_heads, mlp -> tensor; layers, head_dim
# -> nothing; a mesh axis of size 1 is dropped, and a dimension it does not divide stays whole. Sizes:
# tiny-gqa: vocab 512, dim 64, 4 heads, 2 kv heads, mlp 192; the odd MHA model: vocab 301, 4 kv heads.
# Parameter axes: tok_embeddings (vocab, embed), norms (layers, embed) / (embed,), wq (layers, embed,
# heads, head_dim), wk/wv (layers, embed, kv_heads, head_dim), wo (layers, heads, head_dim, embed),
# w1/w3 (layers, embed, mlp), w2 (layers, mlp, embed), output (embed, vocab).

def _specs(tok, layer_norm, wq, wkv, wo, w13, w2, norm, output):
    return {("tok_embeddings",): tok, ("layers", "attention_norm", "weight"): layer_norm,
            ("layers", "attention", "wq"): wq, ("layers", "attention", "wk"): wkv, ("layers", "attention", "wv"): wkv,
            ("layers", "attention", "wo"): wo, ("layers", "ffn_norm", "weight"): layer_norm,
            ("layers", "feed_forward", "w1"): w13, ("layers", "feed_forward", "w3"): w13,
            ("layers", "feed_forward", "w2"): w2, ("norm", "weight"): norm, ("output",): output}


F, T = "fsdp", "tensor"
LAYOUTS = {  # (model, (data, fsdp, tensor)) -> every parameter's PartitionSpec
    ("mha-odd", (8, 1, 1)): _specs(P(None, None), P(None, None), P(None, None, None, None), P(None, None, None, None),
                                   P(None, None, None, None), P(None, None, None), P(None, None, None), P(None),
                                   P(None, None)),
    ("mha-odd", (1, 8, 1)): _specs(P(None, F), P(None, F), P(None, F, None, None), P(None, F, None, None),
                                   P(None, None, None, F), P(None, F, None), P(None, None, F), P(F), P(F, None)),
    ("gqa", (1, 4, 2)): _specs(P(T, F), P(None, F), P(None, F, T, None), P(None, F, T, None), P(None, T, None, F),
                               P(None, F, T), P(None, T, F), P(F), P(F, T)),
    ("gqa", (2, 2, 2)): _specs(P(T, F), P(None, F), P(None, F, T, None), P(None, F, T, None), P(None, T, None, F),
                               P(None, F, T), P(None, T, F), P(F), P(F, T)),
    # tensor 4 > 2 kv heads: wk/wv stay whole on the tensor axis
    ("gqa", (2, 1, 4)): _specs(P(T, None), P(None, None), P(None, None, T, None), P(None, None, None, None),
                               P(None, T, None, None), P(None, None, T), P(None, T, None), P(None), P(None, T)),
    ("gqa", (1, 2, 4)): _specs(P(T, F), P(None, F), P(None, F, T, None), P(None, F, None, None), P(None, T, None, F),
                               P(None, F, T), P(None, T, F), P(F), P(F, T)),
    ("gqa", (1, 1, 2)): _specs(P(T, None), P(None, None), P(None, None, T, None), P(None, None, T, None),
                               P(None, T, None, None), P(None, None, T), P(None, T, None), P(None), P(None, T)),
}
MODELS = {"mha-odd": MHA_ODD, "gqa": GQA}


def assert_layout(tree, model, shape):
    """Every leaf of `tree` (NamedShardings or placed arrays) has its hand-written PartitionSpec."""
    want = LAYOUTS[(model, shape)]
    got = {tuple(k.key for k in path): getattr(leaf, "sharding", leaf).spec
           for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    assert got == want


@pytest.mark.parametrize("model,shape", sorted(LAYOUTS), ids=[f"{m}-{'x'.join(map(str, s))}" for m, s in sorted(LAYOUTS)])
def test_every_parameter_kind_gets_the_hand_written_layout(model, shape):
    mesh = make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])
    assert_layout(param_shardings(MODELS[model], mesh), model, shape)


def test_batch_cache_and_logits_layout():
    """On data 2 x fsdp 2 x tensor 2: batch rows over (data, fsdp); the KV cache (layers, batch, slots,
    kv heads, head_dim) over batch and kv heads; logits over batch and vocab."""
    mesh = make_mesh(2, 2, 2)
    rows = ("data", "fsdp")
    assert batch_sharding(mesh).spec == P(rows, None)
    params = shard_params(lj.init_params(GQA, 0), GQA, mesh)
    with jax.set_mesh(mesh):
        cache = jax.jit(lambda: lj.init_cache(GQA, 8, 16))()
        logits = lj.forward(params, _tokens(GQA), GQA)
    for leaf in cache.values():
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, P(None, rows, None, "tensor", None)), 5)
    assert logits.sharding.is_equivalent_to(NamedSharding(mesh, P(rows, None, "tensor")), 3)


@pytest.mark.parametrize("cfg,shape", [
    (MHA_ODD, (8, 1, 1)), (MHA_ODD, (1, 8, 1)), (GQA, (1, 4, 2)), (GQA, (2, 2, 2)),
    (GQA, (2, 1, 4)),  # tensor 4 > 2 kv heads: K/V projections replicated over tensor
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"kv{v.n_kv_heads}-vocab{v.vocab_size}")
def test_sharded_equals_single_device(cfg, shape):
    params, loss_ref, logits_ref, grads_ref = single_device(cfg)
    tokens = _tokens(cfg)
    # The loss itself, by hand from the reference logits (float64 log-softmax).
    z = logits_ref.astype(np.float64)
    logp = z - (np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1, keepdims=True)) + z.max(-1, keepdims=True))
    hand = -np.mean(np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], -1))
    assert abs(loss_ref - hand) <= 1e-5 * abs(hand)

    if cfg.n_kv_heads % shape[2]:
        with pytest.warns(UserWarning, match="K/V projections are replicated over the tensor axis"):
            mesh = make_mesh(*shape, cfg=cfg, batch=8)
    else:
        mesh = make_mesh(*shape, cfg=cfg, batch=8)
    sharded = shard_params(params, cfg, mesh)
    with jax.set_mesh(mesh):
        loss, logits, grads = loss_logits_grads(sharded, tokens, cfg)
    # It really ran sharded: params placed as the hand-written table says, logits split over the batch axes.
    assert_layout(sharded, "gqa" if cfg is GQA else "mha-odd", shape)
    assert len(logits.sharding.device_set) == 8 and not logits.sharding.is_fully_replicated
    assert abs(float(loss) - loss_ref) <= 1e-5 * abs(loss_ref)
    assert_rel_close(logits, logits_ref)
    jax.tree.map(assert_rel_close, grads, grads_ref)


@pytest.mark.filterwarnings("ignore:.*context manager has been deprecated:DeprecationWarning")
def test_fsdp_init_is_born_sharded_and_spread():
    """Both ways to enter a mesh work: jax.set_mesh and the older `with mesh:` (DESIGN.md's form)."""
    cfg = MHA_ODD
    mesh = make_mesh(data=1, fsdp=8, tensor=1)
    with jax.set_mesh(mesh):
        params = lj.init_params(cfg, 0)
    reference = single_device(cfg)[0]
    device0 = jax.devices()[0]
    on_device0 = 0
    for leaf, ref in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))  # same numbers as unsharded init
        shard = next(s for s in leaf.addressable_shards if s.device == device0)
        on_device0 += shard.data.size
    w1 = params["layers"]["feed_forward"]["w1"]
    shard = next(s for s in w1.addressable_shards if s.device == device0)
    assert shard.data.shape == (cfg.n_layers, cfg.dim // 8, cfg.hidden_dim)
    assert on_device0 * 8 == cfg.num_params()  # every leaf has an `embed` axis: exactly 1/8 each

    tokens = _tokens(cfg)[:, :-1]
    with mesh:  # the public forward on born-sharded params: the single-device logits
        logits = lj.forward(params, tokens, cfg)
    assert not logits.sharding.is_fully_replicated
    assert_rel_close(logits, single_device(cfg)[2])


def test_bad_meshes_give_clear_errors():
    with pytest.raises(ValueError, match="product of the axes must equal the device count"):
        make_mesh(data=3, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="not divisible by the other axes"):
        make_mesh(data=-1, fsdp=3)
    with pytest.raises(ValueError, match="positive int or -1"):
        make_mesh(data=0)
    with pytest.raises(ValueError, match="tensor=8 does not divide n_heads=4"):
        make_mesh(data=1, fsdp=1, tensor=8, cfg=MHA_ODD)
    with pytest.raises(ValueError, match="global batch 6 is not divisible by data x fsdp = 4 x 2 = 8"):
        make_mesh(data=4, fsdp=2, tensor=1, batch=6)
    with pytest.raises(ValueError, match="slices"):
        make_mesh(data=-1, dcn_data=2)  # CPU devices are one slice
    with pytest.raises(ValueError, match="expected NAME=INT"):
        parse_mesh("fsdp")
    with pytest.raises(ValueError, match="expected NAME=INT"):
        parse_mesh("model=2")
    assert parse_mesh("fsdp=-1") == {"fsdp": -1, "data": 1}
    assert parse_mesh("data=2, fsdp=-1, tensor=2") == {"data": 2, "fsdp": -1, "tensor": 2}
    mesh = make_mesh(fsdp=4, tensor=2)  # data=-1 fills: 1
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "context": 1, "tensor": 2}
    check_mesh(mesh, cfg=GQA, batch=4)  # kv heads 2 with tensor 2: fine


def test_global_batch_from_local_rows():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    rows = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)  # one process: local rows = global rows
    batch = global_batch({"tokens": rows}, mesh)["tokens"]
    np.testing.assert_array_equal(np.asarray(batch), rows)
    assert batch.sharding.spec[0] == ("data", "fsdp")
    for shard in batch.addressable_shards:  # each data x fsdp group holds 2 consecutive rows
        assert shard.data.shape == (2, 5)
    with pytest.raises(ValueError, match="not divisible by data x fsdp = 4"):
        global_batch(rows[:6], mesh)


def test_initialize_arguments(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="must be given together"):
        initialize(coordinator_address="localhost:1234")
    with pytest.raises(ValueError, match=r"process_id 2 is not in \[0, 2\)"):
        initialize("localhost:1234", 2, 2)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an int"):
        initialize()


# --- planning for TPU topologies (compile-only TPU devices from libtpu) ----------------------


def test_topology_names():
    from train.planner import parse_topology

    # Cloud TPU slice shapes (v4/v5p names count TensorCores, 2 per chip; v5e names count chips).
    assert parse_topology("v4-8")[1:] == ("v4:2x2x1", 4)
    assert parse_topology("v5p-8")[1:] == ("v5p:2x2x1", 4)
    assert parse_topology("v5p-128")[1:] == ("v5p:4x4x4", 64)
    assert parse_topology("v4-256")[1:] == ("v4:4x4x8", 128)
    assert parse_topology("v4-512")[1:] == ("v4:4x8x8", 256)
    assert parse_topology("v5e-8")[1:] == ("v5e:2x4", 8)
    assert parse_topology("v5e-256")[1:] == ("v5e:16x16", 256)
    assert parse_topology("v5p:2x2x2")[1:] == ("v5p:2x2x2", 8)
    with pytest.raises(ValueError, match="unknown TPU topology 'v3-8'"):
        parse_topology("v3-8")
    with pytest.raises(ValueError, match="multiple of 2"):
        parse_topology("v5p-7")


def test_aot_compile_for_tpu_topology(capsys):
    pytest.importorskip("libtpu", reason="libtpu is not installed: TPU AOT compilation is unavailable")
    import optax

    from llama_jax import flops
    from train import plan as plan_cli
    from train import planner as plan
    from train import step as step_lib

    # The CLI end to end: a tiny model on a v5p-8 slice (4 chips), fsdp 2 x context 2 (each sequence split
    # over 2 chips), 2 microbatches.
    assert plan_cli.main(["--model", "tiny-gqa", "--topology", "v5p:2x2x1", "--mesh", "fsdp=-1", "--context", "2",
                          "--batch", "16", "--seq", "64", "--grad-accum", "2"]) == 0
    out = capsys.readouterr().out
    assert ("tiny-gqa on v5p:2x2x1 (4 chips, 95.00 GiB HBM each), mesh data=1 fsdp=2 context=2 tensor=1, batch 16 x "
            "seq 64, remat full, grad-accum 2 (microbatch 8)") in out
    assert "verdict: FITS" in out and "multiple of data x fsdp x grad-accum = 4" in out
    with pytest.raises(SystemExit):
        plan_cli.main(["--model", "tiny-gqa", "--topology", "v5p-8", "--mesh", "context=4", "--context", "2",
                       "--batch", "4"])
    assert "--context 2 and --mesh context=4 disagree" in capsys.readouterr().err

    # The program compiled is train.step's: its arguments are the loop's state (params, the
    # optimizer state of make_optimizer: clipping, AdamW moments, decay mask, schedule count; the
    # step), all donated, and the loop's five batch arrays; it returns the loop's metrics.
    cfg = lj.LlamaConfig.preset("tiny-gqa", dtype="bfloat16", remat="full", scan_layers=False)
    chip, devices = plan.tpu_devices("v5p-8")
    assert devices[0].device_kind == "TPU v5" and chip.hbm_bytes == 95 * 2**30
    mesh = make_mesh(data=2, fsdp=2, tensor=1, devices=devices)
    lowered, _ = plan.lower_step(cfg, mesh, batch=8, seq=64)
    (state, batch), _ = lowered.args_info
    optimizer = step_lib.make_optimizer(step_lib.lr_schedule(1e-3, 10))
    expected = jax.eval_shape(lambda p: step_lib.init_state(p, optimizer), lj.param_shapes(cfg))
    assert jax.tree.structure(state) == jax.tree.structure(expected)
    clip, (adam, decay, schedule) = state["opt_state"]
    assert isinstance(clip, optax.EmptyState) and isinstance(adam, optax.ScaleByAdamState)
    assert isinstance(decay, optax.MaskedState) and isinstance(schedule, optax.ScaleByScheduleState)
    assert all(a.donated for a in jax.tree.leaves(state)) and not any(a.donated for a in jax.tree.leaves(batch))
    assert {k: (a.shape, a.dtype) for k, a in batch.items()} == {
        k: ((8, 64), jnp.float32 if k == "weights" else jnp.int32) for k in step_lib.BATCH_KEYS}
    assert set(lowered.out_info[1]) == {"loss", "z_loss", "accuracy", "target_tokens", "grad_norm", "param_norm", "lr"}
    with pytest.raises(ValueError, match="must split into --grad-accum 3 microbatches each divisible by data x fsdp = 4"):
        plan.lower_step(cfg, mesh, batch=8, seq=64, grad_accum=3)

    # Unrolled layers, so XLA counts every layer: its FLOPs agree with the hand formula, and the
    # params per chip are exactly a quarter of the model (fp32).
    compiled, sizes = plan.compile_step(cfg, mesh, batch=8, seq=64)
    assert sizes["params"] == cfg.num_params() * 4 // 2  # fsdp=2 splits every leaf's embed axis
    assert sizes["optimizer"] == 2 * sizes["params"] + 8  # two fp32 moments + adam's and the schedule's int32 counts
    assert sizes["batch"] == 5 * 4 * 8 * 64 // 4  # five 4-byte arrays, rows split over data x fsdp = 4
    assert compiled.temp_bytes > 0 and compiled.peak_bytes > sizes["params"] + sizes["optimizer"]
    per_chip = flops.compiled_train_step_flops(cfg, 8, 64) / len(devices)
    assert per_chip <= compiled.xla_flops <= 1.1 * per_chip  # XLA adds elementwise/optimizer FLOPs
    # By hand: dim 64, 4 heads x 16, 2 kv heads, ffn 192, 2 layers, vocab 512, 8 x 64 tokens;
    # 4 passes per layer (fwd, 2x bwd, remat fwd), 3 for the output projection.
    layer = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 192) + 4 * 64 * 64
    assert flops.compiled_train_step_flops(cfg, 8, 64) == 8 * 64 * (2 * layer * 4 + 3 * 2 * 64 * 512)


def test_initialize_does_nothing_on_a_machine_without_tpus(monkeypatch):
    """Importing jax sets TPU_SKIP_MDS_QUERY on TPU-less machines; that must not look like a TPU VM."""
    from sharding.distributed import _on_tpu_vm

    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
    for name in ("TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert not _on_tpu_vm()
    initialize()  # returns at once: single-process JAX needs no set-up
    assert jax.process_count() == 1


def test_shard_params_refuses_a_wrong_model_or_mesh():
    params = lj.init_params(lj.LlamaConfig.preset("tiny-gqa"), 0)
    with pytest.raises(ValueError, match="do not match the config's parameter shapes"):
        shard_params(params, lj.LlamaConfig.preset("tiny"), make_mesh(data=-1))
    with pytest.raises(TypeError, match="needs a jax.sharding.Mesh"):
        shard_params(params, lj.LlamaConfig.preset("tiny-gqa"), None)
