"""Preference data: the record schemas (TRL, chat prompts, UltraFeedback's whole dialogs, Anthropic-HH
texts) give the token ids of Meta's Llama-2-chat layout and Stanford's Alpaca prompt, written out here
by hand, from JSONL, Parquet and `hf:NAME:SPLIT` data sets alike; only answer tokens are targets; prompts
are cut first; the demo data regenerates byte for byte."""

import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # no Hub here: the hf: path runs on local Parquet
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="hf-datasets-"))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

import llama_jax as lj  # noqa: E402
from llama_jax.preference import Pair, pair_of, pair_sequences, prompt_of  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data.pairs import build_pair_rows, pair_batch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = lj.Tokenizer(os.path.join(ROOT, "data", "tokenizer.model"))
BOS, EOS = TOK.bos_id, TOK.eos_id


def answer_mask(prompt_ids, full_ids):
    """The expected (ids, mask): the prompt's own ids are a prefix, everything after is a target."""
    assert full_ids[:len(prompt_ids)] == prompt_ids
    return full_ids, [0] * len(prompt_ids) + [1] * (len(full_ids) - len(prompt_ids))


def hand_chat(history, user, answer):
    """(ids, mask) of a Llama-2 dialog `history` (finished (user, reply) pairs) + `user` + `answer`, by hand."""
    context = []
    for u, r in history:
        context += TOK.encode(f"[INST] {u} [/INST] {r} ", bos=True, eos=True)
    prompt = context + TOK.encode(f"[INST] {user} [/INST]", bos=True)
    full = context + TOK.encode(f"[INST] {user} [/INST] {answer} ", bos=True, eos=True)
    return answer_mask(prompt, full)


ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n### Instruction:\n{}\n\n### Input:\n{}"
          "\n\n### Response:")


def test_schemas_give_the_chat_and_alpaca_layouts(tmp_path):
    trl = {"prompt": "Sort the digits 4 1 3.", "chosen": "1 3 4", "rejected": "4 3 1"}
    want_c, want_r = hand_chat([], trl["prompt"], "1 3 4"), hand_chat([], trl["prompt"], "4 3 1")
    ultrafeedback = {"prompt": trl["prompt"], "score_chosen": 8.0,
                     "chosen": [{"role": "user", "content": trl["prompt"]}, {"role": "assistant", "content": "1 3 4"}],
                     "rejected": [{"role": "user", "content": trl["prompt"]}, {"role": "assistant", "content": "4 3 1"}]}
    conversational = {"messages": [{"role": "user", "content": trl["prompt"]}],
                      "chosen": [{"role": "assistant", "content": "1 3 4"}], "rejected": "4 3 1"}
    for record in (trl, ultrafeedback, conversational):
        c, r, cut = pair_sequences(TOK, pair_of(record, "r"), "chat", 512)
        assert (c, r, cut) == (want_c, want_r, False)

    # hf:NAME:SPLIT (the recipes' UltraFeedback): `datasets.load_dataset` on a local folder laid out like a
    # Hub repository of Parquet files; the split named is the one read, its message lists the hand layout.
    hub = tmp_path / "hub" / "data"
    os.makedirs(hub)
    swapped = {**ultrafeedback, "chosen": ultrafeedback["rejected"], "rejected": ultrafeedback["chosen"]}
    for split, record in (("train_prefs", ultrafeedback), ("test_prefs", swapped)):
        pq.write_table(pa.Table.from_pylist([record]), hub / f"{split}-00000-of-00001.parquet")
    for split, (c, r) in (("train_prefs", (want_c, want_r)), ("test_prefs", (want_r, want_c))):
        rows, summary = build_pair_rows([f"hf:{tmp_path / 'hub'}:{split}"], TOK, 64)
        assert summary["rows"] == 1
        for side, (ids, mask) in enumerate((c, r)):
            assert rows["tokens"][0, side, :len(ids)].tolist() == ids and not rows["tokens"][0, side, len(ids):].any()
            assert rows["loss_mask"][0, side, :len(ids)].tolist() == mask

    # Anthropic-HH: whole texts that share all turns but the last answer -> a two-turn Llama-2 dialog.
    hh = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
          "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: Go away."}
    pair = pair_of(hh, "hh")
    assert pair.prompt == ({"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "What is 2+2?"})
    c, r, _ = pair_sequences(TOK, pair, "chat", 512)
    assert c == hand_chat([("Hi there", "Hello!")], "What is 2+2?", "It is 4.")  # the earlier answer is context
    assert r == hand_chat([("Hi there", "Hello!")], "What is 2+2?", "Go away.")

    # A system message is folded into the first user turn, as Meta's layout does.
    system = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
              "chosen": "Hello.", "rejected": "Hello, how may I be of assistance today?"}
    c, _, _ = pair_sequences(TOK, pair_of(system, "s"), "chat", 512)
    assert c == hand_chat([], "<<SYS>>\nBe brief.\n<</SYS>>\n\nHi", "Hello.")

    # Alpaca: Stanford's prompt with the record's input; the answer follows "### Response:" directly.
    alpaca = {"prompt": "Reverse the digits.", "input": "1234", "chosen": "4321", "rejected": "1234", "margin": 2}
    pair = pair_of(alpaca, "a")
    assert pair.margin == 2.0 and pair.input == "1234"
    c, r, _ = pair_sequences(TOK, pair, "alpaca", 512)
    text = ALPACA.format("Reverse the digits.", "1234")
    assert c == answer_mask(TOK.encode(text, bos=True), TOK.encode(text + "4321", bos=True, eos=True))
    assert r == answer_mask(TOK.encode(text, bos=True), TOK.encode(text + "1234", bos=True, eos=True))
    assert prompt_of(alpaca, "a") == ("Reverse the digits.", "1234")


def test_bad_records_are_named():
    cases = [({"prompt": "p", "chosen": "a"}, "field 'rejected' is missing"),
             ({"prompt": 3, "chosen": "a", "rejected": "b"}, "field 'prompt'"),
             ({"chosen": "plain text", "rejected": "other"}, "not an Anthropic-HH dialog"),
             ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
              "differ at message 0"),
             ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "expected a finite number"),
             ({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}, "field 'chosen'")]
    for record, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            pair_of(record, "pairs.jsonl:7")
        assert str(info.value).startswith("pairs.jsonl:7: ")
    dialog = Pair(({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}), "x", "y")
    with pytest.raises(ValueError, match="alpaca template takes a string prompt or one user turn"):
        pair_sequences(TOK, dialog, "alpaca", 512, "pairs.jsonl:8")


def test_long_prompts_are_cut_first_and_long_answers_skipped(tmp_path):
    prompt = " ".join(f"word{i}" for i in range(60))
    pair = Pair(prompt, "short answer", "a somewhat longer answer here")
    (c, _), (r, _), _ = pair_sequences(TOK, pair, "chat", 4096)
    max_len = len(r) - 20
    (c_cut, c_mask), (r_cut, r_mask), truncated = pair_sequences(TOK, pair, "chat", max_len)
    assert truncated and len(r_cut) == max_len and len(c_cut) == len(c) - 20  # both sides lose the same prompt tokens
    for full, cut, mask in ((c, c_cut, c_mask), (r, r_cut, r_mask)):
        assert cut[0] == BOS and cut[1:] == full[21:]  # BOS, then the end of the prompt and the whole answer
        n_answer = sum(mask)
        assert cut[-n_answer:] == full[-n_answer:] and mask == [0] * (len(cut) - n_answer) + [1] * n_answer
    n_answer = len(r) - len(TOK.encode(f"[INST] {prompt} [/INST]", bos=True))
    assert pair_sequences(TOK, pair, "chat", n_answer) is None  # BOS + the answer does not fit: skipped

    records = [{"prompt": prompt, "chosen": "short answer", "rejected": "a somewhat longer answer here",
                "margin": 1.5}, {"prompt": "Hi", "chosen": "Hello", "rejected": "Go"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows, summary = build_pair_rows([str(path)], TOK, max_len)
    assert (summary["examples"], summary["rows"], summary["truncated"], summary["skipped"]) == (2, 2, 1, 0)
    np.testing.assert_array_equal(rows["margin"], [1.5, 0.0])
    batch = pair_batch(rows)
    assert batch["tokens"].shape == (2, 2, max_len)
    # weights = the answer tokens (as targets of the previous position); nothing of the prompt
    np.testing.assert_array_equal(batch["weights"][0, 1], np.asarray(r_mask[1:] + [0], np.float32))
    assert build_pair_rows([str(path)], TOK, n_answer)[1]["skipped"] == 1

    pq.write_table(pa.Table.from_pylist(records), tmp_path / "pairs.parquet")
    again, _ = build_pair_rows([str(tmp_path / "pairs.parquet")], TOK, max_len)
    for key in rows:
        np.testing.assert_array_equal(again[key], rows[key])


def test_recipe_keys_are_checked():
    cfg = load_config("configs/demo-dpo.yaml")
    assert (cfg.objective, cfg.data.format, cfg.beta, cfg.preference.template) == ("dpo", "preference", 0.1, "alpaca")
    assert load_config("configs/demo-dpo.yaml", ["objective=simpo", "preference.beta=null"]).beta == 2.0
    for override, message in ((["objective=ppo"], "objective must be one of"),
                              (["objective=sft"], "objective sft needs data.format alpaca"),
                              (["data.format=alpaca"], "objective dpo needs data.format preference"),
                              (["data.pack=true"], "not packed"), (["preference.beta=0"], "preference.beta"),
                              (["objective=reward"], "preference.beta is not used"),
                              (["objective=reward", "preference.beta=null", "eval.data=data/demo_alpaca_eval.json"],
                               "eval.data"),
                              (["preference.template=vicuna"], "preference.template")):
        with pytest.raises(ValueError, match=message):
            load_config("configs/demo-dpo.yaml", override)


def test_demo_data_regenerates_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_preference_demo_data.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True, timeout=120)
    for name in ("demo_preference_train.json", "demo_preference_eval.json"):
        with open(os.path.join(ROOT, "data", name), "rb") as shipped:
            assert (tmp_path / name).read_bytes() == shipped.read()
    held_out = {(r["instruction"], r["input"]) for r in json.load(open(os.path.join(ROOT, "data",
                                                                                    "demo_alpaca_eval.json")))}
    train = json.load(open(os.path.join(ROOT, "data", "demo_preference_train.json")))
    assert not {r["input"] for r in train} & {x for _, x in held_out}  # held-out inputs never trained on
    assert all(r["chosen"] != r["rejected"] for r in train)
