"""llama_jax -> Hugging Face: sharded safetensors + index + config.json (+ tokenizer), streamed tensor by tensor."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from llama_jax import layout
from llama_jax.checkpoint import Staging, checkpoint_tokenizer, open_checkpoint
from llama_jax.config import DTYPES, LlamaConfig
from llama_jax.convert.streaming import OUT_DTYPES, itemsize
from llama_jax.tokenizer import Tokenizer


SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}


def export_hf(ckpt: str, out: str, dtype: str | None = None, overwrite: bool = False,
              max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> LlamaConfig:
    """Write sharded safetensors + index + config.json (+ tokenizer) that transformers loads.

    A LoRA run exports merged (its base + its adapters).
    Streaming: each tensor (one layer's slice of a stacked leaf) is read from the checkpoint,
    moved to HF's layout and appended to its safetensors file before the next is read, so
    memory stays at about one tensor whatever the model size (a 70B exports on a small VM).
    """
    if dtype is not None and dtype not in OUT_DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {OUT_DTYPES}")
    cfg, leaves = open_checkpoint(ckpt)
    dtype = dtype or cfg.param_dtype
    np_dtype, size_of = np.dtype(DTYPES[dtype]), itemsize(dtype)
    plan: list[list[tuple[layout.Entry, int | None, str]]] = [[]]
    size = 0
    for item in layout.names(cfg, "hf"):
        nbytes = int(np.prod(layout.torch_shape(item[0], cfg))) * size_of
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(item)
        size += nbytes
    weight_map, total = {}, 0
    with Staging(out, overwrite, sources=(ckpt,), checksums=False) as stage, tqdm(
            total=cfg.num_params() * size_of, unit="B", unit_scale=True, desc="export", disable=not progress) as bar:
        for k, items in enumerate(plan):
            file = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
            shapes = {name: layout.torch_shape(entry, cfg) for entry, _, name in items}
            with _create(os.path.join(stage.path, file), "wb") as f:
                _safetensors_header(f, shapes, SAFETENSORS_DTYPES[dtype], size_of)
                for entry, layer, name in items:
                    ours = leaves[entry.path].read(layer)
                    w = layout.from_ours(entry, ours.astype(np_dtype, copy=False), cfg, "hf")
                    f.write(memoryview(w.reshape(-1).view(np.uint8)))
                    weight_map[name] = file
                    total += w.nbytes
                    bar.update(w.nbytes)
        with _create(os.path.join(stage.path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        found = checkpoint_tokenizer(ckpt)
        tok = None if found is None else Tokenizer(found)
        with _create(os.path.join(stage.path, "config.json"), "w") as f:
            ids = {} if tok is None else {"bos_id": tok.bos_id, "eos_id": tok.eos_id}
            json.dump(cfg.to_hf_config(torch_dtype=dtype, **ids), f, indent=2)
        if tok is not None:
            tok.save(stage.path)  # a tokenizer.json comes with its own tokenizer_config.json
            if "tokenizer.model" in tok.files:
                with _create(os.path.join(stage.path, "tokenizer_config.json"), "w") as f:
                    json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                               "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                               "model_max_length": cfg.max_seq_len}, f, indent=2)
    return cfg


@contextlib.contextmanager
def _create(path: str, mode: str) -> Iterator[Any]:
    """open(path, mode) whose write errors (a full disk) name the file."""
    try:
        with open(path, mode) as f:
            yield f
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, f"{path}: {e.strerror}") from None


def _safetensors_header(f: Any, shapes: dict[str, tuple[int, ...]], dtype: str, size_of: int) -> None:
    """The safetensors header for tensors written next, in this order, back to back.

    Format: 8-byte little-endian header length, the JSON header (padded with spaces to a
    multiple of 8, as the safetensors library writes it), then the raw little-endian bytes.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * size_of
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)

