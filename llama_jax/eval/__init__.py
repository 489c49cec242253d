"""Evaluation: batched log-likelihoods (scoring.py), sliding-window perplexity (perplexity.py), the
lm-evaluation-harness model (harness.py, imported on its own: it needs lm_eval) and the command
line (`python -m llama_jax.eval perplexity|harness`, __main__.py)."""

from llama_jax.eval.loading import eval_mesh, load_for_eval
from llama_jax.eval.perplexity import perplexity, read_texts, sliding_windows
from llama_jax.eval.scoring import Scorer

__all__ = ["Scorer", "eval_mesh", "load_for_eval", "perplexity", "read_texts", "sliding_windows"]
