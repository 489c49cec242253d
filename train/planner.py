"""Will it fit? Compile the sharded training step for a real TPU topology on any machine.

With `libtpu` installed, `jax.experimental.topologies` gives compile-only devices of a TPU slice
that this machine does not own; XLA then compiles the real SPMD program for them, exactly as
the pod would, and reports its per-chip memory and FLOPs. The step compiled is the training
loop's own: `train.step.make_train_step` with the recipes' optimizer (global-norm clipping, then
AdamW with the no-decay mask for RMSNorm weights and a warmup + cosine schedule; defaults of
`train.config.OptimConfig`), the loop's state and batch shardings, and the state donated.
Params, grads and both moments are float32, compute bfloat16, with the chosen remat policy and
`--grad-accum` microbatches. The largest batch is found by compiling a second batch size and
extrapolating the per-row memory linearly (printed as an estimate). The command line is train/plan.py.
With `lora_rank > 0` the step is the LoRA one: fp32 adapters, their grads and moments, and the
frozen base as a separate argument stored as bfloat16, float32, int8 or nf4 (QLoRA).
Preference objectives (`objective` dpo | orpo | simpo | reward) compile the pair step: two sequences
per batch row (chosen and rejected), a margin, and for DPO the reference log-probs as inputs; DPO's
reference pass (train/reference.py: the starting model scores every pair once, before training) is
compiled too and reported beside the step, since it must fit as well.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from llama_jax import flops, lora
from llama_jax.config import PROJECTIONS, LlamaConfig
from sharding import CHIPS, Chip, batch_groups, batch_sharding, make_mesh, tree_shardings
from sharding.hardware import GiB, TPU_GENERATIONS
from train import step as step_lib
from train.config import DEFAULT_BETA, OBJECTIVES, OptimConfig
from train.objectives import make_reference_fn


def _torus(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU slice shapes: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8 ... (v4/v5p); 2x2, 2x4, 4x4 ... (v5e)."""
    if chips == 1:
        return (1,) * dims
    shape = [2, 2, 1] if dims == 3 else [2, 2]
    while math.prod(shape) < chips:
        smallest = min(shape)
        shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
    if math.prod(shape) != chips:
        raise ValueError(f"{chips} chips is not a Cloud TPU slice size")
    return tuple(shape)


def parse_topology(name: str) -> tuple[Chip, str, int]:
    """'v5p-128' or 'v5p:4x4x4' -> (chip, libtpu topology name, number of chips)."""
    match = re.fullmatch(rf"({'|'.join(TPU_GENERATIONS)})([-:])([0-9x]+)", name.strip().lower())
    if not match:
        raise ValueError(f"unknown TPU topology {name!r}: expected e.g. v5p-128, v4-8, v5e-8, v6e-16 "
                         f"or v5p:4x4x4 (generations: {', '.join(TPU_GENERATIONS)})")
    generation, sep, size = match.groups()
    chip = CHIPS[generation]
    if sep == ":":
        shape = tuple(int(s) for s in size.split("x"))
        if len(shape) != chip.torus_dims:
            raise ValueError(f"topology {name!r}: {generation} needs {chip.torus_dims} dimensions like "
                             f"{'2x2x1' if chip.torus_dims == 3 else '2x4'}")
    else:
        if "x" in size or int(size) % chip.cores_in_name:
            raise ValueError(f"topology {name!r}: the number after '-' must be a multiple of {chip.cores_in_name}")
        shape = _torus(int(size) // chip.cores_in_name, chip.torus_dims)
    return chip, f"{generation}:{'x'.join(map(str, shape))}", math.prod(shape)


@contextlib.contextmanager
def _held_stderr() -> Iterator[None]:
    """Hold what C++ code writes to file descriptor 2; show it only if the block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def tpu_devices(topology: str) -> tuple[Chip, list[Any]]:
    """Compile-only devices of a TPU slice (needs the libtpu package, no TPU)."""
    try:
        import libtpu  # noqa: F401  (only to give a clear error when it is missing)
    except ImportError:
        raise RuntimeError("planning for TPU needs the libtpu package: pip install libtpu "
                           "(the version jax[tpu] pins)") from None
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no TPU to guard
    chip, name, chips = parse_topology(topology)
    with _held_stderr():  # libtpu's start-up lines (E0000 ... worker hostname) read like failures here
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name=chip.chip_config,
                                            chips_per_host_bounds=(2, 2, 1) if chips > 1 else (1, 1, 1),
                                            num_slices=1)
    if len(desc.devices) != chips:
        raise RuntimeError(f"libtpu made {len(desc.devices)} devices for {name}, expected {chips}")
    return chip, list(desc.devices)


# --- the step that is compiled ------------------------------------------------------------


@dataclasses.dataclass
class Compiled:
    batch: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    xla_flops: float  # per chip, XLA's cost analysis (it counts the scanned layer body once)
    oom: bool = False  # XLA refused: temporaries alone exceed HBM (temp_bytes from its message)

    @property
    def peak_bytes(self) -> int:
        """What must be resident at once: inputs, outputs not written in place, scratch, code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def _bytes_per_device(shapes: Any, shardings: Any) -> int:
    return sum(math.prod(sh.shard_shape(s.shape)) * np.dtype(s.dtype).itemsize
               for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


PLAN_STEPS = 1000  # the schedule's length; it changes the learning rate, not the program's memory


def lower_step(cfg: Any, mesh: Mesh, batch: int, seq: int, grad_accum: int = 1,
               base_dtype: str = "bfloat16", objective: str = "sft") -> tuple[Any, dict]:
    """Lower train.step's sharded step for `mesh` exactly as train.loop builds it.

    Returns the jax Lowered object and the per-chip bytes of params (the trained ones) /
    optimizer state / batch, and for LoRA of the frozen base (stored as `base_dtype`).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {OBJECTIVES}, got {objective!r}")
    if batch % grad_accum or (batch // grad_accum) % batch_groups(mesh):
        raise ValueError(f"--batch {batch} must split into --grad-accum {grad_accum} microbatches each divisible "
                         f"by data x fsdp = {batch_groups(mesh)}")
    o = OptimConfig()
    warmup = step_lib.warmup_steps_for(PLAN_STEPS, o.warmup_steps, o.warmup_ratio)
    schedule = step_lib.lr_schedule(o.lr, PLAN_STEPS, o.schedule, warmup, o.min_lr_ratio)
    optimizer = step_lib.make_optimizer(schedule, o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm)
    step = step_lib.make_train_step(cfg, optimizer, schedule, mesh, (batch, seq), grad_accum, o.z_loss, base_dtype,
                                    objective=objective, beta=DEFAULT_BETA.get(objective, 0.0))

    shardings = step_lib.state_shardings(cfg, optimizer, mesh, objective)
    shapes = jax.eval_shape(lambda p: step_lib.init_state(p, optimizer), step_lib.trainable_layout(cfg, objective)[1])
    batch_sds = _batch(objective, batch, seq, mesh)
    sizes = {"params": _bytes_per_device(shapes["params"], shardings["params"]),
             "optimizer": _bytes_per_device(shapes["opt_state"], shardings["opt_state"]),
             "batch": _bytes_per_device(batch_sds, jax.tree.map(lambda s: s.sharding, batch_sds))}
    args = [placed(shapes, shardings), batch_sds]
    if cfg.lora_rank:
        base_axes, base_shapes = lora.base_layout(cfg, base_dtype)
        base_shardings = tree_shardings(base_axes, base_shapes, mesh)
        sizes["base"] = _bytes_per_device(base_shapes, base_shardings)
        args.append(placed(base_shapes, base_shardings))
    with jax.set_mesh(mesh):
        return step.lower(*args), sizes


def placed(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _batch(objective: str, batch: int, seq: int, mesh: Mesh) -> dict:
    """The loop's global batch (train.step.batch_layout) placed as the loop places it: rows split over data x fsdp."""
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_sharding(mesh, len(s.shape)))
            for k, s in step_lib.batch_layout(objective, batch, seq).items()}


def lower_reference(cfg: Any, mesh: Mesh, batch: int, seq: int, base_dtype: str = "bfloat16") -> Any:
    """Lower DPO's reference pass (train.objectives.make_reference_fn) on one batch of pairs: the starting
    model (fp32 params; LoRA: the frozen base as `base_dtype`) scoring chosen and rejected, forward only."""
    if cfg.lora_rank:
        axes, shapes = lora.base_layout(cfg, base_dtype)
    else:
        axes, shapes = step_lib.trainable_layout(cfg)
    params = placed(shapes, tree_shardings(axes, shapes, mesh))
    with jax.set_mesh(mesh):
        return make_reference_fn(cfg, mesh).lower(params, _batch("dpo", batch, seq, mesh))


def _compiled(lowered: Any, batch: int, argument_bytes: int) -> Compiled:
    """Memory and FLOPs of a lowered program, or (XLA refused: temporaries exceed HBM) the size it asked for."""
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # "... the total memory required for HLO temporaries (33.59G) exceeds available HBM (30.75G)"
        found = re.search(r"required for HLO temporaries \(([0-9.]+)([KMGT])\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not found:
            raise
        temp = float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024
        return Compiled(batch, argument_bytes, 0, 0, int(temp), 0, float("nan"), oom=True)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return Compiled(batch, mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                    mem.temp_size_in_bytes, mem.generated_code_size_in_bytes, float(cost.get("flops", 0.0)))


def compile_step(cfg: Any, mesh: Mesh, batch: int, seq: int, grad_accum: int = 1,
                 base_dtype: str = "bfloat16", objective: str = "sft") -> tuple[Compiled, dict]:
    """AOT-compile the sharded train step for `mesh` (any devices, compile-only ones included)."""
    lowered, sizes = lower_step(cfg, mesh, batch, seq, grad_accum, base_dtype, objective)
    return _compiled(lowered, batch, sum(sizes.values())), sizes


# --- the plan -------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    model: str
    topology: str
    mesh: dict
    seq: int
    remat: str
    hbm_bytes: int
    sizes: dict  # params / optimizer / batch bytes per chip
    at_batch: Compiled  # the requested batch
    other: Compiled  # a second batch size, for the per-row slope
    groups: int  # data x fsdp x grad_accum: the batch granularity
    grad_accum: int
    n_chips: int
    peak_flops: float
    flops: float  # model FLOPs per step, all chips (flops.compiled_train_step_flops)
    n_layers: int
    lora: str = ""  # "" for full fine-tuning, else e.g. "LoRA rank 16 on wq wk wv wo w1 w2 w3, base nf4"
    objective: str = "sft"  # preference objectives: a batch row is a pair (chosen + rejected)
    reference: Compiled | None = None  # DPO: the reference pass over one microbatch of pairs (before training)

    @property
    def reference_peak(self) -> int:
        """DPO's reference pass with the train state resident beside it (the optimizer moments, and for LoRA
        the adapters, are not arguments of that program but exist while it runs)."""
        return self.reference.peak_bytes + self.sizes["optimizer"] + (self.sizes["params"] if self.lora else 0)

    @property
    def fits(self) -> bool:
        fits_step = not self.at_batch.oom and self.at_batch.peak_bytes <= self.hbm_bytes
        return fits_step and (self.reference is None or (not self.reference.oom and self.reference_peak <= self.hbm_bytes))

    @property
    def at_min(self) -> Compiled:
        return min(self.at_batch, self.other, key=lambda c: c.batch)

    @property
    def bytes_per_row(self) -> float:
        hi, lo = max(self.at_batch, self.other, key=lambda c: c.batch), self.at_min
        return (hi.peak_bytes - lo.peak_bytes) / (hi.batch - lo.batch)

    @property
    def max_batch(self) -> int:
        """Largest multiple of data x fsdp x grad_accum whose (linearly extrapolated) peak fits in HBM; 0 if none."""
        lo = self.at_min
        if lo.peak_bytes > self.hbm_bytes:
            return 0
        per_group = self.bytes_per_row * self.groups
        if per_group <= 0:
            raise RuntimeError("memory did not grow with the batch; cannot extrapolate the largest batch")
        return lo.batch + int((self.hbm_bytes - lo.peak_bytes) // per_group) * self.groups

    def report(self) -> str:
        c, gib = self.at_batch, lambda b: f"{b / GiB:8.2f} GiB"
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items())
        activations = c.temp_bytes
        row = "pair" if self.objective != "sft" else "batch row"
        pairs = {"dpo": "DPO", "orpo": "ORPO", "simpo": "SimPO", "reward": "reward-model"}.get(self.objective)
        lines = [
            f"plan: {self.model} on {self.topology} ({self.n_chips} chips, {gib(self.hbm_bytes).strip()} HBM each), "
            f"mesh {mesh}, batch {c.batch} x seq {self.seq}, remat {self.remat}"
            + (f", grad-accum {self.grad_accum} (microbatch {c.batch // self.grad_accum})" if self.grad_accum > 1 else "")
            + (f", {self.lora}" if self.lora else "")
            + (f", objective {self.objective} ({c.batch} pairs = {2 * c.batch} sequences)" if pairs else ""),
            "  per-chip memory of train.step's compiled step (clip + adamw, fp32 "
            + ("adapters/grads/moments, frozen base" if self.lora else "params/grads/moments") + ", bf16 compute):",
            *([f"    base (frozen)        {gib(self.sizes['base'])}"] if self.lora else []),
            f"    {'adapters' if self.lora else 'params  '}             {gib(self.sizes['params'])}",
            f"    optimizer (2 moments){gib(self.sizes['optimizer'])}",
            f"    {'batch (pairs)' if pairs else 'batch (5 arrays)':<21}{gib(self.sizes['batch'])}",
            f"    temp (activations, grads, scratch){gib(activations)}",
            f"    code                 {gib(c.code_bytes)}",
            f"    total (peak)         {gib(c.peak_bytes)}   of {gib(self.hbm_bytes).strip()}  "
            f"({100 * c.peak_bytes / self.hbm_bytes:.0f}%)"
            + ("  [XLA refused to compile: temporaries exceed HBM; temp from its message]" if c.oom else ""),
            f"  FLOPs per step: {self.flops:.3e} ({self.flops / self.n_chips:.3e} per chip; >= "
            f"{self.flops / self.n_chips / self.peak_flops:.3f} s/step at peak bf16, "
            f"{self.peak_flops / 1e12:.0f} TFLOP/s/chip)"
            + (f"; XLA's count for the compiled program is {c.xla_flops:.3e} per chip with the "
               f"{self.n_layers}-layer scan body counted once" if not c.oom else ""),
            f"  memory per extra {row} (from compiling batch {self.other.batch} and {c.batch}): "
            f"{self.bytes_per_row / GiB:.3f} GiB per chip",
        ]
        if self.reference is not None:
            r = self.reference
            lines.append(f"  DPO reference pass (once before training; forward of {r.batch} pairs per call, the "
                         f"{'frozen base' if self.lora else 'starting params'}): peak {gib(r.peak_bytes).strip()} "
                         f"+ train state {gib(self.reference_peak - r.peak_bytes).strip()} = "
                         f"{gib(self.reference_peak).strip()} ({100 * self.reference_peak / self.hbm_bytes:.0f}%)"
                         + ("  [XLA refused to compile it]" if r.oom else ""))
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        unit = "data x fsdp" + (" x grad-accum" if self.grad_accum > 1 else "")
        if self.max_batch:
            lines.append(f"  verdict: {verdict}; largest batch that fits (estimated, multiple of {unit} = "
                         f"{self.groups}): {self.max_batch}")
        else:
            advice = "more chips or more fsdp" + ("" if self.remat == "full" else ", or remat full")
            lines.append(f"  verdict: {verdict}; even the smallest batch ({self.at_min.batch}) needs "
                         f"{self.at_min.peak_bytes / GiB:.2f} GiB: use {advice}")
        return "\n".join(lines)


def plan(model: str, topology: str, mesh: dict[str, int], batch: int, seq: int, remat: str = "full",
         n_layers: int | None = None, devices: list[Any] | None = None, chip: Chip | None = None,
         grad_accum: int = 1, attention: str = "xla", say: Callable[[str], None] = lambda _: None,
         lora_rank: int = 0, base_dtype: str = "bfloat16", lora_targets: tuple = PROJECTIONS,
         objective: str = "sft", max_seq_len: int | None = None) -> Plan:
    """Compile the train step at `batch` and at the smallest batch, and judge the fit.

    `devices`/`chip` default to libtpu's compile-only devices of `topology`. `n_layers` replaces
    the preset's depth (for quick experiments; the report then describes that smaller model).
    `say` receives a line before each compile (they take a minute or more for big models).
    `lora_rank > 0` plans LoRA (adapters on `lora_targets`, the base stored as `base_dtype`).
    `objective` dpo | orpo | simpo | reward plans the pair step (`batch` pairs), DPO with its reference pass.
    `mesh` may split sequences (`context`, long context); `max_seq_len` replaces the preset's context length.
    """
    overrides = dict(dtype="bfloat16", param_dtype="float32", remat=remat, attention=attention,
                     lora_rank=lora_rank, lora_targets=tuple(lora_targets))
    if n_layers is not None:
        if n_layers < 1:
            raise ValueError(f"--layers must be >= 1, got {n_layers}")
        overrides["n_layers"] = n_layers
    if max_seq_len is not None:
        if max_seq_len < 1:
            raise ValueError(f"--max-seq-len must be >= 1, got {max_seq_len}")
        overrides["max_seq_len"] = max_seq_len
    cfg = LlamaConfig.preset(model, **overrides)
    if seq > cfg.max_seq_len:
        raise ValueError(f"--seq {seq} exceeds {model}'s max_seq_len {cfg.max_seq_len}")
    if devices is None:
        chip, devices = tpu_devices(topology)
    if grad_accum < 1:
        raise ValueError(f"--grad-accum must be >= 1, got {grad_accum}")
    mesh_obj = make_mesh(devices=devices, cfg=cfg, batch=batch, seq=seq, **mesh)
    groups = batch_groups(mesh_obj) * grad_accum  # the smallest batch: one row per data x fsdp group per microbatch
    second = groups if batch > groups else 2 * groups
    shape = f"{model} on {topology}, mesh {' '.join(f'{k}={v}' for k, v in mesh_obj.shape.items())}"
    count = 3 if objective == "dpo" else 2
    say(f"compiling the train step for {shape} at batch {batch} x seq {seq} (1 of {count})...")
    at_batch, sizes = compile_step(cfg, mesh_obj, batch, seq, grad_accum, base_dtype, objective)
    say(f"compiling it again at batch {second} to measure memory per row (2 of {count})...")
    other, _ = compile_step(cfg, mesh_obj, second, seq, grad_accum, base_dtype, objective)
    reference = None
    if objective == "dpo":
        micro = batch // grad_accum  # the loop scores the reference in microbatches
        say(f"compiling DPO's reference pass at {micro} pairs (3 of 3)...")
        reference = _compiled(lower_reference(cfg, mesh_obj, micro, seq, base_dtype), micro, 0)
    described = f"LoRA rank {lora_rank} on {' '.join(cfg.lora_targets)}, base {base_dtype}" if lora_rank else ""
    return Plan(model, topology, dict(mesh_obj.shape), seq, remat, chip.hbm_bytes, sizes, at_batch, other, groups,
                grad_accum, len(devices), chip.peak_bf16_flops,
                flops.compiled_train_step_flops(cfg, batch * (1 if objective == "sft" else 2), seq),
                cfg.n_layers, described, objective, reference)
