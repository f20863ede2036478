"""Keep every run's work (issue J.1, J.2, J.8), through the real command line.

Every run here is a subprocess of the training script, as a user starts it:
* two runs started at once on one run dir: one trains, the other is refused in one line;
* Ctrl-C (SIGINT) and a closed terminal (SIGHUP) save a checkpoint and exit 130 / 129, no traceback;
* bad input ends in one message and exit status 2 before any model loads or anything is written.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from advantage_weighted_matching.checkpoint import list_checkpoints, read_json, verify_checkpoint
from advantage_weighted_matching.runlock import LOCK_NAME, RunDirBusy, RunDirLock
from test_train_e2e import pipeline_spy, run_cli  # noqa: F401 (fixture)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "advantage_weighted_matching" / "scripts" / "train_sd3_awm.py"
PRESET = f"{REPO_ROOT / 'advantage_weighted_matching' / 'config' / 'tiny_awm.py'}:tiny_cpu"
QUIET = ["--config.eval_freq=0", "--config.log_image_freq=0"]


def command(save_dir, model_dir, *overrides):
    return [sys.executable, str(SCRIPT), f"--config={PRESET}", f"--config.save_dir={save_dir}",
            f"--config.pretrained.model={model_dir}", *QUIET, *overrides]


def environment():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def start(args, log_path):
    log = open(log_path, "wb")  # noqa: SIM115 - closed by the caller via the process
    return subprocess.Popen(args, env=environment(), stdout=log, stderr=subprocess.STDOUT)


def run(args, timeout=180):
    return subprocess.run(args, env=environment(), capture_output=True, text=True, timeout=timeout)


def wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, f"exited early with {process.returncode}"
        assert time.time() < deadline, f"no {path} in time"
        time.sleep(0.05)


# ---------------------------------------------------------------- J.1 one run per run dir


def test_two_runs_started_on_one_run_dir(tmp_path, tiny_sd3_dir):
    """The issue's recipe: `P ... --config.save_dir=runs/shared & P ... --config.seed=7 ...`."""
    shared = tmp_path / "shared"
    runs = [start(command(shared, tiny_sd3_dir, "--config.save_freq=1", "--config.num_epochs=2", *seed),
                  tmp_path / f"run{i}.log") for i, seed in enumerate(([], ["--config.seed=7"]))]
    codes = [process.wait(timeout=240) for process in runs]
    logs = [(tmp_path / f"run{i}.log").read_text() for i in range(2)]
    assert sorted(codes) == [0, 2], logs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    refusal = [line for line in logs[loser].splitlines() if line.startswith("train_sd3_awm:")]
    assert refusal == [f"train_sd3_awm: run dir {shared} is in use by pid {runs[winner].pid} on host "
                       + refusal[0].split(" on host ")[1]], logs[loser]
    assert "Stop that run first or choose another save_dir" in refusal[0] and "Traceback" not in logs[loser]
    # Everything in the dir is the winner's: its seed, and checkpoints that verify.
    assert read_json(shared / "config.json")["seed"] == (42, 7)[winner]
    checkpoints = list_checkpoints(str(shared / "checkpoints"))
    assert [os.path.basename(p) for p in checkpoints] == ["checkpoint-000001", "checkpoint-000002"]
    for path in checkpoints:
        verify_checkpoint(path)
        assert read_json(os.path.join(path, "config.json"))["seed"] == (42, 7)[winner]


def _hold_lock(run_dir, ready, child_too=False):
    """A process that takes the run dir's lock (and optionally forks a child that inherits
    it); `ready` receives the child's pid (or 0) once the lock is held."""
    code = (f"import os, time\nfrom advantage_weighted_matching.runlock import RunDirLock\n"
            f"lock = RunDirLock.acquire({str(run_dir)!r})\n"
            + ("child = os.fork()\nif child == 0:\n    time.sleep(60)\n    os._exit(0)\n" if child_too
               else "child = 0\n")
            + f"open({str(ready) + '.tmp'!r}, 'w').write(str(child))\n"
            + f"os.replace({str(ready) + '.tmp'!r}, {str(ready)!r})\ntime.sleep(60)\n")
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def test_lock_dies_with_its_owner_and_names_it_while_alive(tmp_path):
    holder = _hold_lock(tmp_path, tmp_path / "ready")
    try:
        wait_for(tmp_path / "ready", holder, timeout=30)
        with pytest.raises(RunDirBusy, match=f"in use by pid {holder.pid} on host "):
            RunDirLock.acquire(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    lock = RunDirLock.acquire(str(tmp_path))  # SIGKILL released it: taken over, the dead owner noted
    assert lock.previous["pid"] == holder.pid
    lock.release()
    again = RunDirLock.acquire(str(tmp_path))
    assert again.previous is None  # released properly this time
    again.release()


def test_stale_lock_held_by_an_orphan_says_how_to_find_it(tmp_path):
    holder = _hold_lock(tmp_path, tmp_path / "ready", child_too=True)
    wait_for(tmp_path / "ready", holder, timeout=30)
    orphan = int((tmp_path / "ready").read_text())
    try:
        holder.kill()
        holder.wait()
        with pytest.raises(RunDirBusy) as busy:  # the forked child still holds the descriptor
            RunDirLock.acquire(str(tmp_path))
        message = str(busy.value)
        assert f"its recorded owner, pid {holder.pid}" in message and "has exited" in message
        assert f"fuser -v {tmp_path / LOCK_NAME}" in message
    finally:
        os.kill(orphan, signal.SIGKILL)


# ---------------------------------------------------------------- J.2 Ctrl-C and SIGHUP save and exit


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_interrupt_saves_a_checkpoint_and_exits_128_plus_signal(tmp_path, tiny_sd3_dir, sig):
    save_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    process = start(command(save_dir, tiny_sd3_dir, "--config.save_freq=1", "--config.num_epochs=100"), log)
    try:
        wait_for(save_dir / "checkpoints" / "checkpoint-000001" / "COMPLETE", process)
        process.send_signal(sig)
        assert process.wait(timeout=60) == 128 + sig
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    assert f"{sig.name} received: checkpoint saved, exiting with {128 + sig}" in output
    epochs_done = len((save_dir / "metrics.jsonl").read_text().splitlines())
    latest = list_checkpoints(str(save_dir / "checkpoints"))[-1]
    assert latest.endswith(f"checkpoint-{epochs_done:06d}")  # no finished epoch lost
    verify_checkpoint(latest)
    owner = read_json(save_dir / LOCK_NAME)
    assert owner["pid"] == process.pid and owner["released"] is True  # released on the way out
    RunDirLock.acquire(str(save_dir)).release()


# ---------------------------------------------------------------- J.8 one message before any model loads


def test_config_key_typo_is_one_line(tmp_path, tiny_sd3_dir):
    result = run(command(tmp_path / "run", tiny_sd3_dir, "--config.train.betta=1"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "train_sd3_awm: invalid override --config.train.betta=1: the config has no key 'betta' "
        '(Did you mean "beta" instead of "betta"?)']
    assert not (tmp_path / "run").exists()


BAD_INPUT = {  # case -> (overrides, expected message); {tmp}: the test's directory, {file}: a regular file there
    "missing_model": (["--config.pretrained.model={tmp}/sd3", "--config.pretrained.tiny_seed=-1"],
                      "pretrained.model='{tmp}/sd3' does not exist"),
    "model_not_a_pipeline": (["--config.pretrained.model={tmp}", "--config.pretrained.tiny_seed=-1"],
                             "pretrained.model='{tmp}' is not a diffusers pipeline directory"),
    "save_dir_under_a_file": (["--config.save_dir={file}/run"],
                              "save_dir='{file}/run' cannot be created: {file} is not a directory"),
    "logdir_under_a_file": (["--config.save_dir=", "--config.logdir={file}/logs"],
                            "logdir='{file}/logs' cannot be created: {file} is not a directory"),
    "negative_seed": (["--config.seed=-1"], "seed=-1 must be an integer >= 0"),
    "resume_missing": (["--config.resume_from={tmp}/nope"], "resume_from='{tmp}/nope' does not exist"),
    "resume_empty": (["--config.resume_from={tmp}/empty"], "resume_from='{tmp}/empty' holds no complete checkpoint"),
    "resume_file": (["--config.resume_from={file}"], "resume_from='{file}' is a file"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_message_before_anything_is_created(tmp_path, tiny_sd3_dir, pipeline_spy, capsys, case):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    fill = {"tmp": tmp_path, "file": tmp_path / "a_file"}
    overrides, needle = BAD_INPUT[case]
    save_dir = tmp_path / "run"
    code = run_cli(save_dir, tiny_sd3_dir, *(o.format(**fill) for o in overrides))
    err = capsys.readouterr().err
    assert code == 2
    messages = [line for line in err.splitlines() if line.startswith("train_sd3_awm:")]
    assert len(messages) == 1 and "Traceback" not in err, err[-3000:]
    assert needle.format(**fill) in err
    assert pipeline_spy == [], "a model was loaded"
    assert not save_dir.exists() and not (tmp_path / "logs").exists(), "something was created"
