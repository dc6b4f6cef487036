"""How fast the data arrives: images/s of the VOC reader + training transforms through a DataLoader.

Shape shorthand: B = 4 images per batch, each [3,H,W] float32, resized so min(H,W) = 256 or max(H,W) = 384.

    python -m frcnn_tutorial.data [--root data/embedded] [--workers 0 1 2] [--batches 149]

Measured on the embedded dataset's train split (generated first if absent), batch 4, with
flip + photometric jitter + resize to 256..384 (the resize the embedded-cpu preset asks of the model).
"""

import argparse

import torch

from frcnn_tutorial.data import (
    Compose,
    PhotometricJitter,
    RandomHorizontalFlip,
    ResizeKeepAspect,
    embedded_dataset,
    loader_throughput,
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m frcnn_tutorial.data", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="embedded dataset root (default: data_dir()/embedded)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=149, help="149 batches of 4 + the first: one epoch")
    args = parser.parse_args(argv)
    transforms = Compose([RandomHorizontalFlip(0.5), PhotometricJitter(), ResizeKeepAspect(256, 384)])
    dataset = embedded_dataset("train", transforms=transforms, root=args.root)
    print(f"{dataset}\n{transforms}\nmain process: {torch.get_num_threads()} torch thread(s)")
    for workers in args.workers:
        rate = loader_throughput(dataset, workers=workers, batch_size=4, num_batches=args.batches)
        print(f"workers={workers}: {rate:.0f} images/s")


if __name__ == "__main__":
    main()
