"""Sample-image grids with captions (prompt and reward) for logs and checkpoints."""

import math
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def image_grid(images, captions=(), columns=None, caption_lines=3, tile=256):
    """images [N, 3, H, W] in [0, 1] -> one PIL image, each tile captioned below.

    Tiles are resized to `tile` pixels (nearest for tiny images) so captions stay
    legible; the tensor is converted once, not per pixel.
    """
    images = images.detach().float().clamp(0, 1).cpu()
    count = images.shape[0]
    columns = columns or min(count, 4)
    rows = math.ceil(count / columns)
    pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    font = ImageFont.load_default()
    line_height = 12
    caption_height = caption_lines * line_height + 4 if captions else 0
    grid = Image.new("RGB", (columns * tile, rows * (tile + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    resample = Image.NEAREST if images.shape[-1] < tile // 2 else Image.BILINEAR
    for index in range(count):
        row, column = divmod(index, columns)
        x, y = column * tile, row * (tile + caption_height)
        grid.paste(Image.fromarray(pixels[index]).resize((tile, tile), resample), (x, y))
        if captions:
            lines = textwrap.wrap(str(captions[index]), width=tile // 6)[:caption_lines]
            for line_index, line in enumerate(lines):
                draw.text((x + 2, y + tile + 2 + line_index * line_height), line, fill="black", font=font)
    return grid


def caption(prompt, reward):
    return f"{reward:.3f} | {prompt}"



def plot_reward_curve(records, path, title=""):
    """Write `path` (PNG): the training reward (``reward/avg``, every epoch) and the eval
    reward (``eval/avg``, and ``eval_ema/avg`` when logged) against the epoch, from the
    per-epoch metrics records (`checkpoint.read_metrics`). Atomic (temp file + rename).

    Returns `path`, or None when matplotlib is missing (the plot is optional; it is a
    core dependency of the package, so this only happens in a stripped environment).
    """
    import logging
    import os

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.getLogger(__name__).warning("matplotlib is not installed: no %s", path)
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] + 1 for r in records]  # after the epoch's update
    axis.plot(epochs, [r["reward/avg"] for r in records], color="tab:grey", marker=".", lw=1,
              label="train reward (this epoch's rollouts)")
    for key, colour in (("eval/avg", "tab:blue"), ("eval_ema/avg", "tab:green")):
        points = [(r["epoch"] + 1, r[key]) for r in records if key in r]
        if points:
            axis.plot(*zip(*points), color=colour, marker="o", label=f"{key.split('/')[0]} reward (test prompts)")
    axis.set_xlabel("epoch")
    axis.set_ylabel("reward")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    temp = f"{path}.tmp.png"
    figure.savefig(temp, dpi=100)
    plt.close(figure)
    os.replace(temp, path)
    return path
