"""Backbones: an image batch in, named feature maps out. Every backbone returns OrderedDict[str, Tensor] and has an
int attribute out_channels (C, the channels of every map it returns).

Shape shorthand: N images, H x W the padded batch, C channels, s the stride: a map at stride s is [N, C, H/s, W/s]
(rounded up for odd sizes). R RoIs, P = 7 the pooled size.

- vgg16_backbone: the original Faster R-CNN (2015). VGG16 has 13 conv + 3 fully connected layers; the detector
  shares the 13 convs up to conv5_3 (+ ReLU) and drops the LAST max-pool, so conv5_3 has stride 16, not 32. (The
  `[:-1]` in `vgg16().features[:-1]` drops that max-pool, not a fully connected layer.) One map: {"0": [N, 512, H/16,
  W/16]}. vgg16_box_head: VGG16's fc6 and fc7 become the box head on 7 x 7 RoIPool outputs.
- resnet50_fpn_backbone: ResNet-50 C2..C5 (strides 4..32) + FPN -> {"0".."3": P2..P5, "pool": P6}, 256 channels each.
  Parameter names are torchvision's BackboneWithFPN's (body.*, fpn.*), so its state_dicts load with strict=True.
- tiny_backbone / tiny_fpn_backbone: a small conv-BN-ReLU trunk that trains on a 2-core CPU in minutes; the same
  trunk single-scale (stride 16) and with an FPN, so the notebooks can compare the two fairly.

pretrained=True downloads ImageNet weights through torchvision's weights API (weights=...Weights.IMAGENET1K_V1;
the old pretrained=True flag of torchvision is deprecated). Tests never do: they use pretrained=False.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from frcnn_tutorial.fpn import FeaturePyramidNetwork

# ---------------------------------------------------------------------------------------------------------------
# VGG16: the original paper
# ---------------------------------------------------------------------------------------------------------------

# VGG16 ("configuration D"): numbers are 3x3 conv widths, "M" a 2x2 max-pool. torchvision's features end with a
# fifth "M" after conv5_3; Faster R-CNN drops it. Indices in the Sequential match torchvision's, so weights load.
VGG16_CONV5_3 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def vgg16_conv_layers() -> nn.Sequential:
    """conv1_1 ... conv5_3, each followed by ReLU, with 4 max-pools: stride 2^4 = 16. torchvision's init."""
    layers, in_channels = [], 3
    for width in VGG16_CONV5_3:
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(conv.bias, 0)
            layers += [conv, nn.ReLU(inplace=True)]
            in_channels = width
    return nn.Sequential(*layers)


class VGG16Backbone(nn.Module):
    """[N, 3, H, W] -> {"0": conv5_3 features [N, 512, H/16, W/16]} (H/16 rounded down by each max-pool)."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features
        self.out_channels = 512

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict([("0", self.features(images))])


def _torchvision_vgg16():
    """VGG16 with ImageNet weights through the weights API (downloads once into torch's cache)."""
    return torchvision.models.vgg16(weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1)


def vgg16_backbone(pretrained: bool = False, freeze_conv1_conv2: bool | None = None) -> VGG16Backbone:
    """VGG16 conv1_1..conv5_3 (+ ReLU), last max-pool dropped: stride 16, out_channels 512.

    freeze_conv1_conv2: the paper fine-tunes conv3_1 and up only (the first 4 convs hold generic edges and
    colours, and freezing them saves memory). Default: frozen when pretrained - freezing random weights makes no
    sense.
    """
    features = vgg16_conv_layers()
    if pretrained:
        features.load_state_dict(_torchvision_vgg16().features[:-1].state_dict())
    if freeze_conv1_conv2 if freeze_conv1_conv2 is not None else pretrained:
        for parameter in features[:10].parameters():  # conv1_1, conv1_2, pool1, conv2_1, conv2_2 (+ ReLUs)
            parameter.requires_grad_(False)
    return VGG16Backbone(features)


class VGG16BoxHead(nn.Module):
    """VGG16's fc6 and fc7 as the box head: pooled [R, 512, 7, 7] -> [R, 4096]. A drop-in for TwoMLPHead.

    VGG16 was trained on 224 x 224 images whose conv5_3 + pool5 is 7 x 7 x 512; RoIPool 7 x 7 on conv5_3 makes
    the same shape, which is why fc6's ImageNet weights can be reused. dropout: VGG (and the paper's Caffe model)
    use 0.5 after fc6 and fc7 in training; 0 (off) by default here, as torchvision's TwoMLPHead.
    """

    def __init__(self, fc6: nn.Linear, fc7: nn.Linear, dropout: float = 0.0):
        super().__init__()
        self.fc6, self.fc7 = fc6, fc7
        self.dropout = dropout
        self.representation_size = fc7.out_features

    def forward(self, x: Tensor) -> Tensor:
        x = F.dropout(F.relu(self.fc6(x.flatten(start_dim=1))), self.dropout, self.training)
        return F.dropout(F.relu(self.fc7(x)), self.dropout, self.training)


def vgg16_box_head(pretrained: bool = False, dropout: float = 0.0) -> VGG16BoxHead:
    """fc6 (512*7*7 -> 4096) and fc7 (4096 -> 4096), ImageNet weights when pretrained, else VGG's init."""
    if pretrained:
        classifier = _torchvision_vgg16().classifier  # Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear
        return VGG16BoxHead(classifier[0], classifier[3], dropout)
    fc6, fc7 = nn.Linear(512 * 7 * 7, 4096), nn.Linear(4096, 4096)
    for fc in (fc6, fc7):
        nn.init.normal_(fc.weight, 0, 0.01)
        nn.init.constant_(fc.bias, 0)
    return VGG16BoxHead(fc6, fc7, dropout)


# ---------------------------------------------------------------------------------------------------------------
# ResNet-50 + FPN: torchvision's layout
# ---------------------------------------------------------------------------------------------------------------


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters: y = (x - mean) / sqrt(var + eps) * weight + bias.

    Detection trains with 1-2 large images per GPU: too few to estimate batch statistics, so the ImageNet ones are
    kept as they are. All four are buffers, not parameters: no optimiser can change them. As torchvision's.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm2d state_dict loads too
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift  # one multiply-add, written as torchvision so the floats agree

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class ResNetBody(nn.Module):
    """A torchvision ResNet without its avgpool and fc: [N, 3, H, W] -> {"0": C2, "1": C3, "2": C4, "3": C5}.

    C2..C5 are layer1..layer4's outputs at strides 4, 8, 16, 32 (256, 512, 1024, 2048 channels for ResNet-50).
    Attribute names as torchvision's IntermediateLayerGetter, so parameter names match (body.layer1.0.conv1...).
    """

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))  # stride 4
        out = OrderedDict()
        for i, layer in enumerate([self.layer1, self.layer2, self.layer3, self.layer4]):
            x = layer(x)
            out[str(i)] = x
        return out


class BackboneWithFPN(nn.Module):
    """body (returns {"0": C2, ...}) + FPN: [N, 3, H, W] -> {"0".."3": P2..P5, "pool": P6}, out_channels each."""

    def __init__(self, body: nn.Module, in_channels_list: list[int], out_channels: int):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels_list, out_channels)
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(images))


RESNET_LAYERS_FROM_TOP = ["layer4", "layer3", "layer2", "layer1", "conv1"]


def freeze_resnet_layers(resnet: nn.Module, trainable_layers: int) -> None:
    """Train only the last `trainable_layers` of [conv1, layer1, ..., layer4]; 5 also trains the stem's bn1.

    Early layers hold generic features that ImageNet already taught well; freezing them saves memory and time.
    torchvision's rule, by parameter-name prefix.
    """
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in 0..5, got {trainable_layers}")
    train = RESNET_LAYERS_FROM_TOP[:trainable_layers] + (["bn1"] if trainable_layers == 5 else [])
    for name, parameter in resnet.named_parameters():
        if not any(name.startswith(prefix) for prefix in train):
            parameter.requires_grad_(False)


def resnet50_fpn_backbone(pretrained: bool = False, trainable_layers: int = 3,
                          norm_layer=FrozenBatchNorm2d) -> BackboneWithFPN:
    """ResNet-50 C2..C5 + FPN (256 channels): torchvision's resnet_fpn_backbone("resnet50"), same names and numbers.

    With FrozenBatchNorm2d and pretrained=False the batch norms are identities: fine for tests and for loading
    weights. To train from scratch use norm_layer=nn.BatchNorm2d, trainable_layers=5 (what torchvision's
    fasterrcnn_resnet50_fpn builds when given no weights).
    """
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1 if pretrained else None
    resnet = torchvision.models.resnet50(weights=weights, norm_layer=norm_layer)
    freeze_resnet_layers(resnet, trainable_layers)
    return BackboneWithFPN(ResNetBody(resnet), [256, 512, 1024, 2048], 256)


def resnet50_fpn_from_torchvision(tv_backbone: nn.Module) -> BackboneWithFPN:
    """Our copy of a torchvision BackboneWithFPN over ResNet-50 (e.g. fasterrcnn_resnet50_fpn(...).backbone):
    same weights, batch-norm kind and eps (COCO weights use eps 0), trainable flags and train/eval mode."""
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
    from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBatchNorm2d

    norm_kinds = {TVFrozenBatchNorm2d: FrozenBatchNorm2d, nn.BatchNorm2d: nn.BatchNorm2d}
    fpn = tv_backbone.fpn
    if (type(tv_backbone.body.bn1) not in norm_kinds or not isinstance(fpn.extra_blocks, LastLevelMaxPool)
            or len(fpn.inner_blocks[0]) != 1 or tv_backbone.body.return_layers != {
                "layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}):
        raise NotImplementedError("only ResNet-50 C2..C5 + FPN (no norm) + max-pool P6, as fasterrcnn_resnet50_fpn")
    ours = resnet50_fpn_backbone(False, trainable_layers=5, norm_layer=norm_kinds[type(tv_backbone.body.bn1)])
    ours.load_state_dict(tv_backbone.state_dict(), strict=True)  # a ResNet-101 body fails here, loudly
    tv_modules = dict(tv_backbone.named_modules())
    for name, module in ours.named_modules():
        if hasattr(module, "eps"):
            module.eps = tv_modules[name].eps
    tv_parameters = dict(tv_backbone.named_parameters())
    for name, parameter in ours.named_parameters():
        parameter.requires_grad_(tv_parameters[name].requires_grad)
    return ours.train(tv_backbone.training)


# ---------------------------------------------------------------------------------------------------------------
# Tiny backbones for the CPU
# ---------------------------------------------------------------------------------------------------------------

TINY_CHANNELS = (16, 32, 64, 128)


def conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 conv (no bias: the BN adds one) + BatchNorm + ReLU."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class TinyTrunk(nn.Module):
    """A small CNN: stage i has two conv-BN-ReLU, the first strided. Strides 4, 8, 16, 32; channels 16..128.

    [N, 3, H, W] -> {"0": C2 [N, 16, H/4, W/4], "1": C3, "2": C4, "3": C5 [N, 128, H/32, W/32]} (the first
    num_stages of them). Stage 0 starts with two stride-2 convs so the finest map is already at stride 4.
    """

    def __init__(self, num_stages: int = 4, channels=TINY_CHANNELS):
        super().__init__()
        stages, in_channels = [], 3
        for i, width in enumerate(channels[:num_stages]):
            first = conv_bn_relu(in_channels, width, stride=2)
            stages.append(nn.Sequential(first, conv_bn_relu(width, width, stride=2 if i == 0 else 1)))
            in_channels = width
        self.stages = nn.ModuleList(stages)
        self.channels = tuple(channels[:num_stages])

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        out, x = OrderedDict(), images
        for i, stage in enumerate(self.stages):
            x = stage(x)
            out[str(i)] = x
        return out


class SingleScaleBackbone(nn.Module):
    """Keep only the last map of a trunk: [N, 3, H, W] -> {"0": [N, C, H/s, W/s]}, like VGG16's conv5_3."""

    def __init__(self, body: nn.Module, out_channels: int):
        super().__init__()
        self.body = body
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict([("0", list(self.body(images).values())[-1])])


def tiny_backbone() -> SingleScaleBackbone:
    """The tiny trunk's first 3 stages: one map at stride 16 with 64 channels (the paper's set-up, in small)."""
    return SingleScaleBackbone(TinyTrunk(num_stages=3), out_channels=TINY_CHANNELS[2])


def tiny_fpn_backbone(out_channels: int = 64, p2_output_conv: bool = True) -> BackboneWithFPN:
    """The tiny trunk's 4 stages + FPN: {"0".."3": P2..P5 at strides 4..32, "pool": P6 at 64}, out_channels each.

    p2_output_conv=False: P2 is the sum of its lateral and the upsampled top-down map, without the 3x3 output conv
    (the pyramid's costliest conv: D x D x 9 at stride 4, more work than all four 3x3 convs of the RPN on P3..P6).
    """
    backbone = BackboneWithFPN(TinyTrunk(num_stages=4), list(TINY_CHANNELS), out_channels)
    if not p2_output_conv:  # an Identity in the same one-element Sequential: the other levels keep their indices
        backbone.fpn.layer_blocks[0] = nn.Sequential(nn.Identity())
    return backbone
