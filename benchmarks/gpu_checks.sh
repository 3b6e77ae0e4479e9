#!/usr/bin/env bash
# What a CUDA machine owes this repository, in one go (about 8 minutes on one H200 with PYTEST_ARGS="-n 8",
# pytest-xdist, for the suite):
#   [PYTEST_ARGS="-n 8"] bash benchmarks/gpu_checks.sh [OUT_DIR]
# 1. the GPU benchmark, eager, with each model's costliest ops, 2. the whole suite (tests/test_cuda.py on the GPU,
# the rest on the CPU), 3. the benchmark's GCN compiled. Logs and JSON go to OUT_DIR; SUITE_SECONDS (600) caps
# step 2 (interrupted like Ctrl-C, so pytest still reports what ran).
set -u
out=${1:-gpu_checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
"$python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    | tee -a "$out/gpu.txt"
bench=(-m benchmarks.benchmark --backbone resnet50 --crop 512 --eval_size 512 --batch_size 8 --warmup 5 --repeats 20)
timeout 240 "$python" "${bench[@]}" --profile --json "$out/benchmark_eager.json" > "$out/benchmark_eager.log" 2>&1
tail -8 "$out/benchmark_eager.log"
timeout -s INT "${SUITE_SECONDS:-600}" "$python" -m pytest -q -rs -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 \
    | tee "$out/suite.log" | tail -40
timeout 240 "$python" "${bench[@]}" --compile --models gcn_resnet50 --skip_data --json "$out/benchmark_compiled.json" \
    2>&1 | tee "$out/benchmark_compiled.log"
