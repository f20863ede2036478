"""Advantage Weighted Matching: online RL fine-tuning of SD3 with LoRA.

    accelerate launch --num_processes 1 advantage_weighted_matching/scripts/train_sd3_awm.py \
        --config advantage_weighted_matching/config/tiny_awm.py:tiny_cpu
    python advantage_weighted_matching/scripts/train_sd3_awm.py \
        --config advantage_weighted_matching/config/dgx_awm.py:geneval_sd3_no_cfg_1node --dry_run --num_processes 8

Each epoch: SAMPLE rollouts (rewards scored in a worker thread meanwhile) ->
REWARD gather -> ADVANTAGE per prompt group -> TRAIN the advantage-weighted
flow-matching loss -> EMA updates -> EVAL / SAVE. SPEC sections 2-5.
This script alone touches the accelerator, wandb and the disk.
"""

import contextlib
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from absl import app, flags
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, set_seed
from ml_collections import config_flags
from tqdm.auto import tqdm

from advantage_weighted_matching import checkpoint as ckpt
from advantage_weighted_matching import preflight, speed
from advantage_weighted_matching.advantages import clip_advantages, group_advantages
from advantage_weighted_matching.backbones import ensure_local_pipeline, get_backbone
from advantage_weighted_matching.config import ConfigError, format_batch_plan, validate
from advantage_weighted_matching.ema import WeightEMA, kl_ema_decay, lerp_
from advantage_weighted_matching.evaluation import evaluate, summarize
from advantage_weighted_matching.flow_grpo import flow_grpo_step_loss, num_train_steps, step_rows
from advantage_weighted_matching.lora import (
    AdapterSwitch, adapter_parameters, add_lora, copy_adapter, load_adapter, lora_config, save_adapter,
)
from advantage_weighted_matching.objective import awm_loss
from advantage_weighted_matching.optim import build_lr_scheduler, build_optimizer
from advantage_weighted_matching.prompts import k_repeat_batch, load_prompts
from advantage_weighted_matching.rollout import ChunkedRollout
from advantage_weighted_matching.stopping import RewardOutage, StopSignals, TrainingHalted
from advantage_weighted_matching.throughput import ThroughputMeter
from advantage_weighted_matching.timesteps import sample_train_times
from advantage_weighted_matching.visualize import caption, image_grid, plot_reward_curve

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file and preset: path/to/file.py:PRESET.", lock_config=True)
flags.DEFINE_bool("dry_run", False, "Validate the config, print the batch plan and exit before loading any model.")
flags.DEFINE_integer("num_processes", None, "Process count for --dry_run (default: WORLD_SIZE or 1).")
flags.mark_flags_as_required(["config"])
logger = get_logger(__name__)


def stream_seed(seed, stream, *indices):
    """A distinct, reproducible seed per (stream, indices): rollouts and training
    noise are pure functions of (seed, epoch/counter, rank), so resume is exact."""
    value = seed * 1_000_003 + {"rollout": 1, "train": 2}[stream]
    for index in indices:
        value = (value * 1_000_033 + index) % (2**63 - 1)
    return value


def main(_):
    config = FLAGS.config
    # Launchers (accelerate, torchrun) export WORLD_SIZE: validate before anything starts.
    num_processes = FLAGS.num_processes or int(os.environ.get("WORLD_SIZE", 1))
    plan = validate(config, num_processes)
    if FLAGS.dry_run:
        print(format_batch_plan(plan))
        print(json.dumps(plan, sort_keys=True))
        return
    preflight.check_paths(config)  # model, resume_from, run dir: before anything is created or loaded
    stop = StopSignals()  # SIGINT / SIGTERM / SIGHUP / parent death: save at the next safe point, exit 128 + sig

    # ---------------------------------------------------------------- setup
    use_wandb = os.environ.get("WANDB_MODE") != "disabled"
    flow_grpo = config.train.algorithm == "flow_grpo"
    # Forward/backward passes per micro-batch: AWM one; Flow-GRPO one per trained SDE step, and
    # its gradients accumulate over micro-batches x steps (SPEC 7).
    units_per_micro_batch = num_train_steps(config.sample.num_steps, config.train.timestep_fraction,
                                            config.sample.sde_frac) if flow_grpo else 1
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # on CPU-only hosts this is what makes torchrun ranks join (gloo)
        mixed_precision=config.mixed_precision,
        log_with="wandb" if use_wandb else None,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps * units_per_micro_batch,
    )
    rank, world, device, is_main = (
        accelerator.process_index, accelerator.num_processes, accelerator.device, accelerator.is_main_process,
    )
    if world != num_processes:
        plan = validate(config, world)
    needs_quotes = "ocr" in config.reward_fn
    names = config.rewards.geneval_object_names
    train_prompts, train_metadata = load_prompts(config.dataset, config.prompt_fn, "train", needs_quotes, names)
    test_prompts, test_metadata = load_prompts(config.dataset, config.prompt_fn, "test", needs_quotes, names)
    if plan["groups_per_rollout_batch"] > len(train_prompts):
        raise ConfigError(
            f"{plan['groups_per_rollout_batch']} distinct prompts per rollout batch but {config.dataset} has only "
            f"{len(train_prompts)} training prompts"
        )
    run_name = config.run_name or "awm"
    save_dir = config.save_dir or (
        ckpt.run_dir_of(config.resume_from) if config.resume_from
        else os.path.join(config.logdir, f"{run_name}_{time.strftime('%Y%m%d_%H%M%S')}")
    )
    save_dir = broadcast_object_list([save_dir])[0]  # one timestamp for every rank
    preflight.on_main(lambda: preflight.claim_run_dir(save_dir, config.resume_from), is_main)  # held till exit
    flat_config = {**ckpt.flatten_config(config.to_dict()), "num_processes": world}
    resume_path = ""
    if config.resume_from:  # the newest checkpoint whose checksums verify, and a config it allows
        resume_path = preflight.on_main(lambda: ckpt.select_resume_checkpoint(
            config.resume_from, world, warn=logger.warning), is_main, share_result=True)
        saved = ckpt.saved_flat_config(ckpt.read_json(os.path.join(resume_path, "config.json")))
        for change in ckpt.check_resume_config(saved, flat_config, config.resume_allow_changes, resume_path):
            logger.warning(f"resume with a changed config: {change}", main_process_only=True)
    if is_main:
        kept = ckpt.write_run_config(save_dir, {**config.to_dict(), "num_processes": world})
        if kept:
            logger.info(f"the run dir's previous config is kept as {kept}")
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"  # no key: log locally, `wandb sync` later
    accelerator.init_trackers(
        config.wandb_project, config=config.to_dict(), init_kwargs={"wandb": {"name": run_name, "dir": save_dir}}
    )
    logger.info(f"run dir {save_dir}\n{config}\n{format_batch_plan(plan)}", main_process_only=True)
    set_seed(config.seed, device_specific=True)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---------------------------------------------------------------- rewards, then models
    from advantage_weighted_matching.rewards import multi_score

    # Before the diffusion model loads: a custom reward's contract probe fails here, in seconds.
    reward_fn = multi_score(config.rewards.device or device, dict(config.reward_fn), config.rewards)
    backbone = get_backbone(config.pretrained.backbone)  # SD3 or FLUX: the model family's calls
    if is_main:  # the tiny / toy CPU pipelines are built on first use
        ensure_local_pipeline(config.pretrained)
    accelerator.wait_for_everyone()
    inference_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    pipeline = backbone.load_pipeline(config.pretrained.model, config.pretrained.revision, inference_dtype, device)
    if config.train.gradient_checkpointing:  # recompute block activations in backward: memory for time
        pipeline.transformer.enable_gradient_checkpointing()

    lora_cfg = lora_config(config.train.lora_rank, config.train.lora_alpha, config.train.lora_init,
                           config.lora_type, backbone)
    has_ema_adapter = config.train.ema_beta > 0 or config.train.off_policy
    model = add_lora(pipeline.transformer, lora_cfg, with_ema_adapter=has_ema_adapter)
    if config.train.lora_path:
        load_adapter(model, config.train.lora_path, "default")
        if has_ema_adapter:
            copy_adapter(model, "default", "ema")
    for adapter in ("default", "ema") if has_ema_adapter else ("default",):
        for param in adapter_parameters(model, adapter):
            param.data = param.data.float()  # fp32 master weights for the LoRA
    policy_params = adapter_parameters(model, "default")
    # The transformer with the LoRA layers injected: no-grad calls (rollouts, reference, KL-EMA,
    # eval) skip PeftModel's per-call wrapper; adapter switches on `model` still apply to it.
    lora_transformer = model.get_base_model()
    adapters = AdapterSwitch(model)  # cheap adapter switches for the per-micro-batch forwards
    fast = speed.Settings.from_config(config, device)  # execution switches: speed, not mathematics (speed.py)
    if fast.compile:  # regional: each repeated block, compiled at its first call of each kind, once per run
        speed.compile_repeated_blocks(pipeline.transformer, backbone.repeated_blocks, fast.compile_mode,
                                      fast.compile_backend)
    logger.info(f"execution switches: {fast}", main_process_only=True)
    kl_ema_params = adapter_parameters(model, "ema") if has_ema_adapter else []
    train_cfg = config.train
    optimizer = build_optimizer(
        policy_params, train_cfg.learning_rate, (train_cfg.adam_beta1, train_cfg.adam_beta2),
        train_cfg.adam_weight_decay, train_cfg.adam_epsilon, train_cfg.use_8bit_adam, fused=fast.fused_adam,
    )
    lr_scheduler = build_lr_scheduler(optimizer, train_cfg.decay_steps)  # stepped by hand once per optimizer step
    transformer, optimizer = accelerator.prepare(model, optimizer)
    weight_ema = WeightEMA(policy_params, train_cfg.ema_decay, train_cfg.ema_update_step_interval) \
        if train_cfg.ema else None

    reward_executor = ThreadPoolExecutor(max_workers=1)
    train_sigmas = backbone.sigmas(pipeline, config.sample.num_steps, config.resolution)
    eval_sigmas = backbone.sigmas(pipeline, config.sample.eval_num_steps, config.resolution)
    guidance = config.sample.guidance_scale
    negative = backbone.encode_prompts(pipeline, [""], device, config.max_sequence_length) \
        if backbone.uses_cfg(guidance) else None

    first_epoch, global_step = 0, 0
    stateful = {"optimizer": optimizer, "lr_scheduler": lr_scheduler, "scaler": accelerator.scaler,
                "weight_ema": weight_ema}
    adapter_dirs = {"default": "lora", "ema": "kl_ema_lora"} if has_ema_adapter else {"default": "lora"}
    if resume_path:
        for adapter, name in adapter_dirs.items():
            load_adapter(model, os.path.join(resume_path, name), adapter)
        first_epoch, global_step = ckpt.restore_training_state(ckpt.load_training_state(resume_path), stateful)
        ckpt.set_rng_state(ckpt.read_json(os.path.join(resume_path, f"rng_state_{rank}.json")))
        logger.info(f"resumed from {resume_path} at epoch {first_epoch}, step {global_step}", main_process_only=True)

    def save_checkpoint(next_epoch):
        root = os.path.join(save_dir, "checkpoints")
        temp = ckpt.temp_dir_for(root, next_epoch)
        if is_main:
            shutil.rmtree(temp, ignore_errors=True)
            os.makedirs(temp)
        accelerator.wait_for_everyone()
        ckpt.write_json(os.path.join(temp, f"rng_state_{rank}.json"), ckpt.rng_state())
        if is_main:
            for adapter, name in adapter_dirs.items():
                save_adapter(model, adapter, os.path.join(temp, name), lora_cfg, backbone)
            if weight_ema is not None:  # the weight-EMA as a LoRA of its own, for inference
                weight_ema.swap(policy_params)
                save_adapter(model, "default", os.path.join(temp, "ema_lora"), lora_cfg, backbone)
                weight_ema.swap(policy_params)
            state = ckpt.training_state(stateful, next_epoch, global_step,
                                        next_epoch * config.sample.num_batches_per_epoch)
            torch.save(state, os.path.join(temp, "training_state.pt"))
            ckpt.write_json(os.path.join(temp, "config.json"), {**config.to_dict(), "num_processes": world})
        accelerator.wait_for_everyone()
        if is_main:
            path = ckpt.finalize(temp, root, next_epoch, config.num_checkpoint_limit)
            logger.info(f"saved checkpoint {path}")
        accelerator.wait_for_everyone()

    def stop_requested():  # every rank calls this at the same points: one tiny collective
        """The stop signal any rank received (0: none), so that all ranks stop together."""
        return int(accelerator.gather(torch.tensor([float(stop.signum)], device=device)).max())

    def save_and_exit(signum, next_epoch):
        save_checkpoint(next_epoch)
        logger.warning(StopSignals.describe(signum), main_process_only=True)
        sys.exit(128 + signum)

    def eval_and_log(tag, epoch):
        rewards, images, prompts, num_failures = evaluate(
            pipeline, lora_transformer, test_prompts, test_metadata, reward_fn, sigmas=eval_sigmas,
            resolution=config.resolution, batch_size=config.sample.test_batch_size, rank=rank,
            num_processes=world, gather=accelerator.gather, seed=config.seed, device=device,
            max_sequence_length=config.max_sequence_length, limit=config.sample.num_eval_images,
            autocast=accelerator.autocast, negative=negative, guidance_scale=guidance, backbone=backbone,
            progress=tqdm(desc=f"{tag}", disable=not is_main, leave=False).update,
        )
        summary = {f"{tag}/{key}": value for key, value in summarize(rewards).items()}
        summary[f"{tag}/num_failures"] = num_failures
        if is_main and len(images):
            grid = image_grid(images[:16], [caption(p, r) for p, r in zip(prompts, rewards["avg"])])
            grid.save(os.path.join(save_dir, "samples", f"{tag}_epoch{epoch:06d}.png"))
            if use_wandb:
                summary[f"{tag}/images"] = _wandb_image(grid)
        logger.info(f"epoch {epoch} {tag}: " + ", ".join(f"{k}={v:.4f}" for k, v in summary.items()
                                                         if isinstance(v, float)), main_process_only=True)
        return summary

    device_sigmas = train_sigmas.to(device, torch.float32)  # once, not a host-to-device copy per micro-batch

    def micro_batch_loss(samples, rows, unit, cpu_generator, noise_generator):
        """AWM (one unit per micro-batch): flow matching on fresh noisy copies of the clean
        samples, T timesteps per sample, rows time-major (row k * B + b). Flow-GRPO: unit j is
        the stored SDE step j of every sample of the micro-batch (SPEC 7)."""
        repeats = 1 if flow_grpo else train_cfg.train_timesteps
        embeds, pooled = samples["embeds"][rows].repeat(repeats, 1, 1), samples["pooled"][rows].repeat(repeats, 1)
        # SD3: CFG only with train.cfg (the negative embedding); FLUX: the guidance value is an input
        cfg = dict(negative=negative if train_cfg.cfg else None, guidance_scale=guidance, dtype=inference_dtype)

        def policy_v(x, t):
            return backbone.velocity(transformer, x, t, embeds, pooled, detach_uncond=True, **cfg)

        def ref_v(x, t):
            with adapters.disabled(), accelerator.autocast():
                return backbone.velocity(lora_transformer, x, t, embeds, pooled, **cfg)

        def ema_v(x, t):
            with adapters.use("ema"), accelerator.autocast():
                return backbone.velocity(lora_transformer, x, t, embeds, pooled, **cfg)

        def ref_and_ema_v(x, t):  # both no-grad forwards as one call of 2x rows (train.batched_reference)
            with accelerator.autocast():
                return speed.reference_and_ema_velocity(backbone, lora_transformer, adapters, x, t, embeds, pooled,
                                                        **cfg)

        ref_fn, ema_fn = speed.paired_reference(ref_and_ema_v) if fast.batched_reference else (ref_v, ema_v)

        if flow_grpo:
            x, x_next, sigma, sigma_next, old_log_probs = step_rows(
                samples["latents"][rows], samples["log_probs"][rows], device_sigmas, unit)
            return flow_grpo_step_loss(
                policy_v, x, x_next, sigma, sigma_next, float(train_sigmas[1]), config.sample.noise_level,
                old_log_probs, samples["advantages"][rows], clip_range=train_cfg.clip_range, beta=train_cfg.beta,
                ref_velocity_fn=ref_v,
            )
        T = train_cfg.train_timesteps
        clean = samples["clean_latents"][rows].repeat(T, 1, 1, 1)
        t = sample_train_times(config.time_type, T, len(rows), train_sigmas, train_cfg.timestep_fraction,
                               config.time_shift, cpu_generator).reshape(-1).to(device, torch.float32)
        noise = torch.randn(clean.shape, generator=noise_generator, device=device, dtype=clean.dtype)
        return awm_loss(
            policy_v, clean, noise, t, samples["advantages"][rows], T, weighting=train_cfg.weighting,
            ghuber_power=train_cfg.ghuber_power, loss_type=train_cfg.loss_type, clip_range=train_cfg.clip_range,
            beta=train_cfg.beta, kl_weight=train_cfg.kl_weight, ref_velocity_fn=ref_fn, ema_beta=train_cfg.ema_beta,
            kl_ema_weight=train_cfg.kl_ema_weight, ema_velocity_fn=ema_fn, off_policy=train_cfg.off_policy,
        )

    os.makedirs(os.path.join(save_dir, "samples"), exist_ok=True)
    num_batches, batch_size, k = (config.sample.num_batches_per_epoch, config.sample.train_batch_size,
                                  config.sample.num_image_per_prompt)
    nonfinite_streak = 0
    reward_outage = RewardOutage(config.rewards.max_failure_fraction, config.rewards.max_failed_epochs)
    meter = ThroughputMeter(device, config.peak_tflops)  # images/s; on CUDA MFU and peak memory, no syncs in the loop
    sampler = ChunkedRollout(  # `fast.rollout_chunk` images per solver pass; each image's noise from its own batch
        pipeline, lora_transformer, fast.rollout_chunk, train_sigmas, config.resolution,
        region=lambda rows: meter.measure("rollout", rows), use_sa_solver=train_cfg.use_sa_solver,
        noise_level=config.sample.noise_level, sde_frac=config.sample.sde_frac, negative=negative,
        guidance_scale=guidance, backbone=backbone)
    for epoch in range(first_epoch, config.num_epochs):
        timings, steps_this_epoch, train_log = {}, 0, {}
        # ================================================================ SAMPLE
        start = time.perf_counter()
        meter.start_epoch()
        model.eval()
        batches = []
        for i in tqdm(range(num_batches), desc=f"epoch {epoch} sample", disable=not is_main, leave=False):
            if signum := stop_requested():
                return save_and_exit(signum, epoch)  # weights are still the start-of-epoch weights
            counter = epoch * num_batches + i
            all_indices = k_repeat_batch(len(train_prompts), config.seed, counter, world, batch_size, k)
            indices = all_indices[rank * batch_size:(rank + 1) * batch_size].tolist()
            prompts, metadata = [train_prompts[j] for j in indices], [train_metadata[j] for j in indices]
            embeds, pooled = backbone.encode_prompts(pipeline, prompts, device, config.max_sequence_length)
            generator = torch.Generator(device).manual_seed(stream_seed(config.seed, "rollout", counter, rank))
            sampling_adapter = adapters.use("ema") if train_cfg.off_policy else contextlib.nullcontext()
            with accelerator.autocast(), sampling_adapter:
                done = sampler.push(embeds, pooled, generator, last=i + 1 == num_batches, tag={
                    "prompts": prompts, "metadata": metadata, "all_indices": all_indices, "embeds": embeds,
                    "pooled": pooled})
            for result, batch in done:  # whole rollout batches, in order; score each on the worker thread
                future = reward_executor.submit(reward_fn, result.images, batch["prompts"], batch["metadata"], True)
                batches.append({**batch, "images": result.images, "clean_latents": result.latents[-1],
                                "rewards": future})
                if flow_grpo:  # the baseline trains on the stored SDE steps and their log-probs
                    batches[-1].update(latents=torch.stack(result.latents, dim=1), log_probs=result.log_probs)
        timings["sample"] = time.perf_counter() - start
        meter.end_phase("sample")

        # ================================================================ REWARD
        start = time.perf_counter()
        scored = [b["rewards"].result() for b in batches]
        timings["reward_wait"] = time.perf_counter() - start
        local = {key: np.concatenate([s[0][key] for s in scored]) for key in scored[0][0]}
        gathered = {key: accelerator.gather(torch.as_tensor(v, device=device, dtype=torch.float64)).cpu().numpy()
                    for key, v in local.items()}
        num_failures = int(accelerator.gather(torch.tensor([sum(s[1]["num_failures"] for s in scored)],
                                                           device=device)).sum())
        outage = reward_outage.update(num_failures, len(gathered["avg"]) * len(config.reward_fn))
        if outage:  # keep the start-of-epoch state; a resume redoes this epoch with a working reward
            save_checkpoint(epoch)
            raise TrainingHalted(f"{outage}; checkpoint saved before epoch {epoch}")

        # ================================================================ ADVANTAGE
        # Every rank drew all ranks' prompt indices (the sampler is pure): no string gather.
        all_prompts = [train_prompts[j] for r in range(world) for b in batches  # rank-major, as gathered
                       for j in b["all_indices"][r * batch_size:(r + 1) * batch_size].tolist()]
        advantages, group_stats = group_advantages(
            all_prompts, gathered["avg"], config.per_prompt_stat_tracking, config.sample.global_std
        )
        advantages = clip_advantages(advantages, train_cfg.adv_clip_max, train_cfg.advantage_max)
        per_rank = num_batches * batch_size
        sample_keys = ("embeds", "pooled", "clean_latents") + (("latents", "log_probs") if flow_grpo else ())
        samples = {key: torch.cat([b[key] for b in batches]) for key in sample_keys}
        samples["advantages"] = torch.as_tensor(advantages[rank * per_rank:(rank + 1) * per_rank],
                                                device=device, dtype=torch.float32)
        epoch_log = {f"reward/{key}": value for key, value in summarize(gathered).items()}
        epoch_log.update({f"advantage/{key}": value for key, value in group_stats.items()})
        epoch_log.update({"reward/num_failures": num_failures, "epoch": epoch})
        if is_main and config.log_image_freq and epoch % config.log_image_freq == 0:
            grid = image_grid(batches[0]["images"][:16],
                              [caption(p, r) for p, r in zip(batches[0]["prompts"], local["avg"])])
            grid.save(os.path.join(save_dir, "samples", f"train_epoch{epoch:06d}.png"))
            if use_wandb:
                epoch_log["images"] = _wandb_image(grid)

        # ================================================================ TRAIN
        start = time.perf_counter()
        model.train()
        cpu_generator = torch.Generator().manual_seed(stream_seed(config.seed, "train", epoch, rank))
        noise_generator = torch.Generator(device).manual_seed(stream_seed(config.seed, "train", epoch, rank))
        micro = train_cfg.batch_size
        step_metrics, window_ok = defaultdict(list), True
        for _ in range(train_cfg.num_inner_epochs):
            order = torch.randperm(per_rank, generator=cpu_generator).to(device)
            # AWM: one forward/backward pass per micro-batch; Flow-GRPO: one per trained SDE step
            passes = [(m, unit) for m in range(per_rank // micro) for unit in range(units_per_micro_batch)]
            for m, unit in tqdm(passes, desc=f"epoch {epoch} train", disable=not is_main, leave=False):
                if unit == 0 and steps_this_epoch == 0 and (signum := stop_requested()):
                    return save_and_exit(signum, epoch)
                rows = order[m * micro:(m + 1) * micro]
                with accelerator.accumulate(transformer):
                    with meter.measure("train", len(rows)):  # policy fwd/bwd, base and KL-EMA forwards
                        loss, metrics = micro_batch_loss(samples, rows, unit, cpu_generator, noise_generator)
                        finite = bool(accelerator.gather(torch.isfinite(loss.detach()).reshape(1)).all())
                        if finite:  # all ranks agree, so DDP's collectives stay matched
                            accelerator.backward(loss)
                    if finite:
                        for key, value in metrics.items():
                            step_metrics[key].append(value)
                    else:
                        window_ok, nonfinite_streak = False, nonfinite_streak + 1
                        logger.warning(f"epoch {epoch}: non-finite loss ({nonfinite_streak} in a row), step skipped")
                        if nonfinite_streak >= config.max_nonfinite_steps:
                            save_checkpoint(epoch)
                            raise TrainingHalted(f"{nonfinite_streak} non-finite losses in a row; checkpoint saved "
                                                 f"at epoch {epoch} before this epoch's update")
                    if accelerator.sync_gradients:
                        if window_ok:
                            grad_norm = accelerator.clip_grad_norm_(policy_params, train_cfg.max_grad_norm)
                            optimizer.step()
                            lr_scheduler.step()
                            global_step, steps_this_epoch, nonfinite_streak = global_step + 1, steps_this_epoch + 1, 0
                            if weight_ema is not None:
                                weight_ema.step(policy_params, global_step)
                            log = {key: accelerator.reduce(torch.stack(v).mean().float(), "mean").item()
                                   for key, v in step_metrics.items()}
                            log.update(grad_norm=float(grad_norm), lr=lr_scheduler.get_last_lr()[0], epoch=epoch)
                            train_log = {f"train/{key}": value for key, value in log.items()}
                            accelerator.log(train_log, step=global_step)
                            logger.info(f"epoch {epoch} step {global_step}: " + ", ".join(
                                f"{key}={value:.4g}" for key, value in log.items()), main_process_only=True)
                        optimizer.zero_grad(set_to_none=True)
                        step_metrics, window_ok = defaultdict(list), True
        timings["train"] = time.perf_counter() - start
        meter.end_phase("train")

        # ================================================================ EMA
        if has_ema_adapter:  # KL-EMA adapter: theta_ema <- d theta_ema + (1 - d) theta
            decay = kl_ema_decay(global_step, train_cfg.kl_ema_decay, train_cfg.kl_ema_decay_type)
            lerp_(kl_ema_params, policy_params, 1.0 - decay)
            epoch_log["train/kl_ema_decay"] = decay

        if config.dump_rank_state:  # what this rank drew, used and holds: cross-rank checks
            _dump_rank_state(save_dir, rank, epoch, batches, gathered["avg"], samples["advantages"], policy_params)

        # ================================================================ EVAL / SAVE
        start = time.perf_counter()
        if config.eval_freq and (epoch + 1) % config.eval_freq == 0:
            epoch_log.update(eval_and_log("eval", epoch))
            if weight_ema is not None:
                weight_ema.swap(policy_params)
                epoch_log.update(eval_and_log("eval_ema", epoch))
                weight_ema.swap(policy_params)
        timings["eval"] = time.perf_counter() - start
        epoch_log.update({f"timing/{key}": value for key, value in timings.items()})
        epoch_log.update(meter.epoch_log(timings, num_batches * batch_size))
        accelerator.log(epoch_log, step=global_step)
        if is_main:  # a plain-text record per epoch, next to the wandb run
            with open(os.path.join(save_dir, "metrics.jsonl"), "a") as f:
                record = {**train_log, **epoch_log, "global_step": global_step}
                f.write(json.dumps({k: v for k, v in record.items() if isinstance(v, (int, float))}) + "\n")
            plot_reward_curve(ckpt.read_metrics(save_dir), os.path.join(save_dir, "reward_curve.png"), run_name)
        logger.info(f"epoch {epoch}: reward {epoch_log['reward/avg']:.4f} " + " ".join(
            f"{key}={value:.1f}s" for key, value in timings.items()), main_process_only=True)
        last_epoch, signum = epoch + 1 == config.num_epochs, stop_requested()
        if signum and not last_epoch:
            return save_and_exit(signum, epoch + 1)
        if last_epoch or (config.save_freq and (epoch + 1) % config.save_freq == 0):
            save_checkpoint(epoch + 1)
    reward_executor.shutdown()
    accelerator.end_training()


def _dump_rank_state(save_dir, rank, epoch, batches, gathered_rewards, advantages, policy_params):
    import hashlib

    digest = hashlib.sha256()
    for param in policy_params:
        digest.update(param.detach().float().cpu().numpy().tobytes())
    record = {
        "epoch": epoch, "prompts": [p for b in batches for p in b["prompts"]],
        "gathered_rewards": gathered_rewards.tolist(), "advantages": advantages.cpu().tolist(),
        "lora_sha256": digest.hexdigest(),
    }
    os.makedirs(os.path.join(save_dir, "rank_state"), exist_ok=True)
    with open(os.path.join(save_dir, "rank_state", f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def _wandb_image(pil_image):
    import wandb

    return wandb.Image(pil_image)


def cli_main(argv):
    """Command-line entry: bad input (exit 2) or a deliberate halt (exit 1) ends in one
    clear message from the first rank, not a traceback per rank."""
    from advantage_weighted_matching.prompts import PromptFileError
    from advantage_weighted_matching.rewards.custom import RewardContractError
    from advantage_weighted_matching.runlock import release_all

    try:
        main(argv)
    except (*preflight.USER_ERRORS, PromptFileError, RewardContractError, TrainingHalted) as error:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"train_sd3_awm: {error}", file=sys.stderr)
        sys.exit(1 if isinstance(error, TrainingHalted) else 2)
    finally:
        release_all()  # the run dir's lock (the kernel drops it anyway; this marks it released)


if __name__ == "__main__":
    app.run(cli_main, flags_parser=lambda argv: preflight.parse_flags_or_exit(argv, "train_sd3_awm"))
