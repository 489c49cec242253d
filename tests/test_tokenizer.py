"""Tokenizer, Llama-2 chat layout and Alpaca prompts, against literal expected strings."""

from pathlib import Path

import pytest

from llama_jax.tokenizer import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    Tokenizer,
    format_alpaca,
)

MODEL = Path(__file__).resolve().parent.parent / "data" / "tokenizer.model"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(str(MODEL))


# ----------------------------------------------------------------------------- basics

def test_special_ids_and_vocab(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert tok.vocab_size == 512
    assert tok.id_to_piece(0) == "<unk>"
    assert tok.id_to_piece(1) == "<s>"
    assert tok.id_to_piece(2) == "</s>"
    # Byte fallback pieces follow the specials, as in LLaMA's tokenizer.
    assert tok.id_to_piece(3) == "<0x00>"
    assert tok.id_to_piece(3 + 255) == "<0xFF>"


def test_model_file_is_small():
    assert MODEL.stat().st_size < 100_000


@pytest.mark.parametrize("text", [
    "Hello world!",
    "Add 3 and 5. The answer is 8.",
    "  leading spaces, trailing spaces   ",
    "line one\nline two\n\n\ttabbed",
    "def f(x):\n    return {\"a\": x % 7}  # ok",
    "Café, naïve, déjà vu",
    "日本語のテキスト, Ελληνικά, русский",
    "emoji 🙂🚀 and ∑ symbols",
    "",
])
def test_round_trip(tok, text):
    ids = tok.encode(text, bos=True, eos=True)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_unknown_characters_use_byte_fallback_not_unk(tok):
    ids = tok.encode("🙂", bos=False)
    assert tok.unk_id not in ids
    pieces = [tok.id_to_piece(i) for i in ids]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]


def test_digits_split_one_per_token(tok):
    ids = tok.encode("year 2023 and 1234567890", bos=False)
    digit_pieces = [p for p in (tok.id_to_piece(i) for i in ids) if any(c.isdigit() for c in p)]
    assert digit_pieces == list("20231234567890")


def test_bos_eos_flags(tok):
    body = tok.encode("Sort the numbers", bos=False, eos=False)
    assert body and 1 not in body and 2 not in body
    assert tok.encode("Sort the numbers") == [1] + body  # defaults: bos=True, eos=False
    assert tok.encode("Sort the numbers", bos=True, eos=True) == [1] + body + [2]
    assert tok.encode("Sort the numbers", bos=False, eos=True) == body + [2]
    assert tok.encode("", bos=True, eos=True) == [1, 2]


def test_decode_skips_pad_and_does_not_stop_at_eos(tok):
    a = tok.encode("first", bos=True, eos=True)
    b = tok.encode("second", bos=False)  # the dummy prefix gives the space
    assert tok.decode(a + b + [-1, -1]) == "first second"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_encode_rejects_non_str(tok):
    with pytest.raises(TypeError):
        tok.encode([1, 2, 3])


def test_missing_model_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="not a file"):
        Tokenizer(str(tmp_path))


def test_not_a_sentencepiece_model(tmp_path):
    bad = tmp_path / "garbage.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="garbage.model"):
        Tokenizer(str(bad))


# ----------------------------------------------------------------------------- Llama-2 chat

DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "  Add 3 and 5.  "},
    {"role": "assistant", "content": " 8 "},
    {"role": "user", "content": "Reverse the letters of abc."},
]


def test_encode_dialog_layout(tok):
    expected = (
        tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! ", bos=True, eos=True)
        + tok.encode("[INST] Add 3 and 5. [/INST] 8 ", bos=True, eos=True)
        + tok.encode("[INST] Reverse the letters of abc. [/INST]", bos=True, eos=False)
    )
    assert tok.encode_dialog(DIALOG) == expected


def test_encode_dialog_single_user_turn(tok):
    assert tok.encode_dialog([{"role": "user", "content": " Hi "}]) == tok.encode("[INST] Hi [/INST]")
    with_sys = [{"role": "system", "content": "Reply politely."}, {"role": "user", "content": "Sort 3, 1"}]
    assert tok.encode_dialog(with_sys) == tok.encode("[INST] <<SYS>>\nReply politely.\n<</SYS>>\n\nSort 3, 1 [/INST]")


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_special_tags_refused(tok, tag, where):
    dialog = [dict(m) for m in DIALOG[:4]]
    dialog[where]["content"] = f"please {tag} ignore"
    with pytest.raises(ValueError, match=repr(tag).replace("[", r"\[")):
        tok.encode_dialog(dialog)
    with pytest.raises(ValueError, match="special tag"):
        tok.encode_dialog_turns(dialog)


@pytest.mark.parametrize("dialog, message", [
    ([], "empty"),
    ([{"role": "assistant", "content": "x"}], "expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
    ([{"role": "system", "content": "s"}], "no user message"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "after the system"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}],
     "role 'system'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}],
     "dialog\\[2\\]"),
    ([{"role": "user"}], "'content'"),
])
def test_wrong_dialogs(tok, dialog, message):
    with pytest.raises(ValueError, match=message):
        tok.encode_dialog(dialog)


def test_dialog_turns_mask_marks_answers_and_eos(tok):
    dialog = DIALOG[:5]  # ends with the assistant: a finished training example
    ids, mask = tok.encode_dialog_turns(dialog)
    prompt1 = tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]", bos=True, eos=False)
    pair1 = tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! ", bos=True, eos=True)
    prompt2 = tok.encode("[INST] Add 3 and 5. [/INST]", bos=True, eos=False)
    pair2 = tok.encode("[INST] Add 3 and 5. [/INST] 8 ", bos=True, eos=True)
    assert pair1[: len(prompt1)] == prompt1 and pair2[: len(prompt2)] == prompt2
    assert ids == pair1 + pair2
    expected_mask = ([0] * len(prompt1) + [1] * (len(pair1) - len(prompt1))
                     + [0] * len(prompt2) + [1] * (len(pair2) - len(prompt2)))
    assert mask == expected_mask
    # The masked-in tokens spell exactly each answer (with its trailing space), each followed by EOS.
    pieces = [tok.id_to_piece(i) for i, m in zip(ids, mask) if m]
    assert "".join(pieces).replace("\u2581", " ") == " Hello! </s> 8 </s>"
    assert [i for i, m in zip(ids, mask) if m and i == tok.eos_id] == [2, 2]
    assert ids.count(tok.bos_id) == 2 and all(m == 0 for i, m in zip(ids, mask) if i == tok.bos_id)


def test_dialog_turns_ending_with_user_matches_encode_dialog(tok):
    ids, mask = tok.encode_dialog_turns(DIALOG)
    assert ids == tok.encode_dialog(DIALOG)
    tail = tok.encode("[INST] Reverse the letters of abc. [/INST]")
    assert mask[-len(tail):] == [0] * len(tail)
    assert len(mask) == len(ids)


def test_dialog_turns_fallback_when_prompt_is_not_a_prefix(tok, monkeypatch):
    """If the joint encoding merged across the prompt/answer boundary, the prompt ids are kept."""
    real_encode = tok.encode

    def merging_encode(text, bos=True, eos=False):
        ids = real_encode(text, bos=bos, eos=eos)
        if text == "[INST] Hi [/INST] Hello! ":  # pretend a piece spanned "]" + " Hello"
            ids[len(real_encode("[INST] Hi [/INST]", bos=bos)) - 1] = tok.unk_id
        return ids

    monkeypatch.setattr(tok, "encode", merging_encode)
    ids, mask = tok.encode_dialog_turns([{"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": "Hello!"}])
    prompt = real_encode("[INST] Hi [/INST]")
    answer = real_encode("Hello! ", bos=False, eos=True)
    assert ids == prompt + answer
    assert mask == [0] * len(prompt) + [1] * len(answer)


# ----------------------------------------------------------------------------- Alpaca

def test_alpaca_with_input_exact():
    expected = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSort the numbers.\n\n"
        "### Input:\n3, 1, 2\n\n"
        "### Response:"
    )
    assert format_alpaca("Sort the numbers.", "3, 1, 2") == expected
    assert format_alpaca(instruction="Sort the numbers.", input="3, 1, 2") == expected


def test_alpaca_no_input_exact():
    expected = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd 3 and 5.\n\n"
        "### Response:"
    )
    assert format_alpaca("Add 3 and 5.") == expected
    assert format_alpaca("Add 3 and 5.", "") == expected


def test_alpaca_constants_and_braces():
    assert ALPACA_PROMPT_NO_INPUT == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
    )
    assert ALPACA_PROMPT_WITH_INPUT == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
        "{instruction}\n\n### Input:\n{input}\n\n### Response:"
    )
    # Braces in user text are kept verbatim (no second round of formatting).
    assert format_alpaca("Print {x}.", "{input}").endswith(
        "### Instruction:\nPrint {x}.\n\n### Input:\n{input}\n\n### Response:")


def test_alpaca_prompt_round_trips_through_tokenizer(tok):
    text = format_alpaca("Reverse the letters of the word.", "apple")
    assert tok.decode(tok.encode(text)) == text
