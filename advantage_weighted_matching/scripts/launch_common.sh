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
#   * checks the config for NUM_PROCESSES processes once, before any rank
#     starts (`python -m advantage_weighted_matching.preflight`): a bad value,
#     a process count that splits a prompt group, a missing model or
#     resume_from is one message and exit status 2. With `--dry_run` among the
#     arguments it prints the batch plan and stops there: no rank, no run
#     directory, no log;
#   * logs in with `hf auth login` / `huggingface-cli login` when
#     HUGGINGFACE_TOKEN is set and with `wandb login` when WANDB_API_KEY is set;
#   * creates the run directory logs/<preset>_<YYYYmmdd_HHMMSS>/ (AWM_RUN_DIR
#     overrides it, e.g. to share one directory between nodes) and passes
#     --config.save_dir=<run dir> unless the arguments already set
#     config.save_dir;
#   * runs `accelerate launch` in its own process group with its output going
#     straight to train.log there (train_node<RANK>.log on machines of rank
#     > 0): never into a pipe, so a closed console or a killed log viewer
#     cannot hurt training. A `tail` that ignores INT/TERM/HUP shows the log
#     on the console;
#   * SIGINT, SIGTERM and SIGHUP to the launcher or to its process group are
#     forwarded to accelerate's group; torch's elastic agent passes them on to
#     every rank (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, default here 600 s, is how
#     long it then waits before SIGKILL), and each rank saves a checkpoint at
#     its next safe point and exits. accelerate runs with PDEATHSIG=TERM
#     (setpriv): if the launcher dies without forwarding (SIGKILL), accelerate
#     gets SIGTERM all the same, and each rank also asks for SIGTERM when its
#     own parent dies. The launcher waits until accelerate has exited, then
#     exits 128 + the signal (130, 143, 129) after a stop, else with
#     accelerate's exit status.
# Rewards are computed inside the trainer: no reward server is started.

AWM_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
AWM_ACCELERATE_CONFIG_DIR="advantage_weighted_matching/accelerate_configs"
AWM_TRAIN_SCRIPT="advantage_weighted_matching/scripts/train_sd3_awm.py"
AWM_PRESET_FILE="advantage_weighted_matching/config/dgx_awm.py"

awm_die() {
    echo "error: $*" >&2
    exit 2
}

# A message on the console and, once the run directory exists, in its log file.
awm_log() {
    echo "[awm-launch] $*" || true
    if [[ -n "${AWM_LOG_FILE:-}" ]]; then
        echo "[awm-launch] $*" >>"${AWM_LOG_FILE}" || true
    fi
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

# The save_dir the trainer uses: the last --config.save_dir among "$2"..., else "$1".
awm_save_dir() {
    local save_dir="$1" previous=""
    shift
    local arg
    for arg in "$@"; do
        case "${arg}" in
            --config.save_dir=*) save_dir="${arg#--config.save_dir=}" ;;
        esac
        if [[ "${previous}" == --config.save_dir ]]; then
            save_dir="${arg}"
        fi
        previous="${arg}"
    done
    echo "${save_dir}"
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
# awm_wait_training is blocked in `wait`; during training the console shows the
# log file (tail), so the note goes to the log file only.
awm_forward_signal() {
    local signal="$1"
    AWM_INTERRUPTED=1
    AWM_STOP_SIGNAL="${AWM_STOP_SIGNAL:-${signal}}"
    if [[ -n "${AWM_TRAIN_PID:-}" ]]; then
        echo "[awm-launch] received SIG${signal}; forwarding it to the training processes (group ${AWM_TRAIN_PID}):" \
            "they save a checkpoint and exit" >>"${AWM_LOG_FILE}" 2>/dev/null || true
        kill -s "${signal}" -- "-${AWM_TRAIN_PID}" 2>/dev/null || true
    else
        exit $((128 + $(kill -l "${signal}")))  # nothing started yet: nothing to save
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

# Succeeds when the arguments ask for a dry run.
awm_has_dry_run_arg() {
    local arg
    for arg in "$@"; do
        case "${arg}" in
            --dry_run | --dry_run=true | --dry_run=True | --dry_run=1) return 0 ;;
        esac
    done
    return 1
}

awm_require_positive_int() {
    local name="$1"
    if ! [[ "${!name}" =~ ^[0-9]+$ ]] || ((10#${!name} == 0)); then
        awm_die "${name} must be a positive integer, got '${!name}'"
    fi
}

awm_launch() {
    local mode="$1"
    local preset="$2"
    shift 2
    local user_args=("$@")

    cd "${AWM_REPO_ROOT}" || awm_die "cannot cd to ${AWM_REPO_ROOT}"

    local launch_args=()
    local log_name="train.log"
    NUM_PROCESSES="${NUM_PROCESSES:-$([[ "${mode}" == multi ]] && echo 32 || echo 8)}"
    awm_require_positive_int NUM_PROCESSES
    case "${mode}" in
        single)
            MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-29501}"
            awm_require_positive_int MAIN_PROCESS_PORT
            launch_args=(
                --config_file "${AWM_ACCELERATE_CONFIG_DIR}/multi_gpu.yaml"
                --num_processes "${NUM_PROCESSES}"
                --main_process_port "${MAIN_PROCESS_PORT}"
            )
            ;;
        multi)
            awm_require_env RANK MASTER_ADDR MASTER_PORT
            [[ "${RANK}" =~ ^[0-9]+$ ]] || awm_die "RANK must be a non-negative integer, got '${RANK}'"
            NUM_MACHINES="${NUM_MACHINES:-4}"
            awm_require_positive_int NUM_MACHINES
            launch_args=(
                --config_file "${AWM_ACCELERATE_CONFIG_DIR}/multi_node.yaml"
                --machine_rank "${RANK}"
                --main_process_ip "${MASTER_ADDR}"
                --main_process_port "${MASTER_PORT}"
                --num_machines "${NUM_MACHINES}"
                --num_processes "${NUM_PROCESSES}"
            )
            if ((RANK > 0)); then
                log_name="train_node${RANK}.log"
            fi
            ;;
        *)
            awm_die "awm_launch: unknown mode '${mode}' (expected single or multi)"
            ;;
    esac

    local run_dir="${AWM_RUN_DIR:-logs/${preset}_$(date +%Y%m%d_%H%M%S)}"
    [[ "${run_dir}" == /* ]] || run_dir="${PWD}/${run_dir}"
    local train_args=(--config "${AWM_PRESET_FILE}:${preset}")
    if ! awm_has_save_dir_arg "${user_args[@]}"; then
        train_args+=("--config.save_dir=${run_dir}")
    fi
    train_args+=("${user_args[@]}")

    # The config is checked once, here, before any rank starts; a dry run ends here.
    local python="${AWM_PYTHON:-python}"
    command -v "${python}" >/dev/null 2>&1 ||
        awm_die "'${python}' is not on PATH; activate the project's virtual environment first"
    local plan
    plan="$("${python}" -m advantage_weighted_matching.preflight --num_processes "${NUM_PROCESSES}" \
        "${train_args[@]}")" || exit 2
    if awm_has_dry_run_arg "${user_args[@]}"; then
        echo "${plan}"
        exit 0
    fi

    command -v accelerate >/dev/null 2>&1 ||
        awm_die "'accelerate' is not on PATH; activate the project's virtual environment first"
    mkdir -p "${run_dir}" || awm_die "cannot create the run directory ${run_dir}"
    AWM_LOG_FILE="${run_dir}/${log_name}"
    : >>"${AWM_LOG_FILE}" || awm_die "cannot write ${AWM_LOG_FILE}"

    # A closed console must not end the launcher; messages go to both.
    trap '' PIPE
    awm_log "preset: ${preset}"
    awm_log "run directory: ${run_dir}"
    awm_log "log file: ${AWM_LOG_FILE}"
    awm_log "${plan}"
    awm_login

    local dataset_name="${preset%%_*}"
    if [[ ! -d "dataset/${dataset_name}" ]]; then
        awm_log "warning: dataset/${dataset_name} does not exist; fetch it with" \
            "'python setup/download_datasets.py --only ${dataset_name}' (or pass --config.dataset=...)"
    fi

    # Without a deadline of its own, torch's agent SIGKILLs the ranks 30 s after
    # forwarding a stop: not always enough to reach a safe point and save.
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"
    local command=(accelerate launch "${launch_args[@]}" "${AWM_TRAIN_SCRIPT}" "${train_args[@]}")
    local with_parent=()
    if setpriv --help 2>/dev/null | grep -q -- --pdeathsig; then
        with_parent=(setpriv --pdeathsig TERM --)  # accelerate gets SIGTERM if this script dies
    else
        awm_log "warning: no 'setpriv --pdeathsig' (util-linux); if this launcher is SIGKILLed, stop accelerate by hand"
    fi
    awm_log "running: ${command[*]}"

    AWM_TRAIN_PID=""
    AWM_STOP_SIGNAL=""
    trap 'awm_forward_signal INT' INT
    trap 'awm_forward_signal TERM' TERM
    trap 'awm_forward_signal HUP' HUP
    local offset  # the console view starts where training's output will
    offset=$(($(wc -c <"${AWM_LOG_FILE}") + 1))
    # Monitor mode puts the background job in a process group of its own, so
    # signals can be sent to accelerate and all the processes it starts.
    set -m
    "${with_parent[@]}" "${command[@]}" </dev/null >>"${AWM_LOG_FILE}" 2>&1 &
    AWM_TRAIN_PID=$!
    set +m
    (
        trap '' INT TERM HUP
        exec tail -c "+${offset}" -s 0.2 -F --pid="${AWM_TRAIN_PID}" "${AWM_LOG_FILE}" 2>/dev/null
    ) &
    local tail_pid=$!
    awm_wait_training
    trap - INT TERM HUP
    local waited=0  # tail ends by itself, having shown everything, once accelerate has ended
    while kill -0 "${tail_pid}" 2>/dev/null && ((waited < 50)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    kill -KILL "${tail_pid}" 2>/dev/null || true  # it ignores INT/TERM/HUP

    if [[ -n "${AWM_STOP_SIGNAL}" ]]; then
        awm_log "stopped by SIG${AWM_STOP_SIGNAL} (accelerate exit status ${AWM_TRAIN_STATUS}); the trainer saved a" \
            "checkpoint: resume with --config.resume_from=$(awm_save_dir "${run_dir}" "${user_args[@]}")"
        exit $((128 + $(kill -l "${AWM_STOP_SIGNAL}")))
    fi
    if ((AWM_TRAIN_STATUS == 0)); then
        awm_log "training finished; run directory: ${run_dir}"
    else
        awm_log "training failed with exit status ${AWM_TRAIN_STATUS}; see ${AWM_LOG_FILE}"
    fi
    exit "${AWM_TRAIN_STATUS}"
}
