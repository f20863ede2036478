"""Atomic rotating checkpoints and resume bookkeeping (SPEC section 5, "Checkpoints")."""

import os
import pickle
import random

import numpy as np
import pytest
import torch

from advantage_weighted_matching import checkpoint as ckpt
from advantage_weighted_matching.checkpoint import (
    COMPLETE_MARKER,
    checkpoint_name,
    config_differences,
    finalize,
    flatten_config,
    list_checkpoints,
    load_training_state,
    read_json,
    resolve_resume_path,
    rng_state,
    set_rng_state,
    temp_dir_for,
    write_json,
)


def _save(root, epoch, limit=5, value=None):
    """Write a minimal checkpoint the way the trainer does: temp dir, files, finalize."""
    os.makedirs(root, exist_ok=True)
    temp = temp_dir_for(root, epoch)
    os.makedirs(temp)
    torch.save({"epoch": epoch, "global_step": 10 * epoch, "w": torch.full((2,), float(value or epoch))},
               os.path.join(temp, "training_state.pt"))
    write_json(os.path.join(temp, "config.json"), {"epoch": epoch})
    return finalize(temp, root, epoch, limit)


def test_checkpoint_name_and_temp_dir(tmp_path):
    assert checkpoint_name(7) == "checkpoint-000007"
    assert checkpoint_name(1234567) == "checkpoint-1234567"
    assert temp_dir_for(str(tmp_path), 7) == os.path.join(str(tmp_path), ".tmp-checkpoint-000007")


def test_finalize_marks_complete_renames_and_prunes(tmp_path):
    root = str(tmp_path / "checkpoints")
    finals = [_save(root, epoch, limit=2) for epoch in (20, 40, 60)]
    assert finals[-1] == os.path.join(root, "checkpoint-000060")
    assert sorted(os.listdir(root)) == ["checkpoint-000040", "checkpoint-000060"]
    for name in ("checkpoint-000040", "checkpoint-000060"):
        assert (tmp_path / "checkpoints" / name / COMPLETE_MARKER).is_file()
        assert (tmp_path / "checkpoints" / name / "training_state.pt").is_file()
    assert not any(n.startswith(".tmp-") for n in os.listdir(root))
    assert load_training_state(finals[-1])["global_step"] == 600


def test_finalize_resave_same_epoch_replaces(tmp_path):
    root = str(tmp_path / "checkpoints")
    _save(root, 3, value=1.0)
    final = _save(root, 3, value=2.0)
    assert list_checkpoints(root) == [final]
    assert load_training_state(final)["w"].tolist() == [2.0, 2.0]


def test_list_checkpoints_ignores_incomplete_and_temp_dirs(tmp_path):
    root = tmp_path / "checkpoints"
    _save(str(root), 2)
    _save(str(root), 10)
    (root / "checkpoint-000011").mkdir()  # no COMPLETE
    tmp = root / ".tmp-checkpoint-000012"
    tmp.mkdir()
    (tmp / COMPLETE_MARKER).write_text("ok\n")  # complete but still a temp dir
    (root / "notes-000013").mkdir()
    (root / "notes-000013" / COMPLETE_MARKER).write_text("ok\n")
    (root / "checkpoint-9").mkdir()  # unpadded, complete: numeric order, not lexical
    (root / "checkpoint-9" / COMPLETE_MARKER).write_text("ok\n")
    assert list_checkpoints(str(root)) == [
        str(root / "checkpoint-000002"), str(root / "checkpoint-9"), str(root / "checkpoint-000010"),
    ]
    assert list_checkpoints(str(tmp_path / "missing")) == []


def test_resolve_resume_path(tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    _save(str(root), 1)
    latest = _save(str(root), 2)
    (root / "checkpoint-000003").mkdir()  # incomplete: ignored
    # a checkpoint dir itself
    assert resolve_resume_path(str(root / "checkpoint-000001")) == str(root / "checkpoint-000001")
    # a run dir -> latest complete under checkpoints/
    assert resolve_resume_path(str(run)) == latest
    # the checkpoints dir itself
    assert resolve_resume_path(str(root)) == latest


def test_resolve_resume_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_resume_path(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    (empty / "checkpoints" / "checkpoint-000001").mkdir(parents=True)  # incomplete only
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume_path(str(empty))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume_path(str(empty / "checkpoints" / "checkpoint-000001"))


def _draws():
    return (
        [random.random(), random.gauss(0, 1)],
        np.concatenate([np.random.rand(3), np.random.randn(3)]).tolist(),
        torch.rand(3).tolist() + torch.randn(2).tolist(),
    )


def test_rng_state_round_trip_through_json(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    # leave a cached gaussian in python's and numpy's generators
    random.gauss(0, 1)
    np.random.randn()
    state = rng_state()
    write_json(str(tmp_path / "rng_state_0.json"), state)
    expected = _draws()
    _draws()  # move on
    set_rng_state(read_json(str(tmp_path / "rng_state_0.json")))
    assert _draws() == expected


def test_config_differences_lists_locked_keys():
    saved = {"resolution": 512, "train.batch_size": 3, "train.lora_rank": 32, "seed": 1, "num_processes": 8}
    current = {"resolution": 768, "train.batch_size": 3, "seed": 2, "num_processes": 8}
    assert config_differences(saved, current) == [("resolution", 512, 768), ("train.lora_rank", 32, None)]
    assert config_differences(saved, saved) == []
    assert config_differences({"a": 1}, {"a": 2}, keys=("a",)) == [("a", 1, 2)]


def test_flatten_config_nested():
    nested = {"a": 1, "b": {"c": 2, "d": {"e": 3, "f": [1, 2]}}, "g": "x"}
    assert flatten_config(nested) == {"a": 1, "b.c": 2, "b.d.e": 3, "b.d.f": [1, 2], "g": "x"}
    assert flatten_config({}) == {}


def test_failure_in_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    root = str(run / "checkpoints")
    previous = _save(root, 1)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        _save(root, 2)
    monkeypatch.undo()
    assert list_checkpoints(root) == [previous]
    assert resolve_resume_path(str(run)) == previous
    assert load_training_state(previous)["epoch"] == 1
    assert not os.path.exists(os.path.join(root, "checkpoint-000002"))


def test_failure_while_writing_temp_dir_keeps_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    root = str(run / "checkpoints")
    previous = _save(root, 1)
    temp = temp_dir_for(root, 2)
    os.makedirs(temp)
    with pytest.raises(RuntimeError):
        torch.save({"x": torch.zeros(1)}, os.path.join(temp, "training_state.pt"))
        raise RuntimeError("killed while writing")
    assert resolve_resume_path(str(run)) == previous
    # the leftover temp dir, even with a COMPLETE marker in it, is never a checkpoint
    open(os.path.join(temp, COMPLETE_MARKER), "w").close()
    assert list_checkpoints(root) == [previous]
    assert resolve_resume_path(str(run)) == previous


@pytest.mark.parametrize("fail_on", ["any_rename", "new_into_place"])
def test_failure_when_resaving_same_epoch_keeps_previous_checkpoint(tmp_path, monkeypatch, fail_on):
    root = str(tmp_path / "checkpoints")
    previous = _save(root, 1)
    real_replace = os.replace

    def failing_replace(src, dst):
        if fail_on == "any_rename" or os.path.basename(src).startswith(".tmp-checkpoint"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    with pytest.raises(OSError):
        _save(root, 1)
    monkeypatch.undo()
    assert list_checkpoints(root) == [previous]
    assert os.path.exists(os.path.join(previous, COMPLETE_MARKER))


class Arbitrary:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_load_training_state_is_weights_only(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.ones(2)
    optimizer.step()
    torch.save({"optimizer": optimizer.state_dict(), "global_step": 5, "epoch": 2},
               good / "training_state.pt")
    state = load_training_state(str(good))
    assert state["global_step"] == 5
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])

    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"payload": Arbitrary()}, bad / "training_state.pt")
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
        load_training_state(str(bad))
