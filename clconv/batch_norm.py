"""A convolution followed by training-mode BatchNorm2d and an activation, on the device.

In training, BatchNorm2d normalises each channel of the convolution's output by that
batch's own mean and variance, so it cannot be folded into the weights as at inference.
Run by torch after clconv's convolution it costs more than in torch's own model (two more
passes of torch's threads, woken after clconv's, per layer and direction); here it is one
more kernel each way, behind the convolution on the same queue, with one wait:

- conv2d_batch_norm: y = conv2d(x, w, b); z = activation(batch_norm(y)) with the batch's
  statistics (biased variance), the running statistics moved by momentum (unbiased variance)
  as torch.nn.BatchNorm2d does in training; returns z, y and the per-channel mean and
  1 / sqrt(var + eps) that the backward needs.
- conv2d_batch_norm_backward: from the saved y, mean and invstd and the gradient of z, the
  gradients of x, w, b, gamma and beta (torch's native_batch_norm_backward after the
  activation's backward, then conv2d_backward's kernels on the result).

NumPy arrays (or objects with __array__) in and out, float32 or float64 (torch keeps half
BatchNorm statistics in float; clconv.torch leaves those to torch), 4-D inputs.
"""
from __future__ import annotations

import math

import numpy as np

import pyopencl.array as cl_array

from . import arrays, programs, scratch
from .algorithms.base import Blocks, Buffer, Scalar, build_step, pow2_at_most, scratch_buffer
from .capabilities import device_info, of_info
from .functional import (Started, _resolve_queue, check_activation, check_call,
                         check_operand, enqueue_all, finish, prepare)
from .gradients import _output_mask, _prepare_bias_grad
from .limits import check_device_limits
from .problem import INT32_LIMIT

# A GPU's work-group for a channel: enough work-items to stream its values; fewer where the
# plane is small. A CPU's work-items gain nothing over the explicit vectors: one a group,
# and GROUPS_PER_CORE groups a core, each taking its share of the channels.
MOST_LOCAL = 256
GROUPS_PER_CORE = 4
DTYPES = ("float32", "float64")
GRADIENTS = ("input", "weight", "bias", "bn_weight", "bn_bias")


def conv2d_batch_norm(input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                      stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros", *,
                      momentum=0.1, eps=1e-5, activation=None, queue=None):
    """(z, y, mean, invstd): z = activation(BatchNorm2d in training(conv2d(input, weight,
    bias))), y the convolution's output, mean and invstd (C_out,) the batch's statistics.

    bn_weight, bn_bias: gamma and beta (C_out,), or both None (affine=False).
    running_mean, running_var: (C_out,) C-contiguous writable arrays updated in place
    (x <- (1 - momentum) x + momentum batch value), or both None (track_running_stats=False).
    momentum: a number (torch's None means a cumulative average: pass 1 / batches seen).
    """
    x, w, b, problem = _checked_conv(input, weight, bias, stride, padding, dilation, groups,
                                     padding_mode, activation)
    channels = problem.out_channels
    gamma, beta = _pair(bn_weight, bn_bias, "bn_weight", "bn_bias", channels, problem.dtype)
    mean_run, var_run = _pair(running_mean, running_var, "running_mean", "running_var",
                              channels, problem.dtype)
    for a, name in ((mean_run, "running_mean"), (var_run, "running_var")):
        if a is not None and not (a.flags.c_contiguous and a.flags.writeable):
            raise ValueError(f"{name} must be a C-contiguous, writable array: it is updated "
                             "in place")
    momentum, eps = _number(momentum, "momentum"), _number(eps, "eps")
    queue = _resolve_queue(queue)
    check_device_limits(problem, queue.device)
    launch = _launch(queue, "forward", problem, activation, gamma is not None,
                     mean_run is not None)
    conv = prepare(problem, queue, "forward", [x, w, b], problem.output_shape)
    dtype = problem.numpy_dtype
    z = arrays.aligned_empty(queue, problem.output_shape, dtype)
    stats = [arrays.aligned_empty(queue, (channels,), dtype) for _ in range(2)]
    in_place = arrays.shares_host_memory(queue)
    params = [arrays.operand(queue, a, in_place, f"bn{i}") for i, a in enumerate((gamma, beta))
              if a is not None]
    running = [(arrays.updated_buffer(queue, a), a) for a in (mean_run, var_run)
               if a is not None]
    outputs = [(arrays.output_buffer(queue, a), a) for a in [z] + stats]
    started = enqueue_all(queue, [conv])
    try:
        y_buffer, waits = _written(started[0])
        args = [y_buffer, 0, *(v for p in params for v in p[:2]), outputs[0][0], 0,
                outputs[1][0], outputs[2][0], *(v for buf, _ in running for v in (buf, 0)),
                problem.batch, momentum, eps]
        with scratch.of(queue).lock:    # a kernel's arguments are set, then it is enqueued
            event = launch(queue, problem.batch, *args, wait_for=waits)
    except BaseException:
        queue.finish()
        raise
    done = [Started(a, buf, [event], params) for buf, a in outputs + running]
    y, z, mean, invstd = finish(queue, started + done)[:4]
    return z, y, mean, invstd


def conv2d_batch_norm_backward(input, weight, conv_output, mean, invstd, bn_weight, bn_bias,
                               grad_output, stride=1, padding=0, dilation=1, groups=1,
                               padding_mode="zeros", *, activation=None,
                               output_mask=(True,) * 5, queue=None):
    """(d input, d weight, d bias, d bn_weight, d bn_bias) of conv2d_batch_norm's z, given
    grad_output = d(loss)/dz and what the forward returned (conv_output = y, mean, invstd):
    None where output_mask (five bools, in that order) is False, and for the BatchNorm's
    parameters when they are None. One wait for all."""
    mask = _output_mask(output_mask, GRADIENTS)
    x, w, _, problem = _checked_conv(input, weight, None, stride, padding, dilation, groups,
                                     padding_mode, activation)
    channels, dtype = problem.out_channels, problem.numpy_dtype
    gamma, beta = _pair(bn_weight, bn_bias, "bn_weight", "bn_bias", channels, problem.dtype)
    y, dz = (arrays.as_host_array(a, name) for a, name in ((conv_output, "conv_output"),
                                                           (grad_output, "grad_output")))
    check_operand(y, "conv_output", problem.output_shape, problem.dtype)
    check_operand(dz, "grad_output", problem.output_shape, problem.dtype)
    stats = [arrays.as_host_array(a, name) for a, name in ((mean, "mean"), (invstd, "invstd"))]
    for a, name in zip(stats, ("mean", "invstd")):
        check_operand(a, name, (channels,), problem.dtype)
    queue = _resolve_queue(queue)
    check_device_limits(problem, queue.device)
    launch = _launch(queue, "backward", problem, activation, gamma is not None, False)
    in_place = arrays.shares_host_memory(queue)
    operands = [arrays.operand(queue, a, in_place, f"bn{i}")
                for i, a in enumerate([y, dz, gamma, beta]) if a is not None]
    stat_buffers = [arrays.operand(queue, a, in_place, f"bn-stat{i}")[0]
                    for i, a in enumerate(stats)]
    sums = [arrays.aligned_empty(queue, (channels,), dtype) for _ in range(2)]
    outputs = [(arrays.output_buffer(queue, a), a) for a in sums]
    # d(loss)/dy stays on the device, in scratch kept per queue: only the convolution's
    # gradient kernels read it. The queue's lock keeps other launches off that scratch until
    # they are enqueued. All is prepared before the first kernel, which then has the cores
    # to itself.
    with scratch.of(queue).lock:
        buffer = scratch_buffer(queue, "batch_norm dy", math.prod(problem.output_shape),
                                dtype.itemsize)
        dy = cl_array.Array(queue, problem.output_shape, dtype, data=buffer)
        ready = [prepare(problem, queue, "input_grad", [dy, w], x.shape, on_device=False)
                 if mask[0] else None,
                 prepare(problem, queue, "weight_grad", [x, dy], w.shape) if mask[1] else None,
                 _prepare_bias_grad(dy, queue, on_device=False) if mask[2] else None]
        try:
            dy.add_event(launch(queue, problem.batch, *(v for o in operands for v in o[:2]),
                                *stat_buffers, dy.base_data, 0,
                                *(buf for buf, _ in outputs), problem.batch))
        except BaseException:
            queue.finish()
            raise
        started = enqueue_all(queue, ready)
    done = [Started(a, buf, dy.events, (operands, stats)) for buf, a in outputs]
    grads = finish(queue, started + done)
    if gamma is None:
        grads[3:] = [None, None]
    return tuple(g if wanted else None for g, wanted in zip(grads, mask))


def _checked_conv(input, weight, bias, stride, padding, dilation, groups, padding_mode,
                  activation):
    """(x, w, b, Problem) of a fused call: a batched float32/float64 convolution with at
    least two values per output channel (torch's rule for training-mode statistics)."""
    check_activation(activation)
    x, w = _host(input, "input"), _host(weight, "weight")
    b = None if bias is None else _host(bias, "bias")
    if x.ndim != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W) for BatchNorm2d, got shape "
                         f"{tuple(x.shape)}")
    problem, _ = check_call(x, w, b, stride, padding, dilation, groups, padding_mode)
    if problem.dtype not in DTYPES:
        raise TypeError(f"the fused BatchNorm takes float32 or float64, got {problem.dtype}")
    n, c, h, w_out = problem.output_shape
    if n * h * w_out <= 1:
        raise ValueError("BatchNorm in training needs more than 1 value per channel, got "
                         f"output size {tuple(problem.output_shape)}")
    return x, w, b, problem


def _host(a, name):
    if arrays.is_device_array(a):
        raise TypeError(f"{name}: the fused BatchNorm takes host arrays (NumPy or torch), "
                        "not pyopencl arrays")
    return arrays.as_host_array(a, name)


def _pair(first, second, first_name, second_name, channels, dtype):
    """Two per-channel arrays given together or not at all."""
    if (first is None) != (second is None):
        raise ValueError(f"{first_name} and {second_name} must both be arrays or both None")
    if first is None:
        return None, None
    pair = [_host(a, name) for a, name in ((first, first_name), (second, second_name))]
    for a, name in zip(pair, (first_name, second_name)):
        check_operand(a, name, (channels,), dtype)
    return pair


def _number(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _written(started):
    """(buffer, events) of a Started convolution: the buffer its kernels write, and them."""
    if started.buffer is not None:
        return started.buffer, started.events
    return started.result.base_data, started.result.events


def constants(info, operation, problem, activation, affine, running, local=None,
              per_group=None):
    """What a batch_norm kernel is specialised on. local: the work-group size, per_group:
    the channels a work-group computes (by default what suits the plane and the device)."""
    _, channels, height, width = problem.output_shape
    plane = height * width
    tw = max(of_info(info).widths_of(problem.dtype))   # memory-bound: the widest vector
    if local is None:
        local = 1 if info.is_cpu else min(MOST_LOCAL, pow2_at_most(info.max_work_group_size),
                                          1 << max(0, -(-plane // tw) - 1).bit_length())
    # Each of a CPU's work-groups costs ~1 µs to start: channels in turn in a few a core.
    if per_group is None:
        per_group = (max(1, channels // (GROUPS_PER_CORE * info.compute_units))
                     if info.is_cpu else 1)
    return dict(operation=operation, dtype=problem.dtype, channels=channels, plane=plane,
                idx_t="int" if math.prod(problem.output_shape) <= INT32_LIMIT else "long",
                tw=tw, plane_vectors=Blocks(plane, tw), group_size=local,
                halves=_halves(local), per_group=per_group, groups=-(-channels // per_group),
                affine=affine, running=running, activation=activation)


def kernel_args(constants):
    """The batch_norm kernel's arguments (the template's parameter names)."""
    acc_t = programs.c_types(constants["dtype"])[1]
    params = (Buffer("gamma"), Buffer("beta")) if constants["affine"] else ()
    stat = dict(type="acc_t", offset=False)
    if constants["operation"] == "forward":
        running = ((Buffer("running_mean", const=False), Buffer("running_var", const=False))
                   if constants["running"] else ())
        return (Buffer("y"), *params, Buffer("z", const=False),
                Buffer("mean_out", const=False, **stat), Buffer("invstd_out", const=False, **stat),
                *running, Scalar("batch"), Scalar("momentum", acc_t), Scalar("eps", acc_t))
    return (Buffer("y"), Buffer("dz"), *params, Buffer("mean_in", **stat),
            Buffer("invstd_in", **stat), Buffer("dy", const=False),
            Buffer("dgamma", const=False, **stat), Buffer("dbeta", const=False, **stat),
            Scalar("batch"))


_launches = programs.ContextMemo()


def _launch(queue, operation, problem, activation, affine, running):
    """The batch_norm Step, memoised per context: built with the widest work-group the
    compiled kernel can run (its own limit may be below the device's)."""
    table = _launches.table(queue.context)
    key = (queue.device, operation, problem.output_shape, problem.dtype, activation, affine,
           running)
    step = table.get(key)
    if step is None:
        info = device_info(queue.device)
        step = table[key] = build(queue, constants(info, operation, problem, activation,
                                                   affine, running))
    return step


def build(queue, wanted):
    """A Step of the batch_norm kernel of constants `wanted`, its work-group halved until
    the compiled kernel runs it (the group size is rendered into the source)."""
    name = f"batch_norm_{'forward' if wanted['operation'] == 'forward' else 'backward'}"
    while True:
        local = wanted["group_size"]
        try:
            items = (wanted["groups"] * local,)
            return build_step(queue, "batch_norm.cl.mako", name, wanted, kernel_args(wanted),
                              lambda batch: items, (local,))
        except ValueError:
            if local == 1:
                raise
            wanted = dict(wanted, group_size=local // 2, halves=_halves(local // 2))


def _halves(local):
    """The strides of the tree sum over a work-group of local (a power of two)."""
    return [local >> i for i in range(1, local.bit_length())]
