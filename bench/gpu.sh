#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one call of a few minutes:
#   1. the CUDA tests (tests/test_cuda.py: inference per precision, cached-vs-HF loss, training in
#      fp32/bf16/fp16, resume, predict on a GPU-trained checkpoint, a training step with no host sync;
#      and fused AdamW's on-device skip from tests/test_train.py);
#   2. bench/bench_train.py (targets: a warm epoch over 6,000 images under 10 s, peak memory under
#      4 GB at batch 8);
#   3. bench/bench_inference.py (target: 2 prompts cost at most 1.2x one).
# Usage: bash bench/gpu.sh            (PY=/path/to/python to pick the interpreter; default python3)
# Where the machine has no package index and lacks pycocotools, run `bash bench/gpu_wheels.sh` first
# where pip works and bring .whl/ along: this script installs those wheels into a temp folder.
# Output is also written to $OUT/gpu.log when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ -n "${OUT:-}" ]; then exec > >(tee "$OUT/gpu.log") 2>&1; fi

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device visible to torch')"
if ! "$PY" -c "import pycocotools" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)"

status=0
echo "== CUDA tests"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py "tests/test_train.py::test_a_skipped_step_leaves_no_trace" || status=1
echo "== training benchmark"
"$PY" bench/bench_train.py --device cuda --hf-steps 10 --cached-steps 100 || status=1
echo "== inference benchmark"
"$PY" bench/bench_inference.py --device cuda --iters 10 --images 64 --workers 4 || status=1
exit $status
