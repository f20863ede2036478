"""Weight EMA of the policy LoRA and the KL-EMA adapter update (SPEC section 5).

Weight EMA (``train.ema``), at optimizer step k, when ``(k + 1) % interval == 0``
(the reference's phase: with interval n the first update is at k = n - 1)::

    decay_k = min((1 + k) / (10 + k), ema_decay)
    ema <- ema + (1 - decay_k) (theta - ema)

KL-EMA adapter (the ``ema`` LoRA adapter the KL-EMA term pulls towards)::

    d = min(kl_ema_decay, 0.001 * k)   ("linear")   or   kl_ema_decay   ("constant")
    theta_ema <- d theta_ema + (1 - d) theta

Both take lists of tensors of matching shapes and update in place, no grad.
"""

import torch


def weight_ema_decay(step, max_decay):
    return min((1.0 + step) / (10.0 + step), max_decay)


def kl_ema_decay(step, decay, decay_type):
    if decay_type == "linear":
        return min(decay, 0.001 * step)
    if decay_type == "constant":
        return decay
    raise ValueError(f"kl_ema_decay_type={decay_type!r} is not one of ['linear', 'constant']")


@torch.no_grad()
def lerp_(targets, sources, weight):
    """targets <- targets + weight * (sources - targets), in place."""
    for target, source in zip(targets, sources, strict=True):
        target.lerp_(source.to(target.dtype), weight)


class WeightEMA:
    """A float32 shadow copy of `parameters`, updated with `weight_ema_decay`."""

    def __init__(self, parameters, max_decay=0.99, update_step_interval=1):
        self.shadow = [p.detach().clone().float() for p in parameters]
        self.max_decay = max_decay
        self.update_step_interval = update_step_interval

    def step(self, parameters, global_step):
        """Update at optimizer step `global_step` if it falls on the interval; returns the decay used."""
        if (global_step + 1) % self.update_step_interval:
            return None
        decay = weight_ema_decay(global_step, self.max_decay)
        lerp_(self.shadow, parameters, 1.0 - decay)
        return decay

    @torch.no_grad()
    def swap(self, parameters):
        """Exchange shadow and live values (call twice to restore): EMA evaluation."""
        for shadow, param in zip(self.shadow, parameters, strict=True):
            live = param.detach().clone()
            param.copy_(shadow.to(param.dtype))
            shadow.copy_(live.float())

    def state_dict(self):
        return {"shadow": [t.clone() for t in self.shadow]}

    def load_state_dict(self, state):
        for shadow, saved in zip(self.shadow, state["shadow"], strict=True):
            shadow.copy_(saved)
