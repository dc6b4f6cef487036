"""Box-aware transforms (against torchvision.transforms.v2 on the same inputs, and golden cases) and batching."""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as F2
from PIL import Image
from torch.utils.data import ConcatDataset, SequentialSampler, Subset
from torchvision import tv_tensors

from frcnn_tutorial.data import (
    ColorJitter,
    Compose,
    GroupedBatchSampler,
    PhotometricJitter,
    RandomHorizontalFlip,
    ResizeKeepAspect,
    ToTensor,
    collate_fn,
    compute_aspect_ratios,
    create_aspect_ratio_groups,
)
from frcnn_tutorial.data.batching import quantize
from frcnn_tutorial.data.transforms import adjust_colours, resized_hw


def sample(h=20, w=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, h, w, generator=g)
    boxes = torch.tensor([[0.0, 0.0, w, h], [1.0, 2.0, 4.0, 5.0], [w - 3.0, 7.5, w, 9.0]])
    return image, {"boxes": boxes, "labels": torch.tensor([1, 2, 3]), "image_id": torch.tensor(7)}


def tv_boxes(boxes, h, w):
    return tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))


# ----------------------------------------------------------------------------- flip


def test_flip_golden_and_image_mirrored():
    image, target = sample()
    out_image, out = RandomHorizontalFlip(p=1.0)(image, target)
    # W = 30: [1, 2, 4, 5] -> [30-4, 2, 30-1, 5]; the whole-image box stays the whole image
    assert torch.equal(out["boxes"][1], torch.tensor([26.0, 2.0, 29.0, 5.0]))
    assert torch.equal(out["boxes"][0], torch.tensor([0.0, 0.0, 30.0, 20.0]))
    assert torch.equal(out_image[:, :, 0], image[:, :, -1])
    assert torch.equal(out["labels"], target["labels"]) and int(out["image_id"]) == 7


def test_flip_matches_torchvision_v2():
    image, target = sample(h=17, w=23, seed=3)
    out_image, out = RandomHorizontalFlip(p=1.0)(image, target)
    assert torch.equal(out_image, F2.horizontal_flip(image))
    assert torch.equal(out["boxes"], F2.horizontal_flip(tv_boxes(target["boxes"], 17, 23)).as_subclass(torch.Tensor))


def test_flip_twice_is_identity_and_input_untouched():
    image, target = sample()
    kept = target["boxes"].clone()
    flip = RandomHorizontalFlip(p=1.0)
    back_image, back = flip(*flip(image, target))
    assert torch.equal(back_image, image) and torch.equal(back["boxes"], target["boxes"])
    assert torch.equal(target["boxes"], kept)  # the caller's target is never modified


def test_flip_probability():
    image, target = sample()
    assert RandomHorizontalFlip(p=0.0)(image, target)[1] is target
    torch.manual_seed(0)
    flips = sum(not torch.equal(RandomHorizontalFlip(0.5)(image, target)[0], image) for _ in range(400))
    assert 160 < flips < 240  # binomial(400, 0.5): mean 200, sd 10


def test_flip_of_empty_boxes():
    image, target = sample()
    target["boxes"] = torch.zeros(0, 4)
    assert RandomHorizontalFlip(1.0)(image, target)[1]["boxes"].shape == (0, 4)


# ----------------------------------------------------------------------------- resize


@pytest.mark.parametrize(("hw", "sizes", "expected"), [
    ((100, 200), (50, 1000), (50, 100)),  # shorter side 100 -> 50: scale 1/2
    ((100, 400), (100, 200), (50, 200)),  # shorter side would give 400 wide > 200: capped, scale 1/2
    ((20, 30), (40, 1000), (40, 60)),  # upscaling by 2
    ((333, 500), (600, 1000), (600, 901)),  # 500 * 600/333 = 900.9 -> 901
])
def test_resized_hw_golden(hw, sizes, expected):
    assert resized_hw(*hw, *sizes) == expected


def test_resize_scales_boxes_exactly_and_matches_torchvision_v2():
    image, target = sample(h=20, w=30)
    out_image, out = ResizeKeepAspect(min_size=40, max_size=1000)(image, target)
    assert out_image.shape == (3, 40, 60)
    # every coordinate doubles: [1, 2, 4, 5] -> [2, 4, 8, 10]
    assert torch.equal(out["boxes"], target["boxes"] * 2)
    theirs = F2.resize(image, [40, 60], antialias=False)
    assert torch.allclose(out_image, theirs, atol=1e-6)
    theirs_boxes = F2.resize(tv_boxes(target["boxes"], 20, 30), [40, 60]).as_subclass(torch.Tensor)
    assert torch.allclose(out["boxes"], theirs_boxes, atol=1e-5)


def test_resize_uses_per_axis_ratios_of_the_integer_sizes():
    image, target = sample(h=333, w=500)
    out_image, out = ResizeKeepAspect(600, 1000)(image, target)
    assert out_image.shape[-2:] == (600, 901)
    assert torch.allclose(out["boxes"][0], torch.tensor([0.0, 0.0, 901.0, 600.0]))  # the border stays the border


# ----------------------------------------------------------------------------- colours


def test_adjust_colours_matches_torchvision_functional():
    image, _ = sample(seed=5)
    for b, c, s in [(1.2, 0.8, 1.1), (0.7, 1.3, 0.6), (1.0, 1.0, 1.0)]:
        theirs = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(image, b), c), s)
        assert torch.allclose(adjust_colours(image, b, c, s), theirs, atol=1e-6)


def test_photometric_jitter_keeps_boxes_and_range():
    image, target = sample()
    torch.manual_seed(1)
    out_image, out = PhotometricJitter(0.4, 0.4, 0.4)(image, target)
    assert out["boxes"] is target["boxes"] and out_image.shape == image.shape
    assert 0 <= out_image.min() and out_image.max() <= 1 and not torch.equal(out_image, image)
    assert torch.equal(PhotometricJitter(0, 0, 0)(image, target)[0], image)  # zero spread: factors are 1
    assert ColorJitter is PhotometricJitter


# ----------------------------------------------------------------------------- ToTensor and Compose


def test_to_tensor_from_pil_array_and_uint8():
    array = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    target = {"boxes": torch.zeros(0, 4)}
    for source in (Image.fromarray(array), array, torch.from_numpy(array).permute(2, 0, 1)):
        image, _ = ToTensor()(source, target)
        assert image.shape == (3, 2, 3) and image.dtype == torch.float32
        assert torch.allclose(image, torch.from_numpy(array).permute(2, 0, 1).float() / 255)


def test_compose_applies_in_order():
    image, target = sample(h=20, w=30)
    flip_then_resize = Compose([RandomHorizontalFlip(1.0), ResizeKeepAspect(40, 1000)])
    _, out = flip_then_resize(image, target)
    # flip [1,2,4,5] in W=30 -> [26,2,29,5], then x2 -> [52,4,58,10]
    assert torch.equal(out["boxes"][1], torch.tensor([52.0, 4.0, 58.0, 10.0]))
    assert "RandomHorizontalFlip(p=1.0)" in repr(flip_then_resize)


# ----------------------------------------------------------------------------- batching


def test_collate_keeps_images_of_different_sizes_apart():
    batch = [sample(h=10, w=20), sample(h=12, w=8)]
    images, targets = collate_fn(batch)
    assert isinstance(images, tuple) and [im.shape[-2:] for im in images] == [(10, 20), (12, 8)]
    assert targets[1] is batch[1][1]


class Sized(torch.utils.data.Dataset):
    """A dataset that knows its sizes without decoding (as VOCDetection does from the XML)."""

    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def get_height_and_width(self, i):
        return self.sizes[i]

    def __getitem__(self, i):
        raise AssertionError("grouping must not load images")


def test_aspect_ratio_groups_are_h_over_w_in_log_bins():
    # k=1: bins at 1/2, 1, 2 (2 ** linspace(-1, 1, 3)); bisect_right puts a ratio equal to a bin edge above it
    sizes = [(100, 300), (100, 200), (100, 150), (100, 100), (150, 100), (200, 100), (300, 100)]
    ratios = [1 / 3, 1 / 2, 2 / 3, 1, 3 / 2, 2, 3]
    assert compute_aspect_ratios(Sized(sizes)) == pytest.approx(ratios)
    assert create_aspect_ratio_groups(Sized(sizes), k=1) == [0, 1, 1, 2, 2, 3, 3]
    assert create_aspect_ratio_groups(Sized(sizes), k=0) == [0, 0, 0, 1, 1, 1, 1]  # one edge at 1
    assert quantize([0.1, 5.0], [2.0, 0.5]) == [0, 2]  # bins sorted first


def test_aspect_ratios_through_concat_and_subset():
    a, b = Sized([(10, 20)]), Sized([(30, 10), (10, 10)])
    assert compute_aspect_ratios(ConcatDataset([a, b])) == pytest.approx([0.5, 3.0, 1.0])
    assert compute_aspect_ratios(Subset(b, [1, 0])) == pytest.approx([1.0, 3.0])


def test_grouped_batch_sampler_golden():
    # groups 0 1 0 1 0 0 1, batch 2, sequential: batches fill per group in arrival order:
    # 0,2 (group 0 full at index 2); 1,3 (group 1 at 3); 4,5 (group 0); then 6 waits alone in group 1.
    # len = 7 // 2 = 3 batches, already reached: index 6 is dropped, like drop_last.
    groups = [0, 1, 0, 1, 0, 0, 1]
    batches = list(GroupedBatchSampler(SequentialSampler(range(7)), groups, 2))
    assert batches == [[0, 2], [1, 3], [4, 5]]


def test_grouped_batch_sampler_tops_up_leftovers_from_their_own_group():
    # groups 0 0 0 1 1 1, batch 4 -> len 6 // 4 = 1, but no group ever fills: the fullest leftover
    # buffer (group 0: [0,1,2], first in insertion order on a tie) is topped up with its own first index.
    batches = list(GroupedBatchSampler(SequentialSampler(range(6)), [0, 0, 0, 1, 1, 1], 4))
    assert batches == [[0, 1, 2, 0]]


def test_grouped_batch_sampler_random_order_properties():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 3, 103).tolist()
    sampler = torch.utils.data.RandomSampler(range(103), generator=torch.Generator().manual_seed(0))
    batches = list(GroupedBatchSampler(sampler, groups, 4))
    assert len(batches) == 103 // 4 == len(GroupedBatchSampler(sampler, groups, 4))
    assert all(len(b) == 4 and len({groups[i] for i in b}) == 1 for b in batches)
    assert len({i for b in batches for i in b}) >= 103 - 3 * 3  # at most 3 left over per group


def test_grouped_batch_sampler_needs_a_sampler():
    with pytest.raises(ValueError, match="Sampler"):
        GroupedBatchSampler([0, 1, 2], [0, 0, 0], 2)
