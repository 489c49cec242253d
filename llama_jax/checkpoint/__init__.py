"""Checkpoint I/O: one on-disk format for the converter, the trainer, generation and export.

integrity.py (checksums.json) and locks.py (one writer per folder, leftovers) <- files.py
(local/remote files, atomic staging) <- orbax_glue.py (Orbax internals) <- runs.py (training-run
folders) <- format.py (config.json + params/: save, load, open leaf by leaf).
"""

from llama_jax.checkpoint.files import (OutputExists, Staging, copy_file, is_remote, join, read_bytes, read_json,
                                        read_text, write_text)
from llama_jax.checkpoint.format import (Leaf, checkpoint_tokenizer, head_layout, load_adapters, load_checkpoint,
                                         lora_base_record, open_checkpoint, params_dir, read_config, read_head,
                                         read_lora_base, save_checkpoint, write_config, write_lora_base)
from llama_jax.checkpoint.orbax_glue import StreamingWriter, leaf_paths
from llama_jax.checkpoint.runs import RunCheckpoints, complete_steps

__all__ = ["Leaf", "OutputExists", "RunCheckpoints", "Staging", "StreamingWriter", "checkpoint_tokenizer", "complete_steps",
           "copy_file", "head_layout", "is_remote", "join", "leaf_paths", "load_adapters", "load_checkpoint", "lora_base_record",
           "open_checkpoint", "params_dir", "read_bytes", "read_config", "read_head", "read_json", "read_lora_base", "read_text",
           "save_checkpoint", "write_config", "write_lora_base", "write_text"]
