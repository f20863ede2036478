"""Rewards from the user's own module: ``config.reward_fn = {"my_package/my_rewards:aesthetic": 1.0}``.

Name: ``"<module path>:<attribute>"``. A name with a ``:`` is a custom reward;
the module path is written with ``/`` or ``.`` between its parts
(``my_package/my_rewards`` = ``my_package.my_rewards``). ml_collections'
ConfigDict refuses ``.`` inside a key, so in a config (preset or
``--config.reward_fn='{...}'``) write ``/``; plain dicts given to
``multi_score`` accept either. The module must be importable: installed, on
``PYTHONPATH``, or under the current working directory (added at the end of
``sys.path``, as ``python -m`` would).

The attribute is one of two kinds, told apart by the arguments it accepts:

* a **scoring function** ``fn(images, prompts, metadata[, only_strict])``:
  called on every batch (write this when there is no model to load, or it
  loads lazily);
* a **factory** ``factory(device, reward_config) -> fn`` like the built-ins
  (a function or a class whose ``__init__`` takes those two): called once in
  ``multi_score`` to load models; the ``fn`` it returns is called on every
  batch. ``reward_config`` is the resolved ``config.rewards`` dict; free-form
  settings for your reward go in ``config.rewards.custom_options``.

Arguments of ``fn``: ``images`` an NCHW float tensor in [0, 1] on the
training device, ``prompts`` a list[str] of length B, ``metadata`` a
list[dict] of length B (the prompt file's metadata rows; ``{}`` for plain
prompt files). ``only_strict`` is passed only when ``fn`` declares it.

Output: ``scores`` or ``(scores, info)``. ``scores``: B real numbers (list,
tuple, numpy array or tensor of shape [B] or [B, 1]; not bool, not None, not
str). ``info`` (optional dict): ``num_failures`` (int in [0, B], images your
function scored 0 because it could not score them) and any per-image arrays
of length B. A NaN or inf score is that image's failure: it scores 0 and is
counted.

Checks and when they happen:

* start-up (``validate_reward_names``, from ``config/validate.py`` and
  ``--dry_run``, before anything loads): the module imports, the attribute
  exists and is callable, and its signature is one of the two kinds;
* reward-function construction (``multi_score``, before the rollout starts):
  the factory returns a callable, then a **contract probe** calls ``fn`` once
  on a dummy batch of 2 random 64x64 images (prompts "a photo of a cat", "a
  photo of a dog", metadata ``{}``). An output that breaks the contract stops
  the run there with one ``RewardContractError``; a probe that raises (e.g.
  ``fn`` needs metadata keys the dummy rows lack) is logged and the contract
  is checked on the first real batch instead;
* every batch: the same output checks. A contract break is a bug, so it ends
  the run with ``RewardContractError``; an exception inside ``fn`` is an
  outage, so (as for the built-ins) the batch scores 0 and counts B failures.
"""

import importlib
import inspect
import logging
import os
import sys

import numpy as np

logger = logging.getLogger(__name__)

CUSTOM_SEPARATOR = ":"
PROBE_BATCH_SIZE = 2
PROBE_IMAGE_SIZE = 64
PROBE_PROMPTS = ("a photo of a cat", "a photo of a dog")


class CustomRewardError(ValueError):
    """A custom reward name that cannot be resolved to a usable callable."""


class RewardContractError(ValueError):
    """A custom reward's output breaks the contract (module docstring)."""


def is_custom_reward(name):
    return isinstance(name, str) and CUSTOM_SEPARATOR in name


def parse_custom_name(name):
    """``"pkg/mod:attr"`` or ``"pkg.mod:attr"`` -> ("pkg.mod", ["attr"]); ``attr`` may be
    dotted (``mod:Class.method``, or ``mod:Class/method`` inside a ConfigDict)."""
    module_part, _, attribute_part = name.partition(CUSTOM_SEPARATOR)
    module_parts = module_part.replace("/", ".").split(".")
    attribute_parts = attribute_part.replace("/", ".").split(".")
    if not all(part.isidentifier() for part in module_parts + attribute_parts):
        raise CustomRewardError(
            f"custom reward {name!r} is not of the form 'package/module:function' (module parts separated by '/' "
            f"or '.', one ':' before the attribute, Python identifiers only)"
        )
    return ".".join(module_parts), attribute_parts


def _import_module(module_name, reward_name):
    cwd = os.getcwd()
    if cwd not in sys.path:  # `python -m` semantics for the user's own modules, without shadowing installed ones
        sys.path.append(cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise CustomRewardError(
                f"custom reward {reward_name!r}: no module named {missing!r}. The module must be importable: "
                f"installed, on PYTHONPATH, or under the current directory {cwd}"
            ) from None
        raise CustomRewardError(
            f"custom reward {reward_name!r}: importing {module_name!r} failed: {error!r}"
        ) from error
    except Exception as error:  # noqa: BLE001 - the user's module raised while importing
        raise CustomRewardError(
            f"custom reward {reward_name!r}: importing {module_name!r} raised {error!r}"
        ) from error


def _accepts(signature, count):
    try:
        signature.bind(*([None] * count))
        return True
    except TypeError:
        return False


def callable_kind(fn, reward_name):
    """``"factory"`` if ``fn`` takes (device, reward_config), ``"scorer"`` if it takes
    (images, prompts, metadata[, only_strict]); CustomRewardError otherwise."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: assume a scoring function
        return "scorer"
    factory, scorer = _accepts(signature, 2), _accepts(signature, 3)
    if factory and not scorer:
        return "factory"
    if scorer and not factory:
        return "scorer"
    raise CustomRewardError(
        f"custom reward {reward_name!r}: cannot tell from its signature {signature} whether it is a factory "
        f"(device, reward_config) -> fn or a scoring function (images, prompts, metadata): make it accept exactly "
        f"2 or exactly 3 positional arguments (optionally only_strict=... as a 4th)"
    )


def resolve_custom_reward(name):
    """Import the module and return (callable, kind); CustomRewardError names what is wrong."""
    module_name, attribute_parts = parse_custom_name(name)
    target = _import_module(module_name, name)
    where = getattr(target, "__file__", module_name)
    for depth, part in enumerate(attribute_parts):
        if not hasattr(target, part):
            owner = ".".join([module_name] + attribute_parts[:depth])
            available = sorted(key for key in dir(target) if not key.startswith("_") and callable(getattr(target, key)))
            raise CustomRewardError(
                f"custom reward {name!r}: {owner} ({where}) has no attribute {part!r}; its callables: {available}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise CustomRewardError(
            f"custom reward {name!r}: {'.'.join(attribute_parts)} in {where} is a {type(target).__name__}, "
            f"not a callable"
        )
    return target, callable_kind(target, name)


def _declares_only_strict(fn):
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "only_strict" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _as_float_array(values, name, batch_size, what="scores"):
    """Per-image numbers -> float64 [B]; RewardContractError naming the problem."""
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        values = values.detach().cpu()
        values = (values.double() if values.is_floating_point() else values).numpy()
    if isinstance(values, (str, bytes, dict)) or values is None or np.isscalar(values):
        raise RewardContractError(
            f"custom reward {name!r}: {what} must be {batch_size} numbers (one per image), got {type(values).__name__} "
            f"{_short(values)}"
        )
    array = np.asarray(values, dtype=object) if not isinstance(values, np.ndarray) else values
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.shape != (batch_size,):
        raise RewardContractError(
            f"custom reward {name!r}: {what} must have shape [{batch_size}] (one per image) or [{batch_size}, 1], got "
            f"shape {list(array.shape)}"
        )
    if array.dtype.kind in "fiu":
        return array.astype(np.float64)
    for index, value in enumerate(array.tolist()):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RewardContractError(
                f"custom reward {name!r}: {what}[{index}] is {type(value).__name__} {_short(value)}, not a real number "
                f"(return ints or floats; convert booleans with float())"
            )
    return array.astype(np.float64)


def _short(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_output(name, output, batch_size):
    """The user's ``fn`` output -> (scores float64 [B], info) in the registry's
    convention; RewardContractError on a contract break; NaN / inf scores become
    failures (scored 0, counted)."""
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], dict):
        scores, info = output
    elif isinstance(output, dict):
        raise RewardContractError(
            f"custom reward {name!r} returned a dict with keys {sorted(map(str, output))}; return the scores, or a "
            f"tuple (scores, info) with info a dict"
        )
    else:
        scores, info = output, {}
    scores = _as_float_array(scores, name, batch_size)
    num_failures = info.get("num_failures", 0)
    if isinstance(num_failures, (bool, float)) or not isinstance(num_failures, (int, np.integer)) \
            or not 0 <= num_failures <= batch_size:
        raise RewardContractError(
            f"custom reward {name!r}: info['num_failures'] must be an int in [0, {batch_size}], got {num_failures!r}"
        )
    checked = {"num_failures": int(num_failures)}
    for key, value in info.items():
        if key != "num_failures":
            checked[str(key)] = _as_float_array(value, name, batch_size, what=f"info[{key!r}]")
    bad = ~np.isfinite(scores)
    if bad.any():
        logger.warning("custom reward %r gave non-finite scores for images %s (scored 0)", name,
                       np.flatnonzero(bad).tolist())
        scores = np.where(bad, 0.0, scores)
        checked["num_failures"] = min(batch_size, checked["num_failures"] + int(bad.sum()))
    return scores, checked


def probe_batch(device):
    """The dummy batch of the contract probe: 2 random 64x64 images on ``device``."""
    import torch

    generator = torch.Generator().manual_seed(0)
    images = torch.rand((PROBE_BATCH_SIZE, 3, PROBE_IMAGE_SIZE, PROBE_IMAGE_SIZE), generator=generator)
    return images.to(device), list(PROBE_PROMPTS), [{} for _ in range(PROBE_BATCH_SIZE)]


def make_custom_scorer(name, device, reward_config, probe=True):
    """Build the custom reward ``name``: ``fn(images, prompts, metadata, only_strict=True)
    -> (scores float64 [B], info)`` with every output checked; probed once when ``probe``."""
    target, kind = resolve_custom_reward(name)
    if kind == "factory":
        user_fn = target(device, reward_config)
        if not callable(user_fn):
            raise RewardContractError(
                f"custom reward {name!r}: the factory returned a {type(user_fn).__name__}, not a callable "
                f"fn(images, prompts, metadata)"
            )
        if callable_kind(user_fn, name) != "scorer":
            raise RewardContractError(
                f"custom reward {name!r}: the factory returned {user_fn!r}, which does not take "
                f"(images, prompts, metadata)"
            )
    else:
        user_fn = target
    pass_only_strict = _declares_only_strict(user_fn)

    def score(images, prompts, metadata, only_strict=True):
        batch_size = len(prompts)
        if pass_only_strict:
            output = user_fn(images, prompts, metadata, only_strict=only_strict)
        else:
            output = user_fn(images, prompts, metadata)
        return check_output(name, output, batch_size)

    if probe:
        images, prompts, metadata = probe_batch(device)
        try:
            score(images, prompts, metadata)
        except RewardContractError as error:
            raise RewardContractError(
                f"{error} (contract probe: a dummy batch of {PROBE_BATCH_SIZE} random "
                f"{PROBE_IMAGE_SIZE}x{PROBE_IMAGE_SIZE} images)"
            ) from None
        except Exception as error:  # noqa: BLE001 - maybe it needs real metadata; check the first real batch
            logger.warning("custom reward %r raised on the contract probe's dummy batch (%r); its output will be "
                           "checked on the first real batch instead", name, error)
    score.kind = kind
    return score
