"""Evaluation against independent references, on the same tiny model exported with export-hf:
perplexity against transformers' perplexity-guide loop run on the HF model, and the harness LM
against lm-evaluation-harness's own `hf` model on local tasks (tests/eval_tasks/), request by
request."""

import json
import math
import os

import numpy as np
import pytest
import torch
import transformers

import llama_jax as lj
from llama_jax.eval import Scorer, load_for_eval, perplexity, sliding_windows
from llama_jax.eval.__main__ import main
from llama_jax.eval.scoring import length_bucket, score_batch

TOKENIZER = "data/tokenizer.model"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "tests", "eval_tasks")


@pytest.fixture(scope="module")
def models(tiny_export):
    _, _, ckpt, hf_dir = tiny_export
    cfg, params = load_for_eval(ckpt)  # the CLI's placement: the tests and the CLI share compiled programs
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return cfg, params, ckpt, hf_dir, hf


@pytest.fixture(scope="module")
def tok():
    return lj.Tokenizer(TOKENIZER)


def guide_perplexity(model, ids, max_len, stride):
    """The transformers perplexity guide's loop on the HF model, each window's mean loss weighted
    by the number of labels it averaged (the guide counts one fewer for windows after the first,
    whose first label is masked anyway; with stride == max_len both counts agree)."""
    ids = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + max_len, ids.size(1))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        counted = int((target_ids[:, 1:] != -100).sum())
        if counted:
            with torch.no_grad():
                loss = model(input_ids, labels=target_ids).loss
            nll_sum += float(loss) * counted
            n_tokens += counted
        prev_end = end
        if end == ids.size(1):
            break
    return math.exp(nll_sum / n_tokens), nll_sum / n_tokens, n_tokens


# --- perplexity -----------------------------------------------------------------------------------


def test_perplexity_equals_the_guide_loop_on_hf(models, tok):
    cfg, params, _, _, hf = models
    text = open(os.path.join(ROOT, "data", "demo_pretrain.txt")).read()[:220]
    ids = tok.encode(text, bos=True, eos=False)
    assert 120 < len(ids) < cfg.max_seq_len
    scorer = Scorer(params, cfg, batch_size=4)
    score_batch.clear_cache()  # count only this test's programs, whatever ran before it
    buckets = set()
    for max_len, stride in ((32, 16), (32, 32), (64, 24), (48, 5), (None, None)):  # None: L = context > text
        got = perplexity(scorer, [ids], max_len, stride)
        ppl, nll, n = guide_perplexity(hf, ids, max_len or cfg.max_seq_len, stride or cfg.max_seq_len // 2)
        assert got["tokens"] == n, (max_len, stride)
        assert abs(got["ppl"] / ppl - 1) <= 1e-5 and abs(got["nll"] / nll - 1) <= 1e-5, (max_len, stride, got, ppl)
        if stride != max_len:
            assert n == len(ids) - 1  # every token but BOS scored exactly once
        windows = sliding_windows(len(ids), max_len or cfg.max_seq_len, stride or cfg.max_seq_len // 2)
        # Scorer's batching rule: longest first, 4 rows a batch, each batch padded to its longest row's bucket
        lengths = sorted((end - begin - 1 for begin, end, _ in windows), reverse=True)
        buckets |= {length_bucket(lengths[i], cfg.max_seq_len) for i in range(0, len(lengths), 4)}
    # exactly one program per bucket the batches use, not one per window (the (48, 5) pass alone has 20+)
    assert score_batch._cache_size() == len(buckets) < 8


def test_requests_differing_in_the_last_token_share_a_row(models, monkeypatch):
    cfg, params, _, _, hf = models
    context = [1, 428, 460, 292, 430, 264, 300]
    with torch.no_grad():
        best = int(hf(torch.tensor([context])).logits[0, -1].argmax())  # the greedy answer is one of the four
    answers = [best] + [t for t in (290, 13, 77, 451) if t != best][:3]
    requests = [context + [t] for t in answers] + [context + [77, 5], context[:4] + [9]]
    scorer = Scorer(params, cfg, batch_size=4)
    rows = []
    dispatch = scorer._dispatch
    monkeypatch.setattr(scorer, "_dispatch", lambda seqs, n: rows.extend(seqs) or dispatch(seqs, n))
    n_scored = [1, 1, 1, 1, 2, 1]
    totals, greedy = scorer(requests, n_scored)
    assert len(rows) == 3  # four one-token answers after the same context: one row
    for seq, n, total, is_greedy in zip(requests, n_scored, totals, greedy):
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([seq])).logits[0].double(), -1)
        positions = range(len(seq) - n, len(seq))
        assert total == pytest.approx(sum(logp[p - 1, seq[p]].item() for p in positions), abs=1e-5)
        assert is_greedy == all(int(logp[p - 1].argmax()) == seq[p] for p in positions)
    assert list(greedy[:4]) == [True, False, False, False]


def test_sliding_windows_by_hand():
    assert sliding_windows(10, 4, 2) == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert sliding_windows(10, 4, 4) == [(0, 4, 3), (4, 8, 3), (8, 10, 1)]  # window starts have no context
    assert sliding_windows(3, 8, 4) == [(0, 3, 2)]
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 5)


def test_perplexity_cli_text_jsonl_sharded_and_errors(models, tok, tmp_path, capsys):
    cfg, params, ckpt, _, hf = models
    common = ["perplexity", "--checkpoint", ckpt, "--tokenizer", TOKENIZER, "--batch-size", "4"]
    text_file = tmp_path / "held_out.txt"
    text_file.write_text(open(os.path.join(ROOT, "data", "demo_pretrain.txt")).read()[:700])
    main(common + ["--data", str(text_file), "--max-len", "32", "--stride", "16"])
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = tok.encode(text_file.read_text(), bos=True)
    want_ppl, want_nll, want_n = guide_perplexity(hf, ids, 32, 16)
    assert single["tokens"] == want_n and abs(single["ppl"] / want_ppl - 1) <= 1e-5

    main(common + ["--data", str(text_file), "--max-len", "32", "--stride", "16", "--fsdp", "2",
                   "--tensor-parallel", "2"])  # params and batch rows split over 4 devices
    sharded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sharded["tokens"] == single["tokens"] and abs(sharded["nll"] / single["nll"] - 1) <= 1e-5

    docs = [json.loads(line)["text"] for line in open(os.path.join(TASKS, "rolling.jsonl"))]
    main(common + ["--data", os.path.join(TASKS, "rolling.jsonl")])  # default L = 256, S = 128; one doc > 800 tokens
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    per_doc = [guide_perplexity(hf, tok.encode(d, bos=True), cfg.max_seq_len, cfg.max_seq_len // 2) for d in docs]
    tokens = sum(n for _, _, n in per_doc)
    assert got["tokens"] == tokens == sum(len(tok.encode(d, bos=True)) - 1 for d in docs)
    assert abs(got["nll"] / (sum(nll * n for _, nll, n in per_doc) / tokens) - 1) <= 1e-5

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    for argv, message in ((common + ["--data", str(bad)], "bad.jsonl:2: expected a JSON object with a string 'text'"),
                          (common + ["--data", str(text_file), "--max-len", "999"], "exceeds the model's context"),
                          (common + ["--data", str(tmp_path / "missing.txt")], "data file not found"),
                          (common + ["--data", str(text_file), "--fsdp", "3"], "multiple of the mesh")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and message in err, err


# --- lm-evaluation-harness -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harness_env():
    """lm-eval reads the local tasks' data_files relative to the repository root, offline."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    cwd = os.getcwd()
    os.chdir(ROOT)
    yield
    os.chdir(cwd)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_tasks(model, tasks, manager, **kwargs):
    import lm_eval

    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=manager, log_samples=True, **kwargs)


def test_harness_equals_lm_eval_hf_request_by_request(models, harness_env, tmp_path, capsys):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llama_jax.eval.harness import LlamaJaxLM

    cfg, params, ckpt, hf_dir, hf = models
    tasks = ["lj_mc", "lj_rolling", "lj_gen"]
    manager = TaskManager(include_path=TASKS, include_defaults=False)  # not indexing the ~20,000 built-in files: 10 s
    ours = run_tasks(LlamaJaxLM((cfg, params), TOKENIZER, batch_size=4), tasks, manager)
    theirs = run_tasks(HFLM(pretrained=hf, tokenizer=hf_dir, batch_size=4, device="cpu"), tasks, manager)
    for task in tasks:
        a = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert [s["arguments"] for s in a] == [s["arguments"] for s in b]  # the same requests
        for sa, sb in zip(a, b):
            for ra, rb in zip(sa["resps"], sb["resps"]):
                if task == "lj_gen":
                    assert ra == rb, (sa["arguments"], ra, rb)  # greedy text cut at the first `until`
                elif task == "lj_rolling":  # a sum over up to 800 float32 log-probs
                    np.testing.assert_allclose(ra[0], rb[0], rtol=1e-6, atol=1e-4)
                else:
                    (lp_a, greedy_a), (lp_b, greedy_b) = ra[0], rb[0]
                    assert greedy_a == greedy_b and abs(lp_a - lp_b) <= 1e-4, (sa["arguments"], ra, rb)
        for metric, value in theirs["results"][task].items():
            if metric.startswith(("acc", "exact_match")):  # counts of right answers: identical
                assert ours["results"][task][metric] == value, (task, metric)
            elif isinstance(value, float):  # exp(-sum / words) magnifies float32 rounding of the sums
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)
    assert any(s["resps"][0][0] for s in theirs["samples"]["lj_gen"])  # some generations are not empty

    # The command line: the harness's table, and its results JSON in the harness's own shape.
    out = tmp_path / "new-folder" / "results.json"  # its folder is created
    main(["harness", "--checkpoint", ckpt, "--tokenizer", TOKENIZER, "--tasks", "lj_mc", "--include-path", TASKS,
          "--limit", "4", "--batch-size", "4", "--output", str(out)])
    table = capsys.readouterr().out
    assert "lj_mc" in table and "acc_norm" in table
    saved = json.loads(out.read_text())
    assert set(saved["results"]["lj_mc"]) >= {"acc,none", "acc_norm,none"} and "configs" in saved
    with pytest.raises(SystemExit) as exit_info:
        main(["harness", "--checkpoint", ckpt, "--tokenizer", TOKENIZER, "--tasks", "lj_nope", "--include-path",
              TASKS])
    assert exit_info.value.code == 2 and "unknown task(s) ['lj_nope']" in capsys.readouterr().err
