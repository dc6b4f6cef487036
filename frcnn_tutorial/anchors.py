"""Anchors: a fixed grid of reference boxes, A of them at every location of every feature map.

Shape shorthand: N: images, C: channels, L: feature levels, h_l x w_l: size of level l,
A_l: anchors per location on level l (len(sizes[l]) * len(aspect_ratios[l])), H x W: padded batch size.

Anchors are deterministic: they depend only on the feature-map sizes and the image size, never on the
image content or the number of objects. The original Faster R-CNN (VGG16, one level at stride 16) uses
3 sizes (128, 256, 512) x 3 aspect ratios = 9 anchors per location; with an FPN each level gets one size
(32 on P2 ... 512 on P6) and the 3 ratios. Aspect ratio means h / w.

Same numbers and order as torchvision's anchor_utils.AnchorGenerator: levels one after the other; within a
level, locations row by row; within a location, ratios outer and sizes inner. A location (i, j) sits at
pixel (j * stride_w, i * stride_h): anchors are centred on the top-left corner of their cell, as torchvision.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def anchor_templates(sizes, aspect_ratios, dtype=torch.float32, device=None) -> Tensor:
    """[len(aspect_ratios) * len(sizes), 4] zero-centred boxes, rounded to whole pixels (as torchvision).

    A template of size s and ratio r has area s^2 and h / w = r: h = s * sqrt(r), w = s / sqrt(r).
    """
    sizes = torch.as_tensor(sizes, dtype=dtype, device=device)
    aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
    h_ratios = torch.sqrt(aspect_ratios)
    w_ratios = 1 / h_ratios
    widths = (w_ratios[:, None] * sizes[None, :]).reshape(-1)  # ratio-major, then size
    heights = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
    return (torch.stack([-widths, -heights, widths, heights], dim=1) / 2).round()


def grid_anchors(templates: Tensor, grid_size: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Place the [A, 4] templates at every location of an h x w grid -> [h * w * A, 4].

    Row-major locations, then anchors: the same order as a [N, A, h, w] head output permuted to [N, h, w, A].
    """
    (h, w), (stride_h, stride_w) = grid_size, stride
    shifts_x = torch.arange(w, dtype=torch.int32, device=templates.device) * stride_w  # exact integers
    shifts_y = torch.arange(h, dtype=torch.int32, device=templates.device) * stride_h
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")  # [h, w] each, row-major
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)  # [h*w, 4]: moves x1,y1,x2,y2
    return (shifts[:, None, :] + templates[None, :, :]).reshape(-1, 4)  # [h*w, A, 4] -> [h*w*A, 4]


class AnchorGenerator(nn.Module):
    """sizes / aspect_ratios: one tuple per feature level, e.g. ((128, 256, 512),) and ((0.5, 1.0, 2.0),)."""

    def __init__(self, sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),)):
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"one tuple of sizes and one of aspect ratios per level: got {len(sizes)} "
                             f"and {len(aspect_ratios)}")
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(tuple(r) for r in aspect_ratios)
        self.cell_anchors = [anchor_templates(s, r) for s, r in zip(self.sizes, self.aspect_ratios, strict=True)]

    def num_anchors_per_location(self) -> list[int]:
        """A_l for each level: what the RPN head's cls_logits must output per location."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios, strict=True)]

    def forward(self, image_size: tuple[int, int], feature_maps: list[Tensor]) -> Tensor:
        """(H, W) of the padded batch, [N, C, h_l, w_l] per level -> anchors [sum_l h_l * w_l * A_l, 4].

        One set for the whole batch: every image is padded to H x W, so every image has the same anchors.
        """
        if len(feature_maps) != len(self.cell_anchors):
            raise ValueError(f"{len(feature_maps)} feature maps but anchors for {len(self.cell_anchors)} levels")
        height, width = int(image_size[0]), int(image_size[1])
        anchors = []
        for templates, feature in zip(self.cell_anchors, feature_maps, strict=True):
            h, w = feature.shape[-2:]
            stride = (height // h, width // w)  # e.g. 800 // 50 = 16 for VGG16's conv5_3
            templates = templates.to(dtype=feature.dtype, device=feature.device)
            anchors.append(grid_anchors(templates, (h, w), stride))
        return torch.cat(anchors)


def vgg16_anchor_generator() -> AnchorGenerator:
    """The paper's set-up: one level (conv5_3, stride 16), 3 sizes x 3 ratios = 9 anchors per location."""
    return AnchorGenerator(sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))


def fpn_anchor_generator(sizes=(32, 64, 128, 256, 512)) -> AnchorGenerator:
    """FPN: one size per level (P2..P6 by default) and 3 ratios, so 3 anchors per location on each level.

    An entry may also be a tuple of sizes for its level: ((16, 23), (32, 45)) -> 2 x 3 = 6 anchors per location.
    """
    per_level = tuple(tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in sizes)
    return AnchorGenerator(sizes=per_level, aspect_ratios=((0.5, 1.0, 2.0),) * len(per_level))
