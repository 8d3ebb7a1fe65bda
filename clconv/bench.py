"""`clconv bench`: the standard layer suite on one device, checked and timed.

Each layer's forward convolution, and with --backward its input and weight gradients.
Device time comes from OpenCL profiling events (inputs already on the device); torch's CPU
convolution (F.conv2d, torch.nn.grad.conv2d_input / conv2d_weight), when installed, is
timed in the same run by wall clock. Both report the best of
the repeats: on a shared machine torch's thread pool was seen to stall ~30 ms on some calls,
which poisons medians. Every result is checked against the NumPy reference.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import pyopencl.array as cl_array

from . import autotune, planner
from .device import device_info
from .functional import check_device_limits
from .reference import TOLERANCE, Check, test_case
from .suites import layer_problem, load_suite

OPERATIONS = ("forward", "input_grad", "weight_grad")


@dataclass
class Row:
    name: str
    operation: str
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


def time_device(problem, queue, operation, operands, out_shape, repeats):
    """Best device time in ms over repeats (profiling events, operands already on the
    device), and the output of the last run."""
    launch = planner.plan(problem, queue, operation)
    inputs = [cl_array.to_device(queue, a) for a in operands]
    y = cl_array.empty(queue, out_shape, problem.numpy_dtype)
    times = [launch.timed(queue, [(a.base_data, 0) for a in inputs], (y.base_data, 0),
                          problem.batch) for _ in range(repeats)]
    return min(times), y.get()


def time_torch(problem, operation, operands, repeats):
    """Best wall-clock ms of torch's CPU version of the operation, or None without torch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    a, b = (torch.from_numpy(v) for v in operands[:2])
    pt, pb, pl, pr = problem.pad
    args = dict(stride=problem.stride, padding=(pt, pl), dilation=problem.dilation,
                groups=problem.groups)
    call = {"forward": lambda: F.conv2d(a, b, **args),
            "input_grad": lambda: torch.nn.grad.conv2d_input(problem.input_shape, b, a, **args),
            "weight_grad": lambda: torch.nn.grad.conv2d_weight(a, problem.weight_shape, b,
                                                               **args)}[operation]
    with torch.no_grad():
        call()     # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def bench_layer(layer, queue, repeats, batch=None, with_torch=True, seed=0,
                operation="forward"):
    problem = layer_problem(layer, batch)
    if problem.pad[0] != problem.pad[1] or problem.pad[2] != problem.pad[3]:
        raise ValueError(f"{layer['name']}: the suite holds symmetric paddings only")
    check_device_limits(problem, queue.device)
    operands, out_shape, reference = test_case(problem, operation,
                                               np.random.default_rng(seed))
    ms, y = time_device(problem, queue, operation, operands, out_shape, repeats)
    max_error = Check(problem, reference, *operands).error(y)
    torch_ms = time_torch(problem, operation, operands, repeats) if with_torch else None
    return Row(layer["name"], operation, describe(problem), problem.flops / 1e9, ms,
               max_error, torch_ms)


def geomean(values):
    values = [v for v in values if v]
    return float(np.exp(np.mean(np.log(values)))) if values else None


def format_table(rows, has_torch):
    head = (f"{'layer':<32} {'operation':<11} {'shape':<38} {'GFLOP':>7} {'ms':>9} "
            f"{'GFLOP/s':>8}")
    if has_torch:
        head += f" {'torch ms':>9} {'vs torch':>8}"
    lines = [head + "  check", "-" * len(head + "  check")]
    for r in rows:
        line = (f"{r.name:<32} {r.operation:<11} {r.shape:<38} {r.gflop:7.3f} {r.ms:9.3f} "
                f"{r.gflops:8.1f}")
        if has_torch:
            line += f" {r.torch_ms:9.3f} {r.speedup:7.2f}x"
        lines.append(line + ("  ok" if r.ok else
                             f"  FAIL ({r.max_error:.1e})"))
    return "\n".join(lines)


def format_row(r, has_torch):
    return format_table([r], has_torch).splitlines()[-1]


def main(queue, suite=None, only=None, batch=None, repeats=10, with_torch=True, out=sys.stdout,
         backward=False):
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
    operations = OPERATIONS if backward else OPERATIONS[:1]
    for i, layer in enumerate(layers, 1):
        for operation in operations:
            print(f"[{i}/{len(layers)}] {layer['name']} {operation} ...", file=sys.stderr,
                  flush=True)
            row = bench_layer(layer, queue, repeats, batch, with_torch, operation=operation)
            rows.append(row)
            print(format_row(row, with_torch), file=out, flush=True)
    print("-" * len(table[0]), file=out)
    for operation in operations:
        mine = [r for r in rows if r.operation == operation]
        summary = (f"{operation}: total {sum(r.gflop for r in mine):.2f} GFLOP in "
                   f"{sum(r.ms for r in mine):.1f} ms")
        if with_torch:
            summary += (f"; geometric mean vs torch {geomean(r.speedup for r in mine):.2f}x "
                        "(> 1: clconv faster)")
        print(summary, file=out)
    failed = [r.name for r in rows if not r.ok]
    if failed:
        print(f"CHECK FAILED: {', '.join(failed)}", file=out)
    return rows, not failed
