#!/usr/bin/env bash
# One-command setup: creates .venv and installs the project with its test extras.
#
#   bash setup_env.sh                       # venv + project + tests (CPU or GPU)
#   bash setup_env.sh --reward-weights ocr,pickscore,geneval   # + prefetch reward models (internet)
#   bash setup_env.sh --datasets            # + download the published prompt sets (internet)
#
# Without an NVIDIA GPU, torch==2.13.0 (CPU build) is installed first, so pip
# does not pull a multi-GB CUDA build. Safe to run again: it reuses .venv and
# only installs what is missing.
set -euo pipefail

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
}

reward_weights=""
datasets=0
extras="test"
python_bin="${PYTHON:-python3}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --reward-weights) reward_weights="${2:?--reward-weights needs a list, e.g. ocr,pickscore,geneval}"; shift 2 ;;
    --datasets) datasets=1; shift ;;
    --extras) extras="${2:?--extras needs a list, e.g. test,eightbit}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "setup_env.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

cd "$(dirname "${BASH_SOURCE[0]}")"
say() { printf '[setup_env] %s\n' "$*"; }

# 1. virtual environment
if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv with $("$python_bin" --version 2>&1)"
  "$python_bin" -m venv .venv
else
  say "reusing .venv ($(.venv/bin/python --version 2>&1))"
fi
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install --quiet --upgrade pip

# 2. torch: CPU build unless an NVIDIA GPU is present
if python -c "import torch" 2>/dev/null; then
  say "torch $(python -c 'import torch; print(torch.__version__)') already installed"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  say "NVIDIA GPU found: installing the default (CUDA) torch build"
  python -m pip install --quiet "torch>=2.13"
else
  say "no NVIDIA GPU: installing torch==2.13.0 (CPU build) first"
  python -m pip install --quiet "torch==2.13.0"
fi

# 3. the project, editable, with extras
say "installing the project with extras [$extras]"
python -m pip install --quiet -e ".[${extras}]"
python -c "import advantage_weighted_matching, diffusers, transformers, peft, accelerate; print('[setup_env] imports ok: diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)"

# 4. optional: reward model weights and published prompt sets (need internet)
if [[ -n "$reward_weights" ]]; then
  say "prefetching reward weights: $reward_weights"
  python setup/prefetch_reward_weights.py --rewards "$reward_weights"
fi
if [[ "$datasets" == 1 ]]; then
  say "downloading the published prompt sets into dataset/"
  python setup/download_datasets.py
fi

say "done. Activate with: source .venv/bin/activate"
