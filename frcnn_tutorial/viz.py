"""Drawing for the notebooks and tools: boxes, detections, training curves.

Shapes: G boxes [G, 4] as x1, y1, x2, y2 in pixels; images [3, H, W] float in 0..1.
Every function returns a matplotlib Figure (or draws on a given Axes) and never calls plt.show(),
so the same code serves notebooks, widgets, tests and files.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle

PALETTE = plt.get_cmap("tab20").colors


def show_image(image: torch.Tensor, ax=None):
    """Show a [3, H, W] float image on an Axes (made if not given) and return the Axes."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(image.detach().permute(1, 2, 0).clamp(0, 1).cpu().numpy())
    ax.set_axis_off()
    return ax


def draw_boxes(ax, boxes, labels=None, scores=None, class_names=None, color=None, linestyle="-",
               linewidth=1.5):
    """Draw boxes on an Axes, with "name score" captions when labels are given."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).cpu()
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        label = int(labels[i]) if labels is not None else None
        c = color or PALETTE[(label or 0) % len(PALETTE)]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=c, linewidth=linewidth,
                               linestyle=linestyle))
        caption = _caption(label, None if scores is None else float(scores[i]), class_names)
        if caption:
            ax.text(x1, y1, caption, fontsize=7, color="white", va="bottom",
                    bbox=dict(facecolor=c, alpha=0.8, pad=1, edgecolor="none"))
    return ax


def _caption(label, score, class_names) -> str:
    if label is None:
        return "" if score is None else f"{score:.2f}"
    name = class_names[label - 1] if class_names and 0 < label <= len(class_names) else str(label)
    return name if score is None else f"{name} {score:.2f}"


def draw_detections(image, detections, class_names=None, target=None, score_threshold=0.0, ax=None,
                    title=None):
    """An image with its detections (solid) and, if given, its ground truth (dashed white)."""
    ax = show_image(image, ax)
    if target is not None:
        draw_boxes(ax, target["boxes"], color="white", linestyle="--", linewidth=1.0)
    keep = detections["scores"] >= score_threshold
    draw_boxes(ax, detections["boxes"][keep], detections["labels"][keep], detections["scores"][keep], class_names)
    if title:
        ax.set_title(title, fontsize=9)
    return ax.figure


def plot_training_curves(rows: list[dict]):
    """Losses against step (left) and mAP against step (right) from log rows ({"step", "loss", ..., "mAP"})."""
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 3.8))
    loss_keys = sorted({k for r in rows for k in r if k.startswith("loss")})
    for key in loss_keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax_loss.plot(*zip(*points, strict=True), label=key, lw=2 if key == "loss" else 1)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=8)
    ax_loss.set_title("training losses")
    maps = [(r["step"], r["mAP"]) for r in rows if "mAP" in r]
    if maps:
        ax_map.plot(*zip(*maps, strict=True), "o-")
    ax_map.set_xlabel("step")
    ax_map.set_ylabel("mAP")
    ax_map.set_ylim(0, 1)
    ax_map.set_title("mAP on the test split")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
# The explorers' pure functions (frcnn_tutorial.widgets wraps each in controls). Shape shorthand for this part:
# B boxes [B, 4] x1,y1,x2,y2 in pixels; P anchors [P, 4]; A anchors per location; G ground-truth boxes [G, 4];
# h x w a feature map's size; P x Q a pooled output (output_size); D candidate detections of one image.
# Each returns (fig, info): a Figure (never shown, the caller shows or closes it) and the numbers drawn.
# Extreme inputs (empty boxes, thresholds 0 or 1, no anchors, an RoI off the map) draw a picture, never raise.
# ---------------------------------------------------------------------------------------------------------------


def _xyxy(box) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in torch.as_tensor(box, dtype=torch.float64).reshape(4))
    return x1, y1, x2, y2


def box_overlap(box_a, box_b) -> dict:
    """Intersection, union and IoU of two boxes (x1, y1, x2, y2); a box with x2 < x1 or y2 < y1 is empty.

    IoU = intersection / union, defined as 0 when the union is empty (two zero-size boxes).
    """
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = _xyxy(box_a), _xyxy(box_b)
    area_a = max(ax2 - ax1, 0.0) * max(ay2 - ay1, 0.0)
    area_b = max(bx2 - bx1, 0.0) * max(by2 - by1, 0.0)
    inter_box = (max(ax1, bx1), max(ay1, by1), min(ax2, bx2), min(ay2, by2))
    inter = max(inter_box[2] - inter_box[0], 0.0) * max(inter_box[3] - inter_box[1], 0.0)
    union = area_a + area_b - inter
    return {"iou": inter / union if union > 0 else 0.0, "intersection": inter, "union": union,
            "area_a": area_a, "area_b": area_b, "intersection_box": inter_box if inter > 0 else None}


def _box_patch(box, **style) -> Rectangle:
    x1, y1, x2, y2 = _xyxy(box)
    return Rectangle((x1, y1), max(x2 - x1, 0.0), max(y2 - y1, 0.0), **style)


def _image_axes(ax, width: float, height: float, boxes=()):
    """Pixel axes (y down) that show 0..width x 0..height and every box in `boxes`, with a small margin."""
    xs = [0.0, width] + [v for b in boxes for v in _xyxy(b)[0::2]]
    ys = [0.0, height] + [v for b in boxes for v in _xyxy(b)[1::2]]
    pad = 0.03 * max(max(xs) - min(xs), max(ys) - min(ys), 1.0)
    ax.set_xlim(min(xs) - pad, max(xs) + pad)
    ax.set_ylim(max(ys) + pad, min(ys) - pad)
    ax.set_aspect("equal")


def iou_figure(box_a, box_b, canvas=(256, 256)):
    """Two boxes, their intersection (filled) and union (both outlines) -> (fig, box_overlap(box_a, box_b))."""
    info = box_overlap(box_a, box_b)
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    _image_axes(ax, canvas[1], canvas[0], [box_a, box_b])
    for box, color, name in ((box_a, "tab:blue", "A"), (box_b, "tab:orange", "B")):
        ax.add_patch(_box_patch(box, facecolor=color, alpha=0.25, edgecolor=color, linewidth=2))
        ax.plot(*_xyxy(box)[:2], "o", color=color, ms=4)  # a zero-size box still shows where it is
        ax.text(*_xyxy(box)[:2], f" {name}", color=color, fontsize=11, fontweight="bold", va="bottom")
    if info["intersection_box"] is not None:
        ax.add_patch(_box_patch(info["intersection_box"], facecolor="tab:green", alpha=0.6, hatch="//",
                                edgecolor="darkgreen", linewidth=1.5))
    ax.set_title(f"IoU = {info['intersection']:.0f} / {info['union']:.0f} = {info['iou']:.3f}", fontsize=11)
    ax.set_xlabel("intersection (green) / union (both boxes)", fontsize=8)
    fig.tight_layout()
    return fig, info


def nms_cloud(seed: int = 0, n: int = 30, num_clusters: int = 4, canvas=(256, 256)):
    """A reproducible cloud of n scored boxes around a few objects -> (boxes [n, 4], scores [n]).

    Each cluster is one "object" with several overlapping detections, as a detector's head produces them.
    """
    g = torch.Generator().manual_seed(seed)
    k, (height, width) = max(min(num_clusters, n), 1), canvas
    cols = math.ceil(math.sqrt(k))
    cell = torch.tensor([width / cols, height / math.ceil(k / cols)])  # one object per cell of a coarse grid
    slot = torch.stack([torch.arange(k) % cols, torch.arange(k) // cols], dim=1)
    centres = (slot + 0.5 + 0.2 * (torch.rand(k, 2, generator=g) - 0.5)) * cell
    sizes = cell * (0.45 + 0.3 * torch.rand(k, 2, generator=g))  # w, h of each object
    owner = torch.arange(n) % k
    centre = centres[owner] + 0.12 * sizes[owner] * torch.randn(n, 2, generator=g)
    size = sizes[owner] * torch.exp(0.12 * torch.randn(n, 2, generator=g))
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    scores = 0.05 + 0.95 * torch.rand(n, generator=g)
    return boxes, scores


def nms_figure(boxes, scores, iou_threshold: float, canvas=(256, 256)):
    """Greedy NMS at iou_threshold: kept boxes solid with their score, suppressed ones dashed grey.

    -> (fig, {"keep": int64 indices by decreasing score, "num_kept", "num_suppressed", "iou_threshold"}).
    """
    from frcnn_tutorial.boxes import nms

    boxes, scores = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.as_tensor(scores).reshape(-1)
    keep = nms(boxes, scores, float(iou_threshold))
    suppressed = torch.ones(len(boxes), dtype=torch.bool)
    suppressed[keep] = False
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    _image_axes(ax, canvas[1], canvas[0], boxes.tolist())
    draw_boxes(ax, boxes[suppressed], color="0.6", linestyle="--", linewidth=0.8)
    for rank, i in enumerate(keep.tolist()):
        draw_boxes(ax, boxes[i], scores=scores[i : i + 1], color=PALETTE[2 * rank % len(PALETTE)], linewidth=2)
    info = {"keep": keep, "num_kept": len(keep), "num_suppressed": int(suppressed.sum()),
            "iou_threshold": float(iou_threshold)}
    ax.set_title(f"NMS at IoU > {iou_threshold:.2f}: {info['num_kept']} kept, {info['num_suppressed']} suppressed",
                 fontsize=10)
    fig.tight_layout()
    return fig, info


def anchor_grid_size(image_size, stride: int) -> tuple[int, int]:
    """(h, w) of the feature map a stride-`stride` backbone gives for an (H, W) image: ceil(H / s), ceil(W / s)."""
    return -(-int(image_size[0]) // int(stride)), -(-int(image_size[1]) // int(stride))


def anchor_grid(image_size, sizes, aspect_ratios, stride: int):
    """All anchors of one feature level over an (H, W) image -> [h * w * A, 4], A = len(sizes) * len(ratios).

    The AnchorGenerator's own templates and placement (locations row-major, then ratios, then sizes).
    """
    from frcnn_tutorial.anchors import anchor_templates, grid_anchors

    if len(sizes) == 0 or len(aspect_ratios) == 0:
        return torch.zeros(0, 4)
    templates = anchor_templates(list(sizes), list(aspect_ratios))
    return grid_anchors(templates, anchor_grid_size(image_size, stride), (int(stride), int(stride)))


def label_anchors(anchors, gt_boxes, high: float = 0.7, low: float = 0.3, best_match: bool = True):
    """The RPN's labels [P] int64: 1 positive (IoU >= high, or an object's best anchor), 0 negative (< low),
    -1 ignored (in between). Matcher semantics; low is capped at high; no ground truth: all negative."""
    from frcnn_tutorial.boxes import box_iou
    from frcnn_tutorial.matching import Matcher

    anchors = torch.as_tensor(anchors, dtype=torch.float32).reshape(-1, 4)
    gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4)
    if len(anchors) == 0 or len(gt_boxes) == 0:
        return torch.zeros(len(anchors), dtype=torch.int64)
    matched = Matcher(high, min(low, high), allow_low_quality_matches=best_match)(box_iou(gt_boxes, anchors))
    labels = (matched >= 0).to(torch.int64)
    labels[matched == Matcher.BETWEEN_THRESHOLDS] = -1
    return labels


def _draw_rectangles(ax, boxes, max_drawn: int | None = None, **style) -> int:
    """Many boxes as one PatchCollection (fast); at most max_drawn of them. Returns how many were drawn."""
    from matplotlib.collections import PatchCollection

    boxes = torch.as_tensor(boxes).reshape(-1, 4)[:max_drawn]
    if len(boxes):
        ax.add_collection(PatchCollection([_box_patch(b) for b in boxes.tolist()], match_original=False,
                                          facecolor="none", **style))
    return len(boxes)


def anchor_figure(image, gt_boxes, sizes=(32, 64, 128), aspect_ratios=(0.5, 1.0, 2.0), stride: int = 16,
                  location=(0, 0), high: float = 0.7, low: float = 0.3, best_match: bool = True):
    """Left: the grid of anchor centres and the A anchors at `location` (row, col). Right: the anchors the RPN
    labels positive for the ground truth (green), ignored (gold) and the locations whose anchors are all negative.

    -> (fig, {"num_anchors", "grid": (h, w), "per_location": A, "location": (row, col) clamped to the grid,
              "location_anchors" [A, 4], "labels" [P], "num_positive", "num_negative", "num_ignored"}).
    """
    H, W = image.shape[-2:]
    (h, w), A = anchor_grid_size((H, W), stride), len(sizes) * len(aspect_ratios)
    anchors = anchor_grid((H, W), sizes, aspect_ratios, stride)
    labels = label_anchors(anchors, gt_boxes, high, low, best_match)
    row, col = min(max(int(location[0]), 0), h - 1), min(max(int(location[1]), 0), w - 1)
    here = anchors[(row * w + col) * A : (row * w + col + 1) * A]
    info = {"num_anchors": len(anchors), "grid": (h, w), "per_location": A, "location": (row, col),
            "location_anchors": here, "labels": labels, "num_positive": int((labels == 1).sum()),
            "num_negative": int((labels == 0).sum()), "num_ignored": int((labels == -1).sum())}

    fig, (ax_grid, ax_labels) = plt.subplots(1, 2, figsize=(10, 5))
    _anchor_grid_panel(ax_grid, image, here, (h, w), stride, (row, col))
    _anchor_labels_panel(ax_labels, image, gt_boxes, anchors, labels, (h, w), stride)
    ax_grid.set_title(f"{A} anchors at location ({row}, {col}) of {h} x {w}, stride {stride}", fontsize=9)
    ax_labels.set_title(f"IoU >= {high:.2f}: {info['num_positive']} positive, < {min(low, high):.2f}: "
                        f"{info['num_negative']} negative, {info['num_ignored']} ignored", fontsize=9)
    # fixed margins, not tight_layout(): measuring every tick label costs ~0.3 s per redraw of the explorer
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.06, top=0.94, wspace=0.15)
    return fig, info


def _centres(grid, stride: int):
    """x, y [h * w] of the anchor centres: location (i, j) sits at pixel (j * stride, i * stride), as torchvision."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h) * stride, torch.arange(w) * stride, indexing="ij")
    return xs.reshape(-1), ys.reshape(-1)


def _anchor_grid_panel(ax, image, here, grid, stride: int, location):
    show_image(image, ax)
    xs, ys = _centres(grid, stride)
    ax.plot(xs, ys, ".", color="white", ms=2, alpha=0.7)
    for k, box in enumerate(here.tolist()):
        ax.add_patch(_box_patch(box, fill=False, edgecolor=PALETTE[2 * k % len(PALETTE)], linewidth=1.5))
    ax.plot(location[1] * stride, location[0] * stride, "+", color="red", ms=12, mew=2)
    _image_axes(ax, image.shape[-1], image.shape[-2], here.tolist())
    ax.set_axis_on()


def _anchor_labels_panel(ax, image, gt_boxes, anchors, labels, grid, stride: int):
    show_image(image, ax)
    xs, ys = _centres(grid, stride)
    A = max(len(anchors) // max(len(xs), 1), 1)
    per_location = labels.reshape(-1, A) if len(labels) else torch.zeros(len(xs), 1, dtype=torch.int64)
    all_negative = (per_location == 0).all(dim=1)
    ax.plot(xs[all_negative], ys[all_negative], ".", color="tab:red", ms=2, alpha=0.6)
    _draw_rectangles(ax, anchors[labels == -1], max_drawn=150, edgecolor="gold", linewidth=0.6, alpha=0.6)
    _draw_rectangles(ax, anchors[labels == 1], edgecolor="lime", linewidth=1.2)
    draw_boxes(ax, gt_boxes, color="white", linestyle="--", linewidth=1.5)
    _image_axes(ax, image.shape[-1], image.shape[-2])
    ax.set_axis_on()


def fpn_level(width: float, height: float, k_min: int = 2, k_max: int = 5, canonical_scale: int = 224,
              canonical_level: int = 4) -> int:
    """FPN eq. 1 for one RoI of width x height pixels: k = floor(4 + log2(sqrt(w h) / 224)), clamped to
    [k_min, k_max] (the LevelMapper the model uses). A zero-size RoI goes to the finest level, k_min."""
    from frcnn_tutorial.pooling import LevelMapper

    box = torch.tensor([[0.0, 0.0, max(float(width), 0.0), max(float(height), 0.0)]])
    return int(LevelMapper(k_min, k_max, canonical_scale, canonical_level)([box])[0]) + k_min


def feature_pyramid(image, backbone=None, seed: int = 0, min_size: int = 800, max_size: int = 1333):
    """Run an FPN backbone on one image, resized as the model resizes it (shorter side min_size).

    backbone: an FPN backbone (dict "0".."3" = P2..P5); None builds backbones.tiny_fpn_backbone() with random
    weights seeded by `seed` (the global RNG is left untouched). -> (resized image [3, H, W], [P2..P5] [C, h, w]).
    """
    from frcnn_tutorial.backbones import tiny_fpn_backbone
    from frcnn_tutorial.model import ImageTransform

    if backbone is None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            backbone = tiny_fpn_backbone()
    transform = ImageTransform(min_size, max_size).eval()
    device = next(backbone.parameters()).device
    batch, sizes, _ = transform([image.to(device)])
    was_training = backbone.training
    with torch.no_grad():
        features = backbone.eval()(batch)
    backbone.train(was_training)
    resized = transform.resize(image)
    maps = [f[0].cpu() for name, f in features.items() if name != "pool"][:4]
    return resized.clamp(0, 1).cpu(), maps


def fpn_level_figure(image, maps, roi, k_min: int = 2, canonical_scale: int = 224, canonical_level: int = 4):
    """The image with one RoI and the maps P{k_min}.. of a pyramid; the level eq. 1 picks is framed in red.

    maps: [C, h, w] per level, finest first, at strides 2**k. Each map is shown as its mean |activation| with the
    RoI projected onto it. -> (fig, {"level", "size": sqrt(w h), "unclamped": floor(...) or None, "stride",
    "feature_shape": (h, w) of the chosen map, "roi_on_map": the RoI in that map's cells}).
    """
    x1, y1, x2, y2 = _xyxy(roi)
    w, h = max(x2 - x1, 0.0), max(y2 - y1, 0.0)
    k_max = k_min + len(maps) - 1
    level, size = fpn_level(w, h, k_min, k_max, canonical_scale, canonical_level), math.sqrt(w * h)
    unclamped = math.floor(canonical_level + math.log2(size / canonical_scale) + 1e-6) if size > 0 else None
    stride = 2**level
    info = {"level": level, "size": size, "unclamped": unclamped, "stride": stride,
            "feature_shape": tuple(maps[level - k_min].shape[-2:]),
            "roi_on_map": tuple(v / stride for v in (x1, y1, x2, y2))}

    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(3.2 * (1 + len(maps)), 3.4),
                             gridspec_kw={"width_ratios": [1.4] + [1] * len(maps)})
    show_image(image, axes[0])
    axes[0].add_patch(_box_patch(roi, fill=False, edgecolor="red", linewidth=2))
    _image_axes(axes[0], image.shape[-1], image.shape[-2], [roi])
    axes[0].set_title(f"RoI {w:.0f} x {h:.0f}, sqrt(wh) = {size:.0f} -> P{level}", fontsize=9)
    for k, (ax, fmap) in enumerate(zip(axes[1:], maps, strict=True), start=k_min):
        _pyramid_panel(ax, fmap, roi, 2**k, chosen=(k == level))
        ax.set_title(f"P{k}: {fmap.shape[-2]} x {fmap.shape[-1]}, stride {2**k}", fontsize=9,
                     color="red" if k == level else "black", fontweight="bold" if k == level else "normal")
    fig.tight_layout()
    return fig, info


def _pyramid_panel(ax, fmap, roi, stride: int, chosen: bool):
    ax.imshow(fmap.abs().mean(0).numpy(), cmap="magma")
    x1, y1, x2, y2 = (v / stride - 0.5 for v in _xyxy(roi))  # cell j is drawn centred on j, spanning pixels j*s..
    ax.add_patch(Rectangle((x1, y1), max(x2 - x1, 0), max(y2 - y1, 0), fill=False, edgecolor="cyan", linewidth=1.5))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor("red" if chosen else "0.7")
        spine.set_linewidth(4 if chosen else 1)


def demo_feature_map(size=(8, 10), seed: int = 0):
    """A small one-channel map [h, w] of whole numbers 0..9 (reproducible), easy to pool by hand."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, tuple(size), generator=g).to(torch.float32)


def roi_pooling_figure(features, roi, output_size=2, spatial_scale: float = 1 / 16, sampling_ratio: int = 2,
                       aligned: bool = False):
    """One RoI (x1, y1, x2, y2 image pixels) on a one-channel map [h, w]: RoIPool's quantised bins next to
    RoIAlign's sampling points, then both P x Q outputs (this package's roi_pool / roi_align).

    -> (fig, {"pool" [P, Q], "align" [P, Q], "rows" [P, 2], "cols" [Q, 2] (RoIPool's cells, end excluded, clipped
    to the map), "points" [P, Q, n, 2] (y, x in cells), "points_per_bin": n, "num_points": P * Q * n}).
    """
    from frcnn_tutorial import pooling

    features = torch.as_tensor(features, dtype=torch.float32)
    P, Q = pooling._pair(output_size)
    roi_t = torch.tensor(_xyxy(roi), dtype=torch.float32)
    rois = torch.cat([roi_t.new_zeros(1), roi_t])[None]
    rows, cols = pooling.roi_pool_bins(roi_t, (P, Q), spatial_scale, feature_size=tuple(features.shape))
    points = pooling.roi_align_sampling_points(roi_t, (P, Q), spatial_scale, sampling_ratio, aligned)
    info = {"pool": pooling.roi_pool(features[None, None], rois, (P, Q), spatial_scale)[0, 0],
            "align": pooling.roi_align(features[None, None], rois, (P, Q), spatial_scale, sampling_ratio,
                                       aligned)[0, 0],
            "rows": rows, "cols": cols, "points": points, "points_per_bin": points.shape[2],
            "num_points": P * Q * points.shape[2]}
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6), gridspec_kw={"width_ratios": [1.3, 1.3, 1, 1]})
    _roi_pool_panel(axes[0], features, roi_t, rows, cols, spatial_scale)
    geometry = pooling.roi_align_geometry(rois, (P, Q), spatial_scale, sampling_ratio, aligned)
    _roi_align_panel(axes[1], features, roi_t, geometry, points, spatial_scale, (P, Q))
    _matrix_panel(axes[2], info["pool"], f"RoIPool output {P} x {Q} (max)")
    _matrix_panel(axes[3], info["align"], f"RoIAlign output {P} x {Q} (mean)")
    axes[1].set_title(f"RoIAlign: {info['points_per_bin']} points per bin, aligned={aligned}", fontsize=9)
    fig.tight_layout()
    return fig, info


def _light_range(values) -> dict:
    """imshow limits that keep the colours light enough to read the numbers printed on them."""
    lo, hi = float(values.min()) if values.numel() else 0.0, float(values.max()) if values.numel() else 1.0
    return {"vmin": lo, "vmax": hi + (hi - lo) + 1.0}


def _feature_panel(ax, features, box_on_map):
    """The map with its values, cell (i, j) centred on (x=j, y=i); limits also show box_on_map."""
    ax.imshow(features.numpy(), cmap="Blues", **_light_range(features))
    for (i, j), v in zip(torch.cartesian_prod(*(torch.arange(n) for n in features.shape)).tolist(),
                         features.reshape(-1).tolist(), strict=True):
        ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=7, color="0.25")
    h, w = features.shape
    x1, y1, x2, y2 = box_on_map
    ax.set_xlim(min(-0.5, x1, x2) - 0.3, max(w - 0.5, x1, x2) + 0.3)
    ax.set_ylim(max(h - 0.5, y1, y2) + 0.3, min(-0.5, y1, y2) - 0.3)


def _roi_pool_panel(ax, features, roi, rows, cols, spatial_scale):
    exact = [float(v) * spatial_scale for v in roi]  # RoIPool rounds these to whole cells
    _feature_panel(ax, features, exact)
    ax.add_patch(Rectangle((exact[0], exact[1]), exact[2] - exact[0], exact[3] - exact[1], fill=False,
                           edgecolor="black", linestyle="--", linewidth=1))
    for p, (r0, r1) in enumerate(rows.tolist()):
        for q, (c0, c1) in enumerate(cols.tolist()):
            if r1 > r0 and c1 > c0:  # an empty bin (off the map) pools to 0 and draws nothing
                ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, linewidth=2,
                                       edgecolor=PALETTE[2 * (p * len(cols) + q) % len(PALETTE)], alpha=0.9))
    ax.set_title("RoIPool: bins rounded to whole cells", fontsize=9)


def _roi_align_panel(ax, features, roi, geometry, points, spatial_scale, output_size):
    (y1, x1), (bin_h, bin_w), _ = geometry
    (P, Q), y1, x1, bin_h, bin_w = output_size, float(y1[0]), float(x1[0]), float(bin_h[0]), float(bin_w[0])
    _feature_panel(ax, features, (x1, y1, x1 + Q * bin_w, y1 + P * bin_h))
    for p in range(P):
        for q in range(Q):
            ax.add_patch(Rectangle((x1 + q * bin_w, y1 + p * bin_h), bin_w, bin_h, fill=False, edgecolor="tab:red",
                                   linewidth=1.2))
    pts = points.reshape(-1, 2)
    ax.plot(pts[:, 1], pts[:, 0], "o", color="tab:red", ms=3)


def _matrix_panel(ax, values, title):
    ax.imshow(values.numpy(), cmap="Blues", **_light_range(values))
    for (p, q), v in zip(torch.cartesian_prod(*(torch.arange(n) for n in values.shape)).tolist(),
                         values.reshape(-1).tolist(), strict=True):
        ax.text(q, p, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def detection_candidates(model, image) -> dict:
    """Every detection of one image before the score threshold and NMS: {"boxes" [D, 4], "labels", "scores"}.

    Runs the model once in eval mode with its box head's score threshold 0, NMS IoU 1.0 (suppresses nothing) and
    no cap on the count, then restores its settings; filter_detections applies any thresholds afterwards.
    """
    heads, was_training = model.roi_heads, model.training
    saved = heads.score_thresh, heads.nms_thresh, heads.detections_per_img
    try:
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img = 0.0, 1.0, 10**9
        with torch.no_grad():
            out = model.eval()([image.to(next(model.parameters()).device)])[0]
    finally:
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img = saved
        model.train(was_training)
    return {key: out[key].cpu() for key in ("boxes", "labels", "scores")}


def filter_detections(candidates: dict, score_thresh: float, nms_thresh: float, detections_per_img: int = 100):
    """The box head's post-processing on cached candidates: score > score_thresh, NMS per class at nms_thresh,
    the best detections_per_img. Same result as running the model with these settings."""
    from frcnn_tutorial.boxes import batched_nms

    keep = torch.where(candidates["scores"] > score_thresh)[0]
    boxes, scores, labels = (candidates[k][keep] for k in ("boxes", "scores", "labels"))
    keep = batched_nms(boxes, scores, labels, float(nms_thresh))[:detections_per_img]
    return {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}


def detection_figure(image, candidates: dict, score_thresh: float = 0.5, nms_thresh: float = 0.5, class_names=None,
                     target=None):
    """The detections left after filter_detections, drawn on the image (ground truth dashed white).

    -> (fig, {"detections": dict, "num_detections", "num_candidates"}).
    """
    detections = filter_detections(candidates, score_thresh, nms_thresh)
    n, total = len(detections["scores"]), len(candidates["scores"])
    fig = draw_detections(image, detections, class_names, target,
                          title=f"{n} of {total} candidates: score > {score_thresh:.2f}, NMS IoU {nms_thresh:.2f}")
    return fig, {"detections": detections, "num_detections": n, "num_candidates": total}
