#!/usr/bin/env bash
# GPU checks of the real code paths (run on a CUDA machine from the repo root;
# $OUT collects the results). Wheels for packages the machine lacks are
# expected in .whl/ (diffusers, peft, ml_collections, importlib_metadata).
set -uo pipefail
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled AWM_CACHE_DIR=/tmp/awm_cache PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, diffusers, peft, transformers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"

# 1. The training script itself on CUDA: tiny preset, fp16 autocast + grad scaler, then bf16.
for precision in fp16 bf16; do
  start=$(date +%s)
  python3 advantage_weighted_matching/scripts/train_sd3_awm.py \
    --config advantage_weighted_matching/config/tiny_awm.py:tiny_cpu --config.mixed_precision=$precision \
    --config.save_dir=/tmp/tiny_$precision --config.num_epochs=3 > "$OUT/tiny_$precision.log" 2>&1
  echo "tiny $precision: rc=$? in $(( $(date +%s) - start ))s"
  cp /tmp/tiny_$precision/metrics.jsonl "$OUT/tiny_${precision}_metrics.jsonl" 2>/dev/null
  tail -c 600 "$OUT/tiny_$precision.log"; echo
done

# 2. Real-size SD3.5-Medium shapes: rollout, diffusers __call__, one training micro-batch.
python3 benchmarks/realsize_step.py --size sd35m --repeats 3 --out "$OUT/realsize_sd35m.json" 2>&1 | tail -30
