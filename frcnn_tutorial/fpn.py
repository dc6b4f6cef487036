"""Feature Pyramid Network (Lin et al., 2017): strong features at every scale from one backbone pass.

Shape shorthand: N images, C_l channels of backbone level l (C2..C5 for a ResNet, strides 4..32), D out_channels
(256), h_l x w_l the size of level l. Output P2..P5 (+ P6 "pool") all have D channels; P(k+1) has half the
resolution of P(k).

Bottom-up: the backbone's C2..C5 (fine but semantically weak -> coarse but strong). Top-down: start from C5,
upsample by nearest neighbour to the next finer size and ADD a 1x1 projection ("lateral") of that level's
C map; then a 3x3 conv on every sum removes the aliasing of the upsampling. P6 is P5 subsampled by 2 (a 1x1
max-pool with stride 2), used only by the RPN for the largest anchors (512).
Faster R-CNN (2015) had no FPN: it ran on VGG16's single conv5_3 map; FPN was added in 2017.

Same numbers and parameter names as torchvision.ops.FeaturePyramidNetwork(..., extra_blocks=LastLevelMaxPool()),
so its state_dict loads directly (inner_blocks.i.0.weight, layer_blocks.i.0.weight).
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn


class FeaturePyramidNetwork(nn.Module):
    """FeaturePyramidNetwork([C2, C3, C4, C5 channels], D): OrderedDict of C maps -> OrderedDict of P maps.

    inner_blocks[l]: the 1x1 lateral conv C_l -> D; layer_blocks[l]: the 3x3 output conv D -> D. Each conv sits in
    a one-element nn.Sequential only so that parameter names match torchvision's (which wraps them in a
    Conv2dNormActivation block).
    """

    def __init__(self, in_channels_list: list[int], out_channels: int, extra_max_pool: bool = True):
        super().__init__()
        self.out_channels = out_channels
        self.extra_max_pool = extra_max_pool
        self.inner_blocks, self.layer_blocks = nn.ModuleList(), nn.ModuleList()
        for in_channels in in_channels_list:  # created in torchvision's order, so one seed gives the same weights
            self.inner_blocks.append(nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1)))
            self.layer_blocks.append(nn.Sequential(nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # the FPN paper's (Detectron's) init: "Xavier-like", bias 0
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.constant_(module.bias, 0)

    def forward(self, features: dict[str, Tensor]) -> OrderedDict[str, Tensor]:
        """{name: [N, C_l, h_l, w_l]}, finest first -> {same names: [N, D, h_l, w_l]} (+ "pool": [N, D, h/2, w/2])."""
        names, maps = list(features.keys()), list(features.values())
        top_down = self.inner_blocks[-1](maps[-1])  # the coarsest level has nothing above it
        results = [self.layer_blocks[-1](top_down)]
        for level in range(len(maps) - 2, -1, -1):  # C4, C3, C2: from coarse to fine
            lateral = self.inner_blocks[level](maps[level])
            # upsample to the lateral's exact size (not "x2": odd sizes round differently)
            top_down = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.layer_blocks[level](top_down))
        if self.extra_max_pool:  # P6: subsample P5 (the output, not C5) by 2
            names.append("pool")
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return OrderedDict(zip(names, results, strict=True))
