"""Read the next tensor while the current one is computed.

`prefetched(names, load)` runs `load(next name)` on a background thread while the caller works
on the current one: on CPU that faults the next tensor's pages in (disk or page cache) during
compute; on CUDA `to_device` also stages it through pinned host memory and copies it to the GPU
on a side stream, so transfers overlap the kernels. At most two tensors per checkpoint are held:
memory stays O(largest tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def prefetched(names: Iterable[str], load: Callable[[str], T]) -> Iterator[tuple[str, T]]:
    names = list(names)
    if not names:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="deltalens-prefetch") as pool:
        pending = pool.submit(load, names[0])
        for i, name in enumerate(names):
            current = pending.result()
            if i + 1 < len(names):
                pending = pool.submit(load, names[i + 1])
            yield name, current


class CudaStager:
    """Host tensor -> GPU tensor through a pinned buffer, copied on a side stream; `ready(t)`
    makes the compute stream wait for that copy (and keeps its pinned source alive until then)."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.stream = torch.cuda.Stream(self.device)

    def __call__(self, host):
        torch = self.torch
        pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        pinned.copy_(host)  # reads the mapped file pages: the disk / page-cache part of the work
        with torch.cuda.stream(self.stream):
            on_gpu = pinned.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return on_gpu, done, pinned

    def ready(self, staged):
        on_gpu, done, _pinned = staged
        self.torch.cuda.current_stream(self.device).wait_event(done)
        on_gpu.record_stream(self.torch.cuda.current_stream(self.device))
        return on_gpu
