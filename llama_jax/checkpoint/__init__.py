"""Checkpoint I/O: one on-disk format for the converter, the trainer, generation and export.

files.py (local/remote files, atomic staging) <- orbax_glue.py (Orbax internals) <- runs.py
(training-run folders) <- format.py (config.json + params/: save, load, open leaf by leaf).
"""

from llama_jax.checkpoint.files import (OutputExists, Staging, copy_file, is_remote, join, read_bytes, read_text,
                                        write_text)
from llama_jax.checkpoint.format import (checkpoint_tokenizer, load_checkpoint, open_checkpoint, params_dir, read_config,
                                         save_checkpoint, write_config)
from llama_jax.checkpoint.orbax_glue import StreamingWriter, leaf_paths
from llama_jax.checkpoint.runs import RunCheckpoints, complete_steps

__all__ = ["OutputExists", "RunCheckpoints", "Staging", "StreamingWriter", "checkpoint_tokenizer", "complete_steps", "copy_file", "is_remote", "join",
           "leaf_paths", "load_checkpoint", "open_checkpoint", "params_dir", "read_bytes", "read_config", "read_text",
           "save_checkpoint", "write_config", "write_text"]
