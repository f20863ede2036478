"""Bad input through the real training entry point: rejected before any model
loads (a spy on `from_pretrained` stays empty), with the offending key, file
or line in the message (prompt files that are not UTF-8, GenEval colours and
classes the reward does not know); non-finite losses are skipped, then abort
with a checkpoint."""

import math

import pytest
import torch

from advantage_weighted_matching.config import ConfigError
from advantage_weighted_matching.prompts import PromptFileError
from advantage_weighted_matching.scripts import train_sd3_awm as train
from test_train_e2e import pipeline_spy, read_metrics, run_training  # noqa: F401 (fixture)

BAD_OVERRIDES = [
    (["--config.train.batch_size=3"], "train.batch_size"),
    (["--config.sample.num_image_per_prompt=3"], "sample.num_image_per_prompt"),
    (["--config.train.weighting=cubic"], "train.weighting"),
    (["--config.train.kl_weight=Huge"], "train.kl_weight"),
    (["--config.train.kl_ema_weight=x"], "train.kl_ema_weight"),
    (["--config.train.loss_type=mean_first"], "train.loss_type"),
    (["--config.time_type=random"], "time_type"),
    (["--config.train.kl_ema_decay_type=cosine"], "train.kl_ema_decay_type"),
    (["--config.lora_type=conv"], "lora_type"),
    (["--config.prompt_fn=parquet"], "prompt_fn"),
    (["--config.mixed_precision=fp8"], "mixed_precision"),
    (["--config.train.train_timesteps=9"], "train.train_timesteps"),
    (["--config.train.gradient_accumulation_steps=3"], "train.gradient_accumulation_steps"),
    (["--config.train.learning_rate=-1e-3"], "train.learning_rate"),
    (["--config.train.clip_range=0"], "train.clip_range"),
    (["--config.train.timestep_fraction=1.5"], "train.timestep_fraction"),
    (["--config.sample.num_steps=2"], "sample.num_steps"),
    (["--config.sample.guidance_scale=0.5"], "sample.guidance_scale"),
    (["--config.resolution=40"], "resolution"),
    (["--config.train.beta=nan"], "train.beta"),
    (["--config.train.ema_decay=1.0"], "train.ema_decay"),
    (["--config.num_checkpoint_limit=0"], "num_checkpoint_limit"),
    (["--config.reward_fn.jpeg_compressibility=inf"], "reward_fn.jpeg_compressibility"),
    (["--config.use_lora=False"], "use_lora"),
    (["--config.train.cfg=True"], "train.cfg"),
    (["--config.dataset="], "dataset"),
]


@pytest.mark.parametrize("overrides, key", BAD_OVERRIDES, ids=[key for _, key in BAD_OVERRIDES])
def test_invalid_config_rejected_before_models_load(tmp_path, tiny_sd3_dir, pipeline_spy, overrides, key):
    with pytest.raises(ConfigError) as error:
        run_training(tmp_path / "run", tiny_sd3_dir, *overrides)
    assert key in str(error.value)
    assert pipeline_spy == [], "a model was loaded before the config was rejected"


@pytest.mark.parametrize(
    "files, expected",
    [
        ({}, "prompt file not found"),
        ({"train.txt": "", "test.txt": "a cat\n"}, "prompt file is empty"),
        ({"train.txt": "a cat\n\na dog\n", "test.txt": "a cat\n"}, "train.txt:2: empty prompt line"),
        ({"train.txt": "a cat\na dog\n", "test.txt": ""}, "test.txt"),
    ],
    ids=["missing", "empty", "blank-line", "empty-test"],
)
def test_bad_dataset_files_rejected_before_models_load(tmp_path, tiny_sd3_dir, pipeline_spy, files, expected):
    dataset = tmp_path / "prompts"
    dataset.mkdir()
    for name, text in files.items():
        (dataset / name).write_text(text)
    with pytest.raises(PromptFileError, match=expected):
        run_training(tmp_path / "run", tiny_sd3_dir, f"--config.dataset={dataset}")
    assert pipeline_spy == []


GENEVAL_ROW = {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a red cat"}


@pytest.mark.parametrize(
    "prompt_fn, files, expected",
    [
        ("general_ocr", {"train.txt": b"a cat\na dog\na caf\xe9 sign\n", "test.txt": b"a cat\n"},
         "train.txt:3: not UTF-8 (byte 0xe9 at column 6)"),
        ("geneval", {"train_metadata.jsonl": [GENEVAL_ROW, dict(GENEVAL_ROW, include=[
            {"class": "cat", "count": 1, "color": "teal"}])], "test_metadata.jsonl": [GENEVAL_ROW]},
         "train_metadata.jsonl:2: 'color' must be one of"),
        ("geneval", {"train_metadata.jsonl": [GENEVAL_ROW], "test_metadata.jsonl": [GENEVAL_ROW, dict(
            GENEVAL_ROW, include=[{"class": "unicorn", "count": 1}])]},
         "test_metadata.jsonl:2: unknown class 'unicorn'"),
    ],
    ids=["not-utf8", "geneval-colour", "geneval-class"],
)
def test_bad_prompt_contents_rejected_with_file_and_line(tmp_path, tiny_sd3_dir, pipeline_spy, prompt_fn, files,
                                                         expected):
    import json

    dataset = tmp_path / "prompts"
    dataset.mkdir()
    for name, content in files.items():
        data = content if isinstance(content, bytes) else "".join(json.dumps(row) + "\n" for row in content).encode()
        (dataset / name).write_bytes(data)
    with pytest.raises(PromptFileError) as error:
        run_training(tmp_path / "run", tiny_sd3_dir, f"--config.dataset={dataset}", f"--config.prompt_fn={prompt_fn}",
                     "--config.sample.num_image_per_prompt=4")
    assert f"{dataset}/{expected}" in str(error.value)
    assert pipeline_spy == []


def test_too_few_prompts_for_a_rollout_batch(tmp_path, tiny_sd3_dir, pipeline_spy):
    dataset = tmp_path / "prompts"
    dataset.mkdir()
    (dataset / "train.txt").write_text("only one prompt\n")
    (dataset / "test.txt").write_text("a cat\n")
    with pytest.raises(ConfigError, match="2 distinct prompts per rollout batch"):
        run_training(tmp_path / "run", tiny_sd3_dir, f"--config.dataset={dataset}",
                     "--config.sample.num_image_per_prompt=2", "--config.train.batch_size=2")
    assert pipeline_spy == []


def _nan_loss_after(monkeypatch, bad_calls):
    """Fault injection: the real loss, replaced by NaN on the chosen micro-batch calls."""
    real_loss, calls = train.awm_loss, {"n": 0}

    def loss_with_nan(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            loss = loss * math.nan
        return loss, metrics

    monkeypatch.setattr(train, "awm_loss", loss_with_nan)


def test_nonfinite_loss_skips_the_optimizer_step(tmp_path, tiny_sd3_dir, monkeypatch):
    _nan_loss_after(monkeypatch, bad_calls={2})  # second micro-batch of epoch 0
    metrics = run_training(tmp_path / "run", tiny_sd3_dir, "--config.num_epochs=2", "--config.eval_freq=0")
    assert [m["epoch"] for m in metrics] == [0, 1]
    assert metrics[0]["global_step"] == 0  # epoch 0's only step was skipped
    assert metrics[1]["global_step"] == 1
    assert math.isfinite(metrics[1]["train/loss"])


def test_nonfinite_losses_in_a_row_abort_with_a_checkpoint(tmp_path, tiny_sd3_dir, monkeypatch):
    _nan_loss_after(monkeypatch, bad_calls=set(range(1, 100)))
    save_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        run_training(save_dir, tiny_sd3_dir, "--config.num_epochs=2", "--config.max_nonfinite_steps=3")
    checkpoint = save_dir / "checkpoints" / "checkpoint-000000"
    assert (checkpoint / "COMPLETE").exists()
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    assert state["epoch"] == 0 and state["global_step"] == 0
