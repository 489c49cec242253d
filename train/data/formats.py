"""Data set formats: files -> records -> examples. A record is one JSON object (or Parquet row);
an example is (tokens, loss_mask) with loss_mask[i] = 1 where token i is a training target.

Files: a JSON list (`.json`), JSON lines (`.jsonl`), Parquet (`.parquet`), a `datasets`
`save_to_disk` folder, a Hub data set through the `datasets` library (`hf:tatsu-lab/alpaca`,
`hf:NAME:SPLIT`), or plain text (any other name; documents separated by blank lines). Local paths
and URLs (gs://, s3://, file://) both work; Parquet URLs go through pyarrow's own filesystems.

Record kinds:
- alpaca: {"instruction", "input" (optional), "output"}: BOS + Stanford's prompt masked, output + EOS targets;
- chat: OpenAI-style {"messages": [{"role": system|user|assistant, "content"}]} (or "dialog"), or
  ShareGPT {"conversations": [{"from": system|human|gpt, "value"}]}: the tokenizer's chat layout
  (Llama-2-chat, or Llama 3's), only the assistant answers (and their EOS / <|eot_id|>) are targets;
- text: {text_key: "..."} (or a plain-text document): BOS + text + EOS, all targets but BOS.
A bad record stops with its file, line (or row) and field named.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator, Sequence

from llama_jax.checkpoint.files import is_remote, read_bytes
from llama_jax.tokenizer import Tokenizer, format_alpaca
from train.data import storage

Example = tuple[list[int], list[int]]  # (tokens, loss_mask)
KINDS = ("alpaca", "chat", "text")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


# --- files -> records ----------------------------------------------------------------------------


def _is_saved_dataset(path: str) -> bool:
    return not is_remote(path) and os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "state.json")) or os.path.exists(os.path.join(path, "dataset_dict.json")))


def _hf_rows(dataset: Any, where: str) -> Iterator[tuple[str, Any]]:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"{where}: a DatasetDict without a 'train' split (splits: {sorted(dataset)}); "
                             "name one as hf:NAME:SPLIT or save that split alone")
        dataset = dataset["train"]
    for i, row in enumerate(dataset):  # Arrow-backed and memory-mapped: rows are read as they come
        yield f"{where} row {i}", row


def hub_dataset(name: str, split: str = "train") -> Any:
    """A Hub data set (or a local folder of Parquet/JSON files: the same `datasets` code path); one
    line (HubError) when it is not in the cache and cannot be downloaded."""
    import datasets

    from llama_jax.convert.hub import LOGIN, HubError

    try:
        return datasets.load_dataset(name, split=split)
    except datasets.exceptions.DatasetNotFoundError:
        raise HubError(f"hf:{name}: no such data set on the Hugging Face Hub (a private or gated one needs a "
                       f"login: {LOGIN})") from None
    except ConnectionError:  # what `datasets` raises offline, after its retries
        why = ("HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) is set" if datasets.config.HF_HUB_OFFLINE
               else "the Hugging Face Hub cannot be reached")
        raise HubError(f"hf:{name}: not in the local Hugging Face cache ({datasets.config.HF_DATASETS_CACHE}) and "
                       f"{why}; download it once with network access, or pass local files") from None


def _parquet_rows(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.fs
    import pyarrow.parquet as pq

    if is_remote(path):
        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
        source = fs.open_input_file(inner)
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    else:
        source = path
    i = 0
    for batch in pq.ParquetFile(source).iter_batches(batch_size=1024):  # bounded memory
        for row in batch.to_pylist():
            yield f"{path} row {i}", row
            i += 1


def _jsonl_rows(path: str) -> Iterator[tuple[str, Any]]:
    for n, line in storage.iter_lines(path):
        if line.strip():
            yield f"{path}:{n}", parse_json(line, f"{path}:{n}")


def parse_json(text: str | bytes, where: str) -> Any:
    """JSON of a file or line; bytes must be UTF-8 (json.loads would guess UTF-16/32 from garbage), and
    a \\uXXXX escape may not leave half a surrogate pair (no tokenizer can encode that string)."""
    try:
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        value = json.loads(text)
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except RecursionError:
        raise ValueError(f"{where}: not valid JSON (nested too deeply)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from e
    if "\\ud" in text or "\\uD" in text:  # only escapes can make surrogates
        _check_surrogates(value, where, "")
    return value


def _check_surrogates(value: Any, where: str, field: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            at = f"field {field!r}: " if field else ""
            raise ValueError(f"{where}: {at}a lone surrogate escape \\u{ord(value[e.start]):04x} at character "
                             f"{e.start} (JSON must escape a character outside the BMP as a pair, "
                             "\\ud83d\\ude00); not Unicode text") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_surrogates(key, where, field)
            _check_surrogates(item, where, f"{field}.{key}" if field else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_surrogates(item, where, f"{field}[{i}]")


def _json_list_rows(path: str) -> Iterator[tuple[str, Any]]:
    data = read_bytes(path)
    if data is None:
        raise FileNotFoundError(f"data file not found: {path!r}")
    records = parse_json(data, path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__} "
                         "(one record per line is a .jsonl file)")
    for i, record in enumerate(records):
        yield f"{path}[{i}]", record


def text_documents(path: str) -> Iterator[str]:
    """Blank-line separated documents of a plain-text file, streamed (the same split as
    `text.split("\\n\\n")` on the whole file, stripped, empty ones dropped)."""
    parts: list[str] = []
    for _, piece, last in text_pieces(path):
        parts.append(piece)
        if last:
            yield "".join(parts)
            parts = []


def text_pieces(path: str, cut: Callable[..., int] | None = None, size: int = 1 << 20,
                limit: int | None = None, block: int = 1 << 20) -> Iterator[tuple[int, str, bool]]:
    """(document number, piece, last piece of its document) of the documents `text_documents` gives,
    streamed. With `cut` (`Tokenizer.cut`), a document longer than `size` characters comes in pieces
    cut where it says (`split_text`), so memory does not grow with the document; at most `limit`
    characters are held without a place to cut (more is an error naming the document)."""
    doc, first, pending, eof, searched = 0, True, "", False, 0
    with storage.open_text(path) as f:
        while not eof:
            chunk = storage.read_utf8(f, block, path)
            eof = not chunk
            start = max(len(pending) - 1, 0)  # a "\n\n" may straddle two blocks
            pending += chunk
            while (end := pending.find("\n\n", start)) >= 0 or (eof and (pending or not first)):
                end = len(pending) if end < 0 else end
                text, pending, start, searched = pending[:end], pending[end + 2:], 0, 0
                text = (text.lstrip() if first else text).rstrip()
                if not text and first:
                    continue  # an empty document
                *head, text = split_text(text, cut, size)
                yield from ((doc, piece, False) for piece in head)
                if limit is not None and len(text) > limit:
                    raise _uncut(path, doc, limit)
                yield doc, text, True
                doc, first = doc + 1, True
            if eof or cut is None or len(pending) <= size:
                continue
            pending = pending.lstrip() if first else pending  # the open document: cut off what can be
            if searched and not cut(pending, searched, searched):  # no cut in the text added since
                searched = len(pending) - 1
            else:
                *head, pending = split_text(pending, cut, size)
                for piece in head:
                    yield doc, piece, False
                    first = False
                searched = len(pending) - 1 if len(pending) > size else 0  # known: no cut in pending[:searched + 1]
            if limit is not None and len(pending) > limit:
                raise _uncut(path, doc, limit)


def _uncut(path: str, doc: int, limit: int) -> ValueError:
    return ValueError(f"{path} document {doc}: more than {limit} characters without a space or line break where "
                      "the tokenizer could cut it; split it (documents are separated by blank lines)")


def split_text(text: str, cut: Callable[..., int] | None, size: int) -> list[str]:
    """`text` in pieces of about `size` characters, cut where `cut` (`Tokenizer.cut`) allows: each
    piece after the first continues the one before (`Tokenizer.encode_rest`). One piece when short."""
    pieces, at = [], 0
    while cut is not None and len(text) - at > size and (i := cut(text, at + size, at)):
        pieces.append(text[at:i])
        at = i
    pieces.append(text[at:] if at else text)
    return pieces


def iter_records(path: str, text_key: str = "text") -> Iterator[tuple[str, Any]]:
    """(where, record) of every record of a data file, folder or `hf:` name, streamed."""
    if path.startswith("hf:"):
        name, _, split = path[3:].partition(":")
        yield from _hf_rows(hub_dataset(name, split or "train"), path)
    elif _is_saved_dataset(path):
        import datasets

        yield from _hf_rows(datasets.load_from_disk(path), path)
    elif path.endswith(".parquet"):
        yield from _parquet_rows(path)
    elif path.endswith(".jsonl"):
        yield from _jsonl_rows(path)
    elif path.endswith(".json"):
        yield from _json_list_rows(path)
    else:
        if not is_remote(path) and os.path.isdir(path):
            raise ValueError(f"{path}: a folder that is not a `datasets` save_to_disk folder (no state.json); "
                             "name its files (globs work)")
        for i, doc in enumerate(text_documents(path)):
            yield f"{path} document {i}", {text_key: doc}


def detect_kind(record: Any, where: str, text_key: str = "text") -> str:
    """alpaca, chat or text, from a record's fields."""
    if isinstance(record, dict):
        if "instruction" in record:
            return "alpaca"
        if any(k in record for k in ("messages", "conversations", "dialog")):
            return "chat"
        if text_key in record:
            return "text"
    if isinstance(record, list):
        return "chat"
    raise ValueError(f"{where}: cannot tell the record's format from its fields "
                     f"{sorted(record) if isinstance(record, dict) else type(record).__name__}; expected "
                     f"instruction/output (alpaca), messages or conversations (chat), or {text_key!r} (text)")


# --- records -> examples -------------------------------------------------------------------------


def _field(record: Any, name: str, where: str, kind: str, optional: bool = False) -> Any:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object ({kind} record), got {str(record)[:120]!r}")
    if name not in record or record[name] is None:
        if optional:
            return None
        raise ValueError(f"{where}: field {name!r} is missing; expected {_SCHEMA[kind]}")
    return record[name]


_SCHEMA = {"alpaca": "an Alpaca record {'instruction': str, 'input': str (optional), 'output': str}",
           "chat": "a chat record {'messages': [{'role', 'content'}, ...]} or ShareGPT "
                   "{'conversations': [{'from', 'value'}, ...]}",
           "text": "a text record"}


def alpaca_fields(record: Any, where: str) -> dict[str, str]:
    """instruction, input ("" when absent) and output of an Alpaca record, each checked to be a string."""
    fields = {}
    for name, optional in (("instruction", False), ("input", True), ("output", False)):
        value = _field(record, name, where, "alpaca", optional)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: field {name!r}: expected a string, got {type(value).__name__} "
                             f"{str(value)[:80]!r} (an Alpaca record)")
        fields[name] = value or ""
    return fields


def alpaca_tokens(tokenizer: Tokenizer, record: Any, where: str = "example") -> Example:
    """BOS + Stanford's prompt (masked) + output + EOS (targets) of one Alpaca record."""
    fields = alpaca_fields(record, where)
    return tokenizer.encode_completion(format_alpaca(fields["instruction"], fields["input"]), fields["output"])


def dialog_of(record: Any, where: str) -> list[dict]:
    """The [{role, content}] messages of a chat record (OpenAI messages, a bare list, or ShareGPT)."""
    if isinstance(record, list):
        return record
    if isinstance(record, dict) and "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise ValueError(f"{where}: field 'conversations': expected a list of {{'from', 'value'}} turns")
        dialog = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
                got = turn.get("from") if isinstance(turn, dict) else turn
                raise ValueError(f"{where}: field 'conversations[{i}].from': expected one of "
                                 f"{sorted(SHAREGPT_ROLES)}, got {str(got)[:80]!r}")
            if not isinstance(turn.get("value"), str):
                raise ValueError(f"{where}: field 'conversations[{i}].value': expected a string")
            dialog.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
        return dialog
    name = "dialog" if isinstance(record, dict) and "dialog" in record else "messages"
    messages = _field(record, name, where, "chat")
    if not isinstance(messages, list):
        raise ValueError(f"{where}: field {name!r}: expected a list of {{'role', 'content'}} messages")
    return [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m for m in messages]


def chat_tokens(tokenizer: Tokenizer, record: Any, where: str = "example") -> Example:
    """Llama-2-chat ids of a chat record; only the assistant answers and their EOS are targets."""
    dialog = dialog_of(record, where)
    field = "conversations" if isinstance(record, dict) and "conversations" in record else "messages"
    try:
        return tokenizer.encode_dialog_turns(dialog)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: field {field!r}: {e}") from e


def text_of(record: Any, where: str, text_key: str = "text") -> str:
    value = _field(record, text_key, where, "text")
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {text_key!r}: expected a string, got {type(value).__name__}")
    return value


def record_tokens(tokenizer: Tokenizer, kind: str, record: Any, where: str, text_key: str = "text") -> Example:
    """(tokens, loss_mask) of one record of `kind`."""
    if kind == "alpaca":
        return alpaca_tokens(tokenizer, record, where)
    if kind == "chat":
        return chat_tokens(tokenizer, record, where)
    tokens = tokenizer.encode(text_of(record, where, text_key), bos=True, eos=True)
    return tokens, [0] + [1] * (len(tokens) - 1)


def truncate(example: Example, max_len: int) -> tuple[Example, bool]:
    tokens, mask = example
    return (tokens[:max_len], mask[:max_len]), len(tokens) > max_len


def alpaca_example(tokenizer: Tokenizer, example: dict, max_len: int = 512) -> Example:
    """(tokens, loss_mask) of one Alpaca record, as Stanford Alpaca trains it.

    tokens = BOS + prompt + output + EOS (prompt from the exact Alpaca templates), truncated to
    `max_len`; loss_mask is 0 over BOS + prompt and 1 over output + EOS.
    """
    return truncate(alpaca_tokens(tokenizer, example), max_len)[0]


def chat_example(tokenizer: Tokenizer, dialog: Sequence[dict], max_len: int = 4096) -> Example:
    """(tokens, loss_mask) of a dialog in the tokenizer's chat layout: only assistant answers and their EOS
    are targets."""
    return truncate(tokenizer.encode_dialog_turns(dialog), max_len)[0]


def load_alpaca(path: str) -> list[dict]:
    """The records of an Alpaca data file (any of the formats above), each checked at once (not at
    the first evaluation, after training)."""
    return [alpaca_fields(record, where) for where, record in iter_records(path)]
