#!/usr/bin/env bash
# Fetch, on this machine, the wheels the device machine lacks into .whl/ (git-ignored), for
# `run(carry=[".whl"], command="bash benchmarks/gpu_check.sh ...")`: gpu_check.sh installs them
# with --no-deps into /tmp/site. The device has Python 3.12 on x86-64, torch, transformers,
# accelerate, huggingface_hub, onnxruntime and opencv-python-headless (see NOTES, "GPU machine").
# About 28 MB; the working tree that travels may hold 64 MB.
#
#   bash benchmarks/device_wheels.sh           # trainer + benchmarks, and the OCR reward's RapidOCR
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  diffusers==0.42.1 peft==0.21.2 ml_collections==1.1.0 importlib_metadata==10.2.0 \
  rapidocr-onnxruntime==1.4.4 levenshtein==0.27.5 rapidfuzz==3.14.6 pyclipper==1.4.0 shapely==2.2.0
ls -la .whl
du -sh .whl
