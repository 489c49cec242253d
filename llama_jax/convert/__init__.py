"""Checkpoint conversion, streaming and safe: Meta / Hugging Face PyTorch weights -> llama_jax, and back.

torch_io.py (safe, memory-mapped reading) <- sources.py (Meta shards, HF folders) <- streaming.py
(the converter) ; export_hf.py (llama_jax -> HF) ; reference.py (Meta numpy / HF forwards, --verify) ;
__main__.py (the command line).
"""

from llama_jax.convert.export_hf import export_hf
from llama_jax.convert.reference import hf_llama, meta_reference_logits, verify
from llama_jax.convert.sources import HFSource, MetaSource, check_names
from llama_jax.convert.streaming import OUT_DTYPES, convert
from llama_jax.convert.torch_io import load_pth, to_numpy

__all__ = ["HFSource", "MetaSource", "OUT_DTYPES", "check_names", "convert", "export_hf", "hf_llama", "load_pth",
           "meta_reference_logits", "to_numpy", "verify"]
