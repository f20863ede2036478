"""The toy benchmark presets: valid, on the "scenes" task at the issue's scale, and identical in
every size they share (the AWM vs Flow-GRPO comparison scales both down the same way)."""

from advantage_weighted_matching.config import toy_awm, validate
from advantage_weighted_matching.prompts import load_prompts

# train.batch_size is not shared: Flow-GRPO trains a whole rollout batch per micro-batch (SPEC 7)
SHARED = ("resolution", "max_sequence_length", "num_epochs", "eval_freq", "sample.num_steps",
          "sample.eval_num_steps", "sample.train_batch_size", "sample.num_image_per_prompt",
          "sample.num_batches_per_epoch", "sample.test_batch_size", "sample.num_eval_images", "sample.global_std",
          "train.learning_rate", "train.lora_rank", "train.lora_alpha", "pretrained.model",
          "pretrained.toy_recipe", "dataset", "reward_fn", "seed")


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def test_toy_presets_validate_and_share_sizes():
    awm, flow_grpo = toy_awm.toy_awm(), toy_awm.toy_flow_grpo()
    awm_plan, flow_grpo_plan = validate(awm, 1), validate(flow_grpo, 1)
    assert awm_plan["images_per_epoch"] == flow_grpo_plan["images_per_epoch"]
    assert dict(awm.reward_fn) == dict(flow_grpo.reward_fn)
    # each method's own training rules (SPEC 5 / SPEC 7) on the same samples
    assert awm_plan["optimizer_steps_per_epoch"] == 1 and awm_plan["passes_per_micro_batch"] == 1
    assert flow_grpo_plan["optimizer_steps_per_epoch"] == 2
    assert flow_grpo_plan["passes_per_micro_batch"] == int(flow_grpo.sample.num_steps * 0.99)
    assert flow_grpo.train.batch_size == flow_grpo.sample.train_batch_size
    for config in (awm, flow_grpo):
        plan = validate(config, 1)
        assert plan["images_per_epoch"] >= 128 and config.sample.num_image_per_prompt >= 16
        assert dict(config.reward_fn) == {"scenes": 1.0}
        test, _ = load_prompts(config.dataset, config.prompt_fn, "test")
        assert config.sample.num_eval_images == len(test) >= 64
    for key in SHARED:
        assert _get(awm, key) == _get(flow_grpo, key), key
    assert (awm.train.algorithm, flow_grpo.train.algorithm) == ("awm", "flow_grpo")
    assert awm.train.use_sa_solver and not flow_grpo.train.use_sa_solver
    assert toy_awm.describe("flow_grpo")["sample.noise_level"] == 0.7
    assert toy_awm.describe("awm")["time_type"] == "discrete_wo_init"
