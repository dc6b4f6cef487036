"""Scoring detections: PASCAL VOC AP (11-point and area), COCO AP through pycocotools, PR plots.

Shape shorthand: N images, D detections in one image, G ground-truth boxes in one image,
K object classes WITHOUT background (label k in 1..K is class_names[k-1]),
M detections of one class over all N images that count (not ignored on a difficult object).
pred_* come from the model, one dict per image {"boxes": [D,4], "labels": [D], "scores": [D]};
gt_* from the dataset, one dict per image {"boxes": [G,4], "labels": [G], "difficult": [G] bool
(optional, default all False)}. Boxes are x1,y1,x2,y2 in pixels; tensors or NumPy arrays both work.

VOC protocol (the devkit's VOCevaldet.m, as in py-faster-rcnn's voc_eval.py), per class:
  1. sort that class's detections by score over the whole dataset (stable: ties keep image order);
  2. each detection looks at the ground truth of its image with the highest IoU, taken or not.
     IoU >= threshold and that box is "difficult": the detection is ignored (neither TP nor FP);
     otherwise the first detection to reach it is a TP, later ones are duplicates, i.e. FP;
     IoU < threshold: FP. Difficult boxes never count as misses (they are not in num_gt);
  3. precision/recall after each counted detection, then AP from the curve.
Three conscious deviations, each tiny:
  - IoU is continuous, area = (x2-x1)*(y2-y1), not the devkit's "+1" pixel count. Our reader
    turns VOC's 1-based inclusive pixels into continuous coordinates (xmin-1, ymin-1), so a
    ground-truth box has the devkit's width xmax-xmin+1 here too; the devkit would also add 1
    to every detection's width and height, which moves an IoU by about 1/box size (< 1% for
    boxes over 100 px) and only flips matches sitting right at the threshold.
  - A match needs IoU >= threshold (the MATLAB devkit and COCO); py-faster-rcnn uses ">".
  - The 11 recall points are exactly k/10; py-faster-rcnn's np.arange(0, 1.1, 0.1) yields
    0.30000000000000004, so a recall of exactly 0.3 (or 0.6, 0.7) missed its point there.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from matplotlib.figure import Figure

TP, FP, IGNORED = 1, 0, -1  # outcome of one detection under the VOC matching
BACKGROUND_IOU = 0.1  # Hoiem et al. (ECCV 2012): below this IoU with every object = background
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
                   "ARl")  # the order of COCOeval.stats


# ---------------------------------------------------------------- inputs


def _as_numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _clean(record: dict, index: int, kind: str, num_classes: int | None) -> dict:
    """One image's dict as float64/int64/bool arrays, checked, so the rest never re-checks."""
    boxes = _as_numpy(record["boxes"], np.float64)
    boxes = boxes.reshape(0, 4) if boxes.size == 0 else boxes
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{kind} {index}: boxes must be [n,4], got shape {boxes.shape}")
    out = {"boxes": boxes, "labels": _as_numpy(record["labels"], np.int64).reshape(-1)}
    if kind == "prediction":
        out["scores"] = _as_numpy(record["scores"], np.float64).reshape(-1)
    else:
        difficult = record.get("difficult")
        out["difficult"] = (np.zeros(len(boxes), bool) if difficult is None
                            else _as_numpy(difficult, bool).reshape(-1))
    for key, value in out.items():
        if len(value) != len(boxes):
            raise ValueError(f"{kind} {index}: {len(boxes)} boxes but {len(value)} {key}")
    bad = (out["labels"] < 1) | (out["labels"] > (num_classes or np.inf))
    if bad.any():
        raise ValueError(f"{kind} {index}: label {out['labels'][bad][0]} outside 1..{num_classes}"
                         " (0 is background and never scored)")
    return out


def _clean_all(predictions, targets, num_classes=None) -> tuple[list[dict], list[dict]]:
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets: "
                         "one dict per image in each, in the same order")
    preds = [_clean(p, i, "prediction", num_classes) for i, p in enumerate(predictions)]
    gts = [_clean(t, i, "target", num_classes) for i, t in enumerate(targets)]
    return preds, gts


# ---------------------------------------------------------------- matching


def _pairwise_iou(pred_boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """[D,4] x [G,4] -> [D,G] IoU, continuous coordinates (no "+1"); empty boxes give 0, not NaN."""
    lt = np.maximum(pred_boxes[:, None, :2], gt_boxes[None, :, :2])
    rb = np.minimum(pred_boxes[:, None, 2:], gt_boxes[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_pred = np.prod(np.clip(pred_boxes[:, 2:] - pred_boxes[:, :2], 0, None), axis=1)
    area_gt = np.prod(np.clip(gt_boxes[:, 2:] - gt_boxes[:, :2], 0, None), axis=1)
    union = area_pred[:, None] + area_gt[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _match_image(pred_boxes, gt_boxes, gt_difficult, iou_threshold=0.5):
    """VOC matching in one image for one class; pred_boxes [D,4] must be sorted by score.

    Returns (outcome [D] of TP/FP/IGNORED, best_iou [D]). Each detection only looks at its
    best-overlapping gt, taken or not (the devkit's rule; COCO would try the next free one).
    """
    outcome = np.full(len(pred_boxes), FP, dtype=np.int64)
    if len(gt_boxes) == 0:
        return outcome, np.zeros(len(pred_boxes))
    iou = _pairwise_iou(pred_boxes, gt_boxes)
    best_gt, best_iou = iou.argmax(axis=1), iou.max(axis=1)
    taken = np.zeros(len(gt_boxes), dtype=bool)
    for d in np.flatnonzero(best_iou >= iou_threshold):  # in score order: first come, first served
        g = best_gt[d]
        if gt_difficult[g]:
            outcome[d] = IGNORED
        elif not taken[g]:
            outcome[d], taken[g] = TP, True
    return outcome, best_iou


def _match_class(preds, gts, label, iou_threshold):
    """All detections of one class over the dataset -> (scores, outcome, num_gt)."""
    scores, outcomes, num_gt = [], [], 0
    for pred, gt in zip(preds, gts, strict=True):
        is_gt = gt["labels"] == label
        num_gt += int((is_gt & ~gt["difficult"]).sum())  # difficult objects are never misses
        is_pred = np.flatnonzero(pred["labels"] == label)
        order = is_pred[np.argsort(-pred["scores"][is_pred], kind="stable")]
        outcome, _ = _match_image(pred["boxes"][order], gt["boxes"][is_gt],
                                 gt["difficult"][is_gt], iou_threshold)
        scores.append(pred["scores"][order])
        outcomes.append(outcome)
    if not scores:  # no images at all
        return np.zeros(0), np.zeros(0, np.int64), num_gt
    return np.concatenate(scores), np.concatenate(outcomes), num_gt


def _pr_curve(scores, outcome, num_gt) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall after each counted detection, best score first.

    Ignored detections are dropped: in the devkit they only repeat the previous point (or add a
    (0, 0) point at the start), which changes neither AP but draws a spurious segment.
    """
    order = np.argsort(-scores, kind="stable")  # stable: ties keep image order, as the devkit
    outcome = outcome[order]
    outcome = outcome[outcome != IGNORED]
    tp = np.cumsum(outcome == TP)
    fp = np.cumsum(outcome == FP)
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / num_gt if num_gt > 0 else np.full(len(tp), np.nan)
    return precision, recall


# ---------------------------------------------------------------- average precision


def average_precision(recall, precision, use_07_metric: bool = True) -> float:
    """Area under a precision/recall curve, the VOC way.

    use_07_metric=True: VOC2007's 11-point metric, mean over t in {0, 0.1, ..., 1} of the best
    precision at recall >= t (0 when that recall is never reached).
    use_07_metric=False: VOC2010+ "area" metric, the exact area under the precision envelope
    (precision made non-increasing from the right), summed where recall changes.
    """
    recall = _as_numpy(recall, np.float64).reshape(-1)
    precision = _as_numpy(precision, np.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise ValueError(f"recall {recall.shape} and precision {precision.shape} differ")
    if use_07_metric:
        points = np.arange(11) / 10  # exactly k/10, see the module docstring
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in points]))
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # envelope: best precision at any higher recall
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def voc_evaluate(predictions, targets, class_names, iou_threshold=0.5, use_07_metric=True) -> dict:
    """PASCAL VOC mean average precision, with the devkit's rules (module docstring).

    Returns {"mAP", "ap": {name: AP}, "precision": {name: [M]}, "recall": {name: [M]},
    "num_gt": {name: non-difficult objects}, "metric": "voc07" | "area", "classes_without_gt"}.
    A class without any non-difficult object has no recall: its AP is NaN, it is listed in
    "classes_without_gt" and left out of the mean (mAP is NaN if every class is).
    """
    preds, gts = _clean_all(predictions, targets, len(class_names))
    result = {"ap": {}, "precision": {}, "recall": {}, "num_gt": {}, "classes_without_gt": []}
    for label, name in enumerate(class_names, start=1):
        scores, outcome, num_gt = _match_class(preds, gts, label, iou_threshold)
        precision, recall = _pr_curve(scores, outcome, num_gt)
        result["precision"][name], result["recall"][name] = precision, recall
        result["num_gt"][name] = num_gt
        if num_gt == 0:
            result["ap"][name] = float("nan")
            result["classes_without_gt"].append(name)
        else:
            result["ap"][name] = average_precision(recall, precision, use_07_metric)
    scored = [ap for name, ap in result["ap"].items() if result["num_gt"][name] > 0]
    mean_ap = float(np.mean(scored)) if scored else float("nan")
    return {"mAP": mean_ap, **result, "metric": "voc07" if use_07_metric else "area"}


# ---------------------------------------------------------------- COCO through pycocotools


def _coco_dataset(preds, gts) -> tuple[dict, dict]:
    """Ground truth and detections as two in-memory COCO datasets (boxes as x,y,w,h).

    VOC "difficult" becomes COCO "iscrowd": COCO's ignore region is its closest analogue (a
    detection on it is neither TP nor FP and it is never missed). Two differences: COCO's IoU
    with a crowd box is intersection / detection area, and a crowd box can absorb many detections.
    """
    labels = sorted({int(v) for r in preds + gts for v in r["labels"]})
    base = {"images": [{"id": i} for i in range(len(gts))],
            "categories": [{"id": k, "name": str(k)} for k in labels]}
    gt_anns, dt_anns = [], []
    for i, (pred, gt) in enumerate(zip(preds, gts, strict=True)):
        for box, label, difficult in zip(gt["boxes"], gt["labels"], gt["difficult"], strict=True):
            gt_anns.append(_coco_box(box, i, label, len(gt_anns) + 1, iscrowd=int(difficult)))
        for box, label, score in zip(pred["boxes"], pred["labels"], pred["scores"], strict=True):
            dt_anns.append(_coco_box(box, i, label, len(dt_anns) + 1, score=float(score)))
    return {**base, "annotations": gt_anns}, {**base, "annotations": dt_anns}


def _coco_box(box, image_id, label, ann_id, iscrowd=0, score=None) -> dict:
    x1, y1, x2, y2 = (float(v) for v in box)
    ann = {"id": ann_id, "image_id": image_id, "category_id": int(label),
           "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": iscrowd}
    if score is not None:
        ann["score"] = score
    return ann


def coco_evaluate(predictions, targets, iou_type="bbox", verbose=False) -> dict:
    """COCO's 12 numbers (AP@[.5:.95], AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l) via pycocotools.

    Built in memory (no JSON files); pycocotools' progress prints are captured and the summary
    table is printed only if verbose. As in pycocotools, a number is -1 when nothing can be
    scored (no ground truth at all, or none in that area range), and 0 when there is ground truth
    but no detection finds it. Labels are used as COCO category ids as they are.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if iou_type != "bbox":
        raise ValueError(f"only iou_type='bbox' is supported, got {iou_type!r}")
    preds, gts = _clean_all(predictions, targets)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset, coco_dt.dataset = _coco_dataset(preds, gts)
        coco_gt.createIndex()
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    if verbose:
        print(log.getvalue())
    return {name: float(v) for name, v in zip(COCO_STAT_NAMES, evaluator.stats, strict=True)}


# ---------------------------------------------------------------- plots and error analysis


def plot_pr_curves(result: dict, classes=None, ax=None) -> Figure:
    """Per-class precision/recall curves from voc_evaluate's result, AP in the legend.

    classes: names to draw (default: every class that has ground truth). Without ax a new
    Figure is made without pyplot, so it works on any backend (Agg included) and a notebook
    shows it once when it is the cell's value.
    """
    if ax is None:
        fig = Figure(figsize=(6, 5))
        ax = fig.add_subplot()
    if classes is None:
        classes = [c for c in result["ap"] if c not in result["classes_without_gt"]]
    for name in classes:
        # start at (0, first precision) so a one-detection curve is still a visible line
        recall = np.concatenate(([0.0], result["recall"][name]))
        precision = np.concatenate((result["precision"][name][:1], result["precision"][name]))
        ax.plot(recall, precision, drawstyle="steps-post",
                label=f"{name} (AP {result['ap'][name]:.3f})")
    metric = "11-point" if result["metric"] == "voc07" else "area"
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.05),
           title=f"VOC {metric} mAP {result['mAP']:.3f}")
    ax.legend(loc="lower left", fontsize="small")
    return ax.figure


def classify_false_positives(predictions, targets, class_names, iou_threshold=0.5) -> dict:
    """Count each false positive of the VOC matching by its cause (Hoiem et al., ECCV 2012).

    IoU below is the best over ground truth of the detection's own class ("same") or of the
    other classes ("other"), difficult objects included; the first rule that fits wins:
      "duplicate":    same >= iou_threshold, but that object was already taken;
      "localisation": BACKGROUND_IOU (0.1) <= same < iou_threshold;
      "confusion":    other >= 0.1 (wrong class on a real object);
      "background":   IoU < 0.1 with every object.
    Detections ignored on difficult objects are not false positives and are not counted.
    """
    preds, gts = _clean_all(predictions, targets, len(class_names))
    counts = dict.fromkeys(("localisation", "confusion", "duplicate", "background"), 0)
    for pred, gt in zip(preds, gts, strict=True):
        for label in range(1, len(class_names) + 1):
            for kind in _false_positive_kinds(pred, gt, label, iou_threshold):
                counts[kind] += 1
    return counts


def _false_positive_kinds(pred, gt, label, iou_threshold) -> list[str]:
    """The kind of every false positive of one class in one image."""
    is_gt, is_pred = gt["labels"] == label, np.flatnonzero(pred["labels"] == label)
    order = is_pred[np.argsort(-pred["scores"][is_pred], kind="stable")]
    pred_boxes = pred["boxes"][order]
    outcome, same = _match_image(pred_boxes, gt["boxes"][is_gt], gt["difficult"][is_gt],
                                 iou_threshold)
    other = _pairwise_iou(pred_boxes, gt["boxes"][~is_gt]).max(axis=1, initial=0.0)
    kinds = []
    for same_iou, other_iou in zip(same[outcome == FP], other[outcome == FP], strict=True):
        if same_iou >= iou_threshold:
            kinds.append("duplicate")
        elif same_iou >= BACKGROUND_IOU:
            kinds.append("localisation")
        elif other_iou >= BACKGROUND_IOU:
            kinds.append("confusion")
        else:
            kinds.append("background")
    return kinds
