"""LoRA adapters on the SD3 transformer through peft (SPEC section 5, "LoRA").

* ``default``: the policy adapter (the only trainable parameters).
* ``ema``: the KL-EMA adapter, created as a copy of ``default``; no grad.
* reference model: the base transformer, adapters disabled.

peft's ``set_adapter`` also flips ``requires_grad`` to the active adapter, so
`use_adapter` always switches back to ``default``. The training loop switches
with `AdapterSwitch` (no-grad forwards, cheap enough for every micro-batch).
Saved adapters are diffusers LoRA files (``pytorch_lora_weights.safetensors``
with peft metadata) that the pipeline's ``load_lora_weights`` reads (SD3 or FLUX);
their bytes depend only on the weights and the config (sorted metadata and
header), so identical runs write identical files.
"""

import contextlib
import os

import torch

from advantage_weighted_matching.backbones import SD3
from advantage_weighted_matching.paths import LORA_WEIGHT_NAME

def lora_config(rank, alpha, init, lora_type, backbone=SD3):
    """peft LoraConfig on the backbone's `lora_type` target modules (SPEC 5: attn / ffn)."""
    from peft import LoraConfig

    targets = backbone.lora_targets(lora_type)
    init_lora_weights = {"gaussian": "gaussian", "default": True, "true": True}[init]
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init_lora_weights, target_modules=targets)


def add_lora(transformer, config, with_ema_adapter):
    """Wrap `transformer` in a peft model with adapter `default` (and `ema`, a copy)."""
    from peft import get_peft_model

    model = get_peft_model(transformer, config)
    if with_ema_adapter:
        model.add_adapter("ema", config)
        copy_adapter(model, "default", "ema")
        model.set_adapter("default")
    return model


def adapter_parameters(model, adapter):
    """The LoRA tensors of `adapter` in a stable order (name-sorted)."""
    tag = f".{adapter}."
    named = [(n, p) for n, p in model.named_parameters() if "lora_" in n and tag in n]
    return [p for _, p in sorted(named, key=lambda item: item[0])]


@torch.no_grad()
def copy_adapter(model, source, target):
    for src, dst in zip(adapter_parameters(model, source), adapter_parameters(model, target), strict=True):
        dst.copy_(src)


@contextlib.contextmanager
def use_adapter(model, adapter):
    """Run under `adapter`, then return to `default` (and its requires_grad)."""
    model.set_adapter(adapter)
    try:
        yield
    finally:
        model.set_adapter("default")


class AdapterSwitch:
    """`use_adapter` / `disable_adapter` for no-grad forwards, over the LoRA layers found once.

    peft's model-level switches walk the whole module tree on every call (for
    SD3.5-Medium about 36 ms to swap adapters and 88 ms to disable them), and
    even its per-layer `set_adapter` / `enable_adapters` rewrite every adapter
    parameter's `requires_grad` (2 ms a switch on the tiny model); the training
    step switches four times per micro-batch. These switches flip only the two
    per-layer flags that peft's LoRA forward reads (`_active_adapter`,
    `_disable_adapters`, the state its own setters leave) and restore them on
    exit. `requires_grad` is left as it is, `default` trainable and `ema`
    frozen: the switched forwards (reference, KL-EMA, off-policy rollouts) run
    without gradients, and only `default` is ever trained.

    `mixed(names)` runs one batch with a different adapter per row (peft's mixed-adapter
    batch: ``names[i]`` for row i, ``"__base__"`` for none), for the batched reference
    and KL-EMA forward (``speed.paired_reference``).
    """

    def __init__(self, model):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
        for layer in self.layers:  # fail loudly if a peft upgrade renames the flags
            if not (hasattr(layer, "_active_adapter") and hasattr(layer, "_disable_adapters")):
                raise RuntimeError(f"unsupported peft version: {type(layer).__name__} lacks the adapter flags")
        self.row_adapters = None  # per-row adapter names while `mixed` is active
        self._hooked = False

    @contextlib.contextmanager
    def _set(self, name, value):
        previous = [getattr(layer, name) for layer in self.layers]
        for layer in self.layers:
            setattr(layer, name, value)
        try:
            yield
        finally:
            for layer, old in zip(self.layers, previous):
                setattr(layer, name, old)

    def use(self, adapter):
        return self._set("_active_adapter", [adapter])

    def disabled(self):
        return self._set("_disable_adapters", True)

    def _row_adapters_hook(self, module, args, kwargs):
        if self.row_adapters is not None:
            kwargs["adapter_names"] = self.row_adapters
        return args, kwargs

    @contextlib.contextmanager
    def mixed(self, adapter_names):
        """Row i of the batch runs under ``adapter_names[i]`` in every LoRA layer (peft's
        ``adapter_names`` forward argument, which its LoRA layers check and apply: the
        base output for every row plus each adapter's LoRA term on its rows). No-grad
        forwards only (peft refuses mixed batches for training). The pre-forward hooks are
        registered once and stay (a fixed hook reading `row_adapters`: a compiled block
        sees the same hook every call and does not recompile)."""
        if not self._hooked:
            for layer in self.layers:
                layer.register_forward_pre_hook(self._row_adapters_hook, with_kwargs=True)
            self._hooked = True
        previous, self.row_adapters = self.row_adapters, list(adapter_names)
        try:
            yield
        finally:
            self.row_adapters = previous


def adapter_state_dict(model, adapter):
    """diffusers-style LoRA state dict (no `base_model.model.` prefix, no adapter name)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model.base_model.model, adapter_name=adapter)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def save_adapter(model, adapter, directory, config, backbone=SD3):
    """Write `adapter` as a diffusers LoRA dir loadable by the backbone pipeline's `load_lora_weights`."""
    backbone.pipeline_class().save_lora_weights(
        directory,
        transformer_lora_layers=adapter_state_dict(model, adapter),
        transformer_lora_adapter_metadata=adapter_metadata(config),
        weight_name=LORA_WEIGHT_NAME,
    )
    canonicalize_safetensors(os.path.join(directory, LORA_WEIGHT_NAME))


def adapter_metadata(config):
    """peft LoraConfig -> the metadata dict saved with the weights. peft keeps
    `target_modules` as a set, whose order varies between processes (string
    hashing is salted): sorted, so identical runs write byte-identical files."""
    metadata = config.to_dict()
    for key, value in metadata.items():
        if isinstance(value, (set, frozenset)):
            metadata[key] = sorted(value)
    return metadata


def canonicalize_safetensors(path):
    """Rewrite a safetensors file's JSON header with sorted keys. The Rust writer keeps the
    header (tensor entries and ``__metadata__``) in hash maps whose order is random per
    process; tensor offsets are relative to the data, so only the header changes."""
    import json

    with open(path, "rb") as f:
        raw = f.read()
    length = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + length]), sort_keys=True, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)  # the format pads the header to a multiple of 8 bytes
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + raw[8 + length:])


def load_adapter(model, directory, adapter="default"):
    """Load a diffusers LoRA dir (saved by `save_adapter`) into `adapter`; exact copy."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = os.path.join(directory, LORA_WEIGHT_NAME) if os.path.isdir(directory) else directory
    if not os.path.isfile(path):
        raise FileNotFoundError(f"train.lora_path: no LoRA weights at {path}")
    state = load_file(path)
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    try:
        result = set_peft_model_state_dict(model.base_model.model, state, adapter_name=adapter)
    except RuntimeError as error:  # shape mismatch: another rank or target set
        raise ValueError(f"LoRA at {path} does not fit this transformer (check train.lora_rank / lora_type): "
                         f"{error}") from error
    missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter}." in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"LoRA at {path} does not fit this transformer: unexpected {result.unexpected_keys[:5]}, "
            f"missing {missing[:5]}"
        )
