"""LoRA adapters as params: telling them from the base, creating them, merging them, and PEFT's format.

With `cfg.lora_rank > 0` the model (llama_jax/model.py `project`) holds two more arrays beside
each targeted projection W (*in, *out), stacked over layers like it: `{W}_lora_a` (*in, rank),
Kaiming-uniform like PEFT, and `{W}_lora_b` (rank, *out), zero at the start; the projection
computes x W + (alpha / rank) * dropout(x) A B. So a LoRA model's params are the base params plus
adapters (`split` / `combine` move between the two), and `forward`/`generate` run them unmerged;
`merge` folds the adapters into the base for a plain model.

PEFT stores the same matrices in torch's (out, in) Linear layout: lora_A.weight (rank, in) = A
flattened over its input axes and transposed, lora_B.weight (out, rank) likewise for B (our
flattening of (heads, head_dim) is HF's row order, see llama_jax/layout.py), under the HF module
names of layout.TABLE.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import layout, quant
from llama_jax.config import PROJECTIONS, LlamaConfig
from llama_jax.model import _init, param_axes, param_shapes
from sharding import active_mesh, tree_shardings

SUFFIXES = ("_lora_a", "_lora_b")


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA adapter's (`{W}_lora_a` / `{W}_lora_b`)."""
    return name.endswith(SUFFIXES)


def split(tree: Any) -> tuple[Any, Any]:
    """(base, adapters) of a params-shaped tree of nested dicts (params, shapes, axes, shardings...)."""
    base, adapters = {}, {}
    for key, value in tree.items():
        if isinstance(value, dict):
            b, a = split(value)
            if b:
                base[key] = b
            if a:
                adapters[key] = a
        elif is_adapter(key):
            adapters[key] = value
        else:
            base[key] = value
    return base, adapters


def combine(base: Any, adapters: Any) -> Any:
    """The union of two disjoint trees of nested dicts (the inverse of `split`)."""
    out = dict(base)
    for key, value in adapters.items():
        out[key] = combine(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def without_lora(cfg: LlamaConfig) -> LlamaConfig:
    """The plain model of a LoRA config (every lora_* field at its default)."""
    return cfg.replace(**{f: LlamaConfig.__dataclass_fields__[f].default
                          for f in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")})


def adapter_layout(cfg: LlamaConfig) -> tuple[Any, Any]:
    """(logical axes, shapes) of a LoRA config's adapters."""
    return split(param_axes(cfg))[1], split(param_shapes(cfg))[1]


def base_layout(cfg: LlamaConfig, base_dtype: str) -> tuple[Any, Any]:
    """(logical axes, shapes) of a LoRA model's frozen base stored as bfloat16 | float32 | int8 | nf4
    (as lj.load_checkpoint(path, dtype=...) or (..., quantize=...) loads it)."""
    float_dtype = base_dtype if base_dtype in ("bfloat16", "float32") else "bfloat16"
    plain = without_lora(cfg).replace(param_dtype=float_dtype)
    axes, shapes = param_axes(plain), param_shapes(plain)
    if base_dtype in quant.FORMATS:
        return quant.layout_of(axes, shapes, base_dtype)
    if base_dtype != float_dtype:
        raise ValueError(f"base dtype {base_dtype!r} is not one of bfloat16, float32, {', '.join(quant.FORMATS)}")
    return axes, shapes


def adapter_count(cfg: LlamaConfig) -> int:
    """Number of adapter parameters (the trainable ones of a LoRA run)."""
    return sum(math.prod(s.shape) for s in jax.tree.leaves(adapter_layout(cfg)[1]))


def init_adapters(cfg: LlamaConfig, rng: jax.Array | int = 0) -> Any:
    """Fresh adapters (A Kaiming-uniform, B zero) for a LoRA config, born sharded under an active mesh.

    Traces the whole model's init, but only the adapters are computed (XLA drops the rest).
    """
    if not cfg.lora_rank:
        raise ValueError("init_adapters needs a config with lora_rank > 0")
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    mesh = active_mesh()
    out_shardings = None if mesh is None else tree_shardings(*adapter_layout(cfg), mesh)
    return jax.jit(lambda key: split(_init(cfg, key))[1], out_shardings=out_shardings)(rng)


def delta(w_shape: tuple, a: Any, b: Any, scale: float) -> Any:
    """scale * A B in the weight's layout (numpy or jax arrays; any leading layer axes)."""
    lead = a.ndim + b.ndim - len(w_shape) - 2
    rank = a.shape[-1]
    product = a.reshape(*a.shape[:lead], -1, rank) @ b.reshape(*b.shape[:lead], rank, -1)
    return (scale * product).reshape(w_shape)


def merge(params: Any, cfg: LlamaConfig, dtype: Any = None) -> tuple[LlamaConfig, Any]:
    """(plain config, params) with every adapter folded into its weight: W + (alpha / rank) A B.

    Sums in float32; each merged weight keeps its base dtype unless `dtype` is given. A quantised
    base weight is dequantised first (a QLoRA model merges into the nf4/int8-rounded weights).
    """
    base, adapters = split(params)

    @jax.jit
    def fold(w: Any, a: jax.Array, b: jax.Array) -> jax.Array:
        out_dtype = dtype or (jnp.float32 if quant.is_quantized(w) else w.dtype)
        w32 = quant.dequantize_layers(w) if quant.is_quantized(w) else w.astype(jnp.float32)
        return (w32 + delta(w32.shape, a.astype(jnp.float32), b.astype(jnp.float32), cfg.lora_scale)).astype(out_dtype)

    merged = jax.tree.map(lambda x: x, base, is_leaf=quant.is_quantized)
    for name in cfg.lora_targets:
        *parents, leaf = layout.projection(name).path
        node, ad = merged, adapters
        for key in parents:
            node, ad = node[key], ad[key]
        node[leaf] = fold(node[leaf], ad[f"{leaf}_lora_a"], ad[f"{leaf}_lora_b"])
    return without_lora(cfg), merged


# --- PEFT ---------------------------------------------------------------------------------------


def peft_config(cfg: LlamaConfig, base_model: str | None = None) -> dict:
    """adapter_config.json for a LoRA config (PEFT's LoraConfig fields; unset ones take PEFT's defaults)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": [layout.projection(t).hf_module for t in cfg.lora_targets],
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
            "init_lora_weights": True, "inference_mode": True}


def to_peft(adapters: Any, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """PEFT's state dict {name: (rank, in) or (out, rank) float32 array} of our adapters."""
    out = {}
    for name in cfg.lora_targets:
        entry = layout.projection(name)
        node = adapters
        for key in entry.path[:-1]:
            node = node[key]
        a, b = np.asarray(node[f"{name}_lora_a"], np.float32), np.asarray(node[f"{name}_lora_b"], np.float32)
        for i in range(cfg.n_layers):
            out[entry.peft_key(i, "A")] = np.ascontiguousarray(a[i].reshape(-1, cfg.lora_rank).T)
            out[entry.peft_key(i, "B")] = np.ascontiguousarray(b[i].reshape(cfg.lora_rank, -1).T)
    return out


def _peft_targets(config: dict, where: str) -> list[str]:
    """Our projection names for PEFT's target_modules (a list of module names, or "all-linear")."""
    targets = config.get("target_modules")
    if targets == "all-linear":
        return list(PROJECTIONS)
    if not isinstance(targets, (list, tuple)) or not targets:
        raise ValueError(f"{where}: target_modules {targets!r}: expected a list of module names such as "
                         "[q_proj, v_proj] or 'all-linear' (regular expressions are not supported)")
    by_hf = {layout.projection(p).hf_module: p for p in PROJECTIONS}
    unknown = [t for t in targets if t.split(".")[-1] not in by_hf]
    if unknown:
        raise ValueError(f"{where}: target_modules {unknown} are not LoRA-able Llama projections "
                         f"(expected some of {sorted(by_hf)})")
    return [p for p in PROJECTIONS if layout.projection(p).hf_module in {t.split('.')[-1] for t in targets}]


def from_peft(tensors: dict[str, Any], config: dict, cfg: LlamaConfig, where: str = "adapter") -> tuple[LlamaConfig, Any]:
    """(LoRA config, adapters as numpy float32) from a PEFT LoRA adapter's tensors and adapter_config.json.

    PEFT's scale alpha / r (or alpha / sqrt(r) with use_rslora) becomes lora_alpha = scale * r.
    Refuses what a plain LoRA cannot express (DoRA, biases, per-module ranks, modules_to_save...).
    """
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    refused = {"use_dora": bool(config.get("use_dora")), "bias": config.get("bias", "none") != "none",
               "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
               "modules_to_save": bool(config.get("modules_to_save")), "rank_pattern": bool(config.get("rank_pattern")),
               "alpha_pattern": bool(config.get("alpha_pattern")),
               "layers_to_transform": config.get("layers_to_transform") is not None}
    bad = [k for k, v in refused.items() if v]
    if bad:
        raise ValueError(f"{where}: adapter_config.json sets {bad}, which a plain LoRA merge cannot express")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    targets = _peft_targets(config, where)
    lora_cfg = cfg.replace(lora_rank=rank, lora_alpha=scale * rank, lora_dropout=float(config.get("lora_dropout", 0.0)),
                           lora_targets=tuple(targets))
    shapes = adapter_layout(lora_cfg)[1]
    expected = {layout.projection(t).peft_key(i, m) for t in targets for i in range(cfg.n_layers) for m in "AB"}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{where}: tensors do not match adapter_config.json and the base model "
                         f"({cfg.n_layers} layers): missing {missing[:3]}, unexpected {unexpected[:3]}")
    adapters: dict = {}
    for name in targets:
        entry = layout.projection(name)
        node, shape_node = adapters, shapes
        for key in entry.path[:-1]:
            node, shape_node = node.setdefault(key, {}), shape_node[key]
        for matrix, suffix in (("A", "_lora_a"), ("B", "_lora_b")):
            shape = shape_node[name + suffix].shape  # (layers, *in, r) or (layers, r, *out)
            layers = []
            for i in range(cfg.n_layers):
                t = np.asarray(tensors[entry.peft_key(i, matrix)], np.float32)
                want = (rank, math.prod(shape[1:-1])) if matrix == "A" else (math.prod(shape[2:]), rank)
                if t.shape != want:
                    raise ValueError(f"{where}: {entry.peft_key(i, matrix)} has shape {t.shape}, expected {want}")
                layers.append(t.T.reshape(shape[1:]))
            node[name + suffix] = np.stack(layers)
    return lora_cfg, adapters
