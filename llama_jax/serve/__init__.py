"""The OpenAI-compatible HTTP server: wire format (protocol.py), the app (app.py) in front of the
continuous batcher (llama_jax/generate/batcher.py), and the command line (`python -m llama_jax.serve`)."""

from llama_jax.serve.app import create_app, running

__all__ = ["create_app", "running"]
