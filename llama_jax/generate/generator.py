"""Text in, text out: `Generator` puts a tokenizer and the prompt formats (plain, Llama-2-chat,
Alpaca) in front of the token-level engine."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping, Sequence

import jax

from llama_jax import quant
from llama_jax.checkpoint import checkpoint_tokenizer, load_checkpoint
from llama_jax.config import LlamaConfig
from llama_jax.generate.engine import PREFILL_CHUNK, check_prefill_chunk, generate, generate_stream
from llama_jax.generate.stops import StopMatcher
from llama_jax.tokenizer import Tokenizer, format_alpaca
from sharding import shard_params


class Generator:
    """Text in, text out: a model (a checkpoint directory, or (cfg, params)) plus a tokenizer
    (default: the tokenizer the checkpoint or training run folder carries).

    Sampling keywords of every method (defaults as in Meta's examples): max_new_tokens=None (up to
    the model's context), temperature=0.6, top_p=0.9, top_k=0, seed=0. Every method also takes
    `stop`: a string or a list of them; a completion ends where the first of them appears (checked
    on the text as tokens arrive, generate/stops.py) and the stop text is not returned. With
    `mesh`, params are placed on it by the logical-axis rules and every call decodes under it.
    `dtype` casts the params; `quantize` ("int8", or QLoRA's "nf4") holds the seven projections
    quantised (llama_jax/quant.py; a checkpoint is quantised layer by layer while it loads).
    `prefill_chunk`: prompt positions per prefill step (None = the whole prompt at once). A
    completion ends at any of the tokenizer's end tokens (`Tokenizer.eos_ids`: its EOS and
    generation_config.json's eos_token_id list, which the converter stores with the checkpoint).
    """

    defaults = {"max_new_tokens": None, "temperature": 0.6, "top_p": 0.9, "top_k": 0, "seed": 0}

    def __init__(self, checkpoint_or_params: str | os.PathLike | tuple[LlamaConfig, Any],
                 tokenizer: Tokenizer | str | os.PathLike | None = None, mesh: jax.sharding.Mesh | None = None,
                 dtype: str | None = None, quantize: str | None = None,
                 prefill_chunk: int | None = PREFILL_CHUNK) -> None:
        if quantize is not None:
            quant.check_format(quantize)
        check_prefill_chunk(prefill_chunk)
        self.prefill_chunk = prefill_chunk
        if isinstance(checkpoint_or_params, (str, os.PathLike)):
            self.cfg, self.params = load_checkpoint(os.fspath(checkpoint_or_params), mesh=mesh, dtype=dtype,
                                                    quantize=quantize)
        elif isinstance(checkpoint_or_params, tuple) and len(checkpoint_or_params) == 2:
            self.cfg, self.params = checkpoint_or_params
            if not isinstance(self.cfg, LlamaConfig):
                raise TypeError(f"expected (LlamaConfig, params), got ({type(self.cfg).__name__}, ...)")
            if dtype is not None:
                self.params = jax.tree.map(lambda x: x.astype(dtype), self.params)
            if mesh is not None:
                self.params = shard_params(self.params, self.cfg, mesh)
            if quantize is not None:  # after placing: each weight is quantised shard by shard
                self.params = quant.quantize_params(self.params, self.cfg, quantize, mesh=mesh)
        else:
            raise TypeError("checkpoint_or_params must be a checkpoint directory or a (cfg, params) tuple, "
                            f"got {type(checkpoint_or_params).__name__}")
        if tokenizer is None:
            found = checkpoint_tokenizer(os.fspath(checkpoint_or_params)) \
                if isinstance(checkpoint_or_params, (str, os.PathLike)) else None
            if found is None:
                raise ValueError("no tokenizer given and the checkpoint carries none (tokenizer.model or "
                                 "tokenizer.json); pass the tokenizer (e.g. Meta's tokenizer.model)")
            tokenizer = found
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        if self.tokenizer.vocab_size != self.cfg.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} pieces but the model's vocab_size is "
                             f"{self.cfg.vocab_size}: they do not belong together")
        self.mesh = mesh

    def _settings(self, prompts: list[list[int]], sampling: Mapping[str, Any]) -> dict:
        unknown = sorted(set(sampling) - set(self.defaults))
        if unknown:
            raise TypeError(f"unknown sampling keyword(s) {unknown}; expected some of {sorted(self.defaults)}")
        settings = {**self.defaults, **sampling}
        if settings["max_new_tokens"] is None:
            longest = max(len(p) for p in prompts)
            if longest >= self.cfg.max_seq_len:
                raise ValueError(f"prompt of {longest} tokens leaves no room in the context "
                                 f"max_seq_len={self.cfg.max_seq_len}")
            settings["max_new_tokens"] = self.cfg.max_seq_len - longest
        return settings

    def _run(self, prompts: list[list[int]], sampling: Mapping[str, Any],
             stop: str | Sequence[str] | None) -> list[str]:
        settings = self._settings(prompts, sampling)
        matchers = [StopMatcher(stop, self.tokenizer.decode) for _ in prompts]
        check = (lambda i, tokens: matchers[i].update(tokens)) if matchers[0].stops else None
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            out = generate(self.params, self.cfg, prompts, eos_id=self.tokenizer.eos_ids, stop=check,
                           prefill_chunk=self.prefill_chunk, **settings)
        for m, tokens in zip(matchers, out):
            m.update(tokens)
        return [m.finish() for m in matchers]

    def stream(self, prompt: str | Sequence[int], stop: str | Sequence[str] | None = None,
               **sampling: Any) -> Iterator[str]:
        """Yield the completion of one prompt (text gets BOS; a token list is used as is) piece by
        piece as it is produced; the pieces join to exactly `complete`'s text. A piece never ends
        in half a UTF-8 character or in text that may still become a stop string."""
        ids = self.tokenizer.encode(prompt, bos=True) if isinstance(prompt, str) else list(prompt)
        settings = self._settings([ids], sampling)
        matcher = StopMatcher(stop, self.tokenizer.decode)
        check = (lambda _, tokens: matcher.update(tokens)) if matcher.stops else None
        new: list[int] = []
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            for pieces in generate_stream(self.params, self.cfg, [ids], eos_id=self.tokenizer.eos_ids, stop=check,
                                          prefill_chunk=self.prefill_chunk, **settings):
                new += pieces[0]
                matcher.update(new)
                text = matcher.take()
                if text:
                    yield text
        text = matcher.finish()
        if text:
            yield text

    def complete(self, texts: str | Sequence[str], stop: str | Sequence[str] | None = None,
                 **sampling: Any) -> str | list[str]:
        """Plain completion of one text or a list of texts (each gets BOS)."""
        single = isinstance(texts, str)
        if not single and not (isinstance(texts, Sequence) and texts and all(isinstance(t, str) for t in texts)):
            raise TypeError(f"complete expects a text (str) or a non-empty list of texts, got {type(texts).__name__}")
        prompts = [self.tokenizer.encode(t, bos=True) for t in ([texts] if single else texts)]
        out = self._run(prompts, sampling, stop)
        return out[0] if single else out

    def complete_tokens(self, prompts: Sequence[Sequence[int]], stop: str | Sequence[str] | None = None,
                        **sampling: Any) -> list[str]:
        """Completions of prompts given as token-id lists, used as they are (no BOS added)."""
        return self._run([list(p) for p in prompts], sampling, stop)

    def chat(self, dialogs: Sequence[Mapping[str, str]] | Sequence[Sequence[Mapping[str, str]]],
             stop: str | Sequence[str] | None = None, **sampling: Any) -> dict | list[dict]:
        """Chat answers (the tokenizer's chat format: Llama 2 or Llama 3): one dialog ([{"role", "content"}, ...] ending with a user turn) or a
        list of them -> {"role": "assistant", "content": ...} each."""
        single = len(dialogs) > 0 and isinstance(dialogs[0], Mapping)
        prompts = [self.tokenizer.encode_dialog(d) for d in ([dialogs] if single else dialogs)]
        out = [{"role": "assistant", "content": text} for text in self._run(prompts, sampling, stop)]
        return out[0] if single else out

    def alpaca(self, instruction: str, input: str = "", stop: str | Sequence[str] | None = None,
               **sampling: Any) -> str:
        """The response of an Alpaca-tuned model to one instruction (optional input), stripped."""
        prompt = self.tokenizer.encode(format_alpaca(instruction, input), bos=True)
        return self._run([prompt], sampling, stop)[0].strip()

    def prompt_ids(self, text: str, mode: str = "complete", input: str = "", history: Sequence[Mapping] = ()) -> list[int]:
        """The token ids the model sees for `text` in a mode: complete | alpaca | chat (after `history`)."""
        if mode == "complete":
            return self.tokenizer.encode(text, bos=True)
        if mode == "alpaca":
            return self.tokenizer.encode(format_alpaca(text, input), bos=True)
        if mode == "chat":
            return self.tokenizer.encode_dialog([*history, {"role": "user", "content": text}])
        raise ValueError(f"mode must be complete, alpaca or chat, got {mode!r}")
