"""Training data: token examples -> fixed-length rows -> deterministic, resumable, per-host batches.

An example is (tokens, loss_mask) with loss_mask[i] = 1 when token i is a training target (it is
predicted from the tokens before it). Three sources make examples:
- pretraining text: each document is BOS + text + EOS, every token but BOS is a target;
- Alpaca SFT (`alpaca_example`): BOS + prompt masked, output + EOS targets, Stanford's templates;
- Llama-2-chat dialogs: only the assistant answers (and their EOS) are targets.

Rows hold `max_len + 1` tokens so the model sees `max_len` inputs (a multiple of 128 stays one).
Packed rows carry segment ids (1, 2, ... per example, 0 = padding) and positions that restart
per example, so attention never crosses examples and each one is computed as if alone.

The order is a pure function of (seed, batch index): batch k of epoch e takes rows
permutation(seed, e)[...]; the data state saved in a checkpoint is just the next batch index, so
a resumed run sees exactly the batches an uninterrupted one would. Each host builds the same row
table and keeps only its slice of every global batch.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from llama_jax.checkpoint.files import read_json
from llama_jax.tokenizer import Tokenizer, format_alpaca

Example = tuple[list[int], list[int]]  # (tokens, loss_mask)


# --- examples ------------------------------------------------------------------------------


def _encode_alpaca(tokenizer: Tokenizer, example: Any, where: str = "example") -> Example:
    _check_alpaca(example, where)
    prompt_text = format_alpaca(example["instruction"], example.get("input", ""))
    prompt = tokenizer.encode(prompt_text, bos=True, eos=False)
    full = tokenizer.encode(prompt_text + example["output"], bos=True, eos=True)
    # The target follows "### Response:" directly, so a tokenizer could merge across the boundary.
    # Then only the ids the prompt and the full text share are masked: no output text escapes the loss.
    n_prompt = len(prompt)
    if full[:n_prompt] != prompt:
        n_prompt = next(i for i, (a, b) in enumerate(zip(prompt, full)) if a != b)
    return full, [0] * n_prompt + [1] * (len(full) - n_prompt)


def _truncate(example: Example, max_len: int) -> tuple[Example, bool]:
    tokens, mask = example
    return (tokens[:max_len], mask[:max_len]), len(tokens) > max_len


def alpaca_example(tokenizer: Tokenizer, example: dict, max_len: int = 512) -> Example:
    """(tokens, loss_mask) of one Alpaca record, as Stanford Alpaca trains it.

    tokens = BOS + prompt + output + EOS (prompt from the exact Alpaca templates), truncated to
    `max_len`; loss_mask is 0 over BOS + prompt and 1 over output + EOS.
    """
    return _truncate(_encode_alpaca(tokenizer, example), max_len)[0]


def chat_example(tokenizer: Tokenizer, dialog: Sequence[dict], max_len: int = 4096) -> Example:
    """(tokens, loss_mask) of a Llama-2-chat dialog: only assistant answers and their EOS are targets."""
    return _truncate(tokenizer.encode_dialog_turns(dialog), max_len)[0]


def _read_json_list(path: str) -> list:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path!r}")
    return read_json(path, list, "a JSON list of records")


def _check_alpaca(example: Any, where: str) -> None:
    if not isinstance(example, dict) or not isinstance(example.get("instruction"), str) \
            or not isinstance(example.get("output"), str) or not isinstance(example.get("input", ""), str):
        raise ValueError(f"{where}: expected an Alpaca record {{'instruction': str, 'input': str (optional), "
                         f"'output': str}}, got {str(example)[:200]!r}")


def load_alpaca(path: str) -> list[dict]:
    """The records of an Alpaca JSON file (a list of {instruction, input, output}), each checked."""
    records = _read_json_list(path)
    for i, record in enumerate(records):
        _check_alpaca(record, f"{path}[{i}]")
    return records


def read_documents(path: str, text_key: str = "text") -> list[str]:
    """Documents of a pretraining file: a .jsonl file holds one {text_key: ...} per line; any
    other file is plain text with documents separated by blank lines."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path!r}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); expected UTF-8 documents") from None
    if not path.endswith(".jsonl"):
        return [d.strip() for d in text.split("\n\n") if d.strip()]
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e or 'nested too deeply'})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise ValueError(f"{path}:{n}: expected a JSON object with a string {text_key!r} field")
            docs.append(record[text_key])
    return docs


# --- rows ----------------------------------------------------------------------------------

Rows = dict  # "tokens", "loss_mask", "segment_ids", "positions": int32 arrays (N, row_len)


def _empty_rows(n: int, row_len: int) -> Rows:
    return {k: np.zeros((n, row_len), np.int32) for k in ("tokens", "loss_mask", "segment_ids", "positions")}


def pad_rows(examples: Sequence[Example], row_len: int) -> Rows:
    """One example per row, right-padded (segment id 0, no loss)."""
    rows = _empty_rows(len(examples), row_len)
    for i, (tokens, mask) in enumerate(examples):
        n = len(tokens)
        if n > row_len:
            raise ValueError(f"example {i} has {n} tokens, more than the row length {row_len}")
        rows["tokens"][i, :n], rows["loss_mask"][i, :n] = tokens, mask
        rows["segment_ids"][i, :n], rows["positions"][i, :n] = 1, np.arange(n)
    return rows


def pack_rows(examples: Sequence[Example], row_len: int) -> Rows:
    """Examples placed greedily in order into rows of `row_len`, each its own segment."""
    placed: list[list[Example]] = [[]]
    used = 0
    for i, ex in enumerate(examples):
        n = len(ex[0])
        if n > row_len:
            raise ValueError(f"example {i} has {n} tokens, more than the row length {row_len}")
        if used + n > row_len:
            placed.append([])
            used = 0
        placed[-1].append(ex)
        used += n
    placed = [p for p in placed if p]
    rows = _empty_rows(len(placed), row_len)
    for r, group in enumerate(placed):
        start = 0
        for seg, (tokens, mask) in enumerate(group, 1):
            end = start + len(tokens)
            rows["tokens"][r, start:end], rows["loss_mask"][r, start:end] = tokens, mask
            rows["segment_ids"][r, start:end], rows["positions"][r, start:end] = seg, np.arange(end - start)
            start = end
    return rows


def stream_rows(documents: Sequence[list[int]], row_len: int) -> Rows:
    """Pretraining: documents (BOS..EOS) concatenated and cut into rows of `row_len` that overlap by
    one token, so every token is a target exactly once. A document cut at a row start continues
    there as a new segment with positions restarting at 0 (a long document never exceeds the
    model's context)."""
    tokens = np.concatenate([np.asarray(d, np.int32) for d in documents])
    doc_ids = np.concatenate([np.full(len(d), i + 1, np.int32) for i, d in enumerate(documents)])
    stride = row_len - 1
    n = (len(tokens) - 1) // stride
    if n == 0:
        raise ValueError(f"pretraining data has {len(tokens)} tokens, fewer than one row of {row_len}")
    rows = _empty_rows(n, row_len)
    for r in range(n):
        t = tokens[r * stride: r * stride + row_len]
        d = doc_ids[r * stride: r * stride + row_len]
        seg = np.cumsum(np.concatenate([[1], d[1:] != d[:-1]])).astype(np.int32)
        starts = np.flatnonzero(np.concatenate([[True], seg[1:] != seg[:-1]]))
        pos = np.arange(row_len) - starts[seg - 1]
        rows["tokens"][r], rows["segment_ids"][r], rows["positions"][r] = t, seg, pos
        rows["loss_mask"][r] = 1  # a BOS starts a new segment, so model_batch never makes it a target
    return rows


def model_batch(rows: Rows) -> dict[str, np.ndarray]:
    """Rows of length T+1 -> the step's inputs of length T.

    weights[i] = 1 where targets[i] (the next token) is a training target in the same segment.
    """
    seg = rows["segment_ids"]
    same_segment = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return {
        "tokens": rows["tokens"][:, :-1],
        "targets": rows["tokens"][:, 1:],
        "weights": (rows["loss_mask"][:, 1:] * same_segment).astype(np.float32),
        "positions": rows["positions"][:, :-1],
        "segment_ids": seg[:, :-1],
    }


def build_rows(fmt: str, paths: Sequence[str], tokenizer: Tokenizer, max_len: int, pack: bool,
               seed: int = 0, text_key: str = "text") -> tuple[Rows, dict]:
    """The row table of a data set and a summary (examples, truncated count, tokens, targets)."""
    row_len = max_len + 1
    truncated = 0
    examples: list[Example] = []
    if fmt == "pretrain":
        docs = [tokenizer.encode(text, bos=True, eos=True) for p in paths for text in read_documents(p, text_key)]
        if not docs:
            raise ValueError(f"no documents (no text) in {list(paths)}")
        rows = stream_rows(docs, row_len)
        examples_count = len(docs)
    else:
        for path in paths:
            for i, record in enumerate(_read_json_list(path)):
                where = f"{path}[{i}]"
                if fmt == "alpaca":
                    ex = _encode_alpaca(tokenizer, record, where)
                else:
                    dialog = record.get("messages", record.get("dialog")) if isinstance(record, dict) else record
                    if not isinstance(dialog, list):
                        raise ValueError(f"{where}: expected a dialog (a list of {{role, content}} messages)")
                    try:
                        ex = tokenizer.encode_dialog_turns(dialog)
                    except (ValueError, TypeError, KeyError, AttributeError) as e:
                        raise ValueError(f"{where}: {e}") from None
                ex, cut = _truncate(ex, max_len)
                truncated += cut
                if sum(ex[1]) > 0:  # an example whose targets were all truncated teaches nothing
                    examples.append(ex)
        if not examples:
            raise ValueError(f"no training examples with targets in {list(paths)}")
        order = np.random.default_rng(seed).permutation(len(examples))
        examples = [examples[i] for i in order]
        rows = pack_rows(examples, row_len) if pack else pad_rows(examples, row_len)
        examples_count = len(examples)
    summary = {"examples": examples_count, "truncated": truncated, "rows": len(rows["tokens"]),
               "row_len": row_len, "targets": int(model_batch(rows)["weights"].sum())}
    return rows, summary


class Batches:
    """Global batch number k -> this host's rows, the same on every run with the same seed.

    Epoch e visits rows in np.random.default_rng([seed, e]).permutation order; the last partial
    batch of an epoch is dropped. The data-iterator state is the next batch index.
    """

    def __init__(self, rows: Rows, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.num_rows = len(rows["tokens"])
        if self.num_rows < batch_size:
            raise ValueError(f"the data set has {self.num_rows} rows, fewer than batch_size {batch_size}")
        if batch_size % process_count != 0:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {process_count} hosts")
        self.per_epoch = self.num_rows // batch_size
        self.local = batch_size // process_count
        self.offset = process_index * self.local
        self._perm_epoch, self._perm = -1, None

    def global_indices(self, k: int) -> np.ndarray:
        epoch, i = divmod(k, self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm_epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        return self._perm[i * self.batch_size: (i + 1) * self.batch_size]

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        idx = self.global_indices(k)[self.offset: self.offset + self.local]
        return model_batch({name: a[idx] for name, a in self.rows.items()})
