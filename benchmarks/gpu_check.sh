#!/usr/bin/env bash
# GPU checks of the real code paths (run on a CUDA machine from the repo root;
# $OUT collects the results). Wheels for packages the machine lacks are
# expected in .whl/ (diffusers, peft, ml_collections, importlib_metadata, and for
# the OCR reward rapidocr-onnxruntime and its needs): `bash benchmarks/device_wheels.sh`
# fetches them here, once, before the device call.
#
#   bash benchmarks/gpu_check.sh                 # tiny, step and trainer
#   bash benchmarks/gpu_check.sh step trainer    # only the named ones (tiny | step | trainer | throughput)
#   bash benchmarks/gpu_check.sh throughput      # issue I: eager vs optimised, SD3.5-M + rewards, FLUX.1-dev (~8 min)
set -uo pipefail
OUT="${OUT:-/tmp/gpu_check}"
CHECKS="${*:-tiny step trainer}"
START=$(date +%s)
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled AWM_CACHE_DIR=/tmp/awm_cache PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, diffusers, peft, transformers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"

# 1. The training script itself on CUDA: tiny preset, fp16 autocast + grad scaler, then bf16.
if [[ " $CHECKS " == *" tiny "* ]]; then
  for precision in fp16 bf16; do
    start=$(date +%s)
    python3 advantage_weighted_matching/scripts/train_sd3_awm.py \
      --config advantage_weighted_matching/config/tiny_awm.py:tiny_cpu --config.mixed_precision=$precision \
      --config.save_dir=/tmp/tiny_$precision --config.num_epochs=3 > "$OUT/tiny_$precision.log" 2>&1
    echo "tiny $precision: rc=$? in $(( $(date +%s) - start ))s"
    cp /tmp/tiny_$precision/metrics.jsonl "$OUT/tiny_${precision}_metrics.jsonl" 2>/dev/null
    tail -c 600 "$OUT/tiny_$precision.log"; echo
  done
fi

# 2. Real-size SD3.5-Medium shapes: rollout vs diffusers __call__ (interleaved), one training
#    micro-batch, and profiler tables of both rollouts.
if [[ " $CHECKS " == *" step "* ]]; then
  start=$(date +%s)
  python3 benchmarks/realsize_step.py --size sd35m --repeats 5 --profile --out "$OUT/realsize_sd35m.json" \
    > "$OUT/realsize_step.log" 2>&1
  echo "realsize_step: rc=$? in $(( $(date +%s) - start ))s"
  tail -n 14 "$OUT/realsize_step.log"
fi

# 3. Trainer overhead at SD3.5-Medium shapes: the real training script, epoch wall / model time.
if [[ " $CHECKS " == *" trainer "* ]]; then
  start=$(date +%s)
  python3 benchmarks/realsize_trainer.py --epochs 3 --out "$OUT/realsize_trainer.json" > "$OUT/realsize_trainer.log" 2>&1
  echo "realsize_trainer: rc=$? in $(( $(date +%s) - start ))s"
  tail -n 12 "$OUT/realsize_trainer.log"
fi

# 4. Issue I (throughput): eager baseline vs the optimised path in one process, at SD3.5-Medium
#    shapes with the rewards at real shapes (I.3), then FLUX.1-dev shapes in bf16 with
#    checkpointing (issue K.4). Each command has its own time limit and writes its JSON after
#    every stage, so a command cut short still returns what it measured. About 8 minutes.
throughput() {  # size, time limit (s), then benchmark arguments
  local size=$1 limit=$2 start
  shift 2
  start=$(date +%s)
  timeout --signal=INT --kill-after=20 "$limit" python3 benchmarks/throughput.py --size "$size" "$@" \
    --out "$OUT/throughput_${size}.json" > "$OUT/throughput_${size}.log" 2>&1
  echo "throughput $size: rc=$? in $(( $(date +%s) - start ))s"
  tail -n 30 "$OUT/throughput_${size}.log"
}
if [[ " $CHECKS " == *" throughput "* ]]; then
  throughput sd35m 330 --rewards --repeats 3
  throughput flux 180 --repeats 1
fi
echo "gpu_check: $(( $(date +%s) - START ))s"
