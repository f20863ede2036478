"""LoRA adapters on the tiny SD3 transformer (SPEC section 5, "LoRA").

Every test wraps a freshly loaded transformer: `add_lora` mutates the module it
is given, so the session `tiny_pipeline` is never touched.
"""

import pytest
import torch

from advantage_weighted_matching.lora import (
    LORA_WEIGHT_NAME,
    adapter_parameters,
    adapter_state_dict,
    add_lora,
    copy_adapter,
    load_adapter,
    lora_config,
    save_adapter,
    AdapterSwitch,
    use_adapter,
)

RANK, ALPHA = 4, 8

# The tiny transformer: block 0 has dual attention (attn2) and a context branch; block 1 is the
# last, context-pre-only block (no to_add_out, no ff_context).
ATTN_LORA_MODULES = sorted(
    [f"transformer_blocks.0.attn.{name}" for name in (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
    + [f"transformer_blocks.1.attn.{name}" for name in (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")]
)
FFN_LORA_MODULES = sorted([
    "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
    "transformer_blocks.0.ff_context.net.0.proj", "transformer_blocks.0.ff_context.net.2",
    "transformer_blocks.1.ff.net.0.proj", "transformer_blocks.1.ff.net.2",
])


def _transformer(tiny_sd3_dir):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(str(tiny_sd3_dir), subfolder="transformer").eval()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
        "pooled_projections": torch.randn(2, 32, generator=g),
        "timestep": torch.tensor([500.0, 250.0]),
    }


@torch.no_grad()
def _forward(model, inputs):
    return model(**inputs, return_dict=False)[0]


def _lora_modules(model):
    from peft.tuners.lora import LoraLayer

    return sorted(n for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer))


@torch.no_grad()
def _perturb(model, adapter, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    for p in adapter_parameters(model, adapter):
        p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture
def lora_model(tiny_sd3_dir):
    config = lora_config(RANK, ALPHA, "gaussian", "attn")
    return add_lora(_transformer(tiny_sd3_dir), config, with_ema_adapter=True), config


def test_attn_targets_exactly_the_spec_modules(lora_model):
    model, _ = lora_model
    names = _lora_modules(model)
    assert names == ATTN_LORA_MODULES
    assert not any("attn2" in n or ".ff" in n for n in names)


def test_ffn_targets(tiny_sd3_dir):
    model = add_lora(_transformer(tiny_sd3_dir), lora_config(RANK, ALPHA, "gaussian", "ffn"), False)
    assert _lora_modules(model) == FFN_LORA_MODULES
    assert list(model.peft_config) == ["default"]


def test_rank_alpha_and_scaling(lora_model):
    model, config = lora_model
    assert config.r == RANK and config.lora_alpha == ALPHA
    layer = model.base_model.model.transformer_blocks[0].attn.to_q
    assert layer.r["default"] == RANK and layer.r["ema"] == RANK
    assert layer.scaling["default"] == ALPHA / RANK == 2.0
    assert tuple(layer.lora_A["default"].weight.shape) == (RANK, 16)
    assert tuple(layer.lora_B["default"].weight.shape) == (16, RANK)
    # 15 LoRA modules x (A, B) per adapter
    assert len(adapter_parameters(model, "default")) == 30
    assert len(adapter_parameters(model, "ema")) == 30


def test_gaussian_init_keeps_base_output(tiny_sd3_dir, lora_model):
    model, _ = lora_model
    inputs = _inputs()
    base = _forward(_transformer(tiny_sd3_dir), inputs)
    layer = model.base_model.model.transformer_blocks[0].attn.to_q
    assert layer.lora_A["default"].weight.abs().sum() > 0  # gaussian A
    assert torch.equal(layer.lora_B["default"].weight, torch.zeros(16, RANK))  # zero B
    torch.testing.assert_close(_forward(model, inputs), base, rtol=0, atol=1e-6)


def test_ema_adapter_starts_equal_to_default(lora_model):
    model, _ = lora_model
    default, ema = adapter_parameters(model, "default"), adapter_parameters(model, "ema")
    assert all(torch.equal(d, e) for d, e in zip(default, ema))
    assert all(d.data_ptr() != e.data_ptr() for d, e in zip(default, ema))  # copies, not aliases


def test_use_adapter_switches_and_restores_default(tiny_sd3_dir, lora_model):
    model, _ = lora_model
    inputs = _inputs()
    base = _forward(_transformer(tiny_sd3_dir), inputs)
    _perturb(model, "default")
    out_default = _forward(model, inputs)
    assert (out_default - base).abs().max() > 1e-3
    with use_adapter(model, "ema"):
        assert model.active_adapter == "ema"
        out_ema = _forward(model, inputs)
    assert (out_ema - out_default).abs().max() > 1e-3
    torch.testing.assert_close(out_ema, base, rtol=0, atol=1e-6)  # ema still has B = 0
    assert model.active_adapter == "default"
    torch.testing.assert_close(_forward(model, inputs), out_default, rtol=0, atol=0)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".default." in n and "lora_" in n for n in trainable)
    assert len(trainable) == 30


def test_use_adapter_restores_default_after_exception(lora_model):
    model, _ = lora_model
    with pytest.raises(RuntimeError, match="boom"):
        with use_adapter(model, "ema"):
            raise RuntimeError("boom")
    assert model.active_adapter == "default"
    assert all(p.requires_grad for p in adapter_parameters(model, "default"))
    assert not any(p.requires_grad for p in adapter_parameters(model, "ema"))


def test_disable_adapter_is_exactly_the_base_transformer(tiny_sd3_dir, lora_model):
    model, _ = lora_model
    _perturb(model, "default")
    inputs = _inputs(3)
    with model.disable_adapter():
        out = _forward(model, inputs)
    assert torch.equal(out, _forward(_transformer(tiny_sd3_dir), inputs))
    assert model.active_adapter == "default"


def test_copy_adapter(lora_model):
    model, _ = lora_model
    _perturb(model, "default")
    assert not all(torch.equal(d, e) for d, e in zip(adapter_parameters(model, "default"),
                                                     adapter_parameters(model, "ema")))
    copy_adapter(model, "default", "ema")
    assert all(torch.equal(d, e) for d, e in zip(adapter_parameters(model, "default"),
                                                 adapter_parameters(model, "ema")))


def test_adapter_state_dict_keys(lora_model):
    model, _ = lora_model
    state = adapter_state_dict(model, "default")
    assert len(state) == 30
    assert "transformer_blocks.0.attn.to_q.lora_A.weight" in state
    assert not any(k.startswith("base_model") or ".default." in k or ".ema." in k for k in state)


def test_save_adapter_loads_in_diffusers_pipeline(tmp_path, tiny_sd3_dir, lora_model):
    from diffusers import StableDiffusion3Pipeline

    model, config = lora_model
    _perturb(model, "default", scale=0.1)
    inputs = _inputs(4)
    expected = _forward(model, inputs)
    save_adapter(model, "default", str(tmp_path / "lora"), config)
    assert (tmp_path / "lora" / LORA_WEIGHT_NAME).is_file()

    pipeline = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir))
    base = _forward(pipeline.transformer, inputs)
    pipeline.load_lora_weights(str(tmp_path / "lora"))
    got = _forward(pipeline.transformer, inputs)
    assert (expected - base).abs().max() > 1e-3
    # alpha / r = 2 is applied (without the metadata diffusers would use scale 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_load_adapter_into_ema_copies_exactly(tmp_path, tiny_sd3_dir, lora_model):
    model, config = lora_model
    _perturb(model, "default", seed=5)
    save_adapter(model, "default", str(tmp_path / "lora"), config)

    other = add_lora(_transformer(tiny_sd3_dir), config, with_ema_adapter=True)
    load_adapter(other, str(tmp_path / "lora"), "ema")
    source = adapter_parameters(model, "default")
    assert all(torch.equal(s, e) for s, e in zip(source, adapter_parameters(other, "ema")))
    # `default` of the other model untouched (B still zero)
    assert not all(torch.equal(s, d) for s, d in zip(source, adapter_parameters(other, "default")))
    inputs = _inputs(6)
    with use_adapter(other, "ema"):
        torch.testing.assert_close(_forward(other, inputs), _forward(model, inputs), rtol=0, atol=0)
    # also accepts the file path itself
    load_adapter(other, str(tmp_path / "lora" / LORA_WEIGHT_NAME), "default")
    assert all(torch.equal(s, d) for s, d in zip(source, adapter_parameters(other, "default")))


def test_load_adapter_other_rank_fails_clearly(tmp_path, tiny_sd3_dir, lora_model):
    model, _ = lora_model
    config2 = lora_config(2, 4, "gaussian", "attn")
    small = add_lora(_transformer(tiny_sd3_dir), config2, with_ema_adapter=False)
    save_adapter(small, "default", str(tmp_path / "rank2"), config2)
    with pytest.raises(ValueError, match=r"(?s)does not fit.*size mismatch.*lora_A.*\[2, 16\].*\[4, 16\]"):
        load_adapter(model, str(tmp_path / "rank2"), "default")


def test_load_adapter_other_targets_fails_clearly(tmp_path, tiny_sd3_dir, lora_model):
    model, _ = lora_model
    ffn_config = lora_config(RANK, ALPHA, "gaussian", "ffn")
    ffn = add_lora(_transformer(tiny_sd3_dir), ffn_config, with_ema_adapter=False)
    save_adapter(ffn, "default", str(tmp_path / "ffn"), ffn_config)
    with pytest.raises(ValueError, match="does not fit this transformer"):
        load_adapter(model, str(tmp_path / "ffn"), "default")


def test_load_adapter_missing_path(tmp_path, lora_model):
    model, _ = lora_model
    with pytest.raises(FileNotFoundError, match="no LoRA weights"):
        load_adapter(model, str(tmp_path), "default")


def _assert_same(actual, expected):
    # CPU GEMM results can move by an ulp with buffer alignment, so exact equality
    # between two forwards is luck; 1e-6 is far below the gap between adapters (> 1e-3).
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


@torch.no_grad()  # the switches serve no-grad forwards (reference, KL-EMA, rollouts)
def test_adapter_switch_matches_peft_switches(tiny_sd3_dir, lora_model):
    model, _ = lora_model
    _perturb(model, "default", seed=1)
    _perturb(model, "ema", seed=2)
    inputs, switch = _inputs(4), AdapterSwitch(model)
    assert len(switch.layers) == len(ATTN_LORA_MODULES)
    out_default = _forward(model, inputs)
    with use_adapter(model, "ema"):
        expected_ema = _forward(model, inputs)
    with model.disable_adapter():
        expected_base = _forward(model, inputs)
    with switch.use("ema"):
        _assert_same(_forward(model.get_base_model(), inputs), expected_ema)
        with switch.disabled():  # nested: the base model, then back to `ema`
            _assert_same(_forward(model.get_base_model(), inputs), expected_base)
        _assert_same(_forward(model.get_base_model(), inputs), expected_ema)
        # requires_grad is untouched: `default` stays the only trainable adapter
        assert all(p.requires_grad for p in adapter_parameters(model, "default"))
        assert not any(p.requires_grad for p in adapter_parameters(model, "ema"))
    with switch.disabled():
        _assert_same(_forward(model.get_base_model(), inputs), expected_base)
    with pytest.raises(RuntimeError, match="boom"), switch.use("ema"):
        raise RuntimeError("boom")
    _assert_same(_forward(model, inputs), out_default)  # back to the policy, gradients on it alone
    assert all(p.requires_grad for p in adapter_parameters(model, "default"))
    assert not any(p.requires_grad for p in adapter_parameters(model, "ema"))
    # the three models really differ, far beyond the matmul rounding `_assert_same` allows
    assert (expected_ema - out_default).abs().max() > 1e-3 and (expected_base - out_default).abs().max() > 1e-3
