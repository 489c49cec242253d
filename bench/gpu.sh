#!/usr/bin/env bash
# The one prepared benchmark command for a GPU session (H100/H200): ceilings, attention, forward, training,
# prefill (time to first token), decoding (and int8 weights vs bf16 at batch 1), harness scoring (eval) and
# serving (continuous vs static batches), each with its HF/PyTorch peer in the same run, and LoRA/QLoRA vs
# full fine-tuning; then one table of every row. JSON per bench + gpu.log go to $OUT (the device tool) or a
# temp folder.
#
#   bash bench/gpu.sh           # on the GPU: about 16 minutes, every step under its own time limit
#   bash bench/gpu.sh --smoke   # tiny shapes, end to end on a CPU (the check before a device run)
#
# Extra XLA flags to try go in XLA_FLAGS (passed through); JAX does not preallocate GPU memory
# here, so the PyTorch peer and JAX share the card (each script runs its peer first, then frees it).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=""
if [[ "${1:-}" == "--smoke" ]]; then SMOKE="--smoke"; elif [[ $# -gt 0 ]]; then
  echo "usage: bash bench/gpu.sh [--smoke]" >&2; exit 2
fi
OUTDIR="${OUT:-$(mktemp -d)}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] && PY=.venv/bin/python  # this repo's venv where it exists (not on the device)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
LOG="$OUTDIR/gpu.log"

step() {  # step NAME SECONDS SCRIPT [ARGS...]: one bench under a time limit; a failure does not stop the rest
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $PY $* $SMOKE --out $OUTDIR/$name.json" | tee -a "$LOG"
  if [[ ! -f "$1" ]]; then echo "=== $name: $1 is missing, skipped" | tee -a "$LOG"; return; fi
  timeout "$limit" "$PY" "$@" $SMOKE --out "$OUTDIR/$name.json" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: exit $rc" | tee -a "$LOG"
  [[ $rc -ne 0 ]] && tail -n 15 "$LOG"
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>/dev/null
  "$PY" -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  echo "XLA_FLAGS=${XLA_FLAGS:-}"; } 2>&1 | tee -a "$LOG"

step ceilings 60 bench/ceilings.py
step attention 100 bench/attention.py
step forward 60 bench/forward.py --dtype bfloat16 --batch 4 --seq 2048
step train 200 bench/train.py
step prefill 110 bench/prefill.py --ceilings "$OUTDIR/ceilings.json"
step decode 110 bench/decode.py
step decode-int8 150 bench/decode.py --quantize int8 --batch 1
step eval 150 bench/eval.py
step lora 100 bench/lora.py
step serve 180 bench/serve.py --requests 96

echo "=== results in $OUTDIR" | tee -a "$LOG"
"$PY" bench/table.py "$OUTDIR"/ceilings.json "$OUTDIR"/attention.json "$OUTDIR"/forward.json "$OUTDIR"/train.json \
  "$OUTDIR"/prefill.json "$OUTDIR"/decode.json "$OUTDIR"/decode-int8.json "$OUTDIR"/eval.json "$OUTDIR"/lora.json "$OUTDIR"/serve.json | tee -a "$LOG"
