"""Context parallelism on 8 forced CPU devices: a `context` mesh axis splits every sequence, alone
and beside data / fsdp / tensor, and the logits, loss and gradients equal one device's for packed
and unpacked batches; attention (einsum and the splash kernel, interpreted) equals a float64 numpy
reference; the train step, the trainer's recipe key and the planner's --context take it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import llama_jax as lj
from llama_jax.attention import attend
from sharding import (balanced_order, from_balanced, make_mesh, param_shardings, parse_mesh, shard_params,
                      to_balanced)
from test_attention import causal_segments, qkv, reference, rel_err
from train.step import token_sums

CFG = lj.LlamaConfig.preset("tiny-gqa")  # 4 heads, 2 kv heads, vocab 512
B, T = 4, 32


def test_balanced_order_gives_every_shard_the_same_causal_work():
    # 16 tokens, 2 shards -> 4 chunks of 4: shard 0 holds chunks 0 and 3, shard 1 chunks 1 and 2 (by hand).
    order = balanced_order(16, 2)
    np.testing.assert_array_equal(order, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
    np.testing.assert_array_equal(balanced_order(6, 1), np.arange(6))
    for shards in (2, 4, 8):
        order = balanced_order(64, shards)
        assert sorted(order) == list(range(64))
        # a causal query at index i reads i + 1 keys: every shard's queries read the same number
        work = [(order[s * 64 // shards:(s + 1) * 64 // shards] + 1).sum() for s in range(shards)]
        assert len(set(work)) == 1
        x = np.arange(2 * 64 * 3).reshape(2, 64, 3)
        np.testing.assert_array_equal(to_balanced(jnp.asarray(x), shards), x[:, order])
        np.testing.assert_array_equal(from_balanced(to_balanced(jnp.asarray(x), shards), shards), x)


def _batches(seed=0):
    """A packed batch (3 documents per row, positions restart, a third of the tokens not targets) and an
    unpacked one (segment ids and positions left to the model's defaults)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    lengths = [10, 13, 9]
    packed = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
              "weights": (rng.random((B, T)) > 0.3).astype(np.float32),
              "segment_ids": np.repeat(np.array([[1, 2, 3]] * B), lengths, axis=1).astype(np.int32),
              "positions": np.tile(np.concatenate([np.arange(n) for n in lengths]), (B, 1)).astype(np.int32)}
    unpacked = {**packed, "segment_ids": None, "positions": None}
    return packed, unpacked


@jax.jit
def loss_logits_grads(params, packed, unpacked):
    """For both batches: the train step's token-sum loss, its gradients, and the model's logits."""
    out = {}
    for name, batch in (("packed", packed), ("unpacked", unpacked)):
        (loss, _), grads = jax.value_and_grad(lambda p: token_sums(p, batch, CFG, 1e-4), has_aux=True)(params)
        logits = lj.Llama(CFG).apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"])
        out[name] = (loss, logits, grads)
    return out


@functools.lru_cache(maxsize=None)
def single_device():
    params = lj.init_params(CFG, 0)
    return params, jax.device_get(loss_logits_grads(params, *_batches()))


def assert_rel_close(actual, expected, rel=1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    assert float(np.max(np.abs(actual - expected))) <= rel * max(float(np.max(np.abs(expected))), 1e-30)


@pytest.mark.parametrize("shape", [dict(data=4, context=2), dict(data=2, context=4), dict(context=8),
                                   dict(fsdp=2, context=2, tensor=2), dict(fsdp=2, context=4)],
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_context_parallel_equals_one_device(shape):
    params, want = single_device()
    mesh = make_mesh(**shape, cfg=CFG, batch=B, seq=T)
    sharded = shard_params(params, CFG, mesh)
    with jax.set_mesh(mesh):
        got = loss_logits_grads(sharded, *_batches())
    for name in ("packed", "unpacked"):
        (loss, logits, grads), (loss_ref, logits_ref, grads_ref) = got[name], want[name]
        # It ran split: the logits' sequence axis is over `context`, in natural order (compared below).
        assert logits.sharding.spec[1] == "context"
        assert abs(float(loss) - float(loss_ref)) <= 1e-5 * abs(float(loss_ref))
        assert_rel_close(logits, logits_ref)
        jax.tree.map(assert_rel_close, grads, grads_ref)


def test_context_splits_parameters_like_fsdp():
    """The rules by hand: `embed` goes over fsdp then context, so the context devices do not each hold
    a whole copy; heads / kv heads / mlp / vocab over tensor."""
    mesh = make_mesh(fsdp=2, context=2, tensor=2)
    specs = param_shardings(CFG, mesh)
    embed = ("fsdp", "context")
    assert specs["layers"]["attention"]["wq"].spec == P(None, embed, "tensor", None)
    assert specs["layers"]["attention"]["wo"].spec == P(None, "tensor", None, embed)
    assert specs["layers"]["feed_forward"]["w2"].spec == P(None, "tensor", embed)
    assert specs["tok_embeddings"].spec == P("tensor", embed)
    assert specs["norm"]["weight"].spec == P(embed)


@pytest.mark.parametrize("implementation", ["xla", "splash"])
def test_attention_under_context_equals_numpy(implementation, monkeypatch):
    """attend on sequences in the load-balanced order of 2 context shards (x 2 tensor shards), packed
    segments, GQA: back in natural order it is the float64 numpy reference; gradients equal the
    one-device einsum path's. Splash runs the real Pallas kernel, interpreted on the CPU."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    monkeypatch.setattr(splash, "make_splash_mha", functools.partial(splash.make_splash_mha, interpret=True))
    t = 256  # splash: 128 queries per shard
    q, k, v = qkv(3, 2, t, t, 4, 2, 32)
    ids = jnp.asarray(np.repeat([[0, 1, 2], [5, 5, 5]], [100, 90, 66], axis=1), jnp.int32)
    w = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)
    c = 2

    def loss(q, k, v):  # natural order in and out; the shards see the balanced order
        out = attend(*(to_balanced(x, c) for x in (q, k, v)), None, True, implementation,
                     segment_ids=to_balanced(ids, c), context_shards=c)
        out = from_balanced(out, c)
        return jnp.sum(out * w), out

    mesh = make_mesh(data=2, context=2, tensor=2)
    with jax.set_mesh(mesh):
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert rel_err(out, reference(q, k, v, causal_segments(ids))) < 1e-5
    expected = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, None, True, "xla", segment_ids=ids) * w),
                        argnums=(0, 1, 2))(q, k, v)
    for g, e in zip(grads, expected):
        assert rel_err(g, e) < 1e-5


def test_train_step_with_context_equals_one_device():
    """The trainer's compiled step (state shardings, donation, 2 microbatches) on fsdp 2 x context 2 x
    tensor 2 gives the one-device run's parameters and metrics after two steps."""
    from test_train_step import assert_same_training, big_batch_reference, make_batch, run_steps

    params, want = big_batch_reference()
    got = run_steps(params, [make_batch(5), make_batch(6)], make_mesh(fsdp=2, context=2, tensor=2), grad_accum=2)
    assert_same_training(got, want, rtol=1e-5, atol=1e-6)


def test_context_mesh_errors_and_parsing():
    assert parse_mesh("fsdp=2,context=4") == {"fsdp": 2, "context": 4}
    assert dict(make_mesh(fsdp=2, context=4).shape) == {"data": 1, "fsdp": 2, "context": 4, "tensor": 1}
    with pytest.raises(ValueError, match="sequence length 36 is not divisible by 2 x context = 8"):
        make_mesh(data=2, context=4, seq=36)
    with pytest.raises(ValueError, match="attention='cudnn' does not run under a context mesh axis"):
        attend(*qkv(0, 1, 8, 8, 2, 2, 8, jnp.bfloat16), None, True, "cudnn", context_shards=2)
    from train.config import load_config

    with pytest.raises(ValueError, match="mesh.context must be -1 \\(fill\\) or >= 1, got 0"):
        load_config("configs/demo.yaml", ["mesh.context=0"])


def test_context_across_slices_on_a_two_slice_topology():
    """dcn_context (a hybrid mesh over slices, libtpu's compile-only devices of two v5p-8 slices): the
    context axis joins 4 chips of each slice; dcn_data keeps each slice one data replica instead."""
    pytest.importorskip("libtpu", reason="libtpu is not installed: no compile-only TPU devices")
    import os

    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1", chip_config_name="megacore",
                                           chips_per_host_bounds=(2, 2, 1), num_slices=2).devices
    slice_of = np.vectorize(lambda d: d.slice_index)
    mesh = make_mesh(data=1, context=4, dcn_context=2, devices=devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "context": 8, "tensor": 1}
    np.testing.assert_array_equal(slice_of(mesh.devices).reshape(8), [0, 0, 0, 0, 1, 1, 1, 1])
    mesh = make_mesh(data=1, context=4, dcn_data=2, devices=devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}
    np.testing.assert_array_equal(slice_of(mesh.devices).reshape(2, 4), [[0] * 4, [1] * 4])
