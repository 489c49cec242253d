"""SFT and pretraining formats: every file type (JSON list, JSONL, Parquet, `datasets` save_to_disk,
`hf:` through `datasets.load_dataset`) and record schema (Alpaca, OpenAI messages, ShareGPT) gives
the same (tokens, loss mask) as the equivalent Alpaca/chat JSON record; bad records are named by
file, line and field; file:// URLs (the stand-in for gs://) work for tokenizer, data and init_from."""

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
from train import data as data_lib  # noqa: E402
from train.config import DataConfig  # noqa: E402
from train.data import formats, stream  # noqa: E402
from train.data.pretokenize import tokenize  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "data", "tokenizer.model")
TOK = lj.Tokenizer(TOKENIZER)
ALPACA = [{"instruction": "Sort the digits.", "input": "4312", "output": "1234"},
          {"instruction": "Name a colour.", "input": "", "output": "Blue"},
          {"instruction": "Add them.", "input": "2 3", "output": "5"}]
CHATS = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Count"},
          {"role": "assistant", "content": "1 2 3"}],
         [{"role": "user", "content": "Reverse 12"}, {"role": "assistant", "content": "21"}]]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def _examples(path, kind):
    return [formats.record_tokens(TOK, kind, r, where) for where, r in formats.iter_records(path)]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


def test_alpaca_files_of_every_kind_give_the_json_examples(tmp_path):
    import datasets

    reference = [data_lib.alpaca_example(TOK, r, 4096) for r in ALPACA]
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    assert _examples(str(tmp_path / "a.json"), "alpaca") == reference
    assert _examples(_write_jsonl(tmp_path / "a.jsonl", ALPACA), "alpaca") == reference
    assert _examples(_write_parquet(tmp_path / "a.parquet", ALPACA), "alpaca") == reference
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "saved"))
    assert _examples(str(tmp_path / "saved"), "alpaca") == reference
    hub = tmp_path / "hub" / "data"  # laid out like a Hub data set repository of Parquet files
    os.makedirs(hub)
    _write_parquet(hub / "train-00000-of-00001.parquet", ALPACA)
    assert _examples(f"hf:{tmp_path / 'hub'}", "alpaca") == reference
    # the same through the offline tokenizer: shards hold the JSON record's tokens and loss mask
    tokenize(TOKENIZER, "alpaca", [str(tmp_path / "a.parquet")], str(tmp_path / "tok"), workers=1, progress=False)
    rows = stream.open_rows(str(tmp_path / "tok"), 4097, pack=False).rows(np.arange(3))
    for i, (tokens, mask) in enumerate(reference):
        assert rows["tokens"][i, : len(tokens)].tolist() == tokens and rows["loss_mask"][i, : len(mask)].tolist() == mask


def test_chat_messages_and_sharegpt_give_the_json_dialog_examples(tmp_path):
    import datasets

    reference = [data_lib.chat_example(TOK, d) for d in CHATS]
    (tmp_path / "c.json").write_text(json.dumps([{"messages": d} for d in CHATS]))
    assert _examples(str(tmp_path / "c.json"), "chat") == reference
    messages = [{"messages": d} for d in CHATS]
    sharegpt = [{"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in d]} for d in CHATS]
    assert _examples(_write_jsonl(tmp_path / "m.jsonl", messages), "chat") == reference
    assert _examples(_write_jsonl(tmp_path / "s.jsonl", sharegpt), "chat") == reference
    assert _examples(_write_parquet(tmp_path / "m.parquet", messages), "chat") == reference
    assert _examples(_write_parquet(tmp_path / "s.parquet", sharegpt), "chat") == reference
    datasets.Dataset.from_list(sharegpt).save_to_disk(str(tmp_path / "saved"))
    assert _examples(str(tmp_path / "saved"), "chat") == reference
    # detected without naming the format; an assistant-less dialog is skipped and counted
    _write_jsonl(tmp_path / "mixed.jsonl", sharegpt + [{"messages": [{"role": "user", "content": "only a question"}]}])
    rows, summary = data_lib.build_rows("auto", [str(tmp_path / "mixed.jsonl")], TOK, 256, pack=False)
    assert summary["examples"] == 2 and summary["skipped"] == 1
    got = sorted(tuple(t[: int((s > 0).sum())]) for t, s in zip(rows["tokens"].tolist(), rows["segment_ids"]))
    assert got == sorted(tuple(t) for t, _ in reference)


def test_bad_records_name_file_line_and_field(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", ALPACA[:2] + [{"instruction": "no output"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: field 'output' is missing"):
        data_lib.build_rows("alpaca", [path], TOK, 128, pack=False)
    (tmp_path / "broken.jsonl").write_text(json.dumps(ALPACA[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not valid JSON"):
        data_lib.build_rows("alpaca", [str(tmp_path / "broken.jsonl")], TOK, 128, pack=False)
    path = _write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(ValueError, match=r"s\.jsonl:1: field 'conversations\[0\]\.from'"):
        data_lib.build_rows("chat", [path], TOK, 128, pack=False)
    path = _write_parquet(tmp_path / "p.parquet", [{"instruction": "x", "input": "", "output": 5}])
    with pytest.raises(ValueError, match=r"p\.parquet row 0: field 'output': expected a string"):
        data_lib.build_rows("alpaca", [path], TOK, 128, pack=False)
    # the command line: one line naming the record, exit 2, no traceback
    result = subprocess.run([sys.executable, "-m", "train.tokenize", "--tokenizer", TOKENIZER, "--format", "alpaca",
                             "--output", str(tmp_path / "out"), "--workers", "1", "--no-progress",
                             str(tmp_path / "bad.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "bad.jsonl:3: field 'output' is missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_file_urls_for_tokenizer_data_and_init_from(tmp_path):
    """file:// URLs take the remote code path (TensorStore kvstores), the stand-in for gs://."""
    url = "file://" + str(tmp_path)
    docs = [{"text": f"document {i} " + "word " * (i % 17)} for i in range(200)]
    _write_jsonl(tmp_path / "part-0.jsonl", docs[:100])
    _write_jsonl(tmp_path / "part-1.jsonl", docs[100:])
    tokenizer_url = "file://" + TOKENIZER
    assert lj.Tokenizer(tokenizer_url).encode("hello world") == TOK.encode("hello world")
    tokenize(tokenizer_url, "jsonl", [url + "/part-*.jsonl"], url + "/tokens", workers=1, shard_tokens=1024,
             progress=False)
    local_rows, _ = data_lib.build_rows("pretrain", [str(tmp_path / "part-0.jsonl"), str(tmp_path / "part-1.jsonl")],
                                        TOK, 40, pack=False)
    batches, summary = data_lib.make_batches(DataConfig(format="tokens", train=[url + "/tokens"], max_len=40), TOK, 4, 0)
    assert summary["examples"] == 200 and batches.num_rows == len(local_rows["tokens"])
    rows = batches.sources[0].rows(np.arange(batches.num_rows))
    np.testing.assert_array_equal(rows["tokens"], local_rows["tokens"])
    url_rows, _ = data_lib.build_rows("pretrain", [url + "/part-0.jsonl", url + "/part-1.jsonl"], TOK, 40, pack=False)
    np.testing.assert_array_equal(url_rows["tokens"], local_rows["tokens"])
    cfg = lj.LlamaConfig.preset("tiny")
    params = lj.init_params(cfg, 0)
    lj.save_checkpoint(str(tmp_path / "ckpt"), cfg, params)
    got_cfg, got = lj.load_checkpoint(url + "/ckpt")  # what init_from=file://... (or gs://...) calls
    assert got_cfg == cfg
    import jax

    jax.tree.map(np.testing.assert_array_equal, got, params)
