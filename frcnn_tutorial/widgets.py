"""Interactive explorers for the notebooks: controls that redraw a figure of frcnn_tutorial.viz.

Shape shorthand as in viz: boxes [B, 4] x1,y1,x2,y2 in pixels, P anchors, A anchors per location, G ground-truth
boxes, D candidate detections of one image, P x Q a pooled output.

Every explorer is an Explorer, an ipywidgets VBox that displays itself as a cell's last expression: the controls,
the numbers (HTML widgets with a CSS class such as "iou-value" or "anchor-count", what tests read), and the figure
as a PNG in an Image widget, so it looks the same in JupyterLab and in a saved notebook, and runs headless under
nbval, whatever the matplotlib backend. The logic lives in viz's pure functions; an explorer only reads its
controls, calls one of them, and closes the figure. explorer.update() redraws from the controls' values;
explorer.controls[name] and explorer.outputs[css class] are the widgets. Sliders redraw when released
(continuous_update=False): a drag costs one redraw, not fifty, on a 2-core CPU.
"""

from __future__ import annotations

import io

import ipywidgets as widgets
import matplotlib.pyplot as plt

from frcnn_tutorial import viz

DPI = 90  # figures are 4.6-16 inches wide: 410-1440 px PNGs (wider ones shrink to the notebook), ~20-150 kB
SIZE_CHOICES = (8, 16, 32, 64, 128, 256, 512)
RATIO_CHOICES = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0)  # h / w; 0.1 and 10 are the extremes to try
STRIDE_CHOICES = (4, 8, 16, 32, 64)


class Explorer(widgets.VBox):
    """Controls, labelled numbers and a figure; render(controls) -> (Figure, {css class: html}) draws it."""

    def __init__(self, name: str, controls: dict, render, outputs: tuple[str, ...], columns: int = 2):
        super().__init__()
        self.controls, self.render, self._busy = controls, render, False
        self.outputs = {css: widgets.HTML().add_class(css) for css in outputs}
        # flex-start: at its own size, not stretched (and blurred) to the width of the notebook
        self.figure = widgets.Image(format="png", layout=widgets.Layout(max_width="100%", align_self="flex-start"))
        self.message = widgets.HTML()  # why a redraw failed, if it ever does
        cells = list(controls.values())
        rows = [widgets.HBox(cells[i : i + columns]) for i in range(0, len(cells), columns)]
        self.children = [*rows, *self.outputs.values(), self.message, self.figure]
        self.add_class(name)
        for control in cells:
            control.observe(lambda _change: self.update(), names="value")
        self.update()

    def update(self) -> None:
        """Redraw from the controls' current values. Changes the render makes to controls (e.g. a slider's
        range) do not trigger a second redraw."""
        if self._busy:
            return
        self._busy = True
        try:
            fig, texts = self.render(self.controls)
            self.figure.value = _png(fig)
            for css, html in texts.items():
                self.outputs[css].value = html
            self.message.value = ""
        except Exception as error:
            self.message.value = f"<span style='color:red'>could not draw: {error!r}</span>"
            raise
        finally:
            self._busy = False


def _png(fig) -> bytes:
    """The figure as PNG bytes; closes it, so pyplot neither keeps it nor shows it a second time."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _slider(description: str, value, low, high, step=1, css: str | None = None):
    """An int (or float, if step is) slider that redraws on release; its range always includes value."""
    kind = widgets.FloatSlider if isinstance(step, float) else widgets.IntSlider
    slider = kind(value=value, min=min(low, value), max=max(high, value), step=step, description=description,
                  continuous_update=False, style={"description_width": "initial"})
    return slider.add_class(css) if css else slider


def _cached_sample(dataset, index: int, cache: dict, size: int = 8):
    """dataset[index], kept for the next redraws (decoding a JPEG each time would cost more than drawing)."""
    if index not in cache:
        if len(cache) >= size:
            cache.pop(next(iter(cache)))
        cache[index] = dataset[index]
    return cache[index]


def _default_dataset(dataset):
    if dataset is not None:
        return dataset
    from frcnn_tutorial.data import embedded_dataset

    return embedded_dataset("train")


# ---------------------------------------------------------------------------------------------------------------
# 01: IoU and NMS
# ---------------------------------------------------------------------------------------------------------------


def iou_explorer(box_a=(20, 20, 120, 100), box_b=(60, 50, 170, 150), canvas=(256, 256)) -> Explorer:
    """Two boxes (x1, y1, width, height sliders each); live IoU, intersection and union (class "iou-value")."""
    controls = {}
    for name, box in (("a", box_a), ("b", box_b)):
        x1, y1, x2, y2 = (round(v) for v in viz._xyxy(box))
        controls[f"{name}_x1"] = _slider(f"{name.upper()} x1", x1, 0, canvas[1], css=f"iou-{name}-x1")
        controls[f"{name}_y1"] = _slider(f"{name.upper()} y1", y1, 0, canvas[0], css=f"iou-{name}-y1")
        controls[f"{name}_w"] = _slider(f"{name.upper()} width", max(x2 - x1, 0), 0, canvas[1], css=f"iou-{name}-w")
        controls[f"{name}_h"] = _slider(f"{name.upper()} height", max(y2 - y1, 0), 0, canvas[0], css=f"iou-{name}-h")

    def render(c):
        a, b = (_box_from_sliders(c, name) for name in ("a", "b"))
        fig, info = viz.iou_figure(a, b, canvas)
        return fig, {"iou-value": f"<b>IoU = {info['iou']:.4f}</b> = intersection {info['intersection']:.0f} / "
                                  f"union {info['union']:.0f} &nbsp; (area A {info['area_a']:.0f}, "
                                  f"area B {info['area_b']:.0f})"}

    ordered = {k: controls[k] for k in ("a_x1", "b_x1", "a_y1", "b_y1", "a_w", "b_w", "a_h", "b_h")}
    return Explorer("iou-explorer", ordered, render, ("iou-value",))


def _box_from_sliders(controls: dict, name: str) -> tuple[float, float, float, float]:
    x1, y1 = controls[f"{name}_x1"].value, controls[f"{name}_y1"].value
    return x1, y1, x1 + controls[f"{name}_w"].value, y1 + controls[f"{name}_h"].value


def nms_explorer(seed: int = 0, n: int = 30) -> Explorer:
    """A cloud of n scored boxes around a few objects; an IoU-threshold slider; kept vs suppressed ("nms-count")."""
    boxes, scores = viz.nms_cloud(seed, n)
    controls = {"iou_threshold": _slider("IoU threshold", 0.5, 0.0, 1.0, step=0.05, css="nms-threshold")}

    def render(c):
        threshold = c["iou_threshold"].value
        fig, info = viz.nms_figure(boxes, scores, threshold)
        return fig, {"nms-count": f"<b>kept {info['num_kept']}</b> of {len(boxes)} boxes, "
                                  f"{info['num_suppressed']} suppressed (a box goes when its IoU with a "
                                  f"better-scored kept box is &gt; {threshold:.2f})"}

    return Explorer("nms-explorer", controls, render, ("nms-count",))


# ---------------------------------------------------------------------------------------------------------------
# 02: anchors
# ---------------------------------------------------------------------------------------------------------------


def anchor_explorer(dataset=None, index: int = 0, sizes=(32, 64, 128), aspect_ratios=(0.5, 1.0, 2.0),
                    stride: int = 16) -> Explorer:
    """Anchors over an image of `dataset` (default: the embedded training split): sizes, ratios (h / w), stride,
    a location, and the RPN's labels for the image's ground truth at adjustable IoU thresholds (Matcher rules).

    Numbers: "anchor-count" (h x w locations x A) and "anchor-labels" (positive / negative / ignored).
    """
    dataset, cache = _default_dataset(dataset), {}
    image, _ = _cached_sample(dataset, index, cache)
    h, w = viz.anchor_grid_size(image.shape[-2:], stride)
    controls = {
        "index": _slider("image", index, 0, len(dataset) - 1, css="anchor-image"),
        "stride": widgets.SelectionSlider(options=sorted({*STRIDE_CHOICES, stride}), value=stride,
                                          description="stride", continuous_update=False).add_class("anchor-stride"),
        "sizes": widgets.SelectMultiple(options=sorted({*SIZE_CHOICES, *sizes}), value=tuple(sizes), rows=4,
                                        description="sizes"),
        "ratios": widgets.SelectMultiple(options=sorted({*RATIO_CHOICES, *aspect_ratios}), value=tuple(aspect_ratios),
                                         rows=4, description="ratios h/w"),
        "row": _slider("row", h // 2, 0, h - 1, css="anchor-row"),
        "col": _slider("column", w // 2, 0, w - 1, css="anchor-col"),
        "high": _slider("positive IoU >=", 0.7, 0.0, 1.0, step=0.05, css="anchor-high"),
        "low": _slider("negative IoU <", 0.3, 0.0, 1.0, step=0.05, css="anchor-low"),
        "best_match": widgets.Checkbox(value=True, description="each object's best anchor is positive", indent=False,
                                       layout=widgets.Layout(width="auto")),
    }

    def render(c):
        image, target = _cached_sample(dataset, c["index"].value, cache)
        s = c["stride"].value
        h, w = viz.anchor_grid_size(image.shape[-2:], s)
        c["row"].max, c["col"].max = h - 1, w - 1  # a coarser grid has fewer locations
        fig, info = viz.anchor_figure(image, target["boxes"], c["sizes"].value, c["ratios"].value, s,
                                      (c["row"].value, c["col"].value), c["high"].value, c["low"].value,
                                      c["best_match"].value)
        return fig, _anchor_texts(info, c, s)

    return Explorer("anchor-explorer", controls, render, ("anchor-count", "anchor-labels"))


def _anchor_texts(info: dict, c: dict, stride: int) -> dict:
    (h, w), A = info["grid"], info["per_location"]
    low, high = min(c["low"].value, c["high"].value), c["high"].value
    best = " + each object's best anchor" if c["best_match"].value else ""
    return {
        "anchor-count": f"<b>anchors: {info['num_anchors']:,}</b> = {h} x {w} locations x {A} per location "
                        f"({len(c['sizes'].value)} sizes x {len(c['ratios'].value)} ratios), stride {stride}",
        "anchor-labels": f"positive {info['num_positive']:,} (IoU &ge; {high:.2f}{best}) &middot; "
                         f"negative {info['num_negative']:,} (IoU &lt; {low:.2f}) &middot; "
                         f"ignored {info['num_ignored']:,}",
    }


# ---------------------------------------------------------------------------------------------------------------
# 04: FPN level assignment
# ---------------------------------------------------------------------------------------------------------------


def fpn_level_explorer(dataset=None, index: int = 0, backbone=None, seed: int = 0, min_size: int = 800) -> Explorer:
    """An RoI whose size and place you change; the level FPN eq. 1 assigns and that level's feature map.

    The pyramid is computed once: `backbone` (an FPN backbone, e.g. a trained model's .backbone) or a
    tiny_fpn_backbone with random weights seeded by `seed`, on dataset[index] resized to min_size ("fpn-level").
    """
    dataset = _default_dataset(dataset)
    image, maps = viz.feature_pyramid(dataset[index][0], backbone, seed, min_size)
    H, W = image.shape[-2:]
    controls = {  # up to twice the image: even a small image reaches the clamp at P5
        "width": _slider("RoI width", 224, 0, 2 * max(H, W), css="fpn-width"),
        "height": _slider("RoI height", 224, 0, 2 * max(H, W), css="fpn-height"),
        "cx": _slider("centre x", W // 2, 0, W, css="fpn-cx"),
        "cy": _slider("centre y", H // 2, 0, H, css="fpn-cy"),
    }

    def render(c):
        w, h, cx, cy = (c[k].value for k in ("width", "height", "cx", "cy"))
        fig, info = viz.fpn_level_figure(image, maps, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
        k, size = info["level"], info["size"]
        formula = (f"k = &lfloor;4 + log2({size:.0f} / 224)&rfloor; = {info['unclamped']}, clamped to [2, 5]"
                   if info["unclamped"] is not None else "an empty RoI goes to the finest level")
        return fig, {"fpn-level": f"<b>level P{k}</b> (stride {info['stride']}, map {info['feature_shape'][0]} x "
                                  f"{info['feature_shape'][1]}): sqrt({w} x {h}) = {size:.0f}; {formula}"}

    return Explorer("fpn-level-explorer", controls, render, ("fpn-level",))


# ---------------------------------------------------------------------------------------------------------------
# 05: RoIPool vs RoIAlign
# ---------------------------------------------------------------------------------------------------------------


def roi_pooling_explorer(feature_size=(8, 10), spatial_scale: float = 1 / 16, seed: int = 0) -> Explorer:
    """One RoI (image pixels) on a small map at spatial_scale: RoIPool's rounded bins vs RoIAlign's sampling points,
    with output size, sampling ratio (<= 0: adaptive) and aligned as controls ("roi-pool-info")."""
    features = viz.demo_feature_map(feature_size, seed)
    stride = round(1 / spatial_scale)
    span_y, span_x = feature_size[0] * stride, feature_size[1] * stride
    controls = {
        "x1": _slider("RoI x1", 20.0, -2.0 * stride, span_x + 2.0 * stride, step=1.0, css="roi-x1"),
        "y1": _slider("RoI y1", 30.0, -2.0 * stride, span_y + 2.0 * stride, step=1.0, css="roi-y1"),
        "width": _slider("RoI width", 80.0, 0.0, span_x + 2.0 * stride, step=1.0, css="roi-width"),
        "height": _slider("RoI height", 60.0, 0.0, span_y + 2.0 * stride, step=1.0, css="roi-height"),
        "output_size": _slider("output size", 2, 1, 7, css="roi-output-size"),
        "sampling_ratio": _slider("sampling ratio", 2, -1, 4, css="roi-sampling-ratio"),
        "aligned": widgets.Checkbox(value=False, description="aligned (half-pixel shift)", indent=False,
                                    layout=widgets.Layout(width="auto")),
    }

    def render(c):
        x1, y1 = c["x1"].value, c["y1"].value
        roi = (x1, y1, x1 + c["width"].value, y1 + c["height"].value)
        fig, info = viz.roi_pooling_figure(features, roi, c["output_size"].value, spatial_scale,
                                           c["sampling_ratio"].value, c["aligned"].value)
        return fig, {"roi-pool-info": _roi_text(info, roi, spatial_scale)}

    return Explorer("roi-pooling-explorer", controls, render, ("roi-pool-info",))


def _roi_text(info: dict, roi, spatial_scale: float) -> str:
    def spans(edges):
        return " ".join(f"[{a},{b})" for a, b in edges.tolist())

    on_map = ", ".join(f"{v * spatial_scale:g}" for v in roi)
    return (f"RoI ({on_map}) in cells. <b>RoIPool</b> bins: rows {spans(info['rows'])}, "
            f"columns {spans(info['cols'])}. <b>RoIAlign</b>: {info['points_per_bin']} sampling points per bin, "
            f"{info['num_points']} in all.")


# ---------------------------------------------------------------------------------------------------------------
# 07 / 10: a trained detector's output
# ---------------------------------------------------------------------------------------------------------------


def detection_explorer(model, dataset, class_names, index: int = 0, score_thresh: float = 0.5,
                       nms_thresh: float = 0.5) -> Explorer:
    """A model's detections on dataset images: image picker, score and NMS thresholds ("detection-count").

    The model runs once per image (viz.detection_candidates, cached); moving a threshold only filters the cached
    candidates (viz.filter_detections), so it redraws without running the network again.
    """
    cache = {}
    controls = {
        "index": _slider("image", index, 0, len(dataset) - 1, css="detection-image"),
        "score": _slider("score >", score_thresh, 0.0, 1.0, step=0.01, css="detection-score"),
        "nms": _slider("NMS IoU", nms_thresh, 0.0, 1.0, step=0.05, css="detection-nms"),
    }

    def render(c):
        i = c["index"].value
        if i not in cache:
            image, target = dataset[i]
            cache[i] = image, target, viz.detection_candidates(model, image)
        image, target, candidates = cache[i]
        fig, info = viz.detection_figure(image, candidates, c["score"].value, c["nms"].value, class_names, target)
        return fig, {"detection-count": f"<b>{info['num_detections']} detections</b> of {info['num_candidates']} "
                                        f"candidates (score &gt; {c['score'].value:.2f}, NMS IoU "
                                        f"{c['nms'].value:.2f}); ground truth dashed"}

    return Explorer("detection-explorer", controls, render, ("detection-count",), columns=3)
