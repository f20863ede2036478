"""Start-up validation of a config for a given process count (SPEC section 1).

`validate(config, num_processes)` runs before any model or dataset loads and
raises `ConfigError` listing every problem, each naming its key(s). It returns
the derived batch plan, which the trainer logs.
"""

import math

ENUMS = {
    "train.weighting": ("Uniform", "t", "t**2", "huber", "ghuber"),
    "train.kl_weight": ("Uniform", "ELBO"),
    "train.kl_ema_weight": ("Uniform", "ELBO"),
    "train.loss_type": ("exp_first", "sum_first"),
    "time_type": ("discrete", "discrete_wo_init", "discrete_with_init", "uniform", "logit_normal"),
    "train.kl_ema_decay_type": ("linear", "constant"),
    "lora_type": ("attn", "ffn"),
    "train.lora_init": ("gaussian", "default", "true"),
    "train.algorithm": ("awm", "flow_grpo"),
    "pretrained.backbone": ("sd3", "flux"),
    "prompt_fn": ("general_ocr", "geneval"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "rewards.dtype": ("float32", "float16", "bfloat16"),
    "rewards.qwenvl_dtype": ("float32", "float16", "bfloat16"),
    "train.compile": ("auto", "true", "false"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "train.fused_adam": ("auto", "true", "false"),
}
DISCRETE_TIME_TYPES = ("discrete", "discrete_wo_init", "discrete_with_init")

# (key, predicate, requirement) for numeric ranges.
RANGES = [
    ("seed", lambda v: v >= 0 and v == int(v), "an integer >= 0"),
    ("num_epochs", lambda v: v >= 1, ">= 1"),
    ("save_freq", lambda v: v >= 0, ">= 0"),
    ("eval_freq", lambda v: v >= 0, ">= 0"),
    ("log_image_freq", lambda v: v >= 0, ">= 0"),
    ("num_checkpoint_limit", lambda v: v >= 1, ">= 1"),
    ("max_nonfinite_steps", lambda v: v >= 1, ">= 1"),
    ("max_sequence_length", lambda v: 1 <= v <= 512, "in [1, 512]"),
    ("resolution", lambda v: v >= 16 and v % 16 == 0, "a positive multiple of 16"),
    ("sample.num_steps", lambda v: v >= 3, ">= 3 (the SA-Solver needs a predictor, a corrector and a final step)"),
    ("sample.eval_num_steps", lambda v: v >= 1, ">= 1"),
    ("sample.guidance_scale", lambda v: v >= 1.0, ">= 1.0 (1.0 disables CFG)"),
    ("sample.train_batch_size", lambda v: v >= 1, ">= 1"),
    ("sample.num_image_per_prompt", lambda v: v >= 1, ">= 1"),
    ("sample.test_batch_size", lambda v: v >= 1, ">= 1"),
    ("sample.num_batches_per_epoch", lambda v: v >= 1, ">= 1"),
    ("sample.noise_level", lambda v: v >= 0, ">= 0"),
    ("sample.sde_frac", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("sample.num_eval_images", lambda v: v >= 0, ">= 0"),
    ("sample.rollout_chunk", lambda v: v >= 0 and v == int(v), "an integer >= 0 (0 = sample.train_batch_size)"),
    ("peak_tflops", lambda v: v > 0, "> 0"),
    ("train.batch_size", lambda v: v >= 1, ">= 1"),
    ("train.learning_rate", lambda v: v > 0, "> 0"),
    ("train.adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.adam_weight_decay", lambda v: v >= 0, ">= 0"),
    ("train.adam_epsilon", lambda v: v > 0, "> 0"),
    ("train.gradient_accumulation_steps", lambda v: v >= 1, ">= 1"),
    ("train.num_batches_per_epoch", lambda v: v >= 1, ">= 1"),
    ("train.max_grad_norm", lambda v: v > 0, "> 0"),
    ("train.num_inner_epochs", lambda v: v >= 1, ">= 1"),
    ("train.adv_clip_max", lambda v: v > 0, "> 0"),
    ("train.advantage_max", lambda v: v >= 0, ">= 0 (0 = no rescaling)"),
    ("train.clip_range", lambda v: v > 0, "> 0"),
    ("train.timestep_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("train.beta", lambda v: v >= 0, ">= 0"),
    ("train.ema_beta", lambda v: v >= 0, ">= 0"),
    ("train.lora_rank", lambda v: v >= 1, ">= 1"),
    ("train.lora_alpha", lambda v: v > 0, "> 0"),
    ("train.ema_decay", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.ema_update_step_interval", lambda v: v >= 1, ">= 1"),
    ("train.train_timesteps", lambda v: v >= 1, ">= 1"),
    ("time_shift", lambda v: v > 0, "> 0"),
    ("train.ghuber_power", lambda v: v > 0, "> 0"),
    ("train.kl_ema_decay", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("train.decay_steps", lambda v: v > 0, "> 0"),
    ("rewards.batch_size", lambda v: v >= 1, ">= 1"),
    ("rewards.remote_geneval_timeout_s", lambda v: v > 0, "> 0"),
    ("rewards.remote_geneval_retries", lambda v: v >= 0, ">= 0"),
    ("rewards.max_failure_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("rewards.max_failed_epochs", lambda v: v >= 1, ">= 1"),
    ("rewards.qwenvl_max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("rewards.remote_timeout_s", lambda v: v > 0, "> 0"),
    ("rewards.remote_retries", lambda v: v >= 0, ">= 0"),
]


class ConfigError(ValueError):
    """An invalid configuration; the message lists every offending key."""


def _get(config, dotted):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def batch_plan(config, num_processes):
    """Derived sizes of one epoch (SPEC sections 1 and 7). Pure arithmetic on the config."""
    sample, train = config.sample, config.train
    k = sample.num_image_per_prompt
    images_per_batch = num_processes * sample.train_batch_size  # all ranks, one rollout batch
    micro_batches_per_rank = sample.train_batch_size // train.batch_size * sample.num_batches_per_epoch
    if train.algorithm == "flow_grpo":  # one pass per trained SDE step, B rows (2 B with CFG)
        passes = int(sample.num_steps * min(sample.sde_frac, train.timestep_fraction))
        rows = train.batch_size * (2 if train.cfg else 1)
    else:  # one pass of T timesteps x B samples
        passes, rows = 1, train.train_timesteps * train.batch_size
    return {
        "num_processes": num_processes,
        "images_per_epoch": images_per_batch * sample.num_batches_per_epoch,
        "group_size": k,
        "groups_per_rollout_batch": images_per_batch // k,
        "prompt_groups_per_epoch": images_per_batch // k * sample.num_batches_per_epoch,
        "images_per_rank_per_epoch": sample.train_batch_size * sample.num_batches_per_epoch,
        "micro_batches_per_rank": micro_batches_per_rank * train.num_inner_epochs,
        "passes_per_micro_batch": passes,
        "rows_per_micro_batch": rows,
        "optimizer_steps_per_epoch": micro_batches_per_rank * train.num_inner_epochs
        // train.gradient_accumulation_steps,
        "total_train_batch": train.batch_size * num_processes * train.gradient_accumulation_steps,
    }


def format_batch_plan(plan):
    return (
        f"batch plan ({plan['num_processes']} processes): {plan['images_per_epoch']} images/epoch = "
        f"{plan['prompt_groups_per_epoch']} prompt groups x {plan['group_size']} images; "
        f"{plan['images_per_rank_per_epoch']} images/rank/epoch in {plan['micro_batches_per_rank']} micro-batches, "
        f"each {plan['passes_per_micro_batch']} forward/backward pass(es) of {plan['rows_per_micro_batch']} rows; "
        f"{plan['optimizer_steps_per_epoch']} optimizer step(s)/epoch; "
        f"total train batch {plan['total_train_batch']} samples/step"
    )


def validate(config, num_processes):
    """Check `config` for `num_processes` ranks; return the batch plan or raise ConfigError."""
    errors = []
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ConfigError(f"num_processes must be a positive integer, got {num_processes!r}")

    for key, allowed in ENUMS.items():
        value = _get(config, key)
        if value not in allowed:
            errors.append(f"{key}={value!r} is not one of {list(allowed)}")
    for key, ok, requirement in RANGES:
        value = _get(config, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            errors.append(f"{key}={value!r} must be {requirement}")
    if errors:  # the relational checks below assume sane numbers
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))

    sample, train = config.sample, config.train
    if sample.train_batch_size % train.batch_size:
        errors.append(
            f"train.batch_size={train.batch_size} must divide sample.train_batch_size={sample.train_batch_size}"
        )
    if num_processes * sample.train_batch_size % sample.num_image_per_prompt:
        errors.append(
            f"num_processes * sample.train_batch_size = {num_processes} * {sample.train_batch_size} must be divisible "
            f"by sample.num_image_per_prompt={sample.num_image_per_prompt} (whole prompt groups per rollout batch)"
        )
    micro_batches = sample.train_batch_size // train.batch_size * sample.num_batches_per_epoch
    if train.num_batches_per_epoch != micro_batches:
        errors.append(
            f"train.num_batches_per_epoch={train.num_batches_per_epoch} must equal sample.train_batch_size // "
            f"train.batch_size * sample.num_batches_per_epoch = {micro_batches} (micro-batches per epoch; it is "
            f"derived: leave it unset)"
        )
    elif micro_batches * train.num_inner_epochs % train.gradient_accumulation_steps:
        errors.append(
            f"train.gradient_accumulation_steps={train.gradient_accumulation_steps} must divide the micro-batches per "
            f"epoch, train.num_batches_per_epoch * train.num_inner_epochs = {micro_batches} * "
            f"{train.num_inner_epochs} (an optimizer step never spans two epochs; the presets take one per epoch)"
        )
    images_per_rank = sample.train_batch_size * sample.num_batches_per_epoch
    if sample.rollout_chunk and images_per_rank % sample.rollout_chunk:
        errors.append(
            f"sample.rollout_chunk={sample.rollout_chunk} must divide the images per GPU per epoch, "
            f"sample.train_batch_size * sample.num_batches_per_epoch = {sample.train_batch_size} * "
            f"{sample.num_batches_per_epoch} = {images_per_rank} (every solver pass the "
            f"same shape: nothing recompiles)"
        )
    if config.train.compile_mode != "default" and config.train.compile_backend != "inductor":
        errors.append(f"train.compile_mode={config.train.compile_mode!r} needs train.compile_backend='inductor'")
    if config.time_type in DISCRETE_TIME_TYPES:
        usable = int(sample.num_steps * train.timestep_fraction)
        if train.train_timesteps > usable:
            errors.append(
                f"train.train_timesteps={train.train_timesteps} must be <= int(sample.num_steps * "
                f"train.timestep_fraction) = int({sample.num_steps} * {train.timestep_fraction}) = {usable} "
                f"for time_type={config.time_type!r}"
            )
    if not config.use_lora:
        errors.append("use_lora=False: full fine-tuning is not supported; the trainer trains a LoRA adapter")
    flow_grpo = train.algorithm == "flow_grpo"
    if train.cfg and not flow_grpo:
        errors.append("train.cfg=True is not supported with train.algorithm='awm': AWM trains the conditional "
                      "velocity (guidance_scale 1.0)")
    if train.cfg and sample.guidance_scale <= 1.0:
        errors.append(f"train.cfg=True needs sample.guidance_scale > 1, got {sample.guidance_scale}")
    if config.pretrained.backbone == "flux" and train.cfg:
        errors.append("train.cfg=True with pretrained.backbone='flux': FLUX.1-dev is guidance-distilled, "
                      "sample.guidance_scale is a model input and there is no unconditional pass")
    if flow_grpo and train.use_sa_solver:
        errors.append("train.algorithm='flow_grpo' needs SDE rollouts with log-probs: set train.use_sa_solver=False")
    if flow_grpo:
        if not (sample.noise_level > 0 and sample.sde_frac > 0):
            errors.append("train.algorithm='flow_grpo' needs stochastic rollouts: sample.noise_level > 0 and "
                          "sample.sde_frac > 0")
        elif int(sample.num_steps * min(sample.sde_frac, train.timestep_fraction)) < 1:
            errors.append(f"train.algorithm='flow_grpo' trains the steps j < int(sample.num_steps * "
                          f"min(sample.sde_frac, train.timestep_fraction)) = int({sample.num_steps} * "
                          f"min({sample.sde_frac}, {train.timestep_fraction})) = 0: no step to train")
        if train.off_policy or train.ema_beta > 0:
            errors.append("train.algorithm='flow_grpo' is on-policy without KL-EMA: set train.off_policy=False "
                          "and train.ema_beta=0")
    if not config.pretrained.model:
        errors.append("pretrained.model is empty")
    if not config.dataset:
        errors.append("dataset is empty: set it to a prompt directory")

    weights = dict(config.reward_fn)
    if not weights:
        errors.append("reward_fn is empty: name at least one reward with a weight")
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            errors.append(f"reward_fn.{name}={weight!r} must be a finite number")
    from advantage_weighted_matching.rewards import validate_reward_names  # light: no model imports

    try:
        validate_reward_names(list(weights))
    except ValueError as error:
        errors.append(f"reward_fn: {error}")
    for name, url_key in (("deqa", "deqa_url"), ("unifiedreward", "unifiedreward_url")):
        url = config.rewards[url_key]
        if name in weights and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
            errors.append(f"rewards.{url_key}={url!r} must be an http(s) URL (reward_fn uses {name!r})")

    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return batch_plan(config, num_processes)
