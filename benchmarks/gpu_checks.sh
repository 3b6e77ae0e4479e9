#!/usr/bin/env bash
# What a CUDA machine owes this repository, in two parts that each fit one command of at most 9 minutes.
usage() {
    cat <<'TEXT'
Usage: bash benchmarks/gpu_checks.sh [--cpu] --part 1|2 OUT_DIR

Runs on a CUDA machine with its own python3 (or $PYTHON) and what it has installed; installs nothing.
  --part 1  tests/test_cuda.py and tests/test_fake_cuda.py on the GPU, then 300 steps of training from scratch
            (experiments/gpu_check: ResNet-50, 8 DataLoader workers), eager and with the step replayed from a CUDA
            graph, and their loss curves compared. At most 8 minutes.
  --part 2  benchmarks/benchmark.py: a GCN-R50 training step at 8 × 512² next to fcn_resnet50's, eager and graphed
            (both profiled: the GPU's kernel time per step), at batch 16 (memory), and eager with unpadded score
            maps; the data pipeline's images/s with 4, 8 and 16 workers; the loss over pixel rows against over
            channels. At most 8.5 minutes.
  --cpu     a dry run of the part at tiny sizes on the CPU.
OUT_DIR receives three files: partN.json and partN.md (every check with pass/fail and seconds, the pytest summary,
the figures) and partN_logs.tar.gz (every log; no checkpoints). Exit status 0 only if every check passed.
TEXT
}

set -u
cpu=0 part="" out=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --cpu) cpu=1 ;;
        --part) part=${2:-}; shift ;;
        -*) echo "gpu_checks.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [ -z "$out" ] || { echo "gpu_checks.sh: one OUT_DIR only (see --help)" >&2; exit 2; }; out=$1 ;;
    esac
    shift
done
case "$part" in 1|2) ;; *) echo "gpu_checks.sh: --part 1 or --part 2 is required (see --help)" >&2; exit 2 ;; esac
[ -n "$out" ] || { echo "gpu_checks.sh: OUT_DIR is required (see --help)" >&2; exit 2; }
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
work=$(mktemp -d)  # logs, runs and their checkpoints: only the report and the logs' tarball go to OUT_DIR
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

check() {  # NAME SECONDS COMMAND...: run it with a time limit into NAME.log; record its status and duration
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    timeout "$limit" "$@" > "$work/$name.log" 2>&1
    status=$?
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$work/checks.tsv"
    if [ "$status" = 0 ]; then echo "$name: passed in $((SECONDS - start)) s"
    else echo "$name: FAILED (status $status$([ "$status" = 124 ] && echo ", timed out")) in $((SECONDS - start)) s"
    fi
    tail -3 "$work/$name.log"
}

: > "$work/checks.tsv"
if [ $cpu = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""
    size=(--device cpu --backbone resnet18 --kernel_size 3 --num_classes 5 --crop 64 --eval_size 64 --warmup 1
          --repeats 1 --matmul_size 256)
    batches=(2 4); workers=(0 1); data=(--images 16 --crop 64 --batch_size 4)
    loss=(--device cpu --crop 32 --batch_size 2 --repeats 1)
    train_set=(--set backbone=resnet18 --set kernel_size=3 --set crop_size=64 --set synthetic_image_size=64
               --set num_iterations=6 --set num_workers=2 --set save_summary_steps=2 --set synthetic_val_images=2)
    tests=(tests/test_cuda.py)  # skipped without a GPU; the fake-CUDA tests run in the suite
    lscpu | sed -n 's/^Model name: *//p' > "$work/device.txt"
else
    size=(--backbone resnet50 --crop 512 --eval_size 512 --warmup 5 --repeats 20)
    batches=(8 16); workers=(4 8 16); data=(--crop 512); train_set=()
    loss=(--crop 512 --batch_size 8 --classes 5 11 16 19 21 24)
    tests=(tests/test_cuda.py tests/test_fake_cuda.py)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$work/device.txt" 2>&1
fi
"$python" -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__,
'torchvision', torchvision.__version__)" >> "$work/device.txt" 2>&1
cat "$work/device.txt"

if [ "$part" = 1 ]; then
    check pytest 240 "$python" -m pytest -q -rs -p no:cacheprovider "${tests[@]}"
    for mode in eager graph; do
        mkdir -p "$work/train_$mode"
        cp experiments/gpu_check/params.json "$work/train_$mode/"
        graph=false
        [ $mode = graph ] && graph=true
        check "train_$mode" 120 "$python" train.py --model_dir "$work/train_$mode" --set cuda_graph=$graph \
            "${train_set[@]}"
    done
else
    models=(--models gcn_resnet50 fcn_resnet50)
    [ $cpu = 1 ] && models=(--models gcn_resnet18 fcn_resnet50)
    bench() {  # NAME, then benchmark.py options
        local name=$1
        shift
        check "benchmark_$name" 80 "$python" -m benchmarks.benchmark "${size[@]}" --skip_data \
            --json "$work/benchmark_$name.json" "$@"
    }
    bench "eager_b${batches[0]}" --batch_size "${batches[0]}" "${models[@]}" --profile
    bench "graph_b${batches[0]}" --batch_size "${batches[0]}" "${models[@]}" --cuda_graph --profile
    bench "eager_b${batches[1]}" --batch_size "${batches[1]}" "${models[@]}"
    bench "graph_b${batches[1]}" --batch_size "${batches[1]}" "${models[@]}" --cuda_graph
    bench "eager_b${batches[0]}_unpadded" --batch_size "${batches[0]}" "${models[@]}" --no_pad_scores
    check data 60 "$python" -m benchmarks.gpu_report data --workers "${workers[@]}" "${data[@]}" \
        --json "$work/data.json"
    check loss 50 "$python" -m benchmarks.bench_loss "${loss[@]}" --json "$work/loss.json"
fi

"$python" -m benchmarks.gpu_report report "$work" --part "$part" --out "$out"
status=$?
tar -czf "$out/part${part}_logs.tar.gz" -C "$work" --exclude='*.pth' --exclude='*.pth.tar' . || status=1
echo "$out: part$part.json, part$part.md, part${part}_logs.tar.gz$([ $status = 0 ] || echo "; SOME CHECKS FAILED")"
exit $status
