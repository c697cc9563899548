#!/usr/bin/env bash
# The device check, in one call of the lent GPU machine (about 7 minutes; under 8 with start).
#
# Uses the JAX, Flax, Optax, PyTorch and transformers already installed there. Pure-Python
# packages that image lacks (the authors' gaussian-adaptive-attention, ml-collections, grain's
# wheel for its Python) come as wheels from benchmarks/wheels/, which `make device-wheels`
# fills here beforehand; the device tool carries that folder (name it in `carry`).
#
# Prints, each section bounded by its own timeout so one failure cannot eat the others:
#   1. GAAM forward and forward+backward against the authors' package on CUDA, and the
#      achieved bandwidth of the paper-form forward at [8, 8192, 512] and [32, 24, 1024] as a
#      fraction of the card's measured copy bandwidth (benchmarks/device_gaam.py);
#   2. the training loop's steady-state efficiency on the main job's shapes
#      (benchmarks/loop_efficiency.py --synthetic: tfds is not needed);
#   3. encoder extraction throughput, JAX vs PyTorch on CUDA, and on a 1-device mesh
#      (benchmarks/encoders.py), with the encoders' attention on auto (cuDNN where it runs) and
#      on the memory-linear blockwise path;
#   4. the attention implementations side by side (xla, blockwise, cudnn): time and XLA's
#      memory at 1024-16384 tokens, float32 and bfloat16 (benchmarks/attention.py).
# Usage: bash benchmarks/device.sh [OUT_DIR]   (default: $OUT, or benchmarks/results/device)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results/device}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
if compgen -G "benchmarks/wheels/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --target /tmp/gaam-device-pkgs benchmarks/wheels/*.whl \
    || echo "warning: could not install the carried wheels"
  export PYTHONPATH="/tmp/gaam-device-pkgs:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$py" -c "import jax, sys; print('python', sys.version.split()[0], '| jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

section() {  # name, timeout, command...
  local name="$1" limit="$2"; shift 2
  echo; echo "=== $name ==="
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt" | grep -v -E "^(WARNING|I0000|W0000)" || true
  [ "${PIPESTATUS[0]}" -eq 0 ] || echo "($name did not finish: exit ${PIPESTATUS[0]})"
}
section gaam 130 "$py" -m benchmarks.device_gaam
section loop 120 "$py" -m benchmarks.loop_efficiency --synthetic --runs 1,5,15 --out "$out/loop.json"
section encoders 120 "$py" -m benchmarks.encoders --device --only llama-128,llama-2048,beit
section encoders-blockwise 60 "$py" -m benchmarks.encoders --device --only llama-2048 --attention blockwise
section attention 60 "$py" -m benchmarks.attention
echo; echo "results in $out"
