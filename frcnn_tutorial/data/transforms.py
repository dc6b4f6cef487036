"""Transforms that move the boxes with the image: each maps (image, target) -> (image, target).

Shape shorthand: G ground-truth boxes, H, W the image's height and width before, H', W' after.
image: [3,H,W] float32 in 0..1; target["boxes"]: [G,4] x1,y1,x2,y2 in pixels of that image.
A transform never changes its input target: it returns a new dict (the dataset may keep the old one).
Randomness comes from torch's global generator, so seeding torch (or the engine's per-sample seed)
makes every flip and jitter repeat.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class Compose:
    """Apply transforms one after the other."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class ToTensor:
    """PIL image, uint8 array [H,W,3] or uint8 tensor [3,H,W] -> float32 [3,H,W] in 0..1 (float tensors pass)."""

    def __call__(self, image, target):
        if isinstance(image, torch.Tensor):
            return (image.float() / 255 if image.dtype == torch.uint8 else image), target
        array = np.array(image.convert("RGB") if hasattr(image, "convert") else image)
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255), target

    def __repr__(self) -> str:
        return "ToTensor()"


def hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Mirror x: a box [x1, x2] becomes [W - x2, W - x1] (continuous coordinates, so no -1)."""
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


class RandomHorizontalFlip:
    """Flip image and boxes left-right with probability p."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target):
        if torch.rand(1).item() >= self.p:
            return image, target
        target = dict(target, boxes=hflip_boxes(target["boxes"], image.shape[-1]))
        return image.flip(-1), target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def resized_hw(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Shorter side -> min_size unless that makes the longer side exceed max_size; aspect ratio kept."""
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return max(round(h * scale), 1), max(round(w * scale), 1)


class ResizeKeepAspect:
    """Resize to resized_hw(...) (bilinear); boxes scale by W'/W in x and H'/H in y, exactly."""

    def __init__(self, min_size: int = 600, max_size: int = 1000):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target):
        h, w = image.shape[-2:]
        new_h, new_w = resized_hw(h, w, self.min_size, self.max_size)
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        # Per-axis ratios of the integer sizes (not the float scale), so a box edge on the border stays there.
        ratios = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h], dtype=torch.float32)
        return image, dict(target, boxes=target["boxes"] * ratios)

    def __repr__(self) -> str:
        return f"ResizeKeepAspect(min_size={self.min_size}, max_size={self.max_size})"


def _grey(image: torch.Tensor) -> torch.Tensor:
    """Luma [1,H,W] with torchvision's weights (0.2989, 0.587, 0.114)."""
    return (0.2989 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]


def adjust_colours(image: torch.Tensor, brightness: float, contrast: float, saturation: float) -> torch.Tensor:
    """Scale brightness, then blend with the mean grey (contrast), then with the grey image (saturation).

    A factor of 1 leaves the image alone; clamped to 0..1 after each step, as torchvision does.
    """
    image = (image * brightness).clamp(0, 1)
    image = (contrast * image + (1 - contrast) * _grey(image).mean()).clamp(0, 1)
    return (saturation * image + (1 - saturation) * _grey(image)).clamp(0, 1)


class PhotometricJitter:
    """Random brightness, contrast and saturation (each factor uniform in [1-x, 1+x]); boxes unchanged.

    Fixed order (brightness, contrast, saturation), unlike torchvision's ColorJitter which shuffles it:
    fewer random draws to explain, and no measurable difference for detection.
    """

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2):
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation

    def __call__(self, image, target):
        spreads = (self.brightness, self.contrast, self.saturation)
        factors = [1 + x * (2 * torch.rand(1).item() - 1) for x in spreads]
        return adjust_colours(image, *factors), target

    def __repr__(self) -> str:
        return (f"PhotometricJitter(brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation})")


ColorJitter = PhotometricJitter  # the contract's name for it
