"""Attention: one function, `attend`, with an `implementation` switch.

"xla" is plain einsums (every backend, and the decode path); "cudnn" is cuDNN flash attention on
NVIDIA GPUs; "splash" is the Pallas splash kernel on TPUs. Grouped-query heads never repeat K/V
in memory: the query heads that share a kv head are grouped on their own axis.

Context parallelism (a `context` mesh axis, sharding/context.py) splits the sequence of q, k and v
in causal load-balanced order. Each shard keeps its queries and all-gathers K/V (put back in natural
order), then masks by the queries' original indices: the Llama 3 paper's all-gather scheme. Picked
over ring attention by measurement (bench/context.py, docs/guides/long-context.md): with grouped-query
heads K/V are 4-8x smaller than Q, and a layer's gather needs 4-33 GB/s to keep pace with its attention
at a v5p's peak (its links carry 1,200 GB/s), so a ring's overlap has almost nothing to win; one
gathered attention serves the einsum path, the splash kernel and packed (segment-masked) sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sharding.context import balanced_order, from_balanced
from sharding.rules import active_mesh, constrain, logical_to_spec

Array = jax.Array
KV_GATHERED = ("act_batch", None, "act_kv_heads", None)  # K/V under context parallelism: the whole sequence


def attend(q: Array, k: Array, v: Array, mask: Array | None, causal: bool, implementation: str,
           segment_ids: Array | None = None, context_shards: int = 1) -> Array:
    """Scaled dot-product attention with grouped-query heads, behind one `implementation` switch.

    q: (B, T, H, hd); k, v: (B, S, KV, hd) with H a multiple of KV; query head h reads kv head
    h // (H // KV) (K/V are never repeated in memory). A query may attend to a key where all of
    these allow it: `causal` (key index <= query index), `segment_ids` (B, T) (same segment;
    needs S == T) and `mask` (B, T, S) booleans (True = may attend). Softmax in float32.
    `context_shards` c > 1: the sequence axis of q, k, v and segment_ids is in the load-balanced
    order of c context shards (sharding/context.py); K/V are all-gathered over `context` here.

    "xla": the einsum path (any backend). "cudnn": cuDNN flash attention (NVIDIA GPUs, bf16/fp16).
    "splash": the Pallas splash kernel (TPUs). An explicit `mask` (the KV-cache path: a few query
    rows against the cache slots, bound by reading the cache) always takes the einsum path.
    Returns (B, T, H, hd) in q's dtype (and q's order).
    """
    kv_segment_ids = segment_ids
    if context_shards > 1:  # every query shard reads every key: gather K/V, back in natural order
        k, v = (from_balanced(constrain(x, KV_GATHERED), context_shards) for x in (k, v))
        kv_segment_ids = None if segment_ids is None else from_balanced(segment_ids, context_shards)
    if mask is None and implementation == "cudnn":
        if context_shards > 1:
            raise ValueError("attention='cudnn' does not run under a context mesh axis (its causal mask is by "
                             "position in the shard); use attention='xla' or 'splash'")
        return _attend_dot_product(q, k, v, causal, segment_ids, implementation="cudnn")
    if mask is None and implementation == "splash":
        return _attend_splash(q, k, v, causal, segment_ids, kv_segment_ids, context_shards)
    b, t, h, hd = q.shape
    s, kv = k.shape[1], k.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd)  # group the query heads that share one kv head
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * hd**-0.5
    allowed = jnp.ones((b, t, s), bool) if mask is None else mask
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    if causal:  # by each query's index in the whole sequence
        query_index = jnp.asarray(balanced_order(t, context_shards))
        allowed = allowed & (jnp.arange(s)[None, :] <= query_index[:, None])[None]
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


def _attend_splash(q: Array, k: Array, v: Array, causal: bool, segment_ids: Array | None,
                   kv_segment_ids: Array | None, context_shards: int) -> Array:
    """Pallas splash attention (TPU). Under a mesh it runs per shard (shard_map): batch over the
    batch axes, query and kv heads over the same head axes, so each shard keeps whole GQA groups, and
    with context parallelism the queries over `context` (their original indices are the causal
    mask's `q_sequence`; every shard holds all of K/V)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, h, hd = q.shape
    s, kv = k.shape[1], k.shape[2]
    if t != s or t % (128 * context_shards):
        raise ValueError(f"attention='splash' needs query and key lengths equal and a multiple of 128 x the context "
                         f"shards ({context_shards}), got {t} and {s}; use attention='xla' for these shapes")
    block = next(size for size in (512, 256, 128) if (t // context_shards) % size == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
    q_ids = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    kv_ids = jnp.zeros((b, t), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    if causal:
        full = masks.CausalMask((t, t))
        full.q_sequence = balanced_order(t, context_shards).astype(np.int32)  # the query rows' original indices
    else:
        full = masks.FullMask((t, t))

    mesh = active_mesh()
    q_names = ("act_batch", "act_seq" if context_shards > 1 else None, "act_heads", None)
    q_spec = P() if mesh is None else logical_to_spec(q_names, q.shape, mesh)
    kv_spec = P() if mesh is None else logical_to_spec(KV_GATHERED, k.shape, mesh)
    head_axes = () if mesh is None or q_spec[2] is None else np.atleast_1d(q_spec[2])
    kernel = splash.make_splash_mha(masks.MultiHeadMask([full] * h), block_sizes=sizes,
                                    head_shards=int(np.prod([mesh.shape[a] for a in head_axes])),
                                    q_seq_shards=context_shards)

    def local(kernel, q, k, v, q_ids, kv_ids):  # one shard: q (b, T, h, hd) -> kernel layout (h, T, hd) per example
        q = q * jnp.asarray(hd**-0.5, q.dtype)
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)
        out = jax.vmap(lambda q, k, v, qi, ki: kernel(q, k, v, splash.SegmentIds(q=qi, kv=ki)))(
            heads_first(q), heads_first(k), heads_first(v), q_ids, kv_ids)
        return heads_first(out)

    if mesh is None:
        return local(kernel, q, k, v, q_ids, kv_ids)
    if q_spec[2] != kv_spec[2]:
        raise ValueError(f"attention='splash' under mesh {dict(mesh.shape)}: query heads ({h}) and kv heads "
                         f"({kv}) must be split over the same mesh axes, got {q_spec[2]} and {kv_spec[2]}")
    kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, P(q_spec[2], q_spec[1])))
    return jax.shard_map(local, mesh=mesh, in_specs=(kernel_spec, q_spec, kv_spec, kv_spec, P(*q_spec[:2]),
                                                     P(kv_spec[0], None)),
                         out_specs=q_spec, check_vma=False)(kernel, q, k, v, q_ids, kv_ids)
