"""Region Proposal Network: an objectness score and box deltas for every anchor -> proposals, and the RPN loss.

Shape shorthand: N: images, C: channels, L: feature levels, A: anchors per location, h x w: one level's size,
P: anchors in one image (sum over levels of h * w * A; the same anchors for every image of the padded batch),
G: ground-truth boxes in one image, R: proposals kept for one image, H x W: padded batch size.
pred_objectness are logits (>0: more likely an object than not), pred_deltas are BoxCoder deltas.

The head (paper, 3.1) is a 3x3 conv + ReLU slid over the feature map and two sibling 1x1 convs: one logit per
anchor (object or not, a binary classifier, no sigmoid on the box outputs) and 4 deltas per anchor.
Training (3.1.2): anchors with IoU >= 0.7 with an object (or an object's best anchor) are positive, IoU < 0.3
negative, the rest ignored; 256 of them are sampled (at most half positive) and the loss is
    binary cross-entropy over the sampled anchors + smooth L1 (beta = 1/9) over the positive ones,
both divided by the number of sampled anchors. Same numbers as torchvision.models.detection.rpn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from frcnn_tutorial.boxes import BoxCoder, box_iou, clip_boxes_to_image, remove_small_boxes
from frcnn_tutorial.matching import BalancedPositiveNegativeSampler, Matcher


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then cls_logits (A logits) and bbox_pred (4A deltas) per location; shared by all levels."""

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):  # torchvision's init (and RNG order)
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """[N, C, h, w] per level -> (objectness [N, A, h, w] per level, deltas [N, 4A, h, w] per level)."""
        objectness, deltas = [], []
        for feature in features:
            hidden = F.relu(self.conv(feature), inplace=True)  # in place, as torchvision: no extra copy of a big map
            objectness.append(self.cls_logits(hidden))
            deltas.append(self.bbox_pred(hidden))
        return objectness, deltas


def flatten_head_outputs(objectness: list[Tensor], deltas: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-level head maps -> pred_objectness [N, P], pred_deltas [N, P, 4], in the anchors' order.

    Anchors go level by level, location by location (row-major), anchor by anchor, so each map is permuted
    from [N, A, h, w] to [N, h, w, A] before flattening. The 4A delta channels are A groups of (dx, dy, dw, dh).
    """
    flat_objectness, flat_deltas = [], []
    for level_objectness, level_deltas in zip(objectness, deltas, strict=True):
        n, a, h, w = level_objectness.shape
        flat_objectness.append(level_objectness.permute(0, 2, 3, 1).reshape(n, -1))
        flat_deltas.append(level_deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
    return torch.cat(flat_objectness, dim=1), torch.cat(flat_deltas, dim=1)


def top_k_per_level(objectness: Tensor, num_anchors_per_level: list[int], k: int) -> Tensor:
    """objectness [N, P] -> [N, sum_l min(k, P_l)] indices of the k best anchors of EACH level.

    Per level, so the many small anchors of the finest level cannot crowd out the coarse levels.
    """
    indices, offset = [], 0
    for level_objectness in objectness.split(num_anchors_per_level, dim=1):
        num_anchors = level_objectness.shape[1]
        indices.append(level_objectness.topk(min(k, num_anchors), dim=1).indices + offset)
        offset += num_anchors
    return torch.cat(indices, dim=1)


def rpn_loss(pred_objectness: Tensor, pred_deltas: Tensor, gt_labels: list[Tensor], gt_deltas: list[Tensor],
             sampler: BalancedPositiveNegativeSampler) -> tuple[Tensor, Tensor]:
    """pred_objectness [N, P], pred_deltas [N, P, 4]; per image gt_labels [P] (1 / 0 / -1 ignored), gt_deltas [P, 4].

    Returns (loss_objectness, loss_rpn_box_reg). Both are normalised by the number of SAMPLED anchors (the
    paper's N_cls; its lambda * 1/N_reg is replaced by this simpler choice, as torchvision does).
    """
    pos_masks, neg_masks = sampler(gt_labels)
    sampled_pos = torch.where(torch.cat(pos_masks))[0]  # indices into all N * P anchors of the batch
    sampled_neg = torch.where(torch.cat(neg_masks))[0]
    sampled = torch.cat([sampled_pos, sampled_neg])
    labels, target_deltas = torch.cat(gt_labels), torch.cat(gt_deltas)

    loss_objectness = F.binary_cross_entropy_with_logits(pred_objectness.flatten()[sampled], labels[sampled])
    # smooth L1 is quadratic below beta and linear above: small errors are refined, outliers have a bounded pull
    loss_box = F.smooth_l1_loss(pred_deltas.reshape(-1, 4)[sampled_pos], target_deltas[sampled_pos],
                                beta=1 / 9, reduction="sum") / sampled.numel()
    return loss_objectness, loss_box


class RegionProposalNetwork(nn.Module):
    """Anchors + head -> R proposals per image (and the RPN losses in training)."""

    def __init__(self, anchor_generator: nn.Module, head: nn.Module, fg_iou_thresh: float = 0.7,
                 bg_iou_thresh: float = 0.3, batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 pre_nms_top_n: dict | None = None, post_nms_top_n: dict | None = None, nms_thresh: float = 0.7,
                 score_thresh: float = 0.0, min_size: float = 1e-3):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        # every object gets at least its best anchor, even below 0.7 (paper, 3.1.2, condition (i))
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.pre_nms_top_n = pre_nms_top_n or dict(training=2000, testing=1000)  # per level, before NMS
        self.post_nms_top_n = post_nms_top_n or dict(training=2000, testing=1000)  # per image, after NMS
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = min_size

    def _mode(self, setting: dict) -> int:
        return setting["training" if self.training else "testing"]

    def forward(self, images: Tensor, image_sizes: list[tuple[int, int]], features,
                targets: list[dict] | None = None) -> tuple[list[Tensor], dict]:
        """images [N, 3, H, W] padded batch, image_sizes [(h, w)] before padding, features [N, C, h_l, w_l] per
        level (a list, or the backbone's dict), targets [{"boxes": [G, 4], ...}] in training.

        Returns (proposals: N tensors [R, 4], losses: {"loss_objectness", "loss_rpn_box_reg"}, {} in eval).
        """
        features = list(features.values()) if isinstance(features, dict) else list(features)
        objectness, deltas = self.head(features)
        anchors = self.anchor_generator(images.shape[-2:], features)  # [P, 4]
        num_anchors_per_level = [o[0].numel() for o in objectness]  # A * h * w per level
        pred_objectness, pred_deltas = flatten_head_outputs(objectness, deltas)

        # proposals are inputs to the box head, not something it back-propagates into: detach
        proposals = self.decode_proposals(pred_deltas.detach(), anchors)
        boxes = self.filter_proposals(proposals, pred_objectness.detach(), image_sizes, num_anchors_per_level)

        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("the RPN needs targets in training mode")
            gt_labels, gt_deltas = self.assign_targets_to_anchors(anchors, targets)
            loss_objectness, loss_box = rpn_loss(pred_objectness, pred_deltas, gt_labels, gt_deltas,
                                                 self.fg_bg_sampler)
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}
        return boxes, losses

    def decode_proposals(self, pred_deltas: Tensor, anchors: Tensor) -> Tensor:
        """pred_deltas [N, P, 4], anchors [P, 4] -> boxes [N, P, 4]."""
        num_images = pred_deltas.shape[0]
        boxes = self.box_coder.decode(pred_deltas.reshape(-1, 4), anchors.repeat(num_images, 1))
        return boxes.view(num_images, -1, 4)

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_sizes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> list[Tensor]:
        """proposals [N, P, 4], objectness [N, P] -> N tensors [R, 4], best first."""
        levels = torch.cat([torch.full((n,), level, dtype=torch.int64, device=proposals.device)
                            for level, n in enumerate(num_anchors_per_level)])  # [P]: each anchor's level
        top_idx = top_k_per_level(objectness, num_anchors_per_level, self._mode(self.pre_nms_top_n))  # [N, K]
        image_idx = torch.arange(len(proposals), device=proposals.device)[:, None]
        boxes, scores, levels = proposals[image_idx, top_idx], objectness[image_idx, top_idx].sigmoid(), levels[top_idx]
        return [self.filter_one_image(*per_image) for per_image in zip(boxes, scores, levels, image_sizes, strict=True)]

    def filter_one_image(self, boxes: Tensor, scores: Tensor, levels: Tensor, image_size: tuple[int, int]) -> Tensor:
        """[K, 4] candidates of one image -> [R, 4]: clip, drop tiny and low-score boxes, NMS per level, top R."""
        boxes = clip_boxes_to_image(boxes, image_size)  # the image's own size, not the padded one
        keep = remove_small_boxes(boxes, self.min_size)
        keep = keep[scores[keep] >= self.score_thresh]
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        # NMS within each level only (levels compete only through the final top-R). torchvision's compiled
        # batched_nms for speed; frcnn_tutorial.boxes.batched_nms is the readable one, tested equal to it.
        keep = torchvision.ops.batched_nms(boxes, scores, levels, self.nms_thresh)
        return boxes[keep[: self._mode(self.post_nms_top_n)]]

    def assign_targets_to_anchors(self, anchors: Tensor, targets: list[dict]) -> tuple[list[Tensor], list[Tensor]]:
        """anchors [P, 4] -> per image gt_labels [P] float (1 object, 0 background, -1 ignored), gt_deltas [P, 4]."""
        gt_labels, gt_deltas = [], []
        for target in targets:
            gt_boxes = target["boxes"]
            if gt_boxes.numel() == 0:  # a background-only image: every anchor is negative
                labels = torch.zeros(len(anchors), dtype=torch.float32, device=anchors.device)
                matched_boxes = anchors  # any finite boxes do: no positive anchor reads its deltas
            else:
                matched_gt_idx = self.proposal_matcher(box_iou(gt_boxes, anchors))
                matched_boxes = gt_boxes[matched_gt_idx.clamp(min=0)]  # -1/-2 read box 0, unused
                labels = (matched_gt_idx >= 0).to(torch.float32)  # below 0.3 (-1) stays 0: background
                labels[matched_gt_idx == Matcher.BETWEEN_THRESHOLDS] = -1.0  # ambiguous: not trained on
            gt_labels.append(labels)
            gt_deltas.append(self.box_coder.encode(matched_boxes, anchors))
        return gt_labels, gt_deltas
