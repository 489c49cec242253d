"""`python -m train.tokenize` holds its promises on hostile input: two runs racing into one folder
(one wins, the other names it), --output paths that are files or hold the inputs, numeric flags
out of range, Hub data sets offline and lone surrogates in JSON each end in one `error:` line; a
document of any length is encoded in pieces with exactly the ids of one call (checked against
sentencepiece's and transformers' own encoding of the whole document) in memory that does not grow
with it."""

import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import sentencepiece as spm

import llama_jax as lj
from train.data import formats, pretokenize
from train.data import shards as shards_lib
from train.data.pretokenize import tokenize
from train.tokenize import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "data", "tokenizer.model")
SP = spm.SentencePieceProcessor(model_file=TOKENIZER)  # the independent reference encoder
TOK = lj.Tokenizer(TOKENIZER)
WORDS = open(os.path.join(ROOT, "data", "tokenizer_corpus.txt")).read().split()
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}


def _jsonl(path, docs, key="body"):
    with open(path, "w") as f:
        f.writelines(json.dumps({key: d}) + "\n" for d in docs)
    return str(path)


def _read_docs(folder):
    tokens = shards_lib.TokenSet(str(folder))
    ids, _, _ = tokens.read([(0, tokens.n_tokens)])[0]
    return [d.tolist() for d in np.split(ids, tokens.document_starts()[1:])]


def _cli(*argv):
    return [sys.executable, "-m", "train.tokenize", "--tokenizer", TOKENIZER, "--no-progress", *argv]


def _errors(text):
    return [line for line in text.splitlines() if line.startswith("error: ")]


def _ragged_docs(n, seed, long_every=7):
    """Documents with every kind of whitespace a cut must respect (runs of spaces, tabs, line breaks,
    leading and trailing), accents and CJK, and every `long_every`-th one a few thousand characters."""
    rng = np.random.default_rng(seed)
    seps = [" ", " ", " ", " ", "  ", "   ", "\n", " \n", "\n ", "\t", " \t ", "\n\t"]
    extra = ["café", "日本語", "naïve", "🙂", "x" * 40, "12345", "don't", "."]
    docs = []
    for i in range(n):
        k = int(rng.integers(600, 1500)) if i % long_every == 0 else int(rng.integers(1, 60))
        words = [str(w) if rng.random() > 0.1 else extra[int(rng.integers(len(extra)))] for w in rng.choice(WORDS, k)]
        docs.append("".join(w + seps[int(rng.integers(len(seps)))] for w in words))
    return docs


# --- 8: two runs into one folder ----------------------------------------------------------------------


def test_two_runs_racing_into_one_folder_one_wins(tmp_path):
    """Two real processes with different inputs and one --output, started together: exactly one
    writes the folder; the other exits 2 with one line naming the folder and the winner's pid, and
    the folder holds the winner's documents only."""
    rng = np.random.default_rng(0)
    docs = {name: [" ".join(rng.choice(WORDS, int(rng.integers(20, 120)))) for _ in range(300)] for name in "ab"}
    srcs = {name: _jsonl(tmp_path / f"{name}.jsonl", d) for name, d in docs.items()}
    out = tmp_path / "out"
    procs = {name: subprocess.Popen(_cli("--format", "jsonl", "--text-key", "body", "--workers", "1",
                                         "--shard-tokens", "4096", "--output", str(out), src),
                                    cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, src in srcs.items()}
    results = {name: (*p.communicate(timeout=300), p.returncode) for name, p in procs.items()}
    assert sorted(r[2] for r in results.values()) == [0, 2], results
    winner = next(name for name, r in results.items() if r[2] == 0)
    loser = "b" if winner == "a" else "a"
    errors = _errors(results[loser][1])
    assert len(errors) == 1 and str(out) in errors[0] and f"pid {procs[winner].pid}" in errors[0], results[loser][1]
    manifest = shards_lib.read_manifest(str(out))
    assert [f for f, _ in manifest["settings"]["inputs"]] == [srcs[winner]]
    names = sorted(os.listdir(out))
    assert names == ["manifest.json"] + [shards_lib.shard_name(i) for i in range(manifest["shards"])]  # no lock left
    assert {shards_lib.read_header(str(out / n))["run"] for n in names[1:]} == {manifest["run"]}
    assert _read_docs(out) == [[SP.bos_id()] + SP.encode(d) + [SP.eos_id()] for d in docs[winner]]


# --- 9: --output paths ----------------------------------------------------------------------------


def test_output_that_is_a_file_or_holds_the_input_is_refused(tmp_path, capsys):
    src = tmp_path / "in" / "docs.txt"
    src.parent.mkdir()
    src.write_text("one document\n\nanother one\n")
    other = tmp_path / "notes.txt"
    other.write_text("not a folder")
    before = {p: p.read_bytes() for p in (src, other)}
    for output, expected in ((src, "is an input of this run; expected a folder"),
                             (other, "is a file; expected a folder"),
                             (src / "tokens", f"{src} is a file, so no folder can be made under it"),
                             (other / "a" / "b", f"{other} is a file"),
                             (src.parent, f"contains the source {src}"),
                             (tmp_path, f"contains the source {src}")):
        assert main(["--tokenizer", TOKENIZER, "--format", "text", "--output", str(output), str(src)]) == 2
        errors = _errors(capsys.readouterr().err)
        assert len(errors) == 1 and f"--output {output}" in errors[0] and expected in errors[0], errors
    assert {p: p.read_bytes() for p in (src, other)} == before
    assert sorted(os.listdir(tmp_path)) == ["in", "notes.txt"] and os.listdir(src.parent) == ["docs.txt"]


# --- 10: any document length -----------------------------------------------------------------------


def test_long_documents_are_cut_where_the_ids_do_not_change(tmp_path, monkeypatch):
    """With 256-character pieces, documents of up to ~10k characters are read (text) and encoded
    (text and JSON lines) in many pieces; every document's ids equal sentencepiece's encoding of the
    whole document, and a run stopped after two shards resumes (mid-piece) to the same bytes."""
    monkeypatch.setattr(pretokenize, "PIECE_CHARS", 256)
    docs = _ragged_docs(60, seed=1)
    (tmp_path / "docs.txt").write_text("  " + "\n\n".join(docs) + "\n\n\n")
    stripped = [d.strip() for d in "\n\n".join(docs).split("\n\n") if d.strip()]  # documents as text_documents
    pieces = list(formats.text_pieces(str(tmp_path / "docs.txt"), TOK.cut, 256))
    assert len(pieces) > 3 * len(stripped) and ["".join(p for d, p, _ in pieces if d == i)
                                                 for i in range(len(stripped))] == stripped
    tokenize(TOKENIZER, "text", [str(tmp_path / "docs.txt")], str(tmp_path / "text"), workers=1, shard_tokens=1024,
             progress=False)
    assert _read_docs(tmp_path / "text") == [[SP.bos_id()] + SP.encode(d) + [SP.eos_id()] for d in stripped]
    tokenize(TOKENIZER, "jsonl", [_jsonl(tmp_path / "docs.jsonl", docs)], str(tmp_path / "jsonl"), text_key="body",
             workers=1, shard_tokens=1024, progress=False)
    assert _read_docs(tmp_path / "jsonl") == [[SP.bos_id()] + SP.encode(d) + [SP.eos_id()] for d in docs]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for i in range(2):
        name = shards_lib.shard_name(i)
        (resumed / name).write_bytes((tmp_path / "text" / name).read_bytes())
    assert shards_lib.read_header(str(resumed / shards_lib.shard_name(1)))["resume"]["token"] > 0  # mid-piece
    tokenize(TOKENIZER, "text", [str(tmp_path / "docs.txt")], str(resumed), workers=1, shard_tokens=1024,
             progress=False)
    for name in os.listdir(tmp_path / "text"):
        assert (resumed / name).read_bytes() == (tmp_path / "text" / name).read_bytes(), name


def test_long_documents_in_pieces_equal_transformers_llama3(tmp_path, monkeypatch):
    """The same with a Llama-3-style tokenizer.json (byte-level BPE, Llama 3's split regex): it is cut
    at spaces only, and the shards equal transformers' encoding of each whole document."""
    import transformers

    from reference import llama3_tokenizer

    monkeypatch.setattr(pretokenize, "PIECE_CHARS", 256)
    folder = llama3_tokenizer(str(tmp_path / "tok"))
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert lj.Tokenizer(folder).cut_chars == " "
    docs = _ragged_docs(30, seed=2, long_every=3) + ["<|eot_id|> " * 200 + "end"]
    (tmp_path / "docs.txt").write_text("\n\n".join(docs))
    stripped = [d.strip() for d in "\n\n".join(docs).split("\n\n") if d.strip()]
    tokenize(folder, "text", [str(tmp_path / "docs.txt")], str(tmp_path / "text"), workers=1, shard_tokens=1024,
             progress=False)
    assert _read_docs(tmp_path / "text") == [hf.encode(d) + [hf.eos_token_id] for d in stripped]


def test_reader_holds_pieces_of_a_line_not_the_line(tmp_path):
    """A 16 MB single-line document is read in 256 Ki-character pieces: the reader's Python
    allocations peak under 8 MB (holding the line would be 16 MB, and reading it whole held it
    three times over)."""
    line = tmp_path / "line.txt"
    line.write_text(" ".join(WORDS[:20_000]) * 160)
    assert os.path.getsize(line) > 16e6 and b"\n" not in line.read_bytes()
    tracemalloc.start()
    pieces = sum(1 for _ in formats.text_pieces(str(line), TOK.cut, pretokenize.PIECE_CHARS, pretokenize.MAX_UNCUT))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert pieces >= 60 and peak < 8e6, (pieces, peak)


def test_encoding_memory_does_not_grow_with_the_length_of_a_line(tmp_path):
    """The encoding process on a 2.7 MB single-line document peaks within 20 MB of a run on the same
    words as 300 documents (measured: 1 MB less; encoding the line in one call took 54 MB more)."""
    words = np.random.default_rng(4).choice(WORDS, 500_000)
    (tmp_path / "docs.txt").write_text("\n\n".join(" ".join(part) for part in np.array_split(words, 300)))
    (tmp_path / "line.txt").write_text(" ".join(words))
    peaks = {name: tokenize(TOKENIZER, "text", [str(tmp_path / f"{name}.txt")], str(tmp_path / f"out-{name}"),
                            workers=1, progress=False)["workers_peak_rss_mb"] for name in ("docs", "line")}
    assert peaks["line"] - peaks["docs"] < 20, peaks


def test_text_without_a_place_to_cut_is_refused_beyond_the_limit(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretokenize, "MAX_UNCUT", 5000)
    (tmp_path / "blob.txt").write_text("short one\n\n" + "x" * 3000 + " and\n\n" + "y" * 12000)
    assert main(["--tokenizer", TOKENIZER, "--format", "text", "--workers", "1", "--output", str(tmp_path / "out"),
                 str(tmp_path / "blob.txt")]) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and f"{tmp_path / 'blob.txt'} document 2: more than 5000 characters" in errors[0], errors
    (tmp_path / "long.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "' + b"z " * 3000 + b'"}\n')
    assert main(["--tokenizer", TOKENIZER, "--format", "jsonl", "--workers", "1", "--output", str(tmp_path / "out"),
                 str(tmp_path / "long.jsonl")]) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and f"{tmp_path / 'long.jsonl'}:2: a line longer than 5000 bytes" in errors[0], errors


# --- 11: numbers and the Hub ------------------------------------------------------------------------


def test_numeric_flags_are_range_checked_before_anything_is_allocated(tmp_path, capsys):
    src = tmp_path / "docs.txt"
    src.write_text("a document\n")
    for flag, value in (("--shard-tokens", 2**40), ("--shard-tokens", 1023), ("--shard-tokens", -5),
                        ("--workers", 0), ("--workers", 10**6)):
        assert main(["--tokenizer", TOKENIZER, "--format", "text", flag, str(value), "--output",
                     str(tmp_path / "out"), str(src)]) == 2
        errors = _errors(capsys.readouterr().err)
        assert len(errors) == 1 and errors[0].startswith(f"error: {flag} must be an integer in [") \
            and errors[0].endswith(f"got {value}"), errors
    assert not (tmp_path / "out").exists()


def test_hub_data_set_offline_is_one_line(tmp_path, capsys, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at start-up would
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["--tokenizer", TOKENIZER, "--format", "alpaca", "--workers", "1", "--output", str(tmp_path / "out"),
                 "hf:llama-jax-tests/no-such-set"]) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith("error: hf:llama-jax-tests/no-such-set: not in the local Hugging "
                                                     "Face cache") and "HF_HUB_OFFLINE" in errors[0], errors
    assert not (tmp_path / "out").exists()


# --- 12: lone surrogates -------------------------------------------------------------------------------


def test_lone_surrogate_escape_names_file_line_and_field(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"body": "fine"}\n{"body": "\\ud83d\\ude00 a pair is fine"}\n\n{"body": "half \\ud800 a pair"}\n')
    assert main(["--tokenizer", TOKENIZER, "--format", "jsonl", "--text-key", "body", "--workers", "1",
                 "--output", str(tmp_path / "out"), str(src)]) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"error: {src}:4: field 'body': a lone surrogate escape \\ud800"), errors
    with pytest.raises(ValueError, match=r"^f.jsonl:7: field 'messages\[1\].content': a lone surrogate escape \\udc00"):
        formats.parse_json('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                           '"content": "x\\uDC00"}]}', "f.jsonl:7")
    assert formats.parse_json('{"a": "\\ud83d\\ude00"}', "w") == {"a": "\U0001f600"}
