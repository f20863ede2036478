"""The paper's mechanism, measured (issue H.4c): the variance of AWM's and Flow-GRPO's
policy-gradient estimators on the same rollout batch.

    python benchmarks/grad_variance.py --model DIR [--lora CHECKPOINT/lora] [--prompts 4] [--seed 0]

One SDE rollout of the policy (``toy_flow_grpo``'s sampler: noise 0.7 at every
step, per-step log-probs) gives N = prompts x 16 images of the toy training
prompts, their "scenes" rewards and group advantages (each method clips them
its own way). Both estimators then see exactly these images:

* AWM: ``objective.awm_loss`` of each sample at its preset's T = 4 training
  times (``discrete_wo_init``) with fresh noise;
* Flow-GRPO: ``flow_grpo.flow_grpo_step_loss`` of each sample, averaged over every trained
  SDE step (``j < int(num_steps * timestep_fraction)``, SPEC 7);

KL terms off: the policy-gradient estimators alone. The per-sample gradients of
the LoRA weights go to `diagnostics.gradient_stats` (half-batch cosine,
variance over squared mean). Prints and returns a JSON record.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from advantage_weighted_matching import diagnostics  # noqa: E402


def _lora_setting(config, name):
    """`lora_type` / `time_type` / `time_shift`: top-level keys on main (SPEC 1), `train.` keys before."""
    return config[name] if name in config else config.train[name]


@torch.no_grad()
def rollout_batch(pipeline, transformer, config, prompts, seed, device):
    """SDE rollouts of `prompts` (Flow-GRPO's sampler, `config` = toy_flow_grpo): latents
    [N, S + 1, C, h, w], log_probs [N, S], images [N, 3, H, W], embeds, pooled, sigmas [S + 1]."""
    from advantage_weighted_matching.rollout import encode_prompts, flow_sigmas, rollout

    sigmas = flow_sigmas(pipeline.scheduler, config.sample.num_steps)
    out = {"latents": [], "log_probs": [], "images": [], "embeds": [], "pooled": []}
    batch = config.sample.train_batch_size
    for start in range(0, len(prompts), batch):
        embeds, pooled = encode_prompts(pipeline, prompts[start:start + batch], device, config.max_sequence_length)
        generator = torch.Generator(device).manual_seed(seed * 1000 + start)
        result = rollout(pipeline, transformer, embeds, pooled, sigmas, config.resolution, generator,
                         use_sa_solver=False, noise_level=config.sample.noise_level, sde_frac=config.sample.sde_frac)
        for key, value in (("latents", torch.stack(result.latents, 1)), ("log_probs", result.log_probs),
                           ("images", result.images), ("embeds", embeds), ("pooled", pooled)):
            out[key].append(value)
    return {key: torch.cat(value) for key, value in out.items()} | {"sigmas": sigmas}


def measure(model_dir, lora_dir=None, num_prompts=4, seed=0, num_splits=64, device=None, configs=None):
    """Estimator statistics of both methods on one rollout batch of the policy `lora_dir`
    (None: the base model) -> dict (see the module docstring). `configs`: the (toy_awm,
    toy_flow_grpo) configs the runs used (default: the presets)."""
    from advantage_weighted_matching.advantages import clip_advantages, group_advantages
    from advantage_weighted_matching.config.toy_awm import toy_awm, toy_flow_grpo
    from advantage_weighted_matching.lora import adapter_parameters, add_lora, load_adapter, lora_config
    from advantage_weighted_matching.prompts import load_prompts
    from advantage_weighted_matching.rewards import multi_score
    from advantage_weighted_matching.rollout import load_pipeline, velocity
    from advantage_weighted_matching.timesteps import sample_train_times

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    awm, flow_grpo = configs or (toy_awm(), toy_flow_grpo())
    started = time.perf_counter()
    pipeline = load_pipeline(model_dir, "main", torch.float32, device)
    train = awm.train
    model = add_lora(pipeline.transformer, lora_config(train.lora_rank, train.lora_alpha, train.lora_init,
                                                        _lora_setting(awm, "lora_type")), with_ema_adapter=False)
    if lora_dir:
        load_adapter(model, lora_dir, "default")
    params = adapter_parameters(model, "default")

    k = awm.sample.num_image_per_prompt
    train_prompts, _ = load_prompts(awm.dataset, awm.prompt_fn, "train")
    chosen = np.random.default_rng(seed).choice(len(train_prompts), num_prompts, replace=False)
    prompts = [train_prompts[i] for i in chosen for _ in range(k)]
    batch = rollout_batch(pipeline, model.get_base_model(), flow_grpo, prompts, seed, device)
    rewards, _ = multi_score(device, dict(awm.reward_fn))(batch["images"], prompts, [{}] * len(prompts))
    advantages = group_advantages(prompts, rewards["avg"], awm.per_prompt_stat_tracking, awm.sample.global_std)[0]
    adv = {name: torch.as_tensor(clip_advantages(advantages, c.train.adv_clip_max, c.train.advantage_max),
                                 device=device, dtype=torch.float32)
           for name, c in (("awm", awm), ("flow_grpo", flow_grpo))}
    rollout_s = time.perf_counter() - started

    sigmas = batch["sigmas"]
    generator = torch.Generator().manual_seed(seed)
    T = train.train_timesteps
    trained_steps = torch.arange(int(flow_grpo.sample.num_steps * min(flow_grpo.sample.sde_frac,
                                                                      flow_grpo.train.timestep_fraction)))

    def policy(i, rows):
        embeds, pooled = batch["embeds"][i:i + 1].expand(rows, -1, -1), batch["pooled"][i:i + 1].expand(rows, -1)
        return lambda x, t: velocity(model, x, t, embeds, pooled)

    def awm_loss_of(i):
        t = sample_train_times(_lora_setting(awm, "time_type"), T, 1, sigmas, train.timestep_fraction,
                               _lora_setting(awm, "time_shift"), generator).reshape(-1).to(device, torch.float32)
        clean = batch["latents"][i:i + 1, -1]
        noise = torch.randn((T, *clean.shape[1:]), generator=generator).to(device)
        return diagnostics.awm_sample_loss(policy(i, T), clean, noise, t, adv["awm"][i:i + 1], train)

    def flow_grpo_loss_of(i):
        return diagnostics.flow_grpo_sample_loss(
            policy(i, 1), batch["latents"][i:i + 1], batch["log_probs"][i:i + 1],
            sigmas.to(device, torch.float32), trained_steps.to(device), adv["flow_grpo"][i:i + 1],
            flow_grpo.sample.noise_level, flow_grpo.train)

    record = {"lora": lora_dir or "none", "num_images": len(prompts), "num_prompts": num_prompts, "group_size": k,
              "seed": seed, "mean_reward": float(rewards["avg"].mean()), "rollout_s": rollout_s,
              "num_parameters": sum(p.numel() for p in params), "flow_grpo_steps_per_sample": len(trained_steps),
              "awm_timesteps_per_sample": T}
    means = {}
    for name, loss_of in (("awm", awm_loss_of), ("flow_grpo", flow_grpo_loss_of)):
        started = time.perf_counter()
        gradients = diagnostics.per_sample_gradients(loss_of, params, len(prompts))
        record[name] = diagnostics.gradient_stats(gradients, num_splits, seed) | {
            "seconds": time.perf_counter() - started}
        means[name] = gradients.mean(0)
    record["cosine_between_methods"] = diagnostics.cosine(means["awm"], means["flow_grpo"])
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="toy pipeline dir")
    parser.add_argument("--lora", default=None, help="LoRA dir of a checkpoint (default: the base model)")
    parser.add_argument("--prompts", type=int, default=4, help="prompt groups of 16 images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.model, args.lora, args.prompts, args.seed), indent=1))


if __name__ == "__main__":
    main()
