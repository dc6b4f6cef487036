"""backbones.py: shapes, strides and names; equal to torchvision's VGG16 / resnet_fpn_backbone with the same weights;
frozen layers really frozen; the pretrained paths ask torchvision's weights API (mocked: nothing is downloaded)."""

from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBatchNorm2d

from frcnn_tutorial import backbones
from frcnn_tutorial.backbones import (
    FrozenBatchNorm2d,
    resnet50_fpn_backbone,
    resnet50_fpn_from_torchvision,
    tiny_backbone,
    tiny_fpn_backbone,
    vgg16_backbone,
    vgg16_box_head,
)
from frcnn_tutorial.roi_heads import TwoMLPHead


@pytest.fixture(scope="module")
def tv_vgg16():
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).eval()


def randomise_frozen_bn(module, seed=0):
    """FrozenBatchNorm2d starts as an identity; give it real statistics so the comparison means something."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (TVFrozenBatchNorm2d, FrozenBatchNorm2d, nn.BatchNorm2d)):
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


# ----------------------------------------------------------------------------------------------------------- VGG16


def test_vgg16_backbone_is_torchvision_features_without_the_last_max_pool(tv_vgg16):
    ours = vgg16_backbone()
    convs = [m for m in ours.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13  # 13 conv layers (+ 3 fully connected in the classifier = VGG "16")
    assert isinstance(tv_vgg16.features[-1], nn.MaxPool2d)  # torchvision's features end with pool5 ...
    assert not isinstance(ours.features[-1], nn.MaxPool2d)  # ... which we drop: conv5_3 + ReLU is the last layer
    assert isinstance(ours.features[-1], nn.ReLU) and ours.out_channels == 512
    ours.load_state_dict({f"features.{k}": v for k, v in tv_vgg16.features[:-1].state_dict().items()}, strict=True)
    images = torch.rand(1, 3, 64, 96)
    out = ours(images)
    assert list(out) == ["0"] and out["0"].shape == (1, 512, 4, 6)  # stride 16
    with torch.no_grad():
        torch.testing.assert_close(out["0"], tv_vgg16.features[:-1](images), rtol=0, atol=0)


def test_vgg16_freezing_is_optional_and_stops_before_conv3_1():
    assert all(p.requires_grad for p in vgg16_backbone().parameters())  # random weights: nothing frozen
    frozen = vgg16_backbone(freeze_conv1_conv2=True)
    names = [n for n, p in frozen.named_parameters() if not p.requires_grad]
    # conv1_1, conv1_2, conv2_1, conv2_2 (weight + bias each); conv3_1 = features.10 is the first trainable one
    assert names == [f"features.{i}.{w}" for i in (0, 2, 5, 7) for w in ("weight", "bias")]
    assert frozen.features[10].weight.requires_grad


def test_vgg16_box_head_is_fc6_fc7_and_a_two_mlp_head(tv_vgg16):
    head = vgg16_box_head()
    assert head.fc6.weight.shape == (4096, 512 * 7 * 7) and head.fc7.weight.shape == (4096, 4096)
    head.fc6.load_state_dict(tv_vgg16.classifier[0].state_dict())
    head.fc7.load_state_dict(tv_vgg16.classifier[3].state_dict())
    pooled = torch.randn(3, 512, 7, 7)
    two_mlp = TwoMLPHead(512 * 7 * 7, 4096)
    two_mlp.load_state_dict(head.state_dict(), strict=True)  # same names: fc6.*, fc7.*
    with torch.no_grad():
        out = head.eval()(pooled)
        torch.testing.assert_close(out, tv_vgg16.classifier[:5](pooled.flatten(1)), rtol=0, atol=0)
        torch.testing.assert_close(out, two_mlp(pooled), rtol=0, atol=0)
        dropped = vgg16_box_head(dropout=0.5)
        dropped.load_state_dict(head.state_dict())
        assert torch.equal(dropped.eval()(pooled), out)  # dropout only acts in training
        assert not torch.equal(dropped.train()(pooled), out)


# ----------------------------------------------------------------------------------------------- ResNet-50 + FPN


def test_resnet50_fpn_loads_torchvision_state_dict_strictly_and_gives_the_same_features():
    torch.manual_seed(1)
    theirs = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
    randomise_frozen_bn(theirs)
    ours = resnet50_fpn_backbone()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    ours.load_state_dict(theirs.state_dict(), strict=True)
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        out, tv_out = ours(images), theirs(images)
    assert ours.out_channels == theirs.out_channels == 256
    assert {k: tuple(v.shape) for k, v in out.items()} == {  # P2..P5 at strides 4..32, P6 at 64
        "0": (2, 256, 16, 24), "1": (2, 256, 8, 12), "2": (2, 256, 4, 6), "3": (2, 256, 2, 3), "pool": (2, 256, 1, 2)}
    for name in tv_out:
        torch.testing.assert_close(out[name], tv_out[name], rtol=0, atol=0)
    body = ours.body(images)
    assert [v.shape[1] for v in body.values()] == [256, 512, 1024, 2048]  # C2..C5


@pytest.mark.parametrize("trainable_layers", [0, 1, 3, 5])
def test_frozen_layers_match_torchvision_and_really_do_not_train(trainable_layers):
    ours = resnet50_fpn_backbone(trainable_layers=trainable_layers)
    theirs = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=trainable_layers)
    flags = {n: p.requires_grad for n, p in ours.named_parameters()}
    assert flags == {n: p.requires_grad for n, p in theirs.named_parameters()}
    assert all(flags[n] for n in flags if n.startswith("fpn."))  # the FPN always trains
    assert flags["body.layer4.0.conv1.weight"] == (trainable_layers >= 1)
    assert flags["body.layer1.0.conv1.weight"] == (trainable_layers >= 4)
    assert flags["body.conv1.weight"] == (trainable_layers == 5)
    # frozen batch norms have no parameters at all: their statistics and affine terms are buffers
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ours.modules())
    assert "body.bn1.weight" not in flags and "body.bn1.weight" in ours.state_dict()


def test_trainable_layers_out_of_range():
    with pytest.raises(ValueError, match="0..5"):
        resnet50_fpn_backbone(trainable_layers=6)


def test_resnet50_fpn_from_torchvision_detector_backbone():
    # fasterrcnn_resnet50_fpn without weights uses plain (trainable) BatchNorm2d and trains every layer;
    # with COCO weights it uses FrozenBatchNorm2d with eps = 0. Both are copied, weights, flags, eps and mode.
    torch.manual_seed(2)
    detector = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    theirs = detector.backbone
    randomise_frozen_bn(theirs)
    ours = resnet50_fpn_from_torchvision(theirs)
    assert isinstance(ours.body.bn1, nn.BatchNorm2d) and ours.training
    images = torch.rand(2, 3, 64, 64)
    for mode in ("eval", "train"):
        getattr(ours, mode)(), getattr(theirs, mode)()
        with torch.no_grad():
            out, tv_out = ours(images), theirs(images)
        for name in tv_out:
            torch.testing.assert_close(out[name], tv_out[name], rtol=0, atol=0)

    frozen = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=2).eval()
    randomise_frozen_bn(frozen, seed=3)
    for m in frozen.modules():
        if isinstance(m, TVFrozenBatchNorm2d):
            m.eps = 0.0  # what torchvision's overwrite_eps does for the COCO weights
    ours = resnet50_fpn_from_torchvision(frozen)
    assert ours.body.layer1[0].bn1.eps == 0.0 and not ours.training
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {
        n: p.requires_grad for n, p in frozen.named_parameters()}
    with torch.no_grad():
        out, tv_out = ours(images), frozen(images)
    for name in tv_out:
        torch.testing.assert_close(out[name], tv_out[name], rtol=0, atol=0)


def test_frozen_batch_norm_matches_torchvision_and_loads_a_batch_norm_state_dict():
    bn = nn.BatchNorm2d(5)
    randomise_frozen_bn(bn, seed=4)
    ours, theirs = FrozenBatchNorm2d(5), TVFrozenBatchNorm2d(5)
    ours.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    theirs.load_state_dict(bn.state_dict())
    x = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    torch.testing.assert_close(ours(x), bn.eval()(x), rtol=1e-6, atol=1e-6)  # = BatchNorm in eval mode
    assert list(ours.parameters()) == []
    assert "eps=1e-05" in repr(ours)


def test_pretrained_uses_the_weights_api(monkeypatch):
    # Nothing is downloaded: torchvision's builders are replaced by ones that record what they were asked for.
    asked = []
    resnet50, vgg16 = torchvision.models.resnet50, torchvision.models.vgg16

    def fake_resnet50(weights=None, norm_layer=None):
        asked.append(weights)
        return resnet50(weights=None, norm_layer=norm_layer)

    def fake_vgg16(weights=None):
        asked.append(weights)
        return vgg16(weights=None)

    monkeypatch.setattr(backbones.torchvision.models, "resnet50", fake_resnet50)
    monkeypatch.setattr(backbones.torchvision.models, "vgg16", fake_vgg16)
    assert resnet50_fpn_backbone(pretrained=True) is not None
    vgg = vgg16_backbone(pretrained=True)
    assert asked == [torchvision.models.ResNet50_Weights.IMAGENET1K_V1, torchvision.models.VGG16_Weights.IMAGENET1K_V1]
    assert not vgg.features[0].weight.requires_grad and vgg.features[10].weight.requires_grad  # paper's freezing


# ------------------------------------------------------------------------------------------------------------ tiny


def test_tiny_backbones_shapes_strides_and_shared_trunk():
    images = torch.rand(2, 3, 128, 160)
    fpn = tiny_fpn_backbone()
    out = fpn(images)
    assert fpn.out_channels == 64
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "0": (2, 64, 32, 40), "1": (2, 64, 16, 20), "2": (2, 64, 8, 10), "3": (2, 64, 4, 5), "pool": (2, 64, 2, 3)}
    trunk = fpn.body(images)
    assert [tuple(v.shape[1:]) for v in trunk.values()] == [(16, 32, 40), (32, 16, 20), (64, 8, 10), (128, 4, 5)]

    single = tiny_backbone()
    out = single(images)
    assert single.out_channels == 64 and list(out) == ["0"] and out["0"].shape == (2, 64, 8, 10)  # stride 16
    # the same trunk: the single-scale one is the FPN one's first three stages, name for name
    single_params = {n: p.shape for n, p in single.body.named_parameters()}
    fpn_params = {n: p.shape for n, p in fpn.body.named_parameters()}
    assert single_params == {n: s for n, s in fpn_params.items() if not n.startswith("stages.3")}
    single.body.load_state_dict(fpn.body.state_dict(), strict=False)
    single.eval(), fpn.eval()
    with torch.no_grad():
        torch.testing.assert_close(single(images)["0"], fpn.body(images)["2"], rtol=0, atol=0)
    assert isinstance(tiny_fpn_backbone(out_channels=32)(images[:1]), OrderedDict)


def test_tiny_fpn_is_small_and_trains():
    torch.manual_seed(5)
    backbone = tiny_fpn_backbone()
    assert sum(p.numel() for p in backbone.parameters()) < 600_000
    images = torch.rand(2, 3, 96, 128)
    optimiser = torch.optim.SGD(backbone.parameters(), lr=0.05)
    losses = []
    for _ in range(5):  # fit the FPN outputs to zero: a smoke test that gradients reach every parameter
        loss = sum(v.pow(2).mean() for v in backbone(images).values())
        optimiser.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in backbone.parameters())
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
