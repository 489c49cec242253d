"""Data pipelines: Alpaca masking against the hand-written Stanford template, packing against each
document run alone, pretraining rows, deterministic per-host batches, and recipe config errors."""

import glob
import json

import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from train import data as data_lib
from train.config import load_config

TOK = lj.Tokenizer("data/tokenizer.model")
STANFORD_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                       "{instruction}\n\n### Input:\n{input}\n\n### Response:")
STANFORD_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def test_alpaca_example_masks_bos_and_prompt_and_keeps_eos():
    for record, template in [({"instruction": "Sort the digits.", "input": "4312", "output": "1234"}, STANFORD_WITH_INPUT),
                             ({"instruction": "Name a colour.", "output": "Blue"}, STANFORD_NO_INPUT)]:
        prompt = template.format(instruction=record["instruction"], input=record.get("input", ""))
        tokens, mask = data_lib.alpaca_example(TOK, record, max_len=512)
        prompt_ids = TOK.encode(prompt, bos=True)
        assert tokens == TOK.encode(prompt + record["output"], bos=True, eos=True)
        assert tokens[: len(prompt_ids)] == prompt_ids and mask == [0] * len(prompt_ids) + [1] * (len(tokens) - len(prompt_ids))
        assert TOK.decode([t for t, m in zip(tokens, mask) if m]) == record["output"] and tokens[-1] == TOK.eos_id
    short, short_mask = data_lib.alpaca_example(TOK, {"instruction": "Sort the digits.", "input": "4312", "output": "1234"}, 20)
    assert len(short) == 20 and sum(short_mask) == 0
    with pytest.raises(ValueError, match="Alpaca record"):
        data_lib.alpaca_example(TOK, {"instruction": "x"}, 32)


def test_build_rows_counts_truncation(tmp_path):
    path = tmp_path / "a.json"
    long = {"instruction": "Copy.", "input": "1" * 200, "output": "1" * 200}
    path.write_text(json.dumps([long, {"instruction": "Copy.", "input": "12", "output": "12"}]))
    rows, summary = data_lib.build_rows("alpaca", [str(path)], TOK, max_len=128, pack=False)
    # the long record is truncated inside its prompt: no targets left, so it is dropped, and counted
    assert summary["truncated"] == 1 and summary["examples"] == 1 and rows["tokens"].shape == (1, 129)


def test_chat_example_masks_user_turns():
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    tokens, mask = data_lib.chat_example(TOK, dialog)
    prompt = TOK.encode("[INST] Hi [/INST]", bos=True)
    assert tokens[: len(prompt)] == prompt and sum(mask[: len(prompt)]) == 0
    assert TOK.decode([t for t, m in zip(tokens, mask) if m]).strip() == "Hello there" and tokens[-1] == TOK.eos_id


def test_packed_rows_equal_each_example_alone():
    """Logits of every packed document equal the logits of that document run by itself, and
    no target crosses a document boundary."""
    cfg = lj.LlamaConfig.preset("tiny")
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 512, n).tolist() for n in (7, 12, 6, 9)]
    examples = [(d, [0] + [1] * (len(d) - 1)) for d in docs]
    rows = data_lib.pack_rows(examples, 24)
    assert rows["tokens"].shape == (2, 24)  # 7+12 fit in 24 (+6 would not), then 6+9
    batch = data_lib.model_batch(rows)
    params = lj.init_params(cfg, 0)
    packed = np.asarray(lj.forward(params, batch["tokens"], cfg, jnp.asarray(batch["positions"]),
                                   jnp.asarray(batch["segment_ids"])))
    # each document alone in its own row (right-padded: causal attention never reads the padding)
    alone_tokens = np.full((4, 23), 5, np.int32)
    for i, d in enumerate(docs):
        alone_tokens[i, : len(d)] = d
    alone = np.asarray(lj.forward(params, alone_tokens, cfg))
    for i, (doc, (r, s)) in enumerate(zip(docs, [(0, 0), (0, 7), (1, 0), (1, 6)])):
        n = min(len(doc), 23 - s)  # model inputs are the first 23 tokens of the row
        np.testing.assert_allclose(packed[r, s: s + n], alone[i, :n], rtol=1e-5, atol=1e-5)
        assert batch["weights"][r, s: s + n - 1].sum() == n - 1  # its own next tokens are targets
    assert batch["weights"][0, 6] == 0  # predicting doc 2's first token from doc 1 is not a target


def test_stream_rows_for_pretraining():
    docs = [[1, 10, 11, 2], [1, 20, 21, 22, 23, 24, 2]]
    rows = data_lib.stream_rows(docs, 4)  # rows overlap by one token: every token is a target once
    np.testing.assert_array_equal(rows["tokens"], [[1, 10, 11, 2], [2, 1, 20, 21], [21, 22, 23, 24]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 1], [1, 2, 2, 2], [1, 1, 1, 1]])
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 2, 3]])
    batch = data_lib.model_batch(rows)
    np.testing.assert_array_equal(batch["weights"], [[1, 1, 1], [0, 1, 1], [1, 1, 1]])


def test_batches_are_deterministic_and_split_over_hosts():
    rows = {k: np.arange(10 * 3).reshape(10, 3).astype(np.int32) for k in ("tokens", "loss_mask", "positions")}
    rows["segment_ids"] = np.ones((10, 3), np.int32)
    full = data_lib.Batches(rows, 4, seed=3)
    assert full.per_epoch == 2
    seen = [full.global_indices(k).tolist() for k in range(4)]
    assert len(set(seen[0] + seen[1])) == 8 and seen[:2] != seen[2:]  # epoch 0: 8 distinct rows; epoch 1 reshuffles
    again = data_lib.Batches(rows, 4, seed=3)
    assert [again.global_indices(k).tolist() for k in (3, 0)] == [seen[3], seen[0]]  # resume at any index
    hosts = [data_lib.Batches(rows, 4, seed=3, process_index=i, process_count=2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h(1)["tokens"] for h in hosts]), full(1)["tokens"])
    with pytest.raises(ValueError, match="fewer than batch_size"):
        data_lib.Batches(rows, 11, seed=0)


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config("configs/demo.yaml", ["steps=7", "optim.lr=1e-4", "data.pack=true", "model.overrides.dim=64"])
    assert cfg.steps == 7 and cfg.optim.lr == 1e-4 and cfg.data.pack is True and cfg.model.overrides["dim"] == 64
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lr'\].*known keys"):
        load_config("configs/demo.yaml", ["lr=1e-4"])
    with pytest.raises(ValueError, match="optim.lr: expected a number"):
        load_config("configs/demo.yaml", ["optim.lr=fast"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_config("configs/demo.yaml", ["steps"])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    recipes = sorted(glob.glob("configs/*.yaml"))
    assert "configs/dpo-qlora-llama2-7b.yaml" in recipes
    for path in recipes:  # every shipped recipe parses and validates (its init_from checkpoints need not exist)
        load_config(path)


def test_build_rows_chat_masks_everything_but_the_answers(tmp_path):
    """Chat records ({"messages": [...]}, {"dialog": [...]} or a bare list) -> one row each whose targets
    are exactly the assistant answers and their EOS. Reference: Meta's Llama-2-chat text written out."""
    first = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "How are you?"},
             {"role": "assistant", "content": "Fine."}]
    second = [{"role": "user", "content": "Count to 3"}, {"role": "assistant", "content": "1 2 3"}]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"messages": first}, {"dialog": second}, second]))

    def turn(prompt, answer):  # BOS [INST] prompt [/INST] (masked) + " answer " EOS (targets)
        masked = TOK.encode(f"[INST] {prompt} [/INST]", bos=True)
        whole = TOK.encode(f"[INST] {prompt} [/INST] {answer} ", bos=True, eos=True)
        assert whole[: len(masked)] == masked
        return whole, [0] * len(masked) + [1] * (len(whole) - len(masked))

    def example(*turns):
        pieces = [turn(*t) for t in turns]
        return sum((p[0] for p in pieces), []), sum((p[1] for p in pieces), [])

    want = [example(("<<SYS>>\nBe kind.\n<</SYS>>\n\nHi", "Hello there"), ("How are you?", "Fine.")),
            example(("Count to 3", "1 2 3"))]
    want.append(want[1])
    rows, summary = data_lib.build_rows("chat", [str(path)], TOK, max_len=63, pack=False, seed=1)
    assert rows["tokens"].shape == (3, 64) and summary["examples"] == 3
    got = []
    for r in range(3):
        n = int(rows["segment_ids"][r].sum())
        np.testing.assert_array_equal(rows["positions"][r, :n], np.arange(n))
        got.append((rows["tokens"][r, :n].tolist(), rows["loss_mask"][r, :n].tolist()))
    assert sorted(got) == sorted(want)
    assert summary["targets"] == sum(sum(mask) for _, mask in want)


def test_build_rows_pack_places_whole_examples_greedily(tmp_path):
    """pack: true puts the (shuffled) examples, unchanged, into rows of max_len + 1 tokens in order,
    opening a new row when the next one does not fit; each is its own segment with positions from 0."""
    path = tmp_path / "a.json"
    with open("data/demo_alpaca_train.json") as f:
        path.write_text(json.dumps(json.load(f)[:20]))
    padded, padded_summary = data_lib.build_rows("alpaca", [str(path)], TOK, max_len=255, pack=False, seed=2)
    packed, packed_summary = data_lib.build_rows("alpaca", [str(path)], TOK, max_len=255, pack=True, seed=2)
    examples = []  # in shuffled order, from the one-example-per-row table
    for r in range(20):
        n = int(padded["segment_ids"][r].sum())
        examples.append((padded["tokens"][r, :n].tolist(), padded["loss_mask"][r, :n].tolist()))
    rows, used = [[]], 0  # the greedy rule, by hand
    for ex in examples:
        if used + len(ex[0]) > 256:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex[0])
    assert 1 < len(rows) < 20 and packed["tokens"].shape == (len(rows), 256)
    for r, group in enumerate(rows):
        start = 0
        for seg, (tokens, mask) in enumerate(group, 1):
            end = start + len(tokens)
            assert packed["tokens"][r, start:end].tolist() == tokens and packed["loss_mask"][r, start:end].tolist() == mask
            assert (packed["segment_ids"][r, start:end] == seg).all()
            np.testing.assert_array_equal(packed["positions"][r, start:end], np.arange(len(tokens)))
            start = end
        assert (packed["segment_ids"][r, start:] == 0).all() and (packed["loss_mask"][r, start:] == 0).all()
    assert packed_summary["targets"] == padded_summary["targets"] == sum(sum(m[1:]) for _, m in examples)


def test_demo_data_regenerates_exactly_and_holds_out_the_eval_inputs(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, "scripts/make_demo_data.py", "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("demo_alpaca_train.json", "demo_alpaca_eval.json", "demo_pretrain.txt"):
        assert (tmp_path / name).read_bytes() == open(f"data/{name}", "rb").read(), name
    train = data_lib.load_alpaca("data/demo_alpaca_train.json")
    evaluation = data_lib.load_alpaca("data/demo_alpaca_eval.json")
    assert not {r["input"] for r in evaluation} & {r["input"] for r in train}  # under any instruction
    assert {r["instruction"] for r in evaluation} == {r["instruction"] for r in train}
    cfg = load_config("configs/demo.yaml")
    assert max(len(data_lib.alpaca_example(TOK, r, 10_000)[0]) for r in train + evaluation) <= cfg.data.max_len


def test_exact_match_report_groups_by_instruction():
    from train.evaluate import examples, per_task, report

    rows = [{"instruction": ins, "input": x, "expected": want, "got": got, "correct": want == got}
            for ins, x, want, got in [("Copy.", "12", "12", "12"), ("Copy.", "34", "34", "34"),
                                      ("Sort.", "21", "12", "21"), ("Sort.", "31", "13", "13")]]
    assert per_task(rows) == {"Copy.": 1.0, "Sort.": 0.5}
    assert [r["instruction"] for r in examples(rows, 3)] == ["Copy.", "Sort.", "Copy."]
    lines = report(rows, "after", n_examples=2)
    assert lines[0] == "exact match on 4 held-out examples (after): 75.0%"
    assert "2/2" in lines[1] and "1/2" in lines[2] and "BAD Sort. input '21': expected '12', got '21'" in lines[4]
