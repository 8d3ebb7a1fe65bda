"""The gradients of conv2d, as torch.nn.grad.conv2d_input / conv2d_weight compute them.

Each is an operation of the same Problem as the forward (same argument rules and messages),
planned and tuned like it: conv2d_input_grad runs a transposed convolution (then folds the
padded plane onto the input under reflect/replicate/circular padding), conv2d_weight_grad a
split reduction over batch and rows, conv2d_bias_grad a per-channel sum.
"""
from __future__ import annotations

import numpy as np

from .algorithms import bias_grad
from .algorithms.base import freeze
from .capabilities import device_info
from .functional import (_operand, _resolve_queue, check_operand, enqueue_all, finish,
                         prepare, prepare_into, run)
from .limits import check_device_limits, check_fp64
from .problem import dtype_name, make_problem
from .programs import ContextMemo


def conv2d_input_grad(input_shape, weight, grad_output, stride=1, padding=0, dilation=1,
                      groups=1, padding_mode="zeros", *, queue=None):
    """d(loss)/d(input) of conv2d, given grad_output = d(loss)/d(output).

    input_shape: (N, C_in, H, W), or (C_in, H, W) with an unbatched grad_output. Arrays are
    NumPy (the result is NumPy) or pyopencl arrays (the result stays on the device).
    """
    w = _operand(weight, "weight")
    dy = _operand(grad_output, "grad_output")
    shape = _shape(input_shape, "input_shape")
    problem, unbatched = make_problem(shape, w.dtype, w.shape, w.dtype, None, None, stride,
                                      padding, dilation, groups, padding_mode)
    return _gradient("input_grad", problem, unbatched, dy, [dy, w], shape, queue)


def conv2d_weight_grad(input, weight_shape, grad_output, stride=1, padding=0, dilation=1,
                       groups=1, padding_mode="zeros", *, queue=None):
    """d(loss)/d(weight) of conv2d, given the input and grad_output = d(loss)/d(output)."""
    x = _operand(input, "input")
    dy = _operand(grad_output, "grad_output")
    shape = _shape(weight_shape, "weight_shape")
    problem, unbatched = make_problem(x.shape, x.dtype, shape, x.dtype, None, None, stride,
                                      padding, dilation, groups, padding_mode)
    return _gradient("weight_grad", problem, unbatched, dy, [x, dy], shape, queue)


def _gradient(operation, problem, unbatched, dy, operands, out_shape, queue):
    """Check grad_output against the problem, then run the operation on operands."""
    queue = _checked_queue(problem, unbatched, dy, queue, *operands)
    return run(problem, queue, operation, operands, out_shape)


def _checked_queue(problem, unbatched, dy, queue, *operands):
    """The queue of a gradient call on operands, once grad_output and the device's limits
    are checked against the problem."""
    output_shape = problem.output_shape[1:] if unbatched else problem.output_shape
    check_operand(dy, "grad_output", output_shape, problem.dtype)
    queue = _resolve_queue(queue, *operands)
    check_device_limits(problem, queue.device)
    return queue


def conv2d_backward(input, weight, grad_output, stride=1, padding=0, dilation=1, groups=1,
                    padding_mode="zeros", *, output_mask=(True, True, True), queue=None):
    """(d input, d weight, d bias) of conv2d at once, as torch's convolution_backward: None
    where output_mask (three bools) is False. Each is what conv2d_input_grad,
    conv2d_weight_grad and conv2d_bias_grad return, but a NumPy call waits once for all."""
    mask = _output_mask(output_mask)
    x = _operand(input, "input")
    w = _operand(weight, "weight")
    dy = _operand(grad_output, "grad_output")
    problem, unbatched = make_problem(x.shape, x.dtype, w.shape, w.dtype, None, None, stride,
                                      padding, dilation, groups, padding_mode)
    queue = _checked_queue(problem, unbatched, dy, queue, x, w)
    ready = [prepare(problem, queue, "input_grad", [dy, w], x.shape) if mask[0] else None,
             prepare(problem, queue, "weight_grad", [x, dy], w.shape) if mask[1] else None,
             _prepare_bias_grad(dy, queue) if mask[2] else None]
    started = enqueue_all(queue, ready)
    return tuple(finish(queue, started))


def _output_mask(value, gradients=("input", "weight", "bias")):
    """output_mask as a tuple: one bool per gradient (named in the error)."""
    try:
        mask = tuple(value)
    except TypeError:
        mask = None
    if (mask is None or len(mask) != len(gradients)
            or not all(isinstance(m, (bool, np.bool_)) for m in mask)):
        count = {3: "three", 5: "five"}.get(len(gradients), len(gradients))
        raise TypeError(f"output_mask must be {count} bools ({', '.join(gradients)}), "
                        f"got {value!r}")
    return mask


def conv2d_bias_grad(grad_output, *, queue=None):
    """d(loss)/d(bias) of conv2d: grad_output summed over batch, height and width.
    grad_output: (N, C_out, H_out, W_out) or unbatched (C_out, H_out, W_out)."""
    dy = _operand(grad_output, "grad_output")
    if dy.ndim not in (3, 4):
        raise ValueError("grad_output must be 3-D (C, H, W) unbatched or 4-D (N, C, H, W), "
                         f"got shape {tuple(dy.shape)}")
    queue = _resolve_queue(queue, dy)
    return finish(queue, [_prepare_bias_grad(dy, queue)()])[0]


def _prepare_bias_grad(dy, queue, on_device=None):
    """The bias gradient of a 3-D or 4-D grad_output dy, made ready (see prepare_into)."""
    dtype = dtype_name(dy.dtype, "grad_output")
    n, c, h, w = (1,) + tuple(dy.shape) if dy.ndim == 3 else tuple(dy.shape)
    check_fp64(dtype, device_info(queue.device))
    return prepare_into(lambda: _bias_launch(queue, n, c, h * w, dtype), queue, [dy], (c,),
                        dy.dtype, n, on_device)


_bias_launches = ContextMemo()


def _bias_launch(queue, batch, channels, plane, dtype):
    """The bias-gradient run(), memoised per context and specialisation."""
    constants = bias_grad.constants(device_info(queue.device), batch, channels, plane, dtype)
    table = _bias_launches.table(queue.context)
    key = (queue.device, freeze(constants))
    launch = table.get(key)
    if launch is None:
        launch = table[key] = bias_grad.launcher(queue, constants)
    return launch


def _shape(value, name):
    try:
        shape = tuple(int(v) for v in value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {value!r}") from None
    if len(shape) not in (3, 4):
        raise ValueError(f"{name} must have 3 (unbatched) or 4 dimensions, got {shape}")
    return shape
