#!/usr/bin/env bash
# The training and inference benchmarks on a CUDA GPU, with peak GPU memory, in one call of a few
# minutes. Targets: a warm epoch over 6,000 images in under 10 s, peak memory under 4 GB at batch 8,
# 2 prompts costing at most 1.2x one. Usage: bash bench/gpu.sh   (PY=/path/to/python to pick one)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device visible to torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" bench/bench_train.py --device cuda --hf-steps 10 --cached-steps 100
"$PY" bench/bench_inference.py --device cuda --iters 10 --images 64 --workers 4
