"""anchors.py against torchvision's anchor_utils.AnchorGenerator (bit for bit), plus the 9 anchors by hand."""

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from frcnn_tutorial.anchors import AnchorGenerator, fpn_anchor_generator, vgg16_anchor_generator


def features_for(image_size, strides, channels=2, dtype=torch.float32):
    """Empty [1, C, ceil(H/s), ceil(W/s)] maps: only their sizes matter to anchors."""
    height, width = image_size
    return [torch.zeros(1, channels, -(-height // s), -(-width // s), dtype=dtype) for s in strides]


def torchvision_anchors(sizes, ratios, image_size, features, num_images=2):
    image_list = ImageList(torch.zeros(num_images, 3, *image_size), [tuple(image_size)] * num_images)
    return TVAnchorGenerator(sizes, ratios)(image_list, features)


SETUPS = {
    # name: (sizes, aspect_ratios, padded image (H, W), strides of the feature maps)
    "vgg16": (((128, 256, 512),), ((0.5, 1.0, 2.0),), (400, 608), [16]),
    "vgg16_odd_size": (((128, 256, 512),), ((0.5, 1.0, 2.0),), (333, 517), [16]),  # 21 x 33 map: stride 15
    "fpn": (((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5, (128, 160), [4, 8, 16, 32, 64]),
    # many levels with different numbers of anchors, sizes whose halves need rounding, extreme ratios
    "mixed": (((16, 50), (64,), (100, 256, 333)), ((0.5, 1.0), (1.0,), (0.25, 0.5, 1.0, 2.0, 4.0)),
              (96, 130), [8, 16, 32]),
}


@pytest.mark.parametrize("name", SETUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_anchors_match_torchvision_bit_for_bit(name, dtype):
    sizes, ratios, image_size, strides = SETUPS[name]
    features = features_for(image_size, strides, dtype=dtype)
    generator = AnchorGenerator(sizes, ratios)
    ours = generator(image_size, features)
    theirs = torchvision_anchors(sizes, ratios, image_size, features)
    assert len(theirs) == 2  # torchvision repeats the same set for every image; we return it once
    for per_image in theirs:
        torch.testing.assert_close(ours, per_image, rtol=0, atol=0)
    per_location = generator.num_anchors_per_location()
    expected_count = sum(f.shape[-2] * f.shape[-1] * a for f, a in zip(features, per_location, strict=True))
    assert ours.shape == (expected_count, 4) and ours.dtype == dtype
    tv_generator = TVAnchorGenerator(sizes, ratios)
    assert generator.num_anchors_per_location() == tv_generator.num_anchors_per_location()
    for ours_t, theirs_t in zip(generator.cell_anchors, tv_generator.cell_anchors, strict=True):
        torch.testing.assert_close(ours_t, theirs_t, rtol=0, atol=0)


def test_builders_match_torchvision_defaults():
    vgg = vgg16_anchor_generator()
    assert vgg.num_anchors_per_location() == [9]
    tv = TVAnchorGenerator()  # torchvision's default is the paper's single level
    torch.testing.assert_close(vgg.cell_anchors[0], tv.cell_anchors[0], rtol=0, atol=0)
    fpn = fpn_anchor_generator()
    assert fpn.num_anchors_per_location() == [3] * 5
    assert fpn.sizes == ((32,), (64,), (128,), (256,), (512,))
    # torchvision's fasterrcnn_resnet50_fpn builds its generator exactly like this
    tv_fpn = TVAnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    for ours_t, theirs_t in zip(fpn.cell_anchors, tv_fpn.cell_anchors, strict=True):
        torch.testing.assert_close(ours_t, theirs_t, rtol=0, atol=0)
    assert fpn_anchor_generator(sizes=(16, 32)).num_anchors_per_location() == [3, 3]
    two_per_level = fpn_anchor_generator(sizes=((16, 23), (32, 45)))  # several sizes on a level: 2 x 3 anchors
    assert two_per_level.num_anchors_per_location() == [6, 6]
    tv_two = TVAnchorGenerator(((16, 23), (32, 45)), ((0.5, 1.0, 2.0),) * 2)
    for ours_t, theirs_t in zip(two_per_level.cell_anchors, tv_two.cell_anchors, strict=True):
        torch.testing.assert_close(ours_t, theirs_t, rtol=0, atol=0)


def test_golden_nine_vgg16_anchors_at_one_location():
    # A 800 x 800 padded image and a 50 x 50 conv5_3 map: stride 800 // 50 = 16.
    anchors = vgg16_anchor_generator()((800, 800), [torch.zeros(1, 512, 50, 50)])
    assert anchors.shape == (50 * 50 * 9, 4)  # 9 anchors at each of the 2500 locations
    # location row 1, column 2 -> the 9 anchors of flat location 1 * 50 + 2 = 52, centred at x = 2 * 16 = 32,
    # y = 1 * 16 = 16 (the top-left corner of the cell, as torchvision).
    location = 1 * 50 + 2
    nine = anchors[location * 9:(location + 1) * 9]
    # A template of size s and ratio r = h / w has w = s / sqrt(r), h = s * sqrt(r); its corners are
    # (-w/2, -h/2, w/2, h/2), rounded to whole pixels. Ratios are the outer loop, sizes the inner one.
    # r = 0.5: sqrt(0.5) = 0.7071
    #   s=128: w = 181.02, h = 90.51 -> halves 90.51, 45.25 -> round -> 91, 45
    #   s=256: w = 362.04, h = 181.02 -> halves 181.02, 90.51 -> 181, 91
    #   s=512: w = 724.08, h = 362.04 -> halves 362.04, 181.02 -> 362, 181
    # r = 1: squares, halves 64, 128, 256 exactly
    # r = 2: the r = 0.5 boxes turned on their side (w and h swap)
    templates = torch.tensor([
        [-91, -45, 91, 45], [-181, -91, 181, 91], [-362, -181, 362, 181],  # wide (h/w = 0.5)
        [-64, -64, 64, 64], [-128, -128, 128, 128], [-256, -256, 256, 256],  # square
        [-45, -91, 45, 91], [-91, -181, 91, 181], [-181, -362, 181, 362],  # tall (h/w = 2)
    ], dtype=torch.float32)
    centre = torch.tensor([32.0, 16.0, 32.0, 16.0])  # shifts x1, y1, x2, y2
    torch.testing.assert_close(nine, templates + centre, rtol=0, atol=0)
    # e.g. the first: [32 - 91, 16 - 45, 32 + 91, 16 + 45] = [-59, -29, 123, 61]; anchors may leave the image
    assert nine[0].tolist() == [-59.0, -29.0, 123.0, 61.0]


def test_golden_fpn_templates_and_level_order():
    generator = fpn_anchor_generator(sizes=(32, 64))
    # size 32: r = 0.5 -> w = 45.25, h = 22.63 -> halves 22.63, 11.31 -> 23, 11; r = 1 -> 16; r = 2 swaps
    expected = torch.tensor([[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]], dtype=torch.float32)
    torch.testing.assert_close(generator.cell_anchors[0], expected, rtol=0, atol=0)
    # size 64 is NOT simply twice size 32, because of the rounding: r = 0.5 -> w = 90.51, h = 45.25 ->
    # halves 45.25, 22.63 -> 45, 23 (2 * 23 = 46 and 2 * 11 = 22 would be the doubled 32-templates)
    expected_64 = torch.tensor([[-45, -23, 45, 23], [-32, -32, 32, 32], [-23, -45, 23, 45]], dtype=torch.float32)
    torch.testing.assert_close(generator.cell_anchors[1], expected_64, rtol=0, atol=0)
    # a 16 x 16 image, maps 4 x 4 (stride 4) and 2 x 2 (stride 8): 4*4*3 = 48 anchors of level 0 first,
    # then 2*2*3 = 12 of level 1
    anchors = generator((16, 16), [torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)])
    assert anchors.shape == (60, 4)
    torch.testing.assert_close(anchors[:3], expected, rtol=0, atol=0)  # level 0, location (0, 0)
    torch.testing.assert_close(anchors[3:6], expected + torch.tensor([4, 0, 4, 0]), rtol=0, atol=0)  # (0, 1): x + 4
    torch.testing.assert_close(anchors[12:15], expected + torch.tensor([0, 4, 0, 4]), rtol=0, atol=0)  # (1, 0)
    torch.testing.assert_close(anchors[57:60], expected_64 + 8, rtol=0, atol=0)  # level 1, location (1, 1)


def test_anchors_follow_the_feature_device_and_errors_are_clear():
    generator = vgg16_anchor_generator()
    with pytest.raises(ValueError, match="2 feature maps but anchors for 1 levels"):
        generator((64, 64), [torch.zeros(1, 1, 4, 4)] * 2)
    with pytest.raises(ValueError, match="one tuple of sizes"):
        AnchorGenerator(((32,), (64,)), ((0.5, 1.0, 2.0),))
    assert generator((64, 64), [torch.zeros(1, 1, 4, 4, device="meta")]).device.type == "meta"
