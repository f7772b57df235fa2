#!/usr/bin/env bash
# The GPU rows of the engine benchmark: W1b and D1b with every client on the GPU (the floor,
# fedsim inline and vmap with client.device = cuda), and fedsim's Ray engine with four clients
# per GPU (num_gpus_per_client = 0.25). About 3 minutes on one H200; writes gpu.json and
# gpu.log to $OUT (default /tmp/fedsim-gpu-check).
#
#   bash experiments/bench/gpu_check.sh             # with fedsim installed in .venv (make install)
#   PYTHON=python3 bash experiments/bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-.venv/bin/python}
out=${OUT:-/tmp/fedsim-gpu-check}
mkdir -p "$out"
"$python" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: this check needs a GPU"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
PY
PYTHONUNBUFFERED=1 "$python" experiments/bench/engines.py --device cuda \
    --systems floor,inline,vmap,ray --workloads W1b,D1b --repeat 3 --repeat-ray 1 --no-scale \
    --json "$out/gpu.json" 2>&1 | tee "$out/gpu.log"
