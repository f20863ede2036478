"""Atomic rotating checkpoints and resume bookkeeping (SPEC section 5, "Checkpoints")."""

import os
import pickle
import random
import shutil

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
from advantage_weighted_matching.config import ConfigError


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


# ---------------------------------------------------------------- checksums and resume selection (issue J.4)


def _full(root, epoch):
    """A checkpoint with every kind of file the trainer writes (tiny contents)."""
    from safetensors.torch import save_file

    os.makedirs(root, exist_ok=True)
    temp = temp_dir_for(root, epoch)
    os.makedirs(temp)
    for name in ("lora", "kl_ema_lora"):
        os.makedirs(os.path.join(temp, name))
        save_file({"w": torch.arange(64, dtype=torch.float32) + epoch},
                  os.path.join(temp, name, "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    torch.save({"epoch": epoch, "global_step": epoch}, os.path.join(temp, "training_state.pt"))
    write_json(os.path.join(temp, "rng_state_0.json"), {"torch": [1, 2, 3]})
    write_json(os.path.join(temp, "config.json"), {"seed": 42})
    return finalize(temp, root, epoch, limit=5)


LORA = os.path.join("lora", "pytorch_lora_weights.safetensors")
CORRUPTIONS = {
    "truncated_lora": (lambda p: _rewrite(p, LORA, lambda b: b[: len(b) // 2]), "truncated"),
    "bit_flip_in_tensor_data": (lambda p: _rewrite(p, LORA, lambda b: b[:-1] + bytes([b[-1] ^ 1])), "sha256 differs"),
    "config_json": (lambda p: _rewrite(p, "config.json", lambda b: b.replace(b"42", b"43")), "sha256 differs"),
    "training_state": (lambda p: _rewrite(p, "training_state.pt", lambda b: b[:100]), "truncated"),
    "rng_file": (lambda p: _rewrite(p, "rng_state_0.json", lambda b: b"{oops"), ""),
    "missing_adapter_dir": (lambda p: shutil.rmtree(os.path.join(p, "kl_ema_lora")), "missing (listed in"),
    "manifest": (lambda p: _rewrite(p, "checksums.json", lambda b: b"[]"), "unreadable checksum manifest"),
}


def _rewrite(checkpoint, relative, change):
    path = os.path.join(checkpoint, relative)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(change(data))
    return os.path.join(checkpoint, relative)


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    import hashlib

    path = _full(str(tmp_path / "checkpoints"), 1)
    files = read_json(os.path.join(path, ckpt.MANIFEST))["files"]
    assert sorted(files) == sorted(["config.json", "kl_ema_lora/pytorch_lora_weights.safetensors", LORA,
                                    "rng_state_0.json", "training_state.pt"])
    with open(os.path.join(path, LORA), "rb") as f:
        data = f.read()
    assert files[LORA] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify_checkpoint(path, required=[LORA, "training_state.pt"]) == path


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_verify_names_the_corrupt_file(tmp_path, corruption):
    path = _full(str(tmp_path / "checkpoints"), 1)
    corrupt, reason = CORRUPTIONS[corruption]
    corrupt(path)
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.verify_checkpoint(path)
    message = str(error.value)
    assert message.startswith(path + os.sep) and reason in message, message


def test_required_file_missing_is_named(tmp_path):
    path = _full(str(tmp_path / "checkpoints"), 1)
    with pytest.raises(ckpt.CheckpointError, match="rng_state_1.json: missing"):
        ckpt.verify_checkpoint(path, required=["rng_state_0.json", "rng_state_1.json"])


def test_checkpoint_without_manifest_is_parsed_instead(tmp_path):
    """Written before checksums existed: still loadable, and a corrupt file still fails by name."""
    path = _full(str(tmp_path / "checkpoints"), 1)
    os.remove(os.path.join(path, ckpt.MANIFEST))
    assert ckpt.verify_checkpoint(path) == path
    _rewrite(path, "kl_ema_lora/pytorch_lora_weights.safetensors", lambda b: b[:20])
    with pytest.raises(ckpt.CheckpointError, match=r"kl_ema_lora/pytorch_lora_weights.safetensors: unreadable"):
        ckpt.verify_checkpoint(path)


def test_select_skips_corrupt_newest_and_reports_it(tmp_path):
    root = str(tmp_path / "run" / "checkpoints")
    good, newest = _full(root, 1), _full(root, 2)
    CORRUPTIONS["bit_flip_in_tensor_data"][0](newest)
    warnings = []
    assert ckpt.select_resume_checkpoint(str(tmp_path / "run"), 1, warn=warnings.append) == good
    assert warnings == [f"resume: skipping checkpoint checkpoint-000002: {os.path.join(newest, LORA)}: "
                        f"sha256 differs from the one saved (corrupt)"]
    with pytest.raises(ckpt.CheckpointError, match="sha256 differs"):  # named explicitly: no fallback
        ckpt.select_resume_checkpoint(newest, 1)
    CORRUPTIONS["truncated_lora"][0](good)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint verifies") as error:
        ckpt.select_resume_checkpoint(str(tmp_path / "run"), 1, warn=warnings.append)
    assert str(error.value).count("\n  ") == 2  # one reason per checkpoint


def test_resume_candidates_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "run" / "checkpoints" / "checkpoint-000003").mkdir(parents=True)
    for path, message in ((tmp_path / "nope", "does not exist"), (tmp_path / "file", "is a file"),
                          (tmp_path / "empty", "holds no complete checkpoint"),
                          (tmp_path / "run", "holds no complete checkpoint"),
                          (tmp_path / "run" / "checkpoints" / "checkpoint-000003", "incomplete checkpoint")):
        with pytest.raises(ckpt.CheckpointError, match=message):
            ckpt.resume_candidates(str(path))


def test_run_dir_of():
    assert ckpt.run_dir_of("/r/run/checkpoints/checkpoint-000004") == "/r/run"
    assert ckpt.run_dir_of("/r/run/checkpoints") == "/r/run"
    assert ckpt.run_dir_of("/r/run") == "/r/run"


# ---------------------------------------------------------------- resume config (issue J.10)


def test_check_resume_config():
    saved = {"seed": 42, "num_epochs": 10, "train.beta": 0.1, "train.ema_beta": 0.0, "train.off_policy": False,
             "resolution": 32, "only.in.old": 1}
    same = {**saved, "num_epochs": 20, "resume_from": "x", "only.in.new": 2}
    assert ckpt.check_resume_config(saved, same, False, "ckpt") == ["num_epochs: 10 -> 20"]
    changed = {**same, "seed": 7, "train.beta": 0.2}
    with pytest.raises(ConfigError) as error:
        ckpt.check_resume_config(saved, changed, False, "ckpt")
    assert "seed: checkpoint 42 != now 7" in str(error.value) and "train.beta" in str(error.value)
    assert "num_epochs" not in str(error.value)
    assert ckpt.check_resume_config(saved, changed, True, "ckpt") == [
        "num_epochs: 10 -> 20", "seed: 42 -> 7", "train.beta: 0.1 -> 0.2"]
    with pytest.raises(ConfigError, match="resolution"):  # shapes: refused even when changes are allowed
        ckpt.check_resume_config(saved, {**same, "resolution": 64}, True, "ckpt")
    with pytest.raises(ConfigError, match="no KL-EMA adapter"):
        ckpt.check_resume_config(saved, {**same, "train.ema_beta": 1.0}, True, "ckpt")
    assert ckpt.check_resume_config({**saved, "train.ema_beta": 1.0}, same, True, "ckpt") == [
        "num_epochs: 10 -> 20", "train.ema_beta: 1.0 -> 0.0"]  # dropping the adapter is allowed


def test_write_run_config_keeps_a_different_old_one(tmp_path):
    assert ckpt.write_run_config(str(tmp_path), {"seed": 42}) is None
    assert ckpt.write_run_config(str(tmp_path), {"seed": 42}) is None  # unchanged: nothing kept
    kept = ckpt.write_run_config(str(tmp_path), {"seed": 7})
    assert kept == str(tmp_path / "config.previous-1.json") and read_json(kept) == {"seed": 42}
    assert ckpt.write_run_config(str(tmp_path), {"seed": 8}) == str(tmp_path / "config.previous-2.json")
    assert read_json(str(tmp_path / "config.json")) == {"seed": 8}
