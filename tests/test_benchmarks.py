"""The benchmarks: the overhead timer (issue F.4) must count the backward pass and every model
call; the AWM vs Flow-GRPO benchmark (issue H) runs every path at smoke size."""

import json
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from overhead import ModelTimer, trainer_overhead


def test_model_timer_counts_forward_and_backward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])
    # As in training: the input does not require grad, only the weights do. A module's
    # full backward hook would fire before this backward runs and time nothing.
    inputs = torch.randn(1024, 1024)
    timer = ModelTimer()
    timer.attach([model])
    backward = timer.wrap(lambda loss: loss.backward())

    start = time.perf_counter()
    loss = model(inputs).square().mean()
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    backward(loss)
    backward_s = time.perf_counter() - start

    assert timer.calls == 2
    assert model[0].weight.grad is not None
    assert backward_s > 0.5 * forward_s  # the backward is real work, not a no-op
    # everything but the loss's two elementwise ops is model time
    assert abs(timer.total - (forward_s + backward_s)) < 0.1 * (forward_s + backward_s)


def test_model_timer_nested_calls_count_once():
    inner = torch.nn.Linear(4, 4)
    outer = torch.nn.Sequential(inner, torch.nn.ReLU())
    timer = ModelTimer()
    timer.attach([outer, inner])
    outer(torch.randn(2, 4))
    assert timer.calls == 1 and timer.depth == 0


def test_trainer_overhead_hooks_every_model_call(tiny_sd3_dir):
    from advantage_weighted_matching.config.tiny_awm import tiny_cpu

    config = tiny_cpu()
    report = trainer_overhead(str(tiny_sd3_dir), epochs=1, preset="tiny_cpu")
    batches, steps = config.sample.num_batches_per_epoch, config.sample.num_steps
    micro_batches = batches * config.sample.train_batch_size // config.train.batch_size
    # per rollout batch: 3 text encoders, `steps` transformer calls, 1 VAE decode;
    # per micro-batch: policy, reference and KL-EMA forwards, then the backward
    assert report["model_calls"] == batches * (3 + steps + 1) + micro_batches * 4
    assert 1.0 < report["trainer_overhead"] < 3.0


# ---- AWM vs Flow-GRPO (issue H): every path of the benchmark at smoke size -------------------------

# Smoke sizes for both presets: 2 rollout batches of 16 (one optimizer step per epoch), 6 sampling
# steps, 16 eval prompts at 4 Euler steps, an eval every epoch.
SMOKE = ["--config.sample.num_steps=6", "--config.sample.eval_num_steps=4", "--config.sample.num_eval_images=16",
         "--config.sample.num_batches_per_epoch=2",
         "--config.eval_freq=1"]


@pytest.fixture(scope="module")
def smoke_toy_model(tmp_path_factory):
    """A small, barely trained toy pipeline (the benchmark needs the toy tokenizers and shapes only)."""
    from advantage_weighted_matching.toy.pretrain import ToySizes, pretrain

    out = tmp_path_factory.mktemp("toy") / "pipeline"
    threads = torch.get_num_threads()
    try:
        pretrain(str(out), vae_steps=1, transformer_steps=2, num_images=16,
                 sizes=ToySizes(vae_channels=(8, 16), transformer_layers=2, heads=2))
    finally:
        torch.set_num_threads(threads)
    return str(out)


@pytest.mark.slow
def test_awm_vs_flow_grpo_smoke(tmp_path, smoke_toy_model, monkeypatch):
    import awm_vs_flow_grpo as bench

    from advantage_weighted_matching import rewards

    def brightness_reward(device, weights, config=None):  # the barely trained model scores 0 on "scenes"
        return lambda images, prompts, metadata, only_strict=True: (
            {"avg": images.float().mean((1, 2, 3)).cpu().double().numpy()}, {"num_failures": 0})

    monkeypatch.setattr(rewards, "multi_score", brightness_reward)  # the gradient measurement only

    common = ["--mode", "cpu", "--model", smoke_toy_model, "--out", str(tmp_path / "out"), "--results",
              str(tmp_path / "results"), *SMOKE]
    search = bench.main(["lr-search", *common, "--epochs", "1", "--lrs", "1e-3", "1e-2"])
    assert search["mode"] == "cpu" and search["best"]["awm"] in (1e-3, 1e-2)
    assert set(search["results"]["flow_grpo"]) == {"0.001", "0.01"}

    report = bench.main(["run", *common, "--epochs", "1", "--seeds", "1", "2", "--grad-every", "1",
                         "--grad-prompts", "1"])
    saved = json.loads((tmp_path / "results" / "awm_vs_flow_grpo_cpu.json").read_text())
    assert saved["mode"] == report["mode"] == "cpu" and saved["seeds"] == [1, 2]
    assert saved["learning_rate"] == search["best"] and saved["learning_rate_source"].endswith("lr_search_cpu.json")
    for algorithm in ("awm", "flow_grpo"):
        curves = saved["curves"][algorithm]
        assert len(curves) == 2 and curves[0]["epoch"] == [0, 1] and curves[0]["images"] == [0, 32]
        assert curves[0]["eval_reward"][0] == saved["curves"]["awm"][0]["eval_reward"][0]  # same base model
        band = saved["bands"][algorithm]
        assert all(lo <= m <= hi for lo, m, hi in zip(band["low"], band["mean"], band["high"]))
    for axis in ("wall_s", "images"):
        speedup = saved["speedup"][axis]
        assert speedup["ci95"][0] <= speedup["ci95"][1] and len(speedup["per_seed"]) == 2
    runs = [(r["run"], r["epoch"]) for r in saved["grad_variance"]]
    assert runs == [("base", 0), ("awm", 1), ("flow_grpo", 1)]
    for record in saved["grad_variance"]:
        assert record["num_images"] == 16
        for algorithm in ("awm", "flow_grpo"):
            assert -1 <= record[algorithm]["half_batch_cosine"] <= 1
            assert record[algorithm]["variance_over_squared_mean"] > 0
            ratio = record[algorithm]["variance_over_squared_mean"]  # snr = 1 / ratio - 1 / N
            assert record[algorithm]["snr_per_sample"] == pytest.approx(1 / ratio - 1 / 16)
    assert (tmp_path / "results" / "awm_vs_flow_grpo_cpu.png").stat().st_size > 10_000


def test_cpu_full_mode_uses_the_cpu_lr_search(tmp_path):
    """cpu-full (the issue's 5 seeds on a machine without a GPU) takes the rates of the cpu search:
    one search, two run sizes; the gpu mode keeps its own search."""
    import argparse

    import awm_vs_flow_grpo as bench

    (tmp_path / "lr_search_cpu.json").write_text(json.dumps({"best": {"awm": 0.01, "flow_grpo": 0.003}}))
    args = argparse.Namespace(lr_from="", results=str(tmp_path), mode="cpu-full")
    rates, source = bench.learning_rates(args)
    assert rates == {"awm": 0.01, "flow_grpo": 0.003} and source.endswith("lr_search_cpu.json")
    assert bench.MODES["cpu-full"]["seeds"] == [1, 2, 3, 4, 5]
    rates, source = bench.learning_rates(argparse.Namespace(lr_from="", results=str(tmp_path), mode="gpu"))
    assert source == "presets" and rates == {"awm": None, "flow_grpo": None}


def test_lr_search_reuse_keeps_only_finished_runs(tmp_path):
    import awm_vs_flow_grpo as bench

    run = tmp_path / "awm_lr0.001"
    assert not bench.finished(str(run), 2)  # no run dir
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n')
    assert not bench.finished(str(run), 2)  # killed after one of two epochs: trained again
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": 1}\n')
    assert bench.finished(str(run), 2) and not bench.finished(str(run), 3)
