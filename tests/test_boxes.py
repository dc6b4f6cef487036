"""boxes.py against torchvision.ops / detection._utils.BoxCoder on the same inputs, plus hand-made golden cases."""

import math

import pytest
import torch
import torchvision.ops as tvops
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

from frcnn_tutorial.boxes import (
    BoxCoder,
    batched_nms,
    box_area,
    box_convert,
    box_iou,
    clip_boxes_to_image,
    cxcywh_to_xyxy,
    nms,
    remove_small_boxes,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)


def random_boxes(n, size=100.0, max_wh=40.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * max_wh + 0.5
    return torch.cat([xy, xy + wh], dim=1)


def assert_identical(ours, theirs):
    """Bit-for-bit equal, same dtype and shape; NaN == NaN."""
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)


# a few awkward box sets used across the tests
EDGE_SETS = {
    "empty": torch.zeros((0, 4)),
    "one": torch.tensor([[10.0, 20.0, 30.0, 60.0]]),
    "borders": torch.tensor([[0.0, 0.0, 50.0, 50.0], [0.0, 0.0, 100.0, 80.0], [60.0, 30.0, 100.0, 80.0]]),
    "degenerate": torch.tensor([[5.0, 5.0, 5.0, 9.0], [5.0, 5.0, 9.0, 5.0], [3.0, 3.0, 3.0, 3.0], [0, 0, 10, 10.0]]),
    "random": random_boxes(37),
}


# ----------------------------------------------------------------------------- formats, area, IoU


@pytest.mark.parametrize("name", EDGE_SETS)
def test_area_and_iou_match_torchvision(name):
    boxes1 = EDGE_SETS[name]
    boxes2 = torch.cat([EDGE_SETS["degenerate"], random_boxes(11, seed=1)])
    assert_identical(box_area(boxes1), tvops.box_area(boxes1))
    assert_identical(box_iou(boxes1, boxes2), tvops.box_iou(boxes1, boxes2))
    assert_identical(box_iou(boxes2, boxes1), tvops.box_iou(boxes2, boxes1))


def test_iou_of_two_zero_area_boxes_is_nan_as_in_torchvision():
    point = torch.tensor([[3.0, 3.0, 3.0, 3.0]])
    assert torch.isnan(box_iou(point, point)).all() and torch.isnan(tvops.box_iou(point, point)).all()


def test_iou_golden_three_boxes():
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],  # A: area 100
        [5.0, 0.0, 15.0, 10.0],  # B: A shifted right by half its width, area 100
        [20.0, 20.0, 30.0, 40.0],  # C: far away, area 200
    ])
    # A,B overlap on x 5..10, y 0..10 -> intersection 50; union 100 + 100 - 50 = 150 -> 1/3.
    # C touches neither -> 0. Every box has IoU 1 with itself.
    expected = torch.tensor([
        [1.0, 1 / 3, 0.0],
        [1 / 3, 1.0, 0.0],
        [0.0, 0.0, 1.0],
    ])
    torch.testing.assert_close(box_iou(boxes, boxes), expected)
    assert box_iou(boxes, boxes[:0]).shape == (3, 0)


FORMATS = ("xyxy", "xywh", "cxcywh")


@pytest.mark.parametrize("in_fmt", FORMATS)
@pytest.mark.parametrize("out_fmt", FORMATS)
def test_box_convert_matches_torchvision(in_fmt, out_fmt):
    boxes = torch.cat([random_boxes(20), EDGE_SETS["degenerate"]]).reshape(2, 12, 4)  # leading dims work too
    assert_identical(box_convert(boxes, in_fmt, out_fmt), tvops.box_convert(boxes, in_fmt, out_fmt))


def test_box_convert_golden_and_helpers():
    xyxy = torch.tensor([[10.0, 20.0, 40.0, 80.0]])  # 30 wide, 60 tall, centred at (25, 50)
    torch.testing.assert_close(xyxy_to_xywh(xyxy), torch.tensor([[10.0, 20.0, 30.0, 60.0]]))
    torch.testing.assert_close(xyxy_to_cxcywh(xyxy), torch.tensor([[25.0, 50.0, 30.0, 60.0]]))
    torch.testing.assert_close(xywh_to_xyxy(xyxy_to_xywh(xyxy)), xyxy)
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(xyxy)), xyxy)
    with pytest.raises(ValueError, match="formats"):
        box_convert(xyxy, "xyxy", "yxyx")


# ----------------------------------------------------------------------------- box coder

WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (3.0, 0.7, 1 / 3, 2.5)]


@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_matches_torchvision(weights):
    anchors = torch.cat([random_boxes(50, seed=2), EDGE_SETS["borders"], EDGE_SETS["one"]])
    gt_boxes = random_boxes(len(anchors), seed=3)
    ours = BoxCoder(weights).encode(gt_boxes, anchors)
    assert_identical(ours, TVBoxCoder(weights).encode_single(gt_boxes, anchors))
    assert BoxCoder(weights).encode(gt_boxes[:0], anchors[:0]).shape == (0, 4)


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("num_classes", [1, 3])
def test_decode_matches_torchvision_and_keeps_the_delta_layout(weights, num_classes):
    anchors = torch.cat([random_boxes(40, seed=4), EDGE_SETS["borders"]])
    deltas = torch.randn(len(anchors), 4 * num_classes, generator=torch.Generator().manual_seed(5))
    deltas[0, 2], deltas[1, 3] = 50.0, 1e4  # far above the clamp: the clamp must bite
    ours = BoxCoder(weights).decode(deltas, anchors)
    assert ours.shape == (len(anchors), 4 * num_classes)
    assert_identical(ours, TVBoxCoder(weights).decode_single(deltas, anchors))
    assert torch.isfinite(ours).all()
    assert BoxCoder(weights).decode(deltas[:0], anchors[:0]).shape == (0, 4 * num_classes)


def test_decode_inverts_encode():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    anchors, gt_boxes = random_boxes(30, seed=6), random_boxes(30, seed=7)
    torch.testing.assert_close(coder.decode(coder.encode(gt_boxes, anchors), anchors), gt_boxes)


def test_coder_golden():
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), 10 wide, 20 tall
    gt_box = torch.tensor([[5.0, 0.0, 15.0, 40.0]])  # centre (10, 20), 10 wide, 40 tall
    # tx = (10 - 5) / 10 = 0.5; ty = (20 - 10) / 20 = 0.5; tw = log(10 / 10) = 0; th = log(40 / 20) = log 2
    torch.testing.assert_close(BoxCoder().encode(gt_box, anchor), torch.tensor([[0.5, 0.5, 0.0, math.log(2)]]))
    # the box head's weights (10, 10, 5, 5) just scale each delta
    torch.testing.assert_close(BoxCoder((10.0, 10.0, 5.0, 5.0)).encode(gt_box, anchor),
                               torch.tensor([[5.0, 5.0, 0.0, 5 * math.log(2)]]))
    # a huge tw is clamped to log(1000/16): the box becomes 62.5 anchor widths = 625 px wide, same centre
    box = BoxCoder().decode(torch.tensor([[0.0, 0.0, 100.0, 0.0]]), anchor)
    torch.testing.assert_close(box, torch.tensor([[5 - 312.5, 0.0, 5 + 312.5, 20.0]]))


# ----------------------------------------------------------------------------- NMS


def nms_inputs(n, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(n, size=60.0, max_wh=30.0, seed=seed)  # crowded: many overlaps
    scores = torch.randint(0, 4, (n,), generator=g).float() if ties else torch.rand(n, generator=g)
    return boxes, scores


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("ties", [False, True])
def test_nms_matches_torchvision(threshold, ties):
    boxes, scores = nms_inputs(300, seed=8, ties=ties)
    ours = nms(boxes, scores, threshold)
    assert ours.dtype == torch.int64
    assert_identical(ours, tvops.nms(boxes, scores, threshold))


@pytest.mark.parametrize("name", EDGE_SETS)
def test_nms_edge_cases_match_torchvision(name):
    boxes = EDGE_SETS[name]
    for scores in (torch.linspace(1, 0, len(boxes)), torch.ones(len(boxes))):  # distinct, then all tied
        assert_identical(nms(boxes, scores, 0.5), tvops.nms(boxes, scores, 0.5))
    duplicates = boxes.repeat(3, 1)  # exact copies: IoU 1 (or NaN for zero-area boxes, never suppressed)
    scores = torch.ones(len(duplicates))
    assert_identical(nms(duplicates, scores, 0.5), tvops.nms(duplicates, scores, 0.5))


def test_nms_threshold_is_compared_in_double_precision():
    # A = [0,5] x [0,1] (area 5), B = [2,10] x [0,1] (area 8): intersection 3, union 10, IoU float32(0.3),
    # which is 0.30000001192... > 0.3. torchvision's kernel compares it with the double 0.3 and suppresses B.
    boxes = torch.tensor([[0.0, 0.0, 5.0, 1.0], [2.0, 0.0, 10.0, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.3).tolist() == [0] == tvops.nms(boxes, scores, 0.3).tolist()


def test_nms_golden():
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],  # 0: score 0.6
        [1.0, 0.0, 11.0, 10.0],  # 1: score 0.9, IoU with box 0 = 90 / 110 = 0.82
        [5.0, 0.0, 15.0, 10.0],  # 2: score 0.7, IoU with box 1 = 60 / 140 = 0.43, with box 0 = 1/3
        [50.0, 50.0, 60.0, 60.0],  # 3: score 0.1, overlaps nothing
    ])
    scores = torch.tensor([0.6, 0.9, 0.7, 0.1])
    # best first: 1 is kept and removes 0 (0.82 > 0.5) but not 2 (0.43); 2 is kept; 3 is kept
    assert nms(boxes, scores, 0.5).tolist() == [1, 2, 3]
    # at threshold 0.4, box 1 also removes box 2
    assert nms(boxes, scores, 0.4).tolist() == [1, 3]


@pytest.mark.parametrize("n", [0, 1, 60, 999, 1001, 1500])  # torchvision loops per category above 1000 boxes
@pytest.mark.parametrize("ties", [False, True])
def test_batched_nms_matches_torchvision(n, ties):
    boxes, scores = nms_inputs(n, seed=9, ties=ties)
    boxes = (boxes * 8).round() / 8  # exact in float32 even after the offset: both strategies see the same IoUs
    idxs = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(10))
    for threshold in (0.3, 0.5, 0.7):
        assert_identical(batched_nms(boxes, scores, idxs, threshold), tvops.batched_nms(boxes, scores, idxs, threshold))


def test_batched_nms_random_floats_and_large_category_ids():
    boxes, scores = nms_inputs(400, seed=11)
    idxs = torch.randint(0, 1000, (400,), generator=torch.Generator().manual_seed(12)) * 7
    assert_identical(batched_nms(boxes, scores, idxs, 0.5), tvops.batched_nms(boxes, scores, idxs, 0.5))


def test_batched_nms_golden_categories_never_suppress_each_other():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)  # three copies of one box
    scores = torch.tensor([0.5, 0.9, 0.7])
    # categories 0, 1, 0: the copy in category 1 survives alone; in category 0, 0.7 (index 2) beats 0.5
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [1, 2]
    # the offset trick: largest coordinate 10, so category c moves by 11c; category 1 is now [11, 11, 21, 21]
    assert box_iou(boxes[:1], boxes[:1] + 11).item() == 0.0


# ----------------------------------------------------------------------------- clipping, small boxes


@pytest.mark.parametrize("name", EDGE_SETS)
def test_clip_and_remove_small_match_torchvision(name):
    boxes = EDGE_SETS[name] * 1.5 - 20  # pushes boxes across all four borders
    for size in [(60, 100), (100, 60)]:
        assert_identical(clip_boxes_to_image(boxes, size), tvops.clip_boxes_to_image(boxes, size))
    for min_size in (1e-3, 1.0, 25.0):
        assert_identical(remove_small_boxes(boxes, min_size), tvops.remove_small_boxes(boxes, min_size))
    batched = boxes.repeat(1, 3).reshape(1, -1, 12)  # [..., 4K] layouts work too
    assert_identical(clip_boxes_to_image(batched, (50, 70)), tvops.clip_boxes_to_image(batched, (50, 70)))


def test_clip_golden():
    boxes = torch.tensor([[-5.0, 10.0, 120.0, 90.0]])  # sticks out left, right and bottom of a 80 x 100 image
    # x in [0, width=100], y in [0, height=80]
    assert clip_boxes_to_image(boxes, (80, 100)).tolist() == [[0.0, 10.0, 100.0, 80.0]]
    tiny = torch.tensor([[0.0, 0.0, 0.5, 10.0], [0.0, 0.0, 1.0, 1.0]])  # 0.5 wide; exactly 1 x 1
    assert remove_small_boxes(tiny, 1.0).tolist() == [1]  # min_size is inclusive
