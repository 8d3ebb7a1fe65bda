"""The device's measured float32 peak: `clconv bench --peak`, and the bench's share-of-peak.

A kernel of independent `x * a + b` chains on explicit float vectors (capabilities.fma_rates),
timed by profiling events, for every vector width the device's compiler handles (its probed
widths, up to its native one: 16 where that builds) and a few chain counts; the best is the
peak. It is what the device's compiler reaches on pure FMAs, a practical bound for any
convolution kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

from .capabilities import device_info, fma_rates, of_info

CHAINS = (8, 12, 16, 24)


@dataclass
class Peak:
    gflops: float
    width: int
    chains: int
    trials: dict          # (width, chains) -> GFLOP/s


def widths(info):
    """The float widths measured: every probed one up to the native width (at least 4)."""
    caps = of_info(info)
    native = dict(caps.native_widths).get("float", 0)
    return tuple(w for w in caps.widths_of("float32") if w <= max(4, native))


def measure(queue, repeats=5) -> Peak:
    trials = fma_rates(queue, [(w, c) for w in widths(device_info(queue.device))
                               for c in CHAINS], rounds=repeats)
    width, chains = max(trials, key=trials.get)
    return Peak(trials[width, chains], width, chains, trials)


def report(peak, name):
    lines = [f"{name}: float32 FMA peak {peak.gflops:.1f} GFLOP/s "
             f"(float{peak.width} x {peak.chains} chains)"]
    lines += [f"  float{w:<2d} x {c:2d} chains: {g:8.1f} GFLOP/s"
              for (w, c), g in sorted(peak.trials.items())]
    return "\n".join(lines)
