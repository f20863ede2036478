"""AWM vs Flow-GRPO on the CPU toy task: reward against wall-clock and samples.

    python benchmarks/awm_vs_flow_grpo.py [--seeds 1 2 3] [--epochs 30] [--out benchmarks/out]

Both algorithms start from the same pretrained toy SD3 (coloured shapes,
`advantage_weighted_matching.toy`; pretrained once and cached) and use the
presets `toy_awm` / `toy_flow_grpo` of `advantage_weighted_matching/config/toy_awm.py`:
the SD3.5 presets' hyperparameters scaled down the same way for both (same
images per epoch, group size, micro-batch, LoRA, learning rate, epochs), each
algorithm keeping its own published settings (AWM: SA-Solver, ghuber weighting,
KL-EMA; Flow-GRPO: SDE rollouts with noise 0.7, per-step ratios clipped at
1e-4, velocity KL). The two runs of a seed run side by side (one thread each)
so they see the same machine load.

Reported (JSON + PNG): the evaluation reward on the 24 fixed test prompts
(deterministic ODE sampling every `eval_freq` epochs; per-epoch training
rewards of 32 images vary more with the prompts drawn than with learning)
against cumulative training wall time (sample + reward wait + train, eval
excluded) and against images sampled; speedup = Flow-GRPO's time to its best
smoothed eval reward / AWM's time to first reach that reward (per seed, then
the median over seeds where AWM reaches it).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ALGORITHMS = ("awm", "flow_grpo")


def run_pair(seed, epochs, out_dir, model_dir, extra):
    """Start AWM and Flow-GRPO for one seed side by side; wait for both."""
    processes = {}
    for algorithm in ALGORITHMS:
        save_dir = os.path.join(out_dir, f"{algorithm}_seed{seed}")
        command = [
            sys.executable, os.path.join(REPO, "advantage_weighted_matching", "scripts", "train_sd3_awm.py"),
            f"--config={os.path.join(REPO, 'advantage_weighted_matching', 'config', 'toy_awm.py')}:toy_{algorithm}",
            f"--config.save_dir={save_dir}", f"--config.seed={seed}", f"--config.num_epochs={epochs}",
            f"--config.pretrained.model={model_dir}", *extra,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
        shutil.rmtree(save_dir, ignore_errors=True)  # a rerun starts afresh (the trainer refuses to mix runs)
        os.makedirs(save_dir, exist_ok=True)
        log = open(os.path.join(save_dir, "train.log"), "w")
        processes[algorithm] = (subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), save_dir)
    for algorithm, (process, save_dir) in processes.items():
        if process.wait() != 0:
            raise RuntimeError(f"{algorithm} seed {seed} failed: see {save_dir}/train.log")
    return {algorithm: read_curve(save_dir) for algorithm, (_, save_dir) in processes.items()}


def read_curve(save_dir):
    from advantage_weighted_matching.checkpoint import read_metrics

    ordered = read_metrics(save_dir)
    wall = np.cumsum([r["timing/sample"] + r["timing/reward_wait"] + r["timing/train"] for r in ordered])
    evaluated = [i for i, r in enumerate(ordered) if "eval/avg" in r]
    return {
        "reward": [r["reward/avg"] for r in ordered], "wall_s": wall.tolist(),
        # the fixed test prompts, every eval_freq epochs: the low-noise learning curve
        "eval_epoch": [ordered[i]["epoch"] + 1 for i in evaluated], "eval_reward": [ordered[i]["eval/avg"] for i in evaluated],
        "eval_wall_s": [float(wall[i]) for i in evaluated],
    }


def smooth(values, window=5):
    """Trailing moving average (the first points average what exists so far)."""
    values = np.asarray(values, dtype=np.float64)
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.arange(1, len(values) + 1) - counts]) / counts


def speedup(awm, flow_grpo, window=2):
    """Flow-GRPO's training time to its best smoothed eval reward / AWM's time to first reach it
    (None if AWM never does). Smoothing: trailing mean over `window` evaluations."""
    fg, aw = smooth(flow_grpo["eval_reward"], window), smooth(awm["eval_reward"], window)
    best = int(np.argmax(fg))
    reached = np.nonzero(aw >= fg[best])[0]
    if not len(reached):
        return None, float(fg[best])
    return flow_grpo["eval_wall_s"][best] / awm["eval_wall_s"][int(reached[0])], float(fg[best])


def plot(curves, images_per_epoch, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_time, by_samples) = plt.subplots(1, 2, figsize=(11, 4))
    for algorithm, color in zip(ALGORITHMS, ("tab:blue", "tab:orange")):
        runs = curves[algorithm]
        rewards = np.array([run["eval_reward"] for run in runs])
        wall = np.array([run["eval_wall_s"] for run in runs]).mean(axis=0)
        samples = images_per_epoch * np.array(runs[0]["eval_epoch"])
        mean, low, high = rewards.mean(0), rewards.min(0), rewards.max(0)
        for axis, x in ((by_time, wall), (by_samples, samples)):
            axis.plot(x, mean, color=color, label=f"{algorithm} (mean of {len(runs)} seeds)")
            axis.fill_between(x, low, high, color=color, alpha=0.2)
    by_time.set_xlabel("training wall-clock (s, sample + reward + train; eval excluded)")
    by_samples.set_xlabel("images sampled")
    for axis in (by_time, by_samples):
        axis.set_ylabel("eval reward (24 fixed test prompts, ODE)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("AWM vs Flow-GRPO on the CPU toy task (shapes reward)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    parser.add_argument("--model", default="", help="pretrained toy pipeline dir (default: cached, built if missing)")
    args, extra = parser.parse_known_args()
    sys.path.insert(0, REPO)
    from advantage_weighted_matching.config import toy_awm

    started = time.time()
    model_dir = args.model or toy_awm.ensure_toy_assets()
    pretrain_s = time.time() - started
    os.makedirs(args.out, exist_ok=True)
    curves = {algorithm: [] for algorithm in ALGORITHMS}
    speedups, targets = [], []
    for seed in args.seeds:
        pair = run_pair(seed, args.epochs, args.out, model_dir, extra)
        for algorithm in ALGORITHMS:
            curves[algorithm].append(pair[algorithm])
        value, target = speedup(pair["awm"], pair["flow_grpo"])
        speedups.append(value)
        targets.append(target)
        print(f"seed {seed}: speedup {value} at Flow-GRPO's best smoothed reward {target:.3f}", flush=True)
    config = toy_awm.toy_awm()
    images_per_epoch = config.sample.train_batch_size * config.sample.num_batches_per_epoch
    plot(curves, images_per_epoch, os.path.join(args.out, "awm_vs_flow_grpo.png"))
    reached = [s for s in speedups if s is not None]
    report = {
        "seeds": args.seeds, "epochs": args.epochs, "images_per_epoch": images_per_epoch,
        "speedup_per_seed": speedups, "speedup_median": float(np.median(reached)) if reached else None,
        "flow_grpo_best_smoothed_reward": targets,
        "eval_reward_mean": {a: np.mean([c["eval_reward"] for c in curves[a]], axis=0).tolist() for a in ALGORITHMS},
        "eval_epochs": curves["awm"][0]["eval_epoch"],
        "first_epoch_train_reward": {a: [c["reward"][0] for c in curves[a]] for a in ALGORITHMS},
        "wall_s_per_epoch": {a: float(np.mean([c["wall_s"][-1] / len(c["wall_s"]) for c in curves[a]]))
                             for a in ALGORITHMS},
        "curves": curves, "pretrain_or_cache_s": pretrain_s, "total_s": time.time() - started,
        "hyperparameters": {a: toy_awm.describe(a) for a in ALGORITHMS},
    }
    with open(os.path.join(args.out, "awm_vs_flow_grpo.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k not in ("curves", "hyperparameters")}, indent=1))


if __name__ == "__main__":
    main()
