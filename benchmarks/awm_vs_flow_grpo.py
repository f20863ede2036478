"""AWM vs Flow-GRPO on the CPU/GPU toy task: does AWM learn faster, and why? (issue H)

    python benchmarks/awm_vs_flow_grpo.py lr-search --mode cpu     # the same 4 learning rates for both, one seed
    python benchmarks/awm_vs_flow_grpo.py run --mode cpu           # seeds x both methods + gradient variance
    python benchmarks/awm_vs_flow_grpo.py run --mode cpu-full      # 5 seeds x 36 epochs on 2 cores (no GPU)
    python benchmarks/awm_vs_flow_grpo.py run --mode gpu           # 5 seeds, all runs as parallel processes

Both methods start from the same pretrained toy SD3 ("scenes" task,
`advantage_weighted_matching.toy`; pretrained on first use and cached) with the
presets `toy_awm` / `toy_flow_grpo` (`config/toy_awm.py`: groups of 16 images,
128 images per epoch, the same LoRA; each method's own settings) and are
evaluated on the 64 fixed test prompts with the deterministic Euler ODE. Trailing
arguments are config overrides for both (``--config.sample.eval_num_steps=8``).

Modes (`MODES`): ``gpu`` runs every (method, seed) as its own process at once
(the toy model is tiny: they share one GPU); ``cpu`` runs two processes at a time,
one thread each, fewer seeds and epochs, in at most 20 minutes on 2 cores;
``cpu-full`` runs the issue's 5 seeds the same way on a machine without a GPU
(about 45 minutes). The mode is recorded in every JSON.

``lr-search`` trains each method with each of the same learning rates on one
seed and keeps the best final eval reward (mean of the last two evaluations);
``run`` then uses those rates (``--lr-from``, default the search's JSON of the same
mode when present, else the presets' rate) and writes, under ``--results``:

* ``awm_vs_flow_grpo_<mode>.{json,png}``: (a) eval reward against training
  wall-clock (sample + reward wait + train; evaluation excluded) and against
  images sampled, seed mean and 95% bootstrap band; (b) the speedup = the time
  (images) Flow-GRPO needs to reach its final smoothed reward / the time (images)
  AWM needs to first reach it, on seed-mean curves, with a paired bootstrap CI over
  seeds; (c) the gradient-estimator statistics of both methods on the same rollout
  batches at the first seed's checkpoints (`grad_variance.measure`).
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
if REPO not in sys.path:
    sys.path.insert(0, REPO)

ALGORITHMS = ("awm", "flow_grpo")
TRAIN_SCRIPT = os.path.join(REPO, "advantage_weighted_matching", "scripts", "train_sd3_awm.py")
PRESETS = os.path.join(REPO, "advantage_weighted_matching", "config", "toy_awm.py")
# seeds, epochs, parallel processes (0: all at once), epochs between gradient-variance checkpoints,
# prompt groups of 16 images per gradient-variance measurement, epochs of the LR search and whose
# LR search a run uses. Measured on an idle 2-core machine, one thread per run: an AWM epoch (128
# images) about 7.6 s, a Flow-GRPO epoch about 11.1 s, an evaluation (64 prompts) about 3 s.
#   cpu       2 seeds x 12 epochs, at most 20 minutes with the toy model cached
#   cpu-full  the scale (5 seeds) where no GPU is lent: 5 seeds x 36 epochs, 36 minutes of
#             training and 7.6 of gradient measurements (256 images at 7 checkpoints)
#   gpu       5 seeds x 60 epochs, every run its own process on one GPU
MODES = {
    "gpu": {"seeds": [1, 2, 3, 4, 5], "epochs": 60, "workers": 0, "grad_every": 20, "grad_prompts": 8,
            "lr_epochs": 30, "lr_search": "gpu"},
    "cpu": {"seeds": [1, 2], "epochs": 12, "workers": 2, "grad_every": 6, "grad_prompts": 8, "lr_epochs": 12,
            "lr_search": "cpu"},
    "cpu-full": {"seeds": [1, 2, 3, 4, 5], "epochs": 36, "workers": 2, "grad_every": 12, "grad_prompts": 16,
                 "lr_epochs": 12, "lr_search": "cpu"},
}
LEARNING_RATES = (3e-4, 1e-3, 3e-3, 1e-2)
SMOOTH_WINDOW = 3  # evaluations in the trailing mean of the speedup


# ----------------------------------------------------------------------------- running the trainer


def job(algorithm, seed, epochs, save_dir, learning_rate=None, save_freq=0, extra=()):
    """(save_dir, command) of one training run of preset toy_<algorithm>."""
    command = [
        sys.executable, TRAIN_SCRIPT, f"--config={PRESETS}:toy_{algorithm}", f"--config.save_dir={save_dir}",
        f"--config.seed={seed}", f"--config.num_epochs={epochs}", f"--config.save_freq={save_freq}",
        "--config.num_checkpoint_limit=100", *extra,
    ]
    if learning_rate is not None:
        command.append(f"--config.train.learning_rate={learning_rate}")
    return save_dir, command


def base_eval_job(algorithm, seed, save_dir, extra=()):
    """(save_dir, command): the untrained model's evaluation, exactly as the trainer's
    evaluation of run `seed` samples it (the curves' point at 0 images)."""
    command = [
        sys.executable, "-m", "advantage_weighted_matching.evaluate", f"--config={PRESETS}:toy_{algorithm}",
        "--checkpoint=none", f"--output={save_dir}", f"--config.seed={seed}", *extra,
    ]
    return save_dir, command


def run_jobs(jobs, workers, threads=1):
    """Run (save_dir, command) jobs, `workers` at a time (0: all at once); raise if one fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    pending, running = list(jobs), []
    while pending or running:
        while pending and (workers == 0 or len(running) < workers):
            save_dir, command = pending.pop(0)
            shutil.rmtree(save_dir, ignore_errors=True)  # a rerun starts afresh (the trainer refuses to mix runs)
            os.makedirs(save_dir, exist_ok=True)
            log = open(os.path.join(save_dir, "train.log"), "w")
            running.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO),
                            save_dir, log))
        time.sleep(0.5)
        for entry in [r for r in running if r[0].poll() is not None]:
            running.remove(entry)
            entry[2].close()
            if entry[0].returncode != 0:
                for other in running:
                    other[0].kill()
                raise RuntimeError(f"{entry[1]} failed (exit {entry[0].returncode}): see {entry[1]}/train.log")


def finished(save_dir, epochs):
    """Whether `save_dir` holds a run that logged all `epochs` epochs (lr-search --reuse-runs)."""
    from advantage_weighted_matching.checkpoint import read_metrics

    try:
        return len(read_metrics(save_dir)) == epochs
    except (FileNotFoundError, ValueError):
        return False


def read_curve(save_dir, images_per_epoch, base_dir=None):
    """Eval curve of one run: epochs, images, training wall-clock (s), eval reward, per-epoch train reward.
    With `base_dir` (a `base_eval_job` output) the untrained model is the point at 0."""
    from advantage_weighted_matching.checkpoint import read_metrics

    records = read_metrics(save_dir)
    wall = np.cumsum([r["timing/sample"] + r["timing/reward_wait"] + r["timing/train"] for r in records])
    evaluated = [i for i, r in enumerate(records) if "eval/avg" in r]
    curve = {
        "epoch": [records[i]["epoch"] + 1 for i in evaluated],
        "wall_s": [float(wall[i]) for i in evaluated],
        "eval_reward": [records[i]["eval/avg"] for i in evaluated],
        "train_reward": [r["reward/avg"] for r in records],
        "epoch_wall_s": float(wall[-1] / len(records)),
    }
    if base_dir:
        with open(os.path.join(base_dir, "summary.json")) as f:
            base = json.load(f)
        curve = {**curve, "epoch": [0] + curve["epoch"], "wall_s": [0.0] + curve["wall_s"],
                 "eval_reward": [base["rewards"]["avg"]] + curve["eval_reward"], "eval_images": base["num_images"]}
    curve["images"] = [e * images_per_epoch for e in curve["epoch"]]
    return curve


def preset(algorithm, overrides=()):
    """The toy preset of `algorithm` with the runs' ``--config.key=value`` overrides applied."""
    from advantage_weighted_matching.config import toy_awm

    config = toy_awm.get_config(f"toy_{algorithm}")
    for item in overrides:
        key, _, value = item.removeprefix("--config.").partition("=")
        *parents, leaf = key.split(".")
        target = config
        for parent in parents:
            target = target[parent]
        old = target[leaf]
        target[leaf] = value.lower() in ("1", "true") if isinstance(old, bool) else type(old)(value)
    return config


def images_per_epoch(overrides=()):
    config = preset("awm", overrides)
    return config.sample.train_batch_size * config.sample.num_batches_per_epoch


# ----------------------------------------------------------------------------- analysis


def analyse(curves, window=SMOOTH_WINDOW, num_resamples=2000):
    """Bands and speedups from curves[algorithm] = list over seeds (same seeds, same eval epochs)."""
    from advantage_weighted_matching.diagnostics import bootstrap_ci, speedup

    arrays = {a: {key: np.array([c[key] for c in curves[a]], dtype=np.float64) for key in ("wall_s", "images",
                                                                                            "eval_reward")}
              for a in ALGORITHMS}
    report = {"bands": {}, "speedup": {}}
    for a in ALGORITHMS:
        mean, low, high = bootstrap_ci(arrays[a]["eval_reward"], lambda r: r.mean(0), num_resamples)
        report["bands"][a] = {"images": arrays[a]["images"].mean(0).tolist(),
                              "wall_s": arrays[a]["wall_s"].mean(0).tolist(),
                              "mean": mean.tolist(), "low": low.tolist(), "high": high.tolist()}
    for axis in ("wall_s", "images"):
        def statistic(aw_x, aw_r, fg_x, fg_r):
            return speedup(aw_x, aw_r, fg_x, fg_r, window)[0]

        data = (arrays["awm"][axis], arrays["awm"]["eval_reward"], arrays["flow_grpo"][axis],
                arrays["flow_grpo"]["eval_reward"])
        estimate, low, high = bootstrap_ci(data, statistic, num_resamples)
        value, target, t_fg, t_awm = speedup(*data, window)
        per_seed = [speedup(*(d[i:i + 1] for d in data), window)[0] for i in range(len(data[0]))]
        report["speedup"][axis] = {"estimate": float(estimate), "ci95": [float(low), float(high)],
                                   "flow_grpo_target_reward": target, "flow_grpo_to_target": t_fg,
                                   "awm_to_target": t_awm, "per_seed": per_seed}
    return report


def plot(curves, report, grad_records, path, mode, eval_images):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    colours = {"awm": "tab:blue", "flow_grpo": "tab:orange"}
    seeds = len(curves["awm"])
    for a in ALGORITHMS:
        band = report["bands"][a]
        for axis, key in ((axes[0, 0], "wall_s"), (axes[0, 1], "images")):
            axis.plot(band[key], band["mean"], color=colours[a], marker=".", label=f"{a} (mean of {seeds} seeds)")
            axis.fill_between(band[key], band["low"], band["high"], color=colours[a], alpha=0.2)
    for axis, key, label in ((axes[0, 0], "wall_s", "training wall-clock (s; eval excluded)"),
                             (axes[0, 1], "images", "images sampled")):
        s = report["speedup"][key]
        axis.axhline(s["flow_grpo_target_reward"], color="grey", ls=":", lw=1)
        axis.set_title(f"speedup {s['estimate']:.2f} (95% CI {s['ci95'][0]:.2f}-{s['ci95'][1]:.2f})", fontsize=9)
        axis.set_xlabel(label)
        axis.set_ylabel(f"eval reward ({eval_images} fixed prompts, ODE)")
    for a in ALGORITHMS:  # estimator a, measured along the training run of each method
        for run in [run for run in ALGORITHMS if any(r["run"] == run for r in grad_records)]:
            rows = sorted((r for r in grad_records if r["run"] in (run, "base")), key=lambda r: r["epoch"])
            style = "-" if run == "awm" else "--"
            epochs = [r["epoch"] for r in rows]
            axes[1, 0].plot(epochs, [r[a]["half_batch_cosine"] for r in rows], style, color=colours[a], marker="o",
                            label=f"{a} estimator, {run} run")
            axes[1, 1].plot(epochs, [r[a]["snr_per_sample"] for r in rows], style, color=colours[a],
                            marker="o", label=f"{a} estimator, {run} run")
    n = grad_records[0]["num_images"] if grad_records else 0
    axes[1, 0].set_ylabel(f"cosine between half-batch gradients ({n} images)")
    axes[1, 1].set_ylabel("signal-to-noise per image, ||mu||^2 / tr Cov (unbiased)")
    axes[1, 1].axhline(0.0, color="grey", lw=0.8)
    for axis in axes.flat:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in axes[1]:
        axis.set_xlabel("epoch of the checkpoint (same rollout batch for both estimators)")
    figure.suptitle(f"AWM vs Flow-GRPO, toy scenes task ({mode} mode)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------- subcommands


def _common(args):
    from advantage_weighted_matching.config import toy_awm

    settings = {**MODES[args.mode]}
    for key in ("seeds", "epochs", "workers"):
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    started = time.time()
    model_dir = args.model or toy_awm.ensure_toy_assets()
    extra = [f"--config.pretrained.model={model_dir}", *args.overrides]
    return settings, model_dir, extra, time.time() - started


def _device():
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def lr_search(args):
    from advantage_weighted_matching.config import toy_awm

    settings, model_dir, extra, pretrain_s = _common(args)
    epochs = args.epochs or settings["lr_epochs"]
    out = os.path.join(args.out, args.mode, "lr_search")
    jobs = {(a, lr): job(a, args.seed, epochs, os.path.join(out, f"{a}_lr{lr:g}"), lr, extra=extra)
            for a in ALGORITHMS for lr in args.lrs}
    started = time.time()
    todo = [j for j in jobs.values() if not (args.reuse_runs and finished(j[0], epochs))]
    run_jobs(todo, settings["workers"])
    per_epoch = images_per_epoch(args.overrides)
    results = {a: {} for a in ALGORITHMS}
    for (a, lr), (save_dir, _) in jobs.items():
        curve = read_curve(save_dir, per_epoch)
        results[a][f"{lr:g}"] = {"final_eval_reward": float(np.mean(curve["eval_reward"][-2:])), "curve": curve}
    best = {a: float(max(results[a], key=lambda lr: results[a][lr]["final_eval_reward"])) for a in ALGORITHMS}
    report = {
        "mode": args.mode, "device": _device(), "seed": args.seed, "epochs": epochs, "learning_rates": list(args.lrs),
        "criterion": "final eval reward = mean of the last two evaluations (64 fixed prompts, ODE)",
        "best": best, "results": results, "model": model_dir, "overrides": args.overrides,
        "hyperparameters": {a: toy_awm.describe(a) for a in ALGORITHMS},
        "pretrain_or_cache_s": pretrain_s, "search_s": time.time() - started, "command": args.command_line,
    }
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, f"lr_search_{args.mode}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    for a in ALGORITHMS:
        print(f"{a}: " + ", ".join(f"lr {lr}: {r['final_eval_reward']:.3f}" for lr, r in results[a].items())
              + f" -> {best[a]:g}")
    print(f"written {path} ({report['search_s']:.0f} s)")
    return report


def learning_rates(args):
    """Per-method learning rate and where it came from: --lr-from, the search of this mode (cpu-full:
    the cpu search), or the preset."""
    path = args.lr_from or os.path.join(args.results, f"lr_search_{MODES[args.mode]['lr_search']}.json")
    if os.path.exists(path):
        with open(path) as f:
            return {a: float(v) for a, v in json.load(f)["best"].items()}, path
    if args.lr_from:
        raise FileNotFoundError(f"--lr-from {args.lr_from}: no such file")
    return {a: None for a in ALGORITHMS}, "presets"


def run(args):
    from advantage_weighted_matching.config import toy_awm

    import grad_variance

    settings, model_dir, extra, pretrain_s = _common(args)
    rates, rate_source = learning_rates(args)
    seeds, epochs = settings["seeds"], settings["epochs"]
    grad_every = args.grad_every if args.grad_every is not None else settings["grad_every"]
    grad_prompts = args.grad_prompts or settings["grad_prompts"]
    out = os.path.join(args.out, args.mode)
    runs, jobs = {}, []
    for seed in seeds:  # both methods of a seed side by side: they see the same machine load
        for a in ALGORITHMS:
            save_freq = grad_every if seed == seeds[0] else 0
            runs[a, seed] = job(a, seed, epochs, os.path.join(out, f"{a}_seed{seed}"), rates[a], save_freq, extra)
            jobs.append(runs[a, seed])
    for seed in seeds:
        jobs.append(base_eval_job("awm", seed, os.path.join(out, f"base_eval_seed{seed}"), extra))
    started = time.time()
    if not args.reuse_runs:
        run_jobs(jobs, settings["workers"])
    train_s = time.time() - started

    per_epoch = images_per_epoch(args.overrides)
    curves = {a: [read_curve(runs[a, s][0], per_epoch, os.path.join(out, f"base_eval_seed{s}")) for s in seeds]
              for a in ALGORITHMS}
    report = analyse(curves)

    started = time.time()
    grad_records = []
    if grad_every:
        import torch

        torch.set_num_threads(max(1, settings["workers"] or os.cpu_count()))
        configs = tuple(preset(a, extra) for a in ALGORITHMS)
        checkpoints = [("base", 0, None)] + [
            (a, e, os.path.join(runs[a, seeds[0]][0], "checkpoints", f"checkpoint-{e:06d}", "lora"))
            for a in ALGORITHMS for e in range(grad_every, epochs + 1, grad_every)]
        for run_name, epoch, lora in checkpoints:
            record = grad_variance.measure(model_dir, lora, grad_prompts, seed=seeds[0], configs=configs)
            grad_records.append({"run": run_name, "epoch": epoch, **record})
            print(f"gradient variance, {run_name} run at epoch {epoch}: " + ", ".join(
                f"{a} cos {record[a]['half_batch_cosine']:.3f} var/mean^2 {record[a]['variance_over_squared_mean']:.1f} "
                f"snr/image {record[a]['snr_per_sample']:.4f}"
                for a in ALGORITHMS), flush=True)
    grad_s = time.time() - started

    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, f"awm_vs_flow_grpo_{args.mode}")
    eval_images = curves["awm"][0]["eval_images"]
    plot(curves, report, grad_records, path + ".png", args.mode, eval_images)
    result = {
        "mode": args.mode, "device": _device(), "seeds": seeds, "epochs": epochs, "images_per_epoch": per_epoch,
        "group_size": preset("awm", args.overrides).sample.num_image_per_prompt, "eval_prompts": eval_images,
        "learning_rate": {a: rates[a] or toy_awm.describe(a)["train.learning_rate"] for a in ALGORITHMS},
        "learning_rate_source": rate_source, **report, "grad_variance": grad_records, "curves": curves,
        "epoch_wall_s": {a: float(np.mean([c["epoch_wall_s"] for c in curves[a]])) for a in ALGORITHMS},
        "hyperparameters": {a: toy_awm.describe(a) for a in ALGORITHMS}, "model": model_dir,
        "overrides": args.overrides, "reused_runs": args.reuse_runs,  # then train_s is 0: see the runs' own timings
        "timings": {"pretrain_or_cache_s": pretrain_s, "train_s": train_s, "grad_variance_s": grad_s},
        "command": args.command_line,
    }
    with open(path + ".json", "w") as f:
        json.dump(result, f, indent=1)
    for axis, s in report["speedup"].items():
        print(f"speedup ({axis}): {s['estimate']:.2f} (95% CI {s['ci95'][0]:.2f}-{s['ci95'][1]:.2f}), "
              f"per seed {[round(v, 2) for v in s['per_seed']]}")
    print(f"written {path}.json and .png (training {train_s:.0f} s, gradient variance {grad_s:.0f} s)")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "both methods over seeds, speedup, gradient variance"),
                            ("lr-search", "the same learning rates for both methods on one seed")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--mode", choices=sorted(MODES), required=True)
        sub.add_argument("--epochs", type=int, default=None, help="default: the mode's")
        sub.add_argument("--workers", type=int, default=None, help="parallel runs (0: all); default: the mode's")
        sub.add_argument("--model", default="", help="toy pipeline dir (default: cached, pretrained if missing)")
        sub.add_argument("--out", default=os.path.join(HERE, "out"), help="run dirs")
        sub.add_argument("--results", default=os.path.join(HERE, "results"), help="JSON and PNG")
    run_parser, search_parser = commands.choices["run"], commands.choices["lr-search"]
    run_parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the mode's")
    run_parser.add_argument("--lr-from", default="", help="lr-search JSON (default: results/lr_search_<mode>.json; cpu-full: the cpu one)")
    run_parser.add_argument("--grad-every", type=int, default=None, help="epochs between gradient checkpoints "
                            "(0: none; default: the mode's)")
    run_parser.add_argument("--grad-prompts", type=int, default=None, help="prompt groups of 16 images per "
                            "gradient-variance measurement (default: the mode's)")
    run_parser.add_argument("--reuse-runs", action="store_true", help="analyse the finished runs in --out again")
    search_parser.add_argument("--reuse-runs", action="store_true", help="keep runs in --out that finished "
                               "all epochs (a grid extended later trains only its new rates)")
    search_parser.add_argument("--seed", type=int, default=1)
    search_parser.add_argument("--lrs", type=float, nargs="+", default=list(LEARNING_RATES))
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides
    args.command_line = " ".join(["python benchmarks/awm_vs_flow_grpo.py", *(sys.argv[1:] if argv is None else argv)])
    sys.path.insert(0, HERE)
    return (run if args.command == "run" else lr_search)(args)


if __name__ == "__main__":
    main()
