"""Hugging Face Hub repo ids where a folder or tokenizer is expected (llama_jax.convert.hub), with no network:
huggingface_hub.snapshot_download is replaced by a copy of a local tiny repo filtered by huggingface_hub's
own pattern matcher, and the failures (offline, gated, not found, no safetensors) are checked to be one line."""

import os
import shutil
import sys

import huggingface_hub
import httpx2
import jax
import numpy as np
import pytest
import torch
from huggingface_hub import errors
from huggingface_hub.utils import filter_repo_objects

import llama_jax as lj
from llama_jax.convert import __main__ as convert_cli
from llama_jax.convert import hub
from reference import hf_model_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
              rms_norm_eps=1e-5, max_position_embeddings=256, rope_scaling={"type": "linear", "factor": 2.0})


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A tiny model repo as the Hub holds it: safetensors + config + tokenizer, and the pickles the Hub also
    carries (pytorch_model.bin, original/consolidated.00.pth) that must never be downloaded."""
    folder = tmp_path_factory.mktemp("repo")
    model = hf_model_of(CONFIG, seed=5)
    model.save_pretrained(folder)
    shutil.copyfile(os.path.join(ROOT, "data", "tokenizer.model"), folder / "tokenizer.model")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "original").mkdir()
    torch.save({}, folder / "original" / "consolidated.00.pth")
    (folder / "README.md").write_text("model card")
    return folder


@pytest.fixture
def fake_hub(monkeypatch, tmp_path, repo):
    """snapshot_download -> the files of `repo` its patterns select, copied into a cache folder; records calls."""
    calls = []

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, ignore_patterns=None, **kwargs):
        calls.append({"repo_id": repo_id, "revision": revision, **kwargs})
        files = [str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()]
        snapshot = tmp_path / "cache" / repo_id.replace("/", "--") / (revision or "main")
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(repo / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_repo_ids_and_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "local" / "model").mkdir(parents=True)
    assert hub.is_repo_id("meta-llama/Llama-3.1-8B") and hub.is_repo_id("TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    for path in ("local/model",  # exists: a local path always wins
                 "data/tokenizer.model",  # its folder exists: a local path with a typo, not a repo
                 "/abs/model", "./x/y", "~/x", "gs://bucket/model", "a/b/c", "model", "bad//name"):
        assert not hub.is_repo_id(path), path
        assert hub.resolve(path) == path  # the caller's own "no such file" error then names it
    with pytest.raises(hub.HubError, match="--revision v2: nowhere is neither a local path nor a Hub repo id"):
        hub.resolve("nowhere", revision="v2")


def test_convert_from_a_repo_id_downloads_safetensors_only(fake_hub, repo, tmp_path, monkeypatch):
    out, local = str(tmp_path / "from_hub"), str(tmp_path / "from_folder")
    convert_cli.main(["hf", "tiny-org/tiny-llama", out, "--revision", "v1.0", "--no-progress"])
    assert [(c["repo_id"], c["revision"]) for c in fake_hub] == [("tiny-org/tiny-llama", "v1.0")]
    snapshot = tmp_path / "cache" / "tiny-org--tiny-llama" / "v1.0"
    assert sorted(os.listdir(snapshot)) == ["config.json", "generation_config.json", "model.safetensors",
                                            "tokenizer.model"]  # no .bin, no original/*.pth, no README
    convert_cli.main(["hf", str(repo), local, "--no-progress"])
    (cfg, ours), (cfg_local, theirs) = lj.load_checkpoint(out), lj.load_checkpoint(local)
    assert cfg == cfg_local and cfg.rope_scaling == lj.RopeScaling("linear", 2.0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)))
    assert open(os.path.join(out, "tokenizer.model"), "rb").read() == (repo / "tokenizer.model").read_bytes()
    # A local folder spelled like a repo id wins: nothing is downloaded.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(repo, tmp_path / "tiny-org" / "tiny-llama")
    convert_cli.main(["hf", "tiny-org/tiny-llama", str(tmp_path / "again"), "--no-progress"])
    assert len(fake_hub) == 1


def test_tokenizer_from_a_repo_id(fake_hub, tmp_path):
    tok = lj.Tokenizer("tiny-org/tiny-llama")
    assert tok.vocab_size == 512 and tok.fingerprint == lj.Tokenizer(os.path.join(ROOT, "data", "tokenizer.model")).fingerprint
    snapshot = tmp_path / "cache" / "tiny-org--tiny-llama" / "main"
    assert sorted(os.listdir(snapshot)) == ["generation_config.json", "tokenizer.model"]  # tokenizer files only


def _raise(error):
    def snapshot_download(repo_id, **kwargs):
        raise error
    return snapshot_download


def _response(status):
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/name"))


@pytest.mark.parametrize("error, message", [
    (errors.GatedRepoError("Access to model org/name is restricted", response=_response(403)),
     "org/name: a gated repo your account may not download yet (HTTP 401/403): accept its license at "
     "https://huggingface.co/org/name with your account, then log in here with `hf auth login`"),
    (errors.RepositoryNotFoundError("404 Client Error", response=_response(404)),
     "org/name: no such local path, and no such repo on the Hugging Face Hub"),
    (errors.RevisionNotFoundError("404 Client Error", response=_response(404)),
     "org/name: the Hub repo has no revision 'v9'"),
    (errors.HfHubHTTPError("500 Server Error", response=_response(500)),
     "org/name: the Hugging Face Hub refused the download (500 Server Error)"),
])
def test_hub_errors_are_one_clear_line(monkeypatch, capsys, tmp_path, error, message):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raise(error))
    monkeypatch.setattr(sys, "argv", ["convert", "hf", "org/name", str(tmp_path / "out"), "--revision", "v9"])
    assert convert_cli.cli() == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_offline_and_uncached_is_one_clear_line(monkeypatch, capsys, tmp_path):
    """The real snapshot_download with HF_HUB_OFFLINE=1 and an empty cache: convert and Tokenizer say so."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["convert", "hf", "meta-llama/Llama-2-7b-hf", str(tmp_path / "out")])
    assert convert_cli.cli() == 2
    err = capsys.readouterr().err
    assert err == (f"error: meta-llama/Llama-2-7b-hf: not in the local Hugging Face cache ({tmp_path / 'cache'}) and "
                   "HF_HUB_OFFLINE is set; download it once with network access, or pass a local folder\n")
    with pytest.raises(hub.HubError, match="meta-llama/Meta-Llama-3-8B: not in the local Hugging Face cache"):
        lj.Tokenizer("meta-llama/Meta-Llama-3-8B")


def test_a_repo_without_safetensors_is_refused(monkeypatch, tmp_path, repo):
    pickles_only = tmp_path / "pickles"
    pickles_only.mkdir()
    for name in ("config.json", "pytorch_model.bin", "tokenizer.model"):
        shutil.copyfile(repo / name, pickles_only / name)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, allow_patterns=None, **kw: str(
        _copy_selected(pickles_only, tmp_path / "snap", allow_patterns, kw.get("ignore_patterns"))))
    with pytest.raises(hub.HubError, match="no safetensors weights in its top folder; llama_jax never downloads"):
        hub.resolve("org/old-model")
    assert sorted(os.listdir(tmp_path / "snap")) == ["config.json", "tokenizer.model"]


def _copy_selected(src, dst, allow, ignore):
    names = filter_repo_objects(os.listdir(src), allow_patterns=allow, ignore_patterns=ignore)
    dst.mkdir(exist_ok=True)
    for name in names:
        shutil.copyfile(src / name, dst / name)
    return dst
