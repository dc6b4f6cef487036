"""Boxes: formats, areas, IoU, the box coder (deltas), non-maximum suppression, clipping.

Shape shorthand: N, M: numbers of boxes; K: classes (a box carries 4K deltas, one set per class;
K = 1 for the RPN). Boxes are x1,y1,x2,y2 float32 in pixels unless a name says otherwise
("xywh": corner + size, "cxcywh": centre + size). gt_* are ground truth, pred_* predictions.

Everything here is plain PyTorch and gives torchvision's numbers to the last bit: where torchvision
writes a formula one particular way (x1 + 0.5 * w for a centre in the coder, (x1 + x2) / 2 in
box_convert) we write it the same way, because floats are not associative.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# ----------------------------------------------------------------------------- formats


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] corners -> centre x, centre y, width, height."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] centre + size -> corners."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """[..., 4] corners -> top-left corner + size (the COCO json format)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2 - x1, y2 - y1), dim=-1)


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] top-left corner + size -> corners."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


_TO_XYXY = {"xyxy": lambda b: b, "xywh": xywh_to_xyxy, "cxcywh": cxcywh_to_xyxy}
_FROM_XYXY = {"xyxy": lambda b: b, "xywh": xyxy_to_xywh, "cxcywh": xyxy_to_cxcywh}


def box_convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """Convert [..., 4] boxes between "xyxy", "xywh" and "cxcywh" (through xyxy)."""
    if in_fmt not in _TO_XYXY or out_fmt not in _TO_XYXY:
        raise ValueError(f"box formats are 'xyxy', 'xywh', 'cxcywh'; got {in_fmt!r} -> {out_fmt!r}")
    if in_fmt == out_fmt:
        return boxes.clone()
    return _FROM_XYXY[out_fmt](_TO_XYXY[in_fmt](boxes))


# ----------------------------------------------------------------------------- area and IoU


def box_area(boxes: Tensor) -> Tensor:
    """[N, 4] -> [N] areas, width * height."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """[N, 4] x [M, 4] -> [N, M] intersection over union of every pair.

    Two zero-area boxes give 0 / 0 = NaN, exactly as torchvision (a NaN never passes a threshold).
    """
    area1, area2 = box_area(boxes1), box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # [N, M, 2]
    wh = (bottom_right - top_left).clamp(min=0)  # no overlap -> width or height 0
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union


# ----------------------------------------------------------------------------- box coder


def _centres_and_sizes(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[N, 4] -> (cx, cy, w, h), each [N]; centre as x1 + w/2, torchvision's formula."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


class BoxCoder:
    """Turns a box into deltas relative to a reference box (an anchor or a proposal), and back.

    deltas (R-CNN, eq. 2 of the Faster R-CNN paper), each multiplied by its weight:
        tx = (x_gt - x_a) / w_a,  ty = (y_gt - y_a) / h_a,  tw = log(w_gt / w_a),  th = log(h_gt / h_a)
    Dividing by the anchor size makes the targets scale-free; the log keeps sizes positive.
    The weights (10, 10, 5, 5 in the box head) scale the targets to a unit-ish range.
    """

    def __init__(self, weights=(1.0, 1.0, 1.0, 1.0), bbox_xform_clip: float = math.log(1000.0 / 16)):
        self.weights = tuple(weights)
        self.bbox_xform_clip = bbox_xform_clip  # largest tw/th decoded: a box at most 1000/16 times the anchor

    def encode(self, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
        """gt_boxes [N, 4], anchors [N, 4] (paired row by row) -> deltas [N, 4]."""
        wx, wy, ww, wh = torch.as_tensor(self.weights, dtype=gt_boxes.dtype, device=gt_boxes.device)
        a_cx, a_cy, a_w, a_h = _centres_and_sizes(anchors)
        g_cx, g_cy, g_w, g_h = _centres_and_sizes(gt_boxes)
        dx = wx * (g_cx - a_cx) / a_w
        dy = wy * (g_cy - a_cy) / a_h
        dw = ww * torch.log(g_w / a_w)
        dh = wh * torch.log(g_h / a_h)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """deltas [N, 4K], anchors [N, 4] -> boxes [N, 4K], the same layout (one box per class)."""
        anchors = anchors.to(deltas.dtype)
        a_cx, a_cy, a_w, a_h = (t[:, None] for t in _centres_and_sizes(anchors))  # [N, 1]: broadcast over K
        wx, wy, ww, wh = self.weights
        dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy  # [N, K] each
        # exp() of a huge predicted tw would overflow to inf: clamp it in log space first
        dw = (deltas[:, 2::4] / ww).clamp(max=self.bbox_xform_clip)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.bbox_xform_clip)
        cx, cy = dx * a_w + a_cx, dy * a_h + a_cy
        half_w, half_h = 0.5 * (torch.exp(dw) * a_w), 0.5 * (torch.exp(dh) * a_h)
        boxes = torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=2)  # [N, K, 4]
        return boxes.flatten(1)


# ----------------------------------------------------------------------------- non-maximum suppression


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """[N, 4], [N] -> indices of the boxes kept, by decreasing score (int64).

    Greedy: take the best remaining box, drop every lower-scored box overlapping it by IoU > iou_threshold,
    repeat. Equal scores keep their input order (a stable sort, like torchvision's CPU kernel).
    Memory is N x N: fine for the few thousand boxes of an image.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes = boxes[order]
    # compare in float64: torchvision's kernel compares a float IoU with a double threshold, and
    # float32(0.3) > 0.3, so an IoU of exactly float32(0.3) must count as above a threshold of 0.3
    overlaps = box_iou(sorted_boxes, sorted_boxes).double() > iou_threshold
    overlaps = overlaps.triu(diagonal=1)  # only a better box (earlier row) may suppress a worse one
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    for i in range(len(order)):  # one pass, best box first
        if not suppressed[i]:
            suppressed |= overlaps[i]  # box i survives: it removes everything it overlaps
    return order[~suppressed]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category idxs[i] ([N] int), never across categories; kept indices by decreasing score.

    Like torchvision.ops.batched_nms it uses the offset trick for small inputs and one NMS per category
    for large ones (above 4000 coordinates on the CPU, 100 000 on a GPU); both give the same boxes.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.numel() > (4000 if boxes.device.type == "cpu" else 100_000):
        return _batched_nms_per_category(boxes, scores, idxs, iou_threshold)
    return _batched_nms_offset_trick(boxes, scores, idxs, iou_threshold)


def _batched_nms_offset_trick(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """One NMS call for all categories: shift category c's boxes by c * (largest coordinate + 1).

    After the shift, boxes of different categories lie in disjoint squares of the plane, so their IoU is 0
    and they can never suppress each other, while boxes of one category move together (same IoUs).
    """
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def _batched_nms_per_category(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """The plain loop: NMS on each category alone, then all kept boxes by decreasing score."""
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for category in torch.unique(idxs):
        members = torch.where(idxs == category)[0]
        keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    keep = torch.where(keep_mask)[0]
    # the same (not stable) sort torchvision uses here, so equal scores come out in its order
    return keep[scores[keep].sort(descending=True)[1]]


# ----------------------------------------------------------------------------- clipping and filtering


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """[..., 4] boxes clamped inside an image of size (height, width): 0 <= x <= width, 0 <= y <= height."""
    height, width = size
    xs = boxes[..., 0::2].clamp(min=0, max=width)  # x1, x2
    ys = boxes[..., 1::2].clamp(min=0, max=height)  # y1, y2
    return torch.stack((xs, ys), dim=-1).reshape(boxes.shape)  # interleave back to x1, y1, x2, y2


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """[N, 4] -> indices of the boxes whose width and height are both >= min_size."""
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return torch.where((widths >= min_size) & (heights >= min_size))[0]
