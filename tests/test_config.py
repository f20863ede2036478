"""Config presets, base defaults, locking, absl loading and start-up validation (SPEC section 1).

Expected values are written out from the SPEC text, never read back from the
preset code.
"""

import importlib
from pathlib import Path

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from advantage_weighted_matching.config import ConfigError, base_awm, batch_plan, dgx_awm, format_batch_plan, tiny_awm
from advantage_weighted_matching.config.validate import validate

validate_module = importlib.import_module("advantage_weighted_matching.config.validate")

REPO_ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------
# SPEC section 1: values shared by all six SD3.5 presets (dotted key -> value).
SHARED = {
    "pretrained.model": "stabilityai/stable-diffusion-3.5-medium",
    "resolution": 512,
    "sample.num_steps": 14,
    "sample.eval_num_steps": 40,
    "sample.guidance_scale": 1.0,
    "sample.train_batch_size": 6,
    "sample.num_image_per_prompt": 24,
    "sample.test_batch_size": 6,
    "sample.sde_frac": 0.0,
    "sample.global_std": True,
    "train.num_inner_epochs": 1,
    "train.train_timesteps": 6,
    "train.kl_weight": "Uniform",
    "train.advantage_max": 1,
    "train.ema": True,
    "train.timestep_fraction": 0.9,
    "train.loss_type": "exp_first",
    "train.learning_rate": 3e-4,
    "train.weighting": "ghuber",
    "train.ghuber_power": 0.25,
    "train.kl_ema_weight": "Uniform",
    "train.kl_ema_decay": 0.3,
    "train.ema_beta": 1,
    "train.kl_ema_decay_type": "linear",
    "train.off_policy": False,
    "train.use_sa_solver": True,
    "num_epochs": 100000,
    "per_prompt_stat_tracking": True,
    "train.clip_range": 1,
    "lora_type": "attn",
    "time_shift": 3.0,
    "train.decay_steps": 1e10,
    "train.ema_decay": 0.99,
    "train.ema_update_step_interval": 1,
    "mixed_precision": "fp16",
}

# SPEC section 1 table, one row per preset.
# name: (gpus, dataset, prompt_fn, reward_fn, num_batches_per_epoch, noise_level,
#        train.batch_size, beta, time_type, save/eval freq)
TABLE = {
    "geneval_sd3_no_cfg_1node": (8, "geneval", "geneval", {"geneval": 1.0}, 36, 0.4, 3, 0.001, "discrete_wo_init", 50),
    "geneval_sd3_no_cfg_4nodes": (32, "geneval", "geneval", {"geneval": 1.0}, 9, 0.4, 3, 0.001, "discrete_wo_init", 50),
    "ocr_sd3_no_cfg_1node": (8, "ocr", "general_ocr", {"ocr": 1.0}, 36, 0.4, 3, 0.003, "discrete_wo_init", 20),
    "ocr_sd3_no_cfg_4nodes": (32, "ocr", "general_ocr", {"ocr": 1.0}, 9, 0.4, 3, 0.003, "discrete_wo_init", 20),
    "pickscore_sd3_no_cfg_1node": (8, "pickscore", "general_ocr", {"pickscore": 1.0}, 12, 0.0, 2, 0.0001, "discrete", 50),
    "pickscore_sd3_no_cfg_4nodes": (32, "pickscore", "general_ocr", {"pickscore": 1.0}, 3, 0.0, 2, 0.0001, "discrete", 50),
}

# Derived: train_batch_size // train.batch_size * num_batches_per_epoch, by hand.
ACCUMULATION = {
    "geneval_sd3_no_cfg_1node": 72,  # 6 // 3 * 36
    "geneval_sd3_no_cfg_4nodes": 18,  # 6 // 3 * 9
    "ocr_sd3_no_cfg_1node": 72,  # 6 // 3 * 36
    "ocr_sd3_no_cfg_4nodes": 18,  # 6 // 3 * 9
    "pickscore_sd3_no_cfg_1node": 36,  # 6 // 2 * 12
    "pickscore_sd3_no_cfg_4nodes": 9,  # 6 // 2 * 3
}


def _get(config, dotted):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def _set(config, dotted, value):
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    setattr(node, leaf, value)


def test_six_awm_presets_three_flow_grpo_presets_three_flux_presets():
    assert sorted(dgx_awm.PRESETS) == sorted([*TABLE, *FLOW_GRPO, *FLUX])
    assert dgx_awm.PRESET_NUM_PROCESSES == {**{name: row[0] for name, row in TABLE.items()},
                                            **{name: 32 for name in FLOW_GRPO}, **{name: 8 for name in FLUX}}


# FLUX.1-dev presets (issue K): the SD3.5 1node preset of the same reward, with these keys changed.
FLUX = {"geneval_flux_1node": "geneval_sd3_no_cfg_1node", "ocr_flux_1node": "ocr_sd3_no_cfg_1node",
        "pickscore_flux_1node": "pickscore_sd3_no_cfg_1node"}
FLUX_CHANGES = {
    "pretrained.model": "black-forest-labs/FLUX.1-dev", "pretrained.backbone": "flux", "mixed_precision": "bf16",
    "max_sequence_length": 512, "sample.guidance_scale": 3.5, "sample.eval_num_steps": 28,
    "train.gradient_checkpointing": True,
}


@pytest.mark.parametrize("name", sorted(FLUX))
def test_flux_presets_are_the_sd3_presets_on_flux(name):
    from advantage_weighted_matching.checkpoint import flatten_config

    flux = flatten_config(dgx_awm.get_config(name).to_dict())
    sd3 = flatten_config(dgx_awm.get_config(FLUX[name]).to_dict())
    changed = {key for key in flux if flux[key] != sd3[key]}
    assert changed == set(FLUX_CHANGES) | {"run_name"}
    assert {key: flux[key] for key in FLUX_CHANGES} == FLUX_CHANGES
    assert validate(dgx_awm.get_config(name), 8)["optimizer_steps_per_epoch"] == 1


# SPEC 7: Flow-GRPO's published SD3.5 values (its config/grpo.py); name: (dataset, prompt_fn, reward, beta,
# test_batch_size).
FLOW_GRPO = {
    "flow_grpo_geneval_sd3": ("geneval", "geneval", "geneval", 0.04, 14),
    "flow_grpo_ocr_sd3": ("ocr", "general_ocr", "ocr", 0.04, 16),
    "flow_grpo_pickscore_sd3": ("pickscore", "general_ocr", "pickscore", 0.01, 16),
}
FLOW_GRPO_SHARED = {
    "pretrained.model": "stabilityai/stable-diffusion-3.5-medium", "resolution": 512, "mixed_precision": "fp16",
    "sample.num_steps": 10, "sample.eval_num_steps": 40, "sample.guidance_scale": 4.5,
    "sample.train_batch_size": 9, "sample.num_image_per_prompt": 24, "sample.num_batches_per_epoch": 4,
    "sample.noise_level": 0.7, "sample.sde_frac": 1.0, "sample.global_std": True, "train.algorithm": "flow_grpo",
    "train.use_sa_solver": False, "train.cfg": True, "train.batch_size": 9, "train.gradient_accumulation_steps": 2,
    "train.num_batches_per_epoch": 4, "train.timestep_fraction": 0.99, "train.clip_range": 1e-4,
    "train.adv_clip_max": 5.0, "train.advantage_max": 0.0, "train.learning_rate": 3e-4, "train.ema_beta": 0.0,
    "train.off_policy": False, "train.ema": True, "train.lora_rank": 32, "train.lora_alpha": 64, "lora_type": "attn",
    "per_prompt_stat_tracking": True, "save_freq": 60, "eval_freq": 60,
}


@pytest.mark.parametrize("name", sorted(FLOW_GRPO))
def test_flow_grpo_presets(name):
    dataset, prompt_fn, reward, beta, test_batch_size = FLOW_GRPO[name]
    config = dgx_awm.get_config(name)
    for key, value in FLOW_GRPO_SHARED.items():
        assert _get(config, key) == value, (name, key)
    assert config.dataset == str(REPO_ROOT / "dataset" / dataset)
    assert config.prompt_fn == prompt_fn and config.reward_fn.to_dict() == {reward: 1.0}
    assert config.train.beta == beta and config.sample.test_batch_size == test_batch_size
    # 48 groups of 24 per epoch on 32 GPUs: 48 * 24 / (32 * 9) = 4 rollout batches; two optimizer steps
    assert 48 * 24 // (32 * 9) == config.sample.num_batches_per_epoch
    plan = validate(config, 32)
    assert plan["prompt_groups_per_epoch"] == 48 and plan["optimizer_steps_per_epoch"] == 2
    assert plan["passes_per_micro_batch"] == 9  # int(10 * 0.99)


@pytest.mark.parametrize("name", sorted(TABLE))
@pytest.mark.parametrize("key", sorted(SHARED))
def test_shared_values(name, key):
    config = dgx_awm.get_config(name)
    value = _get(config, key)
    assert value == SHARED[key], f"{name}: {key} = {value!r}, SPEC says {SHARED[key]!r}"
    assert type(value) is type(SHARED[key]) or isinstance(SHARED[key], (int, float)) and isinstance(value, float)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_table_row(name):
    gpus, dataset, prompt_fn, reward, batches, noise_level, train_bs, beta, time_type, freq = TABLE[name]
    config = dgx_awm.get_config(name)
    assert config.dataset == str(REPO_ROOT / "dataset" / dataset)
    assert Path(config.dataset).is_absolute()
    assert config.prompt_fn == prompt_fn
    assert config.reward_fn.to_dict() == reward
    assert config.sample.num_batches_per_epoch == batches
    assert config.sample.noise_level == noise_level
    assert config.train.batch_size == train_bs
    assert config.train.beta == beta
    assert config.time_type == time_type
    assert config.save_freq == freq
    assert config.eval_freq == freq
    # the table's formula: groups * k // gpus // 2, groups 24 (geneval, ocr) or 8 (pickscore)
    groups = 8 if name.startswith("pickscore") else 24
    assert groups * 24 // gpus // 2 == batches


@pytest.mark.parametrize("name", sorted(TABLE))
def test_derived_gradient_accumulation(name):
    config = dgx_awm.get_config(name)
    assert config.train.gradient_accumulation_steps == ACCUMULATION[name]
    assert config.train.num_batches_per_epoch == ACCUMULATION[name]  # the reference defines both
    assert ACCUMULATION[name] == 6 // TABLE[name][6] * TABLE[name][4]


def test_preset_selector_rejects_unknown_name():
    with pytest.raises(ValueError, match="ocr_sd3_no_cfg_2nodes"):
        dgx_awm.get_config("ocr_sd3_no_cfg_2nodes")
    with pytest.raises(ValueError, match="tiny_gpu"):
        tiny_awm.get_config("tiny_gpu")


def test_presets_are_independent_objects():
    a = dgx_awm.get_config("ocr_sd3_no_cfg_1node")
    a.train.beta = 0.5
    assert dgx_awm.get_config("ocr_sd3_no_cfg_1node").train.beta == 0.003


# ---------------------------------------------------------------------------
# Base defaults (SPEC section 1).
BASE_DEFAULTS = {
    "seed": 42,
    "logdir": "logs",
    "num_epochs": 100,
    "save_freq": 20,
    "eval_freq": 100,
    "num_checkpoint_limit": 5,
    "mixed_precision": "fp16",
    "allow_tf32": True,
    "resume_from": "",
    "use_lora": True,
    "resolution": 768,
    "pretrained.revision": "main",
    "sample.num_steps": 40,
    "sample.eval_num_steps": 40,
    "sample.guidance_scale": 4.5,
    "sample.train_batch_size": 1,
    "sample.num_image_per_prompt": 1,
    "sample.test_batch_size": 1,
    "sample.num_batches_per_epoch": 2,
    "sample.global_std": False,
    "train.batch_size": 1,
    "train.use_8bit_adam": False,
    "train.learning_rate": 3e-4,
    "train.adam_beta1": 0.9,
    "train.adam_beta2": 0.999,
    "train.adam_weight_decay": 1e-4,
    "train.adam_epsilon": 1e-8,
    "train.gradient_accumulation_steps": 1,
    "train.max_grad_norm": 1.0,
    "train.num_inner_epochs": 1,
    "train.cfg": False,
    "train.adv_clip_max": 5,
    "train.clip_range": 1e-4,
    "train.timestep_fraction": 1.0,
    "train.beta": 0.0,
    "train.ema": False,
    "per_prompt_stat_tracking": True,
}


@pytest.mark.parametrize("key", sorted(BASE_DEFAULTS))
def test_base_defaults(key):
    assert _get(base_awm.get_config(), key) == BASE_DEFAULTS[key]


def test_base_keys_that_spec_lists_without_value_exist():
    config = base_awm.get_config()
    assert isinstance(config.pretrained.model, str) and config.pretrained.model
    assert isinstance(config.sample.noise_level, float)
    assert isinstance(config.sample.sde_frac, float)
    assert isinstance(config.prompt_fn, str)
    assert isinstance(config.reward_fn, ml_collections.ConfigDict) and len(config.reward_fn) >= 1
    assert isinstance(config.save_dir, str)
    # SPEC writes "lora_path None"; the base uses "" (also "no adapter"), which
    # keeps the field a string so that --config.train.lora_path=DIR parses.
    assert config.train.lora_path == ""
    assert not config.train.lora_path


def test_presets_add_no_keys_beyond_base():
    base_keys = set(_flatten(base_awm.get_config().to_dict()))
    assert len(base_keys) > 80
    for config in [dgx_awm.get_config(name) for name in sorted(TABLE)] + [tiny_awm.tiny_cpu(), tiny_awm.tiny_cpu_sde()]:
        assert set(_flatten(config.to_dict())) == base_keys


def _flatten(d, prefix=""):
    """Dotted keys of a nested dict; reward_fn (a name -> weight map) counts as one key."""
    for key, value in d.items():
        if isinstance(value, dict) and key != "reward_fn":
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


# ---------------------------------------------------------------------------
# Locking.
@pytest.mark.parametrize(
    "factory", [base_awm.get_config, dgx_awm.ocr_sd3_no_cfg_1node, tiny_awm.tiny_cpu], ids=["base", "ocr", "tiny"]
)
def test_config_is_locked(factory):
    config = factory()
    with pytest.raises(AttributeError, match="betta"):
        config.train.betta = 1
    with pytest.raises(AttributeError, match="betta"):
        config.betta = 1
    with pytest.raises(AttributeError, match="num_stepz"):
        config.sample.num_stepz = 3
    with pytest.raises(AttributeError, match="modle"):
        config.pretrained.modle = "x"
    with pytest.raises(TypeError):
        config.train.beta = "high"  # type-safe too
    assert "betta" not in config.train


# ---------------------------------------------------------------------------
# Loading through absl config_flags, as the trainer's command line does.
def _load_flags(argv):
    argv = ["train"] + argv
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "preset", flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def test_config_flags_preset_and_override():
    path = REPO_ROOT / "advantage_weighted_matching" / "config" / "dgx_awm.py"
    config = _load_flags([f"--config={path}:ocr_sd3_no_cfg_1node", "--config.train.beta=0.5"])
    assert config.train.beta == 0.5
    assert config.train.batch_size == 3
    assert config.reward_fn.to_dict() == {"ocr": 1.0}
    assert config.train.gradient_accumulation_steps == 72
    assert config.sample.num_batches_per_epoch == 36
    with pytest.raises(AttributeError):
        config.train.betta = 1


def test_config_flags_relative_path_from_repo_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    config = _load_flags(
        ["--config", "advantage_weighted_matching/config/dgx_awm.py:pickscore_sd3_no_cfg_4nodes",
         "--config.sample.noise_level=0.25"]
    )
    assert config.sample.noise_level == 0.25
    assert config.sample.num_batches_per_epoch == 3
    assert config.dataset == str(REPO_ROOT / "dataset" / "pickscore")


def test_config_flags_unknown_override_key_fails():
    path = REPO_ROOT / "advantage_weighted_matching" / "config" / "dgx_awm.py"
    with pytest.raises(Exception, match="betta"):
        _load_flags([f"--config={path}:ocr_sd3_no_cfg_1node", "--config.train.betta=0.5"])


# Issue G.3: every key of the reference's published parameter list, under the reference's
# names, overrides geneval_sd3_no_cfg_1node through the real flag parser (a value of the
# right type that differs from the preset's, so the override is visible).
REFERENCE_OVERRIDES = {
    "resolution": "768", "dataset": "/tmp/prompts", "prompt_fn": "general_ocr", "pretrained.model": "/tmp/model",
    "sample.num_steps": "20", "sample.eval_num_steps": "30", "sample.guidance_scale": "4.5",
    "sample.train_batch_size": "12", "sample.test_batch_size": "8", "sample.num_image_per_prompt": "12",
    "sample.num_batches_per_epoch": "18", "sample.noise_level": "0.7", "sample.sde_frac": "0.5",
    "sample.global_std": "False", "train.use_sa_solver": "False", "train.batch_size": "2",
    "train.gradient_accumulation_steps": "36", "train.num_batches_per_epoch": "36", "train.train_timesteps": "4",
    "train.learning_rate": "1e-4", "train.beta": "0.01", "train.clip_range": "0.5", "train.advantage_max": "2.0",
    "train.kl_weight": "ELBO", "train.loss_type": "sum_first", "train.weighting": "huber",
    "train.ghuber_power": "0.5", "train.timestep_fraction": "0.8", "train.kl_ema_weight": "ELBO",
    "train.kl_ema_decay": "0.5", "train.kl_ema_decay_type": "constant", "train.ema_beta": "0.5",
    "train.ema": "False", "train.ema_decay": "0.9", "train.ema_update_step_interval": "2",
    "time_type": "uniform", "time_shift": "1.0", "lora_type": "ffn", "per_prompt_stat_tracking": "False",
    "num_epochs": "7", "save_freq": "3", "eval_freq": "4",
}


@pytest.mark.parametrize("key", sorted(REFERENCE_OVERRIDES))
def test_reference_key_overrides(key):
    path = REPO_ROOT / "advantage_weighted_matching" / "config" / "dgx_awm.py"
    raw = REFERENCE_OVERRIDES[key]
    config = _load_flags([f"--config={path}:geneval_sd3_no_cfg_1node", f"--config.{key}={raw}"])
    before = _get(dgx_awm.geneval_sd3_no_cfg_1node(), key)
    expected = {"False": False, "True": True}.get(raw, raw)
    if isinstance(before, (int, float)) and not isinstance(before, bool):
        expected = type(before)(float(raw))
    assert _get(config, key) == expected != before


def test_reward_fn_override_and_reference_lines_in_a_preset():
    path = REPO_ROOT / "advantage_weighted_matching" / "config" / "dgx_awm.py"
    config = _load_flags([f"--config={path}:geneval_sd3_no_cfg_1node", "--config.reward_fn.geneval=0.5"])
    assert config.reward_fn.to_dict() == {"geneval": 0.5}
    # lines of the published list, pasted as they are
    config = dgx_awm.geneval_sd3_no_cfg_1node()
    config.time_type = "discrete"
    config.time_shift = 3.0
    config.lora_type = "attn"
    config.train.num_batches_per_epoch = config.sample.train_batch_size // config.train.batch_size * 36
    assert validate(config, 8)["micro_batches_per_rank"] == 72


def test_derived_keys_follow_overrides():
    path = REPO_ROOT / "advantage_weighted_matching" / "config" / "dgx_awm.py"
    config = _load_flags([f"--config={path}:geneval_sd3_no_cfg_1node", "--config.sample.num_batches_per_epoch=18"])
    # 6 // 3 * 18 = 36, for both keys; still one optimizer step per epoch
    assert config.train.gradient_accumulation_steps == config.train.num_batches_per_epoch == 36
    assert validate(config, 8)["optimizer_steps_per_epoch"] == 1
    config = _load_flags([f"--config={path}:geneval_sd3_no_cfg_1node", "--config.train.batch_size=2"])
    assert config.train.gradient_accumulation_steps == config.train.num_batches_per_epoch == 6 // 2 * 36
    # an explicit accumulation that divides the micro-batches: two optimizer steps per epoch
    config = _load_flags([f"--config={path}:geneval_sd3_no_cfg_1node", "--config.train.gradient_accumulation_steps=36"])
    assert config.train.num_batches_per_epoch == 72
    assert validate(config, 8)["optimizer_steps_per_epoch"] == 2


def test_old_checkpoint_config_names_are_mapped():
    from advantage_weighted_matching.checkpoint import RESUME_LOCKED_KEYS, config_differences, flatten_config, saved_flat_config

    current = dgx_awm.geneval_sd3_no_cfg_1node()
    old = current.to_dict()
    old["train"]["time_type"], old["train"]["time_shift"], old["train"]["lora_type"] = (
        old.pop("time_type"), old.pop("time_shift"), old.pop("lora_type"))
    del old["train"]["num_batches_per_epoch"]
    flat = saved_flat_config(old)
    assert flat["time_type"] == "discrete_wo_init" and flat["lora_type"] == "attn" and flat["time_shift"] == 3.0
    assert "train.time_type" not in flat
    assert flat["train.num_batches_per_epoch"] == 72  # 6 // 3 * 36, filled in
    assert config_differences(flat, flatten_config(current.to_dict())) == []
    assert "lora_type" in RESUME_LOCKED_KEYS
    old["train"]["lora_type"] = "ffn"
    assert config_differences(saved_flat_config(old), flatten_config(current.to_dict())) == [("lora_type", "ffn", "attn")]


def test_config_flags_tiny_preset():
    path = REPO_ROOT / "advantage_weighted_matching" / "config" / "tiny_awm.py"
    config = _load_flags([f"--config={path}:tiny_cpu_sde"])
    assert config.train.use_sa_solver is False
    assert config.sample.sde_frac == 1.0
    assert config.resolution == 32


# ---------------------------------------------------------------------------
# Batch plans, by hand.
# geneval/ocr 1node, 8 procs: 8*6 = 48 images per rollout batch = 2 groups of 24;
#   36 batches -> 1728 images, 72 groups; per rank 6*36 = 216 images in
#   6//3*36 = 72 micro-batches of 6 timesteps x 3 = 18 rows; 72 // 72 = 1 step;
#   total train batch 3 * 8 * 72 = 1728.
# geneval/ocr 4nodes, 32 procs: 192 per batch = 8 groups; 9 batches -> 1728, 72 groups;
#   per rank 54 images, 2*9 = 18 micro-batches; 1 step; 3 * 32 * 18 = 1728.
# pickscore 1node, 8 procs: 48 per batch = 2 groups; 12 batches -> 576, 24 groups;
#   per rank 72 images, 3*12 = 36 micro-batches of 6*2 = 12 rows; 1 step; 2*8*36 = 576.
# pickscore 4nodes, 32 procs: 192 per batch = 8*24 = 8 groups; 3 batches -> 576, 24 groups;
#   per rank 18, 3*3 = 9 micro-batches; 1 step; 2*32*9 = 576.
PLANS = {
    # name: (images/epoch, groups/batch, groups/epoch, images/rank, micro-batches, rows, steps, total batch)
    "geneval_sd3_no_cfg_1node": (1728, 2, 72, 216, 72, 18, 1, 1728),
    "geneval_sd3_no_cfg_4nodes": (1728, 8, 72, 54, 18, 18, 1, 1728),
    "ocr_sd3_no_cfg_1node": (1728, 2, 72, 216, 72, 18, 1, 1728),
    "ocr_sd3_no_cfg_4nodes": (1728, 8, 72, 54, 18, 18, 1, 1728),
    "pickscore_sd3_no_cfg_1node": (576, 2, 24, 72, 36, 12, 1, 576),
    "pickscore_sd3_no_cfg_4nodes": (576, 8, 24, 18, 9, 12, 1, 576),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_batch_plan(name):
    processes = TABLE[name][0]
    plan = batch_plan(dgx_awm.get_config(name), processes)
    images, groups_batch, groups_epoch, per_rank, micro, rows, steps, total = PLANS[name]
    assert plan == {
        "num_processes": processes,
        "images_per_epoch": images,
        "group_size": 24,
        "groups_per_rollout_batch": groups_batch,
        "prompt_groups_per_epoch": groups_epoch,
        "images_per_rank_per_epoch": per_rank,
        "micro_batches_per_rank": micro,
        "passes_per_micro_batch": 1,
        "rows_per_micro_batch": rows,
        "optimizer_steps_per_epoch": steps,
        "total_train_batch": total,
    }


def test_format_batch_plan_geneval_1node():
    text = format_batch_plan(batch_plan(dgx_awm.geneval_sd3_no_cfg_1node(), 8))
    assert "8 processes" in text
    assert "1728 images/epoch = 72 prompt groups x 24 images" in text
    assert "1 optimizer step(s)/epoch" in text


def test_batch_plan_tiny_two_processes():
    # tiny_cpu: 2 procs x 4 images = 8 per batch = 2 groups of 4; 2 batches -> 16 images, 4 groups;
    # per rank 8 images in 4 // 2 * 2 = 4 micro-batches of 2 timesteps x 2 = 4 rows; 4 // 4 = 1 step.
    plan = batch_plan(tiny_awm.tiny_cpu(), 2)
    assert plan["images_per_epoch"] == 16
    assert plan["prompt_groups_per_epoch"] == 4
    assert plan["micro_batches_per_rank"] == 4
    assert plan["rows_per_micro_batch"] == 4
    assert plan["optimizer_steps_per_epoch"] == 1
    assert plan["total_train_batch"] == 2 * 2 * 4


# ---------------------------------------------------------------------------
# Validation: every shipped preset passes at its own process count.
@pytest.mark.parametrize("name", sorted(TABLE))
def test_validate_presets(name):
    plan = validate(dgx_awm.get_config(name), TABLE[name][0])
    assert plan["optimizer_steps_per_epoch"] == 1


@pytest.mark.parametrize("preset", ["tiny_cpu", "tiny_cpu_sde"])
@pytest.mark.parametrize("processes", [1, 2])
def test_validate_tiny(preset, processes):
    config = tiny_awm.get_config(preset)
    plan = validate(config, processes)
    assert plan["images_per_epoch"] == 8 * processes
    assert config.train.gradient_accumulation_steps == 4  # 4 // 2 * 2


def test_tiny_cpu_values():
    config = tiny_awm.tiny_cpu()
    assert config.resolution == 32
    assert config.mixed_precision == "no"
    assert config.sample.num_steps == 6
    assert config.sample.train_batch_size == 4
    assert config.sample.num_image_per_prompt == 4
    assert config.train.use_sa_solver is True
    assert config.train.train_timesteps <= int(6 * 0.9)
    assert config.dataset == str(REPO_ROOT / "dataset" / "tiny_text")
    assert config.reward_fn.to_dict() == {"jpeg_compressibility": 1.0}


def test_validate_ocr_at_wrong_process_count():
    # 3 procs * 6 = 18 images: not whole groups of 24.
    with pytest.raises(ConfigError, match="sample.num_image_per_prompt"):
        validate(dgx_awm.ocr_sd3_no_cfg_1node(), 3)
    # 4 procs * 6 = 24: one group, accepted (the plan is per process count).
    assert validate(dgx_awm.ocr_sd3_no_cfg_1node(), 4)["groups_per_rollout_batch"] == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, "8"])
def test_validate_bad_num_processes(bad):
    with pytest.raises(ConfigError, match="num_processes"):
        validate(dgx_awm.ocr_sd3_no_cfg_1node(), bad)


def _with(**changes):
    """ocr 1node preset with dotted-key changes (`__` stands for `.`)."""

    def make():
        config = dgx_awm.ocr_sd3_no_cfg_1node()
        for dotted, value in changes.items():
            _set(config, dotted.replace("__", "."), value)
        return config

    return make


def _reward(weights):
    def make():
        config = dgx_awm.ocr_sd3_no_cfg_1node()
        config.reward_fn = ml_collections.ConfigDict(weights)
        return config

    return make


# (id, config factory, num_processes, substrings the message must contain)
INVALID = [
    ("batch_size_not_dividing", _with(train__batch_size=4, train__gradient_accumulation_steps=36), 8,
     ["train.batch_size=4", "sample.train_batch_size=6"]),
    ("groups_not_whole", _with(sample__num_image_per_prompt=20), 8, ["sample.num_image_per_prompt=20", "8 * 6"]),
    ("groups_not_whole_procs", _with(), 5, ["sample.num_image_per_prompt=24", "5 * 6"]),
    ("weighting", _with(train__weighting="Huber"), 8, ["train.weighting", "'Huber'"]),
    ("kl_weight", _with(train__kl_weight="elbo"), 8, ["train.kl_weight", "'elbo'"]),
    ("kl_ema_weight", _with(train__kl_ema_weight="uniform"), 8, ["train.kl_ema_weight", "'uniform'"]),
    ("loss_type", _with(train__loss_type="exp_last"), 8, ["train.loss_type", "'exp_last'"]),
    ("time_type", _with(time_type="continuous"), 8, ["time_type", "'continuous'"]),
    ("kl_ema_decay_type", _with(train__kl_ema_decay_type="cosine"), 8, ["train.kl_ema_decay_type", "'cosine'"]),
    ("lora_type", _with(lora_type="all"), 8, ["lora_type", "'all'"]),
    ("prompt_fn", _with(prompt_fn="ocr"), 8, ["prompt_fn", "'ocr'"]),
    ("mixed_precision", _with(mixed_precision="fp8"), 8, ["mixed_precision", "'fp8'"]),
    ("train_timesteps_discrete_wo_init", _with(train__train_timesteps=13), 8,
     ["train.train_timesteps=13", "int(14 * 0.9) = 12"]),
    ("train_timesteps_discrete", _with(train__train_timesteps=13, time_type="discrete"), 8,
     ["train.train_timesteps=13", "'discrete'"]),
    ("train_timesteps_discrete_with_init", _with(train__train_timesteps=10, time_type="discrete_with_init",
                                                 train__timestep_fraction=0.5), 8,
     ["train.train_timesteps=10", "= 7"]),
    ("gradient_accumulation", _with(train__gradient_accumulation_steps=50), 8,
     ["train.gradient_accumulation_steps=50", "72 * 1"]),
    ("num_batches_per_epoch_not_derived", _with(train__num_batches_per_epoch=36), 8,
     ["train.num_batches_per_epoch=36", "= 72"]),
    ("gradient_accumulation_zero", _with(train__gradient_accumulation_steps=0), 8,
     ["train.gradient_accumulation_steps=0"]),
    ("unknown_reward", _reward({"ocr": 1.0, "aesthetics": 0.5}), 8, ["reward_fn", "aesthetics"]),
    ("empty_reward", _reward({}), 8, ["reward_fn is empty"]),
    ("nonfinite_reward_weight", _reward({"ocr": float("nan")}), 8, ["reward_fn.ocr"]),
    ("negative_lr", _with(train__learning_rate=-1e-4), 8, ["train.learning_rate=-0.0001"]),
    ("zero_lr", _with(train__learning_rate=0.0), 8, ["train.learning_rate=0.0"]),
    ("sde_frac_above_one", _with(sample__sde_frac=1.5), 8, ["sample.sde_frac=1.5"]),
    ("negative_noise", _with(sample__noise_level=-0.1), 8, ["sample.noise_level=-0.1"]),
    ("too_few_steps", _with(sample__num_steps=2), 8, ["sample.num_steps=2"]),
    ("guidance_below_one", _with(sample__guidance_scale=0.5), 8, ["sample.guidance_scale=0.5"]),
    ("timestep_fraction_zero", _with(train__timestep_fraction=0.0), 8, ["train.timestep_fraction=0.0"]),
    ("resolution_not_16", _with(resolution=500), 8, ["resolution=500"]),
    ("ema_decay_one", _with(train__ema_decay=1.0), 8, ["train.ema_decay=1.0"]),
    ("no_lora", _with(use_lora=False), 8, ["use_lora"]),
    ("train_cfg", _with(train__cfg=True), 8, ["train.cfg"]),
    ("unknown_algorithm", _with(train__algorithm="ppo"), 8, ["train.algorithm", "'ppo'"]),
    ("flow_grpo_needs_sde", _with(train__algorithm="flow_grpo", train__ema_beta=0.0), 8,
     ["train.use_sa_solver=False", "sample.sde_frac > 0"]),
    ("flow_grpo_no_kl_ema", _with(train__algorithm="flow_grpo", train__use_sa_solver=False, sample__sde_frac=1.0), 8,
     ["train.ema_beta=0"]),
    ("flux_cfg", _with(pretrained__backbone="flux", train__algorithm="flow_grpo", train__use_sa_solver=False,
                       sample__sde_frac=1.0, train__ema_beta=0.0, train__cfg=True, sample__guidance_scale=3.5), 8,
     ["guidance-distilled"]),
    ("backbone", _with(pretrained__backbone="sdxl"), 8, ["pretrained.backbone", "'sdxl'"]),
    ("flow_grpo_no_step", _with(train__algorithm="flow_grpo", train__use_sa_solver=False, sample__sde_frac=0.05,
                                train__ema_beta=0.0), 8, ["no step to train", "min(0.05, 0.9)"]),
    ("flow_grpo_cfg_without_guidance", _with(train__algorithm="flow_grpo", train__use_sa_solver=False,
                                             sample__sde_frac=1.0, train__ema_beta=0.0, train__cfg=True), 8,
     ["train.cfg=True needs sample.guidance_scale > 1"]),
    ("lora_init", _with(train__lora_init="zeros"), 8, ["train.lora_init", "'zeros'"]),
    ("empty_model", _with(pretrained__model=""), 8, ["pretrained.model"]),
    ("empty_dataset", _with(dataset=""), 8, ["dataset is empty"]),
    ("rewards_dtype", _with(rewards__dtype="int8"), 8, ["rewards.dtype", "'int8'"]),
    ("compile", _with(train__compile="yes"), 8, ["train.compile", "'yes'"]),
    ("compile_mode", _with(train__compile_mode="fast"), 8, ["train.compile_mode", "'fast'"]),
    ("compile_mode_needs_inductor", _with(train__compile_mode="reduce-overhead", train__compile_backend="eager"), 8,
     ["train.compile_mode='reduce-overhead' needs train.compile_backend='inductor'"]),
    ("fused_adam", _with(train__fused_adam="on"), 8, ["train.fused_adam", "'on'"]),
    ("rollout_chunk_not_dividing", _with(sample__rollout_chunk=10), 8,
     ["sample.rollout_chunk=10", "6 * 36 = 216"]),
    ("rollout_chunk_negative", _with(sample__rollout_chunk=-1), 8, ["sample.rollout_chunk=-1"]),
    ("peak_tflops", _with(peak_tflops=0.0), 8, ["peak_tflops=0.0"]),
]


@pytest.mark.parametrize("case", INVALID, ids=[row[0] for row in INVALID])
def test_validate_rejects(case):
    _, make, processes, needles = case
    config = make()
    with pytest.raises(ConfigError) as info:
        validate(config, processes)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_validate_lists_every_problem():
    config = dgx_awm.ocr_sd3_no_cfg_1node()
    config.train.weighting = "bad_w"
    config.train.loss_type = "bad_l"
    config.train.learning_rate = -1.0
    with pytest.raises(ConfigError) as info:
        validate(config, 8)
    message = str(info.value)
    assert "train.weighting='bad_w'" in message
    assert "train.loss_type='bad_l'" in message
    assert "train.learning_rate=-1.0" in message


@pytest.mark.parametrize("time_type", ["uniform", "logit_normal"])
def test_train_timesteps_unbounded_for_continuous_time_types(time_type):
    config = dgx_awm.ocr_sd3_no_cfg_1node()
    config.time_type = time_type
    config.train.train_timesteps = 13  # > int(14 * 0.9) = 12: fine when times are drawn continuously
    plan = validate(config, 8)
    assert plan["rows_per_micro_batch"] == 13 * 3


def test_train_timesteps_boundary_accepted():
    config = dgx_awm.ocr_sd3_no_cfg_1node()
    config.train.train_timesteps = 12  # == int(14 * 0.9)
    assert validate(config, 8)["rows_per_micro_batch"] == 36


@pytest.mark.parametrize("chunk", [0, 1, 6, 12, 18, 216])
def test_rollout_chunks_that_divide_the_epoch_are_accepted(chunk):
    config = dgx_awm.ocr_sd3_no_cfg_1node()
    config.sample.rollout_chunk = chunk  # execution only: the batch plan does not change
    assert validate(config, 8) == validate(dgx_awm.ocr_sd3_no_cfg_1node(), 8)


def test_every_spec_enum_key_is_checked():
    for key in ("train.weighting", "train.kl_weight", "train.kl_ema_weight", "train.loss_type", "time_type",
                "train.kl_ema_decay_type", "lora_type", "prompt_fn"):
        assert key in validate_module.ENUMS
    assert validate_module.ENUMS["train.weighting"] == ("Uniform", "t", "t**2", "huber", "ghuber")
    assert set(validate_module.DISCRETE_TIME_TYPES) == {"discrete", "discrete_wo_init", "discrete_with_init"}


def test_multiple_rewards_accepted():
    config = dgx_awm.ocr_sd3_no_cfg_1node()
    config.reward_fn = ml_collections.ConfigDict({"ocr": 1.0, "pickscore": 0.5, "jpeg_compressibility": 0.1})
    assert validate(config, 8)["images_per_epoch"] == 1728
