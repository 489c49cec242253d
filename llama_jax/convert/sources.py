"""The two sources of PyTorch weights, as one "name -> tensor in our layout" view: Meta's
model-parallel shards (params.json + consolidated.NN.pth) and Hugging Face folders."""

from __future__ import annotations

import glob
import os
from typing import Any

import numpy as np
import torch

from llama_jax import layout
from llama_jax.checkpoint.files import read_json
from llama_jax.config import LlamaConfig
from llama_jax.convert.torch_io import TORCH_DTYPES, load_pth, prefetch, release, to_numpy
from llama_jax.layout import contiguous, transpose_2d
from llama_jax.tokenizer import GENERATION_CONFIG


class MetaSource:
    """params.json + consolidated.NN.pth (model-parallel shards, merged per tensor on its split axis)."""

    fmt = "meta"

    def __init__(self, src: str, max_seq_len: int = 4096):
        self.src = src
        params_file = os.path.join(src, "params.json")
        if not os.path.isfile(params_file):
            raise FileNotFoundError(f"{src}: no params.json; expected a Meta checkpoint folder "
                                    "(params.json + consolidated.NN.pth)")
        params = read_json(params_file, dict, "Meta's params.json (an object: dim, n_layers, n_heads, ...)")
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
        self.cfg = _config(params_file, LlamaConfig.from_meta_params, params, vocab_size=vocab,
                           max_seq_len=max_seq_len)
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
        pieces = [to_numpy(p, f"{file}: tensor {name}") for file, p in zip(self.files, self.pieces(entry, name))]
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

    def generation_config(self) -> bytes | None:
        return None  # Meta's folders have none (params.json says nothing of end tokens)

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
        self.cfg = _config(config_file, LlamaConfig.from_hf_config,
                           read_json(config_file, dict, "a Hugging Face Llama config (a JSON object)"))
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
        if self.cfg.tie_word_embeddings and {"lm_head.weight", "model.embed_tokens.weight"} <= set(self.where):
            # saved although tied (older exports): it must be the embedding, or dropping it would lose a weight
            if not torch.equal(self._read("lm_head.weight"), self._read("model.embed_tokens.weight")):
                raise ValueError(f"{self.where['lm_head.weight']}: tensor lm_head.weight differs from "
                                 "model.embed_tokens.weight although config.json ties them (tie_word_embeddings)")
            self.ignored.add("lm_head.weight")

    @staticmethod
    def _weight_map(src: str) -> dict:
        for index, single in (("model.safetensors.index.json", "model.safetensors"),
                              ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if os.path.isfile(os.path.join(src, index)):
                return _index_files(src, index)
            if os.path.isfile(os.path.join(src, single)):
                return {None: os.path.join(src, single)}
        raise FileNotFoundError(f"{src}: no model.safetensors, pytorch_model.bin or an .index.json of either")

    @staticmethod
    def _open(file: str) -> Any:
        if file.endswith(".safetensors"):
            from safetensors import SafetensorError, safe_open

            try:
                return safe_open(file, framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
        return load_pth(file)

    def _read(self, name: str) -> torch.Tensor:
        reader = self.readers[self.where[name]]
        if isinstance(reader, dict):
            return reader[name]
        try:
            return reader.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged data
            raise ValueError(f"{self.where[name]}: tensor {name} is unreadable ({type(e).__name__}: {e})") from None

    def keys(self) -> dict[str, str]:
        return dict(self.where)

    def ours(self, entry: layout.Entry, name: str) -> tuple[np.ndarray, bool]:
        """Tensor `name` in our layout, C-contiguous; True if it is a new array (not the source's memory)."""
        torch_layout = to_numpy(self._read(name), f"{self.where[name]}: tensor {name}")
        try:
            ours = contiguous(layout.to_ours(entry, torch_layout, self.cfg, "hf"))
        except ValueError as e:
            raise ValueError(f"{self.where[name]}: {e}") from None
        return ours, not np.may_share_memory(ours, torch_layout)

    def done(self, name: str) -> None:
        reader = self.readers[self.where[name]]
        if isinstance(reader, dict):  # memory-mapped by torch.load (safetensors' get_tensor copies)
            release(reader[name])

    def prefetch(self, name: str) -> None:
        reader = self.readers[self.where[name]]
        if isinstance(reader, dict):
            prefetch(reader[name])

    def generation_config(self) -> bytes | None:
        """The folder's generation_config.json: the model's end tokens (Llama 3.1 lists three eos ids)."""
        path = os.path.join(self.src, GENERATION_CONFIG)
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read()

    def tokenizer(self) -> str | None:
        """The folder when it holds a tokenizer (tokenizer.model, else tokenizer.json + its side files)."""
        found = any(os.path.isfile(os.path.join(self.src, name)) for name in ("tokenizer.model", "tokenizer.json"))
        return self.src if found else None


def _config(path: str, parse: Any, *args: Any, **kwargs: Any) -> LlamaConfig:
    """A LlamaConfig from a source's config file, any problem named with the file."""
    try:
        return parse(*args, **kwargs)
    except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as e:
        raise ValueError(f"{path}: {e}") from None


def _index_files(src: str, index: str) -> dict[str, str]:
    """{tensor name: file} of an HF index. Every file must be a plain name inside SRC: a name that
    is absolute or climbs out with `..` (or a link that leads out) is refused, never opened."""
    path = os.path.join(src, index)
    weight_map = read_json(path, dict, "an HF index (an object with a 'weight_map')").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise ValueError(f"{path}: 'weight_map' must map tensor names to file names (strings)")
    root = os.path.realpath(src)
    for name, file in weight_map.items():
        target = os.path.realpath(os.path.join(src, file))
        if os.path.isabs(file) or not target.startswith(root + os.sep):
            raise ValueError(f"{path}: weight_map[{name!r}] = {file!r} leaves the model folder {src}; "
                             "an index may only name files inside it")
    return {k: os.path.join(src, v) for k, v in weight_map.items()}


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
