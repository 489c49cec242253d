"""The streaming reader: tokenized shards -> rows -> this host's slice of each global batch.

Global row g of the run (batch k holds g = k*B ... k*B + B-1) is a pure function of (seed, g):
- a mixture assigns g to a data set: rows come in blocks of BLOCK, each holding round(w_i * BLOCK)
  rows of data set i (largest remainders) in a seeded order, so weights hold exactly per block;
- the data set's m-th row is row permute(m mod n, key(seed, i, epoch)) of epoch m // n, a keyed
  bijection of [0, n) (a Feistel network): no permutation table, so memory does not grow with
  the corpus, and every row is seen once per epoch.
The data state a checkpoint needs is therefore the step alone; a resumed run (any host count)
reads exactly the batches an uninterrupted one would. Each host reads only its B / hosts rows.

Rows follow train/data/rows.py: pretraining sets (no loss mask) are cut into windows of
row_len tokens overlapping by one, as `stream_rows`; SFT sets (loss mask) give one example per
row, or several packed (`pack_rows`), each truncated to max_len.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator, Sequence

import numpy as np

from train.data.rows import Rows, empty_rows, model_batch
from train.data.shards import TokenSet

BLOCK = 1024  # mixture block (rows)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a strong 64-bit hash, elementwise."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def key_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


def permute(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """index -> its image under a keyed bijection of [0, n): 4 Feistel rounds on the smallest
    even-bit domain >= n, with cycle walking back into [0, n)."""
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = _mix(np.arange(4, dtype=np.uint64) + np.uint64(key % (1 << 64)))

    def rounds(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    x = np.asarray(index, np.uint64)
    if x.size and int(x.max()) >= n:
        raise IndexError(f"permute: index {int(x.max())} outside [0, {n})")
    x = rounds(x)
    while (outside := x >= np.uint64(n)).any():
        x[outside] = rounds(x[outside])
    return x.astype(np.int64)


# --- row sources -----------------------------------------------------------------------------------


class WindowRows:
    """Pretraining: the token stream cut into rows of row_len overlapping by one token; a row
    start or a document start begins a segment with positions from 0 (as `stream_rows`)."""

    def __init__(self, tokens: TokenSet, row_len: int):
        self.tokens, self.row_len, self.stride = tokens, row_len, row_len - 1
        self.num_rows = max(0, (tokens.n_tokens - 1) // self.stride)
        self.summary = {"documents": tokens.manifest["docs"], "tokens": tokens.n_tokens, "truncated": 0, "skipped": 0}

    def rows(self, ids: np.ndarray) -> Rows:
        out = empty_rows(len(ids), self.row_len)
        spans = [(int(r) * self.stride, int(r) * self.stride + self.row_len) for r in ids]
        for i, (tokens, starts, _) in enumerate(self.tokens.read(spans)):
            starts[0] = True
            seg = np.cumsum(starts)
            first = np.flatnonzero(starts)
            out["tokens"][i], out["segment_ids"][i] = tokens, seg
            out["positions"][i] = np.arange(self.row_len) - first[seg - 1]
            out["loss_mask"][i] = 1  # a BOS starts a segment, so model_batch never makes it a target
        return out


class ExampleRows:
    """SFT: examples (documents with a loss mask) truncated to max_len, one per row or packed
    greedily in stored order. Holds a start/length per example (16 bytes each)."""

    def __init__(self, tokens: TokenSet, row_len: int, pack: bool):
        self.tokens, self.row_len = tokens, row_len
        max_len = row_len - 1
        starts = tokens.document_starts()
        lengths = np.diff(np.append(starts, tokens.n_tokens))
        long = np.flatnonzero(lengths > max_len)
        keep = np.ones(len(starts), bool)
        if len(long):  # a truncated example with no target left teaches nothing: skip it
            heads = tokens.read([(int(starts[i]), int(starts[i]) + max_len) for i in long])
            keep[long] = [mask.any() for _, _, mask in heads]
        self.starts, self.lengths = starts[keep], np.minimum(lengths[keep], max_len)
        self.summary = {"documents": len(starts), "tokens": tokens.n_tokens, "truncated": len(long),
                        "skipped": int((~keep).sum())}
        if pack:  # row r holds examples first[r] .. first[r+1]-1
            first, used = [0], 0
            for i, n in enumerate(self.lengths.tolist()):
                if used + n > row_len:
                    first.append(i)
                    used = 0
                used += n
            self.first = np.asarray(first + [len(self.lengths)], np.int64)
        else:
            self.first = np.arange(len(self.lengths) + 1, dtype=np.int64)
        self.num_rows = len(self.first) - 1 if len(self.lengths) else 0

    def rows(self, ids: np.ndarray) -> Rows:
        out = empty_rows(len(ids), self.row_len)
        members = [range(self.first[r], self.first[r + 1]) for r in ids]
        flat = [e for m in members for e in m]
        data = iter(self.tokens.read([(int(self.starts[e]), int(self.starts[e] + self.lengths[e])) for e in flat]))
        for i, m in enumerate(members):
            at = 0
            for seg, _ in enumerate(m, 1):
                tokens, _, mask = next(data)
                n = len(tokens)
                out["tokens"][i, at: at + n], out["loss_mask"][i, at: at + n] = tokens, mask
                out["segment_ids"][i, at: at + n], out["positions"][i, at: at + n] = seg, np.arange(n)
                at += n
        return out


def open_rows(folder: str, row_len: int, pack: bool, fingerprint: str | None = None) -> WindowRows | ExampleRows:
    """The row source of one tokenized folder, checked against the training tokenizer."""
    tokens = TokenSet(folder)
    if fingerprint is not None and tokens.fingerprint != fingerprint:
        raise ValueError(f"{folder} was tokenized with another tokenizer (fingerprint {tokens.fingerprint}, the "
                         f"recipe's tokenizer has {fingerprint}); tokenize it again with the recipe's tokenizer")
    source = ExampleRows(tokens, row_len, pack) if tokens.has_mask else WindowRows(tokens, row_len)
    if source.num_rows == 0:
        raise ValueError(f"{folder}: {tokens.n_tokens} tokens make no row of {row_len} tokens")
    return source


# --- mixture and batches ---------------------------------------------------------------------------


def block_counts(weights: Sequence[float], block: int = BLOCK) -> np.ndarray:
    """Rows of each data set in a block of `block` rows: proportional, largest remainders first."""
    w = np.asarray(weights, np.float64) / np.sum(weights)
    exact = w * block
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: block - counts.sum()]:
        counts[i] += 1
    return counts


class StreamBatches:
    """Global batch k -> this host's rows, read from one or more tokenized data sets (module docstring)."""

    def __init__(self, sources: Sequence[WindowRows | ExampleRows], weights: Sequence[float] | None, batch_size: int,
                 seed: int, process_index: int = 0, process_count: int = 1):
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {process_count} hosts")
        self.sources, self.batch_size, self.seed = list(sources), batch_size, seed
        sizes = [s.num_rows for s in self.sources]
        self.weights = list(weights) if weights else sizes  # no weights: each row about once per epoch
        if len(self.weights) != len(self.sources) or min(self.weights) <= 0:
            raise ValueError(f"data.weights {list(weights or [])} must give one positive weight per data.train entry "
                             f"({len(self.sources)})")
        self.counts = block_counts(self.weights)
        if (self.counts == 0).any():
            raise ValueError(f"data.weights {self.weights}: a weight below 1/{BLOCK} of the total is never sampled")
        self.num_rows = int(sum(sizes))
        self.per_epoch = max(1, self.num_rows // batch_size)
        self.local = batch_size // process_count
        self.offset = process_index * self.local
        self._block = (-1, None, None)

    def _labels(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(data set of each row of a block, its rank among that data set's rows in the block)."""
        if self._block[0] != block:
            labels = np.repeat(np.arange(len(self.counts)), self.counts)
            labels = labels[permute(np.arange(BLOCK), BLOCK, key_of(self.seed, 1, block))]
            rank = np.zeros(BLOCK, np.int64)
            for i in range(len(self.counts)):
                rank[labels == i] = np.arange(self.counts[i])
            self._block = (block, labels, rank)
        return self._block[1], self._block[2]

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global rows -> (data set, row of that data set)."""
        block, p = np.divmod(g, BLOCK)
        dataset, m = np.zeros(len(g), np.int64), np.zeros(len(g), np.int64)
        for b in np.unique(block):
            labels, rank = self._labels(int(b))
            here = block == b
            dataset[here] = labels[p[here]]
            m[here] = b * self.counts[dataset[here]] + rank[p[here]]  # the m-th row drawn from that data set
        sizes = np.asarray([s.num_rows for s in self.sources])[dataset]
        epoch, pos = np.divmod(m, sizes)
        index = np.zeros(len(g), np.int64)
        for d, e in {(int(d), int(e)) for d, e in zip(dataset, epoch)}:
            here = (dataset == d) & (epoch == e)
            index[here] = permute(pos[here], self.sources[d].num_rows, key_of(self.seed, 2, d, e))
        return dataset, index

    def global_rows(self, k: int) -> np.ndarray:
        return np.arange(k * self.batch_size, (k + 1) * self.batch_size, dtype=np.int64)

    def rows(self, g: np.ndarray) -> Rows:
        dataset, index = self.locate(g)
        out = empty_rows(len(g), self.sources[0].row_len)
        for d in np.unique(dataset):
            chosen = np.flatnonzero(dataset == d)
            for name, values in self.sources[d].rows(index[chosen]).items():
                out[name][chosen] = values
        return out

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        g = self.global_rows(k)[self.offset: self.offset + self.local]
        return model_batch(self.rows(g))


class Prefetch:
    """batches(k) for k = start .. stop-1, computed up to `depth` steps ahead in a background
    thread so the accelerator does not wait on reading. `waited_s` is the time the consumer spent
    waiting for data (the reading overhead the training loop actually sees)."""

    def __init__(self, batches: Callable[[int], dict], start: int, stop: int, depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop_event = threading.Event()
        self.waited_s = 0.0
        self.thread = threading.Thread(target=self._work, args=(batches, start, stop), daemon=True, name="prefetch")
        self.thread.start()

    def _work(self, batches: Callable[[int], dict], start: int, stop: int) -> None:
        for k in range(start, stop):
            try:
                item = batches(k)
            except BaseException as e:  # handed to the consumer, raised there
                item = e
            while not self.stop_event.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self.stop_event.is_set() or isinstance(item, BaseException):
                return
        self.queue.put(StopIteration())

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        t = time.perf_counter()
        item = self.queue.get()
        self.waited_s += time.perf_counter() - t
        if isinstance(item, StopIteration):
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
