"""Faster R-CNN with a Feature Pyramid Network, built step by step and checked against torchvision."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

from frcnn_tutorial.utils import get_device, profile, seed_everything, show_source  # noqa: E402

__all__ = ["__version__", "hello", "get_device", "seed_everything", "profile", "show_source", "data_dir"]


def data_dir() -> Path:
    """Where datasets are looked for: $FRCNN_DATA if set, else `data/` at the top of the checkout."""
    import os

    env = os.environ.get("FRCNN_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return (Path(__file__).resolve().parent.parent / "data").resolve()


def hello() -> dict:
    """Print (and return) what this course runs on: versions, device and data folder."""
    import torch
    import torchvision

    info = {
        "frcnn_tutorial": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(get_device()),
        "threads": torch.get_num_threads(),
        "data": str(data_dir()),
        "profile": profile(),
    }
    for key, value in info.items():
        print(f"{key:>15}: {value}")
    return info
