"""The embedded dataset: a small VOC-format detection dataset of textured shapes, drawn on the spot.

Shape shorthand: G objects in one image, K = 6 object classes (label k is EMBEDDED_CLASSES[k-1]),
H, W the image's height and width (each 128..320 px). Written in the VOC devkit layout:
  root/VOCdevkit/VOCembedded/{Annotations/<id>.xml, JPEGImages/<id>.jpg, ImageSets/Main/<split>.txt}
so the VOC reader is what reads it:  VOCDetection(root, year="embedded", classes=EMBEDDED_CLASSES).

What it exercises, as VOC does:
  - 6 classes, each with its own shape and its own fill texture (colours random):
      ellipse/gradient, rectangle/stripes, triangle/checker, star/solid, ring/speckle, cross/dots;
  - 2-6 objects per image; sizes log-uniform from 10 px to 90% of the shorter side (sqrt of box area),
    aspect ratios h/w from 1/2 to 2;
  - occlusion: later objects are drawn over earlier ones (no object keeps less than 25% of its pixels);
  - truncation at the borders (<truncated>1</truncated>); cluttered backgrounds (gradient, blobs,
    lines, noise);
  - "difficult" (as VOC: hard to recognise): under 12 px (sqrt of box area) or under half of the
    shape visible. Boxes are the extent of the visible pixels, VOC's annotation rule.
Image i of a split depends only on (seed, split, i): a larger set starts with the smaller one's images.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from frcnn_tutorial.utils import file_lock

EMBEDDED_CLASSES = ("ellipse", "rectangle", "triangle", "star", "ring", "cross")
TEXTURES = {"ellipse": "gradient", "rectangle": "stripes", "triangle": "checker", "star": "solid",
            "ring": "speckle", "cross": "dots"}
EMBEDDED_YEAR = "embedded"  # the folder is VOCdevkit/VOCembedded
SPLITS = ("train", "val", "test")
GENERATOR_VERSION = 1  # bump when the drawing changes: a cached dataset of another version is redrawn
MIN_SIZE, MAX_FRACTION = 10, 0.9  # object size range: 10 px .. 90% of the image's shorter side
DIFFICULT_SIZE, DIFFICULT_VISIBLE, MIN_VISIBLE = 12, 0.5, 0.25


# ----------------------------------------------------------------------------- shapes and textures


def shape_mask(kind: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """A bool mask [h,w] of one shape touching all four sides of its w x h box."""
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    if kind in ("ellipse", "ring"):
        draw.ellipse([0, 0, w - 1, h - 1], fill=1)
        if kind == "ring":
            t = rng.uniform(0.2, 0.3)  # ring thickness as a fraction of the size
            draw.ellipse([t * w, t * h, (1 - t) * w - 1, (1 - t) * h - 1], fill=0)
    elif kind == "rectangle":
        draw.rectangle([0, 0, w - 1, h - 1], fill=1)
    elif kind == "triangle":
        apex = rng.uniform(0.2, 0.8) * (w - 1)
        points = [(apex, 0), (0, h - 1), (w - 1, h - 1)]
        if rng.random() < 0.5:  # pointing down half of the time
            points = [(x, h - 1 - y) for x, y in points]
        draw.polygon(points, fill=1)
    elif kind == "star":
        angles = rng.uniform(0, 2 * np.pi) + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.4, 0.5))
        xs, ys = radii * np.cos(angles), radii * np.sin(angles)
        xs, ys = (xs - xs.min()) / np.ptp(xs) * (w - 1), (ys - ys.min()) / np.ptp(ys) * (h - 1)  # fill the box
        draw.polygon(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=1)
    elif kind == "cross":
        t = rng.uniform(0.15, 0.22)  # half the arm thickness as a fraction of the size
        draw.rectangle([(0.5 - t) * w, 0, (0.5 + t) * w - 1, h - 1], fill=1)
        draw.rectangle([0, (0.5 - t) * h, w - 1, (0.5 + t) * h - 1], fill=1)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return np.asarray(img, dtype=bool)


def random_colour(rng: np.random.Generator, lo: float = 0.0, hi: float = 255.0) -> np.ndarray:
    return rng.uniform(lo, hi, size=3).astype(np.float32)


def texture(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A fill pattern [h,w,3] float32 0..255 made of two random colours."""
    c1, c2 = random_colour(rng), random_colour(rng)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "solid":
        t = np.zeros((h, w), np.float32)
    elif kind == "gradient":
        angle = rng.uniform(0, np.pi)
        t = x * np.cos(angle) + y * np.sin(angle)
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    elif kind == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 9)
        t = ((x * np.cos(angle) + y * np.sin(angle)) // (period / 2) % 2).astype(np.float32)
    elif kind == "checker":
        period = rng.uniform(4, 9)
        t = ((x // (period / 2) + y // (period / 2)) % 2).astype(np.float32)
    elif kind == "speckle":
        t = (rng.random((h, w)) < 0.5).astype(np.float32)
    elif kind == "dots":
        period = rng.uniform(5, 9)
        dx, dy = x % period - period / 2, y % period - period / 2
        t = (dx * dx + dy * dy < (period / 3) ** 2).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return c1 + t[..., None] * (c2 - c1)


def background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Clutter [h,w,3] float32: a dull two-colour gradient, irregular blobs and thin lines (noise comes last)."""
    c1, c2 = random_colour(rng, 40, 200), random_colour(rng, 40, 200)
    ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    canvas = Image.fromarray((c1 + ramp * (c2 - c1)).repeat(w, axis=1).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(3, 8)):  # irregular blobs, close to the background colour
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, 40)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
        radii = r * rng.uniform(0.5, 1.0, 7)
        points = list(zip((cx + radii * np.cos(angles)).tolist(), (cy + radii * np.sin(angles)).tolist(), strict=True))
        draw.polygon(points, fill=tuple(int(v) for v in np.clip((c1 + c2) / 2 + rng.uniform(-30, 30, 3), 0, 255)))
    for _ in range(rng.integers(2, 7)):  # thin lines in any colour: edges that are not objects
        draw.line(rng.uniform(0, [w, h, w, h]).tolist(), fill=tuple(rng.integers(0, 256, 3).tolist()),
                  width=int(rng.integers(1, 3)))
    return np.asarray(canvas, dtype=np.float32)


# ----------------------------------------------------------------------------- one image


def sample_box(h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(x0, y0, bw, bh) of a shape's full box; x0/y0 may be negative or run past the border (truncation)."""
    size = np.exp(rng.uniform(np.log(MIN_SIZE), np.log(MAX_FRACTION * min(h, w))))
    ratio = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))  # h/w
    bw = int(np.clip(round(size / np.sqrt(ratio)), 6, 0.95 * w))
    bh = int(np.clip(round(size * np.sqrt(ratio)), 6, 0.95 * h))
    out = 0.4 if rng.random() < 0.3 else 0.0  # 30% of the shapes may hang up to 40% over a border
    x0 = int(rng.uniform(-out * bw, w - (1 - out) * bw))
    y0 = int(rng.uniform(-out * bh, h - (1 - out) * bh))
    return x0, y0, bw, bh


def place(owner: np.ndarray, visible: list[int], full: list[int], mask: np.ndarray, x0: int, y0: int):
    """(region slices, mask clipped to the image, pixels each earlier object would lose) of a shape at (x0, y0).

    None if too little of the shape is inside the image or it would hide too much of an earlier object.
    """
    h, w = owner.shape
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + mask.shape[1], w), min(y0 + mask.shape[0], h)
    if xb - xa < 2 or yb - ya < 2:
        return None
    clipped = mask[ya - y0:yb - y0, xa - x0:xb - x0]
    if clipped.sum() < MIN_VISIBLE * mask.sum():
        return None
    region = (slice(ya, yb), slice(xa, xb))
    hidden = np.bincount(owner[region][clipped] + 1, minlength=len(visible) + 1)[1:]  # pixels each one loses
    if any(v - lost < MIN_VISIBLE * f for v, lost, f in zip(visible, hidden, full, strict=True)):
        return None
    return region, clipped, hidden


def draw_image(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """One image [h,w,3] uint8 and its objects [{"name","box" (VOC 1-based),"truncated","occluded","difficult"}]."""
    canvas, owner = background(h, w, rng), np.full((h, w), -1, np.int32)  # owner: which object a pixel shows
    names, visible, in_image, full = [], [], [], []  # pixel counts: shown now, inside the image, whole shape
    for _ in range(rng.integers(2, 7)):
        name = EMBEDDED_CLASSES[rng.integers(len(EMBEDDED_CLASSES))]
        for _attempt in range(10):
            x0, y0, bw, bh = sample_box(h, w, rng)
            mask = shape_mask(name, bw, bh, rng)
            spot = place(owner, visible, full, mask, x0, y0)
            if spot is not None:
                break
        if spot is None:
            continue  # no room left for this one
        region, clipped, lost = spot
        fill = texture(TEXTURES[name], clipped.shape[0], clipped.shape[1], rng)
        canvas[region][clipped] = fill[clipped]  # canvas[region] is a view: this paints the canvas
        visible = [v - int(n) for v, n in zip(visible, lost, strict=True)] + [int(clipped.sum())]
        owner[region][clipped] = len(names)
        names.append(name)
        in_image.append(int(clipped.sum()))
        full.append(int(mask.sum()))
    canvas += rng.normal(0, 6, canvas.shape).astype(np.float32)  # sensor noise over everything
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    return image, describe_objects(owner, names, visible, in_image, full)


def describe_objects(owner, names, visible, in_image, full) -> list[dict]:
    """The annotation of each object: box of its visible pixels, truncated/occluded/difficult flags."""
    objects = []
    for i, name in enumerate(names):
        ys, xs = np.nonzero(owner == i)
        # pixel columns c0..c1 (0-based) are VOC's c0+1..c1+1 (1-based, inclusive)
        box = (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)
        side = np.sqrt((box[2] - box[0] + 1) * (box[3] - box[1] + 1))
        objects.append({"name": name, "box": box, "truncated": in_image[i] < full[i],
                        "occluded": visible[i] < in_image[i],
                        "difficult": bool(side < DIFFICULT_SIZE or visible[i] < DIFFICULT_VISIBLE * full[i])})
    return objects


# ----------------------------------------------------------------------------- files


def annotation_xml(image_id: str, h: int, w: int, objects: list[dict]) -> str:
    """VOC-style XML text, written by hand so the bytes depend on the content only."""
    parts = [f"<annotation>\n\t<folder>VOC{EMBEDDED_YEAR}</folder>\n\t<filename>{image_id}.jpg</filename>\n"
             f"\t<source><database>frcnn_tutorial embedded shapes</database></source>\n"
             f"\t<size><width>{w}</width><height>{h}</height><depth>3</depth></size>\n\t<segmented>0</segmented>\n"]
    for obj in objects:
        xmin, ymin, xmax, ymax = obj["box"]
        parts.append(f"\t<object>\n\t\t<name>{obj['name']}</name>\n\t\t<pose>Unspecified</pose>\n"
                     f"\t\t<truncated>{int(obj['truncated'])}</truncated>\n\t\t<occluded>{int(obj['occluded'])}"
                     f"</occluded>\n\t\t<difficult>{int(obj['difficult'])}</difficult>\n"
                     f"\t\t<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax>"
                     f"</bndbox>\n\t</object>\n")
    return "".join(parts) + "</annotation>\n"


def write_sample(voc_dir: Path, seed: int, split: str, index: int) -> str:
    """Draw image `index` of `split` and write its JPEG and XML; returns its id (e.g. train_000042)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])  # this image's own stream
    h, w = (int(v) for v in rng.integers(128, 321, size=2))
    image, objects = draw_image(h, w, rng)
    image_id = f"{split}_{index:06d}"
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=92)
    (voc_dir / "JPEGImages" / f"{image_id}.jpg").write_bytes(buffer.getvalue())
    (voc_dir / "Annotations" / f"{image_id}.xml").write_text(annotation_xml(image_id, h, w, objects))
    return image_id


def default_root() -> Path:
    from frcnn_tutorial import data_dir

    return data_dir() / "embedded"


def _settings(seed: int, counts: dict[str, int]) -> dict:
    return {"generator_version": GENERATOR_VERSION, "seed": seed, "counts": counts}


def make_embedded_dataset(root=None, seed: int = 0, num_train: int = 600, num_val: int = 100, num_test: int = 200,
                          overwrite: bool = False) -> Path:
    """Write the dataset under root/VOCdevkit/VOCembedded (once) and return root.

    Cached: a completion marker holding the settings is written last (atomically), so a finished set with the
    same settings is reused, a killed run is redone, and different settings need overwrite=True.
    """
    root = Path(root) if root is not None else default_root()
    voc_dir = root / "VOCdevkit" / f"VOC{EMBEDDED_YEAR}"
    counts = {"train": num_train, "val": num_val, "test": num_test}
    wanted, marker = _settings(seed, counts), voc_dir / "COMPLETE.json"  # the marker read_marker() reads
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".embedded.lock"):  # DDP ranks or notebooks starting together generate it once
        found = read_marker(root)
        if found is not None:
            if found == wanted and not overwrite:
                return root
            if not overwrite:
                raise FileExistsError(f"{voc_dir} holds an embedded dataset made with {found}, not {wanted}; "
                                      f"pass overwrite=True (--overwrite) to replace it, or use another root")
        shutil.rmtree(voc_dir, ignore_errors=True)  # whatever is there is unfinished or unwanted
        _generate(voc_dir, seed, counts)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(wanted, indent=1))
        os.replace(tmp, marker)  # atomic: the marker is either absent or complete
    return root


def _generate(voc_dir: Path, seed: int, counts: dict[str, int]) -> None:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc_dir / sub).mkdir(parents=True, exist_ok=True)
    lists = {split: [write_sample(voc_dir, seed, split, i) for i in range(n)] for split, n in counts.items()}
    lists["trainval"] = lists["train"] + lists["val"]  # as in VOC: what the final model trains on
    for split, ids in lists.items():
        (voc_dir / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


def embedded_dataset(split: str = "train", transforms=None, root=None, keep_difficult: bool = True):
    """VOCDetection over the embedded dataset, generating it (default settings) on first use.

    A finished dataset already at `root` is used whatever its settings (e.g. a small one made for a test);
    one drawn by an older version of this generator is redrawn with the same settings.
    """
    from frcnn_tutorial.data.voc import VOCDetection

    root = Path(root) if root is not None else default_root()
    found = read_marker(root)
    if found is None:
        make_embedded_dataset(root)
    elif found.get("generator_version") != GENERATOR_VERSION:
        counts = found["counts"]
        make_embedded_dataset(root, found["seed"], counts["train"], counts["val"], counts["test"], overwrite=True)
    return VOCDetection(root, year=EMBEDDED_YEAR, image_set=split, classes=EMBEDDED_CLASSES,
                        keep_difficult=keep_difficult, transforms=transforms)


def read_marker(root) -> dict | None:
    """The settings of the finished dataset under root, or None if there is none (or it was interrupted)."""
    marker = Path(root) / "VOCdevkit" / f"VOC{EMBEDDED_YEAR}" / "COMPLETE.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


load_embedded = embedded_dataset  # the contract's name for it


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m frcnn_tutorial.data.embedded", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="default: frcnn_tutorial.data_dir()/embedded")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset made with other settings")
    parser.add_argument("--check", action="store_true", help="then read every file back with the VOC checker")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = make_embedded_dataset(args.root, args.seed, args.num_train, args.num_val, args.num_test, args.overwrite)
    print(f"embedded dataset ready in {root / 'VOCdevkit' / ('VOC' + EMBEDDED_YEAR)} "
          f"({time.perf_counter() - start:.1f} s)")
    if args.check:
        from frcnn_tutorial.data.voc import check_tree

        return 1 if check_tree(root, [EMBEDDED_YEAR], list(SPLITS), EMBEDDED_CLASSES) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
