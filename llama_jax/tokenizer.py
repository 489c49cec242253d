"""SentencePiece tokenizer and the two prompt formats LLaMA models are tuned on.

`Tokenizer` behaves like Meta's llama/tokenizer.py (BOS/EOS added by flags, pad id -1), and
`encode_dialog` reproduces Meta's Llama-2-chat token layout (llama/generation.py, chat_completion)
exactly, because a chat model only answers well when it sees the layout it was trained on.
`format_alpaca` gives the exact Stanford Alpaca prompt text for the same reason.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Mapping, Sequence

import sentencepiece as spm

# Llama-2 chat markers, as in Meta's llama/generation.py.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")

# Stanford Alpaca's PROMPT_DICT (train.py): prompt_input / prompt_no_input, character for character.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

Message = Mapping[str, str]


def format_alpaca(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for one example; the target (output + EOS) follows "### Response:" directly.

    Like Stanford Alpaca, the with-input template is used whenever `input` is not the empty string.
    """
    if not isinstance(instruction, str) or not isinstance(input, str):
        raise TypeError(f"instruction and input must be str, got {type(instruction).__name__} "
                        f"and {type(input).__name__}")
    if input != "":
        return ALPACA_PROMPT_WITH_INPUT.format_map({"instruction": instruction, "input": input})
    return ALPACA_PROMPT_NO_INPUT.format_map({"instruction": instruction})


class Tokenizer:
    """A SentencePiece model with Meta's LLaMA conventions (unk 0, bos 1, eos 2, pad -1 = none)."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        path = os.fspath(model_path)
        if "://" in path:  # gs://, s3://, file://...: read through TensorStore like checkpoints
            from llama_jax.checkpoint.files import read_bytes

            proto = read_bytes(path)
            if proto is None:
                raise FileNotFoundError(f"tokenizer model not found: {path!r}")
        else:
            if not os.path.exists(path):
                raise FileNotFoundError(f"tokenizer model not found: {path!r}")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"tokenizer model path is not a file: {path!r} "
                                        "(expected a SentencePiece .model file, e.g. tokenizer.model)")
            with open(path, "rb") as f:
                proto = f.read()
        self._load(proto, path)

    @classmethod
    def from_proto(cls, proto: bytes, name: str = "<bytes>") -> "Tokenizer":
        """A tokenizer from the bytes of a .model file (worker processes get `model_proto`)."""
        tokenizer = cls.__new__(cls)
        tokenizer._load(proto, name)
        return tokenizer

    def _load(self, proto: bytes, path: str) -> None:
        try:
            self.sp_model = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a terse message
            raise ValueError(f"not a SentencePiece model file: {path!r} ({e})") from e
        self.model_path = path
        self.model_proto = proto
        self.fingerprint = hashlib.sha256(proto).hexdigest()[:16]  # tokenized shards record it

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return self.sp_model.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.sp_model.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp_model.eos_id()

    @property
    def pad_id(self) -> int:
        """-1 for LLaMA's tokenizer: there is no pad piece; batches pad with it and mask it out."""
        return self.sp_model.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp_model.unk_id()

    def id_to_piece(self, token_id: int) -> str:
        return self.sp_model.id_to_piece(self._check_id(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self.sp_model.piece_to_id(piece)

    # ------------------------------------------------------------------ text
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS first / EOS last when asked (Meta's Tokenizer.encode)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates, e.g. undecodable bytes from a command line
            raise ValueError(f"text is not valid UTF-8 (character {e.start}: {text[e.start]!r})") from None
        ids: list[int] = self.sp_model.encode(text)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`. Pad ids (-1) are skipped so padded rows decode; BOS/EOS decode to nothing
        and nothing is cut at EOS (callers that want that cut before decoding)."""
        kept = [self._check_id(i) for i in ids if int(i) != self.pad_id]
        return self.sp_model.decode(kept)

    def _check_id(self, token_id: int) -> int:
        i = int(token_id)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} out of range for vocabulary of size {self.vocab_size}")
        return i

    # ------------------------------------------------------------------ Llama-2 chat
    def encode_dialog(self, dialog: Sequence[Message]) -> list[int]:
        """Llama-2-chat prompt ids for a dialog ending with a user turn, exactly as Meta builds them:
        BOS "[INST] {user} [/INST] {answer} " EOS per finished pair, then BOS "[INST] {user} [/INST]".
        """
        messages = _fold_system(dialog, need_last_user=True)
        ids: list[int] = []
        for user, answer in zip(messages[0:-1:2], messages[1::2]):
            ids += self.encode(_pair_text(user, answer), bos=True, eos=True)
        ids += self.encode(_prompt_text(messages[-1]), bos=True, eos=False)
        return ids

    def encode_dialog_turns(self, dialog: Sequence[Message]) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a chat training example; mask is 1 on each answer's tokens and its EOS.

        The dialog may end with an assistant turn (a finished example) or a user turn (its prompt is
        appended with mask 0). When the dialog ends with a user turn, `ids` equals encode_dialog(dialog).

        Mask boundary: each pair is encoded in one piece (the same ids as encode_dialog) and the
        prompt "[INST] {user} [/INST]" alone; the answer starts where the prompt's ids end. With
        LLaMA's options (split by whitespace, "▁" only at the start of pieces) no piece can span the
        "]" + " answer" boundary, so the prompt is always a prefix. If a tokenizer ever merges across
        it, we keep the prompt's own ids and append encode(f"{answer} ") (the dummy prefix supplies the
        space), so the model trains on exactly the prompt ids it sees at inference.
        """
        messages = _fold_system(dialog, need_last_user=False)
        ids: list[int] = []
        mask: list[int] = []
        for user, answer in zip(messages[0::2], messages[1::2]):
            prompt = self.encode(_prompt_text(user), bos=True, eos=False)
            pair = self.encode(_pair_text(user, answer), bos=True, eos=True)
            if pair[: len(prompt)] != prompt:
                pair = prompt + self.encode(f"{answer['content'].strip()} ", bos=False, eos=True)
            ids += pair
            mask += [0] * len(prompt) + [1] * (len(pair) - len(prompt))
        if len(messages) % 2 == 1:
            prompt = self.encode(_prompt_text(messages[-1]), bos=True, eos=False)
            ids += prompt
            mask += [0] * len(prompt)
        return ids, mask


def _prompt_text(user: Message) -> str:
    return f"{B_INST} {user['content'].strip()} {E_INST}"


def _pair_text(user: Message, answer: Message) -> str:
    return f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "


def _fold_system(dialog: Sequence[Message], need_last_user: bool) -> list[Message]:
    """Check a dialog and fold an optional leading system message into the first user turn."""
    if isinstance(dialog, (str, bytes)) or not isinstance(dialog, Sequence):
        raise TypeError(f"dialog must be a list of {{'role': ..., 'content': ...}} dicts, got {type(dialog).__name__}")
    if len(dialog) == 0:
        raise ValueError("dialog is empty: expected at least one user message")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise ValueError(f"dialog[{i}] must be a dict with 'role' and 'content', got {msg!r}")
        if not isinstance(msg["content"], str):
            raise TypeError(f"dialog[{i}]['content'] must be str, got {type(msg['content']).__name__}")
        for tag in SPECIAL_TAGS:
            if tag in msg["content"]:
                raise ValueError(f"dialog[{i}] ({msg['role']}) contains the special tag {tag!r}; "
                                 f"tags {list(SPECIAL_TAGS)} are not allowed in messages")

    messages = list(dialog)
    if messages[0]["role"] == "system":
        if len(messages) < 2:
            raise ValueError("dialog has a system message but no user message after it")
        if messages[1]["role"] != "user":
            raise ValueError(f"dialog[1] must have role 'user' after the system message, got {messages[1]['role']!r}")
        first = {"role": "user", "content": B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]}
        messages = [first] + messages[2:]
        offset = 1  # index shift for error messages
    else:
        offset = 0

    for j, msg in enumerate(messages):
        expected = "user" if j % 2 == 0 else "assistant"
        if msg["role"] != expected:
            where = offset + j if j > 0 else 0
            raise ValueError(f"dialog[{where}] has role {msg['role']!r}, expected {expected!r}: roles must be "
                             "an optional 'system' first, then 'user' and 'assistant' alternating")
    if need_last_user and messages[-1]["role"] != "user":
        raise ValueError(f"the last message must be from 'user', got {messages[-1]['role']!r}")
    return messages
