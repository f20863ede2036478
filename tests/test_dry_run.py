"""`train_sd3_awm.py --dry_run`: the batch plan of every SD3.5 preset, checked
against SPEC section 1 worked out by hand, without loading any model.

Each run is a real subprocess of the script (what a user types). All eight runs
of this file go concurrently: each costs ~2.5 s of CPU (importing torch), so the
file takes ~10-20 s on two cores. "Fast" is asserted on the child's CPU time,
which other load on the machine does not inflate.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "advantage_weighted_matching" / "scripts" / "train_sd3_awm.py"
PRESET_FILE = REPO_ROOT / "advantage_weighted_matching" / "config" / "dgx_awm.py"
MISSING_MODEL = "/nonexistent/awm-dry-run/stable-diffusion-3.5-medium"
HEAVY_MODULES = ("diffusers", "transformers", "peft", "wandb")

# SPEC section 1, by hand. Shared by all six presets: sample.train_batch_size 6,
# num_image_per_prompt k = 24, train_timesteps 6, num_inner_epochs 1.
# Per preset: (processes, num_batches_per_epoch as the SPEC table writes it, train.batch_size).
B, K, T = 6, 24, 6
SPEC_TABLE = {
    "geneval_sd3_no_cfg_1node": (8, 24 * 24 // 8 // 2, 3),
    "geneval_sd3_no_cfg_4nodes": (32, 24 * 24 // 32 // 2, 3),
    "ocr_sd3_no_cfg_1node": (8, 24 * 24 // 8 // 2, 3),
    "ocr_sd3_no_cfg_4nodes": (32, 24 * 24 // 32 // 2, 3),
    "pickscore_sd3_no_cfg_1node": (8, 8 * 24 // 8 // 2, 2),
    "pickscore_sd3_no_cfg_4nodes": (32, 8 * 24 // 32 // 2, 2),
}


def expected_plan(preset):
    processes, num_batches, micro = SPEC_TABLE[preset]
    accumulation = B // micro * num_batches  # SPEC: gradient_accumulation_steps = num_batches_per_epoch (train)
    return {
        "num_processes": processes,
        "images_per_epoch": processes * B * num_batches,
        "group_size": K,
        "groups_per_rollout_batch": processes * B // K,
        "prompt_groups_per_epoch": processes * B * num_batches // K,
        "images_per_rank_per_epoch": B * num_batches,
        "micro_batches_per_rank": B * num_batches // micro,
        "passes_per_micro_batch": 1,  # AWM: one forward/backward of T x micro rows
        "rows_per_micro_batch": T * micro,
        "optimizer_steps_per_epoch": 1,  # SPEC: one optimizer step per epoch in every preset
        "total_train_batch": micro * processes * accumulation,
    }


# The worked examples, as literal numbers (guards the formulas above too).
LITERAL = {
    # 8 x 6 x 36 = 1728 images = 72 groups of 24; 216 images/rank in 72 micro-batches of 3; 3 x 8 x 72 = 1728
    "geneval_sd3_no_cfg_1node": dict(images_per_epoch=1728, prompt_groups_per_epoch=72,
                                     groups_per_rollout_batch=2, images_per_rank_per_epoch=216,
                                     micro_batches_per_rank=72, rows_per_micro_batch=18, total_train_batch=1728),
    # 32 x 6 x 9 = 1728 = 72 groups; 54 images/rank in 18 micro-batches; 3 x 32 x 18 = 1728
    "geneval_sd3_no_cfg_4nodes": dict(images_per_epoch=1728, prompt_groups_per_epoch=72,
                                      groups_per_rollout_batch=8, images_per_rank_per_epoch=54,
                                      micro_batches_per_rank=18, rows_per_micro_batch=18, total_train_batch=1728),
    # 8 x 6 x 12 = 576 = 24 groups; 72 images/rank in 36 micro-batches of 2; 2 x 8 x 36 = 576
    "pickscore_sd3_no_cfg_1node": dict(images_per_epoch=576, prompt_groups_per_epoch=24,
                                       groups_per_rollout_batch=2, images_per_rank_per_epoch=72,
                                       micro_batches_per_rank=36, rows_per_micro_batch=12, total_train_batch=576),
    # 32 x 6 x 3 = 576 = 24 groups; 18 images/rank in 9 micro-batches; 2 x 32 x 9 = 576
    "pickscore_sd3_no_cfg_4nodes": dict(images_per_epoch=576, prompt_groups_per_epoch=24,
                                        groups_per_rollout_batch=8, images_per_rank_per_epoch=18,
                                        micro_batches_per_rank=9, rows_per_micro_batch=12, total_train_batch=576),
}
LITERAL["ocr_sd3_no_cfg_1node"] = LITERAL["geneval_sd3_no_cfg_1node"]
LITERAL["ocr_sd3_no_cfg_4nodes"] = LITERAL["geneval_sd3_no_cfg_4nodes"]


def dry_run(preset, *extra, num_processes=None, env=None, cwd=None):
    """Run the script with --dry_run.

    Returns (CompletedProcess, CPU seconds of the child, imported top-level modules).
    CPU time, not wall time: other test sessions may load the machine, and a dry
    run that loaded a model would burn far more CPU than the ~2.5 s of importing torch.
    """
    command = [sys.executable, "-X", "importtime", str(SCRIPT), f"--config={PRESET_FILE}:{preset}",
               f"--config.pretrained.model={MISSING_MODEL}", "--dry_run", *extra]
    if num_processes is not None:
        command.append(f"--num_processes={num_processes}")
    run_env = {key: value for key, value in os.environ.items() if key != "WORLD_SIZE"}
    run_env.update({"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(env or {})})
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=run_env, cwd=cwd, text=True)
        killer = threading.Timer(120, process.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            killer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    # -X importtime writes "import time: self | cumulative | module" lines to stderr.
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0]
                for line in stderr.splitlines() if line.startswith("import time:") and "|" in line}
    stderr = "\n".join(line for line in stderr.splitlines() if not line.startswith("import time:"))
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    return result, usage.ru_utime + usage.ru_stime, imported


# SPEC 7, Flow-GRPO's SD3 configs by hand: 32 GPUs x 9 images x 4 batches = 1152 images = 48 groups
# of 24 (12 per rollout batch); per rank 36 images in 4 micro-batches of 9 (a whole rollout batch);
# each micro-batch trains steps j < int(10 * 0.99) = 9, one pass each of 9 x 2 rows (CFG halves);
# accumulation 4 // 2 = 2 micro-batches -> 2 optimizer steps per epoch; 9 x 32 x 2 = 576 samples/step.
FLOW_GRPO_PLAN = {
    "num_processes": 32, "images_per_epoch": 1152, "group_size": 24, "groups_per_rollout_batch": 12,
    "prompt_groups_per_epoch": 48, "images_per_rank_per_epoch": 36, "micro_batches_per_rank": 4,
    "passes_per_micro_batch": 9, "rows_per_micro_batch": 18, "optimizer_steps_per_epoch": 2,
    "total_train_batch": 576,
}
FLOW_GRPO_PRESETS = ("flow_grpo_geneval_sd3", "flow_grpo_ocr_sd3", "flow_grpo_pickscore_sd3")

# Extra cases beside the six presets: (preset, process count, env, extra args).
EXTRA_CASES = {
    "world_size_env": ("pickscore_sd3_no_cfg_4nodes", None, {"WORLD_SIZE": "32"}, ()),
    "invalid_3_processes": ("geneval_sd3_no_cfg_1node", 3, None, ()),
    **{name: (name, 32, None, ()) for name in FLOW_GRPO_PRESETS},
    # issue G acceptance: the reference's top-level key works as an override on the 1node presets
    **{f"time_type_uniform_{name}": (name, 8, None, ("--config.time_type=uniform",))
       for name in ("geneval_sd3_no_cfg_1node", "ocr_sd3_no_cfg_1node", "pickscore_sd3_no_cfg_1node")},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case of this file, concurrently (each in its own empty cwd)."""
    cases = {preset: (preset, SPEC_TABLE[preset][0], None, ()) for preset in SPEC_TABLE}
    cases.update(EXTRA_CASES)
    cwds = {name: tmp_path_factory.mktemp(name) for name in cases}
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {name: pool.submit(dry_run, preset, *extra, num_processes=processes, env=env, cwd=cwds[name])
                   for name, (preset, processes, env, extra) in cases.items()}
        return {name: (*future.result(), cwds[name]) for name, future in futures.items()}


def test_hand_formulas_match_the_worked_examples():
    for preset, literal in LITERAL.items():
        plan = expected_plan(preset)
        assert {key: plan[key] for key in literal} == literal, preset


@pytest.mark.parametrize("preset", sorted(SPEC_TABLE))
def test_preset_batch_plan_matches_spec(preset, runs):
    result, seconds, imported, cwd = runs[preset]
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 2, result.stdout  # one human line, one JSON line
    human, plan = lines[0], json.loads(lines[1])
    expected = expected_plan(preset)
    assert plan == expected
    processes = expected["num_processes"]
    assert human.startswith(f"batch plan ({processes} processes): {expected['images_per_epoch']} images/epoch")
    assert f"{expected['prompt_groups_per_epoch']} prompt groups x 24 images" in human
    assert f"total train batch {expected['total_train_batch']} samples/step" in human
    # Exits before any model code: a nonexistent model path is fine, nothing heavy imported,
    # nothing written to the working directory (no logs/ run dir).
    assert not imported & set(HEAVY_MODULES), sorted(imported & set(HEAVY_MODULES))
    assert "torch" in imported  # the importtime capture itself works
    assert list(cwd.iterdir()) == []
    assert seconds < 15, f"dry run used {seconds:.1f} s of CPU"


@pytest.mark.parametrize("preset", FLOW_GRPO_PRESETS)
def test_flow_grpo_preset_batch_plan(preset, runs):
    result, seconds, imported, cwd = runs[preset]
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == FLOW_GRPO_PLAN
    assert "each 9 forward/backward pass(es) of 18 rows; 2 optimizer step(s)/epoch" in result.stdout
    assert not imported & set(HEAVY_MODULES) and list(cwd.iterdir()) == []


@pytest.mark.parametrize("preset", ["geneval_sd3_no_cfg_1node", "ocr_sd3_no_cfg_1node", "pickscore_sd3_no_cfg_1node"])
def test_reference_time_type_override_accepted(preset, runs):
    result, _, _, _ = runs[f"time_type_uniform_{preset}"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == expected_plan(preset)


def test_world_size_env_is_the_default_process_count(runs):
    result, _, _, _ = runs["world_size_env"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == expected_plan("pickscore_sd3_no_cfg_4nodes")


def test_invalid_process_count_names_num_image_per_prompt(runs):
    # 3 processes x 6 images = 18 images per rollout batch: not whole groups of 24.
    result, seconds, imported, _ = runs["invalid_3_processes"]
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "sample.num_image_per_prompt" in output
    assert "3 * 6" in output  # names the product that fails
    assert "batch plan" not in result.stdout  # no plan printed for an invalid config
    assert not imported & set(HEAVY_MODULES)
    assert seconds < 15

