# shellcheck shell=bash
#
# Shared logic of the AWM launchers (train_awm_scripts_*/train_*.sh).
#
# A launcher sources this file and calls
#     awm_launch single <preset> "$@"   # 1 node x 8 GPUs, accelerate_configs/multi_gpu.yaml
#     awm_launch multi  <preset> "$@"   # 4 nodes x 8 GPUs, accelerate_configs/multi_node.yaml
# where <preset> names a function of advantage_weighted_matching/config/dgx_awm.py
# and "$@" are extra trainer arguments (`--config.key=value` overrides).
#
# What a launch does:
#   * cd to the repository root, so it works from any directory;
#   * multi-node: requires RANK (this machine's rank), MASTER_ADDR and
#     MASTER_PORT; NUM_MACHINES (4) and NUM_PROCESSES (32) may override;
#     single node: NUM_PROCESSES (8) and MAIN_PROCESS_PORT (29501) may override;
#   * logs in with `hf auth login` / `huggingface-cli login` when
#     HUGGINGFACE_TOKEN is set and with `wandb login` when WANDB_API_KEY is set;
#   * creates the run directory logs/<preset>_<YYYYmmdd_HHMMSS>/ (AWM_RUN_DIR
#     overrides it, e.g. to share one directory between nodes), copies all
#     output to train.log there (train_node<RANK>.log on machines of rank > 0)
#     and passes --config.save_dir=<run dir> unless the arguments already set
#     config.save_dir;
#   * runs `accelerate launch` in its own process group, forwards SIGINT and
#     SIGTERM to that group, waits for it and exits with its exit status.
# Rewards are computed inside the trainer: no reward server is started.

AWM_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
AWM_ACCELERATE_CONFIG_DIR="advantage_weighted_matching/accelerate_configs"
AWM_TRAIN_SCRIPT="advantage_weighted_matching/scripts/train_sd3_awm.py"
AWM_PRESET_FILE="advantage_weighted_matching/config/dgx_awm.py"

awm_die() {
    echo "error: $*" >&2
    exit 2
}

awm_log() {
    echo "[awm-launch] $*"
}

# Succeeds when one of the arguments sets config.save_dir.
awm_has_save_dir_arg() {
    local arg
    for arg in "$@"; do
        case "${arg}" in
            --config.save_dir | --config.save_dir=*) return 0 ;;
        esac
    done
    return 1
}

awm_require_env() {
    local name
    local missing=()
    for name in "$@"; do
        if [[ -z "${!name:-}" ]]; then
            missing+=("${name}")
        fi
    done
    if ((${#missing[@]} > 0)); then
        awm_die "multi-node launch needs ${missing[*]} to be set" \
            "(RANK: this machine's rank 0..NUM_MACHINES-1; MASTER_ADDR/MASTER_PORT: address and port of the rank-0 machine)"
    fi
}

awm_login() {
    if [[ -n "${HUGGINGFACE_TOKEN:-}" ]]; then
        if command -v hf >/dev/null 2>&1; then
            hf auth login --token "${HUGGINGFACE_TOKEN}" || awm_die "hf auth login failed"
        elif command -v huggingface-cli >/dev/null 2>&1; then
            huggingface-cli login --token "${HUGGINGFACE_TOKEN}" || awm_die "huggingface-cli login failed"
        else
            awm_log "warning: no hf/huggingface-cli found; exporting HF_TOKEN instead of logging in"
        fi
        # huggingface_hub also reads the token from the environment.
        export HF_TOKEN="${HUGGINGFACE_TOKEN}"
    fi
    if [[ -n "${WANDB_API_KEY:-}" ]]; then
        if command -v wandb >/dev/null 2>&1; then
            wandb login "${WANDB_API_KEY}" || awm_die "wandb login failed"
        else
            awm_log "warning: wandb not found; WANDB_API_KEY stays in the environment"
        fi
    fi
}

# Forward a signal to the training process group. A trap runs this while
# awm_wait_training is blocked in `wait`.
awm_forward_signal() {
    local signal="$1"
    AWM_INTERRUPTED=1
    if [[ -n "${AWM_TRAIN_PID:-}" ]]; then
        awm_log "received SIG${signal}; forwarding it to the training processes (group ${AWM_TRAIN_PID})" >&2
        kill -s "${signal}" -- "-${AWM_TRAIN_PID}" 2>/dev/null || true
    fi
}

# Wait for the training process; a trapped signal interrupts `wait`, so wait
# again until the process itself has ended. Sets AWM_TRAIN_STATUS.
awm_wait_training() {
    while true; do
        AWM_INTERRUPTED=0
        if wait "${AWM_TRAIN_PID}"; then
            AWM_TRAIN_STATUS=0
        else
            AWM_TRAIN_STATUS=$?
        fi
        if ((AWM_INTERRUPTED == 0)); then
            return 0
        fi
    done
}

awm_launch() {
    local mode="$1"
    local preset="$2"
    shift 2
    local user_args=("$@")

    cd "${AWM_REPO_ROOT}" || awm_die "cannot cd to ${AWM_REPO_ROOT}"

    local launch_args=()
    local log_name="train.log"
    case "${mode}" in
        single)
            launch_args=(
                --config_file "${AWM_ACCELERATE_CONFIG_DIR}/multi_gpu.yaml"
                --num_processes "${NUM_PROCESSES:-8}"
                --main_process_port "${MAIN_PROCESS_PORT:-29501}"
            )
            ;;
        multi)
            awm_require_env RANK MASTER_ADDR MASTER_PORT
            [[ "${RANK}" =~ ^[0-9]+$ ]] || awm_die "RANK must be a non-negative integer, got '${RANK}'"
            launch_args=(
                --config_file "${AWM_ACCELERATE_CONFIG_DIR}/multi_node.yaml"
                --machine_rank "${RANK}"
                --main_process_ip "${MASTER_ADDR}"
                --main_process_port "${MASTER_PORT}"
                --num_machines "${NUM_MACHINES:-4}"
                --num_processes "${NUM_PROCESSES:-32}"
            )
            if ((RANK > 0)); then
                log_name="train_node${RANK}.log"
            fi
            ;;
        *)
            awm_die "awm_launch: unknown mode '${mode}' (expected single or multi)"
            ;;
    esac

    command -v accelerate >/dev/null 2>&1 ||
        awm_die "'accelerate' is not on PATH; activate the project's virtual environment first"

    local run_dir="${AWM_RUN_DIR:-logs/${preset}_$(date +%Y%m%d_%H%M%S)}"
    mkdir -p "${run_dir}"
    run_dir="$(cd "${run_dir}" && pwd)"
    local log_file="${run_dir}/${log_name}"

    local train_args=(--config "${AWM_PRESET_FILE}:${preset}")
    if ! awm_has_save_dir_arg "${user_args[@]}"; then
        train_args+=("--config.save_dir=${run_dir}")
    fi
    train_args+=("${user_args[@]}")

    # From here on everything is copied to the log file. `tee -i` ignores
    # SIGINT so that a Ctrl-C does not cut the log before training has ended.
    exec {AWM_STDOUT_FD}>&1 {AWM_STDERR_FD}>&2
    exec > >(tee -i -a "${log_file}") 2>&1
    local tee_pid=$!

    awm_log "preset: ${preset}"
    awm_log "run directory: ${run_dir}"
    awm_log "log file: ${log_file}"
    awm_login

    local dataset_name="${preset%%_*}"
    if [[ ! -d "dataset/${dataset_name}" ]]; then
        awm_log "warning: dataset/${dataset_name} does not exist; fetch it with" \
            "'python setup/download_datasets.py --only ${dataset_name}' (or pass --config.dataset=...)"
    fi

    local command=(accelerate launch "${launch_args[@]}" "${AWM_TRAIN_SCRIPT}" "${train_args[@]}")
    awm_log "running: ${command[*]}"

    AWM_TRAIN_PID=""
    trap 'awm_forward_signal INT' INT
    trap 'awm_forward_signal TERM' TERM
    # Monitor mode puts the background job in a process group of its own, so
    # signals can be sent to accelerate and all the processes it starts.
    set -m
    "${command[@]}" &
    AWM_TRAIN_PID=$!
    set +m
    awm_wait_training
    trap - INT TERM

    if ((AWM_TRAIN_STATUS == 0)); then
        awm_log "training finished; run directory: ${run_dir}"
    else
        awm_log "training failed with exit status ${AWM_TRAIN_STATUS}; see ${log_file}"
    fi

    # Close our end of the pipe into tee and give it a moment to flush (a
    # process left behind by the trainer may keep the pipe open: do not hang).
    exec 1>&"${AWM_STDOUT_FD}" 2>&"${AWM_STDERR_FD}"
    local waited=0
    while kill -0 "${tee_pid}" 2>/dev/null && ((waited < 50)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    exit "${AWM_TRAIN_STATUS}"
}
