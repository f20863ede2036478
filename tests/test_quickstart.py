"""The README's quick start (issue H.5), run exactly as a newcomer runs it: one
`accelerate launch` of the `quickstart` preset in a fresh cache directory. The
command builds its toy model (cached afterwards), trains, and must show learning:
the eval reward rises by at least 0.1 between the first and the last evaluation,
and `reward_curve.png` is in the run dir.
"""

import glob
import os
import subprocess
import sys
import time

import pytest

from advantage_weighted_matching.checkpoint import read_metrics
from advantage_weighted_matching.paths import REPO_ROOT

QUICKSTART = ["--num_processes", "1", "advantage_weighted_matching/scripts/train_sd3_awm.py",
              "--config", "advantage_weighted_matching/config/toy_awm.py:quickstart"]


@pytest.mark.slow
def test_quickstart_command_shows_learning(tmp_path):
    env = {**os.environ, "AWM_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "accelerate.commands.launch", *QUICKSTART,
               f"--config.logdir={tmp_path / 'logs'}"]
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "logs" / "quickstart_*"))
    evals = [m["eval/avg"] for m in read_metrics(run_dir) if "eval/avg" in m]
    assert len(evals) >= 3, evals
    assert os.path.getsize(os.path.join(run_dir, "reward_curve.png")) > 1000
    assert os.path.isfile(tmp_path / "cache" / "toy-scenes-quick-sd3-seed0" / "model_index.json")
    print(f"quick start: {seconds:.0f} s, eval rewards {[round(e, 3) for e in evals]}")
    # Issue H.5: the reward rises clearly. Measured +0.16 to +0.47 over 5 seeds (toy_awm.quickstart).
    assert evals[-1] - evals[0] >= 0.1, f"quick start did not rise by 0.1: eval rewards {evals}"


def test_reward_curve_plot(tmp_path):
    from advantage_weighted_matching.visualize import plot_reward_curve

    records = [{"epoch": e, "reward/avg": 0.1 * e, **({"eval/avg": 0.05 * e} if e % 2 else {})} for e in range(5)]
    path = plot_reward_curve(records, str(tmp_path / "reward_curve.png"), "test")
    assert path and os.path.getsize(path) > 1000 and not os.path.exists(path + ".tmp.png")
    first = os.path.getmtime(path)
    time.sleep(0.01)
    plot_reward_curve(records[:2], path)  # rewritten in place every epoch
    assert os.path.getmtime(path) >= first
