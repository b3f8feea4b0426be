"""Unit tests of shared/models.py: small_cnn in timm's registry, timm models by name, export -> reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

import timm  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from shared import models  # noqa: E402
from shared.models import SmallCNN, create_model  # noqa: E402


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of the state-dict entries that differ (empty when identical)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def export(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_small_cnn_is_registered_in_timm():
    assert "small_cnn" in timm.list_models()
    assert timm.is_model("small_cnn")
    model = timm.create_model("small_cnn", num_classes=7, in_chans=3)
    assert isinstance(model, SmallCNN)
    assert model.pretrained_cfg["classifier"] == "head" and model.pretrained_cfg["first_conv"] == "features.0"
    assert model.get_classifier() is model.head and model.head.out_features == 7


@pytest.mark.parametrize("name, in_chans, size, num_classes", [
    ("small_cnn", 1, 28, 10), ("small_cnn", 3, 32, 4), ("resnet18", 1, 28, 10),
])
def test_create_model_output_shape(name, in_chans, size, num_classes):
    model = create_model(name, num_classes=num_classes, in_chans=in_chans).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_chans, size, size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


def test_small_cnn_reset_classifier_and_dropout():
    model = create_model("small_cnn", num_classes=10, in_chans=1, drop_rate=0.3)
    assert model.pre_logits[-1].p == 0.3
    model.reset_classifier(3)
    assert model.num_classes == 3
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 3)


def test_unknown_model_suggests_closest():
    with pytest.raises(ValueError) as info:
        create_model("smal_cnn", num_classes=10, in_chans=1)
    assert str(info.value) == "unknown model 'smal_cnn' (did you mean 'small_cnn'?); see timm.list_models()"
    with pytest.raises(ValueError) as info:
        create_model("resnet_18x", num_classes=10, in_chans=1)
    assert str(info.value).startswith("unknown model 'resnet_18x' (did you mean 'resnet")


def test_model_with_pretrained_tag_is_known():
    # 'arch.tag' names are timm models too (the tag picks pretrained weights)
    model = create_model("resnet18.a1_in1k", num_classes=3, in_chans=1)
    assert model.fc.out_features == 3


def test_export_reload_small_cnn_through_timm(tmp_path):
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_chans=1)
    with torch.no_grad():  # make the BatchNorm running stats non-default too
        model.train()(torch.randn(8, 1, 28, 28))
    path = export(model, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    fresh = timm.create_model("small_cnn", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert same_weights(model, fresh) == []
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model.eval()(x), fresh.eval()(x))
    # and through the package's own factory
    torch.manual_seed(2)
    assert same_weights(model, create_model("small_cnn", 10, 1, checkpoint=str(path))) == []


def test_export_reload_resnet18_through_timm_overlay(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_chans=1)
    path = export(model, tmp_path / "model.safetensors")
    fresh = timm.create_model("resnet18", pretrained=True, num_classes=10, in_chans=1,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    assert same_weights(model, fresh) == []


@pytest.mark.parametrize("name, num_classes", [("resnet18", 10), ("small_cnn", 5)])
def test_create_model_from_checkpoint_keeps_the_classifier(tmp_path, name, num_classes):
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, in_chans=1)
    path = export(model, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    assert same_weights(model, create_model(name, num_classes, 1, checkpoint=str(path))) == []


def test_small_cnn_default_cfg_matches_fashion_mnist():
    cfg = timm.create_model("small_cnn").pretrained_cfg
    assert cfg["input_size"] == (1, 28, 28) and cfg["num_classes"] == 10
    assert cfg["mean"] == (0.2860,) and cfg["std"] == (0.3530,)
    assert "small_cnn" in models.default_cfgs
