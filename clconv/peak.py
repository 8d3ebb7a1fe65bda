"""The device's measured float32 peak: `clconv bench --peak`, and the bench's share-of-peak.

A kernel of independent `x * a + b` chains on explicit float vectors, timed by profiling
events, for a few vector widths and chain counts; the best is the peak. It is what the
device's compiler reaches on pure FMAs, a practical bound for any convolution kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyopencl as cl

from . import programs
from .device import device_info

WIDTHS = (4, 8)
CHAINS = (8, 12)
ITERATIONS = 16384
PEAK_ARGS = (programs.Buffer("out", "float", const=False, offset=False, restrict=False),
             programs.Scalar("a", "float"), programs.Scalar("b", "float"),
             programs.Scalar("iters"))


@dataclass
class Peak:
    gflops: float
    width: int
    chains: int
    trials: dict          # (width, chains) -> GFLOP/s


def measure(queue, repeats=5) -> Peak:
    info = device_info(queue.device)
    items = info.compute_units * (128 if info.is_cpu else 4096)
    out = cl.Buffer(queue.context, cl.mem_flags.WRITE_ONLY, 4 * items)
    trials = {}
    for width in WIDTHS:
        for chains in CHAINS:
            kernel = programs.kernel(queue.context, "peak.cl.mako", "fma_peak", PEAK_ARGS,
                                     width=width, chains=chains)
            best = float("inf")
            for _ in range(repeats):
                event = kernel(queue, (items,), None, out, 0.999, 1e-3, ITERATIONS)
                event.wait()
                best = min(best, (event.profile.end - event.profile.start) * 1e-9)
            trials[width, chains] = 2 * items * ITERATIONS * chains * width / best / 1e9
    width, chains = max(trials, key=trials.get)
    return Peak(trials[width, chains], width, chains, trials)


def report(peak, name):
    lines = [f"{name}: float32 FMA peak {peak.gflops:.1f} GFLOP/s "
             f"(float{peak.width} x {peak.chains} chains)"]
    lines += [f"  float{w} x {c:2d} chains: {g:8.1f} GFLOP/s"
              for (w, c), g in sorted(peak.trials.items())]
    return "\n".join(lines)
