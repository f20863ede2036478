"""The accelerate config files parse and resolve through accelerate's own loader.

No GPU and no deepspeed package are needed: the YAML files are only read by
accelerate's config classes (and, where available, by the argument resolution
of `accelerate launch`), never used to start processes.
"""

from pathlib import Path

import pytest

from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

CONFIG_DIR = Path(__file__).resolve().parents[1] / "advantage_weighted_matching" / "accelerate_configs"

# name -> (num_processes, num_machines, distributed_type, zero_stage or None)
EXPECTED = {
    "multi_gpu": (8, 1, DistributedType.MULTI_GPU, None),
    "multi_node": (32, 4, DistributedType.MULTI_GPU, None),
    "deepspeed_zero1": (8, 1, DistributedType.DEEPSPEED, 1),
    "deepspeed_zero2": (8, 1, DistributedType.DEEPSPEED, 2),
    "deepspeed_zero3": (8, 1, DistributedType.DEEPSPEED, 3),
}


def _path(name):
    return str(CONFIG_DIR / f"{name}.yaml")


def test_no_unexpected_config_files():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads(name):
    num_processes, num_machines, distributed_type, zero_stage = EXPECTED[name]
    config = load_config_from_file(_path(name))
    assert isinstance(config, ClusterConfig)
    assert config.num_processes == num_processes
    assert config.num_machines == num_machines
    assert config.distributed_type == distributed_type
    assert str(config.mixed_precision) == "fp16"
    assert config.use_cpu is False
    if zero_stage is None:
        assert not config.deepspeed_config
    else:
        ds = config.deepspeed_config
        assert ds["zero_stage"] == zero_stage
        assert ds.get("offload_optimizer_device", "none") == "none"
        assert ds.get("offload_param_device", "none") == "none"
        # A value here would be exported by `accelerate launch` and override
        # the trainer's gradient accumulation steps.
        assert "gradient_accumulation_steps" not in ds


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_round_trips(name, tmp_path):
    """Writing the parsed config back gives the same config (no lost keys)."""
    config = ClusterConfig.from_yaml_file(_path(name))
    copy = tmp_path / "copy.yaml"
    config.to_yaml_file(str(copy))
    assert ClusterConfig.from_yaml_file(str(copy)).to_dict() == config.to_dict()


def _resolve_launch_args(argv):
    """Resolve `accelerate launch` arguments the way the launcher does."""
    launch = pytest.importorskip("accelerate.commands.launch")
    if not hasattr(launch, "_validate_launch_command"):
        pytest.skip("this accelerate has no _validate_launch_command to resolve launch arguments")
    args = launch.launch_command_parser().parse_args(argv + ["train.py"])
    return launch._validate_launch_command(args)[0]


def test_single_node_launch_resolution():
    args = _resolve_launch_args(["--config_file", _path("multi_gpu"), "--main_process_port", "29511"])
    assert args.multi_gpu and not args.use_deepspeed
    assert args.num_processes == 8
    assert args.num_machines == 1
    assert args.mixed_precision == "fp16"
    assert args.main_process_port == 29511


def test_multi_node_cli_overrides():
    args = _resolve_launch_args(
        [
            "--config_file", _path("multi_node"),
            "--machine_rank", "3",
            "--main_process_ip", "10.1.2.3",
            "--main_process_port", "29600",
        ]
    )  # fmt: skip
    assert args.multi_gpu
    assert args.num_processes == 32
    assert args.num_machines == 4
    assert args.machine_rank == 3
    assert args.main_process_ip == "10.1.2.3"
    assert args.main_process_port == 29600


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_launch_resolution(stage):
    args = _resolve_launch_args(["--config_file", _path(f"deepspeed_zero{stage}")])
    assert args.use_deepspeed
    assert args.zero_stage == stage
    assert args.num_processes == 8
    assert args.mixed_precision == "fp16"
    assert args.gradient_accumulation_steps is None
