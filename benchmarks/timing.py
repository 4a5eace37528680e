"""One timing rule for the GPU benchmarks: the median of `iters` calls after `warmup` untimed ones, in
milliseconds, by CUDA events on a GPU (the device's own clock: no host-side launch time) and wall-clock otherwise."""
from __future__ import annotations

import statistics
import time

import torch


def median_ms(step, iters: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
