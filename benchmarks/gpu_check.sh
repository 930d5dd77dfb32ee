#!/usr/bin/env bash
# The GPU checks of the throughput work, as one command, from the source tree, with any
# Python that has torch (no install, no .venv, no network needed):
#     PYTHON=python3 bash benchmarks/gpu_check.sh   # about 4 minutes on one H200 (25,000
#                                                   # images, 2 timed epochs per variant)
# One table: the benchmark's variants ((a) the tutorial loop, (b) the engine in fp32 at batch
# 64, (c) the fastest settings and (c) at batches 2048 and 8192, (d) the default `cifar-bp
# train` path with amp and compile on auto, (b) compiled at 64 and 512 beside (b) at 512,
# (b) in fp16 + GradScaler) with images/s, GFLOP/s and share of the matmul peak measured in
# the same run; then the real trainer on the default config (auto) at batch 64, 512 and 4096
# (evaluation batches at least as large), 50,000 synthetic images, each epoch timed with its
# evaluation. The targets are printed next to the figures.
# Each part is printed as it ends. Exits non-zero on any error, on a missing package (all
# are listed before anything runs), or on a host sync inside a training step, the loader's
# batch included (CUDA sync debug mode; float16 with its GradScaler too).
# Packages the GPU machine's Python lacks can be put in a folder on PYTHONPATH, e.g.
#     pip install --target .gpu-deps --python-version 3.12 --only-binary=:all: pydantic \
#         pyyaml rich tensorboard          # then carry .gpu-deps along; DEPS=.gpu-deps
# A dry run of the same code paths on a CPU, small (fp16 is CUDA-only, so it is left out):
#     DEVICE=cpu QUICK=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DEPS=${DEPS:-.gpu-deps}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if [[ -d $DEPS ]]; then PYTHONPATH="$DEPS:$PYTHONPATH"; fi

"$PYTHON" - <<'PY'
import importlib.util, sys
needed = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "PIL": "pillow",
          "pydantic": "pydantic", "annotated_types": "annotated-types", "yaml": "pyyaml",
          "rich": "rich", "tensorboard": "tensorboard", "matplotlib": "matplotlib"}
missing = [pkg for module, pkg in needed.items() if importlib.util.find_spec(module) is None]
if missing:
    sys.exit(f"missing packages for {sys.executable}: {' '.join(missing)} (nothing was run)")
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"CUDA available: {torch.cuda.is_available()}")
PY
if [[ $DEVICE == cuda* ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    ARGS=()
else  # the dry run: every code path, on a few images
    ARGS=(--variants a,b,c,d,compile,c@128,d@128)
fi
if [[ -n ${QUICK:-} ]]; then
    ARGS+=(--images 256 --repeats 1 --train-size 1024 --test-size 256 --train-epochs 2
           --train-batches 64 128)
fi
# The timeout keeps a hung run from eating the GPU session's budget.
exec timeout "${LIMIT_S:-540}" "$PYTHON" -m cifar_bp.benchmark.check --device "$DEVICE" \
    "${ARGS[@]}" "$@"
