"""The machinery of training: one step, evaluation, checkpoints, RNG state, and torch.distributed.

Shapes: N images per step (per process), G ground-truth boxes per image, D detections per image.

Everything here works the same on one CPU, one GPU, or several processes launched by `torchrun`:
the distributed helpers fall back to "one process, rank 0" when torch.distributed is not initialised.
`train.py` strings these pieces into the training loop.
"""

from __future__ import annotations

import math
import os
import random
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from tqdm.auto import tqdm

# ----------------------------------------------------------------------------- distributed


def init_distributed(device_type: str) -> tuple[int, int, int]:
    """Join the process group when launched by torchrun (it sets RANK/WORLD_SIZE); return (rank, world, local_rank).

    NCCL for GPUs, gloo for CPUs (gloo is what lets CI run two processes on one machine).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return rank, world, local_rank


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """Only rank 0 writes files and prints progress."""
    return rank() == 0


def mean_over_processes(values: dict[str, float], finite: bool, device) -> tuple[dict[str, float], bool]:
    """(values averaged over all processes, whether every process had finite ones), in ONE all-reduce: each
    collective is a point where the faster process waits, so a training step has just this one besides DDP's."""
    if world_size() == 1:
        return values, finite
    keys = sorted(values)
    stacked = torch.tensor([float(finite)] + [values[k] if finite else 0.0 for k in keys], dtype=torch.float64,
                           device=device)
    dist.all_reduce(stacked)
    total, *sums = stacked.tolist()
    return {k: v / world_size() for k, v in zip(keys, sums, strict=True)}, total == world_size()


def gather_lists(items: list) -> list:
    """Concatenate a list from every process, in rank order (used to collect predictions for evaluation)."""
    if world_size() == 1:
        return items
    gathered: list[list] = [[] for _ in range(world_size())]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


# ----------------------------------------------------------------------------- data order


class SkipBatches:
    """Wrap a batch sampler and drop its first `skip` batches (resuming in the middle of an epoch).

    Skipping happens on indices, before any image is loaded, so it costs nothing.
    """

    def __init__(self, batch_sampler, skip: int = 0):
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self):
        for i, batch in enumerate(self.batch_sampler):
            if i >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.skip, 0)


class ShareOfBatch:
    """Cut each global batch of a batch sampler into world_size equal parts and yield this process's part."""

    def __init__(self, global_batches, rank: int, world_size: int):
        self.global_batches, self.rank, self.world_size = global_batches, rank, world_size

    def __iter__(self):
        for batch in self.global_batches:
            share = len(batch) // self.world_size
            yield batch[self.rank * share:(self.rank + 1) * share]

    def __len__(self) -> int:
        return len(self.global_batches)


class SeededAugmentation(torch.utils.data.Dataset):
    """Seed the random augmentation of each sample from (seed, epoch, index).

    A sample then gets the same flip whichever worker loads it and whether or not training was resumed,
    which is what makes a resumed run equal to an uninterrupted one.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = (self.seed * 1_000_003 + self.epoch * 100_003 + index) % (2**31)
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):  # the training's own torch RNG (samplers) is left untouched
            random.seed(sample_seed)
            torch.manual_seed(sample_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)


def make_train_loader(dataset, batch_size: int, *, seed: int, epoch: int, skip_batches: int = 0,
                      group_ids: list[int] | None = None, workers: int = 0, pin_memory: bool = False,
                      collate_fn=None) -> DataLoader:
    """The loader for one epoch: shuffled by (seed, epoch), grouped by aspect ratio, each global batch shared out.

    `batch_size` is per process. Batches are whole (drop_last) so every process runs the same number of steps.
    """
    from frcnn_tutorial.data import GroupedBatchSampler
    from frcnn_tutorial.data import collate_fn as default_collate

    # One shuffled order for all processes, cut into global batches; each process takes its share of every one.
    # With aspect grouping, all processes then get images of the same group at each step (about the same size),
    # so none waits long for a bigger one at the gradient all-reduce.
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    global_batch = batch_size * world_size()
    if group_ids is not None:
        batches = GroupedBatchSampler(sampler, group_ids, global_batch)
    else:
        batches = BatchSampler(sampler, global_batch, drop_last=True)
    batches = ShareOfBatch(batches, rank(), world_size())
    if isinstance(dataset, SeededAugmentation):
        dataset.set_epoch(epoch)
    return DataLoader(dataset, batch_sampler=SkipBatches(batches, skip_batches), num_workers=workers,
                      pin_memory=pin_memory, collate_fn=collate_fn or default_collate,
                      generator=torch.Generator().manual_seed(seed + epoch))  # keeps the global RNG untouched


# ----------------------------------------------------------------------------- one step


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite."""


def autocast_context(device: torch.device, amp: bool):
    """fp16 autocast on CUDA (with a GradScaler), bf16 on CPU (no scaler needed: bf16 has fp32's range)."""
    if not amp:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(model, images, targets, optimizer, *, scaler=None, amp=False, device=None, step=0,
               last_finite=None) -> dict[str, float]:
    """One forward/backward/update on a batch. Returns the losses as floats (and their sum as "loss"), averaged
    over the processes when there are several.

    Raises TrainingDiverged before the update if any loss is not finite, so the weights stay good.
    """
    device = device or images[0].device
    with autocast_context(device, amp):
        loss_dict = model(images, targets)
    total = sum(loss_dict.values())
    local = {k: float(v.detach()) for k, v in loss_dict.items()}
    local["loss"] = float(total.detach())
    finite = all(math.isfinite(v) for v in local.values())
    optimizer.zero_grad(set_to_none=True)
    # Backward first, even on a bad loss: every process then meets the others once per step, in DDP's gradient
    # all-reduce, and the losses' mean right after costs no extra wait (before the backward it was a second
    # meeting point, where the fastest forward waited for the slowest). The update comes only after the check.
    (scaler.scale(total) if scaler is not None else total).backward()
    values, all_finite = mean_over_processes(local, finite, device)
    if not finite:
        raise TrainingDiverged(
            f"loss is not finite at step {step}: {_fmt(local)}; last finite losses: {_fmt(last_finite or {})}"
        )
    if not all_finite:  # every process stops together
        raise TrainingDiverged(f"loss is not finite on another process at step {step}; "
                               f"last finite losses: {_fmt(last_finite or {})}")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return values


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items()) or "none yet"


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_dataset(model, dataset, *, device, batch_size: int = 4, workers: int = 0, progress: bool = True,
                    amp: bool = False):
    """Run the model over a dataset; return (predictions, targets) as CPU tensors, gathered from every process."""
    from frcnn_tutorial.data import collate_fn

    was_training = model.training
    model.eval()
    indices = list(range(rank(), len(dataset), world_size()))  # each process takes every world-th image
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate_fn)
    predictions, targets = [], []
    bar = tqdm(loader, desc="evaluate", leave=False, disable=not (progress and is_main_process()))
    for images, batch_targets in bar:
        with autocast_context(device, amp):
            outputs = model([img.to(device) for img in images])
        predictions += [{k: v.float().cpu() for k, v in out.items()} for out in outputs]
        targets += [{k: v for k, v in t.items() if k in ("boxes", "labels", "difficult")} for t in batch_targets]
    model.train(was_training)
    return gather_lists(predictions), gather_lists(targets)


def evaluate(model, dataset, *, class_names=None, metric: str = "area", device=None, batch_size: int = 4,
             workers: int = 0, progress: bool = True, iou_threshold: float = 0.5) -> dict:
    """mAP of `model` on `dataset` with the VOC protocol ("voc07": 11-point, "area": all points).

    Returns voc_evaluate's dict plus "metric"; every process gets the same result.
    """
    from frcnn_tutorial.evaluation import voc_evaluate

    if metric not in ("voc07", "area"):
        raise ValueError(f"metric must be 'voc07' or 'area', got {metric!r}")
    device = device or next(model.parameters()).device
    class_names = class_names or dataset_classes(dataset)
    predictions, targets = predict_dataset(model, dataset, device=device, batch_size=batch_size,
                                           workers=workers, progress=progress)
    result = voc_evaluate(predictions, targets, class_names, iou_threshold=iou_threshold,
                          use_07_metric=(metric == "voc07"))
    result["metric"] = metric
    return result


def dataset_classes(dataset) -> list[str]:
    """The object class names of a dataset (or of the first part of a ConcatDataset / Subset)."""
    while not hasattr(dataset, "classes"):
        if hasattr(dataset, "datasets"):
            dataset = dataset.datasets[0]
        elif hasattr(dataset, "dataset"):
            dataset = dataset.dataset
        else:
            raise ValueError("cannot tell the class names of this dataset: pass class_names=")
    return list(dataset.classes)


# ----------------------------------------------------------------------------- RNG and checkpoints


def capture_rng() -> dict:
    """The state of every random generator, as plain tensors and lists (loadable with weights_only=True)."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    rng = {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict) -> None:
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: to a temporary file in the same folder, then rename over the old one.

    A kill at any moment leaves either the previous checkpoint or the new one, never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class CheckpointError(ValueError):
    """A checkpoint that cannot or must not be loaded."""


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load with weights_only=True: a checkpoint holding anything but tensors and plain containers is refused,
    so a file from a stranger cannot run code on this machine."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError (and others) for disallowed or broken content
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused to load (only tensors and plain containers are allowed, "
                              f"or the file is damaged): {first_line}") from None


def config_differences(saved: dict, current: dict, may_change: frozenset[str]) -> list[str]:
    """The config fields that differ between a checkpoint and this run, except those allowed to change."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}"
            for k in keys if k not in may_change and saved.get(k) != current.get(k)]


def weights_checksum(model: torch.nn.Module) -> float:
    """One number that changes with any weight or buffer (to check that all processes hold the same model).

    Each tensor's sum, accumulated in float64 without copying the tensor, weighted by its position."""
    with torch.no_grad():
        return float(sum(float(t.sum(dtype=torch.float64)) * (i + 1)
                         for i, t in enumerate(model.state_dict().values()) if t.is_floating_point()))


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every process.

    DistributedDataParallel averages gradients, so the weights stay equal; train() leaves its per-forward buffer
    broadcast off (rank 0's statistics only ever see rank 0's batches either way: the broadcast just overwrites the
    others), so each process keeps its own statistics until this call, before every evaluation."""
    if world_size() == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)
