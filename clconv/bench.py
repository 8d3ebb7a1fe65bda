"""`clconv bench`: the standard layer suite on one device, checked and timed.

Each layer's forward convolution, and with --backward its input and weight gradients, timed
by wall clock the two ways users call clconv, with the configured tuning mode ('cached' by
default): on the device (pyopencl arrays in and out, through the public functions, the
queue finished: the headline `ms`, GFLOP/s and `vs torch`), and end to end (NumPy in and
out: `e2e ms`, `e2e vs`). Two profiled columns explain where the time goes: the device time
of the kernels alone (OpenCL profiling events) with the heuristic configuration (untuned)
and with the tuned one; the gap to `ms` is launching and waiting, the gap from `ms` to `e2e
ms` is the host operands' way in and out. torch's CPU convolution (F.conv2d,
torch.nn.grad.conv2d_input / conv2d_weight), when installed, and onnxruntime's CPU Conv (the
forward, zero padding; the weight a model constant, as in an exported model), when
onnxruntime and onnx are installed (the `onnx` extra), are timed in the same run by wall
clock, NumPy in and out. Every figure is the best of the repeats, taken in rounds where the
columns run a few calls each in turn (interleaved_best), so that a noisy spell of a shared
machine hits all of a row's columns and not one (on this machine a layer's own times moved
up to 2x for seconds at a time); torch's thread pool was seen to stall ~30 ms on some calls,
which poisons medians. GFLOP/s is also shown as a share of the device's FMA peak
(clconv.peak), and as GB/s of the operands and the result (the measure for memory-bound
layers such as depthwise ones). Every result is checked against the NumPy reference.
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
    untuned_ms: float       # profiled device time, heuristic configuration
    profiled_ms: float      # profiled device time, the configured tuning mode
    ms: float               # wall clock, device arrays in and out, queue finished
    e2e_ms: float           # wall clock, NumPy in and out
    max_error: float
    torch_ms: float | None
    peak_gflops: float | None = None
    ort_ms: float | None = None

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
    def e2e_share(self):
        """The device-resident call's time over the end-to-end one's (1: no cost of its own)."""
        return self.ms / self.e2e_ms

    @property
    def ort_speedup(self):
        return None if self.ort_ms is None else self.ort_ms / self.e2e_ms

    @property
    def tuning_gain(self):
        return self.untuned_ms / self.profiled_ms


def device_timer(problem, queue, operation, inputs, out_shape, mode=None):
    """(timer, y): timer() runs the plan under a tuning mode (None: the configured one) once
    on the device operands (inputs) and returns its device ms (profiling events); y holds the
    output."""
    with options.tuning_mode_set_to(mode or options.tuning_mode()):
        launch = planner.plan(problem, queue, operation)
    y = cl_array.empty(queue, out_shape, problem.numpy_dtype)
    args = ([(a.base_data, 0) for a in inputs], (y.base_data, 0), problem.batch)
    return (lambda: launch.timed(queue, *args)), y


def call_timer(problem, queue, operation, operands):
    """A wall-clock timer of the public function on operands: NumPy ones (upload, run,
    download: end to end), or pyopencl arrays (the queue finished after each call)."""
    args = dict(torch_args(problem), padding_mode=problem.padding_mode, queue=queue)
    call = {"forward": lambda: conv2d(*operands, **args),
            "input_grad": lambda: gradients.conv2d_input_grad(
                problem.input_shape, operands[1], operands[0], **args),
            "weight_grad": lambda: gradients.conv2d_weight_grad(
                operands[0], problem.weight_shape, operands[1], **args)}[operation]
    if cl_array.Array in map(type, operands):
        return wall_timer(lambda: (call(), queue.finish()))
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


def ort_conv(problem, operation, operands):
    """A call of onnxruntime's CPU Conv on the forward's NumPy input (the weight and bias a
    model's constants), returning its output, or None: without onnxruntime and onnx, for a
    gradient, or for a padding mode ONNX's Conv lacks."""
    if operation != "forward" or problem.padding_mode != "zeros":
        return None
    try:
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    x, w, *bias = operands
    pt, pb, pl, pr = problem.pad
    node = helper.make_node("Conv", ["x", "w"] + ["b"] * len(bias), ["y"],
                            kernel_shape=list(problem.kernel_size), strides=list(problem.stride),
                            dilations=list(problem.dilation), pads=[pt, pl, pb, pr],
                            group=problem.groups)
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, problem.output_shape)],
        [numpy_helper.from_array(a, name) for a, name in zip([w] + bias, "wb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8        # what every onnxruntime since 1.10 reads
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"x": x})[0]


def ort_timer(problem, operation, operands):
    """A wall-clock timer of ort_conv, or None where it is None."""
    call = ort_conv(problem, operation, operands)
    return None if call is None else wall_timer(call)


def onnxruntime_version():
    """onnxruntime's version where it and onnx (which builds the models) import, else None."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


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
                operation="forward", peak_gflops=None, with_ort=True):
    problem = layer_problem(layer, batch)
    if problem.pad[0] != problem.pad[1] or problem.pad[2] != problem.pad[3]:
        raise ValueError(f"{layer['name']}: the suite holds symmetric paddings only")
    check_device_limits(problem, queue.device)
    operands, out_shape, reference = test_case(problem, operation,
                                               np.random.default_rng(seed))
    inputs = [cl_array.to_device(queue, a) for a in operands]
    untuned, y_untuned = device_timer(problem, queue, operation, inputs, out_shape, mode="off")
    tuned, y = device_timer(problem, queue, operation, inputs, out_shape)
    timers = [untuned, tuned, call_timer(problem, queue, operation, inputs),
              call_timer(problem, queue, operation, operands)]
    others = [torch_timer(problem, operation, operands) if with_torch else None,
              ort_timer(problem, operation, operands) if with_ort else None]
    best = interleaved_best(timers + [t for t in others if t], repeats)
    untuned_ms, profiled_ms, ms, e2e_ms = best[:4]
    measured = iter(best[4:])
    torch_ms, ort_ms = (next(measured) if t else None for t in others)
    check = Check(problem, reference, *operands)
    max_error = max(check.error(y_untuned.get()), check.error(y.get()))
    megabytes = (sum(a.nbytes for a in operands)
                 + np.prod(out_shape) * problem.numpy_dtype.itemsize) / 1e6
    return Row(layer["name"], operation, describe(problem), problem.flops / 1e9,
               float(megabytes), untuned_ms, profiled_ms, ms, e2e_ms, max_error, torch_ms,
               peak_gflops, ort_ms)


COLUMNS = [  # header, width, value of a row
    ("layer", -32, lambda r: r.name), ("operation", -11, lambda r: r.operation),
    ("shape", -38, lambda r: r.shape), ("GFLOP", 7, lambda r: f"{r.gflop:.3f}"),
    ("untuned", 8, lambda r: f"{r.untuned_ms:.3f}"),
    ("profiled", 8, lambda r: f"{r.profiled_ms:.3f}"), ("ms", 8, lambda r: f"{r.ms:.3f}"),
    ("GFLOP/s", 7, lambda r: f"{r.gflops:.1f}"),
    ("peak", 5, lambda r: "" if r.share_of_peak is None else f"{100 * r.share_of_peak:.0f}%"),
    ("GB/s", 6, lambda r: f"{r.gbps:.1f}"), ("e2e ms", 8, lambda r: f"{r.e2e_ms:.3f}"),
    ("e2e/dev", 7, lambda r: f"{100 * r.e2e_share:.0f}%"),
]
OTHER_COLUMNS = {   # shown when that library was timed
    "torch": [("torch ms", 8, lambda r: f"{r.torch_ms:.3f}"),
              ("vs torch", 8, lambda r: f"{r.speedup:.2f}x"),
              ("e2e vs", 7, lambda r: f"{r.e2e_speedup:.2f}x")],
    "ort": [("ort ms", 8, lambda r: "" if r.ort_ms is None else f"{r.ort_ms:.3f}"),
            ("vs ort", 6, lambda r: "" if r.ort_ms is None else f"{r.ort_speedup:.2f}x")],
}
LEGEND = ("untuned, profiled: device ms of the kernels alone (profiling events), heuristic "
          "and tuned; ms: wall clock, pyopencl arrays in and out (GFLOP/s, peak, GB/s and vs "
          "torch from it); e2e ms: wall clock, NumPy in and out; e2e/dev: ms over e2e ms; "
          "torch, ort: wall clock, NumPy in and out; e2e vs, vs ort: their ms over clconv's "
          "e2e ms (> 1: clconv faster)")


def _columns(others):
    return COLUMNS + [c for name in others for c in OTHER_COLUMNS[name]]


def _cells(columns, values):
    return " ".join(f"{v:<{-w}}" if w < 0 else f"{v:>{w}}" for (_, w, _), v in
                    zip(columns, values))


def format_table(rows, others=()):
    """The table of rows; others: the libraries compared ("torch", "ort")."""
    columns = _columns(others)
    head = _cells(columns, [c[0] for c in columns]) + "  check"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(_cells(columns, [c[2](r) for c in columns])
                     + ("  ok" if r.ok else f"  FAIL ({r.max_error:.1e})"))
    return "\n".join(lines)


def format_row(r, others=()):
    return format_table([r], others).splitlines()[-1]


def summarise(rows, operation, with_torch):
    """The figures of one operation over the suite (for the text summary and --json)."""
    mine = [r for r in rows if r.operation == operation]
    summary = {"operation": operation, "layers": len(mine),
               "gflop": sum(r.gflop for r in mine), "ms": sum(r.ms for r in mine),
               "profiled_ms": sum(r.profiled_ms for r in mine),
               "untuned_ms": sum(r.untuned_ms for r in mine),
               "e2e_ms": sum(r.e2e_ms for r in mine),
               "e2e_share_geomean": geomean(r.e2e_share for r in mine),
               "tuning_gain_geomean": geomean(r.tuning_gain for r in mine)}
    if with_torch:
        summary.update(
            torch_ms=sum(r.torch_ms for r in mine),
            vs_torch_geomean=geomean(r.speedup for r in mine),
            e2e_vs_torch_geomean=geomean(r.e2e_speedup for r in mine),
            below_half_of_torch=[r.name for r in mine if r.speedup < 0.5])
    with_ort = [r for r in mine if r.ort_ms is not None]
    if with_ort:
        summary.update(ort_layers=len(with_ort),
                       vs_ort_geomean=geomean(r.ort_speedup for r in with_ort))
    return summary


def summary_line(s):
    line = (f"{s['operation']}: total {s['gflop']:.2f} GFLOP in {s['ms']:.1f} ms on the device "
            f"({s['profiled_ms']:.1f} ms of kernels; untuned {s['untuned_ms']:.1f}, tuning "
            f"gain {s['tuning_gain_geomean']:.2f}x), {s['e2e_ms']:.1f} ms end to end (the "
            f"device call's time {100 * s['e2e_share_geomean']:.0f}% of it, geometric mean)")
    if "vs_torch_geomean" in s:
        line += (f"; torch {s['torch_ms']:.1f} ms; geometric mean vs torch "
                 f"{s['vs_torch_geomean']:.2f}x on the device, {s['e2e_vs_torch_geomean']:.2f}x "
                 f"end to end (> 1: clconv faster); {len(s['below_half_of_torch'])} below 0.5x")
    if "vs_ort_geomean" in s:
        line += (f"; vs onnxruntime {s['vs_ort_geomean']:.2f}x end to end "
                 f"({s['ort_layers']} layers)")
    return line


# A layer whose kernels take microseconds: its times show what a call costs beyond them.
SMALL_LAYER = {"name": "small 16->16 3x3 @14", "batch": 1, "in_channels": 16,
               "out_channels": 16, "groups": 1, "height": 14, "width": 14,
               "kernel_size": (3, 3), "stride": 1, "padding": 1, "dilation": 1}


def overhead_line(r):
    return (f"per call, {r.name} ({r.shape}): kernels {1e3 * r.profiled_ms:.0f} µs, device "
            f"call {1e3 * r.ms:.0f} µs (pyopencl arrays, finished), end to end "
            f"{1e3 * r.e2e_ms:.0f} µs (NumPy)")


def main(queue, suite=None, only=None, batch=None, repeats=10, with_torch=True, out=sys.stdout,
         backward=False, json_path=None, with_ort=True):
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
    ort_version = onnxruntime_version() if with_ort else None
    if with_ort:
        torch_note += (f"; onnxruntime {ort_version} CPU" if ort_version else
                       "; onnxruntime not installed (pip install 'clconv[onnx]' to compare)")
    info = device_info(queue.device)
    measured = peak.measure(queue)
    print(f"clconv bench: {info.name} ({info.platform}, driver {info.driver_version}); "
          f"{torch_note}; float32; best of {repeats} runs each; tuning mode {options.tuning_mode()}; "
          f"Winograd {'allowed' if options.allow_winograd() else 'off'}; "
          f"FMA peak {measured.gflops:.1f} GFLOP/s (float{measured.width}); "
          f"{info.capabilities.speed()}", file=out)
    others = ["torch"] * with_torch + ["ort"] * bool(ort_version)
    table = format_table([], others).splitlines()
    print(LEGEND, file=out)
    print("\n".join(table), file=out, flush=True)
    rows = []
    operations = OPERATIONS if backward else OPERATIONS[:1]
    for i, layer in enumerate(layers, 1):
        for operation in operations:
            print(f"[{i}/{len(layers)}] {layer['name']} {operation} ...", file=sys.stderr,
                  flush=True)
            row = bench_layer(layer, queue, repeats, batch, with_torch, operation=operation,
                              peak_gflops=measured.gflops, with_ort=bool(ort_version))
            rows.append(row)
            print(format_row(row, others), file=out, flush=True)
    print("-" * len(table[0]), file=out)
    summaries = [summarise(rows, operation, with_torch) for operation in operations]
    for s in summaries:
        print(summary_line(s), file=out)
    small = bench_layer(SMALL_LAYER, queue, max(repeats, 20) * 10, with_torch=False,
                        with_ort=False)
    print(overhead_line(small), file=out)
    failed = [r.name for r in rows + [small] if not r.ok]
    if failed:
        print(f"CHECK FAILED: {', '.join(failed)}", file=out)
    if json_path:
        record = {"device": {"name": info.name, "platform": info.platform,
                             "driver_version": info.driver_version},
                  "torch": torch_version, "onnxruntime": ort_version, "repeats": repeats,
                  "tuning_mode": options.tuning_mode(),
                  "allow_winograd": options.allow_winograd(),
                  "peak": {"gflops": measured.gflops, "width": measured.width,
                           "chains": measured.chains},
                  "rows": [dict(asdict(r), gflops=r.gflops, gbps=r.gbps, ok=r.ok,
                                share_of_peak=r.share_of_peak, vs_torch=r.speedup,
                                e2e_vs_torch=r.e2e_speedup, e2e_share=r.e2e_share,
                                vs_ort=r.ort_speedup) for r in rows],
                  "summary": summaries, "small_layer": asdict(small)}
        with open(json_path, "w") as f:
            json.dump(record, f, indent=1)
        print(f"raw numbers written to {json_path}", file=out)
    return rows, not failed
