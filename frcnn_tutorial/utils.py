"""Small helpers every notebook uses: reproducible seeds and the device to run on."""

from __future__ import annotations

import os
import random
import socket
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and PyTorch (CPU and every GPU) in one place."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_device(prefer: str | None = None) -> torch.device:
    """The device to run on: `prefer` if given (or $FRCNN_DEVICE), else CUDA when present, else CPU."""
    name = prefer or os.environ.get("FRCNN_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16 autocast speeds training up
    (measured 1.5x on the embedded-cpu step); elsewhere it is emulated and slower, so the CPU preset leaves it off."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private but stable since torch 2.1
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def cpu_cores() -> int:
    """The cores this process may run on (a container's limit, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for torchrun, a test's Jupyter server)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def profile() -> str:
    """The notebooks' one switch for long work: $FRCNN_PROFILE is "ci" (small budgets) or "full"."""
    value = os.environ.get("FRCNN_PROFILE", "full").lower()
    if value not in ("ci", "full"):
        raise ValueError(f"FRCNN_PROFILE must be 'ci' or 'full', got {value!r}")
    return value


def show_source(obj) -> None:
    """Show the package's own code for `obj` (a function or class) in a notebook.

    The notebooks teach with the code the package ships, never a second copy: this prints it, highlighted in
    Jupyter, plain in a terminal. `show_source(frcnn_tutorial.boxes.box_iou)`.
    """
    import inspect

    source = inspect.getsource(obj)
    where = f"# {obj.__module__.replace('.', '/')}.py"
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display

        if get_ipython() is not None:
            display(Markdown(f"```python\n{where}\n{source}```"))
            return
    except ImportError:
        pass
    print(where)
    print(source)


@contextmanager
def file_lock(path):
    """An exclusive lock on a file (created if needed): processes that start the same work together take turns."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; doing the work twice at once there is the user's race
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
