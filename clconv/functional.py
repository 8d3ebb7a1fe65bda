"""conv2d: check the call, plan it, launch it (the gradients, in gradients.py, share this)."""
from __future__ import annotations

import numpy as np

from . import arrays, planner
from .device import queue_for
from .limits import check_device_limits
from .problem import make_problem


ACTIVATIONS = (None, "relu", "relu6", "silu", "gelu")


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
           padding_mode="zeros", *, activation=None, residual=None, queue=None):
    """torch.nn.Conv2d's forward as a function (torch.nn.functional.conv2d plus padding_mode).

    input: (N, C_in, H, W) or unbatched (C_in, H, W); a NumPy array (the result is one) or a
    pyopencl.array.Array (the result is one, on the same queue, and nothing crosses to the
    host). weight: (C_out, C_in/groups, kH, kW); bias: (C_out,) or None. float16, float32 or
    float64, all alike. queue: an explicit pyopencl.CommandQueue (by default the input's, else
    clconv's device).

    A fused epilogue, in the same pass over the output: residual (an array of the output's
    shape) is added after the bias, then activation ('relu', 'relu6', 'silu' or 'gelu',
    torch's exact erf form) is applied: act(conv(x, w) + bias + residual).
    """
    check_activation(activation)
    x = _operand(input, "input")
    w = _operand(weight, "weight")
    b = None if bias is None else _operand(bias, "bias")
    r = None if residual is None else _operand(residual, "residual")
    problem, unbatched = check_call(x, w, b, stride, padding, dilation, groups, padding_mode)
    out_shape = problem.output_shape[1:] if unbatched else problem.output_shape
    if r is not None:
        check_operand(r, "residual", out_shape, problem.dtype)
    queue = _resolve_queue(queue, x, w, b, r)
    check_device_limits(problem, queue.device)
    epilogue = (("activation", activation), ("has_residual", r is not None))
    return run(problem, queue, "forward", [x, w, b, r], out_shape, epilogue)


def check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_call(x, w, b, stride, padding, dilation, groups, padding_mode):
    """(Problem, unbatched) of a call on arrays x, w and b (b may be None)."""
    return make_problem(x.shape, x.dtype, w.shape, w.dtype, None if b is None else b.shape,
                        None if b is None else b.dtype, stride, padding, dilation, groups,
                        padding_mode)


def check_operand(a, name, shape, dtype):
    """An operand whose shape and dtype the call fixes (residual, grad_output)."""
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    if np.dtype(a.dtype) != np.dtype(dtype):
        raise TypeError(f"{name} dtype ({np.dtype(a.dtype)}) must match the convolution's "
                        f"({np.dtype(dtype)})")


def _operand(a, name):
    return a if arrays.is_device_array(a) else arrays.as_host_array(a, name)


def _resolve_queue(queue, *operands):
    if queue is not None:
        return queue_for(queue=queue)
    for a in operands:
        if arrays.is_device_array(a) and a.queue is not None:
            return queue_for(queue=a.queue)
    return queue_for()


def run(problem, queue, operation, operands, out_shape, epilogue=()):
    """Launch an operation of a checked problem and return its result (see prepare_into)."""
    return finish(queue, [prepare(problem, queue, operation, operands, out_shape, epilogue)()])[0]


def prepare(problem, queue, operation, operands, out_shape, epilogue=(), on_device=None):
    """An operation of a checked problem made ready to enqueue (see prepare_into)."""
    return prepare_into(lambda: planner.plan(problem, queue, operation, epilogue), queue,
                        operands, out_shape, problem.numpy_dtype, problem.batch, on_device)


def enqueue(problem, queue, operation, inputs, output, epilogue=(), wait_for=None):
    """Enqueue an operation of a checked problem (check_device_limits passed) on device
    buffers, with no checks and no allocation: inputs the (buffer, element offset) pairs of
    its operands in order (absent ones left out), output the result's. Returns the kernels'
    events. For callers that keep a run of operations on the device (clconv.torch's
    ConvChain); the buffers must outlive the kernels (OpenCL keeps released ones alive)."""
    launch = planner.plan(problem, queue, operation, epilogue)
    return launch(queue, inputs, output, problem.batch, wait_for=wait_for)


class Started:
    """An enqueued launch whose result reaches the host in finish(): a NumPy array written
    in place through buffer by events, or a device array to download; keep holds the
    NumPy operands that kernels read in place until then."""

    def __init__(self, result, buffer=None, events=None, keep=None):
        self.result, self.buffer, self.events, self.keep = result, buffer, events, keep


def prepare_into(make_launch, queue, operands, out_shape, dtype, batch, on_device=None):
    """make_launch()'s launch on operands into a new output, made ready: the operands, the
    result and the launch are made here, and calling what this returns enqueues the kernels
    and returns the Started launch (or the result) for finish. A caller with several
    launches prepares them all first (enqueue_all): a failure in planning, building or
    allocating then comes before any kernel is enqueued, and only enqueueing is left for
    later. operands: its inputs in order, NumPy or pyopencl arrays (None: absent, e.g. no
    bias). The result (finish) is a pyopencl array when on_device (by default: when the
    first operand is one), else NumPy (written in place where the device shares the host's
    memory); an empty one needs no launch. A NumPy operand is used in place only by a result
    that finish waits for, else uploaded here; a pyopencl operand's events are waited for."""
    if on_device is None:
        on_device = arrays.is_device_array(operands[0])
    if 0 in out_shape:
        empty = arrays.empty(queue, out_shape, dtype) if on_device else np.empty(out_shape, dtype)
        return lambda: empty
    # A device result returns at once, while kernels may still read the operands.
    in_place = not on_device and arrays.shares_host_memory(queue)
    inputs = [arrays.operand(queue, a, in_place, f"upload{i}")
              for i, a in enumerate(operands) if a is not None]
    pairs = [pair[:2] for pair in inputs]
    launch = make_launch()

    def waits():    # when enqueued: a device operand may be written after this preparation
        return [e for _, _, a in inputs if arrays.is_device_array(a) for e in a.events] or None
    if in_place:
        y = np.empty(out_shape, dtype)
        y_buffer = arrays.output_buffer(queue, y)
        return lambda: Started(y, y_buffer, launch(queue, pairs, (y_buffer, 0), batch,
                                                   wait_for=waits()), inputs)
    y = arrays.empty(queue, out_shape, dtype)

    def enqueue_into_device_array():
        y.add_event(launch(queue, pairs, (y.base_data, 0), batch, wait_for=waits())[-1])
        return y if on_device else Started(y)
    return enqueue_into_device_array


def enqueue_all(queue, ready):
    """Enqueue prepared launches (prepare_into; None: left out) in turn and return their
    Started launches, in order. On a failure it waits for those already enqueued, whose
    results are about to be dropped."""
    started = []
    try:
        for enqueue in ready:
            started.append(None if enqueue is None else enqueue())
    except BaseException:
        queue.finish()
        raise
    return started


def finish(queue, started):
    """The results of prepare_into's launches on queue, in order: one wait for all those
    written in place (each wait costs a round trip to the driver: ~50-100 µs on PoCL)."""
    in_place = [s for s in started if isinstance(s, Started) and s.buffer is not None]
    if in_place:
        arrays.to_host(queue, [(s.buffer, s.result, s.events) for s in in_place])
    return [s if not isinstance(s, Started) else
            s.result if s.buffer is not None else arrays.download(queue, s.result)
            for s in started]
