"""torch -> llama_jax: stream every tensor of a source into a checkpoint, a few tensors in flight."""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from llama_jax import layout
from llama_jax.checkpoint import Staging, StreamingWriter, join, leaf_paths, write_config
from llama_jax.checkpoint.files import check_apart
from llama_jax.config import LlamaConfig
from llama_jax.convert.sources import HFSource, MetaSource, check_names
from llama_jax.model import param_shapes
from llama_jax.tokenizer import GENERATION_CONFIG, Tokenizer

OUT_DTYPES = ("bfloat16", "float32")


def itemsize(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else 4


def with_end_tokens(tokenizer: Tokenizer, source: MetaSource | HFSource) -> Tokenizer:
    """The tokenizer to store with the checkpoint, carrying the model folder's generation_config.json
    (its end tokens: Llama 3.1's three eos ids), which generate, serve and the harness read from
    there (`Tokenizer.eos_ids`); the model's file wins over one beside a tokenizer from elsewhere."""
    config = source.generation_config()
    if config is None or tokenizer.files.get(GENERATION_CONFIG) == config:
        return tokenizer
    try:
        return Tokenizer.from_files({**tokenizer.files, GENERATION_CONFIG: config}, tokenizer.model_path)
    except ValueError as e:
        raise ValueError(f"{source.src}/{GENERATION_CONFIG} does not fit the tokenizer: {e}") from None


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
    if tokenizer is not None:
        try:  # a tokenizer file or folder (or Hub repo id), or an error naming it
            tokenizer = Tokenizer(tokenizer)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--tokenizer {tokenizer}: {e}") from None
        tokenizer = with_end_tokens(tokenizer, source)
    check_apart(out, (source.src,))
    items = [(entry, layer, name, int(np.prod(layout.torch_shape(entry, cfg))))
             for entry, layer, name in layout.names(cfg, source.fmt)]
    source_size, out_size = itemsize(source.dtype or "float32"), itemsize(dtype)
    with Staging(out, overwrite, sources=(source.src,)) as stage, tqdm(
            total=sum(n for *_, n in items) * out_size, unit="B", unit_scale=True, desc="convert",
            disable=not progress) as bar:
        shapes = {leaf: s.shape for leaf, s in leaf_paths(param_shapes(cfg))}
        writer = StreamingWriter(join(stage.path, "params"), shapes, dtype)

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
        stage.known.update({f"params/{name}": d for name, d in writer.digests.items()})
        if tokenizer is not None:
            tokenizer.save(stage.path)
        write_config(stage.path, cfg)
    return cfg

