"""Tests for frcnn_tutorial.evaluation.

Hand-computed golden cases, properties of AP, and two independent references written plainly
below: the py-faster-rcnn voc_eval loop (for voc_evaluate) and COCO's AP at IoU 0.5 with
101-point interpolation (for coco_evaluate, which goes through pycocotools).
"""

import io
import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from frcnn_tutorial.evaluation import (
    average_precision,
    classify_false_positives,
    coco_evaluate,
    plot_pr_curves,
    voc_evaluate,
)


def det(boxes, labels, scores):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "scores": torch.tensor(scores, dtype=torch.float32)}


def gt(boxes, labels, difficult=None):
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.tensor(labels, dtype=torch.int64)}
    if difficult is not None:
        target["difficult"] = torch.tensor(difficult, dtype=torch.bool)
    return target


# ------------------------------------------------------------------ golden case
# Three images, classes cat=1, dog=2, bird=3.
#   image 0: cat A [0,0,10,10]; cat B [20,20,30,30] difficult
#   image 1: cat C [0,0,10,10]; cat D [50,50,60,60]
#   image 2: dog E [100,100,140,120]
# cat detections, by score (non-difficult cats: A, C, D -> num_gt 3):
#   .9 img0 [0,0,10,10]   IoU(A)=1             TP
#   .8 img1 [0,0,10,10]   IoU(C)=1             TP
#   .7 img0 [1,0,10,10]   IoU(A)=90/100, A taken -> FP (duplicate)
#   .6 img2 [0,0,10,10]   no cat in image 2     FP (background)
#   .5 img0 [20,20,30,30] IoU(B)=1, B difficult -> ignored, not on the curve
#   .4 img1 [50,50,60,65] IoU(D)=100/150        TP
#   .3 img1 [55,50,65,60] IoU(D)=50/150 < .5    FP (localisation)
#   TP 1 2 2 2 3 3 / FP 0 0 1 2 2 3 ->
#   recall    1/3 2/3 2/3 2/3 1   1
#   precision 1   1   2/3 1/2 3/5 1/2
#   11-point: t=0,.1,.2,.3 (recall 1/3 reaches them) -> 1; t=.4,.5,.6 -> 1; t=.7..1 (4 points)
#             -> best precision at recall 1 = 3/5.  AP = (7 + 4*0.6) / 11 = 9.4/11
#   area: envelope 1 up to recall 2/3, then 3/5 -> AP = 1/3 + 1/3 + 1/3*3/5 = 13/15
# dog detections: .95 img2 on E (TP), .85 img0 [0,0,10,10] (FP, on cat A: confusion)
#   recall 1 1, precision 1 1/2 -> AP 1 in both metrics
# bird: one detection (.6 img1, far from everything: background), no bird at all -> left out
# mAP = (9.4/11 + 1)/2 (11-point), (13/15 + 1)/2 = 14/15 (area)

CLASSES = ["cat", "dog", "bird"]
GOLDEN_TARGETS = [
    gt([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1], [False, True]),
    gt([[0, 0, 10, 10], [50, 50, 60, 60]], [1, 1]),
    gt([[100, 100, 140, 120]], [2]),
]
GOLDEN_PREDICTIONS = [
    det([[0, 0, 10, 10], [1, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]], [1, 1, 1, 2],
        [0.9, 0.7, 0.5, 0.85]),
    det([[0, 0, 10, 10], [50, 50, 60, 65], [55, 50, 65, 60], [200, 200, 210, 210]], [1, 1, 1, 3],
        [0.8, 0.4, 0.3, 0.6]),
    det([[0, 0, 10, 10], [100, 100, 140, 120]], [1, 2], [0.6, 0.95]),
]


@pytest.mark.parametrize("use_07, cat_ap, mean_ap", [(True, 9.4 / 11, (9.4 / 11 + 1) / 2),
                                                      (False, 13 / 15, 14 / 15)])
def test_golden_voc(use_07, cat_ap, mean_ap):
    result = voc_evaluate(GOLDEN_PREDICTIONS, GOLDEN_TARGETS, CLASSES, use_07_metric=use_07)
    np.testing.assert_allclose(result["recall"]["cat"], [1 / 3, 2 / 3, 2 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(result["precision"]["cat"], [1, 1, 2 / 3, 1 / 2, 3 / 5, 1 / 2])
    np.testing.assert_allclose(result["recall"]["dog"], [1, 1])
    np.testing.assert_allclose(result["precision"]["dog"], [1, 1 / 2])
    assert result["ap"]["cat"] == pytest.approx(cat_ap, abs=1e-12)
    assert result["ap"]["dog"] == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(result["ap"]["bird"])
    assert result["classes_without_gt"] == ["bird"]
    assert result["num_gt"] == {"cat": 3, "dog": 1, "bird": 0}
    assert result["mAP"] == pytest.approx(mean_ap, abs=1e-12)
    assert result["metric"] == ("voc07" if use_07 else "area")


def test_golden_false_positive_kinds():
    # from the comment above: cat .7 duplicate, cat .6 background, cat .3 localisation,
    # dog .85 on cat A confusion, bird background; the cat on difficult B is not an FP
    counts = classify_false_positives(GOLDEN_PREDICTIONS, GOLDEN_TARGETS, CLASSES)
    assert counts == {"localisation": 1, "confusion": 1, "duplicate": 1, "background": 2}


def test_devkit_looks_only_at_the_best_overlapping_gt():
    # gt A [0,0,10,10], B [5,0,15,10]. Detection 1 = A (TP). Detection 2 [2,0,12,10] has
    # IoU(A) = 80/120 = .667 and IoU(B) = 70/130 = .538: the devkit only looks at A, already
    # taken -> duplicate FP. COCO goes on to the free B -> TP.
    # VOC: recall 1/2 1/2, precision 1 1/2 -> 11-point 6/11 (t = 0..0.5), area 1/2.
    targets = [gt([[0, 0, 10, 10], [5, 0, 15, 10]], [1, 1])]
    predictions = [det([[0, 0, 10, 10], [2, 0, 12, 10]], [1, 1], [0.9, 0.8])]
    assert voc_evaluate(predictions, targets, ["a"])["ap"]["a"] == pytest.approx(6 / 11)
    assert voc_evaluate(predictions, targets, ["a"], use_07_metric=False)["mAP"] == 0.5
    assert coco_evaluate(predictions, targets)["AP50"] == pytest.approx(1.0)


def test_iou_convention_and_threshold():
    # IoU exactly 0.5 is a match (>=): [0,0,10,20] on [0,0,10,10] -> 100/200.
    at_threshold = voc_evaluate([det([[0, 0, 10, 20]], [1], [0.9])], [gt([[0, 0, 10, 10]], [1])],
                                ["a"])
    assert at_threshold["mAP"] == 1.0
    # Continuous IoU: [0,0,4,9] on [0,0,4,4] -> 16/36 = .44, a miss. The devkit's "+1" would
    # count 5x10 and 5x5 pixels -> 25/50 = .5, a hit: the tiny difference, shown.
    below = voc_evaluate([det([[0, 0, 4, 9]], [1], [0.9])], [gt([[0, 0, 4, 4]], [1])], ["a"])
    assert below["mAP"] == 0.0


def test_duplicate_detection_lowers_precision():
    # one cat in each of two images, found exactly at scores .9 and .7 -> AP 1. A duplicate of
    # the first at .8 slots in between: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 ->
    # area 1/2*1 + 1/2*2/3 = 5/6; 11-point (6*1 + 5*2/3)/11 = 28/33.
    targets = [gt([[0, 0, 10, 10]], [1]), gt([[0, 0, 10, 10]], [1])]
    clean = [det([[0, 0, 10, 10]], [1], [0.9]), det([[0, 0, 10, 10]], [1], [0.7])]
    doubled = [det([[0, 0, 10, 10], [0, 0, 10, 10]], [1, 1], [0.9, 0.8]), clean[1]]
    assert voc_evaluate(clean, targets, ["cat"])["mAP"] == 1.0
    result = voc_evaluate(doubled, targets, ["cat"], use_07_metric=False)
    np.testing.assert_allclose(result["precision"]["cat"], [1, 1 / 2, 2 / 3])
    np.testing.assert_allclose(result["recall"]["cat"], [1 / 2, 1 / 2, 1])
    assert result["mAP"] == pytest.approx(5 / 6)
    assert voc_evaluate(doubled, targets, ["cat"])["mAP"] == pytest.approx(28 / 33)


def test_class_with_only_difficult_objects_is_left_out():
    # "dog" has one object, difficult, and a detection on it (ignored): no recall to speak of
    targets = [gt([[0, 0, 10, 10], [30, 30, 50, 50]], [1, 2], [False, True])]
    predictions = [det([[0, 0, 10, 10], [30, 30, 50, 50]], [1, 2], [0.9, 0.8])]
    result = voc_evaluate(predictions, targets, ["cat", "dog"])
    assert result["classes_without_gt"] == ["dog"] and result["num_gt"]["dog"] == 0
    assert math.isnan(result["ap"]["dog"]) and result["mAP"] == 1.0
    assert len(result["precision"]["dog"]) == 0  # the ignored detection is not on the curve


# ------------------------------------------------------------------ average_precision


def test_average_precision_points_are_exact_tenths():
    # recall exactly 0.3 reaches t = 0, .1, .2, .3 -> 4/11. (py-faster-rcnn's
    # np.arange(0, 1.1, 0.1) has t = 0.30000000000000004 and would give 3/11.)
    assert average_precision([0.3], [1.0], use_07_metric=True) == pytest.approx(4 / 11)
    assert average_precision([0.3], [1.0], use_07_metric=False) == pytest.approx(0.3)


def test_average_precision_edges():
    assert average_precision([], [], True) == 0.0
    assert average_precision(np.array([]), np.array([]), False) == 0.0
    # envelope: the dip to .5 at recall .5 is lifted to the later .8 -> area .5*1 + .5*.8
    assert average_precision([0.5, 0.5, 1.0], [1.0, 0.5, 0.8], False) == pytest.approx(0.9)
    assert average_precision(torch.tensor([1.0]), torch.tensor([0.25]), True) == 0.25
    with pytest.raises(ValueError, match="differ"):
        average_precision([0.5, 1.0], [1.0], True)


# ------------------------------------------------------------------ random data


def random_dataset(seed, num_images=8, num_classes=3, difficult_rate=0.2, max_objects=6):
    """Objects, jittered (sometimes twice, sometimes mislabelled) detections, background boxes."""
    rng = np.random.default_rng(seed)
    predictions, targets = [], []
    for _ in range(num_images):
        g = int(rng.integers(0, max_objects + 1))
        xy, wh = rng.uniform(0, 200, (g, 2)), rng.uniform(10, 80, (g, 2))
        gt_boxes = np.concatenate([xy, xy + wh], axis=1)
        gt_labels = rng.integers(1, num_classes + 1, g)
        targets.append({"boxes": gt_boxes, "labels": gt_labels,
                        "difficult": rng.random(g) < difficult_rate})
        copies = np.repeat(np.arange(g), rng.integers(0, 3, g))  # 0, 1 or 2 detections per object
        jitter = rng.normal(0, 0.12, (len(copies), 4)) * np.tile(wh[copies], 2)
        pred_boxes = gt_boxes[copies] + jitter
        pred_labels = np.where(rng.random(len(copies)) < 0.85, gt_labels[copies],
                               rng.integers(1, num_classes + 1, len(copies)))
        b = int(rng.integers(0, 4))
        xy, wh = rng.uniform(0, 250, (b, 2)), rng.uniform(5, 60, (b, 2))
        pred_boxes = np.concatenate([pred_boxes, np.concatenate([xy, xy + wh], axis=1)])
        pred_boxes[:, 2:] = np.maximum(pred_boxes[:, 2:], pred_boxes[:, :2] + 1)
        pred_labels = np.concatenate([pred_labels, rng.integers(1, num_classes + 1, b)])
        predictions.append({"boxes": pred_boxes, "labels": pred_labels,
                            "scores": rng.random(len(pred_boxes))})
    return predictions, targets


NAMES = ["a", "b", "c"]


def plain_iou(a, b):
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def reference_voc(predictions, targets, label, iou_threshold, use_07):
    """py-faster-rcnn's voc_eval/voc_ap as plain loops (continuous IoU, match at >=).

    Like the devkit it keeps ignored detections on the curve (tp = fp = 0 there); returns
    (ap, recall, precision, counted) where counted marks the detections that are not ignored.
    """
    records, npos = [], 0
    for t in targets:
        keep = [i for i, lab in enumerate(t["labels"]) if lab == label]
        difficult = [bool(t["difficult"][i]) for i in keep]
        npos += sum(not d for d in difficult)
        records.append({"bbox": [list(t["boxes"][i]) for i in keep], "difficult": difficult,
                        "det": [False] * len(keep)})
    dets = [(i, s, list(b)) for i, p in enumerate(predictions)
            for b, lab, s in zip(p["boxes"], p["labels"], p["scores"], strict=True) if lab == label]
    dets = sorted(dets, key=lambda d: -d[1])  # sorted() is stable
    tp, fp = [0.0] * len(dets), [0.0] * len(dets)
    for d, (i, _, bb) in enumerate(dets):
        rec = records[i]
        ovmax, jmax = -math.inf, -1
        for j, g in enumerate(rec["bbox"]):
            ov = plain_iou(bb, g)
            if ov > ovmax:
                ovmax, jmax = ov, j
        if ovmax >= iou_threshold:
            if not rec["difficult"][jmax]:
                if not rec["det"][jmax]:
                    tp[d], rec["det"][jmax] = 1.0, True
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / npos
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    counted = np.array([t + f > 0 for t, f in zip(np.diff(tp, prepend=0), np.diff(fp, prepend=0),
                                                    strict=True)], dtype=bool)
    return plain_voc_ap(recall, precision, use_07), recall, precision, counted


def plain_voc_ap(rec, prec, use_07):
    if use_07:
        ap = 0.0
        for k in range(11):
            above = [p for r, p in zip(rec, prec, strict=True) if r >= k / 10]
            ap += (max(above) if above else 0.0) / 11
        return ap
    mrec = [0.0] + list(rec) + [1.0]
    mpre = [0.0] + list(prec) + [0.0]
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec))
               if mrec[i] != mrec[i - 1])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("iou_threshold", [0.5, 0.7])
@pytest.mark.parametrize("use_07", [True, False])
def test_voc_matches_plain_reference(seed, iou_threshold, use_07):
    predictions, targets = random_dataset(seed)
    result = voc_evaluate(predictions, targets, NAMES, iou_threshold, use_07)
    scored = []
    for label, name in enumerate(NAMES, start=1):
        ap, recall, precision, counted = reference_voc(predictions, targets, label,
                                                       iou_threshold, use_07)
        np.testing.assert_allclose(result["precision"][name], precision[counted], atol=1e-12)
        if result["num_gt"][name] == 0:
            assert name in result["classes_without_gt"] and math.isnan(result["ap"][name])
            continue
        np.testing.assert_allclose(result["recall"][name], recall[counted], atol=1e-12)
        assert result["ap"][name] == pytest.approx(ap, abs=1e-12)
        scored.append(ap)
    assert result["mAP"] == pytest.approx(np.mean(scored), abs=1e-12)


def test_random_data_is_not_trivial():
    # the cross-check above means something only if its data has every kind of detection
    ignored = duplicates = 0
    for seed in range(6):
        predictions, targets = random_dataset(seed)
        counts = classify_false_positives(predictions, targets, NAMES)
        duplicates += counts["duplicate"]
        assert counts["localisation"] + counts["confusion"] + counts["background"] > 0
        for label in (1, 2, 3):
            ignored += (~reference_voc(predictions, targets, label, 0.5, True)[3]).sum()
    assert ignored > 0 and duplicates > 0


def test_torch_and_numpy_inputs_agree():
    predictions, targets = random_dataset(1)
    as_torch = lambda d: {k: torch.as_tensor(v) for k, v in d.items()}  # noqa: E731
    a = voc_evaluate(predictions, targets, NAMES)
    b = voc_evaluate([as_torch(p) for p in predictions], [as_torch(t) for t in targets], NAMES)
    assert a["ap"] == b["ap"]


# ------------------------------------------------------------------ properties


@pytest.mark.parametrize("seed", range(3))
def test_perfect_detections_give_ap_one(seed):
    _, targets = random_dataset(seed)
    rng = np.random.default_rng(seed)
    perfect = [{"boxes": t["boxes"], "labels": t["labels"], "scores": rng.random(len(t["boxes"]))}
               for t in targets]  # difficult objects found too: ignored, harmless
    for use_07 in (True, False):
        result = voc_evaluate(perfect, targets, NAMES, use_07_metric=use_07)
        scored = [result["ap"][n] for n in NAMES if n not in result["classes_without_gt"]]
        assert scored and all(ap == pytest.approx(1.0, abs=1e-12) for ap in scored)
        assert result["mAP"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_shuffled_scores_never_beat_the_oracle_ranking(seed):
    # Exact copies of some objects (each a TP whatever the order) and boxes far away from
    # every object (always FP). Ranking all TPs first is the best any scoring can do.
    rng = np.random.default_rng(seed)
    _, targets = random_dataset(seed, difficult_rate=0.0)
    predictions, hits = [], []
    for t in targets:
        found = rng.random(len(t["boxes"])) < 0.7
        far = rng.uniform(1000, 1100, (3, 2))
        boxes = np.concatenate([t["boxes"][found], np.concatenate([far, far + 20], axis=1)])
        labels = np.concatenate([t["labels"][found], rng.integers(1, 4, 3)])
        predictions.append({"boxes": boxes, "labels": labels})
        hits.append(np.arange(len(boxes)) < found.sum())
    oracle = voc_evaluate([{**p, "scores": h + rng.random(len(h)) * 0.5}
                           for p, h in zip(predictions, hits, strict=True)], targets, NAMES)
    lower = 0
    for _ in range(30):
        shuffled = [{**p, "scores": rng.random(len(p["boxes"]))} for p in predictions]
        result = voc_evaluate(shuffled, targets, NAMES)
        for name, ap in result["ap"].items():
            if name not in result["classes_without_gt"]:
                assert ap <= oracle["ap"][name] + 1e-12 <= 1 + 1e-12
                lower += ap < oracle["ap"][name] - 1e-9
    assert lower > 0  # the shuffles really do hurt, so the bound above is tested


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("use_07", [True, False])
def test_detection_on_a_difficult_object_changes_nothing(seed, use_07):
    predictions, targets = random_dataset(seed, difficult_rate=0.4)
    rng = np.random.default_rng(100 + seed)
    extra = []
    for p, t in zip(predictions, targets, strict=True):
        hard = t["difficult"]
        extra.append({"boxes": np.concatenate([p["boxes"], t["boxes"][hard]]),
                      "labels": np.concatenate([p["labels"], t["labels"][hard]]),
                      "scores": np.concatenate([p["scores"], rng.random(hard.sum())])})
    assert sum(t["difficult"].sum() for t in targets) > 0
    before = voc_evaluate(predictions, targets, NAMES, use_07_metric=use_07)
    after = voc_evaluate(extra, targets, NAMES, use_07_metric=use_07)
    assert after["ap"] == pytest.approx(before["ap"], abs=1e-12, nan_ok=True)


def test_empty_inputs():
    empty_pred = det(np.zeros((0, 4)), [], [])
    result = voc_evaluate([empty_pred], [gt([[0, 0, 10, 10]], [1])], ["cat"])
    assert result["mAP"] == 0.0 and len(result["precision"]["cat"]) == 0
    result = voc_evaluate([], [], ["cat"])
    assert math.isnan(result["mAP"]) and result["classes_without_gt"] == ["cat"]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        voc_evaluate([det([], [], [])] * 2, [gt([], [])], ["cat"])
    with pytest.raises(ValueError, match="target 0: label 0"):
        voc_evaluate([det([], [], [])], [gt([[0, 0, 1, 1]], [0])], ["cat"])
    with pytest.raises(ValueError, match="prediction 0: label 2 outside 1..1"):
        voc_evaluate([det([[0, 0, 1, 1]], [2], [0.5])], [gt([], [])], ["cat"])
    with pytest.raises(ValueError, match=r"boxes must be \[n,4\]"):
        voc_evaluate([{"boxes": np.ones((2, 5)), "labels": [1, 1], "scores": [1, 1]}],
                     [gt([], [])], ["cat"])
    with pytest.raises(ValueError, match="1 boxes but 2 scores"):
        voc_evaluate([det([[0, 0, 1, 1]], [1], [0.5, 0.4])], [gt([], [])], ["cat"])


# ------------------------------------------------------------------ COCO


def reference_coco_ap50(predictions, targets, max_dets=100):
    """COCO AP at IoU 0.5, area "all", 101 recall points, written plainly (no crowd boxes).

    Per image and class: the max_dets best detections, each in score order takes the FREE
    object with the highest IoU >= 0.5. Then per class over the dataset: precision at each
    recall threshold r = best precision at recall >= r (0 if never reached); mean over r, then
    over the classes that have objects.
    """
    labels = sorted({int(lab) for t in targets for lab in t["labels"]})
    aps = []
    for label in labels:
        hits, npos = [], 0
        for p, t in zip(predictions, targets, strict=True):
            objects = [b for b, lab in zip(t["boxes"], t["labels"], strict=True) if lab == label]
            npos += len(objects)
            dets = [(s, b) for b, lab, s in zip(p["boxes"], p["labels"], p["scores"], strict=True)
                    if lab == label]
            taken = [False] * len(objects)
            for score, box in sorted(dets, key=lambda d: -d[0])[:max_dets]:
                best, best_j = 0.5, -1
                for j, obj in enumerate(objects):
                    if not taken[j] and plain_iou(box, obj) >= best:
                        best, best_j = plain_iou(box, obj), j
                if best_j >= 0:
                    taken[best_j] = True
                hits.append((score, best_j >= 0))
        tp = fp = 0
        curve = []
        for _, hit in sorted(hits, key=lambda h: -h[0]):
            tp, fp = tp + hit, fp + (not hit)
            curve.append((tp / npos, tp / (tp + fp)))
        points = [max([p for r, p in curve if r >= t], default=0.0) for t in np.linspace(0, 1, 101)]
        aps.append(np.mean(points))
    return float(np.mean(aps)) if aps else -1.0


@pytest.mark.parametrize("seed", range(4))
def test_coco_ap50_matches_plain_reference(seed):
    predictions, targets = random_dataset(seed, difficult_rate=0.0)
    for t in targets:
        del t["difficult"]
    # image 0: five class-1 objects found exactly, but ranked below 105 background boxes;
    # COCO keeps the 100 best detections per image and class (maxDets=100), so all five are lost
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 200, (5, 2))
    objects = np.concatenate([xy, xy + rng.uniform(10, 80, (5, 2))], axis=1)
    far = rng.uniform(1000, 1200, (105, 2))
    targets[0] = {"boxes": objects, "labels": np.ones(5, np.int64)}
    predictions[0] = {"boxes": np.concatenate([np.concatenate([far, far + 20], axis=1), objects]),
                      "labels": np.ones(110, np.int64),
                      "scores": np.concatenate([0.5 + rng.random(105) / 2, rng.random(5) * 0.4])}
    expected = reference_coco_ap50(predictions, targets)
    assert 0.05 < expected < 0.95
    assert abs(expected - reference_coco_ap50(predictions, targets, max_dets=1000)) > 0.01
    assert coco_evaluate(predictions, targets)["AP50"] == pytest.approx(expected, abs=1e-6)


def test_coco_perfect_and_size_ranges():
    # every object is 40x40 = 1600 px^2: "medium" (32^2..96^2), so small/large have no objects -> -1
    targets = [gt([[0, 0, 40, 40], [50, 50, 90, 90]], [1, 2]), gt([[10, 10, 50, 50]], [1])]
    predictions = [{**t, "scores": torch.full((len(t["labels"]),), 0.9)} for t in targets]
    stats = coco_evaluate(predictions, targets)
    assert set(stats) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
                          "ARs", "ARm", "ARl"}
    for key in ("AP", "AP50", "AP75", "APm", "AR10", "AR100", "ARm"):
        assert stats[key] == pytest.approx(1.0, abs=1e-9), key
    assert stats["APs"] == stats["APl"] == stats["ARs"] == stats["ARl"] == -1.0
    assert stats["AR1"] == pytest.approx(1.0)  # one object per class per image at most


def test_coco_difficult_becomes_an_ignore_region():
    targets = [gt([[0, 0, 40, 40], [50, 50, 90, 90]], [1, 1], [False, True])]
    found = [det([[0, 0, 40, 40]], [1], [0.9])]
    # below the real one's score: ranked first, it would take AR1's single slot and be ignored
    extra = [det([[0, 0, 40, 40], [50, 50, 90, 90]], [1, 1], [0.9, 0.5])]
    # the difficult object is not missed, and a detection on it is not a false positive
    assert coco_evaluate(found, targets) == coco_evaluate(extra, targets)
    assert coco_evaluate(found, targets)["AP"] == pytest.approx(1.0)


def test_coco_empty(capsys):
    no_dets = [det(np.zeros((0, 4)), [], [])]
    stats = coco_evaluate(no_dets, [gt([[0, 0, 40, 40]], [1])])
    assert stats["AP"] == 0.0 and stats["AR100"] == 0.0  # objects, none found
    assert set(coco_evaluate(no_dets, [gt([], [])]).values()) == {-1.0}  # nothing to score
    assert set(coco_evaluate([], []).values()) == {-1.0}
    assert capsys.readouterr().out == ""  # pycocotools' chatter is captured
    coco_evaluate(no_dets, [gt([[0, 0, 40, 40]], [1])], verbose=True)
    assert "Average Precision" in capsys.readouterr().out
    with pytest.raises(ValueError, match="bbox"):
        coco_evaluate(no_dets, [gt([], [])], iou_type="segm")


# ------------------------------------------------------------------ plots


def test_plot_pr_curves():
    result = voc_evaluate(GOLDEN_PREDICTIONS, GOLDEN_TARGETS, CLASSES)
    fig = plot_pr_curves(result)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["cat (AP 0.855)", "dog (AP 1.000)"]  # bird has no objects: not drawn
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [0, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 1, 1])
    fig.savefig(io.BytesIO(), format="png")  # renders without a display

    other = Figure()
    given = other.add_subplot()
    assert plot_pr_curves(result, classes=["dog"], ax=given) is other
    assert len(given.lines) == 1
