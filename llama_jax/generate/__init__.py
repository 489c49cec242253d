"""Generation: the token-level engine (engine.py), the text-level Generator (generator.py), and
the command line (`python -m llama_jax.generate`, __main__.py)."""

from llama_jax.generate.engine import filter_probs, generate, generate_stream, sample
from llama_jax.generate.generator import Generator
from llama_jax.generate.stops import StopMatcher

__all__ = ["Generator", "StopMatcher", "filter_probs", "generate", "generate_stream", "sample"]
