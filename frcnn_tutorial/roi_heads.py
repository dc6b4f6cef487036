"""The second stage of Faster R-CNN: classify every proposal and refine its box (the Fast R-CNN head).

Shape shorthand: N images, R proposals (RoIs) of one image, S sampled RoIs of the whole batch, G ground-truth
boxes of one image, K classes INCLUDING background (label 0), C channels, P pooled size (7), D representation
size (1024 for ResNet-50-FPN, 4096 for VGG16's fc6/fc7).

Names: pred_* are network outputs, gt_* come from the targets. "Deltas" are the paper's (tx, ty, tw, th)
regression targets multiplied by bbox_reg_weights (10, 10, 5, 5), which scales them to roughly unit variance.

Training: label proposals by IoU with the ground truth (>= 0.5 object, < 0.5 background), sample 512 per image
with at most 25% objects, then softmax cross-entropy + smooth L1 on the class-specific deltas of the objects.
Inference: softmax, decode one box per class, clip, score threshold, per-class NMS, keep the best 100.
Every step follows torchvision.models.detection.roi_heads and is tested equal to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from frcnn_tutorial.boxes import BoxCoder, box_iou, clip_boxes_to_image, remove_small_boxes
from frcnn_tutorial.matching import BalancedPositiveNegativeSampler, Matcher


class TwoMLPHead(nn.Module):
    """fc6 and fc7 with ReLU: pooled features [S, C, P, P] -> [S, D]. VGG16's own fc6/fc7 have this shape."""

    def __init__(self, in_channels: int, representation_size: int):
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)
        return F.relu(self.fc7(F.relu(self.fc6(x))))


class FastRCNNPredictor(nn.Module):
    """Two sibling linear layers: class logits [S, K] and class-specific deltas [S, 4K] (one box per class)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


def fastrcnn_loss(
    class_logits: Tensor, box_regression: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """Softmax cross-entropy over all sampled RoIs + smooth L1 over the foreground ones (exactly torchvision).

    class_logits [S, K], box_regression [S, 4K], labels: per image [S_i] in 0..K-1, regression_targets: per image
    [S_i, 4]. Only the deltas of each RoI's OWN ground-truth class are regressed. The box loss is a sum divided by
    S (all sampled RoIs, not only the foreground), so images with few objects give a small box loss.
    """
    gt_labels = torch.cat(labels, dim=0)
    gt_deltas = torch.cat(regression_targets, dim=0)
    loss_classifier = F.cross_entropy(class_logits, gt_labels)

    fg = torch.where(gt_labels > 0)[0]
    num_rois = class_logits.shape[0]
    pred_deltas = box_regression.reshape(num_rois, box_regression.size(-1) // 4, 4)[fg, gt_labels[fg]]
    # beta = 1/9: quadratic only for |x| < 1/9 (inherited from Fast R-CNN's sigma = 3), linear beyond.
    box_loss = F.smooth_l1_loss(pred_deltas, gt_deltas[fg], beta=1 / 9, reduction="sum")
    return loss_classifier, box_loss / gt_labels.numel()


class RoIHeads(nn.Module):
    """Pool features for each proposal, run the box head and predictor; losses in training, detections in eval.

    forward(features: dict[str, Tensor[N, C, h, w]], proposals: list[Tensor[R, 4]], image_sizes: list[(h, w)],
            targets: list[{"boxes": [G, 4], "labels": [G]}] | None)
        -> (detections: list[{"boxes": [D, 4], "labels": [D], "scores": [D]}] (empty list in training),
            losses: {"loss_classifier", "loss_box_reg"} (empty dict in eval))
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        bbox_reg_weights: tuple[float, float, float, float] | None = (10.0, 10.0, 5.0, 5.0),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
    ):
        super().__init__()
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        # No low-quality matches here (unlike the RPN): the gt boxes are added to the proposals, so every
        # object already has at least one proposal with IoU 1.
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_coder = BoxCoder(bbox_reg_weights if bbox_reg_weights is not None else (10.0, 10.0, 5.0, 5.0))
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("RoIHeads needs targets in training mode")
            proposals, labels, regression_targets = self.select_training_samples(proposals, targets)

        box_features = self.box_head(self.box_roi_pool(features, proposals, image_sizes))  # [S, D]
        class_logits, box_regression = self.box_predictor(box_features)  # [S, K], [S, 4K]

        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        return self.postprocess_detections(class_logits, box_regression, proposals, image_sizes), {}

    # ---- training: which proposals to learn from, and what to learn ----

    def select_training_samples(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Add the gt boxes to the proposals, label them, sample; returns (proposals, labels, gt deltas) per image."""
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        # The gt boxes are perfect proposals: they guarantee positives early in training, when the RPN is poor.
        proposals = [torch.cat((p, g)) for p, g in zip(proposals, gt_boxes, strict=True)]
        gt_labels = [t["labels"] for t in targets]
        matched = [self.label_proposals(*args) for args in zip(proposals, gt_boxes, gt_labels, strict=True)]
        labels = [lab for lab, _ in matched]

        pos_masks, neg_masks = self.fg_bg_sampler(labels)  # one call for the batch: same RNG use as torchvision
        keep = [torch.where(pos | neg)[0] for pos, neg in zip(pos_masks, neg_masks, strict=True)]
        proposals = [p[k] for p, k in zip(proposals, keep, strict=True)]
        labels = [lab[k] for lab, k in zip(labels, keep, strict=True)]
        matched_gt_boxes = [m[k] for (_, m), k in zip(matched, keep, strict=True)]

        deltas = self.box_coder.encode(torch.cat(matched_gt_boxes), torch.cat(proposals))
        return proposals, labels, list(deltas.split([len(p) for p in proposals]))

    def label_proposals(self, proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor]:
        """Per proposal [R]: its gt class (IoU >= fg), 0 (IoU < bg) or -1 (ignored); and its matched gt box [R, 4]."""
        if gt_boxes.numel() == 0:
            # An image without objects: every proposal is background. The "matched box" is the proposal itself,
            # i.e. zero deltas; they are never used, since the box loss only looks at the foreground.
            return torch.zeros(len(proposals), dtype=torch.int64, device=proposals.device), proposals
        matched_idx = self.proposal_matcher(box_iou(gt_boxes, proposals))  # [R]: gt index, -1 or -2
        clamped = matched_idx.clamp(min=0)
        labels = gt_labels[clamped].to(torch.int64)
        labels[matched_idx == Matcher.BELOW_LOW_THRESHOLD] = 0
        labels[matched_idx == Matcher.BETWEEN_THRESHOLDS] = -1
        return labels, gt_boxes[clamped]

    # ---- inference: from class scores and deltas to detections ----

    def postprocess_detections(
        self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Softmax, decode one box per class [R, K, 4], then filter each image on its own."""
        num_classes = class_logits.shape[-1]
        pred_boxes = self.box_coder.decode(box_regression, torch.cat(proposals)).reshape(-1, num_classes, 4)
        pred_scores = F.softmax(class_logits, dim=-1)
        counts = [len(p) for p in proposals]
        per_image = zip(pred_boxes.split(counts), pred_scores.split(counts), image_sizes, strict=True)
        return [self.detections_for_image(boxes, scores, size) for boxes, scores, size in per_image]

    def detections_for_image(self, pred_boxes: Tensor, pred_scores: Tensor, image_size: tuple[int, int]) -> dict:
        """pred_boxes [R, K, 4], pred_scores [R, K] -> at most detections_per_img boxes, labels, scores."""
        boxes = clip_boxes_to_image(pred_boxes, image_size)
        labels = torch.arange(pred_scores.shape[1], device=pred_scores.device).expand_as(pred_scores)
        # Drop the background column, then treat every (RoI, class) pair as a separate candidate.
        boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), pred_scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)

        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = remove_small_boxes(boxes, min_size=1e-2)  # boxes squashed flat by clipping
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        # NMS within each class only: a person may overlap a bicycle. The compiled kernel, for speed (our
        # readable boxes.batched_nms gives the same result; see tests/test_boxes.py).
        keep = torchvision.ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}
