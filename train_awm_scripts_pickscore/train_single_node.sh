#!/usr/bin/env bash
# AWM on SD3.5-Medium, PickScore (human preference; in-process PickScore reward):
# one node x 8 GPUs, preset pickscore_sd3_no_cfg_1node.
#
#   bash train_awm_scripts_pickscore/train_single_node.sh [--config.key=value ...]
#
# Environment: NUM_PROCESSES (8), MAIN_PROCESS_PORT (29501), AWM_RUN_DIR,
# HUGGINGFACE_TOKEN, WANDB_API_KEY. See advantage_weighted_matching/scripts/launch_common.sh.
set -euo pipefail
# shellcheck source=SCRIPTDIR/../advantage_weighted_matching/scripts/launch_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../advantage_weighted_matching/scripts/launch_common.sh"
awm_launch single pickscore_sd3_no_cfg_1node "$@"
