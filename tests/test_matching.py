"""matching.py against torchvision's detection._utils Matcher / BalancedPositiveNegativeSampler, plus golden cases."""

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler as TVSampler
from torchvision.models.detection._utils import Matcher as TVMatcher

from frcnn_tutorial.boxes import box_iou
from frcnn_tutorial.matching import BalancedPositiveNegativeSampler, Matcher


def random_boxes(n, seed, size=200.0, max_wh=80.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * max_wh + 1], dim=1)


def iou_cases():
    """IoU matrices [G, P]: random boxes, quantised (many exact ties), one gt, one prediction, borders."""
    anchors = random_boxes(300, seed=0)
    gt = random_boxes(6, seed=1)
    yield "random", box_iou(gt, anchors)
    yield "ties", (box_iou(gt, anchors) * 10).round() / 10  # IoUs in steps of 0.1: ties everywhere
    yield "one_gt", box_iou(gt[:1], anchors)
    yield "one_prediction", box_iou(gt, anchors[:1])
    border_gt = torch.tensor([[0.0, 0.0, 30.0, 30.0], [150.0, 150.0, 280.0, 280.0]])  # at the image corners
    yield "borders", box_iou(border_gt, anchors)
    yield "gt_overlapping_nothing", box_iou(torch.tensor([[900.0, 900.0, 950.0, 950.0]]), anchors)


@pytest.mark.parametrize("case", [name for name, _ in iou_cases()])
@pytest.mark.parametrize("high,low,allow", [(0.7, 0.3, True), (0.7, 0.3, False), (0.5, 0.5, False), (0.5, 0.5, True)])
def test_matcher_matches_torchvision(case, high, low, allow):
    iou = dict(iou_cases())[case]
    ours = Matcher(high, low, allow)(iou)
    assert ours.dtype == torch.int64 and ours.shape == (iou.shape[1],)
    assert torch.equal(ours, TVMatcher(high, low, allow)(iou.clone()))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_matcher_raises_on_empty_like_torchvision(shape):
    iou = torch.zeros(shape)
    with pytest.raises(ValueError):
        TVMatcher(0.7, 0.3, True)(iou)
    with pytest.raises(ValueError, match="empty IoU matrix"):
        Matcher(0.7, 0.3, True)(iou)


def test_matcher_rejects_crossed_thresholds():
    with pytest.raises(ValueError, match="low_threshold"):
        Matcher(0.3, 0.7)


def test_matcher_golden():
    # 2 ground-truth boxes x 5 anchors, thresholds 0.7 / 0.3 (the RPN's)
    iou = torch.tensor([
        # a0    a1    a2    a3    a4
        [0.80, 0.50, 0.10, 0.20, 0.00],  # gt 0
        [0.10, 0.60, 0.65, 0.25, 0.00],  # gt 1
    ])
    # best gt per anchor: a0 gt0 (0.80), a1 gt1 (0.60), a2 gt1 (0.65), a3 gt1 (0.25), a4 gt0 (0.00, a tie: first wins)
    # a0: 0.80 >= 0.7 -> 0; a1, a2: in [0.3, 0.7) -> -2 (ignored); a3, a4: < 0.3 -> -1 (background)
    assert Matcher(0.7, 0.3)(iou).tolist() == [0, -2, -2, -1, -1]
    # low-quality matches: gt 1's best anchor is a2 (0.65 < 0.7); it becomes positive for gt 1.
    # gt 0's best anchor a0 is already matched.
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou).tolist() == [0, -2, 1, -1, -1]


def test_matcher_golden_low_quality_tie_and_borrowed_match():
    iou = torch.tensor([
        [0.40, 0.40, 0.10],  # gt 0: its best IoU 0.40 is reached by a0 AND a1 (a tie: both are restored)
        [0.20, 0.50, 0.05],  # gt 1: best anchor a1 (0.50)
    ])
    # without the rule everything is in [0.3, 0.7) or below: [-2, -2, -1]
    # with it: a0 -> its best gt, 0; a1 is gt 0's (tied) best AND gt 1's best; it gets ITS best gt, 1
    assert Matcher(0.7, 0.3, True)(iou).tolist() == [0, 1, -1]


# ----------------------------------------------------------------------------- sampler


def label_cases(seed=0):
    """Per-image labels: 1/0/-1 for the RPN, and class numbers > 1 for the box head."""
    g = torch.Generator().manual_seed(seed)
    rpn = torch.randint(-1, 2, (2000,), generator=g)  # ~667 positives: more than the batch allows
    few_pos = torch.where(torch.rand(2000, generator=g) < 0.005, 1, 0)  # ~10 positives, many negatives
    no_pos = torch.zeros(500, dtype=torch.int64)  # a background-only image
    all_ignored = torch.full((300,), -1)
    classes = torch.randint(0, 21, (700,), generator=g)  # box head: 0 background, 1..20 objects
    tiny = torch.tensor([1, 0, -1])
    return [rpn, few_pos, no_pos, all_ignored, classes, tiny]


@pytest.mark.parametrize("batch,fraction", [(256, 0.5), (512, 0.25), (1, 0.5), (10**6, 0.5)])
def test_sampler_draws_exactly_what_torchvision_draws(batch, fraction):
    labels = label_cases()
    torch.manual_seed(123)
    ours_pos, ours_neg = BalancedPositiveNegativeSampler(batch, fraction)(labels)
    ours_next = torch.rand(3)  # the generator must be left in the same state
    torch.manual_seed(123)
    tv_pos, tv_neg = TVSampler(batch, fraction)(labels)
    tv_next = torch.rand(3)
    for ours, theirs in zip(ours_pos + ours_neg, tv_pos + tv_neg, strict=True):
        assert ours.dtype == torch.bool
        assert torch.equal(ours, theirs.bool())
    assert torch.equal(ours_next, tv_next)


def test_sampler_golden_counts():
    labels = torch.tensor([1] * 10 + [0] * 1000 + [-1] * 50)
    torch.manual_seed(0)
    (pos,), (neg,) = BalancedPositiveNegativeSampler(256, 0.5)([labels])
    # at most 256 * 0.5 = 128 positives, but only 10 exist: all 10 are taken and negatives fill 256 - 10 = 246
    assert pos.sum() == 10 and neg.sum() == 246
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()  # never an ignored (-1) one
    labels = torch.tensor([1] * 300 + [0] * 50)
    (pos,), (neg,) = BalancedPositiveNegativeSampler(256, 0.5)([labels])
    # 300 positives are capped at 128; the 256 - 128 = 128 negative places find only 50 negatives
    assert pos.sum() == 128 and neg.sum() == 50


def test_matcher_quirk_a_gt_box_overlapping_no_anchor_makes_every_anchor_positive():
    # torchvision's rule, kept on purpose: this gt box's best IoU is 0, so every anchor "ties" for its best
    # and gets its own best gt (index 0 when all IoUs are 0) -> all positive. Targets must be sane boxes
    # inside the image (the model checks them) before they reach the matcher.
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    iou = box_iou(torch.tensor([[100.0, 100.0, 110.0, 110.0]]), anchors)  # far from both anchors: [[0, 0]]
    assert Matcher(0.7, 0.3, True)(iou).tolist() == [0, 0] == TVMatcher(0.7, 0.3, True)(iou).tolist()
    assert Matcher(0.7, 0.3, False)(iou).tolist() == [-1, -1]
