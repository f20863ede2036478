"""Execution switches that keep the mathematics (issue I): what runs faster, never what is computed.

* **Regional compilation** (``train.compile``): ``torch.compile`` of each repeated transformer
  block (SD3: ``JointTransformerBlock``; FLUX: ``FluxTransformerBlock`` and
  ``FluxSingleTransformerBlock``, ``backbone.repeated_blocks``) with ``dynamic=False``, not of
  the whole model: identical blocks share one compiled code, so compile time is a few blocks'
  worth, paid once per run (shapes are static: the rollout chunk, the micro-batch rows and the
  eval batch never change). Blocks of one class still differ (SD3.5's dual-attention blocks
  have ``attn2``, the last block is ``context_pre_only``), and the adapter state
  (``lora.AdapterSwitch`` flags: policy, base, ``ema``, mixed), grad mode and autocast are
  guards of the compiled code: each combination compiles once. That is more entries than
  dynamo's default ``recompile_limit`` of 8 per code object (NOTES: "KeyError on 'attn2'" at
  the limit, after which the block silently runs eagerly), so `compile_repeated_blocks`
  raises the limit to `RECOMPILE_LIMIT`. ``train.compile_mode`` is passed to
  ``torch.compile`` (``"reduce-overhead"``: CUDA graphs), ``train.compile_backend`` too
  (``"eager"`` / ``"aot_eager"`` test the wiring without inductor).
* **Batched reference** (``train.batched_reference``): the base-model (KL) and KL-EMA-adapter
  forwards of a micro-batch as one call of twice the rows, base rows first, through peft's
  mixed-adapter batch (``AdapterSwitch.mixed``): `paired_reference`.
* **Fused AdamW** (``train.fused_adam``): ``torch.optim.AdamW(fused=True)``, one kernel for
  the whole LoRA update (``optim.build_optimizer``).
* **Rollout chunks** (``sample.rollout_chunk``): ``rollout.ChunkedRollout``.

``"auto"`` switches are on for CUDA and off on CPU (`resolve`).
"""

import dataclasses

import torch

RECOMPILE_LIMIT = 64  # compiled entries per block class: block kinds x adapter states x grad mode x shapes
TRI_STATE = ("auto", "true", "false")


def resolve(value, device):
    """"auto" -> on for CUDA, off otherwise; "true" / "false" as written."""
    if value not in TRI_STATE:
        raise ValueError(f"expected one of {list(TRI_STATE)}, got {value!r}")
    if value == "auto":
        return torch.device(device).type == "cuda"
    return value == "true"


@dataclasses.dataclass(frozen=True)
class Settings:
    """The resolved execution switches of a run (logged once at start-up)."""

    compile: bool
    compile_mode: str
    compile_backend: str
    fused_adam: bool
    batched_reference: bool
    rollout_chunk: int  # images per rollout solver pass

    @classmethod
    def from_config(cls, config, device):
        train, sample = config.train, config.sample
        batched = train.batched_reference and train.algorithm == "awm" and train.beta > 0 and (
            train.ema_beta > 0 or train.off_policy)  # both no-grad forwards run: one call instead of two
        return cls(
            compile=resolve(train.compile, device), compile_mode=train.compile_mode,
            compile_backend=train.compile_backend, fused_adam=resolve(train.fused_adam, device) and not
            train.use_8bit_adam, batched_reference=bool(batched),
            rollout_chunk=sample.rollout_chunk or sample.train_batch_size,
        )


def compile_repeated_blocks(transformer, block_names, mode="default", backend="inductor"):
    """Compile every submodule of `transformer` whose class name is in `block_names`, in place
    (``module.compile``: the module object, its parameters and hooks stay; LoRA layers inside
    are traced with it). Returns the number of blocks compiled; compilation itself happens
    at each new (block kind, adapter state, grad mode, shape)'s first call."""
    import torch._dynamo

    config = torch._dynamo.config
    for name, value in (("recompile_limit", RECOMPILE_LIMIT), ("accumulated_recompile_limit", 8 * RECOMPILE_LIMIT)):
        if not hasattr(config, name):  # torch < 2.7 names them cache_size_limit, accumulated_cache_size_limit
            name = name.replace("recompile", "cache_size")
        setattr(config, name, max(getattr(config, name), value))
    options = {"backend": backend, "dynamic": False}
    if backend == "inductor" and mode != "default":
        options["mode"] = mode
    blocks = [module for module in transformer.modules() if type(module).__name__ in block_names]
    if not blocks:
        raise ValueError(f"no {list(block_names)} blocks in {type(transformer).__name__} to compile")
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def compile_seconds():
    """Seconds torch.compile has spent in this process so far (dynamo tracing and the backend,
    forward frames and lazily compiled backward graphs), from dynamo's own timers; None when
    this torch does not keep them."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return None
    total = 0.0
    for key, times in compilation_time_metrics.items():
        if key == "_compile.compile_inner" or key.endswith("bw_compiler"):
            total += sum(times)
    return total


def paired_reference(both):
    """``(ref_v, ema_v)`` for ``objective.awm_loss`` from one batched call.

    ``both(x, t) -> (v_ref, v_ema)``. `awm_loss` calls ``ref_v(x_t, t)`` then ``ema_v(x_t, t)``
    with the same tensors: the first call computes both and keeps ``v_ema`` for the second.
    Use only when both are needed (``Settings.batched_reference``)."""
    kept = {}

    def ref_v(x, t):
        v_ref, kept["ema"] = both(x, t)
        kept["inputs"] = (x, t)
        return v_ref

    def ema_v(x, t):
        inputs = kept.pop("inputs", None)
        if inputs is None or inputs[0] is not x or inputs[1] is not t:
            raise RuntimeError("paired_reference: ema_v must follow ref_v on the same inputs")
        return kept.pop("ema")

    return ref_v, ema_v


def reference_and_ema_velocity(backbone, transformer, adapters, x, t, embeds, pooled, **velocity_kwargs):
    """(v_ref, v_ema) [R, C, h, w] from one no-grad call on 2R rows: rows [0, R) under the base
    model (adapters off), rows [R, 2R) under the ``ema`` adapter."""
    rows = x.shape[0]
    t = t.reshape(-1).expand(rows) if isinstance(t, torch.Tensor) else torch.full((rows,), float(t), device=x.device)
    with adapters.mixed(["__base__"] * rows + ["ema"] * rows):
        v = backbone.velocity(transformer, torch.cat([x, x]), torch.cat([t, t]), torch.cat([embeds, embeds]),
                              torch.cat([pooled, pooled]), **velocity_kwargs)
    return v[:rows], v[rows:]
