"""Matching predictions to ground truth by IoU, and sampling a balanced mini-batch of them.

Shape shorthand: G: ground-truth boxes in one image, P: predictions in one image (anchors for the RPN,
proposals for the box head). iou[G, P] comes from boxes.box_iou(gt_boxes, pred_boxes).

IoU only ASSIGNS labels here (positive, negative, ignored); it is not something a classifier regresses.
RPN: IoU >= 0.7 positive, < 0.3 negative, in between ignored, plus each object's best anchor(s) (paper, 3.1.2).
Box head: IoU >= 0.5 foreground, < 0.5 background.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Matcher:
    """For each prediction, the index of the ground-truth box it is matched to, or a negative code.

    matched_gt_idx[p] = g (0..G-1) when max_g iou[g, p] >= high_threshold,
                        BETWEEN_THRESHOLDS (-2) when low_threshold <= max < high_threshold,
                        BELOW_LOW_THRESHOLD (-1) when max < low_threshold.
    With allow_low_quality_matches, every prediction that is the best one for some ground-truth box
    (ties included) gets its best ground-truth box back even if that IoU is low: no object is left
    without a positive anchor. Same numbers as torchvision's detection._utils.Matcher.
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold {low_threshold} must be <= high_threshold {high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tensor:
        """iou [G, P] -> matched_gt_idx [P] int64.

        Raises ValueError when G or P is 0, as torchvision does: an image without ground truth has nothing
        to match, so callers (the RPN, the box head) label all its predictions background before calling.
        """
        if iou.numel() == 0:
            what = "ground-truth boxes" if iou.shape[0] == 0 else "predicted boxes"
            raise ValueError(f"Matcher got an empty IoU matrix of shape {tuple(iou.shape)}: no {what}")
        best_iou, best_gt_idx = iou.max(dim=0)  # [P]: each prediction's best ground-truth box
        matched_gt_idx = best_gt_idx.clone()
        matched_gt_idx[best_iou < self.low_threshold] = self.BELOW_LOW_THRESHOLD
        between = (best_iou >= self.low_threshold) & (best_iou < self.high_threshold)
        matched_gt_idx[between] = self.BETWEEN_THRESHOLDS
        if self.allow_low_quality_matches:
            best_for_some_gt = self.best_prediction_for_each_gt(iou)
            matched_gt_idx[best_for_some_gt] = best_gt_idx[best_for_some_gt]
        return matched_gt_idx

    @staticmethod
    def best_prediction_for_each_gt(iou: Tensor) -> Tensor:
        """Indices of the predictions that reach the highest IoU of some ground-truth box (ties included).

        Note that such a prediction is then matched to ITS best box, which is not always the box it is the
        best for (torchvision's rule). A ground-truth box that overlaps no prediction at all has a best IoU
        of 0, so every prediction with IoU 0 to it "ties": degenerate (zero-area) targets must be rejected
        before matching.
        """
        best_iou_per_gt = iou.max(dim=1).values  # [G]
        _, pred_idx = torch.where(iou == best_iou_per_gt[:, None])
        return pred_idx


class BalancedPositiveNegativeSampler:
    """Picks at most batch_size_per_image predictions per image, at most positive_fraction of them positive.

    Positives are chosen at random among the positives, and negatives fill the rest of the batch (fewer if
    there are not enough). Few positives is the normal case: an image has thousands of background anchors
    and a handful of objects, and without this balance the loss would learn "everything is background".
    The random draws are torchvision's (one randperm for positives, then one for negatives, image after
    image), so under the same seed the samples are identical.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """labels: one [P] tensor per image, >= 1 positive (a class), 0 negative, -1 ignored.

        Returns (pos_masks, neg_masks): one bool [P] mask per image each, True where sampled.
        """
        pos_masks, neg_masks = [], []
        for gt_labels in labels:
            positive = torch.where(gt_labels >= 1)[0]
            negative = torch.where(gt_labels == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            chosen_pos = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
            chosen_neg = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
            pos_masks.append(_mask(chosen_pos, gt_labels))
            neg_masks.append(_mask(chosen_neg, gt_labels))
        return pos_masks, neg_masks


def _mask(indices: Tensor, like: Tensor) -> Tensor:
    """A bool mask shaped like `like`, True at `indices`."""
    mask = torch.zeros_like(like, dtype=torch.bool)
    mask[indices] = True
    return mask
