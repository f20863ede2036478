"""The overhead benchmark's timer (issue F.4): it must count the backward pass and every model call."""

import os
import sys
import time

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
