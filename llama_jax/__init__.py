"""llama_jax: the Llama family (LLaMA, Llama 2, CodeLlama, TinyLlama, Llama 3) in JAX/Flax (API: `import llama_jax as lj`)."""

from llama_jax.checkpoint import load_checkpoint, save_checkpoint
from llama_jax.config import PRESETS, LlamaConfig, RopeScaling
from llama_jax.generate import Generator, filter_probs, generate, generate_stream
from llama_jax.model import Llama, forward, init_cache, init_params, param_axes, param_shapes
from llama_jax.tokenizer import Tokenizer, format_alpaca

__all__ = ["PRESETS", "Llama", "LlamaConfig", "RopeScaling", "forward", "init_cache", "init_params", "param_axes",
           "param_shapes",
           "Tokenizer", "format_alpaca",
           "load_checkpoint", "save_checkpoint",
           "Generator", "filter_probs", "generate", "generate_stream"]
