"""roi_heads.py: box head, predictor, Fast R-CNN loss and RoIHeads against torchvision, plus hand-computed cases."""

import math

import pytest
import torch
from torchvision.models.detection import faster_rcnn as tv_frcnn
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.ops import MultiScaleRoIAlign as TVMultiScaleRoIAlign

from frcnn_tutorial.roi_heads import FastRCNNPredictor, RoIHeads, TwoMLPHead, fastrcnn_loss

IMAGE_SIZES = [(200, 300), (160, 240)]  # padded batch 224 x 320 (multiples of 32)
K = 5  # classes incl. background: few classes so random heads give scores above 0.05


def make_features(seed=0, channels=8):
    """An FPN-like dict: levels '0'..'3' at strides 4..32 of a 224x320 batch, plus 'pool' (ignored by the pooler)."""
    g = torch.Generator().manual_seed(seed)
    feats = {str(i): torch.randn(2, channels, 224 // 2 ** (i + 2), 320 // 2 ** (i + 2), generator=g) for i in range(4)}
    feats["pool"] = torch.randn(2, channels, 4, 5, generator=g)
    return feats


def random_boxes(n, h, w, g, min_side=2.0):
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = min_side + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
    return torch.cat([xy, xy + wh], 1)


def make_inputs(seed=0, num_gt=(3, 2), num_random=40):
    """Proposals = random boxes + jittered copies of the gt boxes, so there are positives, negatives and ignores."""
    g = torch.Generator().manual_seed(seed)
    proposals, targets = [], []
    for (h, w), n in zip(IMAGE_SIZES, num_gt, strict=True):
        gt = random_boxes(n, h, w, g, min_side=20.0)
        jitter = gt.repeat(6, 1) + torch.randn(6 * n, 4, generator=g) * 4
        proposals.append(torch.cat([random_boxes(num_random, h, w, g), jitter]))
        targets.append({"boxes": gt, "labels": torch.randint(1, K, (n,), generator=g)})
    return proposals, targets


def make_pair(channels=8, representation=32, **kwargs):
    """Our RoIHeads and torchvision's with the same weights and the same (torchvision) pooler."""
    pool = TVMultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    tv_head = tv_frcnn.TwoMLPHead(channels * 49, representation)
    tv_pred = tv_frcnn.FastRCNNPredictor(representation, K)
    settings = dict(fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=512, positive_fraction=0.25,
                    bbox_reg_weights=None, score_thresh=0.05, nms_thresh=0.5, detections_per_img=100)
    settings.update(kwargs)
    tv = tv_roi_heads.RoIHeads(pool, tv_head, tv_pred, **settings)
    head, pred = TwoMLPHead(channels * 49, representation), FastRCNNPredictor(representation, K)
    head.load_state_dict(tv_head.state_dict())
    pred.load_state_dict(tv_pred.state_dict())
    ours = RoIHeads(pool, head, pred, **settings)
    return ours, tv


# ---- the two small modules ----------------------------------------------------------------------------------------


def test_head_and_predictor_equal_torchvision_and_have_the_papers_names():
    torch.manual_seed(0)
    tv_head, tv_pred = tv_frcnn.TwoMLPHead(8 * 49, 32), tv_frcnn.FastRCNNPredictor(32, K)
    head, pred = TwoMLPHead(8 * 49, 32), FastRCNNPredictor(32, K)
    # same parameter names -> torchvision state_dicts load as they are
    head.load_state_dict(tv_head.state_dict())
    pred.load_state_dict(tv_pred.state_dict())
    x = torch.randn(6, 8, 7, 7)
    torch.testing.assert_close(head(x), tv_head(x), rtol=0, atol=0)
    for a, b in zip(pred(head(x)), tv_pred(tv_head(x)), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    logits, deltas = pred(head(x))
    assert logits.shape == (6, K) and deltas.shape == (6, 4 * K)  # class-specific: one box per class
    assert (head(x) >= 0).all()  # ReLU after fc7


# ---- the loss -------------------------------------------------------------------------------------------------------


def test_fastrcnn_loss_golden():
    # Two RoIs, K = 2, all logits 0 -> softmax (0.5, 0.5): cross-entropy = log 2 for both, mean log 2.
    # RoI 0 is foreground (class 1): predicted deltas for class 1 are 0, target (1, 0, 0, 0.05).
    #   smooth L1 with beta 1/9: |1| >= 1/9 -> 1 - 0.5/9 = 0.944444; |0.05| < 1/9 -> 0.5 * 0.05^2 * 9 = 0.01125
    #   sum = 0.955694, divided by ALL sampled RoIs (2), not by the foreground ones (1): 0.477847
    # RoI 1 is background: its deltas (all 7s here) are ignored.
    logits = torch.zeros(2, 2)
    deltas = torch.tensor([[9.0, 9, 9, 9, 0, 0, 0, 0], [7, 7, 7, 7, 7, 7, 7, 7]])
    targets = [torch.tensor([[1.0, 0, 0, 0.05], [3, 3, 3, 3]])]
    cls, box = fastrcnn_loss(logits, deltas, [torch.tensor([1, 0])], targets)
    assert math.isclose(cls.item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(box.item(), (1 - 0.5 / 9 + 0.5 * 0.05**2 * 9) / 2, rel_tol=1e-6)


@pytest.mark.parametrize("num_fg", [0, 1, 7])
def test_fastrcnn_loss_equals_torchvision_forward_and_backward(num_fg):
    g = torch.Generator().manual_seed(num_fg)
    logits = torch.randn(20, K, generator=g, requires_grad=True)
    deltas = torch.randn(20, 4 * K, generator=g, requires_grad=True)
    labels = torch.zeros(20, dtype=torch.int64)
    labels[:num_fg] = torch.randint(1, K, (num_fg,), generator=g)
    labels = [labels[:12], labels[12:]]  # two images
    targets = [torch.randn(12, 4, generator=g), torch.randn(8, 4, generator=g)]
    ours = fastrcnn_loss(logits, deltas, labels, targets)
    grads = torch.autograd.grad(sum(ours), (logits, deltas))
    tv = tv_roi_heads.fastrcnn_loss(logits, deltas, labels, targets)
    tv_grads = torch.autograd.grad(sum(tv), (logits, deltas))
    for a, b in zip(ours + grads, tv + tv_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if num_fg == 0:
        assert ours[1].item() == 0.0


# ---- labelling proposals --------------------------------------------------------------------------------------------


def test_label_proposals_golden():
    # One gt box [0,0,10,10] (area 100) of class 3. IoU of each proposal with it:
    #   [0,0,10,10] -> 1.0 (object), [0,0,10,5] -> 50/100 = 0.5 (object: >= 0.5), [0,0,10,4] -> 40/100 = 0.4,
    #   [20,20,30,30] -> 0 (background).
    gt = torch.tensor([[0.0, 0, 10, 10]])
    proposals = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 4], [20, 20, 30, 30]])
    ours, _ = make_pair()
    labels, matched = ours.label_proposals(proposals, gt, torch.tensor([3]))
    assert labels.tolist() == [3, 3, 0, 0] and torch.equal(matched, gt.expand(4, 4))
    # with bg_iou_thresh 0.3 the 0.4 proposal falls between the thresholds: ignored (-1)
    between, _ = make_pair(bg_iou_thresh=0.3)
    assert between.label_proposals(proposals, gt, torch.tensor([3]))[0].tolist() == [3, 3, -1, 0]


def test_training_samples_equal_torchvision():
    ours, tv = make_pair(batch_size_per_image=16, positive_fraction=0.25)
    proposals, targets = make_inputs(seed=1)
    torch.manual_seed(7)
    props, labels, deltas = ours.select_training_samples([p.clone() for p in proposals], targets)
    torch.manual_seed(7)
    tv_props, _, tv_labels, tv_deltas = tv.select_training_samples([p.clone() for p in proposals], targets)
    for a, b in zip(props + labels + deltas, tv_props + tv_labels + list(tv_deltas), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for lab in labels:  # 16 sampled, at most 4 (25%) objects
        assert len(lab) == 16 and 1 <= int((lab > 0).sum()) <= 4 and (lab >= 0).all()


# ---- whole module: losses and gradients, detections ------------------------------------------------------------------


@pytest.mark.parametrize("batch_size,fraction,seed", [(512, 0.25, 0), (32, 0.5, 1), (8, 0.25, 2)])
def test_training_losses_and_gradients_equal_torchvision(batch_size, fraction, seed):
    ours, tv = make_pair(batch_size_per_image=batch_size, positive_fraction=fraction)
    proposals, targets = make_inputs(seed=seed)
    feats = {k: v.requires_grad_() for k, v in make_features(seed).items()}
    torch.manual_seed(seed)  # identical seeds: identical random sampling
    losses = ours.train()(feats, proposals, IMAGE_SIZES, targets)[1]
    grads = torch.autograd.grad(sum(losses.values()), [feats["0"], ours.box_predictor.bbox_pred.weight])
    torch.manual_seed(seed)
    tv_losses = tv.train()(feats, proposals, IMAGE_SIZES, targets)[1]
    tv_grads = torch.autograd.grad(sum(tv_losses.values()), [feats["0"], tv.box_predictor.bbox_pred.weight])
    assert list(losses) == ["loss_classifier", "loss_box_reg"]
    for key in losses:
        torch.testing.assert_close(losses[key], tv_losses[key], rtol=0, atol=0)
    assert losses["loss_box_reg"] > 0
    for a, b in zip(grads, tv_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_image_without_objects_is_all_background_with_zero_box_loss():
    ours, tv = make_pair()
    proposals, _ = make_inputs(seed=3)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    torch.manual_seed(0)
    _, labels, deltas = ours.train().select_training_samples(proposals, empty)
    assert all((lab == 0).all() for lab in labels) and all(torch.isfinite(d).all() for d in deltas)
    losses = ours(make_features(), proposals, IMAGE_SIZES, empty)[1]
    tv_losses = tv.train()(make_features(), proposals, IMAGE_SIZES, empty)[1]
    assert losses["loss_box_reg"].item() == 0.0 and torch.isfinite(losses["loss_classifier"])
    torch.testing.assert_close(losses["loss_classifier"], tv_losses["loss_classifier"], rtol=0, atol=0)
    # a batch mixing an empty image and a normal one
    _, targets = make_inputs(seed=3)
    mixed = ours(make_features(), proposals, IMAGE_SIZES, [empty[0], targets[1]])[1]
    assert all(torch.isfinite(v) for v in mixed.values())


@pytest.mark.parametrize("kwargs", [{}, {"score_thresh": 0.0, "detections_per_img": 7}, {"nms_thresh": 0.3}])
def test_detections_equal_torchvision(kwargs):
    ours, tv = make_pair(**kwargs)
    ours.eval(), tv.eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # larger deltas than a random init gives, so that decoding and clipping matter
        ours.box_predictor.bbox_pred.weight.mul_(20)
        ours.box_predictor.cls_score.weight.mul_(5)
    tv.box_predictor.load_state_dict(ours.box_predictor.state_dict())
    # include boxes crossing the image borders and an empty image
    proposals = [torch.cat([random_boxes(60, 200, 300, g), torch.tensor([[-20.0, -10, 50, 40], [250, 150, 330, 260]])]),
                 torch.zeros(0, 4)]
    dets = ours(make_features(4), proposals, IMAGE_SIZES)[0]
    tv_dets = tv(make_features(4), proposals, IMAGE_SIZES)[0]
    assert len(dets) == 2 and len(dets[0]["boxes"]) > 0 and len(dets[1]["boxes"]) == 0
    for d, t in zip(dets, tv_dets, strict=True):
        assert d.keys() == t.keys() == {"boxes", "labels", "scores"}
        for key in d:
            torch.testing.assert_close(d[key], t[key], rtol=0, atol=0)
    boxes = dets[0]["boxes"]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 300).all() and (boxes[:, 3] <= 200).all()
    assert (dets[0]["labels"] >= 1).all() and (dets[0]["scores"] > kwargs.get("score_thresh", 0.05)).all()
    assert len(boxes) <= kwargs.get("detections_per_img", 100)


def test_postprocess_golden():
    """Two proposals, K = 3, zero deltas: each class's box is the proposal itself (clipped)."""
    ours, _ = make_pair(score_thresh=0.2, nms_thresh=0.5, detections_per_img=100)
    proposals = [torch.tensor([[10.0, 10, 50, 50], [12, 12, 52, 52]])]  # IoU = 38^2 / (2*1600 - 38^2) = 0.822
    deltas = torch.zeros(2, 12)
    # RoI 0: softmax(0, 2, 1) = (0.090, 0.665, 0.245); RoI 1: softmax(0, 1.5, 1.6) = (0.100, 0.429, 0.474)
    logits = torch.tensor([[0.0, 2.0, 1.0], [0.0, 1.5, 1.6]])
    det = ours.postprocess_detections(logits, deltas, proposals, [(100, 100)])[0]
    # candidates above 0.2: (RoI0, c1) 0.665, (RoI1, c2) 0.474, (RoI1, c1) 0.429, (RoI0, c2) 0.245.
    # Within class 1, RoI1 (0.429) overlaps RoI0 (0.665) at IoU 0.82 > 0.5: suppressed; same in class 2 for RoI0.
    # Across classes nothing is suppressed: a class-1 box and a class-2 box may overlap.
    assert det["labels"].tolist() == [1, 2]
    torch.testing.assert_close(det["boxes"], torch.tensor([[10.0, 10, 50, 50], [12, 12, 52, 52]]))
    expected = [torch.softmax(logits[0], 0)[1].item(), torch.softmax(logits[1], 0)[2].item()]
    torch.testing.assert_close(det["scores"], torch.tensor(expected))
    # a proposal hanging over the right border is clipped to the 100-px-wide image
    det = ours.postprocess_detections(logits[:1], deltas[:1], [torch.tensor([[60.0, 10, 130, 50]])], [(100, 100)])[0]
    assert det["boxes"][:, 2].max().item() == 100.0


def test_training_without_targets_is_an_error():
    ours, _ = make_pair()
    with pytest.raises(ValueError, match="targets"):
        ours.train()(make_features(), make_inputs()[0], IMAGE_SIZES, None)
