#!/usr/bin/env bash
# GPU check for the fast paths: one short run gives every GPU number.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# 1. installs CuPy if it is missing (keeps the installed torch);
# 2. runs the whole CUDA and CuPy suite: every test whose id names cuda or
#    cupy (torch-CUDA and CuPy fast paths, full result and calibrate_gradient;
#    the core on the CuPy namespace) and the kernel checks without a GPU
#    (markers nvcc and cuda_host: the same kernels compiled for sm_80/sm_90
#    and run on the CPU); -rs lists any skip reason;
# 3. runs the kernel benchmark on the GPU: calibrate_gradient of torch-fused
#    and cupy-fused against the floor (one torch.sum over the stacked (2S, D)
#    statistics) and the device copy bandwidth; the fraction of the copy
#    bandwidth (target >= 80%) is in "fraction_of_copy_bandwidth".
#
# Writes benchmarks/results/kernel_gpu.json and benchmarks/results/gpu_check.log.
# Meant to finish in about 5 minutes on one NVIDIA GPU with CUDA 12 drivers.
set -uo pipefail
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

echo "== CUDA and CuPy tests, and the kernel checks (nvcc, cuda_host)"
command -v nvcc g++ || echo "nvcc or g++ missing: the nvcc / cuda_host checks will skip"
timeout 300 "$PY" -m pytest tests -q -rs -p no:cacheprovider -k "cuda or cupy" \
  || echo "CUDA/CuPy tests failed (see above)"

echo "== GPU kernel benchmark (float32; D = 1e4 .. 1e8, S = 2 .. 16)"
timeout 240 "$PY" benchmarks/kernel.py --device cuda --quick --big \
  --out benchmarks/results/kernel_gpu.json || echo "GPU benchmark failed (see above)"
echo "== done"
