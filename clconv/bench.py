"""`clconv bench`: the standard layer suite on one device, checked and timed.

Each layer's forward convolution, and with --backward its input and weight gradients, timed
three ways: on the device with the heuristic configuration (untuned) and with the tuned one
(the configured tuning mode, 'cached' by default), both from OpenCL profiling events with
the operands already on the device; and end to end, NumPy in and out through the public
functions (upload, launch, download), by wall clock. torch's CPU convolution (F.conv2d,
torch.nn.grad.conv2d_input / conv2d_weight), when installed, is timed in the same run by
wall clock. Every figure is the best of the repeats, taken in rounds where the columns run
a few calls each in turn (interleaved_best), so that a noisy spell of a shared machine hits
all of a row's columns and not one (on this machine a layer's own times moved up to 2x for
seconds at a time); torch's thread pool was seen to stall ~30 ms on some calls, which
poisons medians. GFLOP/s is also shown as a share of the device's FMA peak (clconv.peak), and as GB/s of the operands and the result
(the measure for memory-bound layers such as depthwise ones). Every result is checked
against the NumPy reference.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyopencl.array as cl_array

from . import gradients, options, peak, planner
from .capabilities import device_info
from .functional import conv2d
from .limits import check_device_limits
from .reference import TOLERANCE, Check, test_case
from .suites import describe, geomean, layer_problem, select_layers

OPERATIONS = ("forward", "input_grad", "weight_grad")


@dataclass
class Row:
    name: str
    operation: str
    shape: str
    gflop: float
    megabytes: float        # operands and result, each moved once
    untuned_ms: float
    ms: float               # tuned (the configured tuning mode)
    e2e_ms: float
    max_error: float
    torch_ms: float | None
    peak_gflops: float | None = None

    @property
    def ok(self):
        return self.max_error <= TOLERANCE["float32"]     # NaN fails too

    @property
    def gflops(self):
        return self.gflop / self.ms * 1e3

    @property
    def gbps(self):
        return self.megabytes / self.ms

    @property
    def share_of_peak(self):
        return None if not self.peak_gflops else self.gflops / self.peak_gflops

    @property
    def speedup(self):
        return None if self.torch_ms is None else self.torch_ms / self.ms

    @property
    def e2e_speedup(self):
        return None if self.torch_ms is None else self.torch_ms / self.e2e_ms

    @property
    def tuning_gain(self):
        return self.untuned_ms / self.ms


def device_timer(problem, queue, operation, inputs, out_shape, mode=None):
    """(timer, y): timer() runs the plan under a tuning mode (None: the configured one) once
    on the device operands (inputs) and returns its device ms (profiling events); y holds the
    output."""
    with options.tuning_mode_set_to(mode or options.tuning_mode()):
        launch = planner.plan(problem, queue, operation)
    y = cl_array.empty(queue, out_shape, problem.numpy_dtype)
    args = ([(a.base_data, 0) for a in inputs], (y.base_data, 0), problem.batch)
    return (lambda: launch.timed(queue, *args)), y


def end_to_end_timer(problem, queue, operation, operands):
    """A timer of the public function on NumPy operands (upload, run, download)."""
    args = dict(torch_args(problem), padding_mode=problem.padding_mode, queue=queue)
    call = {"forward": lambda: conv2d(*operands, **args),
            "input_grad": lambda: gradients.conv2d_input_grad(
                problem.input_shape, operands[1], operands[0], **args),
            "weight_grad": lambda: gradients.conv2d_weight_grad(
                operands[0], problem.weight_shape, operands[1], **args)}[operation]
    return wall_timer(call)


def wall_timer(call):
    """After one warm-up call, a timer of call's wall-clock ms."""
    call()

    def timer():
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1e3
    return timer


def torch_args(problem):
    pt, pb, pl, pr = problem.pad
    return dict(stride=problem.stride, padding=(pt, pl), dilation=problem.dilation,
                groups=problem.groups)


def torch_timer(problem, operation, operands):
    """A timer of torch's CPU version of the operation, or None without torch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    a, b = (torch.from_numpy(v) for v in operands[:2])
    args = torch_args(problem)
    call = {"forward": lambda: F.conv2d(a, b, **args),
            "input_grad": lambda: torch.nn.grad.conv2d_input(problem.input_shape, b, a, **args),
            "weight_grad": lambda: torch.nn.grad.conv2d_weight(a, problem.weight_shape, b,
                                                               **args)}[operation]

    def no_grad_call():
        with torch.no_grad():
            return call()
    return wall_timer(no_grad_call)


def interleaved_best(timers, repeats, burst=5):
    """The best ms of each timer over about repeats calls, made in rounds where the timers
    take turns, burst calls each: a noisy spell of a shared machine then hits every column
    of a row, not just one, and the calls after a switch are clear of the previous
    library's threads still spinning (with one call each, resnext's clconv and torch times
    were 1.5x and 2.8x their usual)."""
    best = [math.inf] * len(timers)
    for _ in range(-(-repeats // burst)):
        for i, timer in enumerate(timers):
            best[i] = min([best[i]] + [timer() for _ in range(burst)])
    return best


def bench_layer(layer, queue, repeats, batch=None, with_torch=True, seed=0,
                operation="forward", peak_gflops=None):
    problem = layer_problem(layer, batch)
    if problem.pad[0] != problem.pad[1] or problem.pad[2] != problem.pad[3]:
        raise ValueError(f"{layer['name']}: the suite holds symmetric paddings only")
    check_device_limits(problem, queue.device)
    operands, out_shape, reference = test_case(problem, operation,
                                               np.random.default_rng(seed))
    inputs = [cl_array.to_device(queue, a) for a in operands]
    untuned, y_untuned = device_timer(problem, queue, operation, inputs, out_shape, mode="off")
    tuned, y = device_timer(problem, queue, operation, inputs, out_shape)
    timers = [untuned, tuned, end_to_end_timer(problem, queue, operation, operands)]
    torch_call = torch_timer(problem, operation, operands) if with_torch else None
    untuned_ms, ms, e2e_ms, *torch_ms = interleaved_best(
        timers + ([torch_call] if torch_call else []), repeats)
    check = Check(problem, reference, *operands)
    max_error = max(check.error(y_untuned.get()), check.error(y.get()))
    megabytes = (sum(a.nbytes for a in operands)
                 + np.prod(out_shape) * problem.numpy_dtype.itemsize) / 1e6
    return Row(layer["name"], operation, describe(problem), problem.flops / 1e9,
               float(megabytes), untuned_ms, ms, e2e_ms, max_error,
               torch_ms[0] if torch_ms else None, peak_gflops)


COLUMNS = [  # header, width, value of a row (None: not shown without torch)
    ("layer", -32, lambda r: r.name), ("operation", -11, lambda r: r.operation),
    ("shape", -38, lambda r: r.shape), ("GFLOP", 7, lambda r: f"{r.gflop:.3f}"),
    ("untuned", 8, lambda r: f"{r.untuned_ms:.3f}"), ("tuned ms", 8, lambda r: f"{r.ms:.3f}"),
    ("GFLOP/s", 7, lambda r: f"{r.gflops:.1f}"),
    ("peak", 5, lambda r: "" if r.share_of_peak is None else f"{100 * r.share_of_peak:.0f}%"),
    ("GB/s", 6, lambda r: f"{r.gbps:.1f}"), ("e2e ms", 8, lambda r: f"{r.e2e_ms:.3f}"),
]
TORCH_COLUMNS = [
    ("torch ms", 8, lambda r: f"{r.torch_ms:.3f}"),
    ("vs torch", 8, lambda r: f"{r.speedup:.2f}x"),
    ("e2e vs", 7, lambda r: f"{r.e2e_speedup:.2f}x"),
]


def _cells(columns, values):
    return " ".join(f"{v:<{-w}}" if w < 0 else f"{v:>{w}}" for (_, w, _), v in
                    zip(columns, values))


def format_table(rows, has_torch):
    columns = COLUMNS + (TORCH_COLUMNS if has_torch else [])
    head = _cells(columns, [c[0] for c in columns]) + "  check"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(_cells(columns, [c[2](r) for c in columns])
                     + ("  ok" if r.ok else f"  FAIL ({r.max_error:.1e})"))
    return "\n".join(lines)


def format_row(r, has_torch):
    return format_table([r], has_torch).splitlines()[-1]


def summarise(rows, operation, with_torch):
    """The figures of one operation over the suite (for the text summary and --json)."""
    mine = [r for r in rows if r.operation == operation]
    summary = {"operation": operation, "layers": len(mine),
               "gflop": sum(r.gflop for r in mine), "tuned_ms": sum(r.ms for r in mine),
               "untuned_ms": sum(r.untuned_ms for r in mine),
               "tuning_gain_geomean": geomean(r.tuning_gain for r in mine)}
    if with_torch:
        summary.update(
            torch_ms=sum(r.torch_ms for r in mine),
            vs_torch_geomean=geomean(r.speedup for r in mine),
            e2e_vs_torch_geomean=geomean(r.e2e_speedup for r in mine),
            below_half_of_torch=[r.name for r in mine if r.speedup < 0.5])
    return summary


def summary_line(s):
    line = (f"{s['operation']}: total {s['gflop']:.2f} GFLOP in {s['tuned_ms']:.1f} ms tuned, "
            f"{s['untuned_ms']:.1f} ms untuned (tuning gain {s['tuning_gain_geomean']:.2f}x)")
    if "vs_torch_geomean" in s:
        line += (f"; torch {s['torch_ms']:.1f} ms; geometric mean vs torch "
                 f"{s['vs_torch_geomean']:.2f}x on the device, {s['e2e_vs_torch_geomean']:.2f}x "
                 f"end to end (> 1: clconv faster); {len(s['below_half_of_torch'])} below 0.5x")
    return line


def main(queue, suite=None, only=None, batch=None, repeats=10, with_torch=True, out=sys.stdout,
         backward=False, json_path=None):
    if type(repeats) is not int or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    layers = select_layers(suite, only)
    torch_version = None
    if with_torch:
        try:
            import torch
            torch_version = torch.__version__
            torch_note = f"torch {torch_version} CPU, {torch.get_num_threads()} threads"
        except ImportError:
            with_torch, torch_note = False, "torch not installed: no comparison"
    else:
        torch_note = "torch comparison off"
    info = device_info(queue.device)
    measured = peak.measure(queue)
    print(f"clconv bench: {info.name} ({info.platform}, driver {info.driver_version}); "
          f"{torch_note}; float32; best of {repeats} runs each; tuning mode {options.tuning_mode()}; "
          f"Winograd {'allowed' if options.allow_winograd() else 'off'}; "
          f"FMA peak {measured.gflops:.1f} GFLOP/s (float{measured.width}); "
          f"{info.capabilities.speed()}", file=out)
    table = format_table([], with_torch).splitlines()
    print("\n".join(table), file=out, flush=True)
    rows = []
    operations = OPERATIONS if backward else OPERATIONS[:1]
    for i, layer in enumerate(layers, 1):
        for operation in operations:
            print(f"[{i}/{len(layers)}] {layer['name']} {operation} ...", file=sys.stderr,
                  flush=True)
            row = bench_layer(layer, queue, repeats, batch, with_torch, operation=operation,
                              peak_gflops=measured.gflops)
            rows.append(row)
            print(format_row(row, with_torch), file=out, flush=True)
    print("-" * len(table[0]), file=out)
    summaries = [summarise(rows, operation, with_torch) for operation in operations]
    for s in summaries:
        print(summary_line(s), file=out)
    failed = [r.name for r in rows if not r.ok]
    if failed:
        print(f"CHECK FAILED: {', '.join(failed)}", file=out)
    if json_path:
        record = {"device": {"name": info.name, "platform": info.platform,
                             "driver_version": info.driver_version},
                  "torch": torch_version, "repeats": repeats, "tuning_mode": options.tuning_mode(),
                  "allow_winograd": options.allow_winograd(),
                  "peak": {"gflops": measured.gflops, "width": measured.width,
                           "chains": measured.chains},
                  "rows": [dict(asdict(r), gflops=r.gflops, gbps=r.gbps, ok=r.ok,
                                share_of_peak=r.share_of_peak, vs_torch=r.speedup,
                                e2e_vs_torch=r.e2e_speedup) for r in rows],
                  "summary": summaries}
        with open(json_path, "w") as f:
            json.dump(record, f, indent=1)
        print(f"raw numbers written to {json_path}", file=out)
    return rows, not failed
