#!/usr/bin/env bash
# The training checks for one GPU session; copy the tables into benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_check.sh [PACKAGES.tar.xz]
#
# Installs nothing. Packages the machine lacks (Ray, diffusers, MLflow, webdataset) can come as a
# tarball of a `pip install --target` tree, unpacked onto PYTHONPATH. Logs go to $OUT (or /tmp).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
if [ -n "${1:-}" ]; then
  mkdir -p /tmp/site && tar -xJf "$1" -C /tmp/site && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, ray, diffusers, mlflow, accelerate, medi_dist.train.trainer
print('torch', torch.__version__, 'ray', ray.__version__, 'diffusers', diffusers.__version__,
      'mlflow', mlflow.__version__, 'accelerate', accelerate.__version__)" || exit 1

work=/tmp/bench_work tiles=${TILES:-4000}
# 256-px JPEG tiles, as TCGA-UT ships them; built while the smoke run checks the pipeline.
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path
from data_throughput import ensure_dataset; ensure_dataset(Path('$work'), $tiles, 256)" >"$out/dataset.log" 2>&1 &
data=$!

bench() {  # name, time limit (s), train_throughput.py arguments
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  timeout "$limit" python3 benchmarks/train_throughput.py --gpu "$@" >"$out/$name.log" 2>&1
  echo "## $name: exit $?, $((SECONDS - t0)) s"
  grep -E "^\||^ratio|^preset|^plain|^medi-dist|Error|error:" "$out/$name.log" | tail -14
}

bench smoke 120 --preset tiny --resolution 32 --size 64 --tiles 400 --work /tmp/smoke_work \
  --mixed-precision bf16 --batch 32 --steps 30 --warmup 10 --skip-plain
wait $data || { echo "dataset build failed"; tail -5 "$out/dataset.log"; exit 1; }
deep="--preset reference-deep --resolution 128 --size 256 --tiles $tiles --work $work --mixed-precision bf16"
# Same eager math in both: the reference-style loop vs the full Ray pipeline.
bench deep_eager 180 $deep --batch 32 --steps 60 --warmup 30
# The fast path: channels_last + torch.compile + fused AdamW (compile happens in the warm-up).
bench deep_fast ${FAST_LIMIT:-240} $deep --batch 32 --steps 80 --warmup 40 --fast --skip-plain \
  --medi-batches ${FAST_BATCHES:-64}
