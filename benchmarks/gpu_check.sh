#!/usr/bin/env bash
# GPU check for the fused backends: installs CuPy, runs the CuPy and torch-CUDA
# equivalence tests and the GPU kernel benchmark. Meant to finish in < 5 min
# on a machine with one NVIDIA GPU and CUDA 12 drivers.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Writes benchmarks/results/kernel_gpu.json and benchmarks/results/gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
LOG=benchmarks/results/gpu_check.log
mkdir -p benchmarks/results
exec > >(tee "$LOG") 2>&1

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

echo "== install cupy (keeps the installed torch)"
if ! "$PY" -c "import cupy" 2>/dev/null; then
  timeout 180 "$PY" -m pip install --quiet "cupy-cuda12x>=13" || echo "cupy install failed; CuPy tests will skip"
fi
"$PY" -c "import cupy; print('cupy', cupy.__version__, 'devices', cupy.cuda.runtime.getDeviceCount())" || true

echo "== project importable"
"$PY" -c "import bogc_core" 2>/dev/null || timeout 120 "$PY" -m pip install --quiet --no-deps -e .

echo "== GPU equivalence tests (torch-CUDA and CuPy; -rs lists any skip reason)"
timeout 150 "$PY" -m pytest tests/backends -q -rs -k "cuda" -p no:cacheprovider

echo "== GPU kernel benchmark (D = 1e6, 1e7; S = 2, 3, 6; float32)"
timeout 120 "$PY" benchmarks/kernel.py --device cuda --sizes 1e6,1e7 --sources 2,3,6 \
  --repeat 10 --no-memory --out benchmarks/results/kernel_gpu.json
echo "== done"
