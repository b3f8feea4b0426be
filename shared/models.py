"""Models by timm name, plus ``small_cnn``, the CPU default, registered in timm.

Because ``small_cnn`` is a registered timm model, every timm path works for it
too: ``timm.create_model("small_cnn", pretrained=True,
pretrained_cfg_overlay=dict(file="model.safetensors"))`` after ``import shared.models``.
"""

from __future__ import annotations

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks and a two-layer head: ~0.42M parameters, ~91% on Fashion-MNIST in 2 epochs."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0, width: int = 32, **_):
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(7), nn.Flatten(),
        )
        self.pre_logits = nn.Sequential(nn.Linear(2 * width * 49, 128), nn.ReLU(inplace=True), nn.Dropout(drop_rate))
        self.head = nn.Linear(128, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pre_logits(self.features(x)))


default_cfgs = generate_default_cfgs({
    "small_cnn.untrained": dict(
        num_classes=10, input_size=(1, 28, 28), mean=(0.2860,), std=(0.3530,),
        first_conv="features.0", classifier="head",
    ),
})


@register_model
def small_cnn(pretrained: bool = False, **kwargs) -> SmallCNN:
    return build_model_with_cfg(SmallCNN, "small_cnn", pretrained, **kwargs)


def create_model(name: str, num_classes: int, in_chans: int, pretrained: bool = False, drop_rate: float = 0.0,
                 checkpoint: str | None = None) -> nn.Module:
    """Any timm model by name; ``checkpoint`` loads a local weights file instead of the hub."""
    if name not in timm.list_models() and not timm.is_model(name):
        from shared.config import ConfigError, closest

        raise ConfigError(f"unknown model '{name}'{closest(name, timm.list_models())}; see timm.list_models()")
    overlay = dict(file=checkpoint, num_classes=num_classes) if checkpoint else None  # keep the trained head
    return timm.create_model(name, pretrained=pretrained or bool(checkpoint), pretrained_cfg_overlay=overlay,
                             num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
