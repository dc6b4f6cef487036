"""The whole detector: transform -> backbone -> RPN -> RoI heads -> boxes back in original image coordinates.

Shape shorthand: N images, H x W the size of one input image, H' x W' its resized size, Hb x Wb the padded batch
size (multiples of 32), G ground-truth boxes of one image, R proposals, K classes INCLUDING background (label 0),
C backbone channels, D detections of one image.

Data contract: images are a list of float tensors [3, H, W] in 0..1 (sizes may differ); targets are a list of
{"boxes": [G, 4] float x1,y1,x2,y2 pixels, "labels": [G] int64}. Training returns torchvision's four losses;
evaluation returns [{"boxes": [D, 4], "labels": [D], "scores": [D]}] in the coordinates of the ORIGINAL images.

Also here: the builders (the paper's VGG16 model, ResNet-50-FPN, a tiny CPU model) and from_torchvision(),
which turns a torchvision FasterRCNN into ours with the same weights and the same settings.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from frcnn_tutorial import backbones
from frcnn_tutorial.anchors import AnchorGenerator, fpn_anchor_generator, vgg16_anchor_generator
from frcnn_tutorial.boxes import BoxCoder
from frcnn_tutorial.matching import Matcher
from frcnn_tutorial.pooling import MultiScaleRoIAlign, SingleScaleRoIPool
from frcnn_tutorial.roi_heads import FastRCNNPredictor, RoIHeads, TwoMLPHead
from frcnn_tutorial.rpn import RegionProposalNetwork, RPNHead

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------------
# The visible input step: resize keeping the aspect ratio, normalise, pad into one batch tensor
# ---------------------------------------------------------------------------------------------------------------


def resized_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(H', W'): the shorter side becomes min_size unless the longer one would then exceed max_size.

    Same arithmetic as torchvision's GeneralizedRCNNTransform: one scale factor for both sides (aspect ratio kept),
    the new size truncated to int, as F.interpolate(scale_factor=s, recompute_scale_factor=True) does.
    e.g. 480x640 with (800, 1333): s = min(800/480, 1333/640) = 1.667 -> 800x1066.
    """
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return int(h * scale), int(w * scale)


def resize_boxes(boxes: Tensor, old_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """Scale boxes [G, 4] from an image of old_size (h, w) to new_size: x by W'/W and y by H'/H (float32 ratios)."""
    ratio_h = _float_ratio(new_size[0], old_size[0], boxes.device)
    ratio_w = _float_ratio(new_size[1], old_size[1], boxes.device)
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


def _float_ratio(new: int, old: int, device) -> Tensor:
    # float32 tensors divided, not Python floats: the same rounding as torchvision
    return torch.tensor(new, dtype=torch.float32, device=device) / torch.tensor(old, dtype=torch.float32, device=device)


class ImageTransform(nn.Module):
    """Images list[[3, H, W]] -> (batch [N, 3, Hb, Wb], image_sizes [(H', W')], targets with resized boxes).

    min_size may be a tuple: in training each image then gets a random one (multi-scale training); in eval the last,
    or test_min_size (and test_max_size) when given: a model trained on small inputs often does better tested larger.
    size_divisible pads the batch so that every stride of the backbone (up to 32) divides it exactly.
    size_generator (None: torchvision's rule, one size per image from torch's RNG) may be a torch.Generator: then a
    training batch gets one size, drawn from it. The training loop seeds it per step, so every image of a step and
    every process get the same size: no image is padded up to a bigger neighbour, no process waits for another.
    """

    def __init__(self, min_size: int | tuple[int, ...] = 800, max_size: int = 1333, image_mean=None, image_std=None,
                 size_divisible: int = 32, test_min_size: int | None = None, test_max_size: int | None = None):
        super().__init__()
        self.min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (min_size,)
        self.max_size = max_size
        self.test_min_size, self.test_max_size = test_min_size, test_max_size
        self.image_mean = list(image_mean if image_mean is not None else IMAGENET_MEAN)
        self.image_std = list(image_std if image_std is not None else IMAGENET_STD)
        self.size_divisible = size_divisible
        self.size_generator: torch.Generator | None = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(\n    Normalize(mean={self.image_mean}, std={self.image_std})\n"
                f"    Resize(min_size={self.min_size}, max_size={self.max_size}, mode='bilinear', keep aspect ratio)\n"
                + (f"    Resize in eval: min_size={self.test_min_size or self.min_size[-1]}, "
                   f"max_size={self.test_max_size or self.max_size}\n"
                   if self.test_min_size or self.test_max_size else "") +
                f"    Pad(batch to a multiple of size_divisible={self.size_divisible}, value 0 after normalising)\n)")

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if targets is not None:
            targets = [dict(t) for t in targets]  # never modify the caller's dicts
        shared_size = self.choose_min_size() if self.size_generator is not None else None  # None: one per image
        resized = []
        for i, image in enumerate(images):
            # Normalise first, then resize (torchvision's order; the two nearly commute, but not to the last bit).
            image = self.resize(self.normalize(image), shared_size)
            if targets is not None:
                targets[i]["boxes"] = resize_boxes(targets[i]["boxes"], image_hw(images[i]), image_hw(image))
            resized.append(image)
        image_sizes = [image_hw(image) for image in resized]
        return self.batch_images(resized), image_sizes, targets

    def normalize(self, image: Tensor) -> Tensor:
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def choose_min_size(self) -> int:
        """Training: a random entry of min_size, drawn from torch's RNG (seeded by seed_everything) even when there
        is only one, exactly as torchvision does, so seeded runs match it draw for draw (from size_generator when
        set). Eval: test_min_size, or else the last entry."""
        if not self.training:
            return self.test_min_size or self.min_size[-1]
        index = int(torch.empty(1).uniform_(0.0, float(len(self.min_size)), generator=self.size_generator).item())
        return self.min_size[index]

    def resize(self, image: Tensor, min_size: int | None = None) -> Tensor:
        """One image, its shorter side to min_size (None: chosen by choose_min_size)."""
        h, w = image_hw(image)
        max_size = self.max_size if self.training else (self.test_max_size or self.max_size)
        new_size = resized_size(h, w, min_size or self.choose_min_size(), max_size)
        return F.interpolate(image[None], size=new_size, mode="bilinear", align_corners=False)[0]

    def batch_images(self, images: list[Tensor]) -> Tensor:
        """Zero-pad at the bottom/right to a common size rounded up to size_divisible; boxes are unaffected."""
        stride = self.size_divisible
        h = int(math.ceil(max(img.shape[1] for img in images) / stride) * stride)
        w = int(math.ceil(max(img.shape[2] for img in images) / stride) * stride)
        batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
        for img, padded in zip(images, batch, strict=True):
            padded[:, : img.shape[1], : img.shape[2]].copy_(img)
        return batch

    def postprocess(self, detections: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]],
                    original_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Map the detected boxes from the resized images back to the original ones (a new list of new dicts)."""
        return [{**det, "boxes": resize_boxes(det["boxes"], size, orig)}
                for det, size, orig in zip(detections, image_sizes, original_sizes, strict=True)]


def image_hw(image: Tensor) -> tuple[int, int]:
    return int(image.shape[-2]), int(image.shape[-1])


# ---------------------------------------------------------------------------------------------------------------
# Input validation: fail loudly, naming the image and the box, before anything is computed
# ---------------------------------------------------------------------------------------------------------------


def check_images(images) -> None:
    """images must be a non-empty list of float tensors [3, H, W] with H, W > 0."""
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError(f"images must be a non-empty list of float tensors [3, H, W], got {type(images).__name__}")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3 or min(image.shape) == 0:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"image {i}: expected a float tensor [3, H, W], got {shape}")
        if not image.is_floating_point():
            raise ValueError(f"image {i}: expected a float tensor with values in 0..1, got dtype {image.dtype}")


def check_target(index: int, target: dict, num_classes: int) -> None:
    """boxes [G, 4] float, finite, x2 > x1 and y2 > y1 (positive width and height); labels [G] int64 in 0..K-1."""
    if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
        raise ValueError(f"target {index}: expected a dict with 'boxes' and 'labels'")
    boxes, labels = target["boxes"], target["labels"]
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
        raise ValueError(f"image {index}: boxes must be a float tensor [G, 4], got {getattr(boxes, 'shape', boxes)}")
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
        raise ValueError(f"image {index}: labels must be an int64 tensor [{len(boxes)}], got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    bad = ~torch.isfinite(boxes).all(dim=1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if bad.any():
        j = int(torch.where(bad)[0][0])
        raise ValueError(f"image {index}, box {j}: {boxes[j].tolist()} is not a valid x1,y1,x2,y2 box "
                         "(needs finite coordinates, x2 > x1 and y2 > y1)")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        j = int(torch.where(bad)[0][0])
        raise ValueError(f"image {index}, box {j}: label {int(labels[j])} is outside 0..{num_classes - 1}")


def check_inputs(images, targets, num_classes: int, training: bool) -> None:
    check_images(images)
    if targets is None:
        if training:
            raise ValueError("targets are required in training mode")
        return
    if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
        raise ValueError(f"expected one target per image ({len(images)}), got {len(targets)}")
    for i, target in enumerate(targets):
        check_target(i, target, num_classes)


# ---------------------------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------------------------


class FasterRCNN(nn.Module):
    """Faster R-CNN (+ FPN when the backbone has one). Same constructor arguments and defaults as torchvision's,
    and test_min_size / test_max_size (ImageTransform's input size in eval; None: as in training) and
    rpn_feature_names (the backbone maps the RPN runs on, e.g. ["1", "2", "3", "pool"]; None: all of them, as
    torchvision; the box head pools from the maps its own box_roi_pool names).

    Parts left as None get torchvision's defaults for an FPN backbone: one anchor size per level (32..512) with
    ratios (0.5, 1, 2), RPNHead, MultiScaleRoIAlign on levels '0'-'3' (7x7, sampling ratio 2), TwoMLPHead with
    1024 units, FastRCNNPredictor. forward(images, targets=None): losses in training, detections in eval.
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int | None = None,
        # transform
        min_size=800, max_size=1333, image_mean=None, image_std=None, size_divisible=32, test_min_size=None,
        test_max_size=None,
        # RPN
        rpn_anchor_generator=None, rpn_head=None, rpn_feature_names=None,
        rpn_pre_nms_top_n_train=2000, rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_train=2000, rpn_post_nms_top_n_test=1000,
        rpn_nms_thresh=0.7, rpn_fg_iou_thresh=0.7, rpn_bg_iou_thresh=0.3,
        rpn_batch_size_per_image=256, rpn_positive_fraction=0.5, rpn_score_thresh=0.0,
        # box head
        box_roi_pool=None, box_head=None, box_predictor=None,
        box_score_thresh=0.05, box_nms_thresh=0.5, box_detections_per_img=100,
        box_fg_iou_thresh=0.5, box_bg_iou_thresh=0.5, box_batch_size_per_image=512, box_positive_fraction=0.25,
        bbox_reg_weights=None,
    ):
        super().__init__()
        if (num_classes is None) == (box_predictor is None):
            raise ValueError("give exactly one of num_classes and box_predictor")
        channels = backbone.out_channels
        anchor_generator = rpn_anchor_generator if rpn_anchor_generator is not None else fpn_anchor_generator()
        if rpn_head is None:
            rpn_head = RPNHead(channels, anchor_generator.num_anchors_per_location()[0])
        if box_roi_pool is None:
            box_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
        if box_head is None:
            resolution = _pair(box_roi_pool.output_size)
            box_head = TwoMLPHead(channels * resolution[0] * resolution[1], 1024)
        if box_predictor is None:  # reads the head's width: 1024 for the TwoMLPHead above, 4096 for VGG16's fc7
            box_predictor = FastRCNNPredictor(box_head.fc7.out_features, num_classes)

        self.transform = ImageTransform(min_size, max_size, image_mean, image_std, size_divisible, test_min_size,
                                        test_max_size)
        self.backbone = backbone
        self.rpn_feature_names = None if rpn_feature_names is None else list(rpn_feature_names)
        self.rpn = RegionProposalNetwork(
            anchor_generator, rpn_head, rpn_fg_iou_thresh, rpn_bg_iou_thresh, rpn_batch_size_per_image,
            rpn_positive_fraction, dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
            dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test), rpn_nms_thresh,
            score_thresh=rpn_score_thresh)
        self.roi_heads = RoIHeads(
            box_roi_pool, box_head, box_predictor, box_fg_iou_thresh, box_bg_iou_thresh, box_batch_size_per_image,
            box_positive_fraction, bbox_reg_weights, box_score_thresh, box_nms_thresh, box_detections_per_img)

    @property
    def num_classes(self) -> int:
        """K, read off the predictor so that swapping it (fine-tuning on new classes) keeps the checks right."""
        return self.roi_heads.box_predictor.cls_score.out_features

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        check_inputs(images, targets, self.num_classes, self.training)
        original_sizes = [image_hw(image) for image in images]
        batch, image_sizes, targets = self.transform(images, targets)

        features = self.backbone(batch)
        if isinstance(features, Tensor):  # a plain single-map backbone
            features = OrderedDict([("0", features)])
        rpn_features = features if self.rpn_feature_names is None else [features[k] for k in self.rpn_feature_names]
        proposals, rpn_losses = self.rpn(batch, image_sizes, rpn_features, targets)
        detections, head_losses = self.roi_heads(features, proposals, image_sizes, targets)

        if self.training:
            return {**rpn_losses, **head_losses}  # pipeline order: RPN first (torchvision lists the head first)
        return self.transform.postprocess(detections, image_sizes, original_sizes)


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


# ---------------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------------

# py-faster-rcnn's VOC set-up (experiments/cfgs/faster_rcnn_end2end.yml + lib/fast_rcnn/config.py): shorter side
# 600, longer at most 1000; RPN keeps the 12000 best anchors, NMS 0.7, then 2000 proposals in training (6000 ->
# 300 at test time); 128 RoIs per image, 25% objects; test-time box NMS 0.3. Not copied: its RPN_MIN_SIZE of 16 px
# (torchvision's 1e-3 is kept: it only drops degenerate boxes).
VGG16_PAPER_SETTINGS = dict(
    min_size=600, max_size=1000,
    rpn_pre_nms_top_n_train=12000, rpn_post_nms_top_n_train=2000,
    rpn_pre_nms_top_n_test=6000, rpn_post_nms_top_n_test=300,
    box_batch_size_per_image=128, box_nms_thresh=0.3,
)

# The tiny CPU model, sized for the embedded dataset (images 128..320 px, objects 10 px .. 90% of the shorter side):
# images resized to 256..384 (objects about 12..300 px), one anchor size per level from 16 (P2, stride 4) to 256
# (P6, stride 64); a quarter of the proposals and RoIs of the big model: 600 per level -> 300 after NMS in training,
# 300 -> 100 at test time (2-6 objects per image need no more), 128 RoIs per image, a 256-wide box head.
TINY_FPN_SETTINGS = dict(
    min_size=256, max_size=384,
    rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
    rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
    box_batch_size_per_image=128,
)
TINY_FPN_ANCHOR_SIZES = (16, 32, 64, 128, 256)
TINY_FPN_P3_ANCHOR_SIZES = ((16, 23), (32, 45), (64, 91), (128, 181))  # P3..P6, two sizes half an octave apart


def faster_rcnn_vgg16(num_classes: int, pretrained_backbone: bool = False, **kwargs) -> FasterRCNN:
    """The original Faster R-CNN (Ren et al., 2015): no FPN, no RoIAlign.

    VGG16 conv5_3 (stride 16, 512 channels) feeds both the RPN and the box head; one level of 9 anchors,
    (128, 256, 512) x (0.5, 1, 2); RoIPool 7x7 at 1/16; VGG16's own fc6/fc7 (4096) as the box head; the
    py-faster-rcnn settings above. kwargs (FasterRCNN's keyword arguments) override them.
    """
    kwargs = {**VGG16_PAPER_SETTINGS, **kwargs}  # a part given in kwargs replaces the paper's
    kwargs.setdefault("rpn_anchor_generator", vgg16_anchor_generator())
    kwargs.setdefault("box_roi_pool", SingleScaleRoIPool("0", output_size=7, spatial_scale=1 / 16))
    if "box_head" not in kwargs:  # fc6 takes 512 x 7 x 7: only a 7x7 pooler fits VGG16's own head
        if _pair(kwargs["box_roi_pool"].output_size) != (7, 7):
            raise ValueError("faster_rcnn_vgg16: VGG16's fc6 takes 7x7 RoIs; give a box_head for another size")
        kwargs["box_head"] = backbones.vgg16_box_head(pretrained_backbone)
    return FasterRCNN(backbones.vgg16_backbone(pretrained_backbone), num_classes, **kwargs)


def faster_rcnn_resnet50_fpn(num_classes: int, pretrained_backbone: bool = False, trainable_layers: int | None = None,
                             **kwargs) -> FasterRCNN:
    """torchvision's fasterrcnn_resnet50_fpn layout (its state_dicts load, after torchvision_key_to_ours).

    As torchvision: with an ImageNet backbone the batch norms are frozen and the last 3 stages train (or
    trainable_layers); from scratch the batch norms are ordinary BatchNorm2d and every layer trains.
    """
    if pretrained_backbone:
        backbone = backbones.resnet50_fpn_backbone(True, 3 if trainable_layers is None else trainable_layers)
    else:
        if trainable_layers not in (None, 5):
            warnings.warn(f"trainable_layers={trainable_layers} ignored: a backbone trained from scratch trains "
                          "every layer (as torchvision)", stacklevel=2)
        backbone = backbones.resnet50_fpn_backbone(False, trainable_layers=5, norm_layer=nn.BatchNorm2d)
    return FasterRCNN(backbone, num_classes, **kwargs)


def faster_rcnn_tiny_fpn(num_classes: int, fpn_channels: int = 64, sampling_ratio: int = 2, rpn_on_p2: bool = True,
                         p2_output_conv: bool = True, **kwargs) -> FasterRCNN:
    """A small FPN detector that trains on a 2-core CPU in minutes (see TINY_FPN_SETTINGS for the choices).

    backbones.tiny_fpn_backbone (4 conv stages + FPN, fpn_channels each), MultiScaleRoIAlign on P2..P5, a
    TwoMLPHead of 256 units. kwargs (FasterRCNN's keyword arguments) override the settings. fpn_channels sets the
    cost: the FPN and RPN 3x3 convs on P2 (stride 4) are most of a step, so 32 channels make a training step
    about 1.8x faster than 64 (1 thread, fp32), for some accuracy at an equal number of steps. sampling_ratio:
    RoIAlign's points per bin side (2, torchvision's, = 4 per bin; 1 = the bin centre only, a cheaper step).
    rpn_on_p2=False: the RPN runs on P3..P6 only, two anchor sizes per level half an octave apart, the same range
    (16..181 px, TINY_FPN_P3_ANCHOR_SIZES): P2 has 3/4 of the anchors and of the RPN's 3x3 conv work; the box
    head still pools small RoIs from P2. p2_output_conv=False: P2 skips the FPN's 3x3 output conv (the lateral +
    top-down sum is P2; see backbones.tiny_fpn_backbone), a cheaper step.
    """
    backbone = backbones.tiny_fpn_backbone(out_channels=fpn_channels, p2_output_conv=p2_output_conv)
    kwargs = {**TINY_FPN_SETTINGS, **kwargs}  # a part given in kwargs (e.g. box_roi_pool) replaces ours
    if rpn_on_p2:
        kwargs.setdefault("rpn_anchor_generator", fpn_anchor_generator(TINY_FPN_ANCHOR_SIZES))
    else:
        kwargs.setdefault("rpn_feature_names", ["1", "2", "3", "pool"])
        kwargs.setdefault("rpn_anchor_generator", fpn_anchor_generator(TINY_FPN_P3_ANCHOR_SIZES))
    kwargs.setdefault("box_roi_pool", MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7,
                                                         sampling_ratio=sampling_ratio))
    if "box_head" not in kwargs:  # sized for the pooler's output, whichever pooler it is
        height, width = _pair(kwargs["box_roi_pool"].output_size)
        kwargs["box_head"] = TwoMLPHead(backbone.out_channels * height * width, 256)
    return FasterRCNN(backbone, num_classes, **kwargs)


def faster_rcnn_tiny(num_classes: int, pooler: str = "align", sampling_ratio: int = 2, **kwargs) -> FasterRCNN:
    """The tiny trunk without a pyramid: the 2015 single-scale design, in small, to compare with faster_rcnn_tiny_fpn.

    backbones.tiny_backbone (3 stages, one map at stride 16, 64 channels); all five anchor sizes of the tiny FPN
    model x 3 ratios on that one map (15 per location); pooler "align" (RoIAlign 7x7, sampling ratio 2, as the FPN
    model; sampling_ratio as there) or "pool" (RoIPool 7x7, as the paper); the same 256-unit head and
    TINY_FPN_SETTINGS.
    """
    backbone = backbones.tiny_backbone()
    poolers = {"align": lambda: MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=sampling_ratio),
               "pool": lambda: SingleScaleRoIPool("0", output_size=7, spatial_scale=1 / 16)}
    if pooler not in poolers:
        raise ValueError(f"faster_rcnn_tiny: pooler must be 'align' or 'pool', not {pooler!r}")
    kwargs = {**TINY_FPN_SETTINGS, **kwargs}
    kwargs.setdefault("rpn_anchor_generator", AnchorGenerator(sizes=(TINY_FPN_ANCHOR_SIZES,),
                                                              aspect_ratios=((0.5, 1.0, 2.0),)))
    kwargs.setdefault("box_roi_pool", poolers[pooler]())
    if "box_head" not in kwargs:
        height, width = _pair(kwargs["box_roi_pool"].output_size)
        kwargs["box_head"] = TwoMLPHead(backbone.out_channels * height * width, 256)
    return FasterRCNN(backbone, num_classes, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Importing a torchvision FasterRCNN: same settings, same weights
# ---------------------------------------------------------------------------------------------------------------

# torchvision wraps some convolutions in blocks (Conv2dNormActivation inside a Sequential), so their parameters
# carry an extra ".0.0" / ".0"; ours are plain Conv2d. Every key not matched by a rule has the same name in both.
TORCHVISION_KEY_RENAMES = [
    (r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv."),  # RPN 3x3 conv: Sequential(Conv2dNormActivation(conv))
]


def torchvision_key_to_ours(key: str) -> str:
    for pattern, replacement in TORCHVISION_KEY_RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return key


def torchvision_settings(tv_model: nn.Module) -> dict:
    """FasterRCNN keyword arguments reproducing tv_model's settings, read off its modules (never assumed)."""
    t, rpn, roi = tv_model.transform, tv_model.rpn, tv_model.roi_heads
    if t.fixed_size is not None or getattr(t, "_skip_resize", False):
        raise NotImplementedError("from_torchvision: fixed_size / _skip_resize transforms are not supported")
    return dict(
        min_size=tuple(t.min_size), max_size=t.max_size, image_mean=list(t.image_mean),
        image_std=list(t.image_std), size_divisible=t.size_divisible,
        rpn_pre_nms_top_n_train=rpn._pre_nms_top_n["training"], rpn_pre_nms_top_n_test=rpn._pre_nms_top_n["testing"],
        rpn_post_nms_top_n_train=rpn._post_nms_top_n["training"],
        rpn_post_nms_top_n_test=rpn._post_nms_top_n["testing"],
        rpn_nms_thresh=rpn.nms_thresh, rpn_score_thresh=rpn.score_thresh,
        rpn_fg_iou_thresh=rpn.proposal_matcher.high_threshold, rpn_bg_iou_thresh=rpn.proposal_matcher.low_threshold,
        rpn_batch_size_per_image=rpn.fg_bg_sampler.batch_size_per_image,
        rpn_positive_fraction=rpn.fg_bg_sampler.positive_fraction,
        box_score_thresh=roi.score_thresh, box_nms_thresh=roi.nms_thresh, box_detections_per_img=roi.detections_per_img,
        box_fg_iou_thresh=roi.proposal_matcher.high_threshold, box_bg_iou_thresh=roi.proposal_matcher.low_threshold,
        box_batch_size_per_image=roi.fg_bg_sampler.batch_size_per_image,
        box_positive_fraction=roi.fg_bg_sampler.positive_fraction,
        bbox_reg_weights=tuple(roi.box_coder.weights),
    )


def copy_fixed_settings(model: FasterRCNN, tv_model: nn.Module) -> None:
    """Settings torchvision's constructor does not expose but its modules hold: copy them too (not assumed)."""
    for ours, theirs in ((model.rpn, tv_model.rpn), (model.roi_heads, tv_model.roi_heads)):
        ours.box_coder = BoxCoder(tuple(theirs.box_coder.weights), theirs.box_coder.bbox_xform_clip)
        m = theirs.proposal_matcher
        ours.proposal_matcher = Matcher(m.high_threshold, m.low_threshold, m.allow_low_quality_matches)
    model.rpn.min_size = tv_model.rpn.min_size


def parts_from_torchvision(tv_model: nn.Module) -> dict:
    """Our versions of tv_model's replaceable parts (same shapes; weights are copied afterwards)."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor as TVPredictor
    from torchvision.models.detection.faster_rcnn import TwoMLPHead as TVTwoMLPHead

    rpn, roi = tv_model.rpn, tv_model.roi_heads
    if roi.has_mask() or roi.has_keypoint():
        raise NotImplementedError("from_torchvision: only Faster R-CNN (no mask / keypoint heads)")
    if not isinstance(roi.box_head, TVTwoMLPHead) or not isinstance(roi.box_predictor, TVPredictor):
        raise NotImplementedError(f"from_torchvision: box head {type(roi.box_head).__name__} is not a TwoMLPHead")
    if len(rpn.head.conv) != 1 or len(rpn.head.conv[0]) != 2:  # conv_depth 1, conv + ReLU, no norm layer
        raise NotImplementedError("from_torchvision: only the single-conv RPN head (fasterrcnn_resnet50_fpn)")
    pool, fc6 = roi.box_roi_pool, roi.box_head.fc6
    return dict(
        backbone=backbones.resnet50_fpn_from_torchvision(tv_model.backbone),
        rpn_anchor_generator=AnchorGenerator(rpn.anchor_generator.sizes, rpn.anchor_generator.aspect_ratios),
        rpn_head=RPNHead(rpn.head.cls_logits.in_channels, rpn.head.cls_logits.out_channels),
        box_roi_pool=MultiScaleRoIAlign(list(pool.featmap_names), pool.output_size, pool.sampling_ratio,
                                        canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level),
        box_head=TwoMLPHead(fc6.in_features, fc6.out_features),
        box_predictor=FastRCNNPredictor(roi.box_predictor.cls_score.in_features,
                                        roi.box_predictor.cls_score.out_features),
    )


def from_torchvision(tv_model: nn.Module) -> FasterRCNN:
    """Our FasterRCNN with exactly the weights, trainable flags, train/eval mode and settings of a torchvision
    FasterRCNN (e.g. fasterrcnn_resnet50_fpn built with any keyword arguments, COCO weights included).

    The state_dict is copied key by key through torchvision_key_to_ours (see TORCHVISION_KEY_RENAMES), strictly:
    a missing or unexpected key is an error, so nothing is silently left at its random initial value.
    """
    model = FasterRCNN(num_classes=None, **parts_from_torchvision(tv_model), **torchvision_settings(tv_model))
    copy_fixed_settings(model, tv_model)
    model.load_state_dict({torchvision_key_to_ours(k): v for k, v in tv_model.state_dict().items()}, strict=True)
    ours = dict(model.named_parameters())
    for key, param in tv_model.named_parameters():  # frozen layers stay frozen
        ours[torchvision_key_to_ours(key)].requires_grad_(param.requires_grad)
    return model.train(tv_model.training)
