"""Reward functions (SPEC section 6) and the multi-reward combiner.

Public API (the training loop relies on exactly this):

* ``REWARDS``: name -> factory. ``factory(device, reward_config)`` returns
  ``fn(images, prompts, metadata, only_strict=True) -> (scores, info)`` with
  ``images`` an NCHW float tensor in [0, 1] (any device), ``prompts`` a
  list[str] of length B, ``metadata`` a list[dict] of length B,
  ``scores`` a float64 numpy array [B] and ``info`` a dict of extra per-image
  numpy arrays [B] plus ``num_failures`` (int). ``only_strict`` matters to
  ``geneval`` only.
* ``multi_score(device, reward_weights, reward_config=None)``: weighted sum of
  several rewards, see its docstring.
* ``validate_reward_names(names)``: raises ValueError for unknown names and
  for custom rewards that do not resolve (``custom.py``).
* ``reward_config_defaults()``: the ``config.rewards`` keys with defaults.

Names: the built-ins in ``REWARDS`` (the reference's registry: ``geneval``,
``ocr``, ``pickscore``, ``jpeg_compressibility``, ``jpeg_incompressibility``,
``aesthetic``, ``imagereward``, ``qwenvl``, ``deqa``, ``unifiedreward``; plus
``brightness`` and ``shapes`` for the CPU toys), or a reward from the user's
own module, ``"package/module:function"`` (``custom.py`` documents the
contract and its checks).

This module imports nothing heavy (no torch, transformers or OCR engine):
config validation imports it before any model loads. The reward modules are
imported inside the factories.
"""

import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

PREFETCH_HINT = "python setup/prefetch_reward_weights.py"


def reward_config_defaults():
    """Defaults of the ``config.rewards`` block, read from config/base_awm.py (one source)."""
    from advantage_weighted_matching.config.base_awm import get_config  # light: ml_collections only

    return get_config().rewards.to_dict()


def resolve_reward_config(reward_config):
    """Defaults overlaid with ``reward_config`` (None, dict, or ConfigDict) -> plain dict."""
    resolved = reward_config_defaults()
    if reward_config is None:
        return resolved
    if hasattr(reward_config, "to_dict"):  # ml_collections.ConfigDict
        given = reward_config.to_dict()
    else:
        given = dict(reward_config)
    resolved.update(given)
    batch_size = int(resolved["batch_size"])
    if batch_size < 1:
        raise ValueError(f"rewards.batch_size must be >= 1, got {batch_size}")
    resolved["batch_size"] = batch_size
    for key in ("dtype", "qwenvl_dtype"):
        if resolved[key] not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"rewards.{key} must be float32, float16 or bfloat16, got {resolved[key]!r}")
    return resolved


def resolve_device(device, reward_config):
    """``reward_config['device']`` when set, else the device given to the factory."""
    return reward_config["device"] or device


def torch_dtype(name):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def from_pretrained_or_explain(loader, model_id, **kwargs):
    """``loader(model_id, **kwargs)``; a missing model becomes a RuntimeError naming
    the model id and the prefetch step (from_pretrained raises OSError when the
    id is neither in the local HF cache nor reachable on the hub)."""
    try:
        return loader(model_id, **kwargs)
    except OSError as error:
        raise RuntimeError(
            f"cannot load reward model {model_id!r}: not in the local Hugging Face cache and the hub is "
            f"unreachable or the id is wrong. Download it first with `{PREFETCH_HINT}` "
            f"(on a machine with internet, sharing HF_HOME). Original error: {error}"
        ) from error


def images_to_uint8_hwc(images):
    """NCHW float tensor (or array) in [0, 1] -> uint8 numpy [B, H, W, 3].

    ``round(x * 255)`` clamped to [0, 255], converted once for the whole batch;
    a single channel is repeated to RGB.
    """
    if hasattr(images, "detach"):  # torch tensor; no torch import needed
        array = (images.detach().float() * 255).round().clamp(0, 255).to("cpu").numpy().astype(np.uint8)
    else:
        array = np.clip(np.round(np.asarray(images, dtype=np.float32) * 255), 0, 255).astype(np.uint8)
    if array.ndim != 4 or array.shape[1] not in (1, 3):
        raise ValueError(f"images must be NCHW with 1 or 3 channels, got shape {tuple(array.shape)}")
    array = array.transpose(0, 2, 3, 1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def score_each(score_one, items, reward_name):
    """Apply ``score_one(item) -> float`` to every item; an exception costs that item
    only: it scores 0, is logged and counted. Returns (scores float64 [B], num_failures)."""
    scores = np.zeros(len(items), dtype=np.float64)
    num_failures = 0
    for index, item in enumerate(items):
        try:
            scores[index] = float(score_one(item))
        except Exception as error:  # noqa: BLE001 - one bad image must not end the run
            num_failures += 1
            logger.warning("%s reward failed on image %d (scored 0): %r", reward_name, index, error)
    return scores, num_failures


def run_chunks(run_chunk, count, chunk_size, reward_name):
    """``run_chunk(start, stop) -> stop - start results`` over chunks of ``chunk_size``
    items. A chunk that raises is retried item by item, so a bad image costs only
    itself: its result is None, it is logged, and marked in ``failed``.
    Returns (results list [count], failed bool array [count])."""
    results, failed = [None] * count, np.zeros(count, dtype=bool)
    for start in range(0, count, chunk_size):
        stop = min(start + chunk_size, count)
        try:
            results[start:stop] = list(run_chunk(start, stop))
            continue
        except Exception as error:  # noqa: BLE001
            logger.warning("%s failed on images %d..%d, retrying one by one: %r", reward_name, start, stop - 1, error)
        for index in range(start, stop):
            try:
                results[index] = run_chunk(index, index + 1)[0]
            except Exception as error:  # noqa: BLE001 - one bad image must not end the run
                failed[index] = True
                logger.warning("%s failed on image %d (scored 0): %r", reward_name, index, error)
    return results, failed


def score_image_text_chunks(score_chunk, images, prompts, chunk_size, reward_name):
    """Image-text scorers (PickScore, ImageReward): ``score_chunk(uint8 [b, H, W, 3], prompts [b])``
    over `run_chunks`; a failed image scores 0. Returns (scores float64 [B], num_failures)."""
    images_uint8 = images_to_uint8_hwc(images)
    results, failed = run_chunks(lambda start, stop: score_chunk(images_uint8[start:stop], prompts[start:stop]),
                                 len(prompts), chunk_size, reward_name)
    scores = np.array([0.0 if bad else value for value, bad in zip(results, failed)], dtype=np.float64)
    return scores, int(failed.sum())


def image_text_reward(scorer):
    """The registry's ``fn(images, prompts, metadata, only_strict=True) -> (scores [B], info)`` around a
    scorer with ``score_batch(images, prompts) -> (scores, num_failures)``; ``fn.scorer`` is the scorer."""

    def score(images, prompts, metadata, only_strict=True):
        del metadata, only_strict
        scores, num_failures = scorer.score_batch(images, list(prompts))
        return scores, {"num_failures": num_failures}

    score.scorer = scorer
    return score


def _jpeg_factory(device, reward_config):
    from .jpeg import make_jpeg_compressibility_scorer

    return make_jpeg_compressibility_scorer(device, resolve_reward_config(reward_config))


def _brightness_factory(device, reward_config):
    from .brightness import make_brightness_scorer

    return make_brightness_scorer(device, resolve_reward_config(reward_config))


def _shapes_factory(device, reward_config):
    from .shapes import make_shapes_scorer

    return make_shapes_scorer(device, resolve_reward_config(reward_config))


def _scenes_factory(device, reward_config):
    from .scenes import make_scenes_scorer

    return make_scenes_scorer(device, resolve_reward_config(reward_config))


def _ocr_factory(device, reward_config):
    from .ocr import make_ocr_scorer

    return make_ocr_scorer(device, resolve_reward_config(reward_config))


def _pickscore_factory(device, reward_config):
    from .pickscore import make_pickscore_scorer

    return make_pickscore_scorer(device, resolve_reward_config(reward_config))


def _geneval_factory(device, reward_config):
    config = resolve_reward_config(reward_config)
    if config["remote_geneval_url"]:
        from .remote_geneval import make_remote_geneval_scorer

        return make_remote_geneval_scorer(device, config)
    from .geneval import make_geneval_scorer

    return make_geneval_scorer(device, config)


def _jpeg_incompressibility_factory(device, reward_config):
    from .jpeg import make_jpeg_incompressibility_scorer

    return make_jpeg_incompressibility_scorer(device, resolve_reward_config(reward_config))


def _aesthetic_factory(device, reward_config):
    from .aesthetic import make_aesthetic_scorer

    return make_aesthetic_scorer(device, resolve_reward_config(reward_config))


def _imagereward_factory(device, reward_config):
    from .imagereward import make_imagereward_scorer

    return make_imagereward_scorer(device, resolve_reward_config(reward_config))


def _qwenvl_factory(device, reward_config):
    from .qwenvl import make_qwenvl_scorer

    return make_qwenvl_scorer(device, resolve_reward_config(reward_config))


def _deqa_factory(device, reward_config):
    from .deqa import make_deqa_scorer

    return make_deqa_scorer(device, resolve_reward_config(reward_config))


def _unifiedreward_factory(device, reward_config):
    from .unifiedreward import make_unifiedreward_scorer

    return make_unifiedreward_scorer(device, resolve_reward_config(reward_config))


REWARDS = {
    "jpeg_compressibility": _jpeg_factory,
    "jpeg_incompressibility": _jpeg_incompressibility_factory,
    "brightness": _brightness_factory,
    "ocr": _ocr_factory,
    "pickscore": _pickscore_factory,
    "geneval": _geneval_factory,
    "shapes": _shapes_factory,
    "aesthetic": _aesthetic_factory,
    "imagereward": _imagereward_factory,
    "qwenvl": _qwenvl_factory,
    "deqa": _deqa_factory,
    "unifiedreward": _unifiedreward_factory,
    "scenes": _scenes_factory,
}


def validate_reward_names(names):
    """Raise ValueError naming every unknown reward name and the known ones; a custom
    reward (``"package/module:function"``) is imported and its signature checked."""
    from .custom import is_custom_reward, resolve_custom_reward

    unknown = [name for name in names if name not in REWARDS and not is_custom_reward(name)]
    if unknown:
        raise ValueError(f"unknown reward name(s) {unknown}; known rewards: {sorted(REWARDS)}, or a function of "
                         f"your own as 'package/module:function'")
    for name in names:
        if is_custom_reward(name):
            resolve_custom_reward(name)


def multi_score(device, reward_weights, reward_config=None):
    """Build every reward named in ``reward_weights`` (name -> weight).

    Returns ``fn(images, prompts, metadata, only_strict=True) -> (rewards, info)``:
    ``rewards[name]`` is the float array [B] of each reward,
    ``rewards['avg'] = sum_name weight * rewards[name]``, and with geneval also
    its per-image fields (``strict_accuracy``, ``accuracy``,
    ``{tag}_strict_accuracy``, ``{tag}_accuracy``; ``accuracy`` is 0 when
    ``only_strict``). ``info`` holds the other rewards' extra arrays and
    ``num_failures`` (images that scored 0 because their scoring raised or
    returned a non-finite value; an image counts once per reward that failed on it).
    A reward whose whole call raises scores 0 for the batch and counts B
    failures instead of ending the run, except a custom reward's
    ``RewardContractError`` (a bug in the user's function), which ends it.

    Custom rewards (``"package/module:function"``) are built first and probed
    once on a dummy batch (``custom.make_custom_scorer``), so a contract break
    stops here, before any built-in reward model loads.
    """
    from .custom import RewardContractError, is_custom_reward, make_custom_scorer

    weights = dict(reward_weights)
    validate_reward_names(list(weights))
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"reward weight for {name!r} must be a finite number, got {weight!r}")
    resolved_config = resolve_reward_config(reward_config)
    custom = {name: make_custom_scorer(name, device, resolved_config) for name in weights if is_custom_reward(name)}
    scorers = {name: custom[name] if name in custom else REWARDS[name](device, reward_config) for name in weights}

    def score(images, prompts, metadata, only_strict=True):
        batch_size = len(prompts)
        if len(metadata) != batch_size or images.shape[0] != batch_size:
            raise ValueError(
                f"batch mismatch: {images.shape[0]} images, {batch_size} prompts, {len(metadata)} metadata rows"
            )
        rewards = {}
        info = {"num_failures": 0}
        avg = np.zeros(batch_size, dtype=np.float64)
        for name, scorer in scorers.items():
            try:
                scores, extra = scorer(images, prompts, metadata, only_strict=only_strict)
                scores = np.asarray(scores, dtype=np.float64).reshape(batch_size)
            except RewardContractError:
                raise
            except Exception as error:  # noqa: BLE001 - a reward outage must not end the run
                logger.warning("%s reward failed on the whole batch of %d (scored 0): %r", name, batch_size, error)
                scores, extra = np.zeros(batch_size, dtype=np.float64), {"num_failures": batch_size}
                if name == "geneval":  # keep the geneval fields the loop logs: 0, -10 for other tags
                    from .geneval_rules import failed_geneval_fields

                    extra.update(failed_geneval_fields(metadata))
            bad = ~np.isfinite(scores)
            if bad.any():  # NaN / inf is that image's failure, like an exception
                logger.warning("%s reward gave non-finite scores for images %s (scored 0)", name,
                               np.flatnonzero(bad).tolist())
                scores = np.where(bad, 0.0, scores)
                extra = {**extra, "num_failures": int(extra.get("num_failures", 0)) + int(bad.sum())}
            rewards[name] = scores
            avg += weights[name] * scores
            info["num_failures"] += int(extra.get("num_failures", 0))
            target = rewards if name == "geneval" else info
            for key, value in extra.items():
                if key not in ("num_failures", name):
                    target[key] = np.asarray(value)
        rewards["avg"] = avg
        return rewards, info

    return score
