"""A real 2-process CPU run of the tiny preset (2 epochs), checked across ranks.

Launcher: ``accelerate launch --multi_gpu --num_processes 2`` with
``CUDA_VISIBLE_DEVICES=""``. Why this and not the obvious flags (accelerate
1.15, read from ``accelerate/commands/launch.py``):

* ``accelerate launch --cpu --num_processes 2`` always takes the *simple*
  launcher: one ``python script.py`` child with ``ACCELERATE_USE_CPU=True``,
  so a single process (``DistributedType.NO``).
* A config YAML with ``distributed_type: MULTI_CPU`` (``use_cpu: true``,
  ``num_processes: 2``) takes the same simple launcher; accelerate's
  MULTI_CPU launch means ``mpirun`` (``--mpirun_hostfile``), and there is no
  MPI here. One process again.
* ``--multi_gpu`` takes the torch.distributed launcher (``torch.distributed.run``,
  i.e. torchrun) and starts ``num_processes`` ranks with RANK/WORLD_SIZE/
  MASTER_PORT set. Nothing in it needs a GPU. The trainer builds
  ``Accelerator(cpu=not torch.cuda.is_available())``, so on a host without
  CUDA the ranks join as ``DistributedType.MULTI_CPU`` over gloo.
  ``CUDA_VISIBLE_DEVICES=""`` makes that hold on GPU hosts too (without it,
  two ranks on a one-GPU machine would ask for cuda:1).

``torchrun --nproc_per_node 2`` (``python -m torch.distributed.run``) is
equivalent; this test goes through accelerate because that is the documented
launcher of the trainer.
"""

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from advantage_weighted_matching.advantages import clip_advantages, group_advantages
from advantage_weighted_matching.checkpoint import COMPLETE_MARKER, checkpoint_name
from advantage_weighted_matching.config import tiny_awm
from advantage_weighted_matching.prompts import k_repeat_indices, load_prompts

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "advantage_weighted_matching" / "scripts" / "train_sd3_awm.py"
PRESET_FILE = REPO_ROOT / "advantage_weighted_matching" / "config" / "tiny_awm.py"
WORLD, EPOCHS = 2, 2


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def config():
    config = tiny_awm.tiny_cpu()
    # The advantage recomputation below relies on these (SPEC 4).
    assert config.per_prompt_stat_tracking and config.sample.global_std
    assert config.train.adv_clip_max == 5 and config.train.advantage_max == 1
    assert config.train.gradient_accumulation_steps == (
        config.sample.train_batch_size // config.train.batch_size * config.sample.num_batches_per_epoch
    )  # one optimizer step per epoch
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_sd3_dir):
    """Launch the 2-rank run once; returns (save_dir, CompletedProcess)."""
    save_dir = tmp_path_factory.mktemp("multiprocess") / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", f"--num_processes={WORLD}", "--num_machines=1", "--mixed_precision=no",
        "--dynamo_backend=no", "--num_cpu_threads_per_process=1", f"--main_process_port={free_port()}",
        str(SCRIPT), f"--config={PRESET_FILE}:tiny_cpu", f"--config.num_epochs={EPOCHS}",
        f"--config.save_dir={save_dir}", f"--config.pretrained.model={tiny_sd3_dir}",
        "--config.dump_rank_state=True",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a launcher outside pytest must not leak its rendezvous into this one
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=REPO_ROOT)
    return save_dir, result


@pytest.fixture(scope="module")
def rank_states(run):
    save_dir, result = run
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-6000:])
    states = {}
    for rank in range(WORLD):
        path = save_dir / "rank_state" / f"rank{rank}.jsonl"
        assert path.is_file(), f"no {path.name}: the ranks did not join one {WORLD}-process group"
        states[rank] = [json.loads(line) for line in path.read_text().splitlines()]
        assert [record["epoch"] for record in states[rank]] == list(range(EPOCHS))
    assert sorted(p.name for p in (save_dir / "rank_state").iterdir()) == [f"rank{r}.jsonl" for r in range(WORLD)]
    return states


def expected_prompts(config, train_prompts, epoch, rank):
    """Rank `rank`'s prompts of `epoch` in rollout order, from the pure k-repeat sampler (SPEC 2)."""
    sample = config.sample
    prompts = []
    for batch in range(sample.num_batches_per_epoch):
        counter = epoch * sample.num_batches_per_epoch + batch  # no skipped epochs (SPEC 2 fix)
        indices = k_repeat_indices(len(train_prompts), config.seed, counter, WORLD, sample.train_batch_size,
                                   sample.num_image_per_prompt, rank)
        prompts += [train_prompts[i] for i in indices.tolist()]
    return prompts


def test_run_exits_zero_and_main_process_logs_once(run):
    save_dir, result = run
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-6000:])
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    # One line per epoch: only rank 0 writes (two ranks each believing they are main would give 4).
    assert [r["epoch"] for r in records] == list(range(EPOCHS))
    assert [r["global_step"] for r in records] == list(range(1, EPOCHS + 1))  # one optimizer step per epoch
    for record in records:
        assert np.isfinite(record["train/loss"])


def test_prompts_follow_the_k_repeat_sampler(config, rank_states):
    train_prompts, _ = load_prompts(config.dataset, config.prompt_fn, "train")
    B, k = config.sample.train_batch_size, config.sample.num_image_per_prompt
    per_rank = B * config.sample.num_batches_per_epoch
    for epoch in range(EPOCHS):
        for rank in range(WORLD):
            prompts = rank_states[rank][epoch]["prompts"]
            assert len(prompts) == per_rank
            assert prompts == expected_prompts(config, train_prompts, epoch, rank), (epoch, rank)
        for batch in range(config.sample.num_batches_per_epoch):
            union = Counter(p for rank in range(WORLD)
                            for p in rank_states[rank][epoch]["prompts"][batch * B:(batch + 1) * B])
            # Whole groups: every prompt of the rollout batch appears exactly k times over both ranks.
            assert set(union.values()) == {k}, (epoch, batch, union)
            assert len(union) == WORLD * B // k
    # Not one list copied to both ranks, and a new draw every epoch.
    assert rank_states[0][0]["prompts"] != rank_states[1][0]["prompts"]
    assert rank_states[0][0]["prompts"] != rank_states[0][1]["prompts"]


def test_rewards_are_gathered_from_both_ranks(config, rank_states):
    per_rank = config.sample.train_batch_size * config.sample.num_batches_per_epoch
    for epoch in range(EPOCHS):
        gathered = [rank_states[rank][epoch]["gathered_rewards"] for rank in range(WORLD)]
        assert len(gathered[0]) == WORLD * per_rank
        assert gathered[0] == gathered[1]  # exactly the same list on both ranks
        rewards = np.asarray(gathered[0])
        assert np.all(np.isfinite(rewards))
        # The two ranks' halves come from different rollouts (distinct seeds per rank).
        assert not np.array_equal(rewards[:per_rank], rewards[per_rank:])


def test_advantages_use_all_ranks_rewards(config, rank_states):
    per_rank = config.sample.train_batch_size * config.sample.num_batches_per_epoch
    train = config.train
    for epoch in range(EPOCHS):
        rewards = np.asarray(rank_states[0][epoch]["gathered_rewards"])
        all_prompts = [p for rank in range(WORLD) for p in rank_states[rank][epoch]["prompts"]]  # rank-major
        expected, _ = group_advantages(all_prompts, rewards, per_prompt=True, global_std=True)
        expected = clip_advantages(expected, train.adv_clip_max, train.advantage_max)
        assert np.abs(expected).max() > 1e-3  # a non-trivial check: rewards vary within groups
        for rank in range(WORLD):
            mine = np.asarray(rank_states[rank][epoch]["advantages"])
            assert mine.shape == (per_rank,)
            np.testing.assert_allclose(mine, expected[rank * per_rank:(rank + 1) * per_rank], rtol=1e-5, atol=1e-6)
            # What a rank would get from its own rewards alone differs: the test can tell the two apart.
            local, _ = group_advantages(all_prompts[rank * per_rank:(rank + 1) * per_rank],
                                        rewards[rank * per_rank:(rank + 1) * per_rank], True, True)
            local = clip_advantages(local, train.adv_clip_max, train.advantage_max)
            assert not np.allclose(mine, local, rtol=1e-5, atol=1e-6)


def test_lora_weights_stay_in_sync_and_change(rank_states):
    digests = [[rank_states[rank][epoch]["lora_sha256"] for rank in range(WORLD)] for epoch in range(EPOCHS)]
    for epoch, per_rank in enumerate(digests):
        assert len(set(per_rank)) == 1, f"epoch {epoch}: ranks hold different LoRA weights {per_rank}"
    assert digests[0][0] != digests[1][0]  # the epoch-1 optimizer step changed the weights


def test_final_checkpoint_written_by_both_ranks(run, rank_states):
    save_dir, _ = run
    checkpoint = save_dir / "checkpoints" / checkpoint_name(EPOCHS)
    assert (checkpoint / COMPLETE_MARKER).is_file()
    assert (checkpoint / "training_state.pt").is_file()
    for name in ("lora", "kl_ema_lora", "ema_lora"):
        assert any((checkpoint / name).iterdir()), name
    for rank in range(WORLD):  # every rank saves its own RNG state
        assert (checkpoint / f"rng_state_{rank}.json").is_file()
    assert not list((save_dir / "checkpoints").glob(".tmp-*"))
