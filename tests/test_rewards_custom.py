"""Rewards from the user's own module (rewards/custom.py, examples/my_rewards.py).

User modules are written to a temporary directory on sys.path; the example
module is the one the README documents. Checks: one clear error for a bad
path at validation time, the factory / scoring-function kinds, the output
contract at construction (probe) and on every batch, the config forms that
ml_collections and the real training script accept.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_rewards_pickscore import IMAGE_SIZE, build_tiny_clip  # noqa: E402

from advantage_weighted_matching.config import tiny_awm  # noqa: E402
from advantage_weighted_matching.config.validate import ConfigError, validate  # noqa: E402
from advantage_weighted_matching.rewards import multi_score, validate_reward_names  # noqa: E402
from advantage_weighted_matching.rewards.custom import (  # noqa: E402
    CustomRewardError, RewardContractError, check_output, resolve_custom_reward,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "advantage_weighted_matching" / "scripts" / "train_sd3_awm.py"
TINY_PRESET = REPO_ROOT / "advantage_weighted_matching" / "config" / "tiny_awm.py"
SATURATION = "examples/my_rewards:saturation"


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``user_module(name, source)`` writes ``name.py`` (dots make packages) under a sys.path dir."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name, source):
        parts = name.split(".")
        directory = tmp_path.joinpath(*parts[:-1])
        directory.mkdir(parents=True, exist_ok=True)
        for depth in range(1, len(parts)):
            tmp_path.joinpath(*parts[:depth], "__init__.py").touch()
        (directory / f"{parts[-1]}.py").write_text(textwrap.dedent(source))
        for module in [m for m in sys.modules if m == parts[0] or m.startswith(parts[0] + ".")]:
            monkeypatch.delitem(sys.modules, module)
        return name

    return write


# ---- resolving the name: one clear error per bad path ------------------------------------------------


def test_missing_module_attribute_and_non_callable(user_module):
    user_module("lab.scores", "import math\nTHRESHOLD = 0.5\ndef good(images, prompts, metadata):\n    return [0.0]\n")
    with pytest.raises(CustomRewardError, match=r"no module named 'lab.nope'.*importable"):
        validate_reward_names(["lab/nope:good"])
    with pytest.raises(CustomRewardError, match=r"lab.scores .*scores.py\) has no attribute 'god'; its callables: "
                                                r"\['good'\]"):
        validate_reward_names(["lab/scores:god"])
    with pytest.raises(CustomRewardError, match="THRESHOLD in .*scores.py is a float, not a callable"):
        validate_reward_names(["lab/scores:THRESHOLD"])
    with pytest.raises(CustomRewardError, match="not of the form"):
        validate_reward_names(["lab/scores:good:extra"])
    validate_reward_names(["lab/scores:good", "lab.scores:good", "jpeg_compressibility"])


def test_import_failures_inside_the_module_are_reported_as_such(user_module):
    user_module("broken_dep", "import no_such_dependency_xyz\ndef f(images, prompts, metadata):\n    pass\n")
    with pytest.raises(CustomRewardError, match=r"importing 'broken_dep' failed:.*no_such_dependency_xyz"):
        validate_reward_names(["broken_dep:f"])
    user_module("raises_on_import", "raise RuntimeError('needs a GPU')\n")
    with pytest.raises(CustomRewardError, match="importing 'raises_on_import' raised.*needs a GPU"):
        validate_reward_names(["raises_on_import:f"])


def test_kind_is_read_from_the_signature(user_module):
    user_module("kinds", """
        def scorer(images, prompts, metadata, only_strict=True):
            return [1.0] * len(prompts)
        def factory(device, reward_config):
            return scorer
        class Model:
            def __init__(self, device, reward_config):
                pass
            def __call__(self, images, prompts, metadata):
                return [2.0] * len(prompts)
        def ambiguous(*args):
            return None
        def one_argument(images):
            return None
    """)
    assert resolve_custom_reward("kinds:scorer")[1] == "scorer"
    assert resolve_custom_reward("kinds:factory")[1] == "factory"
    assert resolve_custom_reward("kinds:Model")[1] == "factory"  # a class whose __init__ takes (device, config)
    for name in ("kinds:ambiguous", "kinds:one_argument"):
        with pytest.raises(CustomRewardError, match="cannot tell from its signature"):
            resolve_custom_reward(name)


def test_validate_reports_a_bad_custom_reward_with_the_other_config_errors(user_module):
    user_module("lab2.r", "def ok(images, prompts, metadata):\n    return [0.0] * len(prompts)\n")
    config = tiny_awm.tiny_cpu()
    config.reward_fn = {"lab2/r:ok": 1.0, "brightness": 0.5}
    validate(config, 1)
    config.reward_fn = {"lab2/r:missing": 1.0}
    with pytest.raises(ConfigError, match=r"reward_fn: custom reward 'lab2/r:missing'.*no attribute 'missing'"):
        validate(config, 1)


def test_resolving_imports_nothing_heavy_for_a_light_module(user_module, tmp_path):
    user_module("light_reward", "def f(images, prompts, metadata):\n    return [0.0] * len(prompts)\n")
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from advantage_weighted_matching.rewards import validate_reward_names\n"
        "validate_reward_names(['light_reward:f', 'aesthetic', 'imagereward', 'qwenvl', 'deqa', 'unifiedreward',\n"
        "                       'jpeg_incompressibility'])\n"
        "print([m for m in ('torch', 'transformers', 'PIL') if m in sys.modules])\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


# ---- the output contract: probe at construction, checks on every batch --------------------------------


def _images(batch_size=3, seed=0):
    return torch.rand((batch_size, 3, 8, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("body, message", [
    ("return [0.5]", r"must have shape \[2\].*got shape \[1\]"),
    ("return 0.5", "must be 2 numbers.*got float"),
    ("return ['good', 'bad']", r"scores\[0\] is str 'good', not a real number"),
    ("return [0.1, None]", r"scores\[1\] is NoneType None"),
    ("return images.mean(dim=(1, 2, 3)) > 0.5", r"scores\[0\] is bool"),
    ("return {'score': [0.1, 0.2]}", "returned a dict with keys \\['score'\\]; return the scores"),
    ("return [0.1, 0.2], {'num_failures': 0.5}", r"num_failures'\] must be an int in \[0, 2\]"),
    ("return [0.1, 0.2], {'num_failures': 3}", r"num_failures'\] must be an int in \[0, 2\]"),
    ("return [0.1, 0.2], {'extra': [1.0]}", r"info\['extra'\] must have shape \[2\]"),
])
def test_contract_break_stops_multi_score_at_construction(user_module, body, message):
    user_module("contract", f"def fn(images, prompts, metadata):\n    {body}\n")
    with pytest.raises(RewardContractError, match=message) as error:
        multi_score("cpu", {"contract:fn": 1.0, "jpeg_compressibility": 1.0})
    assert "contract probe" in str(error.value) and "'contract:fn'" in str(error.value)


@pytest.mark.parametrize("body", [
    "return [0.25] * len(prompts)",
    "return np.full(len(prompts), 0.25, dtype=np.float32)",
    "return torch.full((len(prompts), 1), 0.25)",  # an MLP head's [B, 1] output
    "return torch.full((len(prompts),), 0.25, dtype=torch.bfloat16), {'num_failures': 0}",
    "return tuple(int(0) + 0.25 for _ in prompts)",
])
def test_accepted_output_forms(user_module, body):
    user_module("forms", f"import numpy as np\nimport torch\ndef fn(images, prompts, metadata):\n    {body}\n")
    result, info = multi_score("cpu", {"forms:fn": 2.0})(_images(), ["a", "b", "c"], [{}] * 3)
    np.testing.assert_array_equal(result["forms:fn"], [0.25] * 3)
    np.testing.assert_array_equal(result["avg"], [0.5] * 3)
    assert info["num_failures"] == 0


def test_failures_nan_and_only_strict(user_module):
    user_module("fails", """
        import math
        seen = []
        def fn(images, prompts, metadata, only_strict=True):
            seen.append(only_strict)
            return [0.5, math.nan, 0.0, math.inf][:len(prompts)], {"num_failures": 1, "margin": [1.0] * len(prompts)}
    """)
    fn = multi_score("cpu", {"fails:fn": 1.0})
    result, info = fn(_images(4), ["a"] * 4, [{}] * 4, only_strict=False)
    np.testing.assert_array_equal(result["fails:fn"], [0.5, 0.0, 0.0, 0.0])
    assert info["num_failures"] == 3  # the function's own count plus the two non-finite scores
    np.testing.assert_array_equal(info["margin"], [1.0] * 4)
    assert sys.modules["fails"].seen == [True, False]  # the probe, then the real call


def test_probe_that_raises_defers_the_check_to_the_first_real_batch(user_module, caplog):
    user_module("needs_meta", """
        def fn(images, prompts, metadata):
            return [float(row["target"]) for row in metadata][:1]  # KeyError on the probe; wrong length later
    """)
    with caplog.at_level("WARNING"):
        fn = multi_score("cpu", {"needs_meta:fn": 1.0})
    assert "raised on the contract probe" in caplog.text and "KeyError" in caplog.text
    with pytest.raises(RewardContractError, match=r"must have shape \[2\]"):  # a bug: ends the run, not scored 0
        fn(_images(2), ["a", "b"], [{"target": 1}, {"target": 2}])


def test_an_outage_in_a_real_batch_scores_zero_like_a_builtin(user_module):
    user_module("flaky", """
        calls = []
        def fn(images, prompts, metadata):
            calls.append(len(prompts))
            if len(calls) > 1:
                raise ConnectionError("judge unreachable")
            return [1.0] * len(prompts)
    """)
    fn = multi_score("cpu", {"flaky:fn": 1.0, "jpeg_compressibility": 1.0})
    result, info = fn(_images(3), ["a"] * 3, [{}] * 3)
    np.testing.assert_array_equal(result["flaky:fn"], [0.0] * 3)
    assert info["num_failures"] == 3


def test_factory_is_called_once_with_the_resolved_reward_config(user_module):
    user_module("fact", """
        built = []
        def make(device, reward_config):
            built.append((device, reward_config["batch_size"], dict(reward_config["custom_options"])))
            scale = reward_config["custom_options"].get("scale", 1.0)
            def score(images, prompts, metadata):
                return (images.mean(dim=(1, 2, 3)) * scale).tolist()
            return score
        def not_a_factory(device, reward_config):
            return 42
    """)
    fn = multi_score("cpu", {"fact:make": 1.0}, {"batch_size": 4, "custom_options": {"scale": 10.0}})
    images = _images(2)
    result, _ = fn(images, ["a", "b"], [{}, {}])
    np.testing.assert_allclose(result["fact:make"], images.mean(dim=(1, 2, 3)).double().numpy() * 10, rtol=1e-6)
    assert sys.modules["fact"].built == [("cpu", 4, {"scale": 10.0})]
    with pytest.raises(RewardContractError, match="the factory returned a int, not a callable"):
        multi_score("cpu", {"fact:not_a_factory": 1.0})


def test_check_output_is_strict_about_tuples():
    scores, info = check_output("x", ([0.1, 0.2], {}), 2)
    np.testing.assert_array_equal(scores, [0.1, 0.2])
    scores, _ = check_output("x", (0.1, 0.2), 2)  # a tuple of two scores is scores, not (scores, info)
    np.testing.assert_array_equal(scores, [0.1, 0.2])


# ---- the example module of the README ------------------------------------------------------------------


def test_example_saturation_by_hand():
    pixels = torch.tensor([
        [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5]],  # pure red: 1; grey: 0
        [[0.0, 0.0, 0.0], [1.0, 0.5, 0.25]],  # black: 0 (max 0); (1 - 0.25) / 1 = 0.75
    ])  # [H=2, W=2, C=3]
    image = pixels.permute(2, 0, 1)[None]  # [1, 3, 2, 2]
    images = torch.cat([image, torch.full_like(image, 0.3)])
    result, info = multi_score("cpu", {SATURATION: 1.0})(images, ["a", "b"], [{}, {}])
    np.testing.assert_allclose(result[SATURATION], [(1 + 0 + 0 + 0.75) / 4, 0.0], atol=1e-7)
    assert info["num_failures"] == 0


def test_example_clip_similarity_factory_with_a_tiny_clip(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    clip_dir = build_tiny_clip(tmp_path / "clip")
    name = "examples/my_rewards:clip_similarity"
    fn = multi_score("cpu", {name: 1.0}, {"custom_options": {"clip_model": clip_dir}})
    images = torch.rand((2, 3, IMAGE_SIZE, IMAGE_SIZE), generator=torch.Generator().manual_seed(7))
    prompts = ["a red cat", "a dog"]
    result, info = fn(images, prompts, [{}, {}])
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():  # independent: CLIPModel.forward's normalised embeddings
        uint8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        output = model(**processor(text=prompts, images=list(uint8), padding=True, return_tensors="pt"))
    expected = (output.image_embeds * output.text_embeds).sum(-1).numpy()
    np.testing.assert_allclose(result[name], expected, atol=1e-5)
    assert info["num_failures"] == 0 and np.ptp(result[name]) > 0


# ---- config forms: ml_collections, config_flags, the training script ------------------------------------


def _load_flags(argv):
    argv = ["train"] + argv
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "preset", flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def test_config_flags_accept_the_slash_form_and_refuse_dots():
    preset = f"--config={TINY_PRESET}:tiny_cpu"
    config = _load_flags([preset, '--config.reward_fn={"examples/my_rewards:saturation": 1.0, "brightness": 0.5}',
                          '--config.rewards.custom_options={"clip_model": "openai/clip-vit-base-patch32"}'])
    assert config.reward_fn.to_dict() == {SATURATION: 1.0, "brightness": 0.5}
    assert config.rewards.custom_options.to_dict() == {"clip_model": "openai/clip-vit-base-patch32"}
    validate(config, 1)
    with pytest.raises(Exception, match="does not accept dots"):
        _load_flags([preset, '--config.reward_fn={"examples.my_rewards:saturation": 1.0}'])


def _dry_run(*overrides):
    return subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), f"--config={TINY_PRESET}:tiny_cpu", "--dry_run", *overrides],
        capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=300,
    )


def test_training_script_dry_run_with_custom_rewards():
    good = _dry_run('--config.reward_fn={"examples/my_rewards:saturation": 1.0}')
    assert good.returncode == 0, good.stderr[-2000:]
    assert "batch plan" in good.stdout
    bad = _dry_run('--config.reward_fn={"examples/my_rewards:saturaton": 1.0}')
    assert bad.returncode != 0
    assert "has no attribute 'saturaton'; its callables: ['clip_similarity', 'saturation']" in bad.stderr
    dotted = _dry_run('--config.reward_fn={"examples.my_rewards:saturation": 1.0}')
    assert dotted.returncode != 0 and "does not accept dots" in dotted.stderr


def test_one_training_epoch_with_a_custom_reward(tmp_path, tiny_sd3_dir):
    from test_train_e2e import run_training

    metrics = run_training(tmp_path / "run", tiny_sd3_dir, "--config.num_epochs=1", "--config.eval_freq=0",
                           '--config.reward_fn={"examples/my_rewards:saturation": 1.0}')
    record = metrics[0]
    assert 0.0 <= record[f"reward/{SATURATION}"] <= 1.0
    assert record["reward/avg"] == pytest.approx(record[f"reward/{SATURATION}"])
    assert record["reward/num_failures"] == 0


def test_training_script_stops_with_one_message_when_the_probe_fails(tmp_path):
    (tmp_path / "bad_reward.py").write_text("def fn(images, prompts, metadata):\n    return [0.5]\n")
    result = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), f"--config={TINY_PRESET}:tiny_cpu", f"--config.logdir={tmp_path / 'logs'}",
         f"--config.pretrained.model={tmp_path / 'never_built'}", '--config.reward_fn={"bad_reward:fn": 1.0}'],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{tmp_path}", "WANDB_MODE": "disabled"},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert ("train_sd3_awm: custom reward 'bad_reward:fn': scores must have shape [2] (one per image) or [2, 1], "
            "got shape [1] (contract probe") in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "never_built").exists()  # stopped before the diffusion model is built or loaded
