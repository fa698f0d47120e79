#!/usr/bin/env bash
# GPU checks and timings (issue 6; the README's GPU table), in one pass on a machine with a CUDA GPU:
#
#   bash bench/gpu_check.sh TRAIN_DIR DEIT_TINY_WEIGHTS OUT_DIR
#   bash bench/gpu_check.sh ../shared/data/imagenet-mini/train ../shared/weights/deit_tiny_patch16_224.pth /tmp/gpu
#
# 1. tests/test_cuda.py: CUDA calibration = CPU scales for every observer, no host sync per batch.
# 2. Real DeiT-tiny, trt_int8, calibrated on 800 train images and evaluated on the other 200
#    (bench/holdout_split.py), profiler included: compare with the same command on the CPU; and
#    fqvit_plus_w8a8 the same way (its block reconstruction on the 800 images: issue 17's GPU cost).
# 3. The same under torchrun (NCCL, one process per GPU): the same numbers.
# 4. bench_qvit.py on the GPU: vit_base FP32 vs fake-quant images/s at batch 128 and 64, calibration
#    seconds per observer (1024 real images already on the GPU).
# 5. test_qvit.py end to end on vit_base (random weights: speed only): calibration seconds of 1000
#    images with the OMSE observer and with the fqvit_plus recipes (reparam, calibration, Fisher scale
#    search, block reconstruction); then KL calibration and FP32 + INT8 evaluation streamed over SCALE x
#    the train images (default 50: 50,000 images, the size of ImageNet's validation set), with peak
#    host / GPU memory.
# Every step has its own time limit and the script goes on after a failure; everything is logged to
# OUT_DIR/gpu_check.log and each run's qvit_summary.json is copied to OUT_DIR/<step>.json.
# STEPS="test_cuda deit_cuda ..." runs only the steps named; SCALE=N links each train image N times.
set -u
TRAIN=$(realpath "$1"); DEIT=$(realpath "$2"); OUT=$(realpath -m "$3")
SCALE=${SCALE:-50}
WORKERS=${WORKERS:-$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check.XXXX)
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, copy its run summary if any
  local name=$1 limit=$2; shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return 0; fi
  echo "=== $name: $* ($(date -u +%T))" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
  local summary
  summary=$(ls -d "$WORK/log_$name"/*/qvit_summary.json 2>/dev/null | head -n 1)
  [ -n "$summary" ] && cp "$summary" "$OUT/$name.json"
  return 0
}

{
  echo "=== machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "cpus $(nproc), loader workers $WORKERS"; df -h /dev/shm | tail -n 1
  python -c "import torch, timm, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'timm', timm.__version__)"
} >>"$LOG" 2>&1

step test_cuda 120 python -m pytest -q -p no:cacheprovider tests/test_cuda.py

python -m bench.holdout_split "$TRAIN" "$WORK/split" >>"$LOG" 2>&1
DEIT_ARGS=(--model deit_tiny_patch16_224 --checkpoint "$DEIT" --calib-dir "$WORK/split/calib" --val-dir "$WORK/split/held"
           --calib-size 800 --config trt_int8 --batch-size 64 --workers "$WORKERS" --device cuda --no-progress)
step deit_cuda 120 python test_qvit.py "${DEIT_ARGS[@]}" --hist worst:3 --log-dir "$WORK/log_deit_cuda"
step deit_plus_w8a8 240 python test_qvit.py "${DEIT_ARGS[@]/trt_int8/fqvit_plus_w8a8}" --no-profile --log-dir "$WORK/log_deit_plus_w8a8"
step deit_nccl 90 torchrun --standalone --nproc-per-node 1 test_qvit.py "${DEIT_ARGS[@]}" --no-profile --log-dir "$WORK/log_deit_nccl"

step bench_b128 150 python -m bench.bench_qvit --device cuda --models vit_base_patch16_224 --batch 128 --calib-batches 8 --iters 10 --data "$TRAIN"
step bench_b64 60 python -m bench.bench_qvit --device cuda --models vit_base_patch16_224 --batch 64 --iters 10 --skip-calibration

# Random vit_base weights (speed only) and SCALE links to every train image: an ImageNet-val-sized split.
python - "$WORK" "$TRAIN" "$SCALE" <<'EOF' >>"$LOG" 2>&1
import os, sys, torch, timm
from pathlib import Path
work, train, scale = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
torch.save(timm.create_model("vit_base_patch16_224").state_dict(), work / "vit_base_random.pth")
files = sorted(f for f in train.glob("*/*") if f.is_file())
for f in files:
    (work / "stream" / f.parent.name).mkdir(parents=True, exist_ok=True)
    for i in range(scale):
        os.symlink(f, work / "stream" / f.parent.name / f"{i:03d}_{f.name}")
print(f"{len(files) * scale} evaluation images (links) under {work / 'stream'}")
EOF
VITB_ARGS=(--model vit_base_patch16_224 --checkpoint "$WORK/vit_base_random.pth" --calib-dir "$TRAIN" --calib-size 1000
           --batch-size 128 --workers "$WORKERS" --device cuda --no-profile)
step vitb_omse 90 python test_qvit.py "${VITB_ARGS[@]}" --no-progress --observer omse --val-dir "$TRAIN" --limit 1024 --log-dir "$WORK/log_vitb_omse"
step vitb_plus_w8a8 300 python test_qvit.py "${VITB_ARGS[@]}" --no-progress --config fqvit_plus_w8a8 --val-dir "$TRAIN" --limit 1024 --log-dir "$WORK/log_vitb_plus_w8a8"
step vitb_plus_w6a6_r8 300 python test_qvit.py "${VITB_ARGS[@]}" --no-progress --config fqvit_plus_w6a6_r8 --val-dir "$TRAIN" --limit 1024 --log-dir "$WORK/log_vitb_plus_w6a6_r8"
step vitb_kl_stream 330 python test_qvit.py "${VITB_ARGS[@]}" --observer kl --val-dir "$WORK/stream" --log-dir "$WORK/log_vitb_kl_stream"
echo "=== done ($(date -u +%T))" | tee -a "$LOG"
