"""rpn.py against torchvision.models.detection.rpn with copied weights and identical inputs, plus golden cases."""

import math
from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork as TVRegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead as TVRPNHead

from frcnn_tutorial.anchors import AnchorGenerator, fpn_anchor_generator, vgg16_anchor_generator
from frcnn_tutorial.matching import BalancedPositiveNegativeSampler
from frcnn_tutorial.rpn import RegionProposalNetwork, RPNHead, flatten_head_outputs, rpn_loss, top_k_per_level

CHANNELS = 8


def copy_head_into_torchvision(ours: RPNHead, theirs: TVRPNHead) -> None:
    """Our conv is torchvision's conv[0][0] (a Conv2dNormActivation without norm); the 1x1 convs share names."""
    with torch.no_grad():
        theirs.conv[0][0].weight.copy_(ours.conv.weight)
        theirs.conv[0][0].bias.copy_(ours.conv.bias)
        for name in ("cls_logits", "bbox_pred"):
            getattr(theirs, name).weight.copy_(getattr(ours, name).weight)
            getattr(theirs, name).bias.copy_(getattr(ours, name).bias)


def build_pair(setup, seed=0, **settings):
    """Our RPN and torchvision's with the same anchors, weights and settings."""
    if setup == "vgg16":
        ours_anchors, tv_anchors = vgg16_anchor_generator(), TVAnchorGenerator()
    else:
        ours_anchors = fpn_anchor_generator()
        tv_anchors = TVAnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    num_anchors = ours_anchors.num_anchors_per_location()[0]
    torch.manual_seed(seed)
    head = RPNHead(CHANNELS, num_anchors)
    with torch.no_grad():  # larger weights than the 0.01 init: varied boxes and scores, NMS has work to do
        for p in head.parameters():
            p.normal_(std=0.2)
    tv_head = TVRPNHead(CHANNELS, num_anchors)
    copy_head_into_torchvision(head, tv_head)
    defaults = dict(fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
                    pre_nms_top_n=dict(training=2000, testing=1000), post_nms_top_n=dict(training=2000, testing=1000),
                    nms_thresh=0.7, score_thresh=0.0)
    defaults.update(settings)
    min_size = defaults.pop("min_size", 1e-3)
    theirs = TVRegionProposalNetwork(tv_anchors, tv_head, **defaults)
    theirs.min_size = min_size  # torchvision hard-codes 1e-3 in __init__; the attribute can be set
    return RegionProposalNetwork(ours_anchors, head, min_size=min_size, **defaults), theirs


def batch(setup, seed=1):
    """Two images of different sizes padded to one batch, and their feature maps."""
    g = torch.Generator().manual_seed(seed)
    if setup == "vgg16":
        padded, image_sizes, strides = (224, 320), [(224, 300), (170, 320)], [16]
    else:
        padded, image_sizes, strides = (128, 160), [(128, 150), (96, 160)], [4, 8, 16, 32, 64]
    images = torch.zeros(2, 3, *padded)
    features = OrderedDict((str(i), torch.randn(2, CHANNELS, -(-padded[0] // s), -(-padded[1] // s), generator=g))
                           for i, s in enumerate(strides))
    return images, image_sizes, features


def targets_for(kind):
    boxes = {
        "objects": torch.tensor([[10.0, 12.0, 60.0, 90.0], [0.0, 0.0, 40.0, 30.0], [70.0, 20.0, 150.0, 128.0],
                                 [5.0, 50.0, 20.0, 64.0]]),  # one at the top-left border, one at the right
        "one": torch.tensor([[30.0, 30.0, 90.0, 70.0]]),
        "whole_image": torch.tensor([[0.0, 0.0, 150.0, 128.0]]),
        "empty": torch.zeros((0, 4)),
    }[kind]
    return {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64)}


def run_both(ours, theirs, images, image_sizes, features, targets=None, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    ours_out = ours(images, image_sizes, features, targets)
    if seed is not None:
        torch.manual_seed(seed)
    theirs_out = theirs(ImageList(images, image_sizes), features, targets)
    return ours_out, theirs_out


def assert_same_proposals(ours, theirs):
    assert len(ours) == len(theirs)
    for ours_boxes, theirs_boxes in zip(ours, theirs, strict=True):
        assert ours_boxes.shape == theirs_boxes.shape and len(ours_boxes) > 0
        torch.testing.assert_close(ours_boxes, theirs_boxes, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- head


def test_head_shapes_and_init_match_torchvision():
    torch.manual_seed(0)
    head = RPNHead(CHANNELS, 9)
    torch.manual_seed(0)
    tv_head = TVRPNHead(CHANNELS, 9)
    # same construction order and init as torchvision: the same seed gives the same weights
    torch.testing.assert_close(head.conv.weight, tv_head.conv[0][0].weight, rtol=0, atol=0)
    torch.testing.assert_close(head.bbox_pred.weight, tv_head.bbox_pred.weight, rtol=0, atol=0)
    assert head.cls_logits.weight.std().item() == pytest.approx(0.01, rel=0.3)
    assert all((layer.bias == 0).all() for layer in (head.conv, head.cls_logits, head.bbox_pred))
    features = [torch.randn(2, CHANNELS, 10, 12), torch.randn(2, CHANNELS, 5, 6)]
    (obj, deltas), (tv_obj, tv_deltas) = head(features), tv_head(features)
    assert [o.shape for o in obj] == [(2, 9, 10, 12), (2, 9, 5, 6)]
    assert [d.shape for d in deltas] == [(2, 36, 10, 12), (2, 36, 5, 6)]
    for ours, theirs in zip(obj + deltas, tv_obj + tv_deltas, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_flatten_golden_order():
    # one image, A = 2 anchors, a 1 x 2 map: anchors are ordered (location 0: a0, a1), (location 1: a0, a1)
    objectness = torch.tensor([[[[10.0, 11.0]], [[20.0, 21.0]]]])  # [1, A=2, h=1, w=2]: value = 10*(a+1) + x
    deltas = torch.arange(16.0).reshape(1, 8, 1, 2)  # channel c = 4a + k holds delta k of anchor a
    flat_obj, flat_deltas = flatten_head_outputs([objectness], [deltas])
    assert flat_obj.tolist() == [[10.0, 20.0, 11.0, 21.0]]
    # anchor 0 at x=0 reads channels 0..3 at x=0: 0, 2, 4, 6; anchor 1 at x=0 reads channels 4..7: 8, 10, 12, 14
    assert flat_deltas[0, :2].tolist() == [[0.0, 2.0, 4.0, 6.0], [8.0, 10.0, 12.0, 14.0]]
    assert flat_deltas[0, 2].tolist() == [1.0, 3.0, 5.0, 7.0]  # anchor 0 at x=1


def test_top_k_per_level_golden():
    objectness = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.8]])  # level 0: anchors 0..2, level 1: anchors 3..4
    # k = 2 per level: level 0 -> 1 (0.9), 2 (0.5); level 1 -> 4 (0.8), 3 (0.3); a level smaller than k gives all
    assert top_k_per_level(objectness, [3, 2], 2).tolist() == [[1, 2, 4, 3]]
    assert top_k_per_level(objectness, [3, 2], 5).tolist() == [[1, 2, 0, 4, 3]]


# ----------------------------------------------------------------------------- proposals (eval)


@pytest.mark.parametrize("setup", ["vgg16", "fpn"])
@pytest.mark.parametrize("settings", [{}, dict(pre_nms_top_n=dict(training=50, testing=40),
                                               post_nms_top_n=dict(training=30, testing=25)),
                                      dict(score_thresh=0.6, nms_thresh=0.5)])
def test_proposals_match_torchvision(setup, settings):
    ours, theirs = build_pair(setup, **settings)
    ours.eval(), theirs.eval()
    images, image_sizes, features = batch(setup)
    (ours_boxes, ours_losses), (tv_boxes, tv_losses) = run_both(ours, theirs, images, image_sizes, features)
    assert ours_losses == {} == tv_losses
    assert_same_proposals(ours_boxes, tv_boxes)
    for boxes, (h, w) in zip(ours_boxes, image_sizes, strict=True):  # clipped to each image's own size
        assert boxes[:, 0::2].max() <= w and boxes[:, 1::2].max() <= h and boxes.min() >= 0


def test_min_size_and_list_features():
    ours, theirs = build_pair("fpn", min_size=8.0)
    ours.eval(), theirs.eval()
    images, image_sizes, features = batch("fpn")
    ours_boxes, _ = ours(images, image_sizes, list(features.values()))  # a plain list works too
    tv_boxes, _ = theirs(ImageList(images, image_sizes), features)
    assert_same_proposals(ours_boxes, tv_boxes)
    assert all(((b[:, 2:] - b[:, :2]) >= 8.0).all() for b in ours_boxes)


# ----------------------------------------------------------------------------- training: losses and gradients


TARGET_SETS = {
    "objects+empty": ["objects", "empty"],
    "one+whole_image": ["one", "whole_image"],
    "all_empty": ["empty", "empty"],
}


@pytest.mark.parametrize("setup", ["vgg16", "fpn"])
@pytest.mark.parametrize("target_set", TARGET_SETS)
def test_losses_proposals_and_gradients_match_torchvision(setup, target_set):
    ours, theirs = build_pair(setup)
    ours.train(), theirs.train()
    images, image_sizes, features = batch(setup)
    targets = [targets_for(kind) for kind in TARGET_SETS[target_set]]
    (ours_boxes, ours_losses), (tv_boxes, tv_losses) = run_both(ours, theirs, images, image_sizes, features,
                                                                targets, seed=7)
    assert_same_proposals(ours_boxes, tv_boxes)
    assert ours_losses.keys() == tv_losses.keys() == {"loss_objectness", "loss_rpn_box_reg"}
    for key in ours_losses:
        torch.testing.assert_close(ours_losses[key], tv_losses[key], rtol=0, atol=0)
    if target_set == "all_empty":  # nothing to regress: exactly zero box loss, a finite objectness loss
        assert ours_losses["loss_rpn_box_reg"].item() == 0.0 and math.isfinite(ours_losses["loss_objectness"].item())
    else:
        assert ours_losses["loss_rpn_box_reg"].item() > 0.0
    sum(ours_losses.values()).backward()
    sum(tv_losses.values()).backward()
    pairs = [(ours.head.conv, theirs.head.conv[0][0]), (ours.head.cls_logits, theirs.head.cls_logits),
             (ours.head.bbox_pred, theirs.head.bbox_pred)]
    for ours_layer, tv_layer in pairs:
        torch.testing.assert_close(ours_layer.weight.grad, tv_layer.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours_layer.bias.grad, tv_layer.bias.grad, rtol=1e-5, atol=1e-7)


def test_losses_match_without_randomness_when_the_sampler_takes_every_candidate():
    ours, theirs = build_pair("fpn", batch_size_per_image=10**7, positive_fraction=0.5)
    ours.train(), theirs.train()
    images, image_sizes, features = batch("fpn")
    targets = [targets_for("objects"), targets_for("one")]
    torch.manual_seed(1)  # different seeds: the sample is the same set, drawn in another order
    ours_losses = ours(images, image_sizes, features, targets)[1]
    torch.manual_seed(2)
    tv_losses = theirs(ImageList(images, image_sizes), features, targets)[1]
    for key in ours_losses:  # only the summation order can differ
        torch.testing.assert_close(ours_losses[key], tv_losses[key], rtol=1e-6, atol=1e-7)


def test_training_needs_targets():
    ours, _ = build_pair("vgg16")
    images, image_sizes, features = batch("vgg16")
    with pytest.raises(ValueError, match="targets"):
        ours.train()(images, image_sizes, features)


def test_rpn_loss_golden():
    # one image, 4 anchors: a positive, a negative, an ignored one (with a confident wrong logit), a negative
    pred_objectness = torch.tensor([[0.0, 0.0, 5.0, -1.0]])
    gt_labels = [torch.tensor([1.0, 0.0, -1.0, 0.0])]
    pred_deltas = torch.tensor([[[0.1, -0.05, 0.5, 0.0], [9.0, 9.0, 9.0, 9.0], [9.0] * 4, [9.0] * 4]])
    gt_deltas = [torch.zeros(4, 4)]  # only the positive anchor's targets are ever read
    sampler = BalancedPositiveNegativeSampler(256, 0.5)  # takes all 1 positive + 2 negatives: 3 sampled
    loss_objectness, loss_box = rpn_loss(pred_objectness, pred_deltas, gt_labels, gt_deltas, sampler)
    # BCE with logits: label 1, logit 0 -> log 2; label 0, logit 0 -> log 2; label 0, logit -1 -> log(1 + e^-1)
    # = 0.3133; the ignored anchor does not count. Mean over 3 sampled anchors: (2 log 2 + 0.3133) / 3 = 0.5665
    expected_objectness = (2 * math.log(2) + math.log(1 + math.exp(-1))) / 3
    assert loss_objectness.item() == pytest.approx(expected_objectness, rel=1e-6)
    # smooth L1 with beta = 1/9 on the positive only: |d| < 1/9 -> 0.5 d^2 / beta, else |d| - 0.5 beta
    #   0.1 -> 0.5 * 0.01 * 9 = 0.045; -0.05 -> 0.5 * 0.0025 * 9 = 0.01125; 0.5 -> 0.5 - 1/18 = 0.44444; 0 -> 0
    # sum 0.50069, divided by the 3 SAMPLED anchors (not the 1 positive): 0.16690
    expected_box = (0.045 + 0.01125 + (0.5 - 1 / 18)) / 3
    assert loss_box.item() == pytest.approx(expected_box, rel=1e-5)


def test_golden_background_image_labels_every_anchor_negative():
    rpn = RegionProposalNetwork(AnchorGenerator(((32,),), ((1.0,),)), RPNHead(CHANNELS, 1))
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [16.0, 0.0, 48.0, 32.0], [64.0, 64.0, 96.0, 96.0]])
    # image 0: no object -> all 0. image 1: one object equal to anchor 0 -> IoU 1 (positive);
    # anchor 1 overlaps it on 16 x 32: IoU 512 / (1024 + 1024 - 512) = 1/3, in [0.3, 0.7) -> ignored (-1);
    # anchor 2 is far away -> IoU 0 -> background (0)
    targets = [targets_for("empty"), {"boxes": anchors[:1].clone(), "labels": torch.ones(1, dtype=torch.int64)}]
    labels, deltas = rpn.assign_targets_to_anchors(anchors, targets)
    assert labels[0].tolist() == [0.0, 0.0, 0.0] and labels[1].tolist() == [1.0, -1.0, 0.0]
    assert torch.isfinite(deltas[0]).all() and deltas[1][0].tolist() == [0.0, 0.0, 0.0, 0.0]  # exact fit
