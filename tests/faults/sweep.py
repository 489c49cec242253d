"""Fault sweep: build each broken input, run the real command, check that it ends with one line
naming the file / tensor / record / key (exit status 2 on the CLIs, a ValueError or TypeError
from the Python API) and that nothing was lost.

    python tests/faults/sweep.py                  # every case, CLIs called in this process (fast)
    python tests/faults/sweep.py --subprocess     # every CLI case as its own `python -m ...` process
    python tests/faults/sweep.py --family hf-config --family train-data -v
    python tests/faults/sweep.py --list

A case is (family, name, build): `build(folder, base)` makes the broken input from the shared
base artifacts (a tiny model as checkpoint, converted checkpoint, HF folders, Meta folder and a
trained run) and returns a `Run`: the command, the words one of which the message must contain,
the paths that must come out byte-identical, and the paths that must not exist afterwards. Every
case also checks that no `.tmp-`/`.old-`/`.lock` leftover remains in its folder. Cases that fill
a disk run as subprocesses in a private mount namespace on a small tmpfs (`unshare -m`; skipped
where that is not allowed). Exit status 0 when at least --pass-rate (97%) of the cases pass.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
TOKENIZER = str(ROOT / "data" / "tokenizer.model")
ERROR_PREFIXES = ("error: ",)


@dataclasses.dataclass
class Run:
    module: str  # "llama_jax.convert" | "llama_jax.generate" | "train" | "train.tokenize" | "api"
    argv: list = dataclasses.field(default_factory=list)
    names: tuple = ()  # the message must contain one of these
    status: int = 2  # expected exit status (API: 2 = raises a user error, 0 = returns)
    keep: tuple = ()  # paths that must come out unchanged
    absent: tuple = ()  # paths that must not exist afterwards
    stdin: bytes = b""
    call: Callable | None = None  # the API call of an "api" case
    full_disk: tuple | None = None  # (tmpfs mount point, size, folder to copy into it first or None)
    check: Callable | None = None  # extra check on success: f(stdout, stderr) -> problem or None


@dataclasses.dataclass
class Case:
    family: str
    name: str
    build: Callable[[Path, "Base"], Run]


# --- base artifacts ---------------------------------------------------------------------------


class Base:
    """A tiny random model in every form the commands read, built once per sweep."""

    def __init__(self, folder: Path):
        import jax
        import numpy as np
        import torch
        from safetensors.torch import save_file

        import llama_jax as lj
        from llama_jax import layout
        from llama_jax.convert import __main__ as convert_cli
        from llama_jax.convert import export_hf

        self.dir = folder
        self.cfg = lj.LlamaConfig.preset("tiny")
        rng = np.random.default_rng(0)
        params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32),
                              lj.param_shapes(self.cfg))
        self.ckpt, self.converted = str(folder / "ckpt"), str(folder / "converted")
        self.hf, self.hf_single, self.hf_bin, self.meta = (str(folder / n) for n in ("hf", "hf1", "hfbin", "meta"))
        lj.save_checkpoint(self.ckpt, self.cfg, params)
        shutil.copy(TOKENIZER, os.path.join(self.ckpt, "tokenizer.model"))
        export_hf(self.ckpt, self.hf, max_shard_bytes=300_000, progress=False)
        convert_cli.main(["hf", self.hf, self.converted, "--no-progress"])
        state = {name: torch.from_numpy(np.ascontiguousarray(layout.from_ours(
            entry, params[entry.path[0]] if len(entry.path) == 1 else _leaf(params, entry.path, layer), self.cfg)))
            for entry, layer, name in layout.names(self.cfg, "hf")}
        os.makedirs(self.hf_single)
        shutil.copy(os.path.join(self.hf, "config.json"), self.hf_single)
        save_file(state, os.path.join(self.hf_single, "model.safetensors"), metadata={"format": "pt"})
        os.makedirs(self.hf_bin)
        shutil.copy(os.path.join(self.hf, "config.json"), self.hf_bin)
        torch.save(state, os.path.join(self.hf_bin, "pytorch_model.bin"))
        os.makedirs(self.meta)
        shards = [{}, {}]
        for entry, layer, name in layout.names(self.cfg, "meta"):
            full = torch.from_numpy(np.ascontiguousarray(layout.from_ours(entry, _leaf(params, entry.path, layer),
                                                                          self.cfg, "meta")))
            parts = [full, full] if entry.meta_split_dim is None else torch.chunk(full, 2, entry.meta_split_dim)
            for shard, part in zip(shards, parts):
                shard[name] = part.clone()
        for r, shard in enumerate(shards):
            torch.save(shard, os.path.join(self.meta, f"consolidated.{r:02d}.pth"))
        with open(os.path.join(self.meta, "params.json"), "w") as f:
            json.dump({"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5,
                       "vocab_size": -1}, f)
        shutil.copy(TOKENIZER, os.path.join(self.meta, "tokenizer.model"))
        self._run: str | None = None

    @property
    def run(self) -> str:
        """A finished 2-step training run (checkpoints at steps 1 and 2), trained on first use."""
        if self._run is None:
            self._run = str(self.dir / "run")
            status = _call_train(train_args(self._run, "steps=2", "checkpoint_every=1"))
            assert status == 0, "the base training run failed"
        return self._run


def _leaf(params: dict, path: tuple, layer: int | None) -> Any:
    node = params
    for key in path:
        node = node[key]
    return node if layer is None else node[layer]


def _call_train(argv: list) -> int:
    from train.__main__ import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv)


def train_args(out: str, *extra: str, data: str | None = None, fmt: str = "pretrain") -> list:
    """A tiny pretraining (or alpaca/chat) recipe on the shipped files, CPU-sized."""
    return ["--config", str(ROOT / "configs" / "demo.yaml"), f"output_dir={out}", "steps=2", "log_every=1",
            "batch_size=8", "model.preset=tiny", "model.overrides={}", f"data.format={fmt}",
            f"data.train={data or ROOT / 'data' / 'demo_pretrain.txt'}", "data.max_len=32", "eval.data=null",
            "eval.loss_data=null", "tensorboard=false", f"tokenizer={TOKENIZER}", *extra]


# --- running a case ----------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    case: Case
    ok: bool
    problem: str
    status: Any
    message: str
    seconds: float


def snapshot(path: str) -> dict:
    if not os.path.lexists(path):
        return {"": "absent"}
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {"": hashlib.sha256(f.read()).hexdigest()}
    out = {}
    for root, dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), path) + "/"] = "dir"
    return out


def leftovers(folder: Path) -> list[str]:
    """Temporary names, old copies and lock files under `folder` (but the locks of _HOLDERS)."""
    held = {os.path.abspath(path) for _, path in _HOLDERS}
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            if (".tmp-" in name or ".old-" in name or name.endswith(".lock") or "orbax-checkpoint-tmp" in name) \
                    and os.path.abspath(path) not in held:
                found.append(os.path.relpath(path, folder))
    return found


def _in_process(run: Run) -> tuple[Any, str, str]:
    """Call the command's entry point here, as `python -m MODULE` would: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old_argv, old_stdin = sys.argv, sys.stdin
    sys.argv = [run.module, *run.argv]
    sys.stdin = io.TextIOWrapper(io.BytesIO(run.stdin))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if run.module == "llama_jax.convert":
                    from llama_jax.convert.__main__ import cli

                    status = cli()
                elif run.module == "llama_jax.generate":
                    from llama_jax.generate.__main__ import main

                    main(list(run.argv))
                    status = 0
                elif run.module == "train":
                    from train.__main__ import main

                    status = main(list(run.argv))
                elif run.module == "train.tokenize":
                    from train.tokenize import main

                    status = main(list(run.argv))
                else:
                    value = run.call()
                    status = 0
                    if run.check is not None:
                        out.write(repr(value))
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else 1
            except BaseException as e:  # noqa: BLE001 - what the sweep is looking for
                if run.module == "api" and isinstance(e, (ValueError, TypeError, KeyError, OSError)):
                    status = 2
                    err.write(f"error: {' '.join(str(e).split())}\n")
                else:
                    status = "traceback"
                    err.write(traceback.format_exc())
    finally:
        sys.argv, sys.stdin = old_argv, old_stdin
    return status, out.getvalue(), err.getvalue()


def _subprocess(run: Run, folder: Path) -> tuple[Any, str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", run.module, *[os.fsencode(a) for a in run.argv]]
    if run.full_disk:
        mount, size, seed = run.full_disk
        script = ('mount -t tmpfs -o size="$SIZE" tmpfs "$MOUNT" || exit 99; '
                  '[ -n "$SEED" ] && cp -a "$SEED" "$MOUNT/out"; "$@"; rc=$?; '
                  '(cd "$MOUNT" && find . -type f | LC_ALL=C sort | xargs -r sha256sum) > "$LISTING"; exit $rc')
        env.update(SIZE=str(size), MOUNT=mount, SEED=seed or "", LISTING=str(folder / "listing.txt"))
        argv = ["unshare", "-m", "sh", "-c", script, "sh", *argv]
    proc = subprocess.run(argv, input=run.stdin, capture_output=True, env=env, cwd=str(ROOT), timeout=600)
    return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


def judge(run: Run, status: Any, out: str, err: str) -> str | None:
    """None when the case passed, else what went wrong."""
    if "Traceback (most recent call last)" in err or status == "traceback":
        lines = err.strip().splitlines()
        at = next((i for i, line in enumerate(lines) if line.startswith("Traceback")), 0)
        return f"traceback ({status}): {lines[-1][:200] if lines else ''} | after: {lines[at - 1][:150] if at else ''}"
    if status != run.status:
        last = err.strip().splitlines()[-1][:200] if err.strip() else ""
        return f"exit status {status}, expected {run.status} ({last})"
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(ERROR_PREFIXES) or ": error: " in line]
    if run.status == 2:
        if len(errors) != 1:
            return f"expected one error line, got {len(errors)}: {lines[-3:]}"
        if run.names and not any(name in errors[0] for name in run.names):
            return f"message names none of {run.names}: {errors[0][:300]}"
    elif run.names and not any(name in err + out for name in run.names):
        return f"output names none of {run.names}"
    if run.check is not None:
        return run.check(out, err)
    return None


def run_case(case: Case, base: Base, scratch: Path, use_subprocess: bool) -> Result:
    folder = scratch / f"{case.family}--{''.join(c if c.isalnum() or c in '.-_' else '_' for c in case.name)}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.time()
    try:
        run = case.build(folder, base)
    except Exception:  # noqa: BLE001 - a broken case is reported, not fatal
        return Result(case, False, "build failed: " + traceback.format_exc().splitlines()[-1], None, "", 0.0)
    before = {path: snapshot(path) for path in run.keep}
    if run.full_disk and not shutil.which("unshare"):
        return Result(case, False, "skipped: no unshare for a tmpfs", None, "", 0.0)
    if run.full_disk or (use_subprocess and run.module != "api"):
        status, out, err = _subprocess(run, folder)
    else:
        status, out, err = _in_process(run)
    problem = judge(run, status, out, err)
    if problem is None:
        changed = [path for path in run.keep if snapshot(path) != before[path]]
        present = [path for path in run.absent if os.path.lexists(path)]
        left = leftovers(folder)
        if run.full_disk and status != 99:
            seed = run.full_disk[2]
            listing = (folder / "listing.txt").read_text().splitlines() if (folder / "listing.txt").exists() else []
            got = sorted(tuple(line.split(None, 1)[::-1]) for line in listing)  # (path, sha256)
            if run.module == "train":  # the run's small files stay; no unfinished step may
                if any("tmp" in path for path, _ in got):
                    problem = f"the full disk holds {[p for p, _ in got if 'tmp' in p]} afterwards"
            else:  # nothing new; an OUT that was there is there, byte for byte
                want = sorted((f"./out/{rel}", digest) for rel, digest in snapshot(seed).items()
                              if not rel.endswith("/")) if seed else []
                if got != want:
                    problem = f"the full disk holds {[p for p, _ in got][:4]} afterwards, expected {[p for p, _ in want][:4]}"
        if changed:
            problem = f"changed: {changed}"
        elif present:
            problem = f"left behind: {present}"
        elif left:
            problem = f"leftovers: {left}"
    if status == 99:
        problem = "skipped: cannot mount a tmpfs here"
    messages = [line for line in err.splitlines() if line.startswith(ERROR_PREFIXES) or ": error: " in line]
    return Result(case, problem is None, problem or "", status, (messages or [""])[-1][:300], time.time() - start)


# --- the cases -------------------------------------------------------------------------------------

CASES: list[Case] = []


def case(family: str, name: str):
    def register(build):
        CASES.append(Case(family, name, build))
        return build
    return register


def copy(src: str, dst: Path) -> str:
    shutil.copytree(src, dst, symlinks=True)
    return str(dst)


def write(path: str, data: bytes | str) -> None:
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def edit_json(path: str, change: Callable[[Any], Any]) -> None:
    with open(path) as f:
        value = json.load(f)
    value = change(value) or value
    with open(path, "w") as f:
        json.dump(value, f)


def truncate(path: str, keep: float = 0.5) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def flip(path: str, offset: int | None = None) -> None:
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(size // 2 if offset is None else offset)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def largest(folder: str) -> str:
    files = [os.path.join(r, n) for r, _, ns in os.walk(folder) for n in ns if not n.endswith(".json")]
    return max(files, key=os.path.getsize)


# Malformed JSON of every kind, applied to every JSON file a command reads.
BAD_JSON = {
    "empty": b"",
    "garbage": b"\x00\x01 not json",
    "truncated": None,  # the file's first half
    "not_utf8": b'{"a": "\xff\xfe"}',
    "a_list": b"[1, 2, 3]",
    "a_string": b'"hello"',
    "null": b"null",
    "deep": b"[" * 100_000 + b"]" * 100_000,
}


def bad_json(path: str, kind: str) -> None:
    if kind == "truncated":
        truncate(path)
    else:
        write(path, BAD_JSON[kind])


def _convert_hf_json(file: str, source: str = "hf"):
    def build(t: Path, b: Base, kind: str) -> Run:
        src = copy(getattr(b, source), t / "src")
        bad_json(os.path.join(src, file), kind)
        return Run("llama_jax.convert", ["hf", src, str(t / "out"), "--no-progress"], (file,), keep=(src,),
                   absent=(str(t / "out"),))
    return build


for _kind in BAD_JSON:
    case("hf-config", f"config.json {_kind}")(lambda t, b, k=_kind: _convert_hf_json("config.json")(t, b, k))
    case("hf-index", f"index {_kind}")(lambda t, b, k=_kind: _convert_hf_json("model.safetensors.index.json")(t, b, k))
    case("meta", f"params.json {_kind}")(lambda t, b, k=_kind: _meta_json(t, b, k))
    case("checkpoint", f"config.json {_kind} (export-hf)")(lambda t, b, k=_kind: _ckpt_file(t, b, "config.json", k, "export"))
    case("checkpoint", f"config.json {_kind} (generate)")(lambda t, b, k=_kind: _ckpt_file(t, b, "config.json", k, "generate"))
    case("checkpoint", f"checksums.json {_kind}")(lambda t, b, k=_kind: _ckpt_file(t, b, "checksums.json", k, "generate"))
    case("train-data", f"alpaca data {_kind}")(lambda t, b, k=_kind: _train_data(t, b, k, "alpaca"))
    case("train-data", f"chat data {_kind}")(lambda t, b, k=_kind: _train_data(t, b, k, "chat"))
    case("train-data", f"eval data {_kind}")(lambda t, b, k=_kind: _train_data(t, b, k, "eval"))


def _meta_json(t: Path, b: Base, kind: str) -> Run:
    src = copy(b.meta, t / "src")
    bad_json(os.path.join(src, "params.json"), kind)
    return Run("llama_jax.convert", ["meta", src, str(t / "out"), "--no-progress"], ("params.json",), keep=(src,),
               absent=(str(t / "out"),))


def _ckpt_file(t: Path, b: Base, file: str, kind: str, command: str) -> Run:
    ckpt = copy(b.converted, t / "ckpt")
    bad_json(os.path.join(ckpt, file), kind)
    if command == "export":
        return Run("llama_jax.convert", ["export-hf", ckpt, str(t / "out"), "--no-progress"], (file,), keep=(ckpt,),
                   absent=(str(t / "out"),))
    return Run("llama_jax.generate", ["--checkpoint", ckpt, "--tokenizer", TOKENIZER, "--prompt", "hi",
                                      "--max-new-tokens", "2"], (file,), keep=(ckpt,))


def _train_data(t: Path, b: Base, kind: str, which: str) -> Run:
    data = str(t / "data.json")
    shutil.copy(ROOT / "data" / "demo_alpaca_eval.json", data)
    bad_json(data, kind)
    out = str(t / "run")
    if which == "eval":
        argv = train_args(out, f"eval.data={data}", "data.format=alpaca",
                          f"data.train={ROOT / 'data' / 'demo_alpaca_train.json'}", "data.max_len=80")
    else:
        extra = ["data.max_len=80"] if which == "alpaca" else []
        argv = train_args(out, *extra, data=data, fmt=which)
    return Run("train", argv, ("data.json",), keep=(data,), absent=(out,))


# --- HF weights ------------------------------------------------------------------------------------


def _hf_run(src: str, t: Path, names: tuple, *extra: str) -> Run:
    return Run("llama_jax.convert", ["hf", src, str(t / "out"), "--no-progress", *extra], names, keep=(src,),
               absent=(str(t / "out"),))


def _first_shard(src: str) -> str:
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        return os.path.join(src, sorted(set(json.load(f)["weight_map"].values()))[0])


@case("hf-index", "weight_map missing")
def _(t, b):
    src = copy(b.hf, t / "src")
    edit_json(os.path.join(src, "model.safetensors.index.json"), lambda d: {"metadata": {}})
    return _hf_run(src, t, ("weight_map",))


@case("hf-index", "weight_map is a list")
def _(t, b):
    src = copy(b.hf, t / "src")
    edit_json(os.path.join(src, "model.safetensors.index.json"), lambda d: {**d, "weight_map": ["a"]})
    return _hf_run(src, t, ("weight_map",))


@case("hf-index", "weight_map value is a number")
def _(t, b):
    src = copy(b.hf, t / "src")
    edit_json(os.path.join(src, "model.safetensors.index.json"),
              lambda d: {**d, "weight_map": {**d["weight_map"], "model.norm.weight": 5}})
    return _hf_run(src, t, ("weight_map",))


for _name, _target in (("absolute path", "ABS"), ("parent path", "../outside.safetensors"),
                       ("deep parent path", "sub/../../outside.safetensors")):
    @case("hf-index", f"weight_map {_name} outside SRC")
    def _(t, b, target=_target):
        src = copy(b.hf, t / "src")
        shard = _first_shard(src)
        shutil.copy(shard, t / "outside.safetensors")
        name = str(t / "outside.safetensors") if target == "ABS" else target
        edit_json(os.path.join(src, "model.safetensors.index.json"),
                  lambda d: {**d, "weight_map": {k: name for k in d["weight_map"]}})
        return Run("llama_jax.convert", ["hf", src, str(t / "out"), "--no-progress"], ("weight_map",),
                   keep=(src, str(t / "outside.safetensors")), absent=(str(t / "out"),))


@case("hf-index", "weight_map file is a symlink leaving SRC")
def _(t, b):
    src = copy(b.hf, t / "src")
    shard = _first_shard(src)
    shutil.move(shard, t / "elsewhere.safetensors")
    os.symlink(t / "elsewhere.safetensors", shard)
    return _hf_run(src, t, ("leaves the model folder",))


@case("hf-index", "listed file missing")
def _(t, b):
    src = copy(b.hf, t / "src")
    shard = _first_shard(src)
    os.remove(shard)
    return _hf_run(src, t, (os.path.basename(shard),))


@case("hf-index", "lists a tensor its file lacks")
def _(t, b):
    src = copy(b.hf, t / "src")
    edit_json(os.path.join(src, "model.safetensors.index.json"),
              lambda d: {**d, "weight_map": {**d["weight_map"], "model.extra.weight": os.path.basename(_first_shard(src))}})
    return _hf_run(src, t, ("model.extra.weight",))


@case("hf-index", "a tensor missing from the index")
def _(t, b):
    src = copy(b.hf, t / "src")
    edit_json(os.path.join(src, "model.safetensors.index.json"),
              lambda d: {**d, "weight_map": {k: v for k, v in d["weight_map"].items() if k != "model.norm.weight"}})
    return _hf_run(src, t, ("model.norm.weight",))


@case("hf-index", "empty weight_map")
def _(t, b):
    src = copy(b.hf, t / "src")
    edit_json(os.path.join(src, "model.safetensors.index.json"), lambda d: {**d, "weight_map": {}})
    return _hf_run(src, t, ("missing tensor",))


def _hf_config_edit(change: Callable[[dict], Any], names: tuple):
    def build(t, b):
        src = copy(b.hf, t / "src")
        edit_json(os.path.join(src, "config.json"), change)
        return _hf_run(src, t, names)
    return build


for _name, _change, _names in (
    ("model_type mistral", lambda d: {**d, "model_type": "mistral"}, ("model_type",)),
    ("hidden_size missing", lambda d: {k: v for k, v in d.items() if k != "hidden_size"}, ("hidden_size",)),
    ("hidden_size a string", lambda d: {**d, "hidden_size": "abc"}, ("config.json",)),
    ("hidden_size negative", lambda d: {**d, "hidden_size": -64}, ("dim",)),
    ("hidden_size fractional", lambda d: {**d, "hidden_size": 64.5}, ("config.json",)),
    ("hidden_size huge", lambda d: {**d, "hidden_size": 10**30}, ("config.json",)),
    ("hidden_size a list", lambda d: {**d, "hidden_size": [64]}, ("config.json",)),
    ("hidden_size Infinity", lambda d: {**d, "hidden_size": float("inf")}, ("config.json",)),
    ("heads zero", lambda d: {**d, "num_attention_heads": 0}, ("n_heads", "config.json")),
    ("heads do not divide", lambda d: {**d, "num_attention_heads": 5}, ("config.json",)),
    ("kv heads do not divide", lambda d: {**d, "num_key_value_heads": 3}, ("n_kv_heads",)),
    ("rope_scaling a string", lambda d: {**d, "rope_scaling": "linear"}, ("config.json",)),
    ("rope_scaling dynamic", lambda d: {**d, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, ("RoPE scaling",)),
    ("rope_scaling llama3 incomplete", lambda d: {**d, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     ("low_freq_factor",)),
    ("rope_parameters a list", lambda d: {**d, "rope_parameters": [1]}, ("config.json",)),
    ("tied embeddings, lm_head differs", lambda d: {**d, "tie_word_embeddings": True}, ("lm_head.weight",)),
    ("rms_norm_eps a string", lambda d: {**d, "rms_norm_eps": "x"}, ("config.json",)),
    ("rms_norm_eps negative", lambda d: {**d, "rms_norm_eps": -1}, ("norm_eps",)),
    ("rms_norm_eps NaN", lambda d: {**d, "rms_norm_eps": float("nan")}, ("norm_eps",)),
    ("rope_theta zero", lambda d: {**d, "rope_theta": 0, "rope_parameters": {"rope_type": "default", "rope_theta": 0}},
     ("rope_theta",)),
    ("max_position_embeddings 0", lambda d: {**d, "max_position_embeddings": 0}, ("max_seq_len",)),
    ("hidden_act gelu", lambda d: {**d, "hidden_act": "gelu"}, ("hidden_act",)),
    ("vocab_size disagrees with weights", lambda d: {**d, "vocab_size": 1000}, ("model.embed_tokens.weight",)),
    ("num_hidden_layers more than weights", lambda d: {**d, "num_hidden_layers": 3}, ("missing tensor",)),
    ("num_hidden_layers fewer than weights", lambda d: {**d, "num_hidden_layers": 1}, ("unknown tensor",)),
    ("attention_bias", lambda d: {**d, "attention_bias": True}, ("biases",)),
):
    case("hf-config", _name)(_hf_config_edit(_change, _names))


@case("hf-config", "generation_config.json eos_token_id outside the vocabulary")
def _(t, b):
    src = copy(b.hf, t / "src")
    write(os.path.join(src, "generation_config.json"), json.dumps({"eos_token_id": [2, 10**6]}))
    return _hf_run(src, t, ("generation_config.json",))


@case("hf-config", "no config.json")
def _(t, b):
    src = copy(b.hf, t / "src")
    os.remove(os.path.join(src, "config.json"))
    return _hf_run(src, t, ("config.json",))


@case("hf-weights", "no weight files")
def _(t, b):
    src = str(t / "src")
    os.makedirs(src)
    shutil.copy(os.path.join(b.hf, "config.json"), src)
    return _hf_run(src, t, ("model.safetensors",))


@case("hf-weights", "SRC missing")
def _(t, b):
    return _hf_run(str(t / "nope"), t, ("nope",))


@case("hf-weights", "SRC is a file")
def _(t, b):
    write(str(t / "file"), "x")
    return _hf_run(str(t / "file"), t, ("file",))


for _name, _damage in (
    ("truncated to half", lambda p: truncate(p, 0.5)),
    ("truncated to 8 bytes", lambda p: truncate(p, 8 / os.path.getsize(p))),
    ("empty", lambda p: write(p, b"")),
    ("garbage", lambda p: write(p, os.urandom(4096))),
    ("header length huge", lambda p: _patch(p, 0, (2**62).to_bytes(8, "little"))),
    ("header not JSON", lambda p: _patch(p, 8, b"\xff" * 16)),
    ("header a JSON list", lambda p: _rewrite_header(p, lambda h: [1])),
    ("offsets beyond the file", lambda p: _rewrite_header(p, lambda h: {k: ({**v, "data_offsets": [0, 10**9]} if
                                                                            k != "__metadata__" else v) for k, v in h.items()})),
    ("dtype I32", lambda p: _rewrite_header(p, lambda h: {k: ({**v, "dtype": "I32"} if k != "__metadata__" else v)
                                                        for k, v in h.items()})),
    ("wrong shape", lambda p: _rewrite_header(p, lambda h: {k: ({**v, "shape": [v["shape"][0] // 2, v["shape"][-1] * 2]
                                                                 if len(v["shape"]) == 2 else v["shape"]}
                                                                if k != "__metadata__" else v) for k, v in h.items()})),
):
    @case("hf-weights", f"safetensors {_name}")
    def _(t, b, damage=_damage):
        src = copy(b.hf_single, t / "src")
        damage(os.path.join(src, "model.safetensors"))
        return _hf_run(src, t, ("model.safetensors",))

    @case("hf-weights", f"safetensors shard {_name}")
    def _(t, b, damage=_damage):
        src = copy(b.hf, t / "src")
        shard = _first_shard(src)
        damage(shard)
        return _hf_run(src, t, (os.path.basename(shard),))


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _rewrite_header(path: str, change: Callable[[dict], Any]) -> None:
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = change(json.loads(raw[8:8 + n]))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    write(path, len(text).to_bytes(8, "little") + text + raw[8 + n:])


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


for _name, _damage in (
    ("truncated", lambda p: truncate(p, 0.5)),
    ("empty", lambda p: write(p, b"")),
    ("garbage", lambda p: write(p, os.urandom(4096))),
    ("a pickled list", lambda p: __import__("torch").save([1, 2, 3], p)),
    ("a pickle that runs code", lambda p: __import__("torch").save({"x": _RunsCode(p + ".pwned")}, p)),
    ("non-tensor values", lambda p: __import__("torch").save({"model.norm.weight": "abc"}, p)),
    ("integer tensors", lambda p: __import__("torch").save(
        {k: v.to(__import__("torch").int32) for k, v in __import__("torch").load(p, weights_only=True).items()}, p)),
    ("float64 tensors", lambda p: __import__("torch").save(
        {k: v.double() for k, v in __import__("torch").load(p, weights_only=True).items()}, p)),
    ("legacy format truncated", lambda p: (__import__("torch").save(
        __import__("torch").load(p, weights_only=True), p, _use_new_zipfile_serialization=False), truncate(p, 0.6))),
):
    @case("hf-weights", f"pytorch_model.bin {_name}")
    def _(t, b, damage=_damage):
        src = copy(b.hf_bin, t / "src")
        bin_file = os.path.join(src, "pytorch_model.bin")
        damage(bin_file)
        run = _hf_run(src, t, ("pytorch_model.bin",))
        run.absent += (bin_file + ".pwned",)
        return run


# --- Meta weights ------------------------------------------------------------------------------


def _meta_run(src: str, t: Path, names: tuple, *extra: str) -> Run:
    return Run("llama_jax.convert", ["meta", src, str(t / "out"), "--no-progress", *extra], names, keep=(src,),
               absent=(str(t / "out"),))


for _name, _change, _names in (
    ("dim missing", lambda d: {k: v for k, v in d.items() if k != "dim"}, ("dim",)),
    ("dim a string", lambda d: {**d, "dim": "sixty-four"}, ("params.json",)),
    ("dim null", lambda d: {**d, "dim": None}, ("params.json",)),
    ("n_heads zero", lambda d: {**d, "n_heads": 0}, ("params.json",)),
    ("unknown key", lambda d: {**d, "moe": True}, ("moe",)),
    ("scaled rope", lambda d: {**d, "use_scaled_rope": True}, ("scaled RoPE",)),
    ("vocab disagrees", lambda d: {**d, "vocab_size": 1000}, ("vocab_size",)),
    ("norm_eps a list", lambda d: {**d, "norm_eps": [1]}, ("params.json",)),
    ("n_layers larger", lambda d: {**d, "n_layers": 3}, ("missing tensor",)),
    ("multiple_of zero", lambda d: {**d, "multiple_of": 0}, ("params.json",)),
):
    @case("meta", f"params.json {_name}")
    def _(t, b, change=_change, names=_names):
        src = copy(b.meta, t / "src")
        edit_json(os.path.join(src, "params.json"), change)
        return _meta_run(src, t, names)


for _name, _damage, _names in (
    ("shard 1 truncated", lambda s: truncate(os.path.join(s, "consolidated.01.pth")), ("consolidated.01.pth",)),
    ("shard 0 garbage", lambda s: write(os.path.join(s, "consolidated.00.pth"), os.urandom(999)), ("consolidated.00.pth",)),
    ("shard 0 empty", lambda s: write(os.path.join(s, "consolidated.00.pth"), b""), ("consolidated.00.pth",)),
    ("shard numbering gap", lambda s: os.rename(os.path.join(s, "consolidated.01.pth"), os.path.join(s, "consolidated.02.pth")),
     ("consolidated.01.pth",)),
    ("no shards", lambda s: [os.remove(os.path.join(s, f)) for f in os.listdir(s) if f.endswith(".pth")],
     ("consolidated",)),
    ("no params.json", lambda s: os.remove(os.path.join(s, "params.json")), ("params.json",)),
    ("shards disagree", lambda s: _edit_pth(os.path.join(s, "consolidated.01.pth"), lambda d: d.pop("norm.weight")),
     ("consolidated.01.pth",)),
    ("replicated tensor differs", lambda s: _edit_pth(os.path.join(s, "consolidated.01.pth"),
                                                      lambda d: d["norm.weight"].add_(1)), ("norm.weight",)),
    ("a tensor of the wrong shape", lambda s: _edit_pth(os.path.join(s, "consolidated.00.pth"),
                                                        lambda d: d.update({"output.weight": d["output.weight"][:3]})),
     ("output.weight",)),
    ("an unknown tensor", lambda s: [_edit_pth(os.path.join(s, f"consolidated.0{r}.pth"),
                                               lambda d: d.update({"layers.0.attention.bias": d["norm.weight"]}))
                                     for r in (0, 1)], ("layers.0.attention.bias",)),
    ("integer tensor", lambda s: [_edit_pth(os.path.join(s, f"consolidated.0{r}.pth"),
                                            lambda d: d.update({"norm.weight": d["norm.weight"].int()})) for r in (0, 1)],
     ("norm.weight",)),
    ("tokenizer garbage", lambda s: write(os.path.join(s, "tokenizer.model"), b"not a model"), ("tokenizer.model",)),
):
    @case("meta", _name)
    def _(t, b, damage=_damage, names=_names):
        src = copy(b.meta, t / "src")
        damage(src)
        return _meta_run(src, t, names)


def _edit_pth(path: str, change: Callable) -> None:
    import torch

    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


for _value in ("0", "-5", "abc", "99999999999999999999999"):
    @case("meta", f"--max-seq-len {_value}")
    def _(t, b, value=_value):
        src = copy(b.meta, t / "src")
        return _meta_run(src, t, ("max_seq_len", "--max-seq-len"), "--max-seq-len", value)


# --- conversion outputs --------------------------------------------------------------------------


@case("convert-output", "OUT exists, no --overwrite")
def _(t, b):
    out = copy(b.converted, t / "out")
    return Run("llama_jax.convert", ["hf", b.hf, out, "--no-progress"], ("already exists",), keep=(out, b.hf))


@case("convert-output", "OUT is a file")
def _(t, b):
    write(str(t / "out"), "mine")
    return Run("llama_jax.convert", ["hf", b.hf, str(t / "out"), "--no-progress"], ("already exists",),
               keep=(str(t / "out"),))


@case("convert-output", "OUT's parent is a file")
def _(t, b):
    write(str(t / "parent"), "mine")
    return Run("llama_jax.convert", ["hf", b.hf, str(t / "parent" / "out"), "--no-progress"], ("parent",),
               keep=(str(t / "parent"),))


@case("convert-output", "OUT in a read-only folder")
def _(t, b):
    os.makedirs(t / "ro")
    os.chmod(t / "ro", 0o555)
    run = Run("llama_jax.convert", ["hf", b.hf, str(t / "ro" / "out"), "--no-progress"], ("ro",),
              absent=(str(t / "ro" / "out"),))
    if os.geteuid() == 0:  # root writes anyway: then the conversion must simply succeed
        run.status, run.names, run.absent = 0, (), ()
    return run


for _name, _layout in (("OUT is SRC", "same"), ("OUT contains SRC", "parent"), ("OUT inside SRC", "inside"),
                       ("OUT is a link to SRC", "link"), ("SRC is a link to OUT", "link_back")):
    for _command in ("hf", "meta", "export-hf"):
        @case("overlap", f"{_command}: {_name}")
        def _(t, b, layout=_layout, command=_command):
            base = {"hf": b.hf, "meta": b.meta, "export-hf": b.converted}[command]
            src = copy(base, t / "p" / "src")
            out = {"same": src, "parent": str(t / "p"), "inside": os.path.join(src, "sub"), "link": str(t / "link"),
                   "link_back": str(t / "real")}[layout]
            argv_src = src
            if layout == "link":
                os.symlink(src, out)
            if layout == "link_back":
                os.rename(src, out)
                os.symlink(out, src)
            return Run("llama_jax.convert", [command, argv_src, out, "--overwrite", "--no-progress"], ("source",),
                       keep=(str(t),))


@case("convert-output", "leftovers of a killed conversion are removed")
def _(t, b):
    pid = _dead_pid()
    os.makedirs(t / f"out.tmp-{pid}" / "params")
    write(str(t / f"out.tmp-{pid}" / "params" / "x"), b"\0" * 100)
    return Run("llama_jax.convert", ["hf", b.hf, str(t / "out"), "--no-progress"], (f"out.tmp-{pid}",), status=0)


@case("convert-output", "an overwrite killed between renames is restored")
def _(t, b):
    pid = _dead_pid()
    copy(b.converted, t / f"out.old-{pid}")
    copy(b.converted, t / f"out.tmp-{pid}")
    return Run("llama_jax.convert", ["hf", b.hf, str(t / "out"), "--no-progress"], ("already exists",))


@case("convert-output", "a live conversion holds OUT")
def _(t, b):
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'{\"pid\": %d}' "
                               "% os.getpid()); print('locked', flush=True); time.sleep(600)", str(t / "out.lock")],
                              stdout=subprocess.PIPE)
    holder.stdout.readline()
    _HOLDERS.append((holder, t / "out.lock"))
    return Run("llama_jax.convert", ["hf", b.hf, str(t / "out"), "--no-progress"], (f"pid {holder.pid}",),
               absent=(str(t / "out"),))


_HOLDERS: list = []


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@case("convert-output", "--tokenizer missing")
def _(t, b):
    return _hf_run(b.hf, t, ("nope.model",), "--tokenizer", str(t / "nope.model"))


@case("convert-output", "--tokenizer is a folder")
def _(t, b):
    os.makedirs(t / "tok")
    return _hf_run(b.hf, t, ("tok",), "--tokenizer", str(t / "tok"))


@case("convert-output", "--tokenizer garbage")
def _(t, b):
    write(str(t / "tok.model"), b"not a sentencepiece model")
    return _hf_run(b.hf, t, ("tok.model",), "--tokenizer", str(t / "tok.model"))


@case("convert-output", "--dtype int8")
def _(t, b):
    return _hf_run(b.hf, t, ("--dtype",), "--dtype", "int8")


@case("convert-output", "--verify-layers -1")
def _(t, b):
    return Run("llama_jax.convert", ["hf", b.hf, str(t / "out"), "--no-progress", "--verify", "--verify-layers", "-1"],
               ("--verify-layers",), absent=(str(t / "out"),))


# --- full disks ------------------------------------------------------------------------------------


for _command, _size in (("export-hf", "200k"), ("hf", "200k"), ("meta", "300k"), ("export-hf", "600k"), ("hf", "20k")):
    @case("full-disk", f"{_command} onto a {_size} disk")
    def _(t, b, command=_command, size=_size):
        mount = t / "disk"
        os.makedirs(mount)
        src = {"export-hf": b.converted, "hf": b.hf, "meta": b.meta}[command]
        return Run("llama_jax.convert", [command, src, str(mount / "out"), "--no-progress"],
                   ("disk/out",), keep=(src,), full_disk=(str(mount), size, None))


for _command in ("export-hf", "hf"):
    @case("full-disk", f"{_command} --overwrite onto a full disk keeps the old OUT")
    def _(t, b, command=_command):
        mount = t / "disk"
        os.makedirs(mount)
        src = {"export-hf": b.converted, "hf": b.hf}[command]
        seed = b.hf if command == "export-hf" else b.converted
        return Run("llama_jax.convert", [command, src, str(mount / "out"), "--overwrite", "--no-progress"],
                   ("disk/out",), keep=(src,), full_disk=(str(mount), "1200k", seed))


@case("full-disk", "training onto a full disk")
def _(t, b):
    mount = t / "disk"
    os.makedirs(mount)
    return Run("train", train_args(str(mount / "run"), "checkpoint_every=1"), ("disk/run",),
               full_disk=(str(mount), "300k", None), check=None)


# --- checkpoints (load_checkpoint via generate and export-hf) -------------------------------------


def _load_run(ckpt: str, t: Path, names: tuple, via: str) -> Run:
    if via == "export":
        return Run("llama_jax.convert", ["export-hf", ckpt, str(t / "out"), "--no-progress"], names, keep=(ckpt,),
                   absent=(str(t / "out"),))
    return Run("llama_jax.generate", ["--checkpoint", ckpt, "--tokenizer", TOKENIZER, "--prompt", "hi",
                                      "--max-new-tokens", "2"], names, keep=(ckpt,))


for _via in ("export", "generate"):
    for _which in ("converted", "ckpt"):
        for _name, _damage in (
            ("a flipped byte in the largest array file", lambda p: flip(p)),
            ("the largest array file truncated", lambda p: truncate(p)),
            ("the largest array file deleted", lambda p: os.remove(p)),
        ):
            @case("checkpoint", f"{_which} {_name} ({_via})")
            def _(t, b, via=_via, which=_which, damage=_damage):
                ckpt = copy(getattr(b, which), t / "ckpt")
                target = largest(os.path.join(ckpt, "params"))
                damage(target)
                return _load_run(ckpt, t, (os.path.relpath(target, ckpt),), via)


for _via in ("export", "generate"):
    for _name, _damage, _names in (
        ("zarr dtype edited to int32", lambda c: edit_json(os.path.join(c, "params", "output", ".zarray"),
                                                           lambda d: {**d, "dtype": "<i4"}), (".zarray", "output")),
        ("zarr shape edited", lambda c: edit_json(os.path.join(c, "params", "output", ".zarray"),
                                                  lambda d: {**d, "shape": [32, 512]}), (".zarray", "output")),
        ("_METADATA garbage", lambda c: write(os.path.join(c, "params", "_METADATA"), b"\xff garbage"), ("_METADATA",)),
        ("_METADATA deleted", lambda c: os.remove(os.path.join(c, "params", "_METADATA")), ("ckpt",)),
        ("params/ deleted", lambda c: shutil.rmtree(os.path.join(c, "params")), ("ckpt",)),
        ("config.json of a different model", lambda c: edit_json(os.path.join(c, "config.json"),
                                                                 lambda d: {**d, "n_layers": 3}), ("config.json", "n_layers")),
        ("config.json of another format", lambda c: edit_json(os.path.join(c, "config.json"),
                                                              lambda d: {k: v for k, v in d.items() if k != "format"}),
         ("config.json",)),
        ("config.json version 2", lambda c: edit_json(os.path.join(c, "config.json"), lambda d: {**d, "version": 2}),
         ("config.json",)),
        ("config.json with an unknown field", lambda c: edit_json(os.path.join(c, "config.json"),
                                                                  lambda d: {**d, "moe": 8}), ("config.json",)),
        ("config.json dim a string", lambda c: edit_json(os.path.join(c, "config.json"), lambda d: {**d, "dim": "64"}),
         ("config.json",)),
        ("config.json param_dtype int8", lambda c: edit_json(os.path.join(c, "config.json"),
                                                             lambda d: {**d, "param_dtype": "int8"}), ("config.json",)),
        ("checksums.json of another checkpoint", lambda c: edit_json(
            os.path.join(c, "checksums.json"), lambda d: {**d, "files": {k: {**v, "xxh3": "0" * 16}
                                                                        for k, v in d["files"].items()}}),
         ("checksum mismatch",)),
        ("checksums.json lists a file that is gone", lambda c: edit_json(
            os.path.join(c, "checksums.json"), lambda d: {**d, "files": {**d["files"], "params/extra": {"size": 1, "xxh3": "0"}}}),
         ("params/extra",)),
    ):
        @case("checkpoint", f"{_name} ({_via})")
        def _(t, b, via=_via, damage=_damage, names=_names):
            ckpt = copy(b.converted, t / "ckpt")
            damage(ckpt)
            return _load_run(ckpt, t, names, via)


for _via in ("export", "generate"):
    @case("checkpoint", f"checkpoint missing ({_via})")
    def _(t, b, via=_via):
        return _load_run(str(t / "nope"), t, ("nope",), via)

    @case("checkpoint", f"checkpoint is a file ({_via})")
    def _(t, b, via=_via):
        write(str(t / "file"), "x")
        return _load_run(str(t / "file"), t, ("file",), via)

    @case("checkpoint", f"an HF folder given as checkpoint ({_via})")
    def _(t, b, via=_via):
        return _load_run(copy(b.hf, t / "hf"), t, ("convert it",), via)

    @case("checkpoint", f"a run whose every step is damaged ({_via})")
    def _(t, b, via=_via):
        run = copy(b.run, t / "run")
        for step in ("1", "2"):
            flip(largest(os.path.join(run, step, "params")))
        return _load_run(run, t, ("checksum mismatch",), via)


@case("checkpoint", "export-hf: OUT exists")
def _(t, b):
    out = copy(b.hf, t / "out")
    return Run("llama_jax.convert", ["export-hf", b.converted, out, "--no-progress"], ("already exists",), keep=(out,))


@case("checkpoint", "export-hf: --dtype int8")
def _(t, b):
    return Run("llama_jax.convert", ["export-hf", b.converted, str(t / "out"), "--dtype", "int8", "--no-progress"],
               ("--dtype",), absent=(str(t / "out"),))


@case("checkpoint", "export-hf: OUT is a URL")
def _(t, b):
    return Run("llama_jax.convert", ["export-hf", b.converted, "gs://bucket/x", "--no-progress"], ("gs://bucket/x",))


# --- generation: command line ------------------------------------------------------------------------


def _gen(t: Path, b: Base, *argv: str, names: tuple = (), status: int = 2, stdin: bytes = b"",
         check: Callable | None = None) -> Run:
    return Run("llama_jax.generate", ["--checkpoint", b.converted, "--tokenizer", TOKENIZER, *argv], names,
               status=status, stdin=stdin, keep=(b.converted,), check=check)


for _flag, _value, _names in (
    ("--seed", "-1", ("seed",)), ("--seed", str(2**32), ("seed",)), ("--seed", str(2**70), ("seed",)),
    ("--seed", "1.5", ("--seed",)), ("--top-k", "-1", ("top_k",)), ("--top-p", "0", ("top_p",)),
    ("--top-p", "1.5", ("top_p",)), ("--top-p", "nan", ("top_p",)), ("--temperature", "-1", ("temperature",)),
    ("--temperature", "nan", ("temperature",)), ("--temperature", "inf", ("temperature",)),
    ("--temperature", "1e400", ("temperature",)), ("--max-new-tokens", "0", ("max_new_tokens",)),
    ("--max-new-tokens", "-5", ("max_new_tokens",)), ("--max-new-tokens", str(2**70), ("max_new_tokens",)),
    ("--max-new-tokens", "100000", ("max_seq_len",)), ("--tensor-parallel", "0", ("--tensor-parallel",)),
    ("--tensor-parallel", "1000", ("--tensor-parallel",)), ("--dtype", "int8", ("--dtype",)),
    ("--prefill-chunk", "-1", ("--prefill-chunk",)), ("--prefill-chunk", "1.5", ("--prefill-chunk",)),
):
    case("generate-cli", f"{_flag} {_value}")(lambda t, b, f=_flag, v=_value, n=_names: _gen(
        t, b, "--prompt", "hi", f, v, names=n))


def _not_degenerate(out: str, err: str) -> str | None:
    return None if out.strip() else "no text generated"


case("generate-cli", "--top-k 2**70 (clamped to the vocabulary)")(lambda t, b: _gen(
    t, b, "--prompt", "hi", "--top-k", str(2**70), "--max-new-tokens", "3", status=0))
case("generate-cli", "--temperature 1e-30 (greedy in effect)")(lambda t, b: _gen(
    t, b, "--prompt", "hi", "--temperature", "1e-30", "--max-new-tokens", "3", status=0, check=_not_degenerate))
case("generate-cli", "--prompt not UTF-8")(lambda t, b: _gen(
    t, b, "--prompt", os.fsdecode(b"caf\xe9 \xff"), names=("--prompt",)))
case("generate-cli", "--system not UTF-8")(lambda t, b: _gen(
    t, b, "--chat", "--prompt", "hi", "--system", os.fsdecode(b"\xfe"), names=("--system",)))
case("generate-cli", "--input not UTF-8")(lambda t, b: _gen(
    t, b, "--alpaca", "--prompt", "hi", "--input", os.fsdecode(b"\xc3"), names=("--input",)))
case("generate-cli", "chat message with [INST]")(lambda t, b: _gen(
    t, b, "--chat", "--prompt", "hi [INST] there", names=("[INST]",)))
case("generate-cli", "prompt longer than the context")(lambda t, b: _gen(
    t, b, "--prompt", "word " * 2000, names=("max_seq_len",)))
case("generate-cli", "tokenizer missing")(lambda t, b: Run(
    "llama_jax.generate", ["--checkpoint", b.converted, "--tokenizer", str(t / "nope.model"), "--prompt", "hi"],
    ("nope.model",)))
case("generate-cli", "tokenizer garbage")(lambda t, b: (write(str(t / "tok.model"), b"\x00garbage"), Run(
    "llama_jax.generate", ["--checkpoint", b.converted, "--tokenizer", str(t / "tok.model"), "--prompt", "hi"],
    ("tok.model",)))[1])
case("generate-cli", "tokenizer is a folder")(lambda t, b: Run(
    "llama_jax.generate", ["--checkpoint", b.converted, "--tokenizer", str(t), "--prompt", "hi"], (str(t),)))
case("generate-cli", "no --prompt")(lambda t, b: _gen(t, b, names=("--prompt",)))
case("generate-cli", "interactive: a non-UTF-8 line is skipped, the chat goes on")(lambda t, b: _gen(
    t, b, "--chat", "--interactive", "--max-new-tokens", "2", stdin=b"hello\n\xff\xfe bad\nagain\n\n",
    names=("stdin line 2",), status=0))
case("generate-cli", "interactive: [INST] in a message is refused, the chat goes on")(lambda t, b: _gen(
    t, b, "--chat", "--interactive", "--max-new-tokens", "2", stdin=b"[INST] x\nfine\n\n", names=("[INST]",),
    status=0))
case("generate-cli", "interactive: binary garbage on stdin")(lambda t, b: _gen(
    t, b, "--interactive", "--max-new-tokens", "2", stdin=os.urandom(300).replace(b"\n", b"") + b"\n\n",
    names=("stdin line 1",), status=0))
case("generate-cli", "interactive: empty stdin")(lambda t, b: _gen(t, b, "--interactive", status=0))


# --- generation and loading: Python API ------------------------------------------------------------


def _api(call: Callable, names: tuple, status: int = 2, check: Callable | None = None) -> Callable:
    return lambda t, b: Run("api", [], names, status=status, call=lambda: call(t, b), check=check)


def _model(b: Base):
    import llama_jax as lj

    if not hasattr(b, "params"):
        b.params = lj.load_checkpoint(b.converted)[1]
    return b.params


def _generate(**kwargs):
    def call(t, b):
        import llama_jax as lj

        args = {"prompts": [[1, 5, 9]], "max_new_tokens": 2, **kwargs}
        return lj.generate(_model(b), b.cfg, **args)
    return call


for _name, _kwargs, _names in (
    ("seed 2**64", {"seed": 2**64}, ("seed",)), ("seed -1", {"seed": -1}, ("seed",)),
    ("seed a float", {"seed": 1.5}, ("seed",)), ("seed a string", {"seed": "1"}, ("seed",)),
    ("seed True", {"seed": True}, ("seed",)),
    ("top_k -3", {"top_k": -3}, ("top_k",)), ("top_k a float", {"top_k": 2.5}, ("top_k",)),
    ("top_p 0", {"top_p": 0.0}, ("top_p",)), ("top_p nan", {"top_p": float("nan")}, ("top_p",)),
    ("temperature nan", {"temperature": float("nan")}, ("temperature",)),
    ("temperature -0.5", {"temperature": -0.5}, ("temperature",)),
    ("temperature inf", {"temperature": float("inf")}, ("temperature",)),
    ("temperature a string", {"temperature": "hot"}, ("temperature",)),
    ("token id 2**40", {"prompts": [[1, 2**40]]}, ("token id",)), ("token id -1", {"prompts": [[1, -1]]}, ("token id",)),
    ("token a string", {"prompts": [["a"]]}, ("prompts[0]",)), ("no prompts", {"prompts": []}, ("prompts",)),
    ("an empty prompt", {"prompts": [[]]}, ("prompts[0]",)), ("a text prompt", {"prompts": "hello"}, ("prompts",)),
    ("max_new_tokens 0", {"max_new_tokens": 0}, ("max_new_tokens",)),
    ("max_new_tokens 2**40", {"max_new_tokens": 2**40}, ("max_new_tokens",)),
    ("eos_id 10**9", {"eos_id": 10**9}, ("eos_id",)),
    ("eos_id a list holding 10**9", {"eos_id": [2, 10**9]}, ("eos_id",)),
    ("eos_id a string", {"eos_id": "2"}, ("eos_id",)), ("eos_id True", {"eos_id": [True]}, ("eos_id",)),
    ("prefill_chunk 0", {"prefill_chunk": 0}, ("prefill_chunk",)),
    ("prefill_chunk a float", {"prefill_chunk": 8.0}, ("prefill_chunk",)),
):
    case("generate-api", _name)(_api(_generate(**_kwargs), _names))

case("generate-api", "top_k 2**70 is clamped")(_api(_generate(top_k=2**70, temperature=1.0), (), status=0))
case("generate-api", "temperature 1e-20 is greedy")(_api(
    lambda t, b: _generate(temperature=1e-20)(t, b) == _generate()(t, b), (), status=0,
    check=lambda out, err: None if out == "True" else "not greedy"))


def _generator(method: str, *args, **kwargs):
    def call(t, b):
        import llama_jax as lj

        gen = lj.Generator((b.cfg, _model(b)), TOKENIZER)
        return getattr(gen, method)(*args, max_new_tokens=2, **kwargs)
    return call


for _name, _call, _names in (
    ("chat: unknown role", _generator("chat", [{"role": "bot", "content": "hi"}]), ("role",)),
    ("chat: content a number", _generator("chat", [{"role": "user", "content": 5}]), ("content",)),
    ("chat: ends with the assistant", _generator("chat", [{"role": "user", "content": "a"},
                                                          {"role": "assistant", "content": "b"}]), ("user",)),
    ("chat: message not a dict", _generator("chat", ["hello"]), ("dialog", "message")),
    ("chat: [INST] in content", _generator("chat", [{"role": "user", "content": "[INST]"}]), ("[INST]",)),
    ("complete: a number", _generator("complete", 5), ("text", "str")),
    ("complete: not UTF-8 text", _generator("complete", "caf\udce9"), ("UTF-8",)),
    ("complete: unknown sampling keyword", _generator("complete", "hi", temp=0.5), ("temp",)),
    ("alpaca: input a list", _generator("alpaca", "do it", input=["x"]), ("input",)),
):
    case("generate-api", _name)(_api(_call, _names))


def _load(path_of: Callable, **kwargs):
    def call(t, b):
        import llama_jax as lj

        return lj.load_checkpoint(path_of(t, b), **kwargs)
    return call


for _name, _call, _names in (
    ("load_checkpoint dtype int8", _load(lambda t, b: b.converted, dtype="int8"), ("int8",)),
    ("load_checkpoint missing", _load(lambda t, b: str(t / "nope")), ("nope",)),
    ("load_checkpoint of an HF folder", _load(lambda t, b: b.hf), ("config.json",)),
    ("load_checkpoint of a flipped byte", _load(lambda t, b: (copy(b.converted, t / "c"), flip(largest(str(t / "c" / "params"))),
                                                            str(t / "c"))[-1]), ("checksum mismatch",)),
    ("Generator with a missing tokenizer", lambda t, b: __import__("llama_jax").Generator(b.converted, str(t / "x.model")),
     ("x.model",)),
    ("Generator with a non-checkpoint", lambda t, b: __import__("llama_jax").Generator(12, TOKENIZER), ("checkpoint",)),
    ("LlamaConfig dim a string", lambda t, b: __import__("llama_jax").LlamaConfig(dim="64"), ("dim",)),
    ("LlamaConfig norm_eps nan", lambda t, b: __import__("llama_jax").LlamaConfig(norm_eps=float("nan")), ("norm_eps",)),
    ("LlamaConfig n_heads 0", lambda t, b: __import__("llama_jax").LlamaConfig(n_heads=0), ("n_heads",)),
    ("save_checkpoint of int params", lambda t, b: __import__("llama_jax").save_checkpoint(
        str(t / "s"), b.cfg, __import__("jax").tree.map(lambda x: x.astype("int32"), _model(b))), ("int32",)),
):
    case("api-load", _name)(_api(_call, _names))


# --- the OpenAI server under hostile load (issue 22): a real server on loopback -------------------
# server-load: fields out of range, huge or broken bodies, clients that go away, a bad request among
# live streams; server-auth: keys. A case returns (HTTP status, error message) and passes when both
# are as expected and the server still answers /health afterwards.

SWEEP_KEY = "sk-sweep-1"


def _server(b: Base, key: str | None = None) -> tuple[str, int]:
    """(host, port) of a server over the base's tiny model (4 slots; one per key), started on first
    use in this process and stopped when it exits."""
    servers = b.__dict__.setdefault("servers", {})
    if key not in servers:
        import atexit

        import llama_jax as lj
        from llama_jax.generate.batcher import Batcher
        from llama_jax.serve import create_app, running

        tok = lj.Tokenizer(TOKENIZER)
        batcher = Batcher(_model(b), b.cfg, slots=4, decode=tok.decode, eos_id=tok.eos_id)
        serving = running(create_app(batcher, tok, "tiny", api_key=key))
        host, port = serving.__enter__().removeprefix("http://").split(":")
        atexit.register(serving.__exit__, None, None, None)
        servers[key] = (host, int(port))
    return servers[key]


def _exchange(address: tuple[str, int], head: bytes, parts=(), hang_up: bool = False) -> tuple[int, str]:
    """Send a raw HTTP request (head, then each of `parts` until the server answers) and read the
    answer: (status, error message or body). hang_up: close after sending, answer (0, "")."""
    import socket

    with socket.create_connection(address, timeout=60) as sock:
        sock.sendall(head)
        try:
            for part in parts:
                sock.sendall(part)
        except OSError:  # the server answered and closed while we were still sending
            pass
        if hang_up:
            return 0, ""
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    body = data[data.find(b"\r\n\r\n") + 4:]
    try:
        return status, json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return status, body.decode(errors="replace")[:2000]


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def _post(path: str, body: bytes | str, headers: str = "") -> Callable:
    """A POST of `body` (JSON text) to the plain server."""
    body = body.encode() if isinstance(body, str) else body

    def send(b: Base, key: str | None = None) -> tuple[int, str]:
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        return _exchange(_server(b, key), head, [body])
    return send


def _served(call: Callable, status: int, names: tuple, key: str | None = None, longest: int = 2000) -> Callable:
    """A server case: call(base) answers `status` with a message naming one of `names` (at most
    `longest` characters), and /health answers afterwards."""
    def check(out: str, err: str) -> str | None:
        got = eval(out)  # noqa: S307 - our own repr of (status, message)
        if got[0] != status:
            return f"status {got[0]}, expected {status}: {got[1][:200]}"
        if names and not any(n in got[1] for n in names):
            return f"message names none of {names}: {got[1][:200]}"
        if len(got[1]) > longest:
            return f"a {len(got[1])}-character message"
        return None

    def run(t: Path, b: Base) -> Run:
        def go():
            got = call(b, key) if key is not None else call(b)
            health = _exchange(_server(b, key), b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            return got if health[0] == 200 else (-1, f"/health answered {health}")
        return Run("api", [], (), status=0, call=go, check=check)
    return run


def _completion(**fields) -> str:
    return json.dumps({"prompt": "hi", "max_tokens": 2, **fields})


for _name, _body, _status, _names in (
    ("top_k 2**31", _completion(top_k=2**31), 400, ("top_k",)),
    ("top_k 2**70", _completion(top_k=2**70), 400, ("top_k",)),
    ("top_k 513 (over the vocabulary)", _completion(top_k=513), 400, ("top_k",)),
    ("top_k -1", _completion(top_k=-1), 400, ("top_k",)),
    ("top_k 1.5", _completion(top_k=1.5), 400, ("top_k",)),
    ("seed 2**32", _completion(seed=2**32), 400, ("seed",)),
    ("seed 2**63", _completion(seed=2**63), 400, ("seed",)),
    ("seed -1", _completion(seed=-1), 400, ("seed",)),
    ("seed a string", _completion(seed="1"), 400, ("seed",)),
    ("max_tokens 2**70", _completion(max_tokens=2**70), 400, ("max_new_tokens", "context")),
    ("max_tokens 0", _completion(max_tokens=0), 400, ("max_tokens",)),
    ("temperature 1e400", '{"prompt": "hi", "temperature": 1e400}', 400, ("temperature",)),
    ("temperature NaN", '{"prompt": "hi", "temperature": NaN}', 400, ("temperature",)),
    ("temperature -1", _completion(temperature=-1), 400, ("temperature",)),
    ("top_p 0", _completion(top_p=0), 400, ("top_p",)),
    ("top_p NaN", '{"prompt": "hi", "top_p": NaN}', 400, ("top_p",)),
    ("logprobs 2**70", _completion(logprobs=2**70), 400, ("logprobs",)),
    ("logprobs -1", _completion(logprobs=-1), 400, ("logprobs",)),
    ("n 10**30", _completion(n=10**30), 400, ("n must be 1",)),
    ("stop: 5 strings", _completion(stop=list("abcde")), 400, ("stop",)),
    ("stop: a 1 MB string", _completion(stop="s" * (1 << 20)), 400, ("stop",)),
    ("stop: an empty string", _completion(stop=[""]), 400, ("stop",)),
    ("prompt token 2**40", _completion(prompt=[1, 2**40]), 400, ("token id",)),
    ("prompt token -1", _completion(prompt=[1, -1]), 400, ("token id",)),
    ("prompt: a lone surrogate", '{"prompt": "a\\ud800b"}', 400, ("prompt: not valid Unicode",)),
    ("prompt: 4 MB of text", _completion(prompt="word " * 800_000), 400, ("cannot fit the context",)),
    ("prompt: 1M token ids", _completion(prompt=[1] * 1_000_000), 400, ("exceeds the context",)),
    ("model: a 1 MB name", _completion(model="m" * (1 << 20)), 404, ("does not exist",)),
    ("JSON nested 100,000 deep", "[" * 100_000 + "]" * 100_000, 400, ("nests too deeply",)),
    ("JSON nested 100,000 deep in a field", '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", 400,
     ("nests too deeply",)),
    ("body not JSON", "{\"prompt\": \"hi\",", 400, ("not valid JSON",)),
    ("body not UTF-8", b'{"prompt": "\xff\xfe"}', 400, ("not valid JSON",)),
):
    case("server-load", _name)(_served(_post("/v1/completions", _body), _status, _names, longest=300))

for _name, _body, _names in (
    ("chat: a lone surrogate in a message", '{"messages": [{"role": "user", "content": "\\udc80"}]}',
     ("messages.0.content",)),
    ("chat: 4 MB of messages", json.dumps({"messages": [{"role": "user", "content": "word " * 800_000}]}),
     ("cannot fit the context",)),
    ("chat: 10,000 messages", json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "yo"}] * 5000
                                          + [{"role": "user", "content": "hi"}]}), ("context",)),
    ("chat: top_logprobs 2**70", json.dumps({"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                                             "top_logprobs": 2**70}), ("top_logprobs",)),
):
    case("server-load", _name)(_served(_post("/v1/chat/completions", _body), 400, _names, longest=300))


def _too_long_declared(b: Base) -> tuple[int, str]:
    """Content-Length 600 MB and only a few bytes: the 413 comes back without waiting for the rest."""
    return _exchange(_server(b), b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 600000000\r\n\r\n{")


def _too_long_chunked(b: Base) -> tuple[int, str]:
    """64 MB in 64 KB chunks with no length: the 413 comes once the server has read past 16 MB."""
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    return _exchange(_server(b), head, (b"10000\r\n" + b"x" * 65536 + b"\r\n" for _ in range(1024)))


def _gone_mid_body(b: Base) -> tuple[int, str]:
    """Ten clients that hang up halfway through their bodies, then a request that must be served."""
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    for _ in range(10):
        _exchange(_server(b), head, [b'{"prompt": "half'], hang_up=True)
    return _post("/v1/completions", _completion())(b)


def _bad_among_streams(b: Base) -> tuple[int, str]:
    """Three streams decoding and a top_k 2**31 request: the bad one is a 400, the streams end
    normally ([DONE], no error event)."""
    import httpx2 as httpx

    url = "http://%s:%d" % _server(b)
    with httpx.Client(timeout=120) as client:
        with contextlib.ExitStack() as streams:
            live = [streams.enter_context(client.stream("POST", url + "/v1/completions", json={
                "prompt": f"story {i}", "max_tokens": 30, "temperature": 0, "stream": True})) for i in range(3)]
            lines = [r.iter_lines() for r in live]
            for it in lines:
                next(it)
            bad = _post("/v1/completions", _completion(top_k=2**31, max_tokens=30))(b)
            ends = [[line for line in it if line.startswith("data: ")][-2:] for it in lines]
    if any(end[-1] != "data: [DONE]" or '"error"' in end[0] for end in ends):
        return -1, f"a stream ended {ends}"
    return bad


for _name, _call, _status, _names in (
    ("a bad request among 3 live streams", _bad_among_streams, 400, ("top_k",)),
    ("body: Content-Length 600 MB", _too_long_declared, 413, ("exceeds the limit",)),
    ("body: 64 MB chunked", _too_long_chunked, 413, ("exceeds the limit",)),
    ("10 clients gone mid-body", _gone_mid_body, 200, ()),
):
    case("server-load", _name)(_served(_call, _status, _names))


def _serve_cli(*argv: str, env: dict | None = None) -> Callable:
    """`python -m llama_jax.serve` parsed and built as its main does (up to listening), in this process."""
    def call(t, b):
        from llama_jax.serve.__main__ import _build, _parse

        old = {k: os.environ.get(k) for k in env or {}}
        os.environ.update(env or {})
        try:
            app, sock, _ = _build(_parse(["--checkpoint", b.converted, "--tokenizer", TOKENIZER, "--port", "0",
                                          "--no-warmup", *argv]))
            sock.close()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return call


case("server-load", "--max-batch 10**7")(_api(_serve_cli("--max-batch", str(10**7)), ("KV cache",)))
case("server-load", "--max-seq-len 10**9")(_api(_serve_cli("--max-seq-len", str(10**9)), ("max_seq_len",)))


def _get(path: str, authorization: str | None) -> Callable:
    def send(b: Base, key: str | None = None) -> tuple[int, str]:
        header = "" if authorization is None else f"Authorization: {authorization}\r\n"
        return _exchange(_server(b, key), f"GET {path} HTTP/1.1\r\nHost: x\r\n{header}\r\n".encode())
    return send


for _name, _path, _authorization, _status in (
    ("no Authorization", "/v1/models", None, 401),
    ("a wrong key", "/v1/models", "Bearer sk-sweep-2", 401),
    ("the key and one character more", "/v1/models", f"Bearer {SWEEP_KEY}x", 401),
    ("the key less its last character", "/v1/models", f"Bearer {SWEEP_KEY[:-1]}", 401),
    ("two spaces before the key", "/v1/models", f"Bearer  {SWEEP_KEY}", 401),
    ("Basic instead of Bearer", "/v1/models", f"Basic {SWEEP_KEY}", 401),
    ("Bearer and no key", "/v1/models", "Bearer", 401),
    ("the key without Bearer", "/v1/models", SWEEP_KEY, 401),
    ("the key in upper case", "/v1/models", f"Bearer {SWEEP_KEY.upper()}", 401),
    ("a 10 KB key", "/v1/models", "Bearer " + "k" * 10_000, 401),
    ("the right key", "/v1/models", f"Bearer {SWEEP_KEY}", 200),
    ("bearer in lower case", "/v1/models", f"bearer {SWEEP_KEY}", 200),
    ("/openapi.json without a key", "/openapi.json", None, 404),
    ("/openapi.json with the key", "/openapi.json", f"Bearer {SWEEP_KEY}", 404),
    ("/docs without a key", "/docs", None, 404),
    ("/health without a key", "/health", None, 200),
):
    case("server-auth", _name)(_served(_get(_path, _authorization), _status, (), key=SWEEP_KEY))

for _name, _argv, _env, _names in (
    ("--api-key ''", ["--api-key", ""], None, ("--api-key", "empty")),
    ("--api-key ' '", ["--api-key", " "], None, ("--api-key",)),
    ("--api-key with a trailing space", ["--api-key", "sk-1 "], None, ("--api-key",)),
    ("--api-key with a space inside", ["--api-key", "sk 1"], None, ("--api-key",)),
    ("--api-key with a tab", ["--api-key", "sk\t1"], None, ("--api-key",)),
    ("--api-key not ASCII", ["--api-key", "sk-\u00e9"], None, ("--api-key",)),
    ("$LLAMA_JAX_API_KEY empty", [], {"LLAMA_JAX_API_KEY": ""}, ("LLAMA_JAX_API_KEY",)),
    ("$LLAMA_JAX_API_KEY a space", [], {"LLAMA_JAX_API_KEY": " "}, ("LLAMA_JAX_API_KEY",)),
):
    case("server-auth", _name)(_api(_serve_cli(*_argv, env=_env), _names))

case("server-auth", "a 600 MB body without a key")(_served(
    lambda b, key: _exchange(_server(b, key), b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                              b"Content-Length: 600000000\r\n\r\n{"), 401, ("API key",), key=SWEEP_KEY))
case("server-auth", "a completion with the key")(_served(
    _post("/v1/completions", _completion(), f"Authorization: Bearer {SWEEP_KEY}\r\n"), 200, (), key=SWEEP_KEY))


# --- training: recipe -----------------------------------------------------------------------------


def _train(t: Path, *extra: str, names: tuple = (), status: int = 2, keep: tuple = (), out: str | None = None,
           **kw: Any) -> Run:
    """A training run; a new output_dir (out=None) must not exist after a refusal."""
    absent = (str(t / "run"),) if out is None and status == 2 else ()
    return Run("train", train_args(out or str(t / "run"), *extra, **kw), names, status=status, keep=keep,
               absent=absent)


for _key, _value in (
    ("optim.min_lr_ratio", "-1"), ("optim.min_lr_ratio", "1.5"), ("optim.b1", "2.0"), ("optim.b1", "-0.1"),
    ("optim.b2", "1.0"), ("optim.warmup_steps", "-1"), ("optim.warmup_ratio", "1.0"), ("optim.eps", "0"),
    ("optim.eps", "-1e-8"), ("optim.weight_decay", "-0.1"), ("optim.clip_norm", "-1"), ("optim.z_loss", "-1e-4"),
    ("optim.lr", "0"), ("optim.lr", ".nan"), ("optim.lr", ".inf"), ("steps", "-3"), ("steps", str(2**40)),
    ("epochs", "-1"), ("epochs", ".inf"), ("checkpoint_every", "0"), ("keep_checkpoints", "0"), ("log_every", "0"),
    ("seed", "-1"), ("seed", str(2**32)), ("seed", str(2**70)), ("batch_size", "0"), ("grad_accum", "0"),
    ("grad_accum", "3"), ("peak_tflops", "-1"), ("data.max_len", "1"), ("data.max_len", "100000"),
    ("mesh.data", "0"), ("mesh.fsdp", "-2"), ("mesh.tensor", "3"), ("mesh.dcn_data", "0"),
    ("eval.examples", "-1"), ("eval.max_new_tokens", "0"),
):
    case("train-recipe", f"{_key}={_value}")(lambda t, b, k=_key, v=_value: _train(
        t, f"{k}={v}", names=(k.split(".")[-1],)))

for _override, _names in (
    ("steps=ten", ("steps",)), ("optim.lr=abc", ("optim.lr",)), ("data.train=5", ("data.train",)),
    ("model.overrides=[1]", ("model.overrides",)), ("model.overrides={dtype: bfloat16}", ("dtype",)),
    ("model.overrides={n_heads: 5}", ("n_heads",)), ("model.overrides={dim: abc}", ("dim",)),
    ("model.overrides={norm_eps: -1}", ("norm_eps",)), ("model.overrides={rope_theta: .nan}", ("rope_theta",)),
    ("model.preset=llama-9b", ("llama-9b",)), ("optim=5", ("optim",)), ("unknown_key=1", ("unknown_key",)),
    ("optim.schedule=exponential", ("optim.schedule",)), ("model.remat=sometimes", ("model.remat",)),
    ("data.format=csv", ("data.format",)), ("noequals", ("noequals",)), ("steps=[", ("steps",)),
    ("tokenizer=/nonexistent/tok.model", ("tok.model",)),
):
    case("train-recipe", _override)(lambda t, b, o=_override, n=_names: _train(t, o, names=n))


def _recipe_file(content: bytes, names: tuple):
    def build(t, b):
        path = str(t / "recipe.yaml")
        write(path, content)
        return Run("train", ["--config", path], names, keep=(path,))
    return build


for _name, _content in (("not YAML", b"steps: [1, 2\n  bad: {"), ("not UTF-8", b"steps: 10\nseed: \xff\xfe\n"),
                        ("a list", b"- 1\n- 2\n"), ("deeply nested", b"[" * 20000 + b"]" * 20000),
                        ("tabs", b"steps:\t\t10\n\tx: 1\n"), ("empty", b"")):
    case("train-recipe", f"recipe file {_name}")(_recipe_file(_content, ("recipe.yaml", "steps", "data.train",
                                                                         "model.preset")))
case("train-recipe", "recipe file missing")(lambda t, b: Run("train", ["--config", str(t / "nope.yaml")], ("nope.yaml",)))


# --- training: data and inputs --------------------------------------------------------------------


def _data_file(t: Path, name: str, content: bytes) -> str:
    path = str(t / name)
    write(path, content)
    return path


for _name, _content, _fmt, _names in (
    ("alpaca record not an object", b'[{"instruction": "a", "output": "b"}, 5]', "alpaca", ("[1]",)),
    ("alpaca record without output", b'[{"instruction": "a"}]', "alpaca", ("[0]",)),
    ("alpaca output a number", b'[{"instruction": "a", "output": 5}]', "alpaca", ("[0]",)),
    ("alpaca input a list", b'[{"instruction": "a", "input": [], "output": "b"}]', "alpaca", ("[0]",)),
    ("alpaca nested objects", b'[{"instruction": {"a": {"b": 1}}, "output": "b"}]', "alpaca", ("[0]",)),
    ("alpaca an empty list", b"[]", "alpaca", ("no training examples",)),
    ("alpaca not UTF-8 inside a string", b'[{"instruction": "caf\xe9", "output": "b"}]', "alpaca", ("data.json",)),
    ("alpaca fewer rows than a batch", b'[{"instruction": "a", "output": "b"}]', "alpaca", ("batch_size",)),
    ("chat dialog not a list", b'[{"messages": "hi"}]', "chat", ("[0]",)),
    ("chat unknown role", b'[[{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]]', "chat", ("[0]",)),
    ("chat content a number", b'[[{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]]', "chat", ("[0]",)),
    ("chat [INST] in a message", b'[[{"role": "user", "content": "[INST]"}, {"role": "assistant", "content": "y"}]]',
     "chat", ("[0]",)),
    ("chat message not an object", b'[["hello", "there"]]', "chat", ("[0]",)),
    ("pretrain text not UTF-8", b"good text\n\nbad \xff\xfe text\n", "pretrain", ("data.json",)),
    ("pretrain empty", b"", "pretrain", ("data.json",)),
):
    @case("train-data", _name)
    def _(t, b, content=_content, fmt=_fmt, names=_names):
        data = _data_file(t, "data.json", content)
        extra = ("data.max_len=80",) if fmt != "pretrain" else ()
        return Run("train", train_args(str(t / "run"), *extra, data=data, fmt=fmt), names, keep=(data,),
                   absent=(str(t / "run"),))


for _name, _content, _names in (
    ("jsonl line not JSON", b'{"text": "a b c"}\n{"text": \n', ("data.jsonl:2",)),
    ("jsonl line without the text key", b'{"text": "a"}\n{"body": "b"}\n', ("data.jsonl:2",)),
    ("jsonl line a list", b'[1, 2]\n', ("data.jsonl:1",)),
    ("jsonl text a number", b'{"text": 5}\n', ("data.jsonl:1",)),
    ("jsonl not UTF-8", b'{"text": "ok"}\n{"text": "\xff"}\n', ("data.jsonl:2",)),
    ("jsonl deeply nested line", b"[" * 100000 + b"]" * 100000 + b"\n", ("data.jsonl:1",)),
):
    @case("train-data", _name)
    def _(t, b, content=_content, names=_names):
        data = _data_file(t, "data.jsonl", content)
        return Run("train", train_args(str(t / "run"), data=data), names, keep=(data,), absent=(str(t / "run"),))


case("train-data", "data file missing")(lambda t, b: _train(t, names=("nope.txt",), data=str(t / "nope.txt")))
case("train-data", "data path is a folder")(lambda t, b: _train(t, names=(str(t),), data=str(t)))
case("train-data", "eval record without output")(lambda t, b: (
    _data_file(t, "eval.json", b'[{"instruction": "a"}]'),
    _train(t, f"eval.data={t / 'eval.json'}", names=("eval.json[0]",)))[1])
case("train-data", "eval data missing")(lambda t, b: _train(t, f"eval.data={t / 'nope.json'}", names=("nope.json",)))


# --- preference tuning: pairs, reward models, rejection sampling ------------------------------------

GOOD_PAIR = b'{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}\n'
for _name, _content, _names in (
    ("pair without rejected", GOOD_PAIR + b'{"prompt": "Hi", "chosen": "Hello."}\n', ("pairs.jsonl:2",)),
    ("pair margin not a number", b'{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}\n',
     ("pairs.jsonl:1",)),
    ("pair dialogs differ before the answers",
     b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: c\\n\\nAssistant: d"}\n',
     ("pairs.jsonl:1",)),
    ("pair with neither prompt nor HH dialog", b'{"chosen": "b", "rejected": "c"}\n', ("pairs.jsonl:1",)),
    ("pair prompt a number", b'{"prompt": 7, "chosen": "b", "rejected": "c"}\n', ("pairs.jsonl:1",)),
):
    @case("preference", _name)
    def _(t, b, content=_content, names=_names):
        data = _data_file(t, "pairs.jsonl", content)
        return Run("train", train_args(str(t / "run"), "objective=dpo", "data.max_len=64", data=data, fmt="preference"),
                   names, keep=(data,), absent=(str(t / "run"),))


case("preference", "objective dpo on alpaca data")(lambda t, b: _train(
    t, "objective=dpo", names=("data.format",), data=str(ROOT / "data" / "demo_alpaca_train.json"), fmt="alpaca"))
case("preference", "preference data with objective sft")(lambda t, b: _train(
    t, names=("data.format",), data=str(ROOT / "data" / "demo_preference_eval.json"), fmt="preference"))
case("preference", "reward objective with lora")(lambda t, b: _train(
    t, "objective=reward", "lora.rank=4", f"init_from={b.ckpt}", names=("lora.rank",),
    data=str(ROOT / "data" / "demo_preference_eval.json"), fmt="preference"))


def _reward_model(t: Path, b: Base) -> str:
    import llama_jax as lj
    from llama_jax import reward

    cfg, params = lj.load_checkpoint(b.ckpt)
    path = str(t / "rm")
    lj.save_checkpoint(path, cfg, reward.from_lm(params, cfg), head="reward")
    return path


def _exit_of(main: Callable, argv: list) -> Callable:
    def call() -> None:
        status = main(argv)
        if status:
            raise SystemExit(status)
    return call


@case("preference", "reward model loaded as a language model")
def _(t, b):
    import llama_jax as lj

    rm = _reward_model(t, b)
    return Run("api", call=lambda: lj.load_checkpoint(rm), names=("is a reward model",), keep=(rm,))


@case("preference", "generate with a reward model")
def _(t, b):
    rm = _reward_model(t, b)
    return Run("llama_jax.generate", ["--checkpoint", rm, "--tokenizer", TOKENIZER, "--prompt", "hi",
                                      "--max-new-tokens", "2"], ("is a reward model",), keep=(rm,))


@case("preference", "eval reward on a language model")
def _(t, b):
    from llama_jax.eval.__main__ import main

    argv = ["reward", "--checkpoint", b.ckpt, "--tokenizer", TOKENIZER, "--data",
            str(ROOT / "data" / "demo_preference_eval.json")]
    return Run("api", call=_exit_of(main, argv), names=("not a reward model",), keep=(b.ckpt,))


@case("preference", "eval reward pairs file missing")
def _(t, b):
    from llama_jax.eval.__main__ import main

    rm = _reward_model(t, b)
    argv = ["reward", "--checkpoint", rm, "--tokenizer", TOKENIZER, "--data", str(t / "nope.jsonl")]
    return Run("api", call=_exit_of(main, argv), names=("nope.jsonl",), keep=(rm,))


@case("preference", "rejection sampling prompt without its field")
def _(t, b):
    from train.rejection_sample.__main__ import main

    rm = _reward_model(t, b)
    prompts = _data_file(t, "prompts.jsonl", b'{"prompt": "Hi"}\n{"question": "what?"}\n')
    out = str(t / "out.jsonl")
    argv = ["--policy", b.ckpt, "--reward", rm, "--tokenizer", TOKENIZER, "--prompts", prompts, "--k", "2",
            "--output", out, "--max-new-tokens", "2"]
    return Run("api", call=_exit_of(main, argv), names=("prompts.jsonl:2",), keep=(prompts, rm), absent=(out,))


@case("preference", "rejection sampling with a language model as the reward model")
def _(t, b):
    from train.rejection_sample.__main__ import main

    prompts = _data_file(t, "prompts.jsonl", b'{"prompt": "Hi"}\n')
    out = str(t / "out.jsonl")
    argv = ["--policy", b.ckpt, "--reward", b.ckpt, "--tokenizer", TOKENIZER, "--prompts", prompts, "--k", "2",
            "--output", out, "--max-new-tokens", "2"]
    return Run("api", call=_exit_of(main, argv), names=("not a reward model",), keep=(prompts,), absent=(out,))


def _init_from(make: Callable, names: tuple, *extra: str):
    def build(t, b):
        ckpt = make(t, b)
        return _train(t, f"init_from={ckpt}", "model.preset=null", *extra, names=names,
                      keep=(ckpt,) if os.path.exists(ckpt) else ())
    return build


for _name, _make, _names, _extra in (
    ("init_from missing", lambda t, b: str(t / "nope"), ("nope",), ()),
    ("init_from a file", lambda t, b: (write(str(t / "f"), "x"), str(t / "f"))[1], ("f",), ()),
    ("init_from an HF folder", lambda t, b: copy(b.hf, t / "hf"), ("config.json",), ()),
    ("init_from damaged", lambda t, b: (copy(b.converted, t / "c"), flip(largest(str(t / "c" / "params"))), str(t / "c"))[-1],
     ("checksum mismatch",), ()),
    # (overrides of the checkpoint's shape fields are named and not applied: the checkpoint gives the architecture)
    ("init_from with an invalid override", lambda t, b: copy(b.converted, t / "c"), ("rope_theta",),
     ("model.overrides={rope_theta: -1}",)),
    ("init_from config.json garbage", lambda t, b: (copy(b.converted, t / "c"), write(str(t / "c" / "config.json"), b"{"),
                                                    str(t / "c"))[-1], ("config.json",), ()),
):
    case("train-inputs", _name)(_init_from(_make, _names, *_extra))


@case("train-inputs", "output_dir is a converted checkpoint")
def _(t, b):
    out = copy(b.converted, t / "ckpt")
    return _train(t, names=("is a checkpoint",), out=out, keep=(out,))


@case("train-inputs", "output_dir is a file")
def _(t, b):
    write(str(t / "file"), "x")
    return _train(t, names=("is a file",), out=str(t / "file"), keep=(str(t / "file"),))


@case("train-inputs", "output_dir is an HF folder")
def _(t, b):
    out = copy(b.hf, t / "hf")
    return _train(t, names=("not a llama_jax run",), out=out, keep=(out,))


for _change, _names in (("optim.clip_norm=0.5", ("optim.clip_norm: 1.0 -> 0.5",)),
                        ("model.overrides={rope_theta: 500000.0}", ("rope_theta",)),
                        ("model.overrides={norm_eps: 1.0e-6}", ("norm_eps",)),
                        ("model.overrides={max_seq_len: 128}", ("max_seq_len",)),
                        ("batch_size=16", ("batch_size: 8 -> 16",)), ("seed=7", ("seed: 0 -> 7",)),
                        ("model.dtype=bfloat16", ("model.dtype",))):
    @case("train-resume", f"resume with {_change}")
    def _(t, b, change=_change, names=_names):
        run = copy(b.run, t / "run")
        return _train(t, "steps=3", "checkpoint_every=1", change, names=names, out=run, keep=(run,))


@case("train-resume", "train_config.yaml damaged")
def _(t, b):
    run = copy(b.run, t / "run")
    write(os.path.join(run, "train_config.yaml"), b"steps: [\xff")
    return _train(t, "steps=3", "checkpoint_every=1", names=("train_config.yaml",), out=run, keep=(run,))


@case("train-resume", "config.json of the run damaged")
def _(t, b):
    run = copy(b.run, t / "run")
    write(os.path.join(run, "config.json"), b"{\"format\": ")
    return _train(t, "steps=3", "checkpoint_every=1", names=("config.json",), out=run, keep=(run,))


@case("train-resume", "every step damaged")
def _(t, b):
    run = copy(b.run, t / "run")
    for step in ("1", "2"):
        flip(largest(os.path.join(run, step, "params")))
    return _train(t, "steps=3", "checkpoint_every=1", names=("damaged",), out=run, keep=(run,))


@case("train-resume", "a live run holds the folder")
def _(t, b):
    run = copy(b.run, t / "run")
    lock = os.path.join(run, "run.lock")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, json, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps("
                               "{'pid': os.getpid(), 'host': 'here'}).encode()); print('locked', flush=True); "
                               "time.sleep(600)", lock], stdout=subprocess.PIPE)
    holder.stdout.readline()
    _HOLDERS.append((holder, lock))
    return _train(t, "steps=3", names=(f"pid {holder.pid}",), out=run)


@case("train-resume", "the data file changed since the run started")
def _(t, b):
    run = copy(b.run, t / "run")
    data = _data_file(t, "data.txt", (ROOT / "data" / "demo_pretrain.txt").read_bytes()[:20000])
    recipe = os.path.join(run, "train_config.yaml")
    with open(recipe) as f:
        text = f.read().replace(str(ROOT / "data" / "demo_pretrain.txt"), data)
    write(recipe, text)
    return _train(t, "steps=3", "checkpoint_every=1", names=("rows",), out=run, keep=(run,), data=data)


def _resume_ok(prepare: Callable, names: tuple):
    def build(t, b):
        run = copy(b.run, t / "run")
        prepare(run)
        return _train(t, "steps=3", "checkpoint_every=1", names=names, status=0, out=run)
    return build


for _name, _prepare, _names in (
    ("metrics.jsonl not UTF-8 is resumed with a note", lambda r: open(os.path.join(r, "metrics.jsonl"), "ab").write(
        b"\xff\xfe garbage\n"), ("metrics.jsonl",)),
    ("metrics.jsonl with a JSON list line is resumed with a note", lambda r: open(os.path.join(r, "metrics.jsonl"), "ab").write(
        b"[1, 2]\n"), ("metrics.jsonl",)),
    ("newest step damaged: set aside, previous resumed", lambda r: flip(largest(os.path.join(r, "2", "params"))),
     ("could not be restored",)),
    ("a dead run's lock is taken over", lambda r: write(os.path.join(r, "run.lock"), json.dumps(
        {"pid": _dead_pid(), "host": os.uname().nodename})), ("took over",)),
    ("leftovers of a killed run are removed", lambda r: (write(os.path.join(r, f"config.json.tmp-{_dead_pid()}"), "{"),
                                                         os.makedirs(os.path.join(r, "9.orbax-checkpoint-tmp-5"))),
     ("removed",)),
):
    case("train-resume", _name)(_resume_ok(_prepare, _names))


# --- the offline tokenizer (python -m train.tokenize): racing runs, --output paths, sizes, inputs ----------


def _doc_file(t: Path, name: str = "docs.txt", n: int = 40) -> str:
    """A small plain-text corpus: `n` blank-line separated documents of the tokenizer's words."""
    words = (ROOT / "data" / "tokenizer_corpus.txt").read_text().split()
    return _data_file(t, name, "\n\n".join(" ".join(words[i * 7: i * 7 + 30]) for i in range(n)).encode())


def _tok(out: Any, *inputs: str, fmt: str = "text", names: tuple = (), status: int = 2, keep: tuple = (),
         absent: tuple = (), extra: tuple = (), check: Callable | None = None) -> Run:
    return Run("train.tokenize", ["--tokenizer", TOKENIZER, "--format", fmt, "--workers", "1", "--no-progress",
                                  "--shard-tokens", "1024", *extra, "--output", str(out), *inputs],
               names, status, keep=keep, absent=absent, check=check)


def _tokenized(t: Path, name: str, src: str) -> str:
    """A finished tokenized folder of the text file `src` (as _tok's settings make it)."""
    from train.data.pretokenize import tokenize

    out = str(t / name)
    with contextlib.redirect_stderr(io.StringIO()):
        tokenize(TOKENIZER, "text", [src], out, workers=1, shard_tokens=1024, progress=False)
    return out


def _tok_holder(lock: Path) -> subprocess.Popen:
    """A live process holding `lock` as a running tokenizer would (an flock, its pid in the file)."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, json, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps("
                               "{'pid': os.getpid(), 'host': 'here', 'command': 'python -m train.tokenize'}).encode()); "
                               "print('locked', flush=True); time.sleep(600)", str(lock)], stdout=subprocess.PIPE)
    holder.stdout.readline()
    _HOLDERS.append((holder, lock))
    return holder


@case("tokenize-race", "a live run holds the folder")
def _(t, b):
    os.makedirs(t / "out")
    holder = _tok_holder(t / "out" / "tokenize.lock")
    return _tok(t / "out", _doc_file(t), names=(f"folder {t / 'out'} is in use by pid {holder.pid}",),
                keep=(str(t / "out"),))


@case("tokenize-race", "a live run holds a finished folder")
def _(t, b):
    src = _doc_file(t)
    out = _tokenized(t, "out", src)
    holder = _tok_holder(Path(out) / "tokenize.lock")
    return _tok(out, _doc_file(t, "other.txt", 30), names=(f"pid {holder.pid}",), keep=(out,))


@case("tokenize-race", "a finished run of other inputs")
def _(t, b):
    out = _tokenized(t, "out", _doc_file(t))
    return _tok(out, _doc_file(t, "other.txt", 30), names=("other inputs",), keep=(out,))


@case("tokenize-race", "a finished run of the same inputs: nothing to do")
def _(t, b):
    src = _doc_file(t)
    out = _tokenized(t, "out", src)
    return _tok(out, src, names=("nothing to do",), status=0, keep=(out,))


@case("tokenize-race", "a dead run's lock is taken over")
def _(t, b):
    os.makedirs(t / "out")
    write(str(t / "out" / "tokenize.lock"), json.dumps({"pid": _dead_pid(), "host": os.uname().nodename}))
    return _tok(t / "out", _doc_file(t), names=("took over",), status=0)


@case("tokenize-race", "a killed run's half shard is removed, the run finishes")
def _(t, b):
    src = _doc_file(t, n=200)
    done = _tokenized(t, "done", src)
    os.makedirs(t / "out")
    copy_file = (Path(done) / "shard-00000.bin").read_bytes()
    write(str(t / "out" / "shard-00000.bin"), copy_file)
    write(str(t / "out" / f"shard-00001.bin.tmp-{_dead_pid()}"), copy_file[:5000])
    write(str(t / "out" / "tokenize.lock"), json.dumps({"pid": _dead_pid(), "host": os.uname().nodename}))
    return _tok(t / "out", src, names=("took over",), status=0,
                check=lambda out, err: None if snapshot(str(t / "out")) == snapshot(done) else "differs from a whole run")


@case("tokenize-race", "an unfinished run of other inputs is replaced, with a note")
def _(t, b):
    done = _tokenized(t, "done", _doc_file(t, "other.txt", 200))
    os.makedirs(t / "out")
    for name in ("shard-00000.bin", "shard-00001.bin"):
        write(str(t / "out" / name), (Path(done) / name).read_bytes())
    return _tok(t / "out", _doc_file(t), names=("removed 2 shard(s) of an unfinished run",), status=0)


@case("tokenize-output", "--output is the input file")
def _(t, b):
    src = _doc_file(t)
    return _tok(src, src, names=(f"--output {src} is an input of this run",), keep=(src,))


for _fmt, _name, _content in (("jsonl", "docs.jsonl", b'{"text": "a b c"}\n'),
                              ("alpaca", "data.json", b'[{"instruction": "a", "output": "b"}]'),
                              ("chat", "chat.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n')):
    @case("tokenize-output", f"--output is the input file ({_fmt})")
    def _(t, b, fmt=_fmt, name=_name, content=_content):
        src = _data_file(t, name, content)
        return _tok(src, src, fmt=fmt, names=(f"--output {src} is an input of this run",), keep=(src,))


@case("tokenize-output", "--output is the second of two inputs")
def _(t, b):
    first, second = _doc_file(t), _doc_file(t, "more.txt", 10)
    return _tok(second, first, second, names=(f"--output {second} is an input",), keep=(first, second))


@case("tokenize-output", "--output is another file")
def _(t, b):
    other = _data_file(t, "notes.txt", b"my notes")
    return _tok(other, _doc_file(t), names=(f"--output {other} is a file",), keep=(other,))


@case("tokenize-output", "--output is a link to the input file")
def _(t, b):
    src = _doc_file(t)
    os.symlink(src, t / "link")
    return _tok(t / "link", src, names=("is an input of this run",), keep=(src, str(t / "link")))


@case("tokenize-output", "--output is a broken link")
def _(t, b):
    os.symlink(t / "nowhere", t / "link")
    return _tok(t / "link", _doc_file(t), names=("is a broken link",), absent=(str(t / "nowhere"),))


@case("tokenize-output", "--output under a file")
def _(t, b):
    src = _doc_file(t)
    return _tok(f"{src}/tokens", src, names=(f"{src} is a file",), keep=(src,))


@case("tokenize-output", "--output two folders under a file")
def _(t, b):
    src = _doc_file(t)
    return _tok(f"{src}/a/b", src, names=(f"{src} is a file",), keep=(src,))


@case("tokenize-output", "--output under another file")
def _(t, b):
    other = _data_file(t, "notes.txt", b"my notes")
    return _tok(f"{other}/tokens", _doc_file(t), names=(f"{other} is a file",), keep=(other,))


@case("tokenize-output", "--output is the folder holding the input")
def _(t, b):
    os.makedirs(t / "data")
    src = _doc_file(t / "data")
    return _tok(t / "data", src, names=(f"contains the source {src}",), keep=(str(t / "data"),))


@case("tokenize-output", "--output is two folders above the input")
def _(t, b):
    os.makedirs(t / "a" / "b")
    src = _doc_file(t / "a" / "b")
    return _tok(t / "a", src, names=("contains the source",), keep=(str(t / "a"),))


@case("tokenize-output", "--output is the input's folder through a link")
def _(t, b):
    os.makedirs(t / "data")
    src = _doc_file(t / "data")
    os.symlink(t / "data", t / "link")
    return _tok(t / "link", src, names=("contains the source",), keep=(str(t / "data"),))


@case("tokenize-output", "--output is a converted checkpoint")
def _(t, b):
    out = copy(b.converted, t / "ckpt")
    return _tok(out, _doc_file(t), names=("holds files this command does not write",), keep=(out,))


@case("tokenize-output", "--output holds a README")
def _(t, b):
    os.makedirs(t / "out")
    write(str(t / "out" / "README.md"), "# my tokens\n")
    return _tok(t / "out", _doc_file(t), names=("README.md",), keep=(str(t / "out"),))


@case("tokenize-output", "--output of another data set with --overwrite is replaced")
def _(t, b):
    out = _tokenized(t, "out", _doc_file(t, "other.txt", 30))
    return _tok(out, _doc_file(t), status=0, extra=("--overwrite",))


@case("tokenize-output", "--output is empty")
def _(t, b):
    return _tok("", _doc_file(t), names=("--output is empty",))


for _flag, _value, _names in (("--shard-tokens", str(2**40), ("--shard-tokens must be",)),
                              ("--shard-tokens", str(2**31), ("--shard-tokens must be",)),
                              ("--shard-tokens", "1023", ("--shard-tokens must be",)),
                              ("--shard-tokens", "0", ("--shard-tokens must be",)),
                              ("--shard-tokens", "-1", ("--shard-tokens must be",)),
                              ("--shard-tokens", "1e6", ("--shard-tokens",)),
                              ("--workers", "0", ("--workers must be",)),
                              ("--workers", "-1", ("--workers must be",)),
                              ("--workers", "100000", ("--workers must be",)),
                              ("--workers", str(2**70), ("--workers must be",)),
                              ("--workers", "two", ("--workers",))):
    @case("tokenize-size", f"{_flag} {_value}")
    def _(t, b, flag=_flag, value=_value, names=_names):
        src = _doc_file(t)
        run = _tok(t / "out", src, names=names, keep=(src,), absent=(str(t / "out"),))
        run.argv += [flag, value]  # after the defaults: argparse keeps the last
        return run


@case("tokenize-size", "a JSON line over 64 MiB")
def _(t, b):
    src = _data_file(t, "big.jsonl", b'{"text": "fine"}\n{"text": "' + b"ab " * (22 << 20) + b'"}\n')
    return _tok(t / "out", src, fmt="jsonl", names=(f"{src}:2: a line longer than 64 MiB",), keep=(src,),
                absent=(str(t / "out"),))


@case("tokenize-size", "64 Mi characters of text without a space")
def _(t, b):
    src = _data_file(t, "blob.txt", b"a short one\n\n" + b"x" * ((64 << 20) + 10))
    return _tok(t / "out", src, names=(f"{src} document 1: more than",), keep=(src,), absent=(str(t / "out"),))


def _one_document(out: str, err: str) -> str | None:
    summary = json.loads(out.strip().splitlines()[-1])
    return None if summary["docs"] == 1 and summary["tokens"] > 500_000 else f"summary {summary}"


@case("tokenize-size", "a 3 MB single-line document is tokenized")
def _(t, b):
    words = (ROOT / "data" / "tokenizer_corpus.txt").read_text().split()
    src = _data_file(t, "line.txt", " ".join(words[i % len(words)] for i in range(550_000)).encode())
    return _tok(t / "out", src, status=0, keep=(src,), check=_one_document)


for _name, _content, _fmt, _names in (
    ("a lone high surrogate escape in a JSON line", b'{"text": "ok"}\n{"text": "a \\ud800 b"}\n', "jsonl",
     (":2: field 'text': a lone surrogate",)),
    ("a lone low surrogate escape in an alpaca output", b'{"instruction": "a", "output": "\\uDC01"}\n', "alpaca",
     (":1: field 'output': a lone surrogate",)),
    ("a lone surrogate escape in a chat message", b'{"messages": [{"role": "user", "content": "x\\ud83d"}]}\n',
     "chat", (":1: field 'messages[0].content'",)),
    ("a JSON line that is not UTF-8", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', "jsonl", (":2: not UTF-8",)),
    ("a JSON line that is not JSON", b'{"text": "ok"}\n\n{"text": \n', "jsonl", (":3: not valid JSON",)),
    ("a JSON line without the text field", b'{"body": "ok"}\n', "jsonl", (":1: field 'text' is missing",)),
    ("a text file that is not UTF-8", b"fine\n\n\xff\xfe broken\n", "text", ("not UTF-8",)),
):
    @case("tokenize-input", _name)
    def _(t, b, content=_content, fmt=_fmt, names=_names):
        src = _data_file(t, "data.jsonl" if fmt != "text" else "data.txt", content)
        return _tok(t / "out", src, fmt=fmt, names=tuple(src + n if n.startswith(":") else n for n in names),
                    keep=(src,), absent=(str(t / "out"),))


@case("tokenize-input", "an input that does not exist")
def _(t, b):
    return _tok(t / "out", str(t / "missing.txt"), names=(str(t / "missing.txt"),), absent=(str(t / "out"),))


@case("tokenize-input", "a glob that matches nothing")
def _(t, b):
    return _tok(t / "out", str(t / "*.jsonl"), fmt="jsonl", names=("matches no file",), absent=(str(t / "out"),))


# --- the sweep -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", action="append", help="only these families (repeatable)")
    parser.add_argument("--name", default=None, help="only cases whose name contains this")
    parser.add_argument("--subprocess", action="store_true", help="each CLI case as a real `python -m` process")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--pass-rate", type=float, default=0.97)
    parser.add_argument("--scratch", default=None, help="folder for the cases (default: a temporary one)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case's message")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if (not args.family or c.family in args.family) and (not args.name or args.name in c.name)]
    if args.list:
        for c in cases:
            print(f"{c.family:16s} {c.name}")
        print(f"{len(cases)} cases")
        return 0
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="faults-"))
    print(f"building the base model files in {scratch / 'base'} ...", flush=True)
    shutil.rmtree(scratch / "base", ignore_errors=True)
    base = Base(scratch / "base")
    results = []
    try:
        for c in cases:
            r = run_case(c, base, scratch / "cases", args.subprocess)
            results.append(r)
            mark = "ok  " if r.ok else "FAIL"
            if args.verbose or not r.ok:
                print(f"{mark} {c.family:16s} {c.name}: {r.problem or r.message}", flush=True)
    finally:
        for holder, _ in _HOLDERS:
            holder.kill()
            holder.wait()
    families: dict[str, list[int]] = {}
    for r in results:
        families.setdefault(r.case.family, [0, 0])[0 if r.ok else 1] += 1
    print("\nfamily            passed  failed")
    for family, (good, bad) in families.items():
        print(f"{family:16s} {good:7d} {bad:7d}")
    passed = sum(r.ok for r in results)
    print(f"{'total':16s} {passed:7d} {len(results) - passed:7d}   ({passed / max(len(results), 1):.1%})")
    if not args.scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if passed >= args.pass_rate * len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
