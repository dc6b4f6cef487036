"""model.py: the visible transform, input validation, the assembled detector and its builders.

The whole-model comparison with torchvision (same weights, same detections and losses) is in test_model_oracle.py.
"""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from frcnn_tutorial import model as M

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

def images_of_sizes(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]

def targets_for(images, seed=0):
    """Two valid boxes per image, inside it, labels 1 and 2."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for img in images:
        h, w = img.shape[1:]
        xy = torch.rand(2, 2, generator=g) * torch.tensor([w / 2, h / 2])
        wh = 4 + torch.rand(2, 2, generator=g) * torch.tensor([w / 2 - 4, h / 2 - 4])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.tensor([1, 2])})
    return targets

# ---- ImageTransform ---------------------------------------------------------------------------------------------

def test_resized_size_golden():
    # 480x640 -> shorter side 800: scale 800/480 = 1.6667, longer side 640 * 1.6667 = 1066.67 <= 1333 -> 800x1066
    assert M.resized_size(480, 640, 800, 1333) == (800, 1066)
    # 100x1000: 800/100 = 8 would make the long side 8000 > 1333, so the long side decides: 1333/1000 = 1.333,
    # 100 * 1.333 = 133.3 -> 133 (truncated, as F.interpolate's recompute_scale_factor does)
    assert M.resized_size(100, 1000, 800, 1333) == (133, 1333)
    # the VGG16 set-up (600, 1000) on a 375x500 VOC image: 600/375 = 1.6 -> 600x800
    assert M.resized_size(375, 500, 600, 1000) == (600, 800)

def test_batch_is_padded_to_multiples_of_32_with_zeros():
    t = M.ImageTransform(800, 1333).eval()
    batch, sizes, _ = t(images_of_sizes([(480, 640), (240, 320)]))
    # 800x1066 and 800x1066 -> padded to 800x1088 (1066 rounded up to 34*32); 800 is already 25*32
    assert sizes == [(800, 1066), (800, 1066)] and batch.shape == (2, 3, 800, 1088)
    assert batch[:, :, :, 1066:].abs().sum() == 0

@pytest.mark.parametrize("min_size,max_size", [(320, 480), (800, 1333), ((256, 288, 320), 400)])
@pytest.mark.parametrize("training", [False, True])
def test_transform_equals_torchvision(min_size, max_size, training):
    images = images_of_sizes([(200, 300), (333, 217), (97, 480), (320, 320)])
    targets = targets_for(images)
    ours = M.ImageTransform(min_size, max_size, MEAN, STD).train(training)
    tv = GeneralizedRCNNTransform(min_size, max_size, MEAN, STD).train(training)
    torch.manual_seed(5)  # multi-scale training draws a min_size per image: same draws as torchvision's
    batch, sizes, new_targets = ours(images, targets)
    torch.manual_seed(5)
    tv_images, tv_targets = tv(images, targets)
    assert torch.equal(batch, tv_images.tensors)
    assert sizes == [tuple(s) for s in tv_images.image_sizes]
    for a, b in zip(new_targets, tv_targets, strict=True):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    # postprocess: boxes from resized back to original coordinates, as torchvision
    dets = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(2)} for t in new_targets]
    originals = [tuple(img.shape[1:]) for img in images]
    back = ours.eval().postprocess(dets, sizes, originals)
    tv_back = tv.eval().postprocess([dict(d) for d in dets], tv_images.image_sizes, originals)
    for a, b, t in zip(back, tv_back, targets, strict=True):
        assert torch.equal(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["boxes"], t["boxes"])  # round trip

def test_transform_keeps_caller_targets_and_prints_settings():
    images = images_of_sizes([(100, 150)])
    targets = targets_for(images)
    before = targets[0]["boxes"].clone()
    t = M.ImageTransform(300, 500, size_divisible=16)
    t(images, targets)
    assert torch.equal(targets[0]["boxes"], before)
    text = repr(t)
    for piece in ("mean=[0.485, 0.456, 0.406]", "std=[0.229, 0.224, 0.225]", "min_size=(300,)", "max_size=500",
                  "size_divisible=16"):
        assert piece in text

def test_eval_uses_the_last_min_size_and_no_randomness():
    t = M.ImageTransform((200, 300, 400), 1000).eval()
    state = torch.get_rng_state()
    _, sizes, _ = t(images_of_sizes([(100, 100)]))
    assert sizes == [(400, 400)] and torch.equal(state, torch.get_rng_state())

def test_test_sizes_apply_in_eval_only():
    t = M.ImageTransform((200, 300), 400, test_min_size=350, test_max_size=500)
    assert t.eval()(images_of_sizes([(100, 200)]))[1] == [(250, 500)]  # the test max_size binds: 350 x 700 > 500
    assert t.eval()(images_of_sizes([(100, 100)]))[1] == [(350, 350)]
    assert min(t.train()(images_of_sizes([(100, 100)]))[1][0]) in (200, 300)
    assert "Resize in eval: min_size=350, max_size=500" in repr(t)
    assert "in eval" not in repr(M.ImageTransform(200, 400))


def test_a_size_generator_gives_one_size_per_training_batch():
    """Multi-scale training as the train loop runs it: one size per batch, drawn from the generator alone."""
    t = M.ImageTransform((200, 300, 400), 1000).train()
    t.size_generator = torch.Generator()
    images = images_of_sizes([(100, 150), (120, 90), (80, 80)])
    seen = set()
    for seed in range(20):
        t.size_generator.manual_seed(seed)
        state = torch.get_rng_state()
        _, sizes, _ = t(images)
        assert torch.equal(state, torch.get_rng_state())  # torch's own RNG is left to the samplers
        shorter_sides = {min(hw) for hw in sizes}
        assert len(shorter_sides) == 1, sizes
        seen |= shorter_sides
        t.size_generator.manual_seed(seed)
        assert t(images)[1] == sizes  # the same seed draws the same size
    assert seen == {200, 300, 400}

# ---- input validation -------------------------------------------------------------------------------------------

GOOD = {"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([1])}

@pytest.mark.parametrize(
    "boxes,labels,message",
    [
        ([[1.0, 2.0, 30.0, 40.0], [10.0, 5.0, 4.0, 20.0]], [1, 2], "image 1, box 1: [10.0, 5.0, 4.0, 20.0]"),  # x2<x1
        ([[10.0, 5.0, 20.0, 5.0]], [1], "image 1, box 0"),  # zero height: torchvision needs positive size
        ([[1.0, float("nan"), 3.0, 4.0]], [1], "image 1, box 0: [1.0, nan, 3.0, 4.0]"),
        ([[1.0, 2.0, float("inf"), 4.0]], [1], "image 1, box 0"),
        ([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]], [1, 3], "image 1, box 1: label 3 is outside 0..2"),
        ([[1.0, 2.0, 3.0, 4.0]], [-1], "image 1, box 0: label -1"),
    ],
)
def test_bad_targets_name_the_image_and_box(boxes, labels, message):
    images = images_of_sizes([(50, 60), (50, 60)])
    targets = [GOOD, {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)}]
    with pytest.raises(ValueError) as err:
        M.check_inputs(images, targets, num_classes=3, training=True)
    assert message in str(err.value)

@pytest.mark.parametrize(
    "image,message",
    [
        (torch.rand(1, 50, 60), "image 1: expected a float tensor [3, H, W], got (1, 50, 60)"),
        (torch.rand(50, 60), "image 1"),
        (torch.rand(2, 3, 50, 60), "image 1"),
        ((torch.rand(3, 50, 60) * 255).to(torch.uint8), "image 1: expected a float tensor with values in 0..1"),
        (torch.rand(3, 0, 60), "image 1"),
    ],
)
def test_bad_images_are_named(image, message):
    with pytest.raises(ValueError) as err:
        M.check_inputs([torch.rand(3, 50, 60), image], None, num_classes=3, training=False)
    assert message in str(err.value)

def test_target_structure_errors():
    images = images_of_sizes([(50, 60)])
    with pytest.raises(ValueError, match="targets are required"):
        M.check_inputs(images, None, 3, training=True)
    with pytest.raises(ValueError, match="one target per image"):
        M.check_inputs(images, [GOOD, GOOD], 3, training=True)
    with pytest.raises(ValueError, match="int64"):
        M.check_inputs(images, [{"boxes": GOOD["boxes"], "labels": torch.tensor([1.0])}], 3, training=True)
    with pytest.raises(ValueError, match=r"float tensor \[G, 4\]"):
        M.check_inputs(images, [{"boxes": torch.tensor([1, 2, 3, 4]), "labels": torch.tensor([1])}], 3, True)
    # an image without objects is valid: boxes [0, 4], labels [0]
    M.check_inputs(images, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}], 3, True)

def test_nan_free_on_valid_extremes():
    """Tiny (0.01 px) and image-sized boxes are valid and must not be rejected."""
    images = images_of_sizes([(50, 60)])
    target = {"boxes": torch.tensor([[0.0, 0.0, 0.01, 0.01], [0.0, 0.0, 60.0, 50.0]]), "labels": torch.tensor([1, 2])}
    M.check_inputs(images, [target], 3, training=True)


# ---- builders and the assembled model ---------------------------------------------------------------------------


def test_vgg16_is_the_papers_set_up():
    from frcnn_tutorial.pooling import SingleScaleRoIPool

    torch.manual_seed(0)
    model = M.faster_rcnn_vgg16(num_classes=21)
    assert model.transform.min_size == (600,) and model.transform.max_size == 1000
    rpn, roi = model.rpn, model.roi_heads
    assert rpn.anchor_generator.sizes == ((128, 256, 512),) and rpn.anchor_generator.num_anchors_per_location() == [9]
    assert rpn.pre_nms_top_n == {"training": 12000, "testing": 6000}
    assert rpn.post_nms_top_n == {"training": 2000, "testing": 300}
    assert isinstance(roi.box_roi_pool, SingleScaleRoIPool) and roi.box_roi_pool.spatial_scale == 1 / 16
    assert roi.box_roi_pool.output_size == (7, 7)
    assert roi.box_head.fc6.in_features == 512 * 7 * 7 and roi.box_head.fc7.out_features == 4096
    assert roi.box_predictor.cls_score.in_features == 4096 and model.num_classes == 21
    assert roi.box_predictor.bbox_pred.out_features == 4 * 21  # class-specific boxes
    assert roi.fg_bg_sampler.batch_size_per_image == 128 and roi.nms_thresh == 0.3
    small = M.faster_rcnn_vgg16(num_classes=21, min_size=128, max_size=192)  # kwargs override; small for speed
    assert small.transform.min_size == (128,) and small.rpn.post_nms_top_n["testing"] == 300
    images = images_of_sizes([(120, 160)])
    losses = small.train()(images, targets_for(images))
    assert all(torch.isfinite(v) for v in losses.values())


def test_resnet50_fpn_builder_loads_torchvision_weights():
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    ours = M.faster_rcnn_resnet50_fpn(num_classes=21)
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=21)
    state = {M.torchvision_key_to_ours(k): v for k, v in tv.state_dict().items()}
    ours.load_state_dict(state, strict=True)  # same layout, key for key
    # from scratch, as torchvision: ordinary batch norms, every layer trains
    assert isinstance(ours.backbone.body.bn1, torch.nn.BatchNorm2d)
    assert all(p.requires_grad for p in ours.parameters())
    with pytest.warns(UserWarning, match="trainable_layers=3 ignored"):
        M.faster_rcnn_resnet50_fpn(num_classes=3, trainable_layers=3)


def test_tiny_fpn_trains_and_detects_in_original_coordinates():
    torch.manual_seed(0)
    model = M.faster_rcnn_tiny_fpn(num_classes=4)
    assert model.transform.min_size == (256,) and model.transform.max_size == 384
    assert model.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    assert model.roi_heads.box_head.fc7.out_features == 256
    images = images_of_sizes([(128, 200), (320, 180)])
    targets = targets_for(images)
    targets[0]["labels"] = torch.tensor([1, 3])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    history = []
    for _ in range(12):  # overfit two images: the summed loss must drop
        losses = model(images, targets)
        assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert history[-1] < 0.7 * history[0]
    model.eval().roi_heads.score_thresh = 0.0
    with torch.no_grad():
        dets = model(images)
    for det, image in zip(dets, images, strict=True):
        assert det.keys() == {"boxes", "labels", "scores"} and len(det["boxes"]) > 0
        h, w = image.shape[1:]
        assert det["boxes"][:, 2].max() <= w and det["boxes"][:, 3].max() <= h  # original, not resized, pixels
        assert det["labels"].min() >= 1 and det["labels"].max() <= 3


def test_tiny_fpn_rpn_without_p2_proposes_from_p3_up_and_still_pools_p2():
    torch.manual_seed(0)
    model = M.faster_rcnn_tiny_fpn(num_classes=4, fpn_channels=32, sampling_ratio=1, rpn_on_p2=False, min_size=128,
                                   max_size=192)
    assert model.roi_heads.box_roi_pool.sampling_ratio == 1
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    assert model.rpn_feature_names == ["1", "2", "3", "pool"]
    assert model.rpn.anchor_generator.sizes == ((16, 23), (32, 45), (64, 91), (128, 181))
    images = images_of_sizes([(128, 192)])  # not resized: P3..P6 are 16x24, 8x12, 4x6, 2x3
    seen = []
    model.rpn.anchor_generator.register_forward_hook(lambda module, args, anchors: seen.append(len(anchors)))
    losses = model.train()(images, targets_for(images))
    assert all(torch.isfinite(v) for v in losses.values())
    assert seen == [6 * (16 * 24 + 8 * 12 + 4 * 6 + 2 * 3)]  # 2 sizes x 3 ratios per location, no P2
    sum(losses.values()).backward()
    assert model.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0  # P2 still trains, through the box head


def test_builders_take_a_replacement_part():
    """A part passed to a builder replaces its own (a keyword the builder also sets must not clash), and the box
    head that follows is sized for the pooler that was given."""
    from frcnn_tutorial.anchors import fpn_anchor_generator
    from frcnn_tutorial.pooling import SingleScaleRoIPool

    pool = SingleScaleRoIPool("2", output_size=5, spatial_scale=1 / 16)
    model = M.faster_rcnn_tiny_fpn(num_classes=4, box_roi_pool=pool, rpn_anchor_generator=fpn_anchor_generator())
    assert model.roi_heads.box_roi_pool is pool and model.roi_heads.box_head.fc6.in_features == 64 * 5 * 5
    assert model.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    images = images_of_sizes([(128, 160)])
    assert all(torch.isfinite(v) for v in model.train()(images, targets_for(images)).values())
    vgg = M.faster_rcnn_vgg16(num_classes=3, box_roi_pool=SingleScaleRoIPool("0", 7, 1 / 16), min_size=128)
    assert vgg.roi_heads.box_head.fc6.in_features == 512 * 7 * 7
    with pytest.raises(ValueError, match="7x7"):
        M.faster_rcnn_vgg16(num_classes=3, box_roi_pool=pool)


def test_single_scale_tiny_model_is_the_fpn_model_without_the_pyramid():
    """faster_rcnn_tiny: one stride-16 map, 15 anchors per location (5 sizes x 3 ratios), either pooler, same head."""
    from frcnn_tutorial.pooling import MultiScaleRoIAlign, SingleScaleRoIPool

    align, pool = M.faster_rcnn_tiny(num_classes=4), M.faster_rcnn_tiny(num_classes=4, pooler="pool")
    assert isinstance(align.roi_heads.box_roi_pool, MultiScaleRoIAlign)
    assert isinstance(pool.roi_heads.box_roi_pool, SingleScaleRoIPool)
    assert align.rpn.anchor_generator.num_anchors_per_location() == [15]
    images = images_of_sizes([(128, 160), (96, 112)])
    features = align.backbone(torch.zeros(1, 3, 128, 160))
    assert list(features) == ["0"] and tuple(features["0"].shape) == (1, 64, 8, 10)  # stride 16
    for model in (align, pool):
        assert all(torch.isfinite(v) for v in model.train()(images, targets_for(images)).values())
    with pytest.raises(ValueError, match="pooler must be 'align' or 'pool'"):
        M.faster_rcnn_tiny(num_classes=4, pooler="max")


def test_num_classes_follows_a_swapped_predictor():
    from frcnn_tutorial.roi_heads import FastRCNNPredictor

    model = M.faster_rcnn_tiny_fpn(num_classes=10)
    model.roi_heads.box_predictor = FastRCNNPredictor(256, 3)  # fine-tuning on 2 classes + background
    images = images_of_sizes([(100, 100)])
    target = {"boxes": torch.tensor([[1.0, 1.0, 20.0, 20.0]]), "labels": torch.tensor([5])}
    with pytest.raises(ValueError, match="image 0, box 0: label 5 is outside 0..2"):
        model.train()(images, [target])


def test_constructor_needs_exactly_one_of_num_classes_and_predictor():
    from frcnn_tutorial.backbones import tiny_fpn_backbone
    from frcnn_tutorial.roi_heads import FastRCNNPredictor

    with pytest.raises(ValueError, match="exactly one"):
        M.FasterRCNN(tiny_fpn_backbone(), num_classes=None)
    with pytest.raises(ValueError, match="exactly one"):
        M.FasterRCNN(tiny_fpn_backbone(), num_classes=3, box_predictor=FastRCNNPredictor(1024, 3))


def test_tiny_fpn_without_p2_output_conv_uses_the_top_down_sum_as_p2():
    torch.manual_seed(0)
    model = M.faster_rcnn_tiny_fpn(num_classes=4, fpn_channels=32, rpn_on_p2=False, p2_output_conv=False,
                                   min_size=128, max_size=192)
    fpn = model.backbone.fpn
    assert not any(name.startswith("layer_blocks.0.") for name, _ in fpn.named_parameters())
    assert all(isinstance(block[0], torch.nn.Conv2d) for block in fpn.layer_blocks[1:])  # P3..P5 keep theirs
    c = model.backbone.body(torch.randn(1, 3, 128, 192))
    p3_inner = fpn.inner_blocks[1](c["1"]) + F.interpolate(
        fpn.inner_blocks[2](c["2"]) + F.interpolate(fpn.inner_blocks[3](c["3"]), size=c["2"].shape[-2:]),
        size=c["1"].shape[-2:])
    p2_by_hand = fpn.inner_blocks[0](c["0"]) + F.interpolate(p3_inner, size=c["0"].shape[-2:])
    torch.testing.assert_close(fpn(c)["0"], p2_by_hand)
    images = images_of_sizes([(128, 192)])
    losses = model.train()(images, targets_for(images))
    sum(losses.values()).backward()
    assert fpn.inner_blocks[0][0].weight.grad.abs().sum() > 0  # C2's lateral still trains, through the box head
