"""The tokenizer (SentencePiece tokenizer.model, or a Hugging Face tokenizer.json) and the prompt
formats LLaMA models are tuned on.

`Tokenizer` behaves like Meta's llama/tokenizer.py (BOS/EOS added by flags, pad id -1) whatever the
file: LLaMA / Llama 2 / CodeLlama / TinyLlama ship a SentencePiece `tokenizer.model`, Llama 3 a
byte-level BPE `tokenizer.json` (read with the `tokenizers` library, ids as transformers'
PreTrainedTokenizerFast gives them, special tokens from tokenizer_config.json / generation_config.json).
`eos_ids` are the end tokens generation stops at: EOS and every id generation_config.json lists (Llama 3.1:
<|end_of_text|>, <|eom_id|>, <|eot_id|>), whichever kind of tokenizer file that config sits beside.
`encode_dialog` reproduces the chat layout the tokenizer's models were tuned on, exactly, because a
chat model only answers well when it sees that layout: Meta's Llama-2-chat one (llama/generation.py,
chat_completion), or Llama 3's header/eot one (llama3's ChatFormat, = its HF chat template) when the
vocabulary has Llama 3's header tokens. `format_alpaca` gives the exact Stanford Alpaca prompt text.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from typing import Iterable, Mapping, Sequence

import sentencepiece as spm

# Llama-2 chat markers, as in Meta's llama/generation.py.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
# Llama 3 chat (Meta's llama3 ChatFormat): BOS, then per message a header and the stripped content + EOT.
L3_HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"
L3_EOT = "<|eot_id|>"
L3_CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", L3_EOT)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # SentencePiece; Hugging Face tokenizers (a folder: first found)
HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")  # name BOS/EOS
GENERATION_CONFIG = "generation_config.json"  # its eos_token_id (an id or a list) adds end tokens to any tokenizer

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

# Where a long text may be cut and encoded in pieces with exactly the ids of one call (Tokenizer.cut).
CUT_CHARS = " \n"
CUT_ANCHOR = "a"  # encoded before a continuation piece, then dropped: it takes the text's start-of-text marker
_SPACE_BYTES = frozenset(b for b in range(128) if chr(b).isspace())
# Pre-tokenizer regexes under which no piece holds a non-space character followed by a space (Llama 3's
# = tiktoken cl100k's, and GPT-2's): a cut before such a space is a piece boundary with or without it.
SPACE_SAFE_SPLITS = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
)


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
    """LLaMA's tokenizer with Meta's conventions (BOS/EOS by flags, pad -1 = none), from a SentencePiece
    `tokenizer.model`, a Hugging Face `tokenizer.json` (+ the tokenizer_config.json / generation_config.json
    beside it), a folder holding one of them (tokenizer.model first), a URL, or a Hub repo id ("ORG/NAME",
    downloaded by llama_jax.convert.hub when no such local path exists)."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        path = os.fspath(model_path)
        self._load(*_read_files(path))

    @classmethod
    def from_proto(cls, proto: bytes, name: str = "<bytes>") -> "Tokenizer":
        """A tokenizer from the bytes of a SentencePiece .model file."""
        return cls.from_files({"tokenizer.model": proto}, name)

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], name: str = "<bytes>") -> "Tokenizer":
        """A tokenizer from its files' bytes ({"tokenizer.model": ...} or {"tokenizer.json": ..., ...})."""
        tokenizer = cls.__new__(cls)
        tokenizer._load(name, dict(files))
        return tokenizer

    def __reduce__(self) -> tuple:  # worker processes get the files' bytes, not a path they may not see
        return Tokenizer.from_files, (self.files, self.model_path)

    def _load(self, path: str, files: dict[str, bytes]) -> None:
        self.model_path = path
        self.files = files  # what defines it: copied into checkpoints and run folders (`save`)
        if "tokenizer.model" in files:
            self.backend: _SentencePiece | _HFTokenizer = _SentencePiece(files["tokenizer.model"], path)
            self.fingerprint = hashlib.sha256(files["tokenizer.model"]).hexdigest()[:16]  # tokenized shards record it
        else:
            self.backend = _HFTokenizer(files, path)  # the ids depend on tokenizer.json and which ids BOS/EOS are
            ends = f"\0{self.backend.bos_id},{self.backend.eos_id}".encode()
            self.fingerprint = hashlib.sha256(files["tokenizer.json"] + ends).hexdigest()[:16]
        self._eos_ids = _end_ids(files, self.backend.eos_id, self.backend.vocab_size, path)
        has_headers = all(self.backend.token_id(t) is not None for t in L3_CHAT_TOKENS)
        self.chat_format = "llama3" if has_headers else "llama2"

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"

    def save(self, folder: str) -> str:
        """Write this tokenizer's files into `folder` (local or URL); returns the main file's path there."""
        from llama_jax.checkpoint.files import join, write_bytes

        for name, data in self.files.items():
            write_bytes(join(folder, name), data)
        return join(folder, "tokenizer.model" if "tokenizer.model" in self.files else "tokenizer.json")

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    @property
    def bos_id(self) -> int:
        return self.backend.bos_id

    @property
    def eos_id(self) -> int:
        return self.backend.eos_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The end tokens generation stops at: eos_id first, then the other ids generation_config.json
        (beside the tokenizer file; the converter stores the model's there) lists as eos_token_id."""
        return self._eos_ids

    @property
    def pad_id(self) -> int:
        """-1 for LLaMA's tokenizers: there is no pad piece; batches pad with it and mask it out."""
        return self.backend.pad_id

    @property
    def unk_id(self) -> int:
        """The unknown piece (0 in LLaMA's SentencePiece model); -1 for byte-level BPE (Llama 3), which has none."""
        return self.backend.unk_id

    def id_to_piece(self, token_id: int) -> str:
        return self.backend.id_to_piece(self._check_id(token_id))

    def token_bytes(self, token_id: int) -> bytes:
        """A token's own bytes (logprobs' "bytes"): a SentencePiece byte-fallback piece <0xNN> is that byte
        and "\u2581" a space; a byte-level BPE piece (Llama 3) maps back through GPT-2's byte alphabet;
        a special token is its text."""
        return self.backend.token_bytes(self._check_id(token_id))

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece (a token string); unk_id if the vocabulary has no such piece."""
        found = self.backend.token_id(piece)
        return self.unk_id if found is None else found

    # ------------------------------------------------------------------ text
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS first / EOS last when asked (Meta's Tokenizer.encode)."""
        return self.encode_batch([text], bos, eos)[0]

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        """`encode` of each text, in one call to the backend (one thread: callers run processes)."""
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode expects str, got {type(text).__name__}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates, e.g. undecodable bytes from a command line
                raise ValueError(f"text is not valid UTF-8 (character {e.start}: {text[e.start]!r})") from None
        head, tail = [self.bos_id] if bos else [], [self.eos_id] if eos else []
        return [head + ids + tail for ids in self.backend.encode(list(texts))]

    # ------------------------------------------------------------------ long texts
    def cut(self, text: str, end: int, start: int = 0) -> int:
        """Where the encoding of a long `text` may be split: a position i with
        encode(text) == encode(text[:i]) + encode_rest(text[i:]) (BOS/EOS aside), the last one in
        (start, end], else the first after `end`; 0 when there is none.

        Cuts are before a space (or line break) that follows a non-space character, so runs of
        whitespace stay whole, and only where this tokenizer cannot tell the difference (`cut_chars`):
        no token of its vocabulary joins a non-space character to the space after it, its
        normalization works character by character and its pre-tokenizer (if any) never puts such a
        pair in one piece. Then no token spans the cut and both sides encode as they do together.
        Cutting a piece off `text[start:]` again and again costs no copy of the rest.
        """
        if not self.cut_chars:
            return 0
        pattern = self._cut_pattern
        end = min(end, len(text) - 1)
        window = 4096
        while True:  # the last cut in (start, end]: search back in growing windows
            lo = max(end - window, start)
            last = 0
            for m in pattern.finditer(text, lo, end + 1):
                last = m.end()
            if last or lo == start:
                break
            window *= 4
        if last:
            return last
        m = pattern.search(text, max(end, start))
        return m.end() if m else 0

    @functools.cached_property
    def cut_chars(self) -> str:
        """The characters of CUT_CHARS that `cut` may cut before ("" when this tokenizer cannot be cut)."""
        chars = [c for c in self.backend.local_cut_chars() if c in CUT_CHARS]
        for i in range(self.vocab_size):
            piece = self.backend.token_bytes(i)
            for c in list(chars):
                k = piece.find(c.encode(), 1)
                while k > 0:
                    if piece[k - 1] not in _SPACE_BYTES:  # a token that joins a word to the space after it
                        chars.remove(c)
                        break
                    k = piece.find(c.encode(), k + 1)
        return "".join(chars)

    @functools.cached_property
    def _cut_pattern(self) -> re.Pattern:
        return re.compile(r"\S(?=[" + re.escape(self.cut_chars) + "])")

    @functools.cached_property
    def _anchor(self) -> list[int]:
        return self.backend.encode([CUT_ANCHOR])[0]

    def encode_rest(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of texts that each continue a text at a position `cut` gave: no BOS, and none of the
        start-of-text treatment (SentencePiece's leading "▁", a prefix space) that belongs to the
        text's first piece: they are the ids of CUT_ANCHOR + text after the anchor's own ids."""
        anchor = self._anchor
        out = []
        for ids in self.encode_batch([CUT_ANCHOR + t for t in texts], bos=False):
            if ids[: len(anchor)] != anchor:  # cannot happen where cut_chars allows the cut
                raise RuntimeError(f"{self.model_path}: the anchor {CUT_ANCHOR!r} does not encode apart from the "
                                   "text after it; this tokenizer cannot be encoded in pieces")
            out.append(ids[len(anchor):])
        return out

    def encode_completion(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a prompt and its answer: BOS + prompt (mask 0), answer + EOS (mask 1),
        encoded as one text (the answer follows the prompt directly, as Alpaca's after "### Response:").

        A tokenizer could merge a piece across the boundary; then only the ids the prompt alone and
        the whole text share are masked, so no answer text escapes the loss."""
        prompt_ids = self.encode(prompt, bos=True, eos=False)
        full = self.encode(prompt + answer, bos=True, eos=True)
        n_prompt = len(prompt_ids)
        if full[:n_prompt] != prompt_ids:
            n_prompt = next(i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b)
        return full, [0] * n_prompt + [1] * (len(full) - n_prompt)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`. Pad ids (-1) are skipped so padded rows decode; BOS/EOS (special tokens)
        decode to nothing and nothing is cut at EOS (callers that want that cut before decoding)."""
        kept = [self._check_id(i) for i in ids if int(i) != self.pad_id]
        return self.backend.decode(kept)

    def _check_id(self, token_id: int) -> int:
        i = int(token_id)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} out of range for vocabulary of size {self.vocab_size}")
        return i

    # ------------------------------------------------------------------ chat
    def encode_dialog(self, dialog: Sequence[Message]) -> list[int]:
        """Chat prompt ids for a dialog ending with a user turn, exactly as Meta builds them, in the
        tokenizer's chat format. Llama 2: BOS "[INST] {user} [/INST] {answer} " EOS per finished pair,
        then BOS "[INST] {user} [/INST]". Llama 3: BOS, "<|start_header_id|>{role}<|end_header_id|>\\n\\n"
        + content.strip() + "<|eot_id|>" per message, then the assistant's header.
        """
        if self.chat_format == "llama3":
            return self.encode_dialog_turns(_check_dialog(dialog, True, self.backend.special))[0]
        messages = _fold_system(dialog, need_last_user=True)
        ids: list[int] = []
        for user, answer in zip(messages[0:-1:2], messages[1::2]):
            ids += self.encode(_pair_text(user, answer), bos=True, eos=True)
        ids += self.encode(_prompt_text(messages[-1]), bos=True, eos=False)
        return ids

    def encode_dialog_turns(self, dialog: Sequence[Message]) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a chat training example; mask is 1 on each answer's tokens and its EOS
        (Llama 3: its content and <|eot_id|>, not its header).

        The dialog may end with an assistant turn (a finished example) or a user turn (its prompt is
        appended with mask 0). When the dialog ends with a user turn, `ids` equals encode_dialog(dialog).

        Mask boundary: each pair is encoded in one piece (the same ids as encode_dialog) and the
        prompt "[INST] {user} [/INST]" alone; the answer starts where the prompt's ids end. With
        LLaMA's options (split by whitespace, "▁" only at the start of pieces) no piece can span the
        "]" + " answer" boundary, so the prompt is always a prefix. If a tokenizer ever merges across
        it, we keep the prompt's own ids and append encode(f"{answer} ") (the dummy prefix supplies the
        space), so the model trains on exactly the prompt ids it sees at inference. Llama 3 the same
        way per message: header + content + EOT in one piece, the header alone as its prefix.
        """
        if self.chat_format == "llama3":
            return self._llama3_turns(_check_dialog(dialog, False, self.backend.special))
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

    def _llama3_turns(self, messages: list[Message]) -> tuple[list[int], list[int]]:
        ids, mask = [self.bos_id], [0]
        for message in messages:
            header = L3_HEADER.format(role=message["role"])
            head = self.encode(header, bos=False)
            body = message["content"].strip() + L3_EOT
            turn = self.encode(header + body, bos=False)
            if turn[: len(head)] != head:  # a piece spanning "\n\n" + content (not with Llama 3's own regex)
                turn = head + self.encode(body, bos=False)
            ids += turn
            mask += [0] * len(head) + [int(message["role"] == "assistant")] * (len(turn) - len(head))
        if messages[-1]["role"] != "assistant":
            head = self.encode(L3_HEADER.format(role="assistant"), bos=False)
            ids += head
            mask += [0] * len(head)
        return ids, mask


class _SentencePiece:
    """A SentencePiece model (LLaMA, Llama 2, CodeLlama, TinyLlama): unk 0, bos 1, eos 2, no pad."""

    special: tuple[str, ...] = ()  # control pieces are never read from text: "<s>" in text is plain text

    def __init__(self, proto: bytes, name: str) -> None:
        try:
            self.sp_model = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a terse message
            raise ValueError(f"not a SentencePiece model file: {name!r} ({e})") from e
        sp = self.sp_model
        self.vocab_size, self.bos_id, self.eos_id = sp.vocab_size(), sp.bos_id(), sp.eos_id()
        self.pad_id, self.unk_id = sp.pad_id(), sp.unk_id()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp_model.encode(texts, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self.sp_model.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self.sp_model.id_to_piece(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        return _piece_bytes(self.sp_model.id_to_piece(token_id))

    def token_id(self, piece: str) -> int | None:
        i = self.sp_model.piece_to_id(piece)
        return None if i == self.unk_id and piece != self.sp_model.id_to_piece(i) else i

    def local_cut_chars(self) -> str:
        """Both, when normalization is the identity (LLaMA's): BPE/unigram over the whole text then joins
        characters only into vocabulary pieces, which `Tokenizer.cut_chars` checks. NFKC-style rules can
        drop or map characters next to a cut, so those models are not cut."""
        probe = "\uff21\ufb01e\u0301\x01x"  # a fullwidth A, the fi ligature, a combining accent, a control
        return CUT_CHARS if self.sp_model.normalize(probe).lstrip("\u2581") == probe else ""


class _HFTokenizer:
    """A Hugging Face tokenizer.json (Llama 3's byte-level BPE): ids as PreTrainedTokenizerFast gives them
    with add_special_tokens=False (special tokens written in the text are read as those tokens), BOS/EOS
    named by tokenizer_config.json (else special_tokens_map.json, else generation_config.json's ids)."""

    def __init__(self, files: dict[str, bytes], name: str) -> None:
        from tokenizers import Tokenizer as Backend

        try:
            self.tokenizer = Backend.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file
            raise ValueError(f"not a Hugging Face tokenizer.json file: {name!r} ({' '.join(str(e).split())})") from None
        configs = [(file, _json_file(files, file, name)) for file in HF_SIDE_FILES]
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = self._special_id("bos", configs, name), self._special_id("eos", configs, name)
        self.pad_id = -1
        unk = getattr(self.tokenizer.model, "unk_token", None)
        self.unk_id = -1 if unk is None or self.token_id(unk) is None else self.token_id(unk)
        added = self.tokenizer.get_added_tokens_decoder()
        self.special = tuple(t.content for t in added.values() if t.special)
        self.added = set(added)  # ids whose piece is their text, not byte-level characters
        decoder = self.tokenizer.decoder
        self.byte_level = decoder is not None and b'"ByteLevel"' in decoder.__getstate__()
        self.json = files["tokenizer.json"]  # its pre-tokenizer and normalizer decide where it may be cut

    def _special_id(self, kind: str, configs: list[tuple[str, dict]], name: str) -> int:
        """BOS/EOS: the token tokenizer_config.json (or special_tokens_map.json) names, else
        generation_config.json's id (the first of a list: Llama 3.1 lists every end token)."""
        for file, config in configs:
            token = config.get(f"{kind}_token")
            if isinstance(token, dict):  # an AddedToken written out: {"content": "<s>", ...}
                token = token.get("content")
            if isinstance(token, str):
                found = self.token_id(token)
                if found is None:
                    raise ValueError(f"{name}: {file} names {kind}_token {token!r}, which tokenizer.json does not have")
                return found
            ids = config.get(f"{kind}_token_id")
            ids = ids[0] if isinstance(ids, list) and ids else ids
            if isinstance(ids, int) and not isinstance(ids, bool):
                if not 0 <= ids < self.vocab_size:
                    raise ValueError(f"{name}: {file} {kind}_token_id {ids} is outside the vocabulary ({self.vocab_size})")
                return ids
        raise ValueError(f"{name}: no {kind.upper()} token: tokenizer_config.json ({kind}_token) or "
                         f"generation_config.json ({kind}_token_id) beside tokenizer.json must name it")

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.id_to_token(token_id)
        if token_id in self.added or not self.byte_level:
            return _piece_bytes(piece)
        return bytes(BYTE_LEVEL[c] for c in piece)

    def token_id(self, piece: str) -> int | None:
        return self.tokenizer.token_to_id(piece)

    def local_cut_chars(self) -> str:
        """A space when every step before the model keeps a non-space character and the space after it
        apart or works per character: no normalizer or NFC/NFKC-like/lowercase/prepend/one-character replace
        ones; ByteLevel, Metaspace or an isolating Split with a regex of SPACE_SAFE_SPLITS; no added
        token that strips the spaces around it. Line breaks are not cut here: those regexes group
        them with the punctuation before and the whitespace after."""
        def normal(n: dict | None) -> bool:
            if n is None:
                return True
            if n.get("type") == "Sequence":
                return all(normal(m) for m in n.get("normalizers", []))
            if n.get("type") == "Replace":
                return len(n.get("pattern", {}).get("String", "")) == 1
            return n.get("type") in ("NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend")

        def pre(p: dict | None) -> bool:
            if p is None:
                return True
            if p.get("type") == "Sequence":
                return all(pre(q) for q in p.get("pretokenizers", []))
            if p.get("type") == "Split":
                return (p.get("pattern", {}).get("Regex") in SPACE_SAFE_SPLITS and p.get("behavior") == "Isolated"
                        and not p.get("invert"))
            return p.get("type") in ("ByteLevel", "Metaspace")

        spec = json.loads(self.json)
        added = self.tokenizer.get_added_tokens_decoder().values()
        stripping = any(t.lstrip or t.rstrip or t.single_word for t in added)
        return " " if normal(spec.get("normalizer")) and pre(spec.get("pre_tokenizer")) and not stripping else ""


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's table (bytes_to_unicode) that byte-level BPE writes its pieces in: character -> byte. The
    printable Latin-1 bytes stand for themselves; the other 68 are shifted to chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(shifted)}}


BYTE_LEVEL = _byte_level_alphabet()


def _piece_bytes(piece: str) -> bytes:
    """A SentencePiece-style piece's bytes: <0xNN> is that byte, "\u2581" a space, else its UTF-8."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()


def _json_file(files: Mapping[str, bytes], file: str, name: str) -> dict:
    """One of tokenizer.json's side files as a dict ({} when absent)."""
    if file not in files:
        return {}
    try:
        config = json.loads(files[file].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{name}: {file} beside it is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{name}: {file} beside it must be a JSON object, got {type(config).__name__}")
    return config


def _end_ids(files: Mapping[str, bytes], eos_id: int, vocab_size: int, name: str) -> tuple[int, ...]:
    """EOS, then every other id in generation_config.json's eos_token_id (an id or a list), as
    transformers' generate stops at any of them (Llama 3.1 Instruct lists [<|end_of_text|>,
    <|eom_id|>, <|eot_id|>] while its tokenizer's EOS is <|eot_id|>)."""
    listed = _json_file(files, GENERATION_CONFIG, name).get("eos_token_id")
    listed = [] if listed is None else listed if isinstance(listed, list) else [listed]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in listed):
        raise ValueError(f"{name}: {GENERATION_CONFIG} beside it has eos_token_id {listed!r}; expected a token id "
                         f"or a list of them in [0, {vocab_size})")
    return tuple(dict.fromkeys(([eos_id] if eos_id >= 0 else []) + listed))


def _read_files(path: str) -> tuple[str, dict[str, bytes]]:
    """(the tokenizer's main file, {file name: bytes}) of a tokenizer file or folder (local or URL), or a
    Hub repo id when no such local path exists."""
    from llama_jax.checkpoint.files import is_remote, join, read_bytes

    if not is_remote(path) and not os.path.exists(path):
        from llama_jax.convert.hub import is_repo_id, resolve

        if not is_repo_id(path):
            raise FileNotFoundError(f"tokenizer model not found: {path!r}")
        path = resolve(path, "tokenizer")
    main = path if (os.path.isfile(path) if not is_remote(path) else read_bytes(path) is not None) else None
    if main is None:  # a folder: its tokenizer.model, else its tokenizer.json
        if not is_remote(path) and not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer path is not a file or folder: {path!r}")
        main = next((join(path, n) for n in TOKENIZER_FILES if read_bytes(join(path, n)) is not None), None)
        if main is None:
            raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json there (expected a SentencePiece "
                                    "tokenizer.model, a Hugging Face tokenizer.json, or a folder holding one)")
    data = read_bytes(main)
    if data is None:
        raise FileNotFoundError(f"tokenizer model not found: {main!r}")
    folder = main.rsplit("/", 1)[0] if is_remote(main) else os.path.dirname(main)
    json_file = main.endswith(".json")
    files = {"tokenizer.json" if json_file else "tokenizer.model": data}
    for name in HF_SIDE_FILES if json_file else (GENERATION_CONFIG,):
        side = read_bytes(join(folder, name))
        if side is not None:
            files[name] = side
    return main, files


def _check_dialog(dialog: Sequence[Message], need_last_user: bool, tags: Sequence[str]) -> list[Message]:
    """Check a dialog: dicts with str role and content, none holding a special tag; roles an optional
    'system' first, then 'user' and 'assistant' alternating (ending with 'user' if `need_last_user`)."""
    if isinstance(dialog, (str, bytes)) or not isinstance(dialog, Sequence):
        raise TypeError(f"dialog must be a list of {{'role': ..., 'content': ...}} dicts, got {type(dialog).__name__}")
    if len(dialog) == 0:
        raise ValueError("dialog is empty: expected at least one user message")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise ValueError(f"dialog[{i}] must be a dict with 'role' and 'content', got {msg!r}")
        if not isinstance(msg["content"], str):
            raise TypeError(f"dialog[{i}]['content'] must be str, got {type(msg['content']).__name__}")
        for tag in tags:
            if tag in msg["content"]:
                shown = list(tags) if len(tags) <= 8 else f"the tokenizer's {len(tags)} special tokens"
                raise ValueError(f"dialog[{i}] ({msg['role']}) contains the special tag {tag!r}; "
                                 f"tags {shown} are not allowed in messages")
    messages = list(dialog)
    system = messages[0]["role"] == "system"
    if system and len(messages) < 2:
        raise ValueError("dialog has a system message but no user message after it")
    if system and messages[1]["role"] != "user":
        raise ValueError(f"dialog[1] must have role 'user' after the system message, got {messages[1]['role']!r}")
    for j, msg in enumerate(messages[int(system):], start=int(system)):
        expected = "user" if (j - system) % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise ValueError(f"dialog[{j}] has role {msg['role']!r}, expected {expected!r}: roles must be "
                             "an optional 'system' first, then 'user' and 'assistant' alternating")
    if need_last_user and messages[-1]["role"] != "user":
        raise ValueError(f"the last message must be from 'user', got {messages[-1]['role']!r}")
    return messages


def _prompt_text(user: Message) -> str:
    return f"{B_INST} {user['content'].strip()} {E_INST}"


def _pair_text(user: Message, answer: Message) -> str:
    return f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "


def _fold_system(dialog: Sequence[Message], need_last_user: bool) -> list[Message]:
    """Check a Llama-2 dialog and fold an optional leading system message into the first user turn."""
    messages = _check_dialog(dialog, need_last_user, SPECIAL_TAGS)
    if messages[0]["role"] == "system":
        first = {"role": "user", "content": B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]}
        messages = [first] + messages[2:]
    return messages
