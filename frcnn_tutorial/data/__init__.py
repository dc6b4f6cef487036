"""Data: the PASCAL VOC reader, the embedded shapes dataset, box-aware transforms and batching.

Shape shorthand: G ground-truth boxes in one image, K object classes without background, B images per batch.
A sample is (image [3,H,W] float32 0..1, {"boxes": [G,4] x1,y1,x2,y2, "labels": [G] int64 1..K,
"difficult": [G] bool, "image_id": int64, "orig_size": [2] (H, W)}); label 0 is background.
"""

import warnings

from frcnn_tutorial.data.batching import (
    GroupedBatchSampler,
    collate_fn,
    compute_aspect_ratios,
    create_aspect_ratio_groups,
    loader_throughput,
)
from frcnn_tutorial.data.embedded import (
    EMBEDDED_CLASSES,
    EMBEDDED_YEAR,
    embedded_dataset,
    load_embedded,
    make_embedded_dataset,
)
from frcnn_tutorial.data.transforms import (
    ColorJitter,
    Compose,
    PhotometricJitter,
    RandomHorizontalFlip,
    ResizeKeepAspect,
    ToTensor,
)
from frcnn_tutorial.data.voc import (
    VOC_CLASSES,
    HalfExtractedError,
    VOCDetection,
    VOCFormatError,
    check_tree,
    download_voc,
    voc07_12_trainval,
)

__all__ = [
    "VOC_CLASSES", "VOCDetection", "VOCFormatError", "HalfExtractedError", "voc07_12_trainval", "check_tree",
    "download_voc", "EMBEDDED_CLASSES", "EMBEDDED_YEAR", "make_embedded_dataset", "embedded_dataset", "load_embedded",
    "Compose", "ToTensor", "RandomHorizontalFlip", "ResizeKeepAspect", "PhotometricJitter", "ColorJitter",
    "collate_fn", "compute_aspect_ratios", "create_aspect_ratio_groups", "GroupedBatchSampler", "loader_throughput",
]

# `python -m frcnn_tutorial.data.voc` (or .embedded) imports this package, which imports voc, before runpy runs
# voc as __main__; runpy then warns about the second copy. Harmless for these command lines: keep their output clean.
warnings.filterwarnings("ignore", message=r"'frcnn_tutorial\.data\.(voc|embedded)' found in sys\.modules",
                        category=RuntimeWarning)
