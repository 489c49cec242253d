"""The offline tokenizer and the streaming reader: shards decode to sentencepiece's own encoding of
every document, N workers write the same bytes as 1, kill -9 leaves nothing training would read and
a rerun finishes identically, rows follow stream_rows/pack_rows conventions, the order is a pure
function of (seed, step) across shard boundaries and epochs, mixtures hold their weights, reads
stay bounded."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm

import llama_jax as lj
from train import data as data_lib
from train.config import DataConfig
from train.data import shards as shards_lib
from train.data import stream
from train.data.pretokenize import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "data", "tokenizer.model")
SP = spm.SentencePieceProcessor(model_file=TOKENIZER)  # the independent reference encoder
TOK = lj.Tokenizer(TOKENIZER)


@functools.cache
def _words():
    """The corpus' words as one array (rng.choice on the list converted it again for every document)."""
    return np.array(open(os.path.join(ROOT, "data", "tokenizer_corpus.txt")).read().split())


def _docs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = _words()
    return [" ".join(rng.choice(words, rng.integers(1, 120))) for _ in range(n)]


def _jsonl(path, docs):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"body": d}) + "\n")
    return str(path)


def _read_docs(folder):
    """Every document of a tokenized folder, split at its stored document starts."""
    tokens = shards_lib.TokenSet(folder)
    ids, _, mask = tokens.read([(0, tokens.n_tokens)])[0]
    starts = tokens.document_starts()
    return [d.tolist() for d in np.split(ids, starts[1:])], mask, tokens


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """600 documents tokenized into 1024-token shards with 1 and with 2 workers."""
    tmp = tmp_path_factory.mktemp("corpus")
    docs = _docs(600)
    src = _jsonl(tmp / "docs.jsonl", docs)
    for workers in (1, 2):
        tokenize(TOKENIZER, "jsonl", [src], str(tmp / f"w{workers}"), text_key="body", workers=workers,
                 shard_tokens=1024, progress=False)
    return docs, src, tmp


def test_shards_decode_to_sentencepiece_encoding(corpus):
    docs, _, tmp = corpus
    got, mask, tokens = _read_docs(str(tmp / "w1"))
    assert got == [[SP.bos_id()] + SP.encode(d) + [SP.eos_id()] for d in docs]
    assert mask is None and tokens.dtype == np.uint16 and tokens.fingerprint == TOK.fingerprint
    assert tokens.n_shards > 10 and tokens.n_shards == len([n for n in os.listdir(tmp / "w1") if n.endswith(".bin")])
    # every shard but the last holds exactly shard_tokens tokens, and documents run across shards
    sizes = [shards_lib.read_header(str(tmp / "w1" / shards_lib.shard_name(i)))["tokens"] for i in range(tokens.n_shards)]
    assert set(sizes[:-1]) == {1024} and 0 < sizes[-1] <= 1024
    assert shards_lib.token_dtype(32000) == np.uint16 and shards_lib.token_dtype(70000) == np.uint32


def test_workers_write_identical_bytes_and_rerun_is_a_noop(corpus):
    docs, src, tmp = corpus
    names = sorted(os.listdir(tmp / "w1"))
    assert names == sorted(os.listdir(tmp / "w2"))
    for name in names:
        assert (tmp / "w1" / name).read_bytes() == (tmp / "w2" / name).read_bytes(), name
    before = {n: os.stat(tmp / "w1" / n).st_mtime_ns for n in names}
    again = tokenize(TOKENIZER, "jsonl", [src], str(tmp / "w1"), text_key="body", workers=2, shard_tokens=1024,
                     progress=False)
    assert again.get("already") and before == {n: os.stat(tmp / "w1" / n).st_mtime_ns for n in names}
    with pytest.raises(ValueError, match="other inputs or settings"):  # never mixes two data sets in one folder
        tokenize(TOKENIZER, "jsonl", [src], str(tmp / "w1"), text_key="body", workers=1, shard_tokens=2048,
                 progress=False)


def test_interrupted_run_resumes_to_identical_shards(corpus, tmp_path):
    """Shards cut mid-document, a temporary file and a missing manifest: the rerun rewrites only
    what is missing and ends byte-identical to an uninterrupted run."""
    _, src, tmp = corpus
    out = tmp_path / "out"
    os.makedirs(out)
    for name in sorted(os.listdir(tmp / "w1"))[:5]:  # shards 0-3 and nothing else: an interrupted run
        if name.startswith("shard-"):
            (out / name).write_bytes((tmp / "w1" / name).read_bytes())
    (out / "shard-00004.bin.tmp-123").write_bytes(b"half a shard")
    with pytest.raises(FileNotFoundError, match="did not finish"):
        shards_lib.TokenSet(str(out))
    tokenize(TOKENIZER, "jsonl", [src], str(out), text_key="body", workers=1, shard_tokens=1024, progress=False)
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp / "w1"))
    for name in os.listdir(out):
        assert (out / name).read_bytes() == (tmp / "w1" / name).read_bytes(), name


def test_kill9_during_tokenization_leaves_no_half_shard(tmp_path):
    src = _jsonl(tmp_path / "big.jsonl", _docs(1500, seed=1))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "train.tokenize", "--tokenizer", TOKENIZER, "--format", "jsonl", "--text-key", "body",
           "--output", str(out), "--workers", "1", "--shard-tokens", "1024", "--no-progress", src]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "shard-00002.bin").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    for name in os.listdir(out):  # every shard name on disk is a complete shard
        if name.endswith(".bin"):
            header = shards_lib.read_header(str(out / name))
            assert header is not None and os.path.getsize(out / name) == header["regions"]["starts"][1]
    with pytest.raises(FileNotFoundError, match="did not finish"):  # training refuses the unfinished folder
        data_lib.make_batches(DataConfig(format="tokens", train=[str(out)], max_len=32), TOK, 4, 0)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got, _, _ = _read_docs(str(out))
    assert got == [[SP.bos_id()] + SP.encode(d) + [SP.eos_id()] for d in _docs(1500, seed=1)]


def test_window_rows_follow_stream_rows_conventions(corpus):
    docs, _, tmp = corpus
    reference = data_lib.stream_rows([[SP.bos_id()] + SP.encode(d) + [SP.eos_id()] for d in docs], 97)
    source = stream.open_rows(str(tmp / "w2"), 97, pack=False, fingerprint=TOK.fingerprint)
    rows = source.rows(np.arange(source.num_rows))
    assert source.num_rows == len(reference["tokens"]) > 100  # rows of 97 cross the 1024-token shard ends
    for name in reference:
        np.testing.assert_array_equal(rows[name], reference[name], err_msg=name)


def test_order_is_a_pure_function_of_seed_and_step(corpus):
    """A fresh reader (a resumed run after kill -9) gives the same batch k for any k, across shard
    boundaries and epochs; each epoch visits every row once; hosts split each batch."""
    _, _, tmp = corpus
    spec = DataConfig(format="tokens", train=[str(tmp / "w1")], max_len=96)
    batches, summary = data_lib.make_batches(spec, TOK, 8, seed=5)
    per_epoch_rows = batches.num_rows
    steps = 2 * per_epoch_rows // 8 + 3  # past the second epoch's end
    seen = np.concatenate([batches.locate(batches.global_rows(k))[1] for k in range(steps)])
    first, second = seen[:per_epoch_rows], seen[per_epoch_rows: 2 * per_epoch_rows]
    assert sorted(first) == sorted(second) == list(range(per_epoch_rows)) and list(first) != list(second)
    resumed, _ = data_lib.make_batches(spec, TOK, 8, seed=5)
    for k in (steps - 1, 0, per_epoch_rows // 8):
        for name, value in batches(k).items():
            np.testing.assert_array_equal(resumed(k)[name], value)
    other, _ = data_lib.make_batches(spec, TOK, 8, seed=6)
    assert not np.array_equal(other(0)["tokens"], batches(0)["tokens"])
    hosts = [data_lib.make_batches(spec, TOK, 8, 5, i, 2)[0] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h(3)["tokens"] for h in hosts]), batches(3)["tokens"])


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000, 4097])
def test_permute_is_a_bijection(n):
    out = stream.permute(np.arange(n), n, key=12345)
    assert sorted(out.tolist()) == list(range(n))
    if n > 7:  # keyed: another key gives another order, and it is not the identity
        assert not np.array_equal(out, stream.permute(np.arange(n), n, key=54321)) and not np.array_equal(out, np.arange(n))


def test_mixture_weights_and_sources(corpus, tmp_path):
    _, _, tmp = corpus
    other = tmp_path / "other"
    tokenize(TOKENIZER, "text", [os.path.join(ROOT, "data", "demo_pretrain.txt")], str(other), workers=1,
             shard_tokens=4096, progress=False)
    spec = DataConfig(format="tokens", train=[str(tmp / "w1"), str(other)], max_len=64, weights=[0.75, 0.25])
    batches, _ = data_lib.make_batches(spec, TOK, 64, seed=0)
    assert batches.counts.tolist() == [768, 256]
    dataset, _ = batches.locate(np.arange(3 * stream.BLOCK))
    assert [(dataset[b * 1024:(b + 1) * 1024] == 0).sum() for b in range(3)] == [768, 768, 768]
    # a row drawn from the second set holds the second set's tokens
    d, i = batches.locate(np.arange(64))
    row = batches.rows(np.arange(64))["tokens"][np.flatnonzero(d == 1)[0]]
    np.testing.assert_array_equal(row, batches.sources[1].rows(i[d == 1][:1])["tokens"][0])
    with pytest.raises(ValueError, match="one positive weight"):
        data_lib.make_batches(DataConfig(format="tokens", train=[str(other)], weights=[0.0], max_len=64), TOK, 4, 0)
    with pytest.raises(ValueError, match="another tokenizer"):
        stream.open_rows(str(other), 65, False, fingerprint="0" * 16)


def test_sft_shards_pack_and_pad_like_memory_rows(tmp_path):
    records = [{"instruction": f"Repeat {'x ' * (i % 40)}", "input": "", "output": f"{i} " * (1 + i % 30)}
               for i in range(120)]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenize(TOKENIZER, "alpaca", [str(path)], str(tmp_path / "sft"), workers=2, shard_tokens=2048, progress=False)
    examples = [data_lib.alpaca_example(TOK, r, 96) for r in records]
    kept = [e for e in examples if sum(e[1])]  # truncated inside the prompt: no target left, skipped
    for pack, build in ((False, data_lib.pad_rows), (True, data_lib.pack_rows)):
        source = stream.open_rows(str(tmp_path / "sft"), 97, pack)
        rows, reference = source.rows(np.arange(source.num_rows)), build(kept, 97)
        for name in reference:
            np.testing.assert_array_equal(rows[name], reference[name], err_msg=f"{name} pack={pack}")
        assert source.summary["truncated"] == sum(len(TOK.encode(  # records longer than max_len
            lj.format_alpaca(r["instruction"]) + r["output"], bos=True, eos=True)) > 96 for r in records) > 0
        assert source.summary["skipped"] == len(examples) - len(kept) > 0


def test_prefetch_matches_direct_reads_and_raises_errors():
    calls = []

    def batches(k):
        calls.append(k)
        if k == 5:
            raise ValueError("bad shard")
        return {"k": np.asarray(k)}

    with data_lib.Prefetch(batches, 2, 5) as it:
        assert [int(b["k"]) for b in it] == [2, 3, 4]
    with data_lib.Prefetch(batches, 4, 8) as it, pytest.raises(ValueError, match="bad shard"):
        list(it)


def test_training_on_shards_resumes_exactly(corpus, tmp_path, monkeypatch):
    """python -m train's loop on data.format tokens, preempted after step 3 and run again, logs
    the losses of an uninterrupted 6-step run (rows cross the 1024-token shard ends)."""
    from train.config import load_config
    from train.loop import run

    _, _, tmp = corpus

    def cfg(out):
        return load_config(os.path.join(ROOT, "configs", "demo.yaml"), [
            f"output_dir={out}", "steps=6", "checkpoint_every=100", "log_every=1", "batch_size=8",
            "model.preset=tiny", "model.overrides={}", "data.format=tokens", f"data.train=[{tmp / 'w1'}]",
            "data.max_len=64", "eval.data=null", "eval.loss_data=null", "tensorboard=false",
            "async_checkpointing=false"])

    def losses(out):
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}

    run(cfg(tmp_path / "straight"))
    consumed = []
    plain_next = stream.Prefetch.__next__

    def next_then_preempt(self):  # SIGTERM (a preemption) while step 3 runs
        batch = plain_next(self)
        consumed.append(1)
        if len(consumed) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    monkeypatch.setattr(stream.Prefetch, "__next__", next_then_preempt)
    assert run(cfg(tmp_path / "resumed"))["preempted_at"] == 3
    monkeypatch.setattr(stream.Prefetch, "__next__", plain_next)
    assert run(cfg(tmp_path / "resumed"))["start_step"] == 3
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 6


RSS_CHILD = """
import json, sys
sys.path.insert(0, {root!r})
import llama_jax as lj
from train import data as data_lib
from train.config import DataConfig
batches, _ = data_lib.make_batches(DataConfig(format="tokens", train=[sys.argv[1]], max_len=1024),
                                   lj.Tokenizer({tokenizer!r}), 16, 0)
with data_lib.Prefetch(batches, 0, 40) as it:
    for _ in it:
        pass
print(next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""  # VmHWM, not ru_maxrss: that one carries pytest's own peak across exec


def _random_token_set(folder, n_tokens):
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    writer = shards_lib.ShardWriter(str(folder), 1 << 22, np.dtype("<u2"), False, {"run": "t", "tokenizer": TOK.fingerprint})
    done = docs = 0
    while done < n_tokens:
        n = min(int(rng.integers(100, 3000)), n_tokens - done)
        writer.add(rng.integers(3, 512, n).astype(np.uint16), None, docs, 0)
        done, docs = done + n, docs + 1
    writer.flush({"record": docs, "token": 0, "skipped": 0})
    (folder / "manifest.json").write_text(json.dumps({
        **shards_lib.FORMAT, "kind": "text", "tokenizer": TOK.fingerprint, "dtype": "<u2", "has_mask": False,
        "shard_tokens": 1 << 22, "shards": writer.index, "tokens": done, "docs": docs}))


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """4 MB and 80 MB of tokens, the same recipe: peak RSS within 25 MB (reading the big corpus
    into memory would add 80 MB; bench/data.py measures 30 MB vs 1 GB)."""
    peaks = []
    for name, n in (("small", 2_000_000), ("large", 40_000_000)):
        _random_token_set(tmp_path / name, n)
        out = subprocess.run([sys.executable, "-c", RSS_CHILD.format(root=ROOT, tokenizer=TOKENIZER), str(tmp_path / name)],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert out.returncode == 0, out.stderr[-2000:]
        peaks.append(float(out.stdout.strip().splitlines()[-1]))
    assert abs(peaks[1] - peaks[0]) < 25, peaks


def test_held_out_batches_read_tokenized_shards(corpus):
    """eval.loss_data in a run whose data.format is tokens: fixed batches drawn from the shards' rows
    (the window rows checked above), each row a real row of the shard set, the same on every call."""
    _, _, tmp = corpus
    data = DataConfig(format="tokens", train=[str(tmp / "w1")], max_len=96)
    batches = data_lib.held_out_batches(data, str(tmp / "w1"), TOK, 8, 3, seed=0)
    again = data_lib.held_out_batches(data, str(tmp / "w1"), TOK, 8, 3, seed=0)
    source = stream.open_rows(str(tmp / "w1"), 97, pack=False, fingerprint=TOK.fingerprint)
    all_rows = {tuple(r) for r in source.rows(np.arange(source.num_rows))["tokens"][:, :-1]}
    assert len(batches) == 3
    for b, b2 in zip(batches, again):
        np.testing.assert_array_equal(b["tokens"], b2["tokens"])
        assert b["tokens"].shape == (8, 96) and all(tuple(r) in all_rows for r in b["tokens"])


def test_llama3_tokenizer_json_shards_equal_transformers(tmp_path):
    """A Hugging Face tokenizer.json in the offline tokenizer: worker processes (the tokenizer travels as
    its files' bytes) write text shards equal to transformers' encoding of each document + EOS, and chat
    shards equal to its Llama 3 chat template, only the answers and their <|eot_id|> as targets."""
    import transformers

    from reference import llama3_tokenizer

    folder = llama3_tokenizer(str(tmp_path / "tok"))
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    docs = _docs(40, seed=3) + ["Café, 日本語 🙂 <|eot_id|> inside"]
    tokenize(folder, "jsonl", [_jsonl(tmp_path / "docs.jsonl", docs)], str(tmp_path / "text"), text_key="body",
             workers=2, shard_tokens=1024, progress=False)
    got, _, tokens = _read_docs(str(tmp_path / "text"))
    assert got == [hf.encode(d, add_special_tokens=True) + [hf.eos_token_id] for d in docs]
    assert tokens.fingerprint == lj.Tokenizer(folder).fingerprint != TOK.fingerprint
    dialogs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Add {i} and 5."},
                {"role": "assistant", "content": f" {i + 5} "}] for i in range(30)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs))
    tokenize(folder, "chat", [str(tmp_path / "chat.jsonl")], str(tmp_path / "chat"), workers=1, shard_tokens=1024,
             progress=False)
    got, mask, _ = _read_docs(str(tmp_path / "chat"))
    assert got == [hf.apply_chat_template(d, tokenize=True)["input_ids"] for d in dialogs]
    masks = np.split(mask, np.cumsum([len(g) for g in got])[:-1])
    for dialog, ids, m in zip(dialogs, got, masks):
        assert [i for i, keep in zip(ids, m) if keep] == hf.encode(dialog[2]["content"].strip() + "<|eot_id|>",
                                                                   add_special_tokens=False)
