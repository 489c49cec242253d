"""Attention: one function, `attend`, with an `implementation` switch.

"xla" is plain einsums (every backend, and the decode path); "cudnn" is cuDNN flash attention on
NVIDIA GPUs; "splash" is the Pallas splash kernel on TPUs. Grouped-query heads never repeat K/V
in memory: the query heads that share a kv head are grouped on their own axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.rules import active_mesh, logical_to_spec

Array = jax.Array


def attend(q: Array, k: Array, v: Array, mask: Array | None, causal: bool, implementation: str,
           segment_ids: Array | None = None) -> Array:
    """Scaled dot-product attention with grouped-query heads, behind one `implementation` switch.

    q: (B, T, H, hd); k, v: (B, S, KV, hd) with H a multiple of KV; query head h reads kv head
    h // (H // KV) (K/V are never repeated in memory). A query may attend to a key where all of
    these allow it: `causal` (key index <= query index), `segment_ids` (B, T) (same segment;
    needs S == T) and `mask` (B, T, S) booleans (True = may attend). Softmax in float32.

    "xla": the einsum path (any backend). "cudnn": cuDNN flash attention (NVIDIA GPUs, bf16/fp16).
    "splash": the Pallas splash kernel (TPUs). An explicit `mask` (the KV-cache path: a few query
    rows against the cache slots, bound by reading the cache) always takes the einsum path.
    Returns (B, T, H, hd) in q's dtype.
    """
    if mask is None and implementation == "cudnn":
        return _attend_dot_product(q, k, v, causal, segment_ids, implementation="cudnn")
    if mask is None and implementation == "splash":
        return _attend_splash(q, k, v, causal, segment_ids)
    b, t, h, hd = q.shape
    s, kv = k.shape[1], k.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd)  # group the query heads that share one kv head
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * hd**-0.5
    allowed = jnp.ones((b, t, s), bool) if mask is None else mask
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if causal:
        allowed = allowed & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None]
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


def _attend_dot_product(q: Array, k: Array, v: Array, causal: bool, segment_ids: Array | None,
                        implementation: str) -> Array:
    """jax.nn.dot_product_attention (GQA native). cuDNN has no segment-id input in this API, so
    segments go in as a boolean (B, 1, T, T) mask, which it adds as a bias: exact, but it reads
    B*T*T mask bytes per call; without segment_ids only the causal flag is passed."""
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention='cudnn' needs dtype bfloat16 or float16 (cuDNN flash attention), "
                         f"got {q.dtype}; use attention='xla' for float32")
    mask = None if segment_ids is None else (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=implementation)


def _attend_splash(q: Array, k: Array, v: Array, causal: bool, segment_ids: Array | None) -> Array:
    """Pallas splash attention (TPU). Under a mesh it runs per shard (shard_map): batch over the
    batch axes, query and kv heads over the same head axes, so each shard keeps whole GQA groups."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, h, hd = q.shape
    s, kv = k.shape[1], k.shape[2]
    if t != s or t % 128:
        raise ValueError(f"attention='splash' needs query and key lengths equal and a multiple of 128, "
                         f"got {t} and {s}; use attention='xla' for these shapes")
    block = next(size for size in (512, 256, 128) if t % size == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
    ids = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)

    def local(q, k, v, ids):  # one shard: q (b, T, h, hd) -> kernel layout (h, T, hd) per example
        full = masks.CausalMask((t, t)) if causal else masks.FullMask((t, t))
        kernel = splash.make_splash_mha(masks.MultiHeadMask([full] * q.shape[2]), block_sizes=sizes,
                                        head_shards=1, q_seq_shards=1)
        q = q * jnp.asarray(hd**-0.5, q.dtype)
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)
        out = jax.vmap(lambda q, k, v, i: kernel(q, k, v, splash.SegmentIds(q=i, kv=i)))(
            heads_first(q), heads_first(k), heads_first(v), ids)
        return heads_first(out)

    mesh = active_mesh()
    if mesh is None:
        return local(q, k, v, ids)
    q_spec = logical_to_spec(("act_batch", None, "act_heads", None), q.shape, mesh)
    kv_spec = logical_to_spec(("act_batch", None, "act_kv_heads", None), k.shape, mesh)
    if q_spec[2] != kv_spec[2]:
        raise ValueError(f"attention='splash' under mesh {dict(mesh.shape)}: query heads ({h}) and kv heads "
                         f"({kv}) must be split over the same mesh axes, got {q_spec[2]} and {kv_spec[2]}")
    ids_spec = P(q_spec[0], None)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, ids_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, ids)
