"""llama_jax: LLaMA and Llama 2 in JAX/Flax."""

import warnings

# `python -m llama_jax.generate` runs a module this package also imports (for lj.generate);
# runpy's warning about that is noise for users, not a problem.
warnings.filterwarnings("ignore", message=r"'llama_jax\.\w+' found in sys\.modules", category=RuntimeWarning)

from llama_jax.checkpoint import load_checkpoint, save_checkpoint
from llama_jax.config import PRESETS, LlamaConfig
from llama_jax.generate import Generator, filter_probs, generate, generate_stream
from llama_jax.model import Llama, forward, init_cache, init_params, param_axes, param_shapes
from llama_jax.tokenizer import Tokenizer, format_alpaca

__all__ = ["PRESETS", "Llama", "LlamaConfig", "forward", "init_cache", "init_params", "param_axes",
           "param_shapes",
           "Tokenizer", "format_alpaca",
           "load_checkpoint", "save_checkpoint",
           "Generator", "filter_probs", "generate", "generate_stream"]
