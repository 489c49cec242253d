"""Convert PyTorch LLaMA weights (Meta or Hugging Face) to a llama_jax checkpoint, and back to HF.

    python -m llama_jax.convert meta SRC OUT [--dtype bfloat16|float32] [--tokenizer PATH] [--verify]
    python -m llama_jax.convert hf SRC OUT [--dtype ...] [--verify]
    python -m llama_jax.convert export-hf CKPT OUT [--dtype ...] [--verify]

Streaming: source files are memory-mapped (`torch.load(mmap=True, weights_only=True)`, safetensors'
lazy reader); each tensor is merged across model-parallel shards, moved to our layout by
llama_jax.layout (the one name/shape table), written into the Orbax checkpoint by TensorStore and
released; a few worker threads keep tensors in flight under a byte budget, so peak memory is a
few tensors, never the whole model. export-hf streams the other way, one tensor at a time.
Pickles are loaded with weights_only=True only: a file whose pickle would run code is refused.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import glob
import json
import os
import pickle
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import ml_dtypes
import numpy as np
import torch
from tqdm import tqdm

from llama_jax import layout
from llama_jax.layout import contiguous, transpose_2d
from llama_jax.checkpoint import (Staging, StreamingWriter, _join, is_remote, load_checkpoint, open_checkpoint,
                                  write_config)
from llama_jax.config import DTYPES, LlamaConfig

OUT_DTYPES = ("bfloat16", "float32")
TORCH_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# --- reading torch tensors safely and without keeping them resident -------------------------------


def load_pth(file: str) -> dict:
    """A .pth/.bin state dict, memory-mapped, through the weights-only unpickler (never runs code)."""
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (pre-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{file}: refused to load: it is not a plain tensor checkpoint "
                         f"(its pickle asks for more than tensors; nothing from it was run): {e}") from None


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (bfloat16 via ml_dtypes), no copy."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype not in TORCH_DTYPES:
        raise ValueError(f"tensor dtype {t.dtype} is not a float type this converter reads")
    return t.numpy()


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_PAGE = os.sysconf("SC_PAGE_SIZE") if _LIBC is not None else 0


def release(*tensors: torch.Tensor) -> None:
    """Drop the memory-mapped pages of tensors we are done with from this process (Linux).

    A file mapping keeps every page it touched resident (and counted in RSS) until unmapped;
    MADV_DONTNEED on a read-only private file mapping just forgets them (they would re-read from
    the file), so reading the checkpoint tensor by tensor keeps the footprint at one tensor.
    """
    _madvise(tensors, 4)  # MADV_DONTNEED


def prefetch(*tensors: torch.Tensor) -> None:
    """Ask the kernel to start reading memory-mapped tensors from disk now (MADV_WILLNEED).

    Page faults alone read a cold file in small synchronous steps; asking ahead for the tensors
    queued next keeps the disk busy while workers transpose and write.
    """
    _madvise(tensors, 3)  # MADV_WILLNEED


def _madvise(tensors: tuple[torch.Tensor, ...], advice: int) -> None:
    if _LIBC is None:
        return
    for t in tensors:
        storage = t.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
        if size < _PAGE:
            continue
        first = (start + _PAGE - 1) // _PAGE * _PAGE  # whole pages inside this storage only
        length = (start + size - first) // _PAGE * _PAGE
        if length > 0:
            _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(length), advice)


# --- sources: a uniform "name -> tensor" view over Meta shards or HF files -------------------------


class MetaSource:
    """params.json + consolidated.NN.pth (model-parallel shards, merged per tensor on its split axis)."""

    fmt = "meta"

    def __init__(self, src: str, max_seq_len: int = 4096):
        self.src = src
        params_file = os.path.join(src, "params.json")
        if not os.path.isfile(params_file):
            raise FileNotFoundError(f"{src}: no params.json; expected a Meta checkpoint folder "
                                    "(params.json + consolidated.NN.pth)")
        with open(params_file) as f:
            params = json.load(f)
        files = sorted(glob.glob(os.path.join(src, "consolidated.*.pth")))
        if not files:
            raise FileNotFoundError(f"{src}: no consolidated.NN.pth files next to params.json")
        for i, file in enumerate(files):
            expected = os.path.join(src, f"consolidated.{i:02d}.pth")
            if file != expected:
                raise FileNotFoundError(f"{src}: missing shard {os.path.basename(expected)} "
                                        f"(found {[os.path.basename(f) for f in files]})")
        self.files = files
        self.shards = [load_pth(f) for f in files]
        keys0 = set(self.shards[0])
        for file, shard in zip(files[1:], self.shards[1:]):
            if set(shard) != keys0:
                diff = sorted(keys0 ^ set(shard))[:3]
                raise ValueError(f"{file}: its tensors disagree with {os.path.basename(files[0])}'s (e.g. {diff})")
        if "tok_embeddings.weight" not in keys0:
            raise KeyError(f"{files[0]}: missing tensor tok_embeddings.weight")
        vocab = int(self.shards[0]["tok_embeddings.weight"].shape[0])
        file_vocab = params.get("vocab_size", -1)
        if file_vocab not in (None, -1) and int(file_vocab) != vocab:
            raise ValueError(f"{params_file}: vocab_size {file_vocab} disagrees with tok_embeddings.weight's "
                             f"{vocab} rows in {files[0]}")
        self.cfg = LlamaConfig.from_meta_params(params, vocab_size=vocab, max_seq_len=max_seq_len)
        self.ignored = set(layout.META_IGNORED)
        self.dtype = TORCH_DTYPES.get(self.shards[0]["tok_embeddings.weight"].dtype)

    def keys(self) -> dict[str, str]:
        return {k: self.files[0] for k in self.shards[0]}

    def pieces(self, entry: layout.Entry, name: str) -> list[torch.Tensor]:
        """Each shard's part of tensor `name`, shapes checked (replicated: shard 0's, checked equal)."""
        full = layout.torch_shape(entry, self.cfg)
        pieces = [shard[name] for shard in self.shards]
        n, axis = len(pieces), entry.meta_split_dim
        for file, piece in zip(self.files, pieces):
            want = list(full)
            if axis is not None:
                if full[axis] % n:
                    raise ValueError(f"{name}: size {full[axis]} on axis {axis} does not split into {n} shards")
                want[axis] //= n
            if list(piece.shape) != want:
                raise ValueError(f"{file}: tensor {name} has shape {tuple(piece.shape)}, expected {tuple(want)} "
                                 f"for the model in params.json split over {n} shard(s)")
        if axis is None:
            for file, piece in zip(self.files[1:], pieces[1:]):
                if not torch.equal(piece, pieces[0]):
                    raise ValueError(f"{file}: replicated tensor {name} differs from {self.files[0]}'s")
            return pieces[:1]
        return pieces

    def get(self, entry: layout.Entry, name: str) -> torch.Tensor:
        """The full tensor `name` in Meta's layout: shards concatenated on Meta's split axis."""
        pieces = self.pieces(entry, name)
        if len(pieces) == 1:
            return pieces[0]
        merged = torch.cat(pieces, dim=entry.meta_split_dim)
        release(*pieces)
        return merged

    def ours(self, entry: layout.Entry, name: str) -> tuple[np.ndarray, bool]:
        """Tensor `name` in our layout, C-contiguous; True if it is a new array (not the source's memory).

        Each shard is transposed straight into its block of the merged output (torch's out axis is
        our last axis), so no concatenated copy is made. Meta's RoPE row permutation is per head,
        so it is applied to each shard when shards hold whole heads (on an unsigned-int view: a
        plain row copy); a head split over shards (fewer kv heads than shards) merges rows first.
        """
        pieces = [to_numpy(p) for p in self.pieces(entry, name)]
        axis, dtype, plain = entry.meta_split_dim, pieces[0].dtype, f"u{pieces[0].itemsize}"
        if entry.kind == "copy":  # tok_embeddings (split on dim) and the norms (replicated)
            if len(pieces) == 1:
                return layout.to_ours(entry, pieces[0], self.cfg, "meta"), False
            merged = np.concatenate([p.view(plain) for p in pieces], axis=axis).view(dtype)
            return layout.to_ours(entry, merged, self.cfg, "meta"), True
        heads = getattr(self.cfg, entry.rope_heads) if entry.rope_heads else None
        if heads is not None and heads % len(pieces):  # fewer kv heads than shards: a head spans shards
            pieces = [np.concatenate([p.view(plain) for p in pieces], axis=axis).view(dtype)]
        full, n = layout.torch_shape(entry, self.cfg), len(pieces)
        ours_2d = np.empty(full[::-1], dtype)  # (in, out): torch's (out, in) transposed
        size = full[axis] // n
        for s, piece in enumerate(pieces):
            if heads is not None:
                piece = layout.meta_to_hf_rows(piece.view(plain), heads // n).view(dtype)
            block = ours_2d[:, s * size:(s + 1) * size] if axis == 0 else ours_2d[s * size:(s + 1) * size]
            transpose_2d(np.ascontiguousarray(piece), out=block)
        # RoPE rows are already moved, so only to_ours' reshape is left: "hf" format, a view
        return layout.to_ours(entry, ours_2d.T, self.cfg, "hf"), True

    def done(self, name: str) -> None:
        release(*(shard[name] for shard in self.shards))

    def prefetch(self, name: str) -> None:
        prefetch(*(shard[name] for shard in self.shards))

    def tokenizer(self) -> str | None:
        for folder in (self.src, os.path.dirname(os.path.abspath(self.src))):  # Llama-2 puts it one level up
            if os.path.isfile(os.path.join(folder, "tokenizer.model")):
                return os.path.join(folder, "tokenizer.model")
        return None


class HFSource:
    """A Hugging Face folder: config.json + safetensors or pytorch_model*.bin, one file or an index."""

    fmt = "hf"

    def __init__(self, src: str):
        self.src = src
        config_file = os.path.join(src, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{src}: no config.json; expected a Hugging Face model folder")
        with open(config_file) as f:
            self.cfg = LlamaConfig.from_hf_config(json.load(f))
        self.where = self._weight_map(src)  # tensor name -> file
        for file in sorted(set(self.where.values())):
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file}: listed in the index but missing")
        self.readers = {file: self._open(file) for file in sorted(set(self.where.values()))}
        if list(self.where) == [None]:  # a single file: its own keys
            file = self.where.pop(None)
            self.where = {k: file for k in self.readers[file].keys()}
        for name, file in self.where.items():
            if name not in self.readers[file].keys():
                raise KeyError(f"{file}: the index lists tensor {name} in this file but it is not there")
        self.ignored = {k for k in self.where if k.endswith(layout.HF_IGNORED_SUFFIXES)}
        self.dtype = None
        if "model.embed_tokens.weight" in self.where:
            self.dtype = TORCH_DTYPES.get(self._read("model.embed_tokens.weight").dtype)

    @staticmethod
    def _weight_map(src: str) -> dict:
        for index, single in (("model.safetensors.index.json", "model.safetensors"),
                              ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if os.path.isfile(os.path.join(src, index)):
                with open(os.path.join(src, index)) as f:
                    return {k: os.path.join(src, v) for k, v in json.load(f)["weight_map"].items()}
            if os.path.isfile(os.path.join(src, single)):
                return {None: os.path.join(src, single)}
        raise FileNotFoundError(f"{src}: no model.safetensors, pytorch_model.bin or an .index.json of either")

    @staticmethod
    def _open(file: str) -> Any:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            return safe_open(file, framework="pt")
        return load_pth(file)

    def _read(self, name: str) -> torch.Tensor:
        reader = self.readers[self.where[name]]
        return reader[name] if isinstance(reader, dict) else reader.get_tensor(name)

    def keys(self) -> dict[str, str]:
        return dict(self.where)

    def ours(self, entry: layout.Entry, name: str) -> tuple[np.ndarray, bool]:
        """Tensor `name` in our layout, C-contiguous; True if it is a new array (not the source's memory)."""
        torch_layout = to_numpy(self._read(name))
        ours = contiguous(layout.to_ours(entry, torch_layout, self.cfg, "hf"))
        return ours, not np.may_share_memory(ours, torch_layout)

    def done(self, name: str) -> None:
        reader = self.readers[self.where[name]]
        if isinstance(reader, dict):  # memory-mapped by torch.load (safetensors' get_tensor copies)
            release(reader[name])

    def prefetch(self, name: str) -> None:
        reader = self.readers[self.where[name]]
        if isinstance(reader, dict):
            prefetch(reader[name])

    def tokenizer(self) -> str | None:
        path = os.path.join(self.src, "tokenizer.model")
        return path if os.path.isfile(path) else None


def check_names(source: MetaSource | HFSource) -> None:
    """Every tensor the model needs is there, and nothing unknown is (ignored buffers aside)."""
    expected = {name for _, _, name in layout.names(source.cfg, source.fmt)}
    present = source.keys()
    missing = sorted(expected - set(present))
    if missing:
        raise KeyError(f"{source.src}: missing tensor(s) {missing[:4]}{' ...' if len(missing) > 4 else ''} "
                       f"for the model in its config ({source.cfg.n_layers} layers)")
    unknown = sorted(set(present) - expected - source.ignored)
    if unknown:
        raise KeyError(f"{present[unknown[0]]}: unknown tensor(s) {unknown[:4]} (not a LLaMA weight this "
                       f"converter maps; the model in the config has {source.cfg.n_layers} layers)")


# --- torch -> llama_jax --------------------------------------------------------------------------


def convert(source: MetaSource | HFSource, out: str, dtype: str | None = None, tokenizer: str | None = None,
            overwrite: bool = False, progress: bool = True, workers: int = 3,
            inflight_bytes: int = 2**30) -> LlamaConfig:
    """Stream every tensor of `source` into a llama_jax checkpoint at `out`; returns its config.

    `workers` threads each read, transpose and write one tensor (numpy, torch and TensorStore
    release the GIL, so disk reads, transposes and writes overlap); new tensors start only while
    the source bytes in flight stay under `inflight_bytes` (one at least), which bounds peak
    memory at a few tensors whatever the model size.
    """
    check_names(source)
    if dtype is None:
        dtype = source.dtype if source.dtype in ("bfloat16", "float32", "float16") else "float32"
    if dtype not in (*OUT_DTYPES, "float16"):
        raise ValueError(f"--dtype {dtype!r} is not one of {OUT_DTYPES}")
    cfg = source.cfg.replace(param_dtype=dtype)
    tokenizer = tokenizer or source.tokenizer()
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise FileNotFoundError(f"--tokenizer {tokenizer}: no such file")
    items = [(entry, layer, name, int(np.prod(layout.torch_shape(entry, cfg))))
             for entry, layer, name in layout.names(cfg, source.fmt)]
    source_size, out_size = itemsize(source.dtype or "float32"), itemsize(dtype)
    with Staging(out, overwrite) as stage, tqdm(total=sum(n for *_, n in items) * out_size, unit="B",
                                                unit_scale=True, desc="convert", disable=not progress) as bar:
        writer = StreamingWriter(_join(stage.path, "params"), cfg, dtype)

        def one(entry: layout.Entry, layer: int | None, name: str) -> None:
            ours, fresh = source.ours(entry, name)
            writer.write(entry.path, layer, ours, donate=fresh)
            source.done(name)

        running: collections.deque = collections.deque()  # (future, elements), oldest first
        pool = ThreadPoolExecutor(workers)
        try:
            source.prefetch(items[0][2])
            for i, (entry, layer, name, n) in enumerate(items):
                while running and (len(running) >= workers
                                   or (sum(m for _, m in running) + n) * source_size > inflight_bytes):
                    future, m = running.popleft()
                    future.result()
                    bar.update(m * out_size)
                running.append((pool.submit(one, entry, layer, name), n))
                if i + 1 < len(items):
                    source.prefetch(items[i + 1][2])  # into the page cache, not into this process
            while running:
                future, m = running.popleft()
                future.result()
                bar.update(m * out_size)
        finally:  # waits: no write may still land in the folder a failure is about to remove
            pool.shutdown(cancel_futures=True)
        writer.finish()
        if tokenizer is not None:
            _copy(tokenizer, _join(stage.path, "tokenizer.model"))
        write_config(stage.path, cfg)
    return cfg


def itemsize(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else 4


def _copy(src: str, dst: str) -> None:
    if is_remote(dst):
        import tensorstore as ts

        folder, name = dst.rsplit("/", 1)
        with open(src, "rb") as f:
            ts.KvStore.open(folder + "/").result().write(name, f.read()).result()
    else:
        shutil.copyfile(src, dst)


# --- llama_jax -> Hugging Face -------------------------------------------------------------------


SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}


def export_hf(ckpt: str, out: str, dtype: str | None = None, overwrite: bool = False,
              max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> LlamaConfig:
    """Write sharded safetensors + index + config.json (+ tokenizer) that transformers loads.

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
    with Staging(out, overwrite) as stage, tqdm(total=cfg.num_params() * size_of, unit="B", unit_scale=True,
                                                desc="export", disable=not progress) as bar:
        for k, items in enumerate(plan):
            file = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
            shapes = {name: layout.torch_shape(entry, cfg) for entry, _, name in items}
            with open(os.path.join(stage.path, file), "wb") as f:
                _safetensors_header(f, shapes, SAFETENSORS_DTYPES[dtype], size_of)
                for entry, layer, name in items:
                    store = leaves[entry.path]
                    ours = (store if layer is None else store[layer]).read().result()
                    w = layout.from_ours(entry, ours.astype(np_dtype, copy=False), cfg, "hf")
                    f.write(memoryview(w.reshape(-1).view(np.uint8)))
                    weight_map[name] = file
                    total += w.nbytes
                    bar.update(w.nbytes)
        with open(os.path.join(stage.path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(stage.path, "config.json"), "w") as f:
            json.dump(cfg.to_hf_config(torch_dtype=dtype), f, indent=2)
        tok = _checkpoint_tokenizer(ckpt)
        if tok is not None:
            shutil.copyfile(tok, os.path.join(stage.path, "tokenizer.model"))
            with open(os.path.join(stage.path, "tokenizer_config.json"), "w") as f:
                json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                           "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                           "model_max_length": cfg.max_seq_len}, f, indent=2)
    return cfg


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


def _checkpoint_tokenizer(ckpt: str) -> str | None:
    path = os.path.join(ckpt, "tokenizer.model")
    return path if os.path.isfile(path) else None


# --- verification ---------------------------------------------------------------------------------


def meta_reference_logits(weights: Callable[[str], np.ndarray], cfg: LlamaConfig, tokens: np.ndarray) -> np.ndarray:
    """Meta's llama/model.py forward in numpy float32, on Meta-layout weights (interleaved RoPE).

    Independent of our model and of the RoPE permutation, so it checks the conversion end to end.
    """
    t, hd = tokens.shape[1], cfg.head_dim
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2)[: hd // 2] / hd)
    rot = np.exp(1j * np.outer(np.arange(t), freqs))  # (T, hd/2)

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w

    def rotate(x):  # (B, T, heads, hd): rotate interleaved pairs as complex numbers
        c = x.reshape(*x.shape[:-1], hd // 2, 2)
        c = (c[..., 0] + 1j * c[..., 1]) * rot[None, :, None]
        return np.stack([c.real, c.imag], -1).reshape(x.shape)

    x = weights("tok_embeddings.weight")[tokens]
    b = x.shape[0]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(cfg.n_layers):
        w = lambda n: weights(f"layers.{i}.{n}")  # noqa: E731
        h = norm(x, w("attention_norm.weight"))
        q = rotate((h @ w("attention.wq.weight").T).reshape(b, t, cfg.n_heads, hd))
        k = rotate((h @ w("attention.wk.weight").T).reshape(b, t, cfg.n_kv_heads, hd))
        v = (h @ w("attention.wv.weight").T).reshape(b, t, cfg.n_kv_heads, hd)
        rep = cfg.n_heads // cfg.n_kv_heads
        k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)  # repeat_kv: interleaved
        scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, -1)
        x = x + out @ w("attention.wo.weight").T
        h = norm(x, w("ffn_norm.weight"))
        a, g = h @ w("feed_forward.w1.weight").T, h @ w("feed_forward.w3.weight").T
        x = x + (a / (1 + np.exp(-a)) * g) @ w("feed_forward.w2.weight").T
    return norm(x, weights("norm.weight")) @ weights("output.weight").T


def _our_logits(out: str, tokens: np.ndarray, n_layers: int) -> np.ndarray:
    import jax

    from llama_jax.model import forward

    cfg, params = load_checkpoint(out, dtype="float32")
    if n_layers < cfg.n_layers:
        params = {**params, "layers": jax.tree.map(lambda a: a[:n_layers], params["layers"])}
        cfg = cfg.replace(n_layers=n_layers)
    return np.asarray(forward(params, tokens, cfg))


def _hf_logits(folder: str, tokens: np.ndarray, n_layers: int) -> np.ndarray:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, num_hidden_layers=n_layers,
                                                          attn_implementation="eager")
    with torch.no_grad():
        return model.eval()(torch.as_tensor(tokens)).logits.float().numpy()


def verify(kind: str, src: str, out: str, cfg: LlamaConfig, layers: int | None = None,
           source: MetaSource | None = None) -> float:
    """Run 8 tokens through the source weights and the result; print and return the max logit diff.

    `layers` limits both models to their first N layers, so big models verify in little memory.
    """
    n = cfg.n_layers if layers is None else max(1, min(layers, cfg.n_layers))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 8)).astype(np.int32)
    if kind == "meta":
        entries = {name: entry for entry, _, name in layout.names(cfg, "meta")}

        def weights(name: str) -> np.ndarray:
            return to_numpy(source.get(entries[name], name)).astype(np.float32)

        reference = meta_reference_logits(weights, cfg.replace(n_layers=n), tokens)
        result = _our_logits(out, tokens, n)
    elif kind == "hf":
        reference, result = _hf_logits(src, tokens, n), _our_logits(out, tokens, n)
    else:  # export-hf: src is our checkpoint, out the HF folder
        reference, result = _our_logits(src, tokens, n), _hf_logits(out, tokens, n)
    diff = float(np.max(np.abs(reference - result)))
    scale = float(np.max(np.abs(reference)))
    print(f"verify ({n} of {cfg.n_layers} layers, 8 tokens): max |logit diff| = {diff:.3g} "
          f"(relative {diff / max(scale, 1e-30):.3g})")
    return diff


# --- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("meta", "Meta params.json + consolidated.NN.pth -> llama_jax checkpoint"),
                            ("hf", "Hugging Face folder (safetensors or .bin) -> llama_jax checkpoint"),
                            ("export-hf", "llama_jax checkpoint (converted or trained) -> Hugging Face folder")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("src", help="source folder" if name != "export-hf" else "llama_jax checkpoint or run folder")
        p.add_argument("out", help="output folder (must not exist unless --overwrite); gs:// etc. for meta/hf")
        p.add_argument("--dtype", choices=OUT_DTYPES, default=None, help="output dtype (default: keep the source's)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing OUT once conversion succeeds")
        p.add_argument("--verify", action="store_true", help="compare logits of source and result on 8 tokens")
        p.add_argument("--verify-layers", type=int, default=None, help="verify with only the first N layers")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name != "export-hf":
            p.add_argument("--tokenizer", default=None, help="tokenizer.model to copy (default: found next to SRC)")
        if name == "meta":  # params.json does not say the context length
            p.add_argument("--max-seq-len", type=int, default=4096,
                           help="context length to record: 4096 for Llama 2 (default), 2048 for LLaMA-1")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> LlamaConfig:
    """Run one conversion; raises a clear exception on bad input (the CLI prints it)."""
    args = parse_args(argv)
    progress = not args.no_progress
    if args.command == "export-hf":
        if is_remote(args.out):
            raise ValueError(f"{args.out}: export-hf writes a local folder")
        cfg = export_hf(args.src, args.out, args.dtype, args.overwrite, progress=progress)
    else:
        source = MetaSource(args.src, args.max_seq_len) if args.command == "meta" else HFSource(args.src)
        cfg = convert(source, args.out, args.dtype, args.tokenizer, args.overwrite, progress)
    print(f"wrote {args.out} ({cfg.n_layers} layers, dim {cfg.dim}, {cfg.num_params():,} params, {cfg.param_dtype})")
    if args.verify:
        verify(args.command, args.src, args.out, cfg, args.verify_layers,
               source if args.command == "meta" else None)
    return cfg


def cli() -> int:
    try:
        main()
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
