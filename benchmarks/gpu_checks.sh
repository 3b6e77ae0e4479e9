#!/usr/bin/env bash
# What a CUDA machine owes this repository, in about 7 minutes on one GPU (each part has its own timeout; 13
# at the very worst):
#   bash benchmarks/gpu_checks.sh [OUT_DIR]          # on the GPU machine
#   bash benchmarks/gpu_checks.sh --cpu [OUT_DIR]    # dry run of every part at tiny sizes on the CPU
# 1. the benchmark (GCN-R50 next to fcn_resnet50), eager and CUDA-graph, batch 8 and 16, those at batch 8 with the
#    profile summary and the GPU's kernel time per step; GCN eager with unpadded score maps (before/after);
#    2. the data-pipeline rate with 4/8/16 workers, and the loss over pixel rows against over channels
#    (benchmarks/bench_loss.py); 3. tests/test_cuda.py; 4. 300 steps of training from scratch
#    (experiments/gpu_check, synthetic) eager and graphed, loss curves compared; 5. OUT_DIR/gpu_checks.json +
#    gpu_checks.md (benchmarks/gpu_report.py).
set -u
cpu=0
if [ "${1:-}" = "--cpu" ]; then cpu=1; shift; fi
out=${1:-gpu_checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
if [ $cpu = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""
    size=(--device cpu --backbone resnet18 --kernel_size 3 --num_classes 5 --crop 64 --eval_size 64 --warmup 1
          --repeats 1 --matmul_size 256)
    batches=(2 4); workers=(0 1); data=(--images 16 --crop 64 --batch_size 4)
    loss=(--device cpu --crop 32 --batch_size 2 --repeats 1)
    train_set=(--set backbone=resnet18 --set kernel_size=3 --set crop_size=64 --set synthetic_image_size=64 --set num_iterations=6 --set num_workers=0
          --set save_summary_steps=2 --set synthetic_val_images=2)
else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
    size=(--backbone resnet50 --crop 512 --eval_size 512 --warmup 5 --repeats 20)
    batches=(8 16); workers=(4 8 16); data=(--crop 512); train_set=()
    loss=(--crop 512 --batch_size 8 --classes 5 11 16 19 21 24)
fi
"$python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    | tee -a "$out/gpu.txt"
models=(--models gcn_resnet50 fcn_resnet50)
[ $cpu = 1 ] && models=(--models gcn_resnet18 fcn_resnet50)
bench() {  # NAME, then benchmark.py options
    local name=$1; shift
    timeout 75 "$python" -m benchmarks.benchmark "${size[@]}" --skip_data --json "$out/benchmark_$name.json" "$@" \
        > "$out/benchmark_$name.log" 2>&1 || echo "benchmark $name failed: see $out/benchmark_$name.log"
    tail -4 "$out/benchmark_$name.log"
}
bench "eager_b${batches[0]}" --batch_size "${batches[0]}" "${models[@]}" --profile
bench "graph_b${batches[0]}" --batch_size "${batches[0]}" "${models[@]}" --cuda_graph --profile
bench "eager_b${batches[1]}" --batch_size "${batches[1]}" "${models[0]}" "${models[1]}"
bench "graph_b${batches[1]}" --batch_size "${batches[1]}" "${models[@]}" --cuda_graph
bench "eager_b${batches[0]}_unpadded" --batch_size "${batches[0]}" "${models[0]}" "${models[1]}" --no_pad_scores
timeout 60 "$python" -m benchmarks.gpu_report data --workers "${workers[@]}" "${data[@]}" --json "$out/data.json" \
    > "$out/data.log" 2>&1 || echo "data-rate check failed: see $out/data.log"
timeout 60 "$python" -m benchmarks.bench_loss "${loss[@]}" --json "$out/loss.json" > "$out/loss.log" 2>&1 \
    || echo "loss benchmark failed: see $out/loss.log"
timeout 120 "$python" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log" | tail -15
for mode in eager graph; do
    rm -rf "$out/train_$mode"; mkdir -p "$out/train_$mode"
    cp experiments/gpu_check/params.json "$out/train_$mode/"
    graph=false; [ $mode = graph ] && graph=true
    timeout 75 "$python" train.py --model_dir "$out/train_$mode" --set cuda_graph=$graph "${train_set[@]}" \
        > "$out/train_$mode.log" 2>&1 || echo "training ($mode) failed: see $out/train_$mode.log"
    tail -2 "$out/train_$mode.log"
done
"$python" -m benchmarks.gpu_report report "$out"
