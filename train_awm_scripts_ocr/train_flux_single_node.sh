#!/usr/bin/env bash
# AWM on FLUX.1-dev, ocr: one node x 8 GPUs, preset ocr_flux_1node (bf16, gradient
# checkpointing; the choices are listed in the README, "FLUX.1-dev presets").
#
#   bash train_awm_scripts_ocr/train_flux_single_node.sh [--config.key=value ...]
#
# Environment: as train_single_node.sh (NUM_PROCESSES, MAIN_PROCESS_PORT, AWM_RUN_DIR, ...).
set -euo pipefail
# shellcheck source=SCRIPTDIR/../advantage_weighted_matching/scripts/launch_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../advantage_weighted_matching/scripts/launch_common.sh"
awm_launch single ocr_flux_1node "$@"
