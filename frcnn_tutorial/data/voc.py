"""PASCAL VOC: read the devkit layout, check a whole tree, download the archives.

Shape shorthand: G ground-truth objects in one image, K object classes WITHOUT background
(label k in 1..K is classes[k-1]; 0 is background), H, W the image's height and width.
One sample is (image [3,H,W] float32 in 0..1, target) with target =
  {"boxes": [G,4] float32 x1,y1,x2,y2, "labels": [G] int64 in 1..K, "difficult": [G] bool,
   "image_id": int64 scalar (the index in this dataset; dataset.ids[image_id] is the file stem),
   "orig_size": [2] int64 (H, W) of the file}.

Layout (the one the VOC archives unpack to; a user's own data in this layout works too):
  root/VOCdevkit/VOC{year}/Annotations/<id>.xml
                          /JPEGImages/<id>.jpg
                          /ImageSets/Main/<split>.txt   (one id per line)

Coordinates: VOC numbers pixels from 1 and its boxes include both end pixels, so a box from
xmin=1 to xmax=3 covers 3 pixels. In continuous coordinates (pixel i, 0-based, spans [i, i+1])
that box spans [0, 3]: hence x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax, and the
width x2 - x1 = xmax - xmin + 1 is the devkit's pixel count (detectron2 does the same).

Every bad input raises VOCFormatError naming the file and the problem; `python -m
frcnn_tutorial.data.voc --check ROOT` lists every bad file in a tree. XML goes through
defusedxml, which refuses entity declarations (the "billion laughs" attack).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import defusedxml.ElementTree as SafeET
import numpy as np
import torch
from defusedxml import DefusedXmlException
from PIL import Image
from torchvision.datasets.utils import download_url, extract_archive
from torchvision.datasets.voc import DATASET_YEAR_DICT

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


class VOCFormatError(ValueError):
    """A file of a VOC tree is missing or wrong; the message starts with the file's path."""


# ----------------------------------------------------------------------------- reading one file


def read_image_set(path: Path) -> list[str]:
    """The image ids listed in ImageSets/Main/<split>.txt, refusing ids that could escape the tree."""
    path = Path(path)
    if not path.is_file():
        siblings = sorted(p.stem for p in path.parent.glob("*.txt") if "_" not in p.stem)
        raise VOCFormatError(f"{path}: split file not found (splits here: {', '.join(siblings) or 'none'})")
    ids = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        image_id = line.split()[0]  # per-class lists ("000005 -1") carry a flag after the id
        # An id becomes part of a file path: "../../x" or "a/b" would read outside the tree.
        if "/" in image_id or "\\" in image_id or ".." in image_id or "\0" in image_id:
            raise VOCFormatError(f"{path}: line {lineno}: image id {image_id!r} contains a path separator or "
                                 f"'..'; an id is a file stem such as 000005")
        ids.append(image_id)
    return ids


def _parse_xml(path: Path):
    if not path.is_file():
        raise VOCFormatError(f"{path}: annotation file not found")
    try:
        return SafeET.parse(path).getroot()
    except DefusedXmlException as e:
        raise VOCFormatError(f"{path}: refused XML that declares entities or external references ({e})") from None
    except SafeET.ParseError as e:
        raise VOCFormatError(f"{path}: malformed XML ({e})") from None


def _number(path: Path, node, tag: str, where: str) -> float:
    text = node.findtext(tag) if node is not None else None
    try:
        return float(text)  # float, not int: a few VOC2012 files write "273.5"
    except (TypeError, ValueError):
        raise VOCFormatError(f"{path}: {where}: <{tag}> is missing or not a number ({text!r})") from None


def read_size(path: Path) -> tuple[int, int]:
    """(H, W) from an annotation's <size>, without touching the image (for aspect-ratio grouping)."""
    root = _parse_xml(Path(path))
    size = root.find("size")
    return int(_number(path, size, "height", "<size>")), int(_number(path, size, "width", "<size>"))


def parse_annotation(path: Path, classes: tuple[str, ...]) -> dict:
    """One annotation file -> {"size": (H, W), "boxes": [G,4] (continuous x1,y1,x2,y2), "labels", "difficult"}."""
    path = Path(path)
    root = _parse_xml(path)
    size = root.find("size")
    h, w = int(_number(path, size, "height", "<size>")), int(_number(path, size, "width", "<size>"))
    if h <= 0 or w <= 0:
        raise VOCFormatError(f"{path}: <size> says {w}x{h}; an image needs a positive width and height")
    boxes, labels, difficult = [], [], []
    for i, obj in enumerate(root.iter("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        if name not in classes:
            raise VOCFormatError(f"{path}: object {i}: unknown class {name!r} (known: {', '.join(classes)})")
        boxes.append(_parse_box(path, obj.find("bndbox"), f"object {i} ({name})", h, w))
        labels.append(classes.index(name) + 1)  # 0 is background
        difficult.append(obj.findtext("difficult", "0").strip() == "1")
    return {"size": (h, w), "boxes": np.array(boxes, np.float32).reshape(-1, 4),
            "labels": np.array(labels, np.int64), "difficult": np.array(difficult, bool)}


def _parse_box(path: Path, bndbox, where: str, h: int, w: int) -> list[float]:
    if bndbox is None:
        raise VOCFormatError(f"{path}: {where}: no <bndbox>")
    xmin, ymin, xmax, ymax = (_number(path, bndbox, tag, where) for tag in ("xmin", "ymin", "xmax", "ymax"))
    x1, y1, x2, y2 = xmin - 1, ymin - 1, xmax, ymax  # 1-based inclusive pixels -> continuous (module docstring)
    shown = f"xmin={xmin:g} ymin={ymin:g} xmax={xmax:g} ymax={ymax:g}"
    if x2 <= x1 or y2 <= y1:
        raise VOCFormatError(f"{path}: {where}: box {shown} has zero area (needs xmin <= xmax and ymin <= ymax)")
    if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
        raise VOCFormatError(f"{path}: {where}: box {shown} lies outside the {w}x{h} image "
                             f"(VOC boxes run from 1 to width/height)")
    return [x1, y1, x2, y2]


def load_image(path: Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A JPEG as [3,H,W] float32 in 0..1 (grey images become RGB); checks (H, W) against `size`."""
    path = Path(path)
    if not path.is_file():
        raise VOCFormatError(f"{path}: image file not found")
    try:
        with Image.open(path) as pil:
            array = np.array(pil.convert("RGB"))  # convert() decodes everything, so truncation shows up here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise VOCFormatError(f"{path}: corrupt or unreadable image ({e})") from None
    if size is not None and array.shape[:2] != tuple(size):
        raise VOCFormatError(f"{path}: image is {array.shape[1]}x{array.shape[0]} but its annotation says "
                             f"{size[1]}x{size[0]}")
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)


# ----------------------------------------------------------------------------- the dataset


class VOCDetection(torch.utils.data.Dataset):
    """A VOC-layout detection dataset: dataset[i] -> (image [3,H,W], target); see the module docstring."""

    def __init__(self, root, year: str = "2007", image_set: str = "trainval", classes=VOC_CLASSES,
                 keep_difficult: bool = True, transforms=None):
        self.root, self.year, self.image_set = Path(root), str(year), image_set
        self.voc_dir = self.root / "VOCdevkit" / f"VOC{self.year}"
        if not self.voc_dir.is_dir():
            raise FileNotFoundError(f"{self.voc_dir}: no such folder; download VOC with `python -m "
                                    f"frcnn_tutorial.data.voc --download --root {self.root}` (see data/README.md)")
        self.classes = tuple(classes)
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise ValueError(f"classes must be distinct names, got {self.classes}")
        self.keep_difficult, self.transforms = keep_difficult, transforms
        self.ids = read_image_set(self.voc_dir / "ImageSets" / "Main" / f"{image_set}.txt")

    def __len__(self) -> int:
        return len(self.ids)

    def annotation_path(self, index: int) -> Path:
        return self.voc_dir / "Annotations" / f"{self.ids[index]}.xml"

    def image_path(self, index: int) -> Path:
        return self.voc_dir / "JPEGImages" / f"{self.ids[index]}.jpg"

    def get_height_and_width(self, index: int) -> tuple[int, int]:
        """(H, W) read from the XML alone: grouping by aspect ratio need not decode any image."""
        return read_size(self.annotation_path(index))

    def __getitem__(self, index: int):
        ann = parse_annotation(self.annotation_path(index), self.classes)
        image = load_image(self.image_path(index), ann["size"])
        keep = np.ones(len(ann["labels"]), bool) if self.keep_difficult else ~ann["difficult"]
        target = {
            "boxes": torch.from_numpy(ann["boxes"][keep]),
            "labels": torch.from_numpy(ann["labels"][keep]),
            "difficult": torch.from_numpy(ann["difficult"][keep]),
            "image_id": torch.tensor(index, dtype=torch.int64),
            "orig_size": torch.tensor(ann["size"], dtype=torch.int64),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (f"VOCDetection({self.voc_dir}, image_set={self.image_set!r}, {len(self)} images, "
                f"{len(self.classes)} classes, keep_difficult={self.keep_difficult})")


def voc07_12_trainval(root, classes=VOC_CLASSES, keep_difficult: bool = True, transforms=None):
    """VOC2007 trainval + VOC2012 trainval (16551 images), the usual "07+12" training set."""
    parts = [VOCDetection(root, year, "trainval", classes, keep_difficult, transforms) for year in ("2007", "2012")]
    return torch.utils.data.ConcatDataset(parts)


# ----------------------------------------------------------------------------- checking a whole tree


def split_names(voc_dir: Path) -> list[str]:
    """The split lists of a VOC folder (train, val, trainval, test...), not the per-class lists (cat_train)."""
    return sorted(p.stem for p in (Path(voc_dir) / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)


def check_voc(voc_dir: Path, splits=None, classes=VOC_CLASSES) -> tuple[list[str], int]:
    """Read every image and annotation of the given splits (default: all). Returns (problems, images checked)."""
    voc_dir, problems, ids = Path(voc_dir), [], {}
    for split in splits or split_names(voc_dir):
        try:
            ids.update(dict.fromkeys(read_image_set(voc_dir / "ImageSets" / "Main" / f"{split}.txt")))
        except VOCFormatError as e:
            problems.append(str(e))
    for image_id in ids:
        try:  # the same two calls as VOCDetection.__getitem__, so "clean" means "the reader will not fail"
            ann = parse_annotation(voc_dir / "Annotations" / f"{image_id}.xml", tuple(classes))
            load_image(voc_dir / "JPEGImages" / f"{image_id}.jpg", ann["size"])
        except VOCFormatError as e:
            problems.append(str(e))
    return problems, len(ids)


def check_tree(root, years=None, splits=None, classes=VOC_CLASSES, out=None) -> int:
    """Print a report of every bad file under root/VOCdevkit (to `out`, default stdout); return the problem count."""
    out = out or sys.stdout
    devkit = Path(root) / "VOCdevkit"
    voc_dirs = [devkit / f"VOC{y}" for y in years] if years else sorted(devkit.glob("VOC*"))
    if not voc_dirs or not all(d.is_dir() for d in voc_dirs):
        print(f"{devkit}: no VOC folder to check (looked for {[d.name for d in voc_dirs] or 'VOC*'})", file=out)
        return 1
    total = 0
    for voc_dir in voc_dirs:
        problems, count = check_voc(voc_dir, splits, classes)
        for problem in problems:
            print(f"  {problem}", file=out)
        status = "clean" if not problems else f"{len(problems)} problem(s)"
        print(f"{voc_dir.name}: checked {count} images (splits: {', '.join(splits or split_names(voc_dir))}): "
              f"{status}", file=out)
        total += len(problems)
    return total


# ----------------------------------------------------------------------------- downloading


class HalfExtractedError(RuntimeError):
    """An earlier extraction stopped half-way; extracting again on top of it would hide missing files."""


def archives_for(years) -> list[dict]:
    """torchvision's archive entries (url, md5, base_dir) for VOC2007 (trainval + test) and VOC2012 (trainval)."""
    keys = {"2007": ["2007", "2007-test"], "2012": ["2012"]}
    return [DATASET_YEAR_DICT[key] for year in years for key in keys[str(year)]]


def _marker(root: Path, entry: dict, state: str) -> Path:
    return root / "VOCdevkit" / f".{entry['filename']}.{state}"  # state: "extracting" or "done"


def _refuse_half_extracted(root: Path, entry: dict) -> None:
    target = root / entry["base_dir"]
    if _marker(root, entry, "extracting").exists():
        raise HalfExtractedError(f"{target}: the extraction of {entry['filename']} was interrupted; delete {target} "
                                 f"and {_marker(root, entry, 'extracting')}, then run the download again")
    # VOC2007 trainval and test unpack into the same folder: files there are fine if a finished archive made them.
    sharing = [e for e in DATASET_YEAR_DICT.values() if e["base_dir"] == entry["base_dir"]]
    if target.is_dir() and any(target.iterdir()) and not any(_marker(root, e, "done").exists() for e in sharing):
        raise HalfExtractedError(f"{target}: already has files that no finished download wrote (a half-extracted "
                                 f"tree?); delete it and run again, or if you unpacked it yourself check it with "
                                 f"`python -m frcnn_tutorial.data.voc --check {root}` and create "
                                 f"{_marker(root, entry, 'done')}")


def download_voc(root, years=("2007", "2012")) -> None:
    """Download, verify (MD5) and extract the VOC archives into root/VOCdevkit. Safe to run again."""
    root = Path(root)
    entries = archives_for(years)
    for entry in entries:
        if not _marker(root, entry, "done").exists():
            _refuse_half_extracted(root, entry)  # before downloading gigabytes for nothing
    for entry in entries:
        if _marker(root, entry, "done").exists():
            print(f"{entry['filename']}: already extracted")
            continue
        download_url(entry["url"], str(root), entry["filename"], entry["md5"])  # raises on a wrong MD5
        (root / "VOCdevkit").mkdir(parents=True, exist_ok=True)
        _marker(root, entry, "extracting").touch()
        extract_archive(str(root / entry["filename"]), str(root))
        _marker(root, entry, "done").touch()  # only after every file is out
        _marker(root, entry, "extracting").unlink()
        print(f"{entry['filename']}: extracted into {root / entry['base_dir']} (the .tar can be deleted)")


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m frcnn_tutorial.data.voc", description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", metavar="ROOT", help="check every image and annotation under ROOT/VOCdevkit")
    action.add_argument("--download", action="store_true", help="download VOC into --root (needs the network)")
    parser.add_argument("--root", default="data/", help="where VOCdevkit/ goes (--download)")
    parser.add_argument("--year", nargs="+", help="years (default: --download 2007 2012; --check every VOC* folder)")
    parser.add_argument("--split", nargs="+", help="splits to check (default: every ImageSets/Main list)")
    parser.add_argument("--classes", nargs="+", default=list(VOC_CLASSES), help="class names (default: VOC's 20)")
    args = parser.parse_args(argv)
    if args.download:
        if not set(args.year or ()) <= {"2007", "2012"}:
            parser.error("--download knows --year 2007 and 2012")
        download_voc(args.root, args.year or ("2007", "2012"))
        return 0
    problems = check_tree(args.check, args.year, args.split, args.classes)
    print(f"{problems} problem(s) found (a dataset with its own classes needs --classes)" if problems
          else "OK: no problems found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
