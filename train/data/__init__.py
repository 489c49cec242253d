"""Training data: formats (files -> records -> examples), rows in memory, tokenized shards and
the streaming reader. `make_batches` turns a recipe's data block into per-host batches."""

from train.data.formats import alpaca_example, chat_example, load_alpaca
from train.data.rows import Batches, build_rows, model_batch, pack_rows, pad_rows, stream_rows

__all__ = ["Batches", "alpaca_example", "build_rows", "chat_example", "load_alpaca", "model_batch", "pack_rows",
           "pad_rows", "stream_rows"]
