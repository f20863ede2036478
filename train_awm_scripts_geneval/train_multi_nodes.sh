#!/usr/bin/env bash
# AWM on SD3.5-Medium, GenEval (object composition; in-process Mask2Former + CLIP reward):
# 4 nodes x 8 GPUs, preset geneval_sd3_no_cfg_4nodes. Run it on every node.
#
#   RANK=<0..3> MASTER_ADDR=<rank-0 host> MASTER_PORT=<port> \
#       bash train_awm_scripts_geneval/train_multi_nodes.sh [--config.key=value ...]
#
# Environment: NUM_MACHINES (4), NUM_PROCESSES (32), AWM_RUN_DIR,
# HUGGINGFACE_TOKEN, WANDB_API_KEY. See advantage_weighted_matching/scripts/launch_common.sh.
set -euo pipefail
# shellcheck source=SCRIPTDIR/../advantage_weighted_matching/scripts/launch_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../advantage_weighted_matching/scripts/launch_common.sh"
awm_launch multi geneval_sd3_no_cfg_4nodes "$@"
