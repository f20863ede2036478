"""Per-epoch throughput logging (issue I.5): the FLOP count against a hand count, the meter's
arithmetic, and the keys the trainer writes (MFU and peak memory only on CUDA)."""

import pytest
import torch

from advantage_weighted_matching.throughput import ThroughputMeter, count_flops


def test_count_flops_of_a_linear_by_hand():
    """y = x W^T + b with x [5, 8], W [4, 8]: one [5 x 8] @ [8 x 4] product = 2 * 5 * 8 * 4 FLOPs
    (a multiply and an add per term; the bias add is not counted). Backward: dx = dy W and
    dW = dy^T x, two products of the same size."""
    linear = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    y, forward = count_flops(lambda: linear(x))
    assert forward == 2 * 5 * 8 * 4 == 320
    _, both = count_flops(lambda: linear(x).sum().backward())
    assert both == 3 * 320
    with torch.no_grad():
        assert count_flops(lambda: linear(torch.randn(10, 8)))[1] == 640  # linear in the rows


def test_count_flops_sees_compiled_code():
    """Compiled regions run eagerly while counting: the count is the eager one."""
    class Block(torch.nn.Module):  # a user module: dynamo compiles it (torch.nn's own are skipped)
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 4)

        def forward(self, x):
            return torch.relu(self.linear(x))

    block = Block()
    block.compile(backend="eager", dynamic=False)
    with torch.no_grad():
        assert count_flops(lambda: block(torch.randn(5, 8)))[1] == 320


def test_meter_counts_once_times_the_rest_and_reports_mfu():
    linear = torch.nn.Linear(64, 64)
    meter = ThroughputMeter("cpu", peak_tflops=1e-6, mfu=True)  # CPU with the MFU path forced on
    meter.start_epoch()
    for rows in (8, 8, 16):
        with meter.measure("train", rows), torch.no_grad():
            linear(torch.randn(rows, 64))
    assert meter.flops_per_row == {"train": 2 * 64 * 64}
    assert [record[1] for record in meter.records] == [8, 16]  # the counted first call is not timed
    seconds = sum(end - start for _, _, start, end in meter.records)
    log = meter.epoch_log({"sample": 2.0, "reward_wait": 1.0, "train": 1.0}, images=8)
    flops = 2 * 64 * 64 * (8 + 16)
    assert log["perf/tflops_train"] == pytest.approx(flops / seconds / 1e12)
    assert log["perf/mfu_train"] == pytest.approx(flops / seconds / 1e6)
    assert log["perf/rollout_images_per_s"] == 4.0 and log["perf/epoch_images_per_s"] == 2.0
    meter.start_epoch()
    assert meter.records == []


def test_meter_on_cpu_logs_rates_only():
    meter = ThroughputMeter("cpu")
    meter.start_epoch()
    with meter.measure("rollout", 4):
        pass
    meter.end_phase("sample")
    log = meter.epoch_log({"sample": 0.5, "reward_wait": 0.0, "train": 0.5}, images=4)
    assert set(log) == {"perf/rollout_images_per_s", "perf/epoch_images_per_s"}
    assert meter.flops_per_row == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events and memory stats")
def test_meter_on_cuda_logs_mfu_and_peak_memory():
    linear = torch.nn.Linear(256, 256, device="cuda")
    meter = ThroughputMeter("cuda")
    meter.start_epoch()
    for _ in range(3):
        with meter.measure("rollout", 32), torch.no_grad():
            linear(torch.randn(32, 256, device="cuda"))
    meter.end_phase("sample")
    log = meter.epoch_log({"sample": 1.0}, images=32)
    assert 0 < log["perf/mfu_rollout"] < 1 and log["perf/peak_gib_sample"] > 0


def test_throughput_benchmark_tiny_smoke(tmp_path):
    """`benchmarks/throughput.py --size tiny --rewards`: both paths, parity, the implied epochs of the
    three SD3 presets, the targets and the rewards' wiring, on CPU (compile with the "eager" backend)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import throughput

    out = tmp_path / "throughput_tiny.json"
    report = throughput.main(["--size", "tiny", "--repeats", "1", "--rewards", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["paths"]) == {"eager", "optimised"}
    fast = report["paths"]["optimised"]
    assert fast["settings"] == {"compile": True, "compile_mode": "default", "batched_reference": True,
                                "fused_adam": False, "rollout_chunks": [6, 12]}
    assert set(fast["micro_batch"]) == {"3x6", "3x6_checkpointed", "2x6", "2x6_checkpointed"}
    assert fast["compile_s"] > 0 and report["paths"]["eager"]["compile_s"] == 0
    assert set(report["implied_epoch_s"]) == {"geneval_sd3_no_cfg_1node", "ocr_sd3_no_cfg_1node",
                                              "pickscore_sd3_no_cfg_1node"}
    for row in report["implied_epoch_s"].values():
        assert row["eager"] > 0 and row["optimised"] > 0 and row["ratio"] == row["optimised"] / row["eager"]
    parity = report["parity"]
    assert set(parity["rollout_latents_max_abs"]) == {"6", "12"}
    assert max(parity["rollout_latents_max_abs"].values()) < 1e-4 and parity["loss_abs"] < 1e-6
    assert report["targets"]["parity_latents_max_abs"]["met"] and report["targets"]["parity_loss_abs"]["met"]
    assert report["flops"]["forward_per_image"] > 0 and report["flops"]["train_per_row"] > 0
    for name in ("geneval", "pickscore"):
        assert report["rewards"][name]["images_per_s"] > 0 and report["rewards"][name]["overlap"]["batches"] == 4
    assert "ocr_unavailable" in report["rewards"]["unavailable"]
