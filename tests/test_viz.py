"""The explorers' pure functions in viz: the numbers they draw, checked against torchvision, this package's own
modules and hand-computed cases; extreme inputs draw a figure instead of raising."""

import math

import matplotlib.pyplot as plt
import pytest
import torch
import torchvision
from matplotlib.figure import Figure
from torchvision.models.detection._utils import Matcher as TorchvisionMatcher

from frcnn_tutorial import viz
from frcnn_tutorial.anchors import AnchorGenerator
from frcnn_tutorial.boxes import box_iou
from frcnn_tutorial.data import EMBEDDED_CLASSES, embedded_dataset
from frcnn_tutorial.model import faster_rcnn_tiny_fpn


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def random_boxes(n, seed, size=200.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


# ----------------------------------------------------------------------------- IoU


def test_iou_of_the_default_boxes_by_hand():
    # A = (20,20)-(120,100): 100 x 80 = 8000; B = (60,50)-(170,150): 110 x 100 = 11000.
    # Intersection (60,50)-(120,100): 60 x 50 = 3000; union 8000 + 11000 - 3000 = 16000; IoU 3000/16000 = 0.1875.
    fig, info = viz.iou_figure((20, 20, 120, 100), (60, 50, 170, 150))
    assert isinstance(fig, Figure)
    assert (info["area_a"], info["area_b"], info["intersection"], info["union"]) == (8000, 11000, 3000, 16000)
    assert info["iou"] == 0.1875
    assert info["intersection_box"] == (60, 50, 120, 100)
    assert len(fig.axes[0].patches) == 3  # A, B and the intersection
    assert "0.188" in fig.axes[0].get_title()


def test_iou_equals_box_iou_and_torchvision_on_random_pairs():
    a, b = random_boxes(40, 0), random_boxes(40, 1)
    ours = torch.tensor([viz.box_overlap(x, y)["iou"] for x, y in zip(a, b, strict=True)], dtype=torch.float32)
    torch.testing.assert_close(ours, box_iou(a, b).diagonal(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, torchvision.ops.box_iou(a, b).diagonal(), rtol=1e-5, atol=1e-6)
    assert (ours > 0).any() and (ours == 0).any()  # both overlapping and disjoint pairs were tested


@pytest.mark.parametrize("box_a, box_b, iou, union", [
    ((10, 10, 50, 50), (10, 10, 50, 50), 1.0, 1600),  # identical
    ((0, 0, 100, 100), (25, 25, 75, 75), 0.25, 10000),  # B inside A: 2500 / 10000
    ((0, 0, 10, 10), (10, 0, 20, 10), 0.0, 200),  # touching edges share no area
    ((30, 30, 30, 80), (0, 0, 100, 100), 0.0, 10000),  # zero-width box
    ((5, 5, 5, 5), (5, 5, 5, 5), 0.0, 0),  # two points: empty union, IoU defined as 0
    ((50, 50, 10, 10), (0, 0, 100, 100), 0.0, 10000),  # x2 < x1: an empty box, not a negative area
])
def test_iou_extremes_draw_and_give_sensible_numbers(box_a, box_b, iou, union):
    fig, info = viz.iou_figure(box_a, box_b)
    assert info["iou"] == pytest.approx(iou) and info["union"] == pytest.approx(union)
    assert 0.0 <= info["iou"] <= 1.0
    assert len(fig.axes[0].patches) == 2 + (info["intersection"] > 0)


def test_iou_figure_shows_boxes_outside_the_canvas():
    fig, _ = viz.iou_figure((-40, 10, 20, 60), (200, 200, 400, 300), canvas=(256, 256))
    x_lo, x_hi = fig.axes[0].get_xlim()
    y_hi, y_lo = fig.axes[0].get_ylim()  # y points down
    assert x_lo < -40 and x_hi > 400 and y_hi > 300 and y_lo < 0


# ----------------------------------------------------------------------------- NMS


def test_nms_cloud_is_reproducible_and_valid():
    boxes, scores = viz.nms_cloud(seed=3, n=25)
    again, again_scores = viz.nms_cloud(seed=3, n=25)
    other, _ = viz.nms_cloud(seed=4, n=25)
    assert boxes.shape == (25, 4) and scores.shape == (25,)
    assert torch.equal(boxes, again) and torch.equal(scores, again_scores) and not torch.equal(boxes, other)
    assert (boxes[:, 2:] > boxes[:, :2]).all() and ((scores > 0) & (scores <= 1)).all()
    assert viz.nms_cloud(n=0)[0].shape == (0, 4)


@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.3, 0.5, 0.7, 1.0])
def test_nms_figure_keeps_what_torchvision_keeps(threshold):
    boxes, scores = viz.nms_cloud(seed=0, n=30)
    _, info = viz.nms_figure(boxes, scores, threshold)
    assert torch.equal(info["keep"], torchvision.ops.nms(boxes, scores, threshold))
    assert info["num_kept"] + info["num_suppressed"] == 30


def test_nms_threshold_extremes():
    boxes, scores = viz.nms_cloud(seed=0, n=30)
    _, keep_all = viz.nms_figure(boxes, scores, 1.0)  # nothing has IoU > 1
    _, strict = viz.nms_figure(boxes, scores, 0.0)  # any overlap suppresses
    assert keep_all["num_kept"] == 30
    kept = boxes[strict["keep"]]
    assert (box_iou(kept, kept).triu(diagonal=1) == 0).all()
    assert strict["keep"][0] == scores.argmax()  # the best box always survives
    _, empty = viz.nms_figure(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert empty["num_kept"] == 0


def test_nms_figure_by_hand():
    # Box 1 (0.8) overlaps box 0 (0.9) by 80/120 = 0.67 and goes at 0.5; box 2 is far away and stays.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    _, info = viz.nms_figure(boxes, torch.tensor([0.9, 0.8, 0.3]), 0.5)
    assert info["keep"].tolist() == [0, 2]
    _, info = viz.nms_figure(boxes, torch.tensor([0.9, 0.8, 0.3]), 0.7)
    assert info["keep"].tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- anchors


@pytest.mark.parametrize("size, stride, sizes, ratios", [
    ((256, 320), 16, (32, 64, 128), (0.5, 1.0, 2.0)),
    ((128, 128), 4, (16,), (1.0,)),
    ((96, 64), 32, (32, 64, 128, 256, 512), (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0)),
])
def test_anchor_count_and_grid_equal_the_anchor_generator(size, stride, sizes, ratios):
    H, W = size
    anchors = viz.anchor_grid((H, W), sizes, ratios, stride)
    assert len(anchors) == (H // stride) * (W // stride) * len(sizes) * len(ratios)
    feature = torch.zeros(1, 1, H // stride, W // stride)
    expected = AnchorGenerator((tuple(sizes),), (tuple(ratios),))((H, W), [feature])
    assert torch.equal(anchors, expected)


def test_anchor_grid_covers_an_image_not_divisible_by_the_stride():
    # 250 x 300 at stride 16: ceil(250/16) = 16 rows, ceil(300/16) = 19 columns, as a conv backbone gives
    assert viz.anchor_grid_size((250, 300), 16) == (16, 19)
    assert len(viz.anchor_grid((250, 300), (64,), (1.0,), 16)) == 16 * 19
    assert len(viz.anchor_grid((250, 300), (), (1.0,), 16)) == 0  # no size chosen: no anchors, no error


def test_label_anchors_follow_the_matcher_and_torchvision():
    anchors = viz.anchor_grid((256, 256), (32, 64, 128), (0.5, 1.0, 2.0), 16)
    gt = torch.tensor([[20.0, 30.0, 90.0, 120.0], [150.0, 140.0, 250.0, 200.0], [100.0, 10.0, 116.0, 20.0]])
    for high, low, best in [(0.7, 0.3, True), (0.5, 0.5, False), (0.9, 0.1, True), (0.6, 0.2, False)]:
        labels = viz.label_anchors(anchors, gt, high, low, best)
        matched = TorchvisionMatcher(high, low, allow_low_quality_matches=best)(box_iou(gt, anchors))
        assert torch.equal(labels == 1, matched >= 0)
        assert torch.equal(labels == 0, matched == TorchvisionMatcher.BELOW_LOW_THRESHOLD)
        assert torch.equal(labels == -1, matched == TorchvisionMatcher.BETWEEN_THRESHOLDS)


def test_label_anchors_by_hand():
    # gt = anchor 0 exactly (IoU 1, positive); anchor 1 covers half of it (IoU 0.5, ignored at 0.7 / 0.3);
    # anchor 2 is far away (IoU 0, negative).
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0], [50.0, 50.0, 60.0, 60.0]])
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert viz.label_anchors(anchors, gt, 0.7, 0.3).tolist() == [1, -1, 0]
    assert viz.label_anchors(anchors, gt, 0.4, 0.3).tolist() == [1, 1, 0]
    assert viz.label_anchors(anchors, torch.zeros(0, 4), 0.7, 0.3).tolist() == [0, 0, 0]  # background image
    assert viz.label_anchors(anchors, gt, 0.3, 0.7).tolist() == [1, 1, 0]  # low > high: low capped at high


def test_best_match_rule_gives_every_object_a_positive_anchor():
    anchors = viz.anchor_grid((256, 256), (128,), (1.0,), 32)
    gt = torch.tensor([[10.0, 10.0, 30.0, 40.0], [200.0, 100.0, 220.0, 110.0]])  # small: no anchor reaches 0.7
    assert (viz.label_anchors(anchors, gt, 0.7, 0.3, best_match=False) == 1).sum() == 0
    labels = viz.label_anchors(anchors, gt, 0.7, 0.3, best_match=True)
    best = box_iou(gt, anchors).argmax(dim=1)
    assert (labels[best] == 1).all()


def test_anchor_figure_numbers(tiny_embedded_root):
    image, target = embedded_dataset("train", root=tiny_embedded_root)[0]
    H, W = image.shape[-2:]
    fig, info = viz.anchor_figure(image, target["boxes"], (32, 64), (0.5, 1.0, 2.0), 16, (2, 3))
    h, w = math.ceil(H / 16), math.ceil(W / 16)
    assert info["grid"] == (h, w) and info["per_location"] == 6 and info["num_anchors"] == h * w * 6
    assert info["num_positive"] + info["num_negative"] + info["num_ignored"] == info["num_anchors"]
    assert info["num_positive"] >= 1  # the best-match rule
    assert torch.equal(info["labels"], viz.label_anchors(viz.anchor_grid((H, W), (32, 64), (0.5, 1.0, 2.0), 16),
                                                         target["boxes"], 0.7, 0.3))
    centres = (info["location_anchors"][:, :2] + info["location_anchors"][:, 2:]) / 2
    assert torch.equal(centres, torch.tensor([[3 * 16.0, 2 * 16.0]]).expand(6, 2))  # (row 2, col 3)
    assert len(fig.axes) == 2


def test_anchor_figure_extremes(tiny_embedded_root):
    image, target = embedded_dataset("train", root=tiny_embedded_root)[0]
    _, far = viz.anchor_figure(image, target["boxes"], stride=64, location=(999, -5))
    assert far["location"] == (far["grid"][0] - 1, 0)  # clamped onto the grid
    _, none = viz.anchor_figure(image, target["boxes"], sizes=(), aspect_ratios=(1.0,))
    assert none["num_anchors"] == 0 and none["location_anchors"].shape == (0, 4)
    _, thin = viz.anchor_figure(image, target["boxes"], (512,), (0.1, 10.0), 4, high=1.0, low=0.0, best_match=False)
    assert thin["num_negative"] == 0 and thin["num_positive"] == 0  # nothing below 0, nothing reaches IoU 1
    _, background = viz.anchor_figure(image, torch.zeros(0, 4))
    assert background["num_negative"] == background["num_anchors"]


# ----------------------------------------------------------------------------- FPN levels


@pytest.mark.parametrize("w, h, level", [
    (224, 224, 4), (112, 112, 3), (448, 448, 5), (10, 10, 2),  # eq. 1: k = floor(4 + log2(sqrt(wh) / 224))
    (223, 223, 3), (447, 447, 4),  # just below a power of two: the finer level
    (448, 112, 4),  # sqrt(448 * 112) = 224
    (0, 50, 2), (-5, 20, 2),  # empty RoIs: the finest level
    (5000, 5000, 5),  # floor(4 + log2(5000/224)) = 8, clamped to P5
])
def test_fpn_level_by_hand(w, h, level):
    assert viz.fpn_level(w, h) == level


def test_fpn_level_equals_torchvision_level_mapper():
    boxes = random_boxes(200, 2, size=900.0)
    mapper = torchvision.ops.poolers.LevelMapper(2, 5)
    wh = boxes[:, 2:] - boxes[:, :2]
    ours = torch.tensor([viz.fpn_level(float(w), float(h)) for w, h in wh])
    assert torch.equal(ours, mapper([boxes]) + 2)


@pytest.fixture(scope="module")
def small_pyramid(tiny_embedded_root):
    image, _ = embedded_dataset("train", root=tiny_embedded_root)[0]
    return viz.feature_pyramid(image, seed=0, min_size=128, max_size=256)


def test_feature_pyramid_shapes_and_seed(small_pyramid, tiny_embedded_root):
    image, maps = small_pyramid
    H, W = image.shape[-2:]
    assert min(H, W) == 128 or max(H, W) == 256
    padded = (math.ceil(H / 32) * 32, math.ceil(W / 32) * 32)
    assert [tuple(m.shape) for m in maps] == [(64, padded[0] // s, padded[1] // s) for s in (4, 8, 16, 32)]
    state = torch.random.get_rng_state()
    original, _ = embedded_dataset("train", root=tiny_embedded_root)[0]
    _, again = viz.feature_pyramid(original, seed=0, min_size=128, max_size=256)
    _, other = viz.feature_pyramid(original, seed=1, min_size=128, max_size=256)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert all(torch.equal(a, b) for a, b in zip(maps, again, strict=True))
    assert not torch.equal(maps[0], other[0])


def test_fpn_level_figure_frames_the_chosen_level(small_pyramid):
    image, maps = small_pyramid
    fig, info = viz.fpn_level_figure(image, maps, (10, 10, 122, 122))  # 112 x 112 -> P3
    assert (info["level"], info["stride"], info["unclamped"]) == (3, 8, 3)
    assert info["feature_shape"] == tuple(maps[1].shape[-2:])
    assert info["roi_on_map"] == pytest.approx((10 / 8, 10 / 8, 122 / 8, 122 / 8))
    widths = [max(s.get_linewidth() for s in ax.spines.values()) for ax in fig.axes[1:]]
    assert widths.index(max(widths)) == 1  # P3 is the framed panel
    _, empty = viz.fpn_level_figure(image, maps, (50, 50, 50, 50))
    assert empty["level"] == 2 and empty["unclamped"] is None
    _, huge = viz.fpn_level_figure(image, maps, (-2000, -2000, 3000, 3000))  # far outside the image
    assert huge["level"] == 5 and huge["unclamped"] == 8


# ----------------------------------------------------------------------------- RoIPool vs RoIAlign


def test_roi_pool_bins_and_points_by_hand():
    # RoI (20, 30, 100, 90) px at 1/16 -> (1.25, 1.875, 6.25, 5.625) cells. RoIPool rounds to x 1..6, y 2..6:
    # 6 columns and 5 rows. 2 x 2 bins: columns 3 cells each -> [1,4) [4,7); rows 2.5 cells ->
    # [2 + floor(0), 2 + ceil(2.5)) = [2,5) and [2 + floor(2.5), 2 + ceil(5)) = [4,7) (they share row 4).
    features = viz.demo_feature_map((8, 10), seed=0)
    _, info = viz.roi_pooling_figure(features, (20, 30, 100, 90), 2, 1 / 16, 2, False)
    assert info["rows"].tolist() == [[2, 5], [4, 7]] and info["cols"].tolist() == [[1, 4], [4, 7]]
    for p, (r0, r1) in enumerate(info["rows"].tolist()):
        for q, (c0, c1) in enumerate(info["cols"].tolist()):
            assert info["pool"][p, q] == features[r0:r1, c0:c1].max()
    assert info["points_per_bin"] == 4 and info["num_points"] == 16  # sampling ratio 2: 2 x 2 per bin
    # adaptive: ceil(roi_h / 2) x ceil(roi_w / 2) = ceil(3.75 / 2) x ceil(5 / 2) = 2 x 3 points per bin
    _, adaptive = viz.roi_pooling_figure(features, (20, 30, 100, 90), 2, 1 / 16, -1, False)
    assert adaptive["points_per_bin"] == 6
    # the first sample of bin (0, 0), at the centre of the first of 2 x 3 sub-bins of a 1.875 x 2.5 bin:
    # y = 1.875 + 0.5 * 1.875 / 2 = 2.34375, x = 1.25 + 0.5 * 2.5 / 3 = 1.6667
    assert adaptive["points"][0, 0, 0].tolist() == [pytest.approx(2.34375), pytest.approx(1.25 + 1.25 / 3)]


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("output_size", [1, 2, 7])
def test_roi_pooling_outputs_equal_torchvision(aligned, sampling_ratio, output_size):
    features = viz.demo_feature_map((8, 10), seed=1)
    for roi in [(20.0, 30.0, 100.0, 90.0), (3.0, 5.0, 9.0, 7.0), (-40.0, -20.0, 60.0, 200.0)]:
        _, info = viz.roi_pooling_figure(features, roi, output_size, 1 / 16, sampling_ratio, aligned)
        rois = torch.tensor([[0.0, *roi]])
        expected_pool = torchvision.ops.roi_pool(features[None, None], rois, output_size, 1 / 16)[0, 0]
        expected_align = torchvision.ops.roi_align(features[None, None], rois, output_size, 1 / 16, sampling_ratio,
                                                   aligned)[0, 0]
        torch.testing.assert_close(info["pool"], expected_pool)
        torch.testing.assert_close(info["align"], expected_align)
        plt.close("all")


def test_roi_pooling_extremes():
    features = viz.demo_feature_map((8, 10), seed=0)
    _, off_map = viz.roi_pooling_figure(features, (400, 400, 480, 460), 2, 1 / 16, 2, False)
    assert (off_map["pool"] == 0).all() and (off_map["align"] == 0).all()  # nothing of the map to read
    _, point = viz.roi_pooling_figure(features, (40, 40, 40, 40), 7, 1 / 16, -1, True)
    assert point["points_per_bin"] == 0 and (point["align"] == 0).all()  # aligned: an empty box samples nothing
    _, legacy = viz.roi_pooling_figure(features, (40, 40, 40, 40), 7, 1 / 16, -1, False)
    assert legacy["points_per_bin"] == 1  # legacy: stretched to 1 x 1 cell, one point per bin
    _, many = viz.roi_pooling_figure(features, (0, 0, 16, 16), 7, 1 / 16, 2, False)
    assert many["rows"].shape == (7, 2)  # 7 bins over 2 cells: RoIPool repeats cells, any size works


# ----------------------------------------------------------------------------- detections


@pytest.fixture(scope="module")
def model_and_image(tiny_embedded_root):
    torch.manual_seed(0)
    model = faster_rcnn_tiny_fpn(len(EMBEDDED_CLASSES) + 1).eval()
    image, target = embedded_dataset("test", root=tiny_embedded_root)[0]
    return model, image, target


def test_filtering_cached_candidates_equals_running_the_model(model_and_image):
    model, image, _ = model_and_image
    candidates = viz.detection_candidates(model, image)
    assert (model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img) == (
        0.05, 0.5, 100)  # settings restored
    for score, nms in [(0.05, 0.5), (0.15, 0.3), (0.0, 1.0)]:
        model.roi_heads.score_thresh, model.roi_heads.nms_thresh = score, nms
        with torch.no_grad():
            expected = model([image])[0]
        got = viz.filter_detections(candidates, score, nms)
        assert len(expected["scores"]) > 0
        torch.testing.assert_close(got["boxes"], expected["boxes"])
        assert torch.equal(got["labels"], expected["labels"]) and torch.equal(got["scores"], expected["scores"])
    model.roi_heads.score_thresh, model.roi_heads.nms_thresh = 0.05, 0.5


def test_detection_threshold_extremes(model_and_image):
    model, image, target = model_and_image
    model.train()
    candidates = viz.detection_candidates(model, image)
    assert model.training  # the mode is restored too
    model.eval()
    everything = viz.filter_detections(candidates, -1.0, 1.0, detections_per_img=10**6)
    assert len(everything["scores"]) == len(candidates["scores"]) > 100
    fig, none = viz.detection_figure(image, candidates, 1.0, 0.5, EMBEDDED_CLASSES, target)
    assert none["num_detections"] == 0 and isinstance(fig, Figure)
    _, strict = viz.detection_figure(image, candidates, 0.0, 0.0)
    for label in strict["detections"]["labels"].unique():
        boxes = strict["detections"]["boxes"][strict["detections"]["labels"] == label]
        assert (box_iou(boxes, boxes).triu(diagonal=1) == 0).all()  # NMS at 0: no two boxes of a class overlap
    counts = [viz.filter_detections(candidates, s, 0.5)["scores"].numel() for s in (0.0, 0.1, 0.14, 0.2)]
    assert counts == sorted(counts, reverse=True)
