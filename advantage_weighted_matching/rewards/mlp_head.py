"""The linear MLP score head shared by the LAION aesthetic predictor and ImageReward.

Both heads are ``nn.Sequential`` stacks of ``Linear`` layers with ``Dropout``
between some of them and **no activation** (the released weights were trained
that way), so the head is an affine map ``[b, D] -> [b, 1]`` in eval mode:

    D -> 1024 -> (dropout) -> 128 -> (dropout) -> 64 -> (dropout) -> 16 -> 1

The released state dicts name the linear layers by their index in the
Sequential (``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``,
``layers.7``; the dropouts hold no weights). ``head_from_state_dict`` rebuilds
that Sequential from the shapes found in the state dict, so a tiny random head
in the tests goes through the same loader as the released one.
"""

import re

import torch
from torch import nn

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


class LinearMLPHead(nn.Module):
    """``head(embedding [b, D]) -> score [b, 1]``; linear layers at the given Sequential indices."""

    def __init__(self, layer_shapes):
        """``layer_shapes``: {sequential index: (out_features, in_features)}; other indices up to
        the last one are Dropout (identity in eval mode)."""
        super().__init__()
        last = max(layer_shapes)
        self.layers = nn.Sequential(*[
            nn.Linear(layer_shapes[i][1], layer_shapes[i][0]) if i in layer_shapes else nn.Dropout(0.0)
            for i in range(last + 1)
        ])

    def forward(self, embedding):
        return self.layers(embedding)


def head_from_state_dict(state_dict, what):
    """A LinearMLPHead holding ``state_dict`` (keys ``layers.{i}.weight/bias``), in eval mode.
    ValueError when the keys or shapes do not form a chain ending in one output."""
    shapes = {}
    for key, value in state_dict.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            raise ValueError(f"{what}: unexpected key {key!r} in the head weights (expected layers.<i>.weight/bias)")
        if match.group(2) == "weight":
            shapes[int(match.group(1))] = tuple(value.shape)
    if not shapes:
        raise ValueError(f"{what}: no layers.<i>.weight entries in the head weights")
    chain = [shapes[i] for i in sorted(shapes)]
    for (out_prev, _), (_, in_next) in zip(chain, chain[1:]):
        if out_prev != in_next:
            raise ValueError(f"{what}: head layer shapes {chain} do not chain")
    if chain[-1][0] != 1:
        raise ValueError(f"{what}: the head's last layer has {chain[-1][0]} outputs, expected 1")
    head = LinearMLPHead(shapes)
    head.load_state_dict(state_dict, strict=True)
    return head.eval().requires_grad_(False)


def load_head(path, what):
    """LinearMLPHead from a ``torch.save``d state dict file (loaded with ``weights_only=True``)."""
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{what}: {path} holds a {type(state_dict).__name__}, not a state dict")
    return head_from_state_dict(state_dict, what)
