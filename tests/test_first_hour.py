"""What a new user meets in the first hour: defaults that find the obvious file, flags that refuse to be
ignored, a finished run that stays finished, and help text that reads as a sentence."""

import os
import shutil
import subprocess
import sys

import pytest

import llama_jax as lj
from llama_jax.convert import export_hf
from llama_jax.generate.__main__ import main as generate_main
from train.config import load_config
from train.loop import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "data", "tokenizer.model")


@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    cfg = lj.LlamaConfig.preset("tiny")
    lj.save_checkpoint(path, cfg, lj.init_params(cfg, 0))
    shutil.copyfile(TOKENIZER, os.path.join(path, "tokenizer.model"))  # as the converter does
    return path


def test_generate_uses_the_checkpoints_tokenizer(checkpoint_with_tokenizer, capsys):
    generate_main(["--checkpoint", checkpoint_with_tokenizer, "--prompt", "12", "--temperature", "0",
                   "--max-new-tokens", "4"])
    assert capsys.readouterr().out.strip() != ""
    gen = lj.Generator(checkpoint_with_tokenizer)  # the Python API finds it too
    assert gen.tokenizer.vocab_size == 512


def test_generate_without_any_tokenizer_says_what_to_pass(tmp_path, capsys):
    cfg = lj.LlamaConfig.preset("tiny")
    lj.save_checkpoint(str(tmp_path / "bare"), cfg, lj.init_params(cfg, 0))
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--checkpoint", str(tmp_path / "bare"), "--prompt", "hi"])
    assert exit_info.value.code == 2
    assert "the checkpoint carries none (tokenizer.model or tokenizer.json)" in capsys.readouterr().err


@pytest.mark.parametrize("flags, needed", [(["--input", "47"], "--alpaca"), (["--system", "Be brief."], "--chat")])
def test_flags_of_another_mode_are_refused_not_ignored(checkpoint_with_tokenizer, capsys, flags, needed):
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--checkpoint", checkpoint_with_tokenizer, "--prompt", "x", *flags])
    assert exit_info.value.code == 2 and needed in capsys.readouterr().err


def test_help_description_is_a_whole_sentence():
    out = subprocess.run([sys.executable, "-m", "llama_jax.generate", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert "Generate text from a llama_jax checkpoint: one prompt, or an interactive chat." in " ".join(out.split())


def test_a_finished_run_is_left_alone_and_carries_its_tokenizer(tmp_path, capsys):
    out = str(tmp_path / "run")
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                      [f"output_dir={out}", "steps=2", "checkpoint_every=2", "batch_size=8", "eval.data=null",
                       "model.overrides={dim: 64, n_layers: 1, n_heads: 4, n_kv_heads: 2, multiple_of: 32}",
                       "data.train=[data/demo_alpaca_eval.json]", "async_checkpointing=false", "tensorboard=true"])
    assert run(cfg)["start_step"] == 0
    assert open(os.path.join(out, "tokenizer.model"), "rb").read() == open(TOKENIZER, "rb").read()
    events = sorted(os.listdir(os.path.join(out, "tb")))
    metrics = open(os.path.join(out, "metrics.jsonl")).read()
    capsys.readouterr()
    again = run(cfg)  # the same command once more: nothing to do, nothing added
    assert again["finished"] and "nothing to do" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(out, "tb"))) == events
    assert open(os.path.join(out, "metrics.jsonl")).read() == metrics
    gen = lj.Generator(out)  # the run folder's own tokenizer
    assert gen.tokenizer.vocab_size == 512
    export_hf(out, str(tmp_path / "hf"), progress=False)  # and export-hf carries it on
    assert os.path.isfile(os.path.join(tmp_path, "hf", "tokenizer.model"))
