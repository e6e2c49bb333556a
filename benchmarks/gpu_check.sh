#!/usr/bin/env bash
# The training and generation checks for one GPU session (~12 minutes on one H100); copy the table into
# benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_check.sh [PACKAGES.tar.xz]
#
# Installs nothing. Packages the machine lacks (Ray, diffusers, MLflow, webdataset) can come as a
# tarball of a `pip install --target` tree, unpacked onto PYTHONPATH. Each medi-dist run logs to its
# own sqlite MLflow store under $OUT, so a run cut off by its time limit still leaves its img/s
# windows; the summary at the end reads them. Between runs it stops every Ray process on the
# machine (a dedicated GPU box). A dry run of the script on CPU, in ~3 minutes:
#   USE_GPU=false PRESET=tiny RES=16 TILES=300 bash benchmarks/gpu_check.sh
# NVJPEG=1 adds the data.decode=device (nvJPEG) checks (below).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
if [ -n "${1:-}" ]; then
  mkdir -p /tmp/site && tar -xJf "$1" -C /tmp/site && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit 1
fi
gpu=${USE_GPU:-true} preset=${PRESET:-reference-deep} res=${RES:-128}
[ "$gpu" = true ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, ray, diffusers, mlflow, accelerate, medi_dist.train.trainer
print('torch', torch.__version__, 'ray', ray.__version__, 'diffusers', diffusers.__version__,
      'mlflow', mlflow.__version__, 'accelerate', accelerate.__version__)" || exit 1

ds=/tmp/gpu_check_data
t0=$SECONDS
# 256-px JPEG tiles as TCGA-UT ships them, resized to 128 px by the stream.
python3 -m medi_dist ingest --source procedural --out $ds --tiles ${TILES:-3000} --size 256 \
  --holdout-fraction 0.1 --overwrite >"$out/ingest.log" 2>&1 || { tail -5 "$out/ingest.log"; exit 1; }
echo "dataset: $((SECONDS - t0)) s"

ray_stop() {  # right after `timeout` kills a driver its GPU worker can still hold the GPU (31 GiB seen)
  python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
  pkill -9 -f "ray::" 2>/dev/null
  sleep 3
}

# Reference-style loop: DataLoader over the same JPEG files, eager bf16, batch 32.
t0=$SECONDS
timeout ${PLAIN_LIMIT:-120} python3 benchmarks/train_throughput.py $([ "$gpu" = true ] && echo --gpu) --workers \
  --preset $preset --resolution $res --size 256 --tiles ${TILES:-3000} --work /tmp/gpu_check_plain --mixed-precision bf16 \
  --batch 32 --steps 60 --warmup 20 >"$out/plain.log" 2>&1
echo "plain: exit $?, $((SECONDS - t0)) s"; grep -E "^plain|Error" "$out/plain.log" | tail -3

train() {  # name, time limit (s), overrides
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  rm -rf /tmp/gpu_check_runs/$name  # a fresh run each time: a re-run on a warm machine must not resume
  timeout "$limit" python3 -m medi_dist train data.dataset=$ds data.balance=none model.preset=$preset \
    model.resolution=$res run.use_gpu=$gpu run.mixed_precision=bf16 steps=100000 run.log_every=5 \
    run.checkpoint_every=100000 run.cpus_per_worker=${CPUS_PER_WORKER:-4} run.threads_per_worker=2 run.name=$name \
    run.storage_path=/tmp/gpu_check_runs run.tracking_uri=sqlite:///$out/$name.db "$@" >"$out/$name.log" 2>&1
  echo "$name: exit $? (124 = stopped by its time limit, expected), $((SECONDS - t0)) s"
  [ "$gpu" = true ] && nvidia-smi --query-gpu=memory.used --format=csv,noheader
  ray_stop
}
train eager ${EAGER_LIMIT:-150} optim.batch_size=32
train fast ${FAST_LIMIT:-240} optim.batch_size=${FAST_BATCH:-64} run.compile=true run.channels_last=true optim.fused=true
# NVJPEG=1 (~3 more minutes): the eager run again with data.decode=device (the workers decode with
# nvJPEG), and the stream alone with its CPU decode against nvJPEG on the GPU (data_throughput.py).
if [ "${NVJPEG:-0}" = 1 ]; then
  train nvjpeg ${EAGER_LIMIT:-150} optim.batch_size=32 data.decode=device
  for decode in cpu device; do
    t0=$SECONDS
    timeout ${DECODE_LIMIT:-90} python3 benchmarks/data_throughput.py --tiles ${TILES:-3000} --size 256 --resolution $res \
      --cpus 4 --repeats 2 --decode $decode --work /tmp/gpu_check_plain >"$out/decode_$decode.log" 2>&1
    echo "stream decode=$decode: exit $?, $((SECONDS - t0)) s"; grep -E "^\| medi-dist|^ratio|Error" "$out/decode_$decode.log" | tail -3
    ray_stop
  done
fi

# Generation: denoiser evaluations/s of the generation job (actor pool, 1 GPU worker, DPM-Solver++
# 25 steps) on a randomly initialised model of the same architecture: speed only, not quality.
# The figure includes each actor's warm-up (cuDNN autotuning) on its first shard.
python3 - <<EOF
from pathlib import Path
from medi_dist.metadata import ConditioningSpec
from medi_dist.model import EMA, ConditionedUNet, ModelConfig, save_model_dir
spec = ConditioningSpec.load(Path("$ds") / "vocab.json").subset(["cancer_type", "tissue_source_site"])
m = ConditionedUNet(ModelConfig.from_preset("$preset", sample_size=$res), spec)
save_model_dir(Path("/tmp/gpu_check_model"), m, EMA(m), extra_info={"name": "random-init", "dataset": "$ds"})
EOF
t0=$SECONDS
timeout ${GEN_LIMIT:-180} python3 benchmarks/sample_throughput.py --model /tmp/gpu_check_model --configs dpmsolver++:25 \
  --count ${GEN_COUNT:-24} --batch-size 256 --precision ${GEN_PRECISION:-fp16} --cpus 4 --work /tmp/gpu_check_sampling \
  $([ "$gpu" = true ] && echo --gpus-per-worker 1) >"$out/generation.log" 2>&1
echo "generation: exit $?, $((SECONDS - t0)) s"; grep -E "^\||^model|Error" "$out/generation.log" | tail -4

python3 - "$out" <<'EOF'
import sqlite3, statistics, sys
print("| run | windows | last step | img/s (median, windows after step 20) | data wait (median) |")
print("|---|---|---|---|---|")
for name in ("eager", "fast", "nvjpeg"):
    try:
        db = sqlite3.connect(f"{sys.argv[1]}/{name}.db")
        rows = db.execute("select key, step, value from metrics where key in ('img_per_s', 'data_wait_fraction')").fetchall()
    except sqlite3.Error as e:
        print(f"| {name} | no metrics ({e}) | | | |")
        continue
    ips = {s: v for k, s, v in rows if k == "img_per_s"}
    wait = [v for k, s, v in rows if k == "data_wait_fraction" and s > 20]
    late = [v for s, v in ips.items() if s > 20]
    print(f"| {name} | {len(late)} | {max(ips, default=0)} | {statistics.median(late) if late else float('nan'):.1f} "
          f"| {statistics.median(wait) if wait else float('nan'):.1%} |")
EOF
