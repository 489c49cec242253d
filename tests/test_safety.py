"""Nothing a user does may destroy a model or a run (issue 12): the converter never touches its
source, a refused resume writes nothing, every architecture field is part of the resume check,
one writer per folder, damaged checkpoints never load, output_dir is never a checkpoint,
sampling is safe at any temperature, recipe numbers are range-checked, and leftovers of killed
writers are cleaned up. Each test fails on the code before issue 12 (checked once by hand).

Conversions run in-process through the CLI entry (`cli()`, exit status and stderr); training
runs in-process on the tiny preset with the shipped pretraining text (8 forced CPU devices).
"""

import contextlib
import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import llama_jax as lj
import train
from llama_jax.convert import __main__ as convert_cli
from llama_jax.convert import export_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = lj.LlamaConfig.preset("tiny")


def snapshot(folder):
    """{relative path: sha256} of every file and {relative path: None} of every folder under `folder`."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = None
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def convert(capsys, *argv):
    """Run `python -m llama_jax.convert ARGV` in-process: (exit status, stderr)."""
    old = sys.argv
    sys.argv = ["llama_jax.convert", *argv, "--no-progress"]
    try:
        status = convert_cli.cli()
    finally:
        sys.argv = old
    return status, capsys.readouterr().err


def dead_pid():
    """The pid of a process that has exited (not reused this soon)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def flip_byte(path, offset=None):
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(size // 2 if offset is None else offset)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x5A]))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random tiny model as a llama_jax checkpoint (save_checkpoint), a converted one and an HF folder."""
    root = tmp_path_factory.mktemp("models")
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), lj.param_shapes(CFG))
    ckpt, hf, converted = str(root / "ckpt"), str(root / "hf"), str(root / "converted")
    lj.save_checkpoint(ckpt, CFG, params)
    export_hf(ckpt, hf, progress=False)
    convert_cli.main(["hf", hf, converted, "--no-progress"])
    return params, ckpt, hf, converted


def copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return str(dst)


# --- 1. the converter never touches its source -------------------------------------------------


@pytest.mark.parametrize("layout", ["same", "out_contains_src", "out_inside_src", "link_to_src"])
def test_conversion_refuses_output_overlapping_its_source(tmp_path, models, capsys, layout):
    src = copy(models[2], tmp_path / "parent" / "src")
    out = {"same": src, "out_contains_src": str(tmp_path / "parent"), "out_inside_src": os.path.join(src, "out"),
           "link_to_src": str(tmp_path / "link")}[layout]
    if layout == "link_to_src":
        os.symlink(src, out)
    before = snapshot(tmp_path)
    status, err = convert(capsys, "hf", src, out, "--overwrite")
    assert status == 2 and "source" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before


def test_export_refuses_to_overwrite_its_own_checkpoint(tmp_path, models, capsys):
    ckpt = copy(models[1], tmp_path / "ckpt")
    before = snapshot(tmp_path)
    status, err = convert(capsys, "export-hf", ckpt, ckpt, "--overwrite")
    assert status == 2 and "is the same folder as the source" in err, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("escape", ["parent", "absolute"])
def test_hf_index_names_outside_the_model_folder_are_refused(tmp_path, models, capsys, escape):
    src = copy(models[2], tmp_path / "hf")
    index_path = os.path.join(src, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    shard = sorted(set(index["weight_map"].values()))[0]
    os.rename(os.path.join(src, shard), tmp_path / "outside.safetensors")  # a valid file, but outside SRC
    name = str(tmp_path / "outside.safetensors") if escape == "absolute" else "../outside.safetensors"
    index["weight_map"] = {k: name for k in index["weight_map"]}
    with open(index_path, "w") as f:
        json.dump(index, f)
    status, err = convert(capsys, "hf", src, str(tmp_path / "out"))
    assert status == 2 and "leaves the model folder" in err and "weight_map" in err, err
    assert not (tmp_path / "out").exists()


# --- 2, 3, 6. the resume check, and output_dir -------------------------------------------------


def recipe(out, *extra):
    return train.load_config(os.path.join(ROOT, "configs/demo.yaml"), [
        f"output_dir={out}", "steps=2", "checkpoint_every=1", "log_every=1", "batch_size=8", "model.preset=tiny",
        "model.overrides={}", "data.format=pretrain", f"data.train={ROOT}/data/demo_pretrain.txt",
        f"tokenizer={ROOT}/data/tokenizer.model", "data.max_len=32", "eval.data=null", "eval.loss_data=null",
        "tensorboard=false", *extra])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    out = str(tmp_path_factory.mktemp("runs") / "run")
    train.run(recipe(out))
    assert sorted(int(p) for p in os.listdir(out) if p.isdigit()) == [1, 2]
    return out


@pytest.fixture(scope="module")
def resumed_after_trouble(trained_run, tmp_path_factory):
    """The trained run resumed after what a crash leaves behind (a dead run's lock, a half-written
    file, an unfinished step save) and with its newest step damaged, changing only keys the
    table allows. Returns (run folder, summary, stderr, damaged file, load error before resuming)."""
    run = copy(trained_run, tmp_path_factory.mktemp("trouble") / "run")
    with open(os.path.join(run, "run.lock"), "w") as f:
        json.dump({"pid": dead_pid(), "host": os.uname().nodename, "since": "earlier", "command": "python -m train"}, f)
    open(os.path.join(run, f"metrics.jsonl.tmp-{dead_pid()}"), "w").close()
    os.makedirs(os.path.join(run, "3.orbax-checkpoint-tmp-1234", "params"))
    damaged = largest_file(os.path.join(run, "2", "params"))
    flip_byte(damaged)
    try:
        lj.load_checkpoint(run)
        load_error = "loaded"
    except ValueError as e:
        load_error = str(e)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        summary = train.run(recipe(run, "steps=3", "log_every=2", "checkpoint_every=3", "model.remat=full"))
    return run, summary, err.getvalue(), damaged, load_error


@pytest.mark.parametrize("change,shown", [
    ("optim.clip_norm=0.5", "optim.clip_norm: 1.0 -> 0.5"),
    ("optim.lr=1e-3", "optim.lr: 0.005 -> 0.001"),
    ("model.overrides={rope_theta: 1000000.0}", "rope_theta: 10000.0 -> 1000000.0"),
    ("model.overrides={norm_eps: 1.0e-6}", "norm_eps: 1e-05 -> 1e-06"),
    ("model.overrides={max_seq_len: 64}", "max_seq_len: 256 -> 64"),
])
def test_a_refused_resume_names_the_change_and_writes_nothing(tmp_path, trained_run, change, shown):
    run = copy(trained_run, tmp_path / "run")
    before = snapshot(run)
    with pytest.raises(ValueError, match=re.escape(shown)):
        train.run(recipe(run, "steps=3", change))
    assert snapshot(run) == before


def test_a_resume_may_change_what_the_table_allows(resumed_after_trouble):
    from train.run_folder import CHANGEABLE_ON_RESUME

    assert {"steps", "log_every", "checkpoint_every", "model.remat"} <= set(CHANGEABLE_ON_RESUME)
    run, summary, *_ = resumed_after_trouble
    assert summary["steps"] == 3
    with open(os.path.join(run, "train_config.yaml")) as f:
        saved = f.read()
    assert "steps: 3" in saved and "remat: full" in saved


@pytest.mark.parametrize("kind", ["checkpoint", "file", "hf_folder"])
def test_output_dir_that_is_a_checkpoint_or_a_file_is_refused(tmp_path, models, kind):
    target = {"checkpoint": lambda: copy(models[3], tmp_path / "ckpt"),
              "hf_folder": lambda: copy(models[2], tmp_path / "hf"),
              "file": lambda: (tmp_path / "notes.txt").write_text("mine") and str(tmp_path / "notes.txt")}[kind]()
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"output_dir {target}")):
        train.run(recipe(target))
    assert snapshot(tmp_path) == before


# --- 4. one writer per folder --------------------------------------------------------------------


def test_a_run_folder_has_one_writer(tmp_path, trained_run):
    from llama_jax.checkpoint.locks import FolderLock

    run = copy(trained_run, tmp_path / "run")
    lock = os.path.join(run, "run.lock")
    before = snapshot(run)
    with FolderLock(lock, "a run"):  # another writer (here: this process, through another open file)
        with pytest.raises(FileExistsError, match=f"in use by pid {os.getpid()} .*delete {re.escape(lock)}"):
            train.run(recipe(run, "steps=3"))
        assert {k: v for k, v in snapshot(run).items() if k != "run.lock"} == before


def test_a_dead_runs_lock_is_taken_over(resumed_after_trouble):
    run, _, err, *_ = resumed_after_trouble
    assert "took over the lock" in err and "no longer running" in err
    assert not os.path.exists(os.path.join(run, "run.lock"))


def test_conversions_racing_for_one_output_do_not_replace_each_other(tmp_path, models, capsys):
    from llama_jax.checkpoint.locks import FolderLock

    out = str(tmp_path / "out")
    with FolderLock(out + ".lock", out):  # a conversion to OUT is in progress
        status, err = convert(capsys, "hf", models[2], out, "--overwrite")
        assert status == 2 and f"in use by pid {os.getpid()}" in err, err
    assert sorted(os.listdir(tmp_path)) == []
    assert convert(capsys, "hf", models[2], out)[0] == 0
    status, err = convert(capsys, "hf", models[2], out)  # the second one, finishing later: refused
    assert status == 2 and "already exists" in err


# --- 5. silent corruption -------------------------------------------------------------------------


def largest_file(folder):
    return max(glob.glob(os.path.join(folder, "**", "*"), recursive=True), key=lambda p: os.path.getsize(p)
               if os.path.isfile(p) and not p.endswith(".json") else -1)


def test_flipped_bytes_stop_every_load_naming_the_file(tmp_path, models, capsys):
    from llama_jax.generate import __main__ as generate_cli

    ckpt = copy(models[3], tmp_path / "ckpt")
    damaged = largest_file(os.path.join(ckpt, "params"))
    flip_byte(damaged)
    with pytest.raises(ValueError, match=re.escape(damaged)):
        lj.load_checkpoint(ckpt)
    status, err = convert(capsys, "export-hf", ckpt, str(tmp_path / "hf"))
    assert status == 2 and damaged in err and not (tmp_path / "hf").exists()
    with pytest.raises(SystemExit) as exit_info:
        generate_cli.main(["--checkpoint", ckpt, "--tokenizer", f"{ROOT}/data/tokenizer.model", "--prompt", "Hi",
                           "--max-new-tokens", "2"])
    assert exit_info.value.code == 2 and damaged in capsys.readouterr().err


def test_an_edited_dtype_is_caught(tmp_path, models):
    ckpt = copy(models[3], tmp_path / "ckpt")
    meta = os.path.join(ckpt, "params", "output", ".zarray")
    with open(meta) as f:
        zarray = json.load(f)
    zarray["dtype"] = "<i4"
    with open(meta, "w") as f:
        json.dump(zarray, f)
    with pytest.raises(ValueError, match="output"):
        lj.load_checkpoint(ckpt)
    os.remove(os.path.join(ckpt, "checksums.json"))  # edited by someone who also dropped the checksums
    with pytest.raises(ValueError, match=r"output.*int32.*float32"):
        lj.load_checkpoint(ckpt)


def test_a_damaged_newest_step_is_set_aside_and_the_previous_one_resumed(resumed_after_trouble):
    run, summary, err, damaged, load_error = resumed_after_trouble
    assert damaged in load_error and "checksum mismatch" in load_error  # load_checkpoint refused it
    assert summary["start_step"] == 1
    assert "step 2" in err and "could not be restored" in err and damaged in err
    assert glob.glob(os.path.join(run, "2.corrupt-*"))
    lj.load_checkpoint(run)  # step 3, verified


# --- 7. numbers ------------------------------------------------------------------------------------


def test_sampling_at_any_tiny_temperature_is_greedy_not_nan():
    """Under jit, 1e-10 > T > 1e-30 turned logits / T into inf - inf = NaN and every token into id 0."""
    from llama_jax.generate.engine import sample

    logits = jax.random.normal(jax.random.key(0), (4, 512)) * 3
    keys = jax.random.split(jax.random.key(1), 4)
    draw = jax.jit(sample)
    for temperature in (1e-6, 1e-10, 1e-12, 1e-20, 1e-30, 1e-37, 1e-45):
        got = draw(keys, logits, jax.numpy.float32(temperature), jax.numpy.float32(0.9), jax.numpy.int32(0))
        np.testing.assert_array_equal(got, np.argmax(logits, axis=-1), err_msg=str(temperature))


@pytest.mark.parametrize("override,key", [
    ("optim.min_lr_ratio=-1", "optim.min_lr_ratio"), ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio"),
    ("optim.b1=2.0", "optim.b1"), ("optim.b2=1.0", "optim.b2"), ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.eps=0", "optim.eps"), ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.clip_norm=-1", "optim.clip_norm"), ("optim.z_loss=-1", "optim.z_loss"), ("optim.lr=.inf", "optim.lr"),
    ("seed=-1", "seed"), ("seed=18446744073709551616", "seed"), ("epochs=-1", "epochs"),
    ("peak_tflops=-5", "peak_tflops"), ("mesh.fsdp=0", "mesh.fsdp"), ("eval.max_new_tokens=0", "eval.max_new_tokens"),
    ("checkpoint_every=99999999999", "checkpoint_every"),
])
def test_every_numeric_recipe_key_is_range_checked(override, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        recipe("runs/unused", override)


def test_the_range_table_covers_every_numeric_recipe_key():
    from train.config import RANGES, numeric_keys

    assert set(numeric_keys(recipe("runs/unused"))) == set(RANGES)


# --- 8. leftovers -----------------------------------------------------------------------------------


def test_leftovers_of_killed_conversions_are_cleaned_up_and_said(tmp_path, models, capsys):
    out = str(tmp_path / "out")
    pid = dead_pid()
    os.makedirs(f"{out}.tmp-{pid}/params")  # killed mid-conversion
    with open(f"{out}.tmp-{pid}/params/big", "wb") as f:
        f.write(b"\0" * 1000)
    status, err = convert(capsys, "hf", models[2], out)
    assert status == 0 and f"removed {out}.tmp-{pid}" in err
    assert sorted(os.listdir(tmp_path)) == ["out"]

    # killed between the two renames of an overwrite: OUT is gone, OUT.old-PID holds it
    pid = dead_pid()
    os.rename(out, f"{out}.old-{pid}")
    shutil.copytree(models[1], f"{out}.tmp-{pid}")
    status, err = convert(capsys, "hf", models[2], out)
    assert f"restored {out}" in err and f"removed {out}.tmp-{pid}" in err
    assert status == 2 and "already exists" in err  # restored, so no --overwrite: refused
    assert sorted(os.listdir(tmp_path)) == ["out"]
    lj.load_checkpoint(out)


def test_leftovers_in_a_run_folder_are_cleaned_up_and_said(resumed_after_trouble):
    run, _, err, *_ = resumed_after_trouble
    assert re.search(r"removed \S*metrics.jsonl.tmp-\d+, left by a writer that was killed", err)
    assert "3.orbax-checkpoint-tmp-1234: the save of step 3 was interrupted" in err
    assert not [p for p in os.listdir(run) if "tmp" in p]
