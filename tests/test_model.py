"""model.py: the visible transform, input validation, the assembled detector and its builders.

The whole-model comparison with torchvision (same weights, same detections and losses) is in test_model_oracle.py.
"""

import pytest
import torch
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
