"""Preemption: `python -m train` killed with -9 or SIGTERM, then rerun with the same command, logs
the same losses as an uninterrupted run; a damaged newest checkpoint falls back to the previous one.
Runs real subprocesses (one CPU device each) on the tiny preset with the shipped pretraining text."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 60


def command(out):
    return [sys.executable, "-m", "train", "--config", "configs/demo.yaml", f"output_dir={out}", f"steps={STEPS}",
            "checkpoint_every=10", "log_every=1", "batch_size=4", "model.preset=tiny", "model.overrides={}",
            "data.format=pretrain", "data.train=data/demo_pretrain.txt", "data.max_len=32", "eval.data=null",
            "eval.loss_data=null", "tensorboard=false", "optim.warmup_steps=5", "optim.lr=3e-3"]


def env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def start(out):
    return subprocess.Popen(command(out), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(out, step, proc, timeout=120):
    """Block until metrics.jsonl shows `step` (the run is past it), while the run is still going."""
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                if any(json.loads(line).get("step", 0) >= step for line in f if line.endswith("\n")):
                    return
        assert proc.poll() is None, f"run ended before step {step}: {proc.communicate()[1][-2000:]}"
        time.sleep(0.01)
    raise AssertionError(f"no step {step} within {timeout}s")


def finish(out, check=True):
    result = subprocess.run(command(out), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


def test_kill9_sigterm_and_corrupt_checkpoint_resume_exactly(tmp_path):
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    reference = start(ref_dir)  # uninterrupted run, in parallel with the interrupted one

    proc = start(run_dir)
    wait_for_step(run_dir, 25, proc)  # checkpoints at 10 and 20 exist (or are being written)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    proc = start(run_dir)  # same command: resumes; SIGTERM it once it has trained a few steps
    wait_for_step(run_dir, 33, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    steps = sorted(int(p) for p in os.listdir(run_dir) if p.isdigit())
    preempted = steps[-1]
    assert preempted >= 33 and "SIGTERM: saved step" in out

    # Damage the preemption checkpoint: the next run warns and falls back to the one before it.
    params_dir = os.path.join(run_dir, str(preempted), "params")
    for root, _, files in os.walk(params_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    result = finish(run_dir)
    assert f"checkpoint step {preempted}" in result.stderr and "could not be restored" in result.stderr
    assert f"resumed from step {steps[-2]}" in result.stdout

    _, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err[-3000:]
    want, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=1e-6, atol=0)
    assert want[STEPS] < want[1] - 1.0  # and it did learn something


def test_resume_with_changed_settings_stops_and_keeps_the_checkpoints(tmp_path):
    """A run resumed with other optimizer or model settings must not mistake its checkpoints for
    damaged ones (moving them aside and silently restarting from step 0): it stops with a clear error."""
    out = str(tmp_path / "run")
    base = [a for a in command(out) if not a.startswith("steps=")] + ["steps=10"]
    first = subprocess.run(base, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    before = sorted(os.listdir(out))
    for change, message in (("optim.clip_norm=0", "optim.clip_norm: 1.0 -> 0.0"),
                            ("model.overrides={dim: 32}", "model dim: 64 -> 32")):
        again = subprocess.run(base + [change], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
        assert again.returncode == 2 and message in again.stderr and "Traceback" not in again.stderr, again.stderr
        assert sorted(os.listdir(out)) == before  # nothing moved aside, nothing new
    assert max(losses(out)) == 10
