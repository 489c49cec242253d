"""The llama_jax checkpoint format: `path/config.json` + `path/params/` (an Orbax PyTree of the
params), or a training run folder (its newest complete step); saving, loading (optionally quantised
layer by layer), opening leaf by leaf. A LoRA run's folder holds only adapters and `lora.json`
naming its base checkpoint: loading or opening it gives the merged model. A reward model
(llama_jax/reward.py) says so in config.json ("head": "reward"); it loads only when asked for by
`head="reward"`, so no reward model is ever taken for a language model."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import layout, lora, quant, reward
from llama_jax.checkpoint.files import Staging, is_remote, join, parse_json, read_bytes, read_text, write_text
from llama_jax.checkpoint.integrity import verify
from llama_jax.checkpoint.orbax_glue import leaf_paths, open_leaves, restore_pytree, save_pytree, stored_arrays
from llama_jax.checkpoint.runs import complete_steps
from llama_jax.config import DTYPES, LlamaConfig
from llama_jax.errors import note
from llama_jax.model import check_params, param_axes, param_shapes
from sharding import check_shapes, tree_shardings

FORMAT = {"format": "llama_jax", "version": 1}


def write_config(folder: str, cfg: LlamaConfig, head: str = "lm") -> None:
    """config.json: the model config, the format, and (for a reward model) the head."""
    extra = {} if head == "lm" else {"head": head}
    write_text(join(folder, "config.json"), json.dumps({**cfg.to_dict(), **FORMAT, **extra}, indent=2))


def read_head(folder: str) -> str:
    """What a checkpoint's (or run folder's) params compute: "lm" or "reward" (llama_jax/reward.py)."""
    return _config_json(folder).get("head", "lm")


def _refuse_head(folder: str, stored: str, head: str) -> None:
    if stored == head:
        return
    if stored == "reward":
        raise ValueError(f"{folder} is a reward model (a scalar head, no next-token output), not a language model; "
                         "score pairs with `python -m llama_jax.eval reward`, or load it with "
                         "lj.load_checkpoint(path, head='reward')")
    raise ValueError(f"{folder} is a language model, not a reward model (train one with objective: reward)")


def read_config(folder: str, head: str | None = "lm") -> LlamaConfig:
    """The model config of a checkpoint or run folder; one whose head is not `head` is refused (None: any)."""
    d = _config_json(folder)
    stored = d.get("head", "lm")
    for name, value in (("config.json", stored), ("head", head)):
        if value not in reward.HEADS and not (name == "head" and value is None):
            raise ValueError(f"{join(folder, 'config.json')}: {name} head {value!r} is not one of {reward.HEADS}")
    if head is not None:
        _refuse_head(folder, stored, head)
    try:
        return LlamaConfig.from_dict({k: v for k, v in d.items() if k not in FORMAT and k != "head"})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{join(folder, 'config.json')}: {e}") from None


def head_layout(cfg: LlamaConfig, head: str = "lm") -> tuple[Any, Any]:
    """(logical axes, shapes) of the params of a model with this head."""
    return reward.param_layout(cfg) if head == "reward" else (param_axes(cfg), param_shapes(cfg))


def _config_json(folder: str) -> dict:
    path = join(folder, "config.json")
    text = read_text(path)
    if text is None:
        raise FileNotFoundError(f"{folder}: no config.json; expected a llama_jax checkpoint "
                                "(config.json + params/) or a training run folder")
    d = parse_json(text, path, dict, "a llama_jax model config (a JSON object)")
    if d.get("format") != FORMAT["format"]:
        raise ValueError(f"{path}: format is {d.get('format')!r}, expected 'llama_jax' "
                         "(a Hugging Face folder? convert it with `python -m llama_jax.convert hf`)")
    if d.get("version") != FORMAT["version"]:
        raise ValueError(f"{path}: version {d.get('version')!r}, expected {FORMAT['version']}")
    return d


def checkpoint_tokenizer(path: str) -> str | None:
    """The tokenizer a checkpoint or run folder carries (the converter and the trainer write it there:
    tokenizer.model, or tokenizer.json with its side files), else a LoRA run's base's."""
    for name in ("tokenizer.model", "tokenizer.json"):
        candidate = join(str(path), name)
        if read_bytes(candidate) is not None if is_remote(candidate) else os.path.isfile(candidate):
            return candidate
    base = read_lora_base(str(path))
    return None if base is None else checkpoint_tokenizer(base["base"])


def save_checkpoint(path: str, cfg: LlamaConfig, params: Any, overwrite: bool = False, head: str = "lm") -> None:
    """Write `path/config.json` + `path/params/` (Orbax PyTree) + `checksums.json`, via a temporary
    sibling. config.json records the dtype the arrays have (param_dtype), and a reward model's head."""
    if head == "lm":
        check_params(params, cfg, f"save_checkpoint({path})")
    else:
        check_shapes(params, head_layout(cfg, head)[1], f"save_checkpoint({path}, head={head!r})")
    dtypes = {jax.numpy.dtype(leaf.dtype).name for leaf in jax.tree.leaves(params)}
    if len(dtypes) != 1 or not dtypes <= set(DTYPES):
        raise ValueError(f"save_checkpoint({path}): params must all have one of {sorted(DTYPES)}, got {sorted(dtypes)}")
    cfg = cfg.replace(param_dtype=dtypes.pop())
    with Staging(path, overwrite) as stage:
        save_pytree(join(stage.path, "params"), params)
        if stage.main:
            write_config(stage.path, cfg, head)


def params_dir(path: str) -> str:
    """`path/params`, or the newest complete step's params of a training run folder."""
    params = join(path, "params")
    if is_remote(path):
        if read_text(join(params, "_METADATA")) is None:
            raise FileNotFoundError(f"{path}: no params/_METADATA; expected a llama_jax checkpoint")
        return params
    if os.path.isfile(os.path.join(params, "_METADATA")):
        return params
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: {'not a folder' if os.path.exists(path) else 'no such checkpoint folder'}")
    steps = complete_steps(path)
    if not steps:
        if os.path.isfile(os.path.join(path, "config.json")):
            read_config(path)  # says so when it is another format's (a Hugging Face folder)
        raise FileNotFoundError(f"{path}: neither a checkpoint (params/ with an Orbax _METADATA) nor a training "
                                "run folder (numeric step folders holding params/)")
    return os.path.join(path, str(steps[0]), "params")


def check_params_dir(folder: str, cfg: LlamaConfig, shapes: Any = None) -> None:
    """Check a params folder's files against the checksums written at save and its stored shapes
    and dtypes against config.json's model (or `shapes`, e.g. a LoRA run's adapters): a damaged
    or edited checkpoint never loads."""
    if not is_remote(folder):
        saved_as = os.path.dirname(folder)  # the checkpoint, or the run's step folder
        if not verify(saved_as, under=("params/",)):
            note(f"{saved_as} has no checksums.json (saved before llama_jax wrote checksums): loaded unverified")
    stored = stored_arrays(folder)
    expected = {leaf: (s.shape, np.dtype(s.dtype).name) for leaf, s in leaf_paths(shapes or param_shapes(cfg))}
    if stored != expected:
        diff = [f"{'.'.join(leaf)} stored {stored.get(leaf, 'missing')}, expected {expected.get(leaf, 'none')}"
                for leaf in sorted(set(stored) | set(expected)) if stored.get(leaf) != expected.get(leaf)]
        raise ValueError(f"{folder}: stored params do not match config.json's model (as (shape, dtype): "
                         f"{'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''})")


def _absolute(path: str) -> str:
    return str(path) if is_remote(path) else os.path.abspath(path)  # Orbax misreads relative paths


def lora_base_record(base: str, base_dtype: str) -> dict:
    """What a LoRA run's lora.json holds: its base checkpoint (absolute) and how the base was held in memory."""
    return {"base": _absolute(base), "base_dtype": base_dtype}


def write_lora_base(run_dir: str, base: str, base_dtype: str) -> None:
    """Record a LoRA run's base checkpoint (read at load time, never written)."""
    write_text(join(run_dir, "lora.json"), json.dumps(lora_base_record(base, base_dtype), indent=2))


def read_lora_base(run_dir: str) -> dict | None:
    """{"base": path, "base_dtype": ...} of a LoRA run folder, or None for any other folder."""
    text = read_text(join(run_dir, "lora.json"))
    return None if text is None else json.loads(text)


def _shardings(shapes: Any, axes: Any, mesh: jax.sharding.Mesh | None) -> Any:
    if mesh is not None:
        return tree_shardings(axes, shapes, mesh)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, shapes)


def load_checkpoint(path: str, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None,
                    quantize: str | None = None, head: str = "lm") -> tuple[LlamaConfig, Any]:
    """Load (cfg, params) from a checkpoint or a training run folder (its newest complete step).

    mesh: restore every leaf straight into its NamedSharding from the logical-axis rules (each
    host reads only its shards). dtype: "bfloat16"/"float32" casts the params (and cfg.param_dtype).
    quantize: "int8"/"nf4" quantises the seven projections (llama_jax/quant.py) one layer at a
    time as they are read, so the float model never exists whole. A LoRA run folder loads merged:
    its base (lora.json) plus the newest adapters, folded in (lora.merge), then quantised (there
    the merged float model exists once, placed on `mesh`).
    head: "reward" loads a reward model (llama_jax/reward.py; any other checkpoint is refused, and a
    reward model is refused without it).
    """
    path = _absolute(path)
    folder = params_dir(path)  # names a missing folder before anything else
    cfg = read_config(path, head)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if quantize is not None:
        quant.check_format(quantize)
    run_base = read_lora_base(path) if cfg.lora_rank else None
    if run_base is not None:
        return _load_lora_run(path, cfg, run_base, mesh, dtype, quantize)
    if head != "lm" and quantize is not None:
        raise ValueError(f"{path}: a reward model loads unquantised (quantize={quantize!r} is for language models)")
    check_params_dir(folder, cfg, head_layout(cfg, head)[1])  # the stored dtype
    cfg = cfg.replace(param_dtype=dtype or cfg.param_dtype)
    if quantize is not None:
        return cfg, _load_quantized(path, cfg, mesh, quantize)
    axes, shapes = head_layout(cfg, head)
    shardings = _shardings(shapes, axes, mesh)
    return cfg, restore_pytree(folder, shapes, shardings, None if dtype is None else DTYPES[dtype])


def _load_quantized(path: str, cfg: LlamaConfig, mesh: jax.sharding.Mesh | None, fmt: str) -> Any:
    """Params with the projections quantised: each layer's slice is read (in its stored dtype), placed
    in its shards, quantised, and only then is the next one read."""
    _, leaves = open_checkpoint(path)
    float_shardings = dict(leaf_paths(_shardings(param_shapes(cfg), param_axes(cfg), mesh)))
    axes, shapes = quant.layout_of(param_axes(cfg), param_shapes(cfg), fmt)
    shardings = _shardings(shapes, axes, mesh)
    out: dict = {}
    for leaf_path, leaf in leaves.items():
        sharding = float_shardings[leaf_path]
        node_sh, node = shardings, out
        for key in leaf_path[:-1]:
            node_sh, node = node_sh[key], node.setdefault(key, {})
        target = node_sh[leaf_path[-1]]
        if not quant.is_quantized(target):
            node[leaf_path[-1]] = jax.make_array_from_callback(
                leaf.shape, sharding, lambda index, leaf=leaf: leaf.read(index=index).astype(DTYPES[cfg.param_dtype]))
            continue
        n_in = layout.projection(leaf_path[-1]).n_in
        one_layer = sharding if mesh is None else NamedSharding(mesh, PartitionSpec(*sharding.spec[1:]))
        layers = []
        for i in range(leaf.shape[0]):
            w = jax.make_array_from_callback(leaf.shape[1:], one_layer, lambda index, i=i, leaf=leaf: leaf.read(i, index))
            layers.append(quant.quantize_layers(w[None], n_in, fmt))
        node[leaf_path[-1]] = jax.jit(lambda *xs: jax.tree.map(lambda *a: jnp.concatenate(a), *xs),
                                      out_shardings=target)(*layers)
    return out


def _load_lora_run(path: str, cfg: LlamaConfig, run_base: dict, mesh: jax.sharding.Mesh | None,
                   dtype: str | None, quantize: str | None) -> tuple[LlamaConfig, Any]:
    """The merged model of a LoRA run: base (lora.json) + the newest step's adapters."""
    base_cfg, base = load_checkpoint(_checked_base(path, cfg, run_base), mesh, dtype)
    adapters = load_adapters(path, cfg, mesh)
    cfg, params = lora.merge(lora.combine(base, adapters), cfg.replace(param_dtype=base_cfg.param_dtype))
    if quantize is not None:
        params = quant.quantize_params(params, cfg, quantize, mesh=mesh)
    return cfg, params


def _checked_base(path: str, cfg: LlamaConfig, run_base: dict) -> str:
    base = run_base["base"]
    try:
        base_cfg = read_config(base)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is a LoRA run whose base checkpoint {base} (named in its lora.json) "
                                "is missing; the run holds only the adapters") from None
    fields = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim")
    if any(getattr(base_cfg, f) != getattr(cfg, f) for f in fields):
        raise ValueError(f"{path}: its base {base} (lora.json) is not the model the run trained on")
    return base


def load_adapters(path: str, cfg: LlamaConfig, mesh: jax.sharding.Mesh | None = None) -> Any:
    """The newest step's adapters of a LoRA run folder (float32), placed on `mesh` if given."""
    axes, shapes = lora.adapter_layout(cfg)
    folder = params_dir(path)
    check_params_dir(folder, cfg, shapes)
    return restore_pytree(folder, shapes, _shardings(shapes, axes, mesh))


class Leaf:
    """One parameter of a checkpoint, read on demand: `read()` the whole array, `read(layer)` one layer's
    slice of a stacked leaf, `index=` a block of that. A LoRA run's targeted weights come merged."""

    def __init__(self, store: Any, adapter: tuple | None = None):
        self.store, self.adapter = store, adapter  # adapter: (A, B, scale) as numpy, stacked over layers
        self.shape = tuple(store.shape)

    def read(self, layer: int | None = None, index: tuple = ()) -> np.ndarray:
        store = self.store if layer is None else self.store[layer]
        if self.adapter is None:
            return store[index].read().result() if index else store.read().result()
        a, b, scale = self.adapter
        w = store.read().result()
        a, b = (a, b) if layer is None else (a[layer], b[layer])
        merged = w.astype(np.float32) + lora.delta(w.shape, a, b, scale)
        return merged[index] if index else merged


def open_checkpoint(path: str) -> tuple[LlamaConfig, dict[tuple[str, ...], Leaf]]:
    """(cfg, {leaf path: Leaf}) of a checkpoint or run folder; no weights are read yet.

    For consumers that stream (export-hf, quantised loading): `leaves["layers", "attention", "wq"].read(i)`
    reads one layer's slice, so memory stays at one slice whatever the model size. Works for the
    converter's zarr layout and for Orbax's default OCDBT checkpoints (save_checkpoint, trainer).
    A LoRA run opens as its merged model (the base's leaves, targeted ones plus A B; float32).
    """
    path = _absolute(path)
    folder = params_dir(path)  # names a missing folder before anything else
    cfg = read_config(path)
    run_base = read_lora_base(path) if cfg.lora_rank else None
    if run_base is not None:
        base_cfg, leaves = open_checkpoint(_checked_base(path, cfg, run_base))
        adapters = jax.device_get(load_adapters(path, cfg, None))
        for name in cfg.lora_targets:
            entry = layout.projection(name)
            node = adapters
            for key in entry.path[:-1]:
                node = node[key]
            a, b = np.asarray(node[f"{name}_lora_a"]), np.asarray(node[f"{name}_lora_b"])
            leaves[entry.path] = Leaf(leaves[entry.path].store, (a, b, cfg.lora_scale))
        return lora.without_lora(cfg).replace(param_dtype=base_cfg.param_dtype), leaves
    check_params_dir(folder, cfg)
    shapes = dict(leaf_paths(param_shapes(cfg)))
    stores = open_leaves(folder, [".".join(leaf) for leaf in shapes])
    leaves = {}
    for leaf, shape in shapes.items():
        store = stores[".".join(leaf)]
        if tuple(store.shape) != tuple(shape.shape):
            raise ValueError(f"{folder}: parameter {'.'.join(leaf)} has shape {tuple(store.shape)}, config.json's "
                             f"model expects {tuple(shape.shape)}")
        leaves[leaf] = Leaf(store)
    return cfg, leaves
