#!/usr/bin/env bash
# The GPU checks for the throughput work, as one command on a CUDA machine:
#     bash benchmarks/gpu_check.sh        # about 5 minutes on one H100-class GPU
# 1. `cifar-bp bench --device cuda --sync-debug`: (a) the tutorial loop, (b) the engine in
#    fp32 at batch 64, (c) bf16 autocast + channels_last + batch 512, (b) compiled, and (b)
#    with fp16 autocast + GradScaler. Host syncs inside the engine's timed steps are counted
#    with torch.cuda.set_sync_debug_mode("warn").
# 2. One epoch of `cifar-bp train` on 50,000 synthetic images on the GPU with bf16 autocast,
#    then the same with fp16 autocast + GradScaler: host peak RSS, wall time, images/s.
# Fails (non-zero exit) on any error, or when (b)/(c) sync more than once per epoch (the
# epoch's shuffled order is uploaded once; anything more is a sync inside the step).
# A dry run of the same code paths on a CPU (fp16 is CUDA-only, so it is left out there):
#     DEVICE=cpu TRAIN_SIZE=1024 TEST_SIZE=512 BENCH_ARGS="--images 256 --repeats 1" \
#         bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-$(mktemp -d /tmp/cifar-bp-gpu-check.XXXX)}
DEVICE=${DEVICE:-cuda}
TRAIN_SIZE=${TRAIN_SIZE:-50000}  # synthetic training images for the one-epoch runs
TEST_SIZE=${TEST_SIZE:-10000}    # synthetic test images evaluated after that epoch
read -r -a BENCH_EXTRA <<<"${BENCH_ARGS:-}"
if [[ $DEVICE == cpu ]]; then VARIANTS=a,b,c,compile DTYPES=bfloat16
else VARIANTS=a,b,c,compile,fp16 DTYPES="bfloat16 float16"; fi
mkdir -p "$OUT"
echo "writing to $OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== 1. benchmark"
"$BIN/cifar-bp" bench --device "$DEVICE" --sync-debug --variants "$VARIANTS" --json \
    "${BENCH_EXTRA[@]}" >"$OUT/bench.json"
"$BIN/python" - "$OUT/bench.json" <<'PY'
import json, sys
from cifar_bp.bench import print_benchmark
report = json.load(open(sys.argv[1]))
print_benchmark(report, as_json=False)
# fp16's GradScaler reads found-inf back once per step by design; the others must not sync.
limit = report["repeats"]
bad = {k: v["host_syncs"] for k, v in report["variants"].items()
       if k in ("b", "c", "compile") and (v["host_syncs"] or 0) > limit}
if bad:
    sys.exit(f"host syncs inside the steps (more than {limit}, one per timed epoch): {bad}")
print("sync check passed: (b), (c) and compiled sync at most once per epoch (CUDA only)")
PY

echo "== 2. one epoch of train on $TRAIN_SIZE synthetic images"
for dtype in $DTYPES; do
    /usr/bin/time -f "$dtype: peak RSS %M KB, wall %e s" \
        "$BIN/cifar-bp" train --config configs/smoke.yaml --epochs 1 -q \
        --set data.train_size="$TRAIN_SIZE" --set data.test_size="$TEST_SIZE" \
        --set train.device="$DEVICE" --set model.channels_last=true --set train.batch_size=512 \
        --set train.amp=true --set train.amp_dtype="$dtype" \
        --logdir "$OUT/runs" --run-name "$dtype"
    "$BIN/python" - "$OUT/runs/$dtype" <<'PY'
import statistics, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
tags = acc.Tags()["scalars"]
rates = [e.value for e in acc.Scalars("train/images_per_s")]
print(f"{sys.argv[1]}: train/images_per_s median {statistics.median(rates):,.0f} "
      f"(first window, with cuDNN autotuning: {rates[0]:,.0f})")
for tag in ("train/epoch_seconds", "amp/scale", "amp/skipped_steps", "test/accuracy"):
    if tag in tags:
        print(f"  {tag}: {acc.Scalars(tag)[-1].value:g}")
PY
done
echo "all GPU checks passed; results in $OUT"
