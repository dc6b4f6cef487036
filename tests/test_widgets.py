"""The explorers built in-process: move their controls as a learner would and read the labelled numbers."""

import re
import statistics
import time

import matplotlib.pyplot as plt
import pytest
import torch

from frcnn_tutorial import viz, widgets
from frcnn_tutorial.data import EMBEDDED_CLASSES, embedded_dataset
from frcnn_tutorial.model import faster_rcnn_tiny_fpn


def number(explorer, css, pattern=r"([-\d.,]+)"):
    """The first number after `pattern`'s prefix in the HTML widget with class css."""
    text = explorer.outputs[css].value
    assert css in explorer.outputs[css]._dom_classes
    return float(re.search(pattern, re.sub(r"<[^>]+>", "", text)).group(1).replace(",", ""))


@pytest.fixture(scope="module")
def dataset(tiny_embedded_root):
    return embedded_dataset("train", root=tiny_embedded_root)


def test_iou_explorer_follows_its_sliders():
    e = widgets.iou_explorer()
    assert "iou-explorer" in e._dom_classes and bytes(e.figure.value).startswith(b"\x89PNG")
    assert number(e, "iou-value", r"IoU = ([\d.]+)") == 0.1875
    first_png = bytes(e.figure.value)
    e.controls["b_x1"].value = 256  # B slides off to the right
    assert number(e, "iou-value", r"IoU = ([\d.]+)") == 0.0 and bytes(e.figure.value) != first_png
    for key, value in {"b_x1": 20, "b_y1": 20, "b_w": 100, "b_h": 80}.items():  # B onto A
        e.controls[key].value = value
    assert number(e, "iou-value", r"IoU = ([\d.]+)") == 1.0
    e.controls["a_w"].value = 0  # a zero-size box: IoU 0, union = area of B
    assert number(e, "iou-value", r"IoU = ([\d.]+)") == 0.0
    assert number(e, "iou-value", r"union ([\d.]+)") == 8000
    assert e.message.value == ""


def test_nms_explorer_counts_kept_boxes():
    e = widgets.nms_explorer(seed=0, n=30)
    boxes, scores = viz.nms_cloud(0, 30)
    for threshold in (0.0, 0.3, 0.5, 1.0):
        e.controls["iou_threshold"].value = threshold
        expected = len(viz.nms_figure(boxes, scores, threshold)[1]["keep"])
        assert number(e, "nms-count", r"kept (\d+)") == expected
    assert number(e, "nms-count", r"kept (\d+)") == 30  # at 1.0 nothing is suppressed


def test_anchor_explorer_count_stride_and_location(dataset):
    e = widgets.anchor_explorer(dataset, index=0)
    H, W = dataset[0][0].shape[-2:]
    for stride in (4, 16, 32, 64):
        e.controls["stride"].value = stride
        h, w = viz.anchor_grid_size((H, W), stride)
        assert number(e, "anchor-count", r"anchors: ([\d,]+)") == h * w * 9
        assert (e.controls["row"].max, e.controls["col"].max) == (h - 1, w - 1)  # the location stays on the grid
    e.controls["sizes"].value = (16, 512)
    e.controls["ratios"].value = (0.1, 1.0, 10.0)  # the ratio limits
    assert number(e, "anchor-count", r"anchors: ([\d,]+)") == h * w * 6
    e.controls["sizes"].value = ()  # nothing chosen: zero anchors, a picture, no exception
    assert number(e, "anchor-count", r"anchors: ([\d,]+)") == 0 and e.message.value == ""


def test_anchor_explorer_labels_follow_the_thresholds(dataset):
    e = widgets.anchor_explorer(dataset, index=1, stride=8)
    image, target = dataset[1]
    anchors = viz.anchor_grid(image.shape[-2:], (32, 64, 128), (0.5, 1.0, 2.0), 8)
    for high, low, best in [(0.7, 0.3, True), (0.5, 0.4, False), (1.0, 0.0, False)]:
        e.controls["high"].value, e.controls["low"].value, e.controls["best_match"].value = high, low, best
        labels = viz.label_anchors(anchors, target["boxes"], high, low, best)
        assert number(e, "anchor-labels", r"positive ([\d,]+)") == (labels == 1).sum()
        assert number(e, "anchor-labels", r"negative ([\d,]+)") == (labels == 0).sum()
        assert number(e, "anchor-labels", r"ignored ([\d,]+)") == (labels == -1).sum()
    e.controls["index"].value = 2  # another image: another grid
    h, w = viz.anchor_grid_size(dataset[2][0].shape[-2:], 8)
    assert number(e, "anchor-count", r"anchors: ([\d,]+)") == h * w * 9


def test_fpn_level_explorer_assigns_eq1_levels(dataset):
    e = widgets.fpn_level_explorer(dataset, min_size=256)
    for side, level in [(224, 4), (112, 3), (448, 5), (10, 2), (0, 2), (60, 2)]:
        e.controls["width"].value = e.controls["height"].value = side
        assert number(e, "fpn-level", r"level P(\d)") == level
    e.controls["cx"].value = 0  # the RoI half off the image: still a level and a picture
    assert e.message.value == ""


def test_roi_pooling_explorer_bins_and_points():
    e = widgets.roi_pooling_explorer()
    text = e.outputs["roi-pool-info"].value
    assert "rows [2,5) [4,7)" in text and "columns [1,4) [4,7)" in text
    assert number(e, "roi-pool-info", r"RoIAlign: (\d+)") == 4
    e.controls["output_size"].value = 7
    assert e.outputs["roi-pool-info"].value.count(")") >= 14  # 7 row bins and 7 column bins
    e.controls["sampling_ratio"].value = 3
    assert number(e, "roi-pool-info", r"RoIAlign: (\d+)") == 9
    e.controls["aligned"].value = True
    e.controls["width"].value = e.controls["height"].value = 0  # empty aligned RoI: no sampling point
    e.controls["sampling_ratio"].value = -1
    assert number(e, "roi-pool-info", r"RoIAlign: (\d+)") == 0
    e.controls["x1"].value = e.controls["x1"].min  # off the map
    assert e.message.value == ""


def test_detection_explorer_runs_the_model_once_per_image(dataset, monkeypatch):
    torch.manual_seed(0)
    model = faster_rcnn_tiny_fpn(len(EMBEDDED_CLASSES) + 1).eval()
    runs = []
    real = viz.detection_candidates
    monkeypatch.setattr(viz, "detection_candidates", lambda m, image: runs.append(1) or real(m, image))
    e = widgets.detection_explorer(model, dataset, EMBEDDED_CLASSES, score_thresh=0.0, nms_thresh=1.0)
    total = number(e, "detection-count", r"of (\d+) candidates")
    assert number(e, "detection-count", r"(\d+) detections") == min(total, 100)
    e.controls["score"].value = 1.0
    assert number(e, "detection-count", r"(\d+) detections") == 0
    e.controls["score"].value, e.controls["nms"].value = 0.05, 0.5
    image = dataset[0][0]
    assert number(e, "detection-count", r"(\d+) detections") == len(model([image])[0]["scores"])
    assert len(runs) == 1  # thresholds never re-ran the network
    e.controls["index"].value = 1
    e.controls["index"].value = 0
    assert len(runs) == 2  # image 1 once; image 0 came from the cache


def test_explorers_close_their_figures(dataset):
    before = len(plt.get_fignums())
    e = widgets.iou_explorer()
    for x in range(0, 200, 20):
        e.controls["a_x1"].value = x
    widgets.anchor_explorer(dataset)
    assert len(plt.get_fignums()) == before


def test_every_explorer_redraws_within_about_a_second(dataset):
    """The median redraw (what one slider step costs) on this CPU; 2 s leaves room for a loaded CI machine."""
    model = faster_rcnn_tiny_fpn(len(EMBEDDED_CLASSES) + 1).eval()
    explorers = [widgets.iou_explorer(), widgets.nms_explorer(), widgets.anchor_explorer(dataset, stride=4),
                 widgets.fpn_level_explorer(dataset, min_size=256), widgets.roi_pooling_explorer(),
                 widgets.detection_explorer(model, dataset, EMBEDDED_CLASSES)]
    for e in explorers:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            e.update()
            times.append(time.perf_counter() - start)
        assert statistics.median(times) < 2.0, (e._dom_classes, times)
