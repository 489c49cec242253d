"""Training data: formats (files -> records -> examples), rows in memory, tokenized shards and
the streaming reader. `make_batches` turns a recipe's data block into per-host batches."""

from train.data.formats import alpaca_example, chat_example, load_alpaca
from train.data.rows import (Batches, build_rows, model_batch, pack_rows, pad_rows, stream_rows,
                             validation_batches)
from train.data.spec import held_out_batches, make_batches
from train.data.stream import Prefetch, StreamBatches

__all__ = ["Batches", "Prefetch", "StreamBatches", "alpaca_example", "build_rows", "chat_example", "held_out_batches",
           "load_alpaca", "make_batches", "model_batch", "pack_rows", "pad_rows", "stream_rows", "validation_batches"]
