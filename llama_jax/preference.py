"""Preference pairs: records in the common schemas -> (prompt, chosen, rejected, margin) -> two token
sequences that share the prompt, with the loss (and the reward) on the answer tokens only.

Record schemas, told apart by their fields (a bad record is refused, naming where it is):
- TRL's standard form: {"prompt": str, "chosen": str, "rejected": str};
- a chat prompt: {"prompt" or "messages": [{"role", "content"}, ... ending with a user turn],
  "chosen": str or [one assistant message], "rejected": the same};
- implicit prompt (UltraFeedback-binarized, TRL's conversational form): "chosen" and "rejected" are
  whole dialogs that agree on every message but the last (an assistant answer); a "prompt" field
  beside them is then ignored;
- Anthropic-HH: "chosen" and "rejected" are whole texts "\\n\\nHuman: ...\\n\\nAssistant: ..."
  (no prompt field); they are read as dialogs (Human -> user, Assistant -> assistant), which must
  agree on every turn but the last answer.
Optional: a per-pair margin in the field named by `margin_key` (the Llama 2 reward loss's m), and
an Alpaca "input" beside a string prompt.

Templates, as in SFT: "chat" lays a prompt out in the tokenizer's chat format (`encode_dialog_turns`:
Llama-2-chat, or Llama 3's), a string prompt being one user turn; "alpaca" puts a string prompt (or
a single user turn) into Stanford's prompt as the instruction (`format_alpaca`, the record's "input"
as its input). Each answer is followed by EOS (Llama 3 chat: <|eot_id|>).

Length: a sequence longer than max_len loses prompt tokens first, from the left, keeping the first
token (BOS) and the end of the prompt (the part next to the answer); both sequences of a pair lose
the same number. A pair whose longer answer does not fit in max_len - 1 tokens (BOS + answer) is
skipped (returned as None; the caller counts and reports it), never cut inside an answer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Iterator

from llama_jax.checkpoint.files import read_bytes
from llama_jax.tokenizer import Tokenizer, format_alpaca

TEMPLATES = ("chat", "alpaca")
TokenSeq = tuple[list[int], list[int]]  # (ids, loss_mask)
SCHEMA = ("a preference record {'prompt' (str) or 'messages' (chat turns), 'chosen', 'rejected'}, "
          "whole chosen/rejected dialogs, or Anthropic-HH chosen/rejected texts")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclasses.dataclass(frozen=True)
class Pair:
    """One preference: a prompt (a string, or chat messages ending with a user turn), the preferred and
    the dispreferred answer, a margin (0 when the record has none) and an Alpaca input ("" if none)."""

    prompt: str | tuple
    chosen: str
    rejected: str
    margin: float = 0.0
    input: str = ""


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"{where}: {message}")


def _messages(value: Any, where: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _fail(where, f"field {field!r}: expected a non-empty list of {{'role', 'content'}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _fail(where, f"field '{field}[{i}]': expected {{'role': str, 'content': str}}, got {str(m)[:80]!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def hh_dialog(text: str, where: str, field: str) -> list[dict]:
    """An Anthropic-HH text ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat messages."""
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise _fail(where, f"field {field!r}: no prompt field, and the text is not an Anthropic-HH dialog "
                           f"('\\n\\nHuman: ... \\n\\nAssistant: ...'); expected {SCHEMA}")
    role = {"Human": "user", "Assistant": "assistant"}
    return [{"role": role[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2])]


def _split_dialogs(chosen: list[dict], rejected: list[dict], where: str) -> tuple[tuple, str, str]:
    """(shared prompt messages, chosen answer, rejected answer) of two whole dialogs."""
    for name, d in (("chosen", chosen), ("rejected", rejected)):
        if d[-1]["role"] != "assistant" or len(d) < 2:
            raise _fail(where, f"field {name!r}: a whole dialog must end with an assistant answer after a prompt, "
                               f"got roles {[m['role'] for m in d]}")
    if chosen[:-1] != rejected[:-1]:
        at = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)) - 1)
        raise _fail(where, f"the chosen and rejected dialogs differ at message {at}, before their last answers; "
                           "a pair must share its prompt")
    return tuple(chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"]


def _answer(value: Any, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
        return value[0]["content"]
    raise _fail(where, f"field {field!r}: expected a string or one assistant message, got {str(value)[:80]!r}")


def pair_of(record: Any, where: str, margin_key: str = "margin") -> Pair:
    """The Pair of one record in any of the schemas of the module docstring."""
    if not isinstance(record, dict):
        raise _fail(where, f"expected a JSON object ({SCHEMA}), got {str(record)[:120]!r}")
    missing = [k for k in ("chosen", "rejected") if record.get(k) is None]
    if missing:
        raise _fail(where, f"field {missing[0]!r} is missing; expected {SCHEMA}")
    chosen, rejected = record["chosen"], record["rejected"]
    prompt_field = next((k for k in ("prompt", "messages") if record.get(k) is not None), None)
    whole = isinstance(chosen, list) and isinstance(rejected, list) and (len(chosen) > 1 or len(rejected) > 1
                                                                            or prompt_field is None)
    if whole:  # implicit prompt: two whole dialogs
        prompt, chosen, rejected = _split_dialogs(_messages(chosen, where, "chosen"),
                                                  _messages(rejected, where, "rejected"), where)
    elif prompt_field is None:
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise _fail(where, f"no prompt field; expected {SCHEMA}")
        prompt, chosen, rejected = _split_dialogs(hh_dialog(chosen, where, "chosen"),
                                                  hh_dialog(rejected, where, "rejected"), where)
    else:
        value = record[prompt_field]
        if not isinstance(value, (str, list)):
            raise _fail(where, f"field {prompt_field!r}: expected a string or a list of messages, got "
                               f"{type(value).__name__}")
        prompt = value if isinstance(value, str) else tuple(_messages(value, where, prompt_field))
        chosen, rejected = _answer(chosen, where, "chosen"), _answer(rejected, where, "rejected")
    margin = record.get(margin_key)
    if margin is None:
        margin = 0.0
    elif isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise _fail(where, f"field {margin_key!r} (the margin): expected a finite number, got {margin!r}")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise _fail(where, f"field 'input': expected a string, got {type(extra).__name__}")
    return Pair(prompt, chosen, rejected, float(margin), extra)


def prompt_of(record: Any, where: str) -> tuple[str | tuple, str]:
    """(prompt, Alpaca input) of a prompt-only record: {"prompt": str or messages} or {"messages": [...]}
    (rejection sampling's input; chosen/rejected fields, if any, are ignored)."""
    if not isinstance(record, dict):
        raise _fail(where, f"expected a JSON object {{'prompt': ...}} or {{'messages': [...]}}, got {str(record)[:120]!r}")
    field = next((k for k in ("prompt", "messages") if record.get(k) is not None), None)
    if field is None:
        raise _fail(where, "field 'prompt' (or 'messages') is missing; expected {'prompt': str} or "
                           "{'messages': [chat turns ending with a user turn]}")
    value = record[field]
    if not isinstance(value, (str, list)):
        raise _fail(where, f"field {field!r}: expected a string or a list of messages, got {type(value).__name__}")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise _fail(where, f"field 'input': expected a string, got {type(extra).__name__}")
    return (value if isinstance(value, str) else tuple(_messages(value, where, field))), extra


# --- pairs -> token sequences ------------------------------------------------------------------------


def check_template(template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r} is not one of {', '.join(TEMPLATES)}")
    return template


def prompt_dialog(prompt: str | tuple) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def alpaca_instruction(prompt: str | tuple, where: str) -> str:
    """The instruction of a prompt under the Alpaca template: a string, or a dialog of one user turn."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    raise _fail(where, f"the alpaca template takes a string prompt or one user turn, got roles "
                       f"{[m['role'] for m in prompt]}; use template chat for dialogs")


def encode_prompt(tokenizer: Tokenizer, prompt: str | tuple, template: str, input: str = "",
                  where: str = "prompt") -> list[int]:
    """The ids a model is given to answer `prompt` (what follows them is the answer)."""
    if template == "alpaca":
        return tokenizer.encode(format_alpaca(alpaca_instruction(prompt, where), input), bos=True)
    try:
        return tokenizer.encode_dialog(prompt_dialog(prompt))
    except (ValueError, TypeError) as e:
        raise _fail(where, f"prompt: {e}") from None


def answer_sequence(tokenizer: Tokenizer, prompt: str | tuple, answer: str, template: str, input: str = "",
                    where: str = "example") -> TokenSeq:
    """(ids, loss_mask) of prompt + answer + EOS in the template; the mask is 1 on the answer (and its
    EOS) only: earlier answers of a chat prompt are context."""
    if template == "alpaca":
        return tokenizer.encode_completion(format_alpaca(alpaca_instruction(prompt, where), input), answer)
    dialog = prompt_dialog(prompt)
    try:
        n_prompt = len(tokenizer.encode_dialog_turns(dialog)[0])
        ids, mask = tokenizer.encode_dialog_turns(dialog + [{"role": "assistant", "content": answer}])
    except (ValueError, TypeError) as e:
        raise _fail(where, f"prompt: {e}") from None
    return ids, [0] * n_prompt + mask[n_prompt:]


def pair_sequences(tokenizer: Tokenizer, pair: Pair, template: str, max_len: int,
                   where: str = "example") -> tuple[TokenSeq, TokenSeq, bool] | None:
    """(chosen, rejected, truncated) token sequences of a pair, cut to max_len by the prompt (module
    docstring), or None when the longer answer alone does not fit."""
    chosen = answer_sequence(tokenizer, pair.prompt, pair.chosen, template, pair.input, where)
    rejected = answer_sequence(tokenizer, pair.prompt, pair.rejected, template, pair.input, where)
    over = max(len(chosen[0]), len(rejected[0])) - max_len
    if over <= 0:
        return chosen, rejected, False
    cut = []
    for ids, mask in (chosen, rejected):
        n_prompt = mask.index(1) if 1 in mask else len(mask)
        if n_prompt - 1 < over:  # even BOS + answer is longer than max_len
            return None
        cut.append((ids[:1] + ids[1 + over:], mask[:1] + mask[1 + over:]))
    return cut[0], cut[1], True


# --- files (for llama_jax's own commands; training reads through train/data/formats.py) --------------


def read_records(path: str) -> Iterator[tuple[str, Any]]:
    """(where, record) of a .json list, .jsonl, .parquet file or an `hf:NAME[:SPLIT]` data set."""
    if path.startswith("hf:"):
        import datasets

        name, _, split = path[3:].partition(":")
        for i, row in enumerate(datasets.load_dataset(name, split=split or "train")):
            yield f"{path} row {i}", row
        return
    if path.endswith(".parquet"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file not found: {path!r}")
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i}", row
        return
    data = read_bytes(path)
    if data is None:
        raise FileNotFoundError(f"data file not found: {path!r}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    if path.endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield f"{path}:{n}", _json(line, f"{path}:{n}")
        return
    if not path.endswith(".json"):
        raise ValueError(f"{path}: expected a .json list, .jsonl, .parquet file or hf:NAME")
    records = _json(text, path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for i, record in enumerate(records):
        yield f"{path}[{i}]", record


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
