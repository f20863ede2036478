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


def build_optimizer(parameters, learning_rate, betas, weight_decay, eps, use_8bit_adam=False):
    if use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("train.use_8bit_adam=True needs bitsandbytes: pip install '.[eightbit]'") from error
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(parameters, lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps)


def build_lr_scheduler(optimizer, decay_steps):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, CosineToThird(decay_steps))
