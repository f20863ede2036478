"""Optimizer and LR schedule (SPEC section 5, "Optimisation").

LR: cosine from ``lr`` to ``lr / 3`` over ``decay_steps`` optimizer steps, then
constant at ``lr / 3``::

    lr(k) = lr / 3 + (lr - lr / 3) * (1 + cos(pi k / decay_steps)) / 2,  k < decay_steps
"""

import math

import torch


class CosineToThird:
    """LambdaLR multiplier; a class (not a lambda) so its state can be saved."""

    def __init__(self, decay_steps):
        self.decay_steps = decay_steps

    def __call__(self, step):
        if step >= self.decay_steps:
            return 1.0 / 3.0
        return 1.0 / 3.0 + (2.0 / 3.0) * 0.5 * (1.0 + math.cos(math.pi * step / self.decay_steps))


def build_optimizer(parameters, learning_rate, betas, weight_decay, eps, use_8bit_adam=False, fused=False):
    """AdamW (bitsandbytes' 8-bit one with `use_8bit_adam`). `fused`: torch's fused AdamW, one
    kernel for all parameters instead of a loop of per-tensor ops (same update; issue I)."""
    if use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("train.use_8bit_adam=True needs bitsandbytes: pip install '.[eightbit]'") from error
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    extra = {"fused": True} if fused and not use_8bit_adam else {}
    optimizer = optimizer_class(parameters, lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps,
                                **extra)
    if not use_8bit_adam:
        keep_implementation_on_load(optimizer)
    return optimizer


def keep_implementation_on_load(optimizer):
    """Let ``load_state_dict`` keep this optimizer's own ``fused`` / ``foreach`` choice rather than
    the checkpoint's (torch otherwise takes every param-group option from the saved state):
    the implementation is an execution switch, free to change on resume. Set before the state
    is read, so the step counters land where that implementation keeps them."""
    own = [{key: group.get(key) for key in ("fused", "foreach")} for group in optimizer.param_groups]

    def use_own_implementation(optimizer, state_dict):
        state_dict = dict(state_dict)
        state_dict["param_groups"] = [{**saved, **mine} for saved, mine in zip(state_dict["param_groups"], own)]
        return state_dict

    optimizer.register_load_state_dict_pre_hook(use_own_implementation)


def build_lr_scheduler(optimizer, decay_steps):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, CosineToThird(decay_steps))
