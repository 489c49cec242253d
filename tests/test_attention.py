"""Attention implementations against an independent float64 numpy reference.

The reference loops over query heads and maps head h to kv head h // (H // KV) explicitly, so
a wrong GQA grouping, scale, causal or segment mask shows up as a large relative error.
"""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llama_jax.config import LlamaConfig
from llama_jax.attention import attend


def reference(q, k, v, allowed):
    """float64 softmax(q k^T / sqrt(hd)) v per query head; allowed: (B, T, S) bool."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, hd = q.shape
    group = h // k.shape[2]
    out = np.zeros_like(q)
    for head in range(h):
        kh, vh = k[:, :, head // group], v[:, :, head // group]  # (B, S, hd)
        scores = np.einsum("btd,bsd->bts", q[:, :, head], kh) / np.sqrt(hd)
        scores = np.where(allowed, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, :, head] = np.einsum("bts,bsd->btd", p / p.sum(-1, keepdims=True), vh)
    return out


def causal_segments(segment_ids):
    ids = np.asarray(segment_ids)
    t = ids.shape[1]
    return (ids[:, :, None] == ids[:, None, :]) & np.tril(np.ones((t, t), bool))[None]


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all()
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def qkv(seed, b, t, s, h, kv, hd, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    return (jnp.asarray(r.standard_normal((b, t, h, hd)), dtype), jnp.asarray(r.standard_normal((b, s, kv, hd)), dtype),
            jnp.asarray(r.standard_normal((b, s, kv, hd)), dtype))


SEGMENTS = np.array([[0] * 5 + [1] * 7 + [2] * 4, [3] * 16])  # a packed row and a plain row (T=16)


@pytest.mark.parametrize("h,kv", [(4, 4), (8, 2)])
def test_xla_matches_reference_with_gqa_and_segments(h, kv):
    q, k, v = qkv(h, 2, 16, 16, h, kv, 8)
    out = attend(q, k, v, None, causal=True, implementation="xla", segment_ids=jnp.asarray(SEGMENTS))
    assert rel_err(out, reference(q, k, v, causal_segments(SEGMENTS))) < 1e-5
    plain = attend(q, k, v, None, causal=True, implementation="xla")
    assert rel_err(plain, reference(q, k, v, causal_segments(np.zeros_like(SEGMENTS)))) < 1e-5


def test_xla_explicit_mask_over_cache_slots():
    """The decode path: 3 new queries at positions 5..7 against 10 cache slots."""
    q, k, v = qkv(1, 2, 3, 10, 8, 2, 8)
    positions = np.array([[5, 6, 7], [2, 3, 4]])
    allowed = np.arange(10)[None, None, :] <= positions[:, :, None]
    for implementation in ("xla", "cudnn", "splash"):  # an explicit mask always takes the einsum path
        out = attend(q, k, v, jnp.asarray(allowed), causal=False, implementation=implementation)
        assert rel_err(out, reference(q, k, v, allowed)) < 1e-5


def test_cudnn_path_call_on_cpu(monkeypatch):
    """What a CPU can check of the cuDNN path (cuDNN's kernel itself needs an NVIDIA GPU; its numerics
    are checked there by bench/attention.py in bench/gpu.sh, against float32 XLA attention):
    attend(implementation="cudnn") calls jax.nn.dot_product_attention with implementation="cudnn",
    grouped K/V not repeated, the causal flag and the segment mask; those exact arguments, run here by
    XLA's implementation of the same function, give the float64 reference: bf16 inputs measure 1.8e-3
    (a dropped segment mask: 0.55), so the bound is 1e-2."""
    calls = []
    xla = jax.nn.dot_product_attention

    def on_cpu(q, k, v, *, implementation, **kwargs):
        calls.append((implementation, q.shape, k.shape, kwargs["is_causal"]))
        return xla(q, k, v, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", on_cpu)
    q, k, v = qkv(2, 2, 16, 16, 8, 2, 8, jnp.bfloat16)
    out = attend(q, k, v, None, causal=True, implementation="cudnn", segment_ids=jnp.asarray(SEGMENTS))
    assert calls == [("cudnn", (2, 16, 8, 8), (2, 16, 2, 8), True)]
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, reference(q, k, v, causal_segments(SEGMENTS))) < 1e-2


def test_cudnn_refuses_float32_with_a_clear_error():
    q, k, v = qkv(3, 1, 16, 16, 4, 2, 8)
    with pytest.raises(ValueError, match="cudnn.*bfloat16.*float32"):
        attend(q, k, v, None, causal=True, implementation="cudnn")


def test_config_attention_switch():
    assert LlamaConfig.preset("tiny", attention="splash").attention == "splash"
    with pytest.raises(ValueError, match="attention 'flash' is not one of .*xla.*cudnn.*splash"):
        LlamaConfig.preset("tiny", attention="flash")


def test_splash_refuses_short_sequences():
    q, k, v = qkv(4, 1, 16, 16, 4, 2, 8)
    with pytest.raises(ValueError, match="splash.*multiple of 128"):
        attend(q, k, v, None, causal=True, implementation="splash")


def test_splash_kernel_numerics_in_interpret_mode(monkeypatch):
    """The real Pallas splash kernel, interpreted on the CPU: our layout, scale, GQA and segment ids
    around it must give the reference output and the reference gradients (of sum(out * w))."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    monkeypatch.setattr(splash, "make_splash_mha", functools.partial(splash.make_splash_mha, interpret=True))
    q, k, v = qkv(5, 2, 128, 128, 4, 2, 32)
    ids = jnp.asarray(np.repeat([[0, 1], [4, 4]], [50, 78], axis=1))
    w = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape), jnp.float32)
    loss = lambda impl: lambda q, k, v: jnp.sum(attend(q, k, v, None, True, impl, segment_ids=ids) * w)
    out = jax.jit(lambda q, k, v: attend(q, k, v, None, True, "splash", segment_ids=ids))(q, k, v)
    assert rel_err(out, reference(q, k, v, causal_segments(ids))) < 1e-5
    grads = jax.jit(jax.grad(loss("splash"), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)  # xla is checked against numpy above
    for g, e in zip(grads, expected):
        assert rel_err(g, e) < 1e-5


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install libtpu)")
def test_splash_compiles_for_a_tpu_topology():
    """Ahead-of-time compile (no TPU needed) of splash fwd+bwd for a v5e 2x2 slice: on one chip and
    sharded data=2 x tensor=2 through shard_map; the Pallas kernels must be in the TPU program."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lock
    from jax.experimental import topologies

    devices = np.array(topologies.get_topology_desc("v5e:2x2", "tpu").devices)
    b, t, h, kv, hd = 4, 512, 8, 2, 128
    loss = lambda q, k, v, ids: attend(q, k, v, None, True, "splash", segment_ids=ids).astype(jnp.float32).sum()
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    for shape, batch, heads in [((1, 1, 1), None, None), ((2, 1, 2), "data", "tensor")]:
        mesh = Mesh(devices[: int(np.prod(shape))].reshape(shape), ("data", "fsdp", "tensor"))
        spec = lambda dims, s: jax.ShapeDtypeStruct(dims, jnp.bfloat16 if len(dims) == 4 else jnp.int32,
                                                    sharding=NamedSharding(mesh, s))
        args = (spec((b, t, h, hd), P(batch, None, heads, None)), spec((b, t, kv, hd), P(batch, None, heads, None)),
                spec((b, t, kv, hd), P(batch, None, heads, None)), spec((b, t), P(batch, None)))
        with jax.set_mesh(mesh):
            compiled = step.lower(*args).compile()
        assert compiled.as_text().count("tpu_custom_call") == 2  # forward kernel + fused backward kernel
        dq_sharding = jax.tree.leaves(compiled.output_shardings)[1]
        assert dq_sharding.spec == P(batch, None, heads, None)


def test_model_routes_segment_ids_to_splash(monkeypatch):
    """The whole tiny GQA model with attention="splash" (kernel interpreted on the CPU) and packed
    segment ids gives the logits of the checked einsum path: Attention passes segments through."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    import llama_jax as lj

    monkeypatch.setattr(splash, "make_splash_mha", functools.partial(splash.make_splash_mha, interpret=True))
    cfg = LlamaConfig.preset("tiny-gqa")
    params = lj.init_params(cfg, 0)
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, cfg.vocab_size, (1, 128)), jnp.int32)
    ids = jnp.asarray(np.repeat([[0, 1, 2]], [40, 60, 28], axis=1), jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(40), np.arange(60), np.arange(28)])[None], jnp.int32)
    want = lj.forward(params, tokens, cfg, positions, ids)
    got = lj.forward(params, tokens, cfg.replace(attention="splash"), positions, ids)
    assert rel_err(got, want) < 1e-5
