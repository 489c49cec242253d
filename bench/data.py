"""Data pipeline throughput and memory: the offline tokenizer (1 and 2 worker processes next to
sentencepiece's own single-process speed, measured in the same run), the streaming reader (rows/s
next to what one v5p-8 step of the 7B recipe consumes per host), peak host RSS of the same recipe
on a small and a large corpus, and the reading time the training loop waits for with prefetch.

    python bench/data.py                      # everything: about 5 minutes on 2 CPU cores
    python bench/data.py --smoke              # tiny sizes, under a minute
    python bench/data.py --only tokenize      # one part: tokenize | reader | rss | prefetch | arrayrecord
    python bench/data.py --only longline      # a 65 MB single-line document vs the same words as documents

`arrayrecord` (needs the `array-record` package, not a project dependency) times the alternative
shard format we weighed: random reads of the same tokens stored one document per ArrayRecord record.
The machine is shared: the load average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "data", "tokenizer.model")
ROW_LEN_7B, BATCH_7B = 4097, 1024  # configs/pretrain-llama2-7b.yaml: max_len 4096, batch_size 1024


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def make_corpus(path: str, megabytes: float, seed: int = 0) -> list[str]:
    """JSONL documents of words from the tokenizer's corpus, `megabytes` in all."""
    words = np.asarray(open(os.path.join(ROOT, "data", "tokenizer_corpus.txt")).read().split())
    rng = np.random.default_rng(seed)
    docs, size = [], 0
    while size < megabytes * 1e6:
        doc = " ".join(rng.choice(words, int(rng.integers(50, 600))))
        docs.append(doc)
        size += len(doc) + 12
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    return docs


def write_random_tokens(folder: str, n_tokens: int, seed: int = 0) -> None:
    """A tokenized data set of random ids in documents of 200-2000 tokens (no tokenizer run)."""
    import llama_jax as lj
    from llama_jax.checkpoint.files import write_text
    from train.data import shards

    tok = lj.Tokenizer(TOKENIZER)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = shards.ShardWriter(folder, 1 << 25, np.dtype("<u2"), False, {"run": "bench", "tokenizer": tok.fingerprint})
    written = docs = 0
    while written < n_tokens:
        n = min(int(rng.integers(200, 2000)), n_tokens - written)
        ids = rng.integers(3, tok.vocab_size, n).astype(np.uint16)
        ids[0] = tok.bos_id
        writer.add(ids, None, docs, 0)
        written += n
        docs += 1
    writer.flush({"record": docs, "token": 0, "skipped": 0})
    manifest = {**shards.FORMAT, "run": "bench", "kind": "text", "tokenizer": tok.fingerprint,
                "vocab_size": tok.vocab_size, "dtype": "<u2", "has_mask": False, "shard_tokens": 1 << 25,
                "shards": writer.index, "tokens": written, "docs": docs, "records": docs, "skipped": 0}
    write_text(os.path.join(folder, shards.MANIFEST), json.dumps(manifest))


def bench_tokenize(tmp: str, megabytes: float) -> list[dict]:
    """python -m train.tokenize with 1 and 2 workers (tokens/s from its own timer, peak RSS of its
    largest process), and sentencepiece's batched encode of the same documents in this process."""
    import sentencepiece as spm

    from bench.common import row

    src = os.path.join(tmp, "corpus.jsonl")
    docs = make_corpus(src, megabytes)
    sp = spm.SentencePieceProcessor(model_file=TOKENIZER)
    print(f"tokenize: {len(docs)} documents, {os.path.getsize(src) / 1e6:.1f} MB; {load()}", flush=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    n_tokens = sum(map(len, sp.encode(docs, add_bos=True, add_eos=True, num_threads=1)))  # as the shards hold them
    ceiling = n_tokens / (time.perf_counter() - start)
    ceiling_cpu = n_tokens / (time.process_time() - cpu_start)
    del docs
    rates, results = {}, {}
    for workers in (1, 2):
        out = subprocess.run([sys.executable, "-m", "train.tokenize", "--tokenizer", TOKENIZER, "--format", "jsonl",
                              "--output", os.path.join(tmp, f"tok{workers}"), "--workers", str(workers),
                              "--no-progress", src], capture_output=True, text=True, check=True, cwd=ROOT)
        result = results[workers] = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["tokens"] == n_tokens
        rates[workers] = result["tokens"] / result["seconds"]
        print(f"  {workers} worker(s): {rates[workers]:,.0f} tokens/s, peak RSS {result['peak_rss_mb']} MB, CPU s "
              f"{result['cpu_s']}; {load()}", flush=True)
    print(f"  sentencepiece alone, one process: {ceiling:,.0f} tokens/s ({ceiling_cpu:,.0f} per CPU second)", flush=True)
    # What 2 idle cores give: the workers' CPU split over 2 cores, this process's share on top.
    cpu = results[2]["cpu_s"]
    capacity = n_tokens / max(cpu["workers"] / 2 + cpu["main"] / 2, cpu["main"])
    print(f"  CPU accounting: workers {n_tokens / cpu['workers']:,.0f} tokens per CPU second, the reading process "
          f"{cpu['main'] / (cpu['main'] + cpu['workers']):.1%} of all CPU: 2 idle cores would give "
          f"{capacity:,.0f} tokens/s", flush=True)
    config = f"{megabytes:g} MB JSONL, 512-piece tokenizer, {os.cpu_count()} cores"
    return [row(config, "tokenize tokens/s, 1 worker vs sentencepiece alone", rates[1], ceiling, "tokens/s"),
            row(config, "tokenize tokens/s, 2 workers vs 1 worker", rates[2], rates[1], "tokens/s",
                peak_rss_mb=results[2]["peak_rss_mb"]),
            row(config, "tokenize tokens/s, 2 workers vs sentencepiece alone", rates[2], ceiling, "tokens/s"),
            row(config, "tokenize tokens per CPU second in the workers vs sentencepiece alone",
                n_tokens / cpu["workers"], ceiling_cpu, "tokens/CPU s", main_cpu_share=cpu["main"] / sum(cpu.values()))]


def bench_longline(tmp: str, megabytes: float) -> list[dict]:
    """python -m train.tokenize (1 worker) on one single-line document of `megabytes`, and on the same
    words as documents of 1000 words: peak RSS of the largest process and tokens/s of each. The line
    is read and encoded in pieces, so its peak should be the documents' (it was 3,039 MB for 65 MB
    when it was encoded in one call)."""
    from bench.common import row

    words = np.asarray(open(os.path.join(ROOT, "data", "tokenizer_corpus.txt")).read().split())
    rng = np.random.default_rng(0)
    line, docs, size = os.path.join(tmp, "line.txt"), os.path.join(tmp, "docs.txt"), 0
    with open(line, "w") as f, open(docs, "w") as g:
        while size < megabytes * 1e6:
            part = rng.choice(words, 1000)
            f.write(" ".join(part) + " ")
            g.write(" ".join(part) + "\n\n")
            size += sum(map(len, part)) + 1000
    print(f"longline: {os.path.getsize(line) / 1e6:.1f} MB in one line vs {megabytes:g} MB as documents; {load()}",
          flush=True)
    results = {}
    for name, src in (("line", line), ("docs", docs)):
        out = subprocess.run([sys.executable, "-m", "train.tokenize", "--tokenizer", TOKENIZER, "--format", "text",
                              "--output", os.path.join(tmp, f"out-{name}"), "--workers", "1", "--no-progress", src],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {name}: {results[name]['tokens']:,} tokens, {results[name]['docs']} document(s), peak RSS "
              f"{results[name]['peak_rss_mb']} MB, {results[name]['tokens'] / results[name]['seconds']:,.0f} "
              f"tokens/s; {load()}", flush=True)
    config = f"{megabytes:g} MB of text, 512-piece tokenizer, 1 worker"
    line_r, docs_r = results["line"], results["docs"]
    return [row(config, "tokenize peak RSS MB (largest process): one line vs 1000-word documents",
                line_r["peak_rss_mb"], docs_r["peak_rss_mb"], "MB"),
            row(config, "tokenize tokens/s: one line vs 1000-word documents", line_r["tokens"] / line_r["seconds"],
                docs_r["tokens"] / docs_r["seconds"], "tokens/s")]


def needed_rows_per_s(mfu: float = 0.6) -> tuple[float, float]:
    """(rows/s, step seconds) one v5p-8 host consumes on the 7B recipe at `mfu` (4 chips, one host)."""
    import llama_jax as lj
    from llama_jax import flops
    from sharding.hardware import CHIPS

    cfg = lj.LlamaConfig.preset("llama2-7b")
    peak = CHIPS["v5p"].peak_bf16_flops
    step_s = BATCH_7B * (ROW_LEN_7B - 1) * flops.train_flops_per_token(cfg, ROW_LEN_7B - 1) / (4 * peak * mfu)
    return BATCH_7B / step_s, step_s


def bench_reader(tmp: str, n_tokens: int, steps: int) -> list[dict]:
    import llama_jax as lj
    from bench.common import row
    from train import data as data_lib
    from train.config import DataConfig

    folder = os.path.join(tmp, "reader")
    write_random_tokens(folder, n_tokens)
    spec = DataConfig(format="tokens", train=[folder], max_len=ROW_LEN_7B - 1)
    batches, _ = data_lib.make_batches(spec, lj.Tokenizer(TOKENIZER), BATCH_7B, 0)
    batches(0)
    start = time.perf_counter()
    for k in range(1, steps + 1):
        batches(k)
    rate = steps * BATCH_7B / (time.perf_counter() - start)
    need, step_s = needed_rows_per_s()
    print(f"reader: {rate:,.0f} rows/s of {ROW_LEN_7B} tokens; a v5p-8 host needs {need:.1f} rows/s "
          f"(7B step {step_s:.1f} s at 60% MFU); {load()}", flush=True)
    return [row(f"7B recipe rows ({ROW_LEN_7B} tokens, batch {BATCH_7B}), local disk, vs v5p-8 need at 60% MFU",
                "reader rows/s vs rows/s one v5p-8 host consumes", rate, need, "rows/s")]


def rss_child(folder: str, steps: int) -> None:
    """Peak RSS of reading `steps` batches of the 7B recipe (one host) with the prefetch thread."""
    import llama_jax as lj
    from train import data as data_lib
    from train.config import DataConfig

    spec = DataConfig(format="tokens", train=[folder], max_len=ROW_LEN_7B - 1)
    batches, _ = data_lib.make_batches(spec, lj.Tokenizer(TOKENIZER), BATCH_7B, 0)
    with data_lib.Prefetch(batches, 0, steps) as it:
        for _ in it:
            pass
    from train.tokenize import peak_rss_mb

    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb(folder: str, steps: int) -> float:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-child", folder, "--steps", str(steps)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def bench_rss(tmp: str, small: int, large: int, steps: int) -> list[dict]:
    from bench.common import row

    results = {}
    for name, n in (("small", small), ("large", large)):
        folder = os.path.join(tmp, f"rss-{name}")
        write_random_tokens(folder, n, seed=1)
        results[name] = peak_rss_mb(folder, steps)
        print(f"rss: {n * 2 / 1e6:,.0f} MB of tokens -> peak RSS {results[name]:.0f} MB "
              f"({steps} batches of {BATCH_7B} x {ROW_LEN_7B}); {load()}", flush=True)
    config = f"7B recipe reader, {steps} steps, {small * 2 / 1e6:.0f} MB vs {large * 2 / 1e6:.0f} MB of tokens"
    return [row(config, "peak RSS MB, large corpus (peer: small corpus); goal within 100 MB",
                results["large"], results["small"], "MB", difference_mb=round(results["large"] - results["small"], 1))]


def bench_prefetch(tmp: str, steps: int) -> list[dict]:
    """The time the loop waits for data per step, with the prefetch thread, next to a real CPU train step."""
    import jax
    import jax.numpy as jnp

    import llama_jax as lj
    from bench.common import row
    from train import data as data_lib
    from train.config import DataConfig

    folder = os.path.join(tmp, "prefetch")
    write_random_tokens(folder, 2_000_000, seed=2)
    cfg = lj.LlamaConfig.preset("tiny", vocab_size=512)
    batch, max_len = 8, 256
    batches, _ = data_lib.make_batches(DataConfig(format="tokens", train=[folder], max_len=max_len),
                                       lj.Tokenizer(TOKENIZER), batch, 0)
    params = lj.init_params(cfg, 0)

    @jax.jit
    def step(params, b):
        def loss(p):
            logits = lj.forward(p, b["tokens"], cfg, b["positions"], b["segment_ids"])
            logp = jax.nn.log_softmax(logits)
            nll = -jnp.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
            return (nll * b["weights"]).sum() / b["weights"].sum()
        value, grads = jax.value_and_grad(loss)(params)
        return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), value

    params, _ = step(params, batches(0))
    start = time.perf_counter()
    for k in range(1, steps + 1):
        batches(k)
    read_s = (time.perf_counter() - start) / steps
    start = time.perf_counter()
    with data_lib.Prefetch(batches, 1, steps + 1) as it:
        for b in it:
            params, value = step(params, b)
            value.block_until_ready()
        waited = it.waited_s / steps
    step_s = (time.perf_counter() - start) / steps
    print(f"prefetch: reading a batch of {batch} x {max_len + 1} takes {read_s * 1e3:.2f} ms; the loop waited "
          f"{waited * 1e3:.3f} ms per {step_s * 1e3:.0f} ms CPU step (tiny preset); {load()}", flush=True)
    return [row(f"tiny preset, batch {batch} x {max_len + 1}, CPU", "data wait per step with prefetch, ms (peer: "
                "reading without prefetch, ms; lower is better)", waited * 1e3, read_s * 1e3, "ms",
                step_ms=round(step_s * 1e3, 1))]


def bench_arrayrecord(tmp: str, n_tokens: int, reads: int) -> list[dict]:
    """Random 4097-token windows from our shards vs random documents from ArrayRecord (same tokens)."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    from bench.common import row
    from train.data.shards import TokenSet

    folder = os.path.join(tmp, "ar")
    write_random_tokens(folder, n_tokens, seed=3)
    tokens = TokenSet(folder)
    starts = tokens.document_starts()
    path = os.path.join(tmp, "docs.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    bounds = np.append(starts, tokens.n_tokens)
    for a, b in zip(bounds[:-1], bounds[1:]):
        writer.write(tokens.read([(int(a), int(b))])[0][0].astype(np.uint16).tobytes())
    writer.close()
    rng = np.random.default_rng(0)
    offsets = rng.integers(0, tokens.n_tokens - ROW_LEN_7B, reads)
    start = time.perf_counter()
    for i in range(0, reads, 64):
        tokens.read([(int(a), int(a) + ROW_LEN_7B) for a in offsets[i: i + 64]])
    ours = reads * ROW_LEN_7B / (time.perf_counter() - start)
    reader = ArrayRecordReader(path, "readahead_buffer_size:0")
    picks = rng.integers(0, len(starts), reads)
    start = time.perf_counter()
    got = 0
    for i in range(0, reads, 64):
        for record in reader.read(picks[i: i + 64].tolist()):
            got += len(np.frombuffer(record, np.uint16))
    theirs = got / (time.perf_counter() - start)
    size_ours = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
    print(f"arrayrecord: random reads {ours / 1e6:.1f} M tokens/s (our shards, windows) vs {theirs / 1e6:.1f} M "
          f"tokens/s (ArrayRecord, documents); {size_ours / 1e6:.0f} vs {os.path.getsize(path) / 1e6:.0f} MB; {load()}")
    return [row(f"{n_tokens / 1e6:.0f}M random tokens, random access, local disk", "tokens/s read (peer: ArrayRecord "
                "one document per record)", ours, theirs, "tokens/s")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", choices=["tokenize", "reader", "rss", "prefetch", "arrayrecord", "longline"])
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--tokenize-mb", type=float, default=20, help="size of the JSONL corpus to tokenize")
    parser.add_argument("--longline-mb", type=float, default=65, help="size of the single-line document (longline)")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child, args.steps)
    from bench.common import write_result

    smoke = args.smoke
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        if args.only in (None, "tokenize"):
            rows += bench_tokenize(tmp, 1 if smoke else args.tokenize_mb)
        if args.only in (None, "reader"):
            rows += bench_reader(tmp, 5_000_000 if smoke else 100_000_000, 2 if smoke else 10)
        if args.only in (None, "rss"):
            rows += bench_rss(tmp, 5_000_000 if smoke else 15_000_000, 20_000_000 if smoke else 500_000_000, 4)
        if args.only in (None, "prefetch"):
            rows += bench_prefetch(tmp, 5 if smoke else 30)
        if args.only == "arrayrecord":
            rows += bench_arrayrecord(tmp, 20_000_000, 2048)
        if args.only == "longline":
            rows += bench_longline(tmp, 2 if smoke else args.longline_mb)
    write_result(args.json, {"bench": "data", "device": f"cpu ({os.cpu_count()} cores)", "load": load(), "rows": rows})


if __name__ == "__main__":
    main()
