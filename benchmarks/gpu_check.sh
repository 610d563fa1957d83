#!/usr/bin/env bash
# One prepared GPU session (about 8 minutes on one H200 with the default parts):
#   overhead    benchmarks/train_step.py at CelebA's 3x64x64 shape in fp32 / bf16 / fp16:
#               the pipeline loop against a bare PyTorch loop (target <= 1.05 per stage)
#   throughput  benchmarks/throughput.py at full size (configs/celeba64.yaml networks, batch 32):
#               samples/s per stage and precision, synthetic vs streaming, compile (bf16), MFU
#   fp16        a short fp16 run of both stages whose checkpoint must carry the grad-scaler state
#   zero2       DeepSpeed ZeRO-2 (one engine per network) in bf16, if deepspeed is installed
# Usage: benchmarks/gpu_check.sh [overhead] [throughput] [fp16] [zero2]   (default: overhead throughput)
# Results go to $OUT (the device tool's folder) or ./gpu-check.
set -u
out=${OUT:-gpu-check}; mkdir -p "$out"
parts=${*:-overhead throughput}
export PYTHONUNBUFFERED=1 GAPM_LOG_LEVEL=WARNING
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__)" | tee -a "$out/gpu.txt"
nproc | sed 's/^/cpus /' | tee -a "$out/gpu.txt"

if [[ " $parts " == *" overhead "* ]]; then
  for precision in no bf16 fp16; do
    timeout 150 python3 benchmarks/train_step.py --steps 100 --warmup 20 --repeats 3 --batch-size 128 \
        --data-shape 3,64,64 --mixed-precision "$precision" 2>&1 | grep -E "^(train_step|stage|/)" | tee -a "$out/overhead.txt"
  done
fi

if [[ " $parts " == *" throughput "* ]]; then
  timeout 420 python3 benchmarks/throughput.py --precisions no,bf16,fp16 --compiled-precisions bf16 \
      --json "$out/throughput.json" 2>&1 | tee "$out/throughput.txt"
fi

if [[ " $parts " == *" fp16 "* ]]; then
  timeout 90 python3 -m pipeline.cli train --config configs/swissroll.yaml --resume never \
      --set name=fp16-check --set output_dir=/tmp/gpu-runs --set "model.data_shape=[3,64,64]" \
      --set model.latent_dim=128 --set model.prior_dim=128 --set model.width=64 \
      --set data.train=synthetic --set data.test=synthetic --set data.swissroll_samples=2048 \
      --set data.batch_size=64 --set stage1.steps=40 --set stage2.steps=40 --set train.mixed_precision=fp16 \
      --set train.checkpoint_every=40 --set eval.samples=64 --set tracking.enabled=false \
      --set train.progress_bar=false 2>&1 | tail -3 | tee "$out/fp16_run.txt"
  python3 - <<'PY' 2>&1 | tee -a "$out/fp16_run.txt"
import glob, json, torch
ckpt = sorted(glob.glob("/tmp/gpu-runs/fp16-check/checkpoints/step-*"))[-1]
state = torch.load(f"{ckpt}/training_state.pt", weights_only=True)
print("checkpoint", ckpt, "grad_scaler", {k: v for k, v in state.get("grad_scaler", {}).items() if k == "scale"})
print("metrics", json.load(open("/tmp/gpu-runs/fp16-check/metrics.json")))
PY
fi

if [[ " $parts " == *" zero2 "* ]] && python3 -c "import deepspeed" 2>/dev/null; then
  timeout 150 accelerate launch --config_file launch/accelerate/deepspeed_zero2.yaml --num_processes 1 \
      -m pipeline.cli train --config configs/swissroll.yaml --resume never \
      --set name=zero2-check --set output_dir=/tmp/gpu-runs --set "model.data_shape=[3,64,64]" \
      --set model.latent_dim=128 --set model.prior_dim=128 --set data.train=synthetic --set data.test=synthetic \
      --set data.swissroll_samples=2048 --set data.batch_size=64 --set stage1.steps=40 --set stage2.steps=40 \
      --set train.checkpoint_every=40 --set eval.samples=64 --set tracking.enabled=false \
      --set train.progress_bar=false 2>&1 | grep -E "DeepSpeed:|metrics|rror" | tee "$out/zero2_run.txt"
fi
