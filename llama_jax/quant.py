"""Weight-only quantised projections: int8 (per-output-channel absmax) and nf4 (QLoRA's 4-bit NormalFloat).

A quantised weight takes the place of a projection's float array in the params tree (same path,
same name), so `forward`, `generate`, the continuous batcher and the train step take such params
unchanged: the model multiplies by each weight inside its projection (`matmul`, called by `project`
in llama_jax/model.py), one layer at a time under the layer scan, so no full-precision copy of the
model is ever made.

    params = quantize_params(params, cfg, "nf4")        # or "int8"; embeddings, norms, output stay float
    logits = lj.forward(params, tokens, cfg)
    cfg, params = lj.load_checkpoint(path, quantize="nf4")   # quantised layer by layer while loading

Formats (a weight is (*in, *out): the matmul contracts its `in` axes, layout.Entry.n_in of them):
- int8: values = round(w / s) in [-127, 127] with s = max|w| / 127 over the input axes, one float32
  s per output channel (LLM.int8()'s weight scaling without its outlier split).
- nf4: the input axes flattened, cut into blocks of 64 (the same blocks as bitsandbytes' (out, in)
  rows); each block is divided by its absmax and every value replaced by the index of the nearest
  of the 16 NormalFloat values (`NF4_CODE`, the QLoRA paper's Appendix E construction), two
  indices per byte. Double quantisation (optional) stores the absmax as uint8 between its
  per-output-channel min and max (two float32 per channel): 0.5 -> 0.13 bits per weight of scale
  (the paper uses 8-bit floats in blocks of 256; this keeps the scales sharded like the weight).
Every array keeps the logical axes of the weight it came from, so quantised params shard like
float ones (`layout_of`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from statistics import NormalDist
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import layout
from llama_jax.config import PROJECTIONS, LlamaConfig
from sharding import param_layout, tree_shardings

Array = jax.Array
FORMATS = ("int8", "nf4")
NF4_BLOCK = 64


def nf4_code() -> np.ndarray:
    """The 16 NormalFloat4 values, built as the QLoRA paper (and bitsandbytes' create_normal_map) does:
    normal quantiles at 8 evenly spaced probabilities from `offset` to 1/2 for the positive half and 7
    for the negative half, plus an exact zero, scaled into [-1, 1]. The spacing and the scaling use
    float32 arithmetic like bitsandbytes' torch code, which makes the table bit-identical to theirs."""
    offset = 0.9677083  # the paper's (1 - 1/(2*15) + 1 - 1/(2*16)) / 2

    def linspace32(n: int) -> list[float]:  # torch.linspace's float32 steps, from both ends
        start, stop = np.float32(offset), np.float32(0.5)
        step = (stop - start) / np.float32(n - 1)
        return [float(start + step * np.float32(i) if i < n // 2 else stop - step * np.float32(n - 1 - i))
                for i in range(n)]

    ppf = NormalDist().inv_cdf
    positive = [ppf(p) for p in linspace32(9)[:-1]]
    negative = [-ppf(p) for p in linspace32(8)[:-1]]
    values = np.sort(np.array(positive + [0.0] + negative, np.float32))
    return values / values.max()


NF4_CODE = nf4_code()
_NF4_MIDPOINTS = [float(m) for m in (NF4_CODE[1:] + NF4_CODE[:-1]) / 2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """w ~= values * scale."""

    values: Array  # int8, w's shape (*in, *out)
    scale: Array  # float32, (1,) * n_in + out shape: absmax / 127 per output channel


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NF4Weight:
    """w ~= NF4_CODE[index] * absmax per block of 64 input values."""

    codes: Array  # uint8 (in/64, 32, *out): block element j's index in the low nibble, j + 32's in the high
    absmax: Array  # (in/64, 1, *out): float32, or uint8 steps above absmax_min when double-quantised
    absmax_min: Array | None  # float32 (1, 1, *out) when double-quantised, else None
    absmax_step: Array | None  # float32 (1, 1, *out) when double-quantised, else None
    in_shape: tuple = dataclasses.field(metadata=dict(static=True))  # the weight's input axes, e.g. (heads, head_dim)


QUANTIZED = (Int8Weight, NF4Weight)


def check_format(fmt: Any, what: str = "quantize") -> None:
    """Raise ValueError naming `what` (a keyword or a flag) unless `fmt` is one of FORMATS."""
    if fmt not in FORMATS:
        raise ValueError(f"{what} {fmt!r} is not one of {', '.join(FORMATS)}")


def quantize(w: Array, n_in: int, fmt: str, double_quant: bool = False) -> Int8Weight | NF4Weight:
    """Quantise one weight (*in, *out) whose first `n_in` axes are the matmul's input."""
    w = jnp.asarray(w, jnp.float32)
    if fmt == "int8":
        absmax = jnp.max(jnp.abs(w), axis=tuple(range(n_in)), keepdims=True)
        scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
        return Int8Weight(jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale)
    check_format(fmt)
    in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    n = math.prod(in_shape)
    if n % NF4_BLOCK:
        raise ValueError(f"nf4 needs the input size ({n}, of a weight shaped {w.shape}) to be a multiple of "
                         f"{NF4_BLOCK}")
    blocks = w.reshape(n // NF4_BLOCK, NF4_BLOCK, *out_shape)
    absmax = jnp.max(jnp.abs(blocks), axis=1, keepdims=True)
    normed = blocks / jnp.where(absmax > 0, absmax, 1.0)
    index = sum((normed > m).astype(jnp.uint8) for m in _NF4_MIDPOINTS)  # nearest code, without a 16x temporary
    half = NF4_BLOCK // 2
    codes = index[:, :half] | (index[:, half:] << 4)
    low = step = None
    if double_quant:
        low, high = jnp.min(absmax, axis=0, keepdims=True), jnp.max(absmax, axis=0, keepdims=True)
        step = jnp.where(high > low, (high - low) / 255.0, 1.0)
        absmax = jnp.round((absmax - low) / step).astype(jnp.uint8)
    return NF4Weight(codes, absmax, low, step, tuple(in_shape))


def dequantize(w: Int8Weight | NF4Weight, dtype: Any = jnp.float32) -> Array:
    """The float weight (*in, *out) a quantised one stands for (computed in float32, returned in `dtype`)."""
    if isinstance(w, Int8Weight):
        return (w.values.astype(jnp.float32) * w.scale).astype(dtype)
    absmax = w.absmax.astype(jnp.float32)
    if w.absmax_min is not None:
        absmax = w.absmax_min + absmax * w.absmax_step
    index = jnp.concatenate([w.codes & 15, w.codes >> 4], axis=1)
    values = _nf4_value(index) * absmax
    out_shape = w.codes.shape[2:]
    return values.reshape(*w.in_shape, *out_shape).astype(dtype)


def matmul(x: Array, w: Int8Weight | NF4Weight, n_in: int, dtype: Any) -> Array:
    """x (..., *in) @ the weight w (*in, *out) stands for, computed in `dtype`.

    int8: the int8 values themselves are the matmul's operand (exact in bf16: integers up to 256)
    and the per-output-channel scale multiplies the product (x @ (v * s) = (x @ v) * s), as
    gpt-fast's int8 decoding does: the weight is read once as int8 and no scaled float copy of it is
    made. nf4: its scales vary along the input axis, so the weight is dequantised first.
    """
    if isinstance(w, Int8Weight):
        y = jnp.tensordot(x, w.values.astype(dtype), n_in)
        return (y.astype(jnp.float32) * w.scale.reshape(w.scale.shape[n_in:])).astype(dtype)
    return jnp.tensordot(x, dequantize(w, dtype), n_in)


def _nf4_value(index: Array) -> Array:
    """NF4_CODE[index] as a tree of 15 selects on the index's bits: elementwise, so it fuses into the
    matmul's operand (a 16-entry table lookup compiles to a per-element gather, slow on TPUs)."""
    values = [jnp.float32(v) for v in NF4_CODE]
    for bit in range(4):
        high = ((index >> bit) & 1) == 1
        values = [jnp.where(high, values[2 * i + 1], values[2 * i]) for i in range(len(values) // 2)]
    return values[0]


_PROJECTION_PATHS = {layout.projection(name).path: layout.projection(name).n_in for name in PROJECTIONS}


def _map_projections(fn, tree: Any, *others: Any) -> Any:
    """`tree` (nested dicts) with fn(leaf, n_in, *other leaves) in place of each projection weight
    (stacked over layers); `others` are trees of the same structure (e.g. the shapes beside axes)."""
    def visit(path: tuple[str, ...], node: Any, *rest: Any) -> Any:
        if isinstance(node, dict):
            return {k: visit((*path, k), v, *(r[k] for r in rest)) for k, v in node.items()}
        return fn(node, _PROJECTION_PATHS[path], *rest) if path in _PROJECTION_PATHS else node

    return visit((), tree, *others)


def is_quantized(w: Any) -> bool:
    """Whether a weight is held quantised (int8 or nf4) rather than as a float array."""
    return isinstance(w, QUANTIZED)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def quantize_layers(w: Array, n_in: int, fmt: str, double_quant: bool = False) -> Int8Weight | NF4Weight:
    """`quantize` of each layer of a stacked (layers, *in, *out) weight (or of one layer's slice, vmapped
    over a leading axis of 1), jit-compiled."""
    return jax.vmap(quantize, in_axes=(0, None, None, None))(w, n_in, fmt, double_quant)


def dequantize_layers(w: Int8Weight | NF4Weight, dtype: Any = jnp.float32) -> Array:
    """`dequantize` of each layer of a stacked quantised weight (what `quantize_layers` returns)."""
    return jax.vmap(dequantize, in_axes=(0, None))(w, dtype)


def quantize_params(params: Any, cfg: LlamaConfig, fmt: str, double_quant: bool = False,
                    mesh: jax.sharding.Mesh | None = None) -> Any:
    """`params` with the seven projections quantised; embeddings, norms, output and adapters unchanged.

    Each weight is quantised where it lives (sharded params: shard by shard). With `mesh`, every
    leaf is then placed by the logical-axis rules of the quantised layout (`layout_of`)."""
    check_format(fmt)

    def one(w: Any, n_in: int) -> Any:
        if is_quantized(w):
            raise ValueError(f"the params are already quantised ({type(w).__name__}); pass float params")
        return quantize_layers(w, n_in, fmt, double_quant)

    out = _map_projections(one, params)
    if mesh is not None:
        out = jax.device_put(out, tree_shardings(*layout_of(*param_layout(cfg), fmt, double_quant), mesh))
    return out


def layout_of(axes: Any, shapes: Any, fmt: str, double_quant: bool = False) -> tuple[Any, Any]:
    """(logical axes, shapes) of params quantised by `quantize_params`, from the float params' own.

    Every array of a quantised weight keeps its weight's axis names (nf4's block axis takes the first
    input axis' name, the within-block axis is unsharded), so quantised params shard like float ones.
    """
    shapes = jax.eval_shape(
        lambda p: _map_projections(lambda w, n_in: quantize_layers(w, n_in, fmt, double_quant), p), shapes)

    def names(w_axes: tuple, n_in: int, shape: Any) -> Any:
        if fmt == "int8":
            return Int8Weight(w_axes, w_axes)
        lead, ins, outs = w_axes[:1], w_axes[1:1 + n_in], w_axes[1 + n_in:]
        blocked = (*lead, ins[0], None, *outs)
        extra = blocked if double_quant else None
        return NF4Weight(blocked, blocked, extra, extra, shape.in_shape)

    return _map_projections(names, axes, shapes), shapes
