"""Benchmarks, not timed tests: ours against torchvision on the same inputs, runs interleaved, median seconds.

    python -m frcnn_tutorial.bench pooling   # readable roi_align / roi_pool against torchvision's compiled kernels
    python -m frcnn_tutorial.bench speed     # the whole model (from_torchvision, same weights) against torchvision's
    python -m frcnn_tutorial.bench train-speed  # training images/s of the tiny CPU model against torchvision's

Shape shorthand: N images, C channels, h x w feature map, K RoIs.
Interleaving (ours, theirs, theirs, ours, ...) spreads any slowdown of a shared machine over both sides; the median
ignores the odd slow run. Ratios are ours / torchvision: above 1 means ours is slower.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from frcnn_tutorial.pooling import roi_align, roi_align_fast, roi_pool


def interleaved_medians(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 1,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median wall-clock seconds of each function, calling them in turn `runs` times after `warmup` rounds, the
    order reversed every other round (what runs second may find the allocator's memory already mapped).

    clock=time.process_time measures this process's CPU seconds instead: with one torch thread, that is the
    fairer measure on a machine other jobs share (wall time then mostly measures the queue for the cores)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for run in range(runs):
        order = list(fns.items())
        for name, fn in order if run % 2 == 0 else order[::-1]:  # ABBA: neither side always goes first
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def random_proposals(num_rois: int, image_size: tuple[int, int], num_images: int, seed: int = 0) -> torch.Tensor:
    """[K, 5] RoIs like an RPN's: sides log-uniform in 16..512 px, aspect ratios 1/3..3, clipped to the image."""
    g = torch.Generator().manual_seed(seed)
    height, width = image_size
    side = torch.exp(torch.empty(num_rois).uniform_(2.77, 6.24, generator=g))  # log(16) .. log(512)
    ratio = torch.exp(torch.empty(num_rois).uniform_(-1.1, 1.1, generator=g))  # h / w
    half = torch.stack([side / ratio.sqrt(), side * ratio.sqrt()], dim=1) / 2  # (w / 2, h / 2)
    centre = torch.rand(num_rois, 2, generator=g) * torch.tensor([width, height])
    boxes = torch.cat([centre - half, centre + half], dim=1)
    boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([width, height, width, height]))
    batch = torch.randint(0, num_images, (num_rois, 1), generator=g).float()
    return torch.cat([batch, boxes], dim=1)


def _forward_backward(fn, features, rois, *args):
    """One training-like call: forward, then the gradient of the sum with respect to the features."""
    features.grad = None
    fn(features, rois, *args).sum().backward()


def pooling_cases():
    """(op, setting, ours, torchvision, extra args, backward?) for each row of the table."""
    align_tv, pool_tv = torchvision.ops.roi_align, torchvision.ops.roi_pool
    return [
        ("roi_align", "sampling_ratio=2 (the model's), forward", roi_align, align_tv, (2, False), False),
        ("roi_align", "sampling_ratio=2, forward+backward", roi_align, align_tv, (2, False), True),
        ("roi_align", "sampling_ratio=-1 (adaptive), forward", roi_align, align_tv, (-1, False), False),
        ("roi_align", "aligned=True, sampling_ratio=2, forward", roi_align, align_tv, (2, True), False),
        # what the model trains with on the CPU: the kernel's forward, a sparse-product backward
        ("roi_align", "roi_align_fast, sampling_ratio=2, fwd+bwd", roi_align_fast, align_tv, (2, False), True),
        ("roi_pool", "forward", roi_pool, pool_tv, (), False),
        ("roi_pool", "forward+backward", roi_pool, pool_tv, (), True),
    ]


def bench_pooling(features_shape=(2, 256, 50, 68), num_rois: int = 512, output_size: int = 7, stride: int = 16,
                  runs: int = 10, seed: int = 0) -> list[dict]:
    """Readable roi_align / roi_pool (pooling.py) against torchvision's kernels on [N, C, h, w] features.

    The default is a batch of two 800 x 1088 images at stride 16 (VGG16's conv5_3, or FPN's P4) and 512 RoIs
    (RoIHeads' training sample). Returns one row per case: op, setting, ours_s, torchvision_s (median seconds),
    ratio (ours / torchvision) and max_abs_diff between the two outputs.
    """
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(*features_shape, generator=g).requires_grad_(True)
    image_size = (features_shape[2] * stride, features_shape[3] * stride)
    rois = random_proposals(num_rois, image_size, features_shape[0], seed)
    rows = []
    for op, setting, ours, theirs, extra, backward in pooling_cases():
        args = (output_size, 1 / stride, *extra)
        with torch.no_grad():
            diff = (ours(features, rois, *args) - theirs(features, rois, *args)).abs().max().item()
        if backward:
            fns = {"ours": lambda f=ours, a=args: _forward_backward(f, features, rois, *a),
                   "torchvision": lambda f=theirs, a=args: _forward_backward(f, features, rois, *a)}
        else:
            fns = {"ours": lambda f=ours, a=args: f(features.detach(), rois, *a),
                   "torchvision": lambda f=theirs, a=args: f(features.detach(), rois, *a)}
        medians = interleaved_medians(fns, runs)
        rows.append(dict(op=op, setting=setting, ours_s=medians["ours"], torchvision_s=medians["torchvision"],
                         ratio=medians["ours"] / medians["torchvision"], max_abs_diff=diff))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'op':<10} {'setting':<42} {'ours (s)':>10} {'torchvision (s)':>16} {'ours/tv':>8} {'max |diff|':>11}"]
    for r in rows:
        lines.append(f"{r['op']:<10} {r['setting']:<42} {r['ours_s']:>10.4f} {r['torchvision_s']:>16.4f} "
                     f"{r['ratio']:>8.2f} {r['max_abs_diff']:>11.1e}")
    return "\n".join(lines)


def _run_pooling(args) -> None:
    shape = tuple(args.shape)
    print(f"RoI pooling: features {list(shape)}, {args.rois} RoIs, {args.output_size}x{args.output_size}, stride "
          f"{args.stride}, {torch.get_num_threads()} torch threads, median of {args.runs} interleaved runs")
    print(format_table(bench_pooling(shape, args.rois, args.output_size, args.stride, args.runs, args.seed)))


# ---- speed: the whole detector, ours (from_torchvision: same weights) against torchvision's ---------------------


def speed_models(num_classes: int = 91):
    """torchvision's fasterrcnn_resnet50_fpn (random weights, seed 0) and ours carrying exactly its weights."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    from frcnn_tutorial.model import from_torchvision

    torch.manual_seed(0)
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes)
    return from_torchvision(tv), tv


def speed_inputs(num_images: int, height: int, width: int, seed: int = 0):
    """N random images [3, height, width], each with 4 random boxes (labels 1..90)."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, height, width, generator=g) for _ in range(num_images)]
    targets = []
    for _ in range(num_images):
        xy = torch.rand(4, 2, generator=g) * torch.tensor([width * 0.6, height * 0.6])
        wh = 16 + torch.rand(4, 2, generator=g) * torch.tensor([width * 0.3, height * 0.3])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 91, (4,), generator=g)})
    return images, targets


def inference_step(model, images):
    def run():
        with torch.no_grad():
            model.eval()(images)
    return run


def training_step(model, images, targets):
    """Forward + backward, no optimiser step (the weights stay equal on both sides); same seed, same samples."""
    def run():
        torch.manual_seed(0)
        sum(model.train()(images, targets).values()).backward()
        model.zero_grad(set_to_none=True)
    return run


def bench_speed(num_images: int = 2, height: int = 480, width: int = 640, repeats: int = 5) -> list[dict]:
    """Median seconds of ours and torchvision's Faster R-CNN ResNet-50-FPN, interleaved in this one process."""
    ours, tv = speed_models()
    images, targets = speed_inputs(num_images, height, width)
    rows = []
    for task, step in (("inference", lambda m: inference_step(m, images)),
                       ("training step (fwd+bwd)", lambda m: training_step(m, images, targets))):
        medians = interleaved_medians({"ours": step(ours), "torchvision": step(tv)}, repeats)
        rows.append(dict(task=task, ours_s=medians["ours"], torchvision_s=medians["torchvision"],
                         ratio=medians["ours"] / medians["torchvision"]))
    return rows


def format_speed_table(rows: list[dict]) -> str:
    lines = ["| task | ours (s) | torchvision (s) | ours / torchvision |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['ours_s']:.3f} | {r['torchvision_s']:.3f} | {r['ratio']:.3f} |")
    return "\n".join(lines)


def _run_speed(args) -> None:
    print(f"Faster R-CNN ResNet-50-FPN (ours = from_torchvision(tv): same weights, same inputs), {args.images} "
          f"images {args.height}x{args.width}, CPU, {torch.get_num_threads()} torch threads, median of "
          f"{args.repeats} interleaved runs")
    print(format_speed_table(bench_speed(args.images, args.height, args.width, args.repeats)))


# ---- train-speed: the tiny CPU detector (the chapters' tiny_fpn), ours against torchvision's FasterRCNN ----------


def tiny_models(num_classes: int = 7, **settings):
    """Ours (faster_rcnn_tiny_fpn) and torchvision's FasterRCNN built from a copy of the same tiny FPN backbone,
    the same anchors, RoIAlign, box head and settings, carrying exactly our weights (strict load)."""
    import copy

    from torchvision.models.detection import FasterRCNN as TVFasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor as TVFastRCNNPredictor
    from torchvision.models.detection.faster_rcnn import TwoMLPHead as TVTwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign as TVMultiScaleRoIAlign

    from frcnn_tutorial.model import (
        TINY_FPN_ANCHOR_SIZES,
        TINY_FPN_SETTINGS,
        faster_rcnn_tiny_fpn,
        torchvision_key_to_ours,
    )

    torch.manual_seed(0)
    settings = {**TINY_FPN_SETTINGS, **settings}
    ours = faster_rcnn_tiny_fpn(num_classes, **settings)
    sizes = tuple((s,) for s in TINY_FPN_ANCHOR_SIZES)
    channels = ours.backbone.out_channels
    tv = TVFasterRCNN(copy.deepcopy(ours.backbone), None,
                      rpn_anchor_generator=TVAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes)),
                      box_roi_pool=TVMultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2),
                      box_head=TVTwoMLPHead(channels * 7 * 7, 256),
                      box_predictor=TVFastRCNNPredictor(256, num_classes), **settings)
    mine = ours.state_dict()
    tv.load_state_dict({k: mine[torchvision_key_to_ours(k)] for k in tv.state_dict()}, strict=True)
    return ours, tv


def embedded_batch(num_images: int, root=None):
    """The first N images of the embedded training split (under root, default data/embedded) and their targets."""
    from frcnn_tutorial.data import embedded_dataset

    dataset = embedded_dataset("train", root=root)
    samples = [dataset[i] for i in range(num_images)]
    return [s[0] for s in samples], [{"boxes": s[1]["boxes"], "labels": s[1]["labels"]} for s in samples]


def optimiser_step(model, images, targets, lr: float = 1e-4):
    """A whole training iteration as train.py runs it: forward, backward, AdamW update (small lr, so the two models
    stay close; each has its own optimiser), same seed for the samplers on both sides."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def run():
        torch.manual_seed(0)
        loss = sum(model.train()(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return run


def bench_train_speed(num_images: int = 4, repeats: int = 15, cpu_time: bool = False) -> list[dict]:
    """Images per second of a training iteration, ours against torchvision's, interleaved, on embedded images
    (seconds of wall time, or of this process's CPU time with cpu_time=True)."""
    ours, tv = tiny_models()
    images, targets = embedded_batch(num_images)
    medians = interleaved_medians({"ours": optimiser_step(ours, images, targets),
                                   "torchvision": optimiser_step(tv, images, targets)}, repeats, warmup=2,
                                  clock=time.process_time if cpu_time else time.perf_counter)
    return [dict(task=f"training iteration, batch {num_images}", ours_s=medians["ours"],
                 torchvision_s=medians["torchvision"], ours_ips=num_images / medians["ours"],
                 torchvision_ips=num_images / medians["torchvision"],
                 ratio=medians["torchvision"] / medians["ours"])]


def _run_train_speed(args) -> None:
    print(f"Tiny FPN detector (faster_rcnn_tiny_fpn as the chapters build it, 64 FPN channels; torchvision's "
          f"FasterRCNN around the same backbone, same weights and settings), {args.images} embedded training images, "
          f"{torch.get_num_threads()} torch threads, "
          f"median of {args.repeats} interleaved iterations (forward + backward + AdamW step), "
          f"{'CPU' if args.cpu_time else 'wall'} seconds")
    print("| task | ours (s) | torchvision (s) | ours (images/s) | torchvision (images/s) | images/s ours / tv |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in bench_train_speed(args.images, args.repeats, args.cpu_time):
        print(f"| {r['task']} | {r['ours_s']:.3f} | {r['torchvision_s']:.3f} | {r['ours_ips']:.2f} | "
              f"{r['torchvision_ips']:.2f} | {r['ratio']:.3f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m frcnn_tutorial.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as the machine has)")
    commands = parser.add_subparsers(dest="command", required=True)
    pooling = commands.add_parser("pooling", help="readable roi_align / roi_pool against torchvision's kernels")
    pooling.add_argument("--shape", type=int, nargs=4, default=[2, 256, 50, 68], metavar=("N", "C", "h", "w"))
    pooling.add_argument("--rois", type=int, default=512)
    pooling.add_argument("--output-size", type=int, default=7)
    pooling.add_argument("--stride", type=int, default=16)
    pooling.add_argument("--runs", type=int, default=10)
    pooling.add_argument("--seed", type=int, default=0)
    pooling.set_defaults(run=_run_pooling)
    speed = commands.add_parser("speed", help="the whole model (from_torchvision) against torchvision's")
    speed.add_argument("--images", type=int, default=2)
    speed.add_argument("--height", type=int, default=480)
    speed.add_argument("--width", type=int, default=640)
    speed.add_argument("--repeats", type=int, default=5)
    speed.set_defaults(run=_run_speed)
    train_speed = commands.add_parser("train-speed", help="training images/s of the tiny CPU model vs torchvision's")
    train_speed.add_argument("--images", type=int, default=4)
    train_speed.add_argument("--repeats", type=int, default=15)
    train_speed.add_argument("--cpu-time", action="store_true", help="CPU seconds of this process, not wall time")
    train_speed.set_defaults(run=_run_train_speed)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.run(args)


if __name__ == "__main__":
    main()
