"""Batching detection samples: collate_fn, aspect-ratio groups and the grouped batch sampler.

Shape shorthand: N images in the dataset, B images per batch, k bins per side of ratio 1.
Aspect ratio = H/W (the project's convention; torchvision's reference script uses W/H, which only
renumbers the groups). Images of different sizes cannot be stacked, so a batch is a tuple of
[3,H,W] tensors that the model pads itself; padding wastes less when the images of a batch have
similar shapes, which is what grouping by aspect ratio buys (it matters most on a GPU).

After torchvision's references/detection/group_by_aspect_ratio.py.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import defaultdict
from itertools import chain, repeat

import numpy as np
import torch
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, Sampler, Subset


def collate_fn(batch):
    """[(image, target), ...] -> ((image, ...), (target, ...)): no stacking, sizes may differ."""
    return tuple(zip(*batch, strict=True))


def compute_aspect_ratios(dataset) -> list[float]:
    """H/W of every image, from the annotations when the dataset can tell its sizes without decoding."""
    if hasattr(dataset, "get_height_and_width"):
        sizes = [dataset.get_height_and_width(i) for i in range(len(dataset))]
        return [h / w for h, w in sizes]
    if isinstance(dataset, ConcatDataset):
        return [r for part in dataset.datasets for r in compute_aspect_ratios(part)]
    if isinstance(dataset, Subset):
        ratios = compute_aspect_ratios(dataset.dataset)
        return [ratios[i] for i in dataset.indices]
    if hasattr(dataset, "dataset") and len(dataset) == len(dataset.dataset):  # a wrapper, e.g. SeededAugmentation
        return compute_aspect_ratios(dataset.dataset)
    # Unknown dataset: decode every image (slow, but correct).
    return [dataset[i][0].shape[-2] / dataset[i][0].shape[-1] for i in range(len(dataset))]


def quantize(values, bins) -> list[int]:
    """Index of the bin each value falls in: 0 below bins[0], len(bins) at or above bins[-1]."""
    bins = sorted(bins)
    return [bisect.bisect_right(bins, v) for v in values]


def create_aspect_ratio_groups(dataset, k: int = 0) -> list[int]:
    """A group id per image: 2k bins spaced evenly in log2 between ratios 1/2 and 2, plus the two tails."""
    ratios = compute_aspect_ratios(dataset)
    bins = (2 ** np.linspace(-1, 1, 2 * k + 1)).tolist() if k > 0 else [1.0]
    return quantize(ratios, bins)


def _repeat_to_at_least(items: list, n: int) -> list:
    return list(chain.from_iterable(repeat(items, math.ceil(n / len(items)))))


class GroupedBatchSampler(BatchSampler):
    """Batches whose images all share a group id, in the order the wrapped sampler yields them.

    Each group fills its own buffer; a full buffer is yielded at once. At the end the fullest
    leftover buffers are topped up with repeats of their group, so there are always
    len(sampler) // batch_size batches, as many as a plain BatchSampler with drop_last=True.
    """

    def __init__(self, sampler: Sampler, group_ids: list[int], batch_size: int):
        if not isinstance(sampler, Sampler):
            raise ValueError(f"sampler should be a torch.utils.data.Sampler, got {type(sampler).__name__}")
        self.sampler, self.group_ids, self.batch_size = sampler, group_ids, batch_size

    def __iter__(self):
        buffers, seen = defaultdict(list), defaultdict(list)
        num_batches = 0
        for index in self.sampler:
            group = self.group_ids[index]
            buffers[group].append(index)
            seen[group].append(index)
            if len(buffers[group]) == self.batch_size:
                yield buffers.pop(group)
                num_batches += 1
        remaining = len(self) - num_batches
        for group, buffer in sorted(buffers.items(), key=lambda item: len(item[1]), reverse=True):
            if remaining <= 0:
                break
            missing = self.batch_size - len(buffer)
            yield buffer + _repeat_to_at_least(seen[group], missing)[:missing]
            remaining -= 1

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size


def loader_throughput(dataset, workers: int = 0, batch_size: int = 4, num_batches: int = 50) -> float:
    """Images per second that a DataLoader delivers from `dataset` (first batch excluded: worker start-up)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate_fn,
                        generator=torch.Generator().manual_seed(0), persistent_workers=False)
    count, start = 0, None
    for i, (images, _) in enumerate(loader):
        if i == 0:
            start = time.perf_counter()
            continue
        count += len(images)
        if i == num_batches:
            break
    return count / (time.perf_counter() - start)
