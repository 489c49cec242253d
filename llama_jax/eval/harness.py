"""An lm-evaluation-harness model (`lm_eval.api.model.LM`) over a llama_jax checkpoint, registered as `llama_jax`.

It follows the harness's own `hf` model request by request, so numbers compare with
`lm_eval --model hf` on the converted weights:
- text is encoded as HF's Llama tokenizer does by default (BOS first; `add_bos_token=False`
  turns that off, as the `hf` model argument of the same name does);
- loglikelihood scores (context + continuation)[-(max_length + 1):] and reports the
  continuation's log-probability and whether greedy decoding gives it;
- loglikelihood_rolling cuts each document into the harness's disjoint rolling windows with BOS
  as the prefix token. Like the `hf` model on a Llama tokenizer, the encoded document already
  starts with BOS, so the first window also scores log p(BOS | BOS);
- generate_until decodes greedily (or samples when do_sample) from the context left-truncated to
  max_length - max_gen_toks, and cuts the text at the first `until` string (and EOS's text); it
  stops at any of the tokenizer's end tokens (`Tokenizer.eos_ids`: Llama 3.1's three).
Requests go through `Scorer` (length buckets, a fixed batch: one compiled program per bucket) and
`Generator` (the on-device decode loop with stop strings checked as tokens arrive).
"""

from __future__ import annotations

import collections
from typing import Any

import lm_eval.models  # noqa: F401  (fills the registry's lazy entries before ours is added)
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from llama_jax.config import LlamaConfig
from llama_jax.eval.loading import eval_mesh, load_for_eval, tokenizer_path
from llama_jax.eval.scoring import Scorer
from llama_jax.generate import Generator
from llama_jax.tokenizer import Tokenizer

SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "seed")


@register_model("llama_jax")
class LlamaJaxLM(TemplateLM):
    """lm-eval's LM over a llama_jax model.

    `checkpoint` is a checkpoint directory (or training run) or a (LlamaConfig, params) pair;
    `tokenizer` its tokenizer (default: the checkpoint's). Once this
    module is imported the harness also builds it by name: lm_eval.simple_evaluate(model="llama_jax",
    model_args="checkpoint=DIR,batch_size=16,dtype=bfloat16", tasks=[...]).
    """

    def __init__(self, checkpoint: str | tuple[LlamaConfig, Any], tokenizer: str | Tokenizer | None = None,
                 batch_size: int = 8, dtype: str | None = None, tensor_parallel: int = 1, fsdp: int = 1,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool = True,
                 device: str | None = None, max_batch_size: int | None = None) -> None:
        """`device` and `max_batch_size` are accepted (the harness passes them to every model) and
        unused: JAX places the model (tensor_parallel / fsdp choose the mesh)."""
        super().__init__()
        mesh = eval_mesh(int(tensor_parallel), int(fsdp))
        if isinstance(checkpoint, tuple):
            model = checkpoint
        else:
            model = load_for_eval(str(checkpoint), dtype, mesh)
        self.generator = Generator(model, tokenizer_path(checkpoint, tokenizer), mesh=mesh)
        self.cfg, self.tok = self.generator.cfg, self.generator.tokenizer
        self.scorer = Scorer(self.generator.params, self.cfg, int(batch_size), mesh)
        self._max_length = int(max_length or self.cfg.max_seq_len)
        if not 2 <= self._max_length <= self.cfg.max_seq_len:
            raise ValueError(f"max_length must be in [2, {self.cfg.max_seq_len}], got {self._max_length}")
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = bool(add_bos_token)
        self.batch_size = int(batch_size)

    # --- what the harness asks of a model ----------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tok.model_path

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        ids = self.tok.encode(string, bos=bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy?) per (request text, context ids, continuation ids)."""
        sequences, n_scored = [], []
        for _, context, continuation in requests:
            if not 0 < len(continuation) <= self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens cannot be scored with "
                                 f"max_length {self.max_length}")
            sequences.append((context + continuation)[-(self.max_length + 1):])
            n_scored.append(len(continuation))
        totals, greedy = self.scorer(sequences, n_scored, desc=None if disable_tqdm else "loglikelihood")
        out = [(float(t), bool(g)) for t, g in zip(totals, greedy)]
        for (text, _, _), answer in zip(requests, out):
            if text is not None:
                self.cache_hook.add_partial("loglikelihood", text, answer)
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for context, target in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = collections.defaultdict(list)  # same settings -> one batch stream
        for i, req in enumerate(requests):
            groups[repr(sorted(req.args[1].items()))].append(i)
        out: list[str] = [""] * len(requests)
        eos_text = self.tok.id_to_piece(self.eot_token_id)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
            for members in groups.values():
                kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
                max_new = kwargs.pop("max_gen_toks")
                sampling = self._sampling(kwargs)
                room = self.max_length - max_new
                if room < 1:
                    raise ValueError(f"max_gen_toks {max_new} leaves no room for a context in max_length "
                                     f"{self.max_length}")
                prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=room) for i in members}
                ordered = sorted(members, key=lambda i: -len(prompts[i]))  # similar lengths share a batch
                for start in range(0, len(ordered), self.batch_size):
                    batch = ordered[start:start + self.batch_size]
                    texts = self.generator.complete_tokens([prompts[i] for i in batch], stop=until,
                                                           max_new_tokens=max_new, **sampling)
                    for i, text in zip(batch, texts):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(batch))
        return out

    @staticmethod
    def _sampling(kwargs: dict) -> dict:
        """The Generator's sampling keywords for the harness's (normalised) generation kwargs."""
        unknown = sorted(set(kwargs) - set(SAMPLING_KEYS))
        if unknown:
            raise ValueError(f"generation kwargs {unknown} are not supported by llama_jax "
                             f"(supported: until, max_gen_toks, {', '.join(SAMPLING_KEYS)})")
        if not kwargs.get("do_sample"):
            return {"temperature": 0.0}
        return {"temperature": float(kwargs.get("temperature", 1.0)), "top_p": float(kwargs.get("top_p", 1.0)),
                "top_k": int(kwargs.get("top_k", 0) or 0), "seed": int(kwargs.get("seed", 0) or 0)}
