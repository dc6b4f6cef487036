"""Draw a trained model's detections onto images.

    python -m frcnn_tutorial.predict --checkpoint runs/embedded/last.pt IMAGE [IMAGE ...] --out predictions/

Shapes: one image [3, H, W] float in 0..1 at a time; D detections per image.
Writes OUT/<image name>.png for each image, and prints one line per image with its detections.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a command-line tool: never open a window
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402
from torchvision.transforms.functional import pil_to_tensor  # noqa: E402

from frcnn_tutorial.engine import CheckpointError  # noqa: E402
from frcnn_tutorial.train import load_model  # noqa: E402
from frcnn_tutorial.viz import draw_detections  # noqa: E402


def read_image(path: Path) -> torch.Tensor:
    """An RGB image file as [3, H, W] float in 0..1, with a clear error for a missing or broken file."""
    try:
        with Image.open(path) as img:
            return pil_to_tensor(img.convert("RGB")).float() / 255.0
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such image") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise SystemExit(f"{path}: not a readable image ({exc})") from None


@torch.no_grad()
def predict_files(checkpoint: Path, images: list[Path], out: Path, score_threshold: float = 0.5,
                  device: str = "cpu") -> list[Path]:
    model, _, classes = load_model(checkpoint, device=device)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        image = read_image(path)
        detections = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
        keep = detections["scores"] >= score_threshold
        fig = draw_detections(image, detections, class_names=classes, score_threshold=score_threshold,
                              title=f"{path.name}: {int(keep.sum())} detections >= {score_threshold}")
        target = out / f"{path.stem}.png"
        fig.savefig(target, dpi=100, bbox_inches="tight")
        plt.close(fig)
        names = [classes[i - 1] for i in detections["labels"][keep].tolist()]
        print(f"{path}: {', '.join(names) or 'nothing'} -> {target}")
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m frcnn_tutorial.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("predictions"))
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        predict_files(args.checkpoint, args.images, args.out, args.score_threshold, args.device)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
