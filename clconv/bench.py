"""`clconv bench`: the standard layer suite on one device, checked and timed.

Device time comes from OpenCL profiling events (inputs already on the device); torch's CPU
convolution, when installed, is timed in the same run by wall clock. Both report the best of
the repeats: on a shared machine torch's thread pool was seen to stall ~30 ms on some calls,
which poisons medians. Every result is checked against the NumPy reference.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import pyopencl.array as cl_array

from . import autotune
from .device import device_info
from .functional import check_device_limits, run
from .reference import TOLERANCE, Check, conv2d_numpy
from .suites import layer_problem, load_suite

@dataclass
class Row:
    name: str
    shape: str
    gflop: float
    ms: float
    max_error: float
    torch_ms: float | None

    @property
    def ok(self):
        return self.max_error <= TOLERANCE["float32"]     # NaN fails too

    @property
    def gflops(self):
        return self.gflop / self.ms * 1e3

    @property
    def speedup(self):
        return None if self.torch_ms is None else self.torch_ms / self.ms


def describe(p):
    (kh, kw), (sh, sw) = p.kernel_size, p.stride
    text = f"{p.batch}x{p.in_channels}x{p.height}x{p.width} k{kh}x{kw} s{sh}x{sw}"
    if p.dilation != (1, 1):
        text += f" d{p.dilation[0]}x{p.dilation[1]}"
    if p.groups != 1:
        text += f" g{p.groups}"
    return text + f" -> {p.out_channels}"


def time_device(problem, queue, x, w, repeats):
    """Best kernel time in ms over repeats, from profiling events; and the last output."""
    times = []
    for _ in range(repeats):
        y = run(problem, queue, "forward", [x, w], problem.output_shape)
        event = y.events[-1]
        event.wait()
        times.append((event.profile.end - event.profile.start) * 1e-6)
    return min(times), y


def time_torch(x, w, problem, repeats):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    pt, pb, pl, pr = problem.pad
    args = dict(stride=problem.stride, padding=(pt, pl), dilation=problem.dilation,
                groups=problem.groups)
    with torch.no_grad():
        F.conv2d(xt, wt, **args)     # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            F.conv2d(xt, wt, **args)
            times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def bench_layer(layer, queue, repeats, batch=None, with_torch=True, seed=0):
    problem = layer_problem(layer, batch)
    if problem.pad[0] != problem.pad[1] or problem.pad[2] != problem.pad[3]:
        raise ValueError(f"{layer['name']}: the suite holds symmetric paddings only")
    check_device_limits(problem, queue.device)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(problem.input_shape, dtype=np.float32)
    w = rng.standard_normal(problem.weight_shape, dtype=np.float32)
    xd, wd = cl_array.to_device(queue, x), cl_array.to_device(queue, w)
    ms, y = time_device(problem, queue, xd, wd, repeats)
    max_error = Check(problem, conv2d_numpy, x, w).error(y.get())
    torch_ms = time_torch(x, w, problem, repeats) if with_torch else None
    return Row(layer["name"], describe(problem), problem.flops / 1e9, ms, max_error, torch_ms)


def geomean(values):
    values = [v for v in values if v]
    return float(np.exp(np.mean(np.log(values)))) if values else None


def format_table(rows, has_torch):
    head = f"{'layer':<32} {'shape':<38} {'GFLOP':>7} {'ms':>9} {'GFLOP/s':>8}"
    if has_torch:
        head += f" {'torch ms':>9} {'vs torch':>8}"
    lines = [head + "  check", "-" * len(head + "  check")]
    for r in rows:
        line = f"{r.name:<32} {r.shape:<38} {r.gflop:7.3f} {r.ms:9.3f} {r.gflops:8.1f}"
        if has_torch:
            line += f" {r.torch_ms:9.3f} {r.speedup:7.2f}x"
        lines.append(line + ("  ok" if r.ok else
                             f"  FAIL ({r.max_error:.1e})"))
    return "\n".join(lines)


def format_row(r, has_torch):
    return format_table([r], has_torch).splitlines()[-1]


def main(queue, suite=None, only=None, batch=None, repeats=10, with_torch=True, out=sys.stdout):
    layers = [l for l in load_suite(suite) if not only or only in l["name"]]
    if with_torch:
        try:
            import torch
            threads = torch.get_num_threads()
            torch_note = f"torch {torch.__version__} CPU, {threads} threads"
        except ImportError:
            with_torch, torch_note = False, "torch not installed: no comparison"
    else:
        torch_note = "torch comparison off"
    info = device_info(queue.device)
    print(f"clconv bench: {info.name} ({info.platform}, driver {info.driver_version}); "
          f"{torch_note}; float32; best of {repeats} runs each; tuning mode {autotune.mode()}",
          file=out)
    table = format_table([], with_torch).splitlines()
    print("\n".join(table), file=out, flush=True)
    rows = []
    for i, layer in enumerate(layers, 1):
        print(f"[{i}/{len(layers)}] {layer['name']} ...", file=sys.stderr, flush=True)
        row = bench_layer(layer, queue, repeats, batch, with_torch)
        rows.append(row)
        print(format_row(row, with_torch), file=out, flush=True)
    print("-" * len(table[0]), file=out)
    summary = f"total {sum(r.gflop for r in rows):.2f} GFLOP in {sum(r.ms for r in rows):.1f} ms"
    if with_torch:
        summary += (f"; geometric mean vs torch {geomean(r.speedup for r in rows):.2f}x "
                    "(> 1: clconv faster)")
    print(summary, file=out)
    failed = [r.name for r in rows if not r.ok]
    if failed:
        print(f"CHECK FAILED: {', '.join(failed)}", file=out)
    return rows, not failed
