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
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json there"):
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


# ----------------------------------------------------------------------------- Hugging Face tokenizer.json (Llama 3)

HF_TEXTS = [
    "Hello world!",
    "  leading spaces, trailing spaces   ",
    "line one\nline two\n\n\ttabbed",
    "I'm sure they'll say we've done it, didn't we? 12345678",
    "Café, naïve, déjà vu; 日本語のテキスト, Ελληνικά, русский",
    "emoji 🙂🚀 and ∑ symbols",
    "<|begin_of_text|>special<|eot_id|> tokens <|start_header_id|>user<|end_header_id|>\n\nin text",
    "<|eot_id|><|eot_id|>",
    "",
]
L3_DIALOGS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": " Add 3 and 5. "}],
    [{"role": "system", "content": "Reply politely."}, {"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": " Hello, how are you? "}, {"role": "user", "content": "日本語のテキスト 🙂"}],
]


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """(our Tokenizer, transformers' PreTrainedTokenizerFast) of one tiny Llama-3-style folder."""
    import transformers

    from reference import llama3_tokenizer

    folder = llama3_tokenizer(str(tmp_path_factory.mktemp("llama3_tok")))
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert isinstance(theirs, transformers.PreTrainedTokenizerFast)
    return Tokenizer(folder), theirs


@pytest.mark.parametrize("text", HF_TEXTS)
def test_hf_tokenizer_ids_equal_transformers(llama3, text):
    """Ids as transformers gives them (special tokens written in the text read as those tokens), with and
    without BOS; decode skips special tokens as transformers' skip_special_tokens=True does."""
    ours, theirs = llama3
    for bos in (False, True):
        ids = ours.encode(text, bos=bos)
        assert ids == theirs.encode(text, add_special_tokens=bos)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.encode(text, bos=False, eos=True)[-1] == ours.eos_id
    if "<|" not in text:
        assert ours.decode(ours.encode(text, bos=True, eos=True)) == text
        # Each token's own bytes (the server's logprobs) join to the text's UTF-8, emoji split over tokens too.
        assert b"".join(ours.token_bytes(i) for i in ours.encode(text, bos=False)) == text.encode()
    assert ours.token_bytes(ours.eos_id) == b"<|eot_id|>"


def test_hf_tokenizer_special_ids_and_backend_choice(llama3, tmp_path):
    from reference import llama3_tokenizer

    ours, theirs = llama3
    assert ours.vocab_size == len(theirs) == 428 and ours.pad_id == -1 and ours.unk_id == -1
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert ours.id_to_piece(ours.bos_id) == "<|begin_of_text|>" and ours.id_to_piece(ours.eos_id) == "<|eot_id|>"
    assert ours.chat_format == "llama3" and Tokenizer(MODEL).chat_format == "llama2"
    assert Tokenizer(f"{ours.model_path}").fingerprint == ours.fingerprint != Tokenizer(MODEL).fingerprint
    # No eos_token in tokenizer_config.json: generation_config.json's first eos_token_id (<|end_of_text|>).
    base = Tokenizer(llama3_tokenizer(str(tmp_path / "base"), eos=None))
    assert base.id_to_piece(base.eos_id) == "<|end_of_text|>" and base.fingerprint != ours.fingerprint
    # A folder holding both files (Llama 2's HF folders): the SentencePiece model, as Meta's code reads it.
    both = tmp_path / "both"
    both.mkdir()
    (both / "tokenizer.model").write_bytes(MODEL.read_bytes())
    (both / "tokenizer.json").write_bytes((tmp_path / "base" / "tokenizer.json").read_bytes())
    assert Tokenizer(both).vocab_size == 512
    # Worker processes get the files' bytes (pickle), not the path.
    import pickle

    again = pickle.loads(pickle.dumps(ours))
    assert again.encode(HF_TEXTS[6]) == ours.encode(HF_TEXTS[6]) and again.fingerprint == ours.fingerprint
    assert ours.encode_batch(HF_TEXTS[:3], bos=True, eos=True) == [ours.encode(t, True, True) for t in HF_TEXTS[:3]]


@pytest.mark.parametrize("dialog", L3_DIALOGS, ids=["user", "system", "multi-turn"])
def test_llama3_dialog_equals_transformers_chat_template(llama3, dialog):
    """Meta's Llama 3 chat layout = transformers' apply_chat_template with Llama-3-8B-Instruct's template."""
    ours, theirs = llama3
    expected = theirs.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ours.encode_dialog(dialog) == expected
    assert ours.encode_dialog_turns(dialog)[0] == expected


def test_llama3_dialog_turns_mask_answers_and_eot(llama3):
    ours, theirs = llama3
    dialog = L3_DIALOGS[2][:3] + [{"role": "user", "content": "And?"}, {"role": "assistant", "content": "Fine. "}]
    ids, mask = ours.encode_dialog_turns(dialog)
    assert ids == theirs.apply_chat_template(dialog, tokenize=True)["input_ids"]
    answers = [ours.encode(m["content"].strip() + "<|eot_id|>", bos=False) for m in dialog if m["role"] == "assistant"]
    assert [i for i, m in zip(ids, mask) if m] == answers[0] + answers[1]
    header = ours.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", bos=False)
    starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]  # each answer: one run after its header
    assert len(starts) == 2 and all(ids[s - len(header):s] == header for s in starts)


@pytest.mark.parametrize("tag", ["<|eot_id|>", "<|start_header_id|>", "<|begin_of_text|>", "<|reserved_special_token_2|>"])
def test_llama3_special_tokens_refused_in_messages(llama3, tag):
    ours, _ = llama3
    dialog = [{"role": "user", "content": f"please {tag} ignore"}]
    with pytest.raises(ValueError, match="special tag"):
        ours.encode_dialog(dialog)
    with pytest.raises(ValueError, match="expected 'assistant'"):
        ours.encode_dialog([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_hf_tokenizer_errors_name_the_file(tmp_path, llama3):
    import json

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer(bad)
    folder = tmp_path / "no_bos"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(llama3[0].files["tokenizer.json"].decode())
    with pytest.raises(ValueError, match="no BOS token"):
        Tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<|eot_id|>"}))
    with pytest.raises(ValueError, match="tokenizer_config.json names bos_token '<s>'"):
        Tokenizer(folder)
