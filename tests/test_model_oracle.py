"""The whole detector against torchvision: from_torchvision(tv) must detect and train exactly like tv.

tv is fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=21) with a fixed seed: random
weights, so the detections are meaningless boxes, but they are many (a low box_score_thresh keeps them), and every
one of them must come out the same: same boxes, labels and scores, in the same order.
"""

import pytest
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from frcnn_tutorial import model as M

SMALL = dict(min_size=320, max_size=480)  # keeps the test fast on one core


def build(**kwargs):
    torch.manual_seed(0)
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=21, **kwargs)
    return M.from_torchvision(tv), tv


def images_of_sizes(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def some_targets(images, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for img in images:
        h, w = img.shape[1:]
        xy = torch.rand(3, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        wh = 10 + torch.rand(3, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 21, (3,), generator=g)})
    return targets


def assert_same_detections(ours, tv, images):
    ours.eval(), tv.eval()
    with torch.no_grad():
        dets, tv_dets = ours(images), tv(images)
    for det, tv_det, image in zip(dets, tv_dets, images, strict=True):
        assert len(det["boxes"]) > 0, "no detections: the comparison would prove nothing"
        torch.testing.assert_close(det["boxes"], tv_det["boxes"], rtol=0, atol=1e-4)
        assert torch.equal(det["labels"], tv_det["labels"])
        torch.testing.assert_close(det["scores"], tv_det["scores"], rtol=0, atol=1e-5)
        # in the ORIGINAL image's coordinates
        assert det["boxes"][:, 2].max() <= image.shape[2] + 1e-3 and det["boxes"][:, 3].max() <= image.shape[1] + 1e-3
    return dets


def assert_same_training_step(ours, tv, images, targets, seeds=(0, 0)):
    ours.train(), tv.train()
    torch.manual_seed(seeds[0])
    losses = ours(images, targets)
    sum(losses.values()).backward()
    torch.manual_seed(seeds[1])
    tv_losses = tv(images, targets)
    sum(tv_losses.values()).backward()
    assert set(losses) == set(tv_losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    for key in losses:
        torch.testing.assert_close(losses[key], tv_losses[key], rtol=1e-5, atol=1e-6)
    theirs = dict(tv.named_parameters())
    for name in ("roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_head.fc6.weight",
                 "rpn.head.cls_logits.weight", "backbone.body.layer4.2.conv3.weight", "backbone.body.conv1.weight"):
        ours_grad = dict(ours.named_parameters())[M.torchvision_key_to_ours(name)].grad
        # The backward through RoIAlign is ours (pooling.roi_align_fast: a sparse product, the kernel's sums in
        # another order), so fp32 rounding differs; deep in the trunk it is measured against the gradient's scale.
        scale = float(theirs[name].grad.abs().max())
        torch.testing.assert_close(ours_grad, theirs[name].grad, rtol=1e-4, atol=max(1e-6, 1e-4 * scale))
    return losses


def test_default_settings_same_detections():
    # torchvision's defaults (800 / 1333, 1000 proposals, ...) except a low score threshold, so that a random
    # 21-class head (scores near 1/21 = 0.048) still produces detections to compare
    ours, tv = build(box_score_thresh=0.01)
    assert ours.transform.min_size == (800,) and ours.transform.max_size == 1333
    # elongated images: the max_size limit decides their scale (100x300 -> 444x1333, 240x120 -> 1333x666)
    assert_same_detections(ours, tv, images_of_sizes([(100, 300), (240, 120)]))


NON_DEFAULT = dict(min_size=320, max_size=480, rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300,
                   rpn_nms_thresh=0.6, box_score_thresh=0.01, box_nms_thresh=0.4, box_detections_per_img=50,
                   bbox_reg_weights=(5.0, 5.0, 2.0, 2.0), image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25],
                   size_divisible=64)


def test_non_default_settings_are_copied_and_give_same_detections():
    ours, tv = build(**NON_DEFAULT)
    t, rpn, roi = ours.transform, ours.rpn, ours.roi_heads
    assert (t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible) == (
        (320,), 480, [0.5, 0.4, 0.3], [0.2, 0.3, 0.25], 64)
    assert rpn.pre_nms_top_n["testing"] == 500 and rpn.post_nms_top_n["testing"] == 300 and rpn.nms_thresh == 0.6
    assert (roi.score_thresh, roi.nms_thresh, roi.detections_per_img) == (0.01, 0.4, 50)
    assert tuple(roi.box_coder.weights) == (5.0, 5.0, 2.0, 2.0)
    dets = assert_same_detections(ours, tv, images_of_sizes([(200, 300), (320, 240), (250, 250)], seed=1))
    assert max(len(d["boxes"]) for d in dets) == 50  # the cap is reached: detections_per_img really applies


def test_training_sampling_everything_gives_identical_losses_and_gradients():
    # huge sample sizes and positive_fraction 1: every labelled anchor / proposal is used, nothing is random,
    # so even DIFFERENT seeds give the same losses
    ours, tv = build(rpn_batch_size_per_image=10**6, rpn_positive_fraction=1.0, box_batch_size_per_image=10**6,
                     box_positive_fraction=1.0, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_train=500, **SMALL)
    images = images_of_sizes([(200, 300), (300, 240)], seed=2)
    losses = assert_same_training_step(ours, tv, images, some_targets(images), seeds=(1, 2))
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())


def test_training_with_random_sampling_and_the_same_seed():
    ours, tv = build(rpn_pre_nms_top_n_train=500, rpn_post_nms_top_n_train=300, **SMALL)
    images = images_of_sizes([(240, 200), (180, 320)], seed=3)
    targets = some_targets(images, seed=3)
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}  # no objects
    assert_same_training_step(ours, tv, images, targets)


@pytest.fixture(scope="module")
def small_model():
    return build(**SMALL)[0]


def test_image_without_objects_trains_with_zero_box_loss(small_model):
    ours = small_model
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = ours.train()(images_of_sizes([(160, 200)]), empty)
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_rpn_box_reg"].item() == 0.0
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("bad_box", [[50.0, 10.0, 40.0, 30.0], [5.0, 5.0, float("nan"), 9.0], [1.0, 1.0, 1.0, 9.0]])
def test_bad_targets_raise_before_any_computation(bad_box, small_model):
    ours = small_model
    images = images_of_sizes([(100, 120), (100, 120)])
    targets = some_targets(images)
    targets[1]["boxes"][2] = torch.tensor(bad_box)
    called = []
    hook = ours.backbone.register_forward_hook(lambda *args: called.append(1))
    with pytest.raises(ValueError, match="image 1, box 2"):
        ours.train()(images, targets)
    hook.remove()
    assert not called  # the check comes before the backbone, so no loss (and no NaN) is ever computed


def test_pretrained_layout_frozen_batch_norms_and_frozen_layers_are_copied():
    """The layout of torchvision's COCO detector: FrozenBatchNorm2d with eps 0 (overwrite_eps), conv1 and layer1
    frozen (trainable_backbone_layers=3). Built here without downloading: random weights, random BN statistics."""
    from torchvision.models.detection import FasterRCNN as TVFasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    body = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                               trainable_layers=3)
    tv = TVFasterRCNN(body, num_classes=21, box_score_thresh=0.01, **SMALL)
    for module in tv.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.eps = 0.0
            module.running_var.uniform_(0.5, 2.0)
            module.running_mean.uniform_(-0.1, 0.1)
            module.bias.uniform_(-0.1, 0.1)
    ours = M.from_torchvision(tv.eval())
    assert not ours.training
    flags = {M.torchvision_key_to_ours(k): p.requires_grad for k, p in tv.named_parameters()}
    assert {k: p.requires_grad for k, p in ours.named_parameters()} == flags
    assert not flags["backbone.body.layer1.0.conv1.weight"] and flags["backbone.body.layer2.0.conv1.weight"]
    assert all(m.eps == 0.0 for m in ours.backbone.body.modules() if hasattr(m, "running_var"))
    assert_same_detections(ours, tv, images_of_sizes([(200, 260), (150, 300)], seed=4))
