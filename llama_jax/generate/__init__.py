"""Generation: the token-level engine (engine.py), continuous batching (batcher.py), text pieces and
stop strings (stops.py), the text-level Generator (generator.py), and the command line
(`python -m llama_jax.generate`, __main__.py)."""

from llama_jax.generate.batcher import Batcher, Request
from llama_jax.generate.engine import filter_probs, generate, generate_stream, sample
from llama_jax.generate.generator import Generator
from llama_jax.generate.stops import StopMatcher

__all__ = ["Batcher", "Generator", "Request", "StopMatcher", "filter_probs", "generate", "generate_stream",
           "sample"]
