"""Operands on the device: NumPy arrays are copied in; pyopencl arrays stay where they are.

An operand is handed to kernels as (buffer, offset in elements). A non-contiguous pyopencl
array is first gathered into a contiguous one on the device, never through the host.
"""
from __future__ import annotations

import numpy as np
import pyopencl.array as cl_array

from . import programs

WORD_TYPES = {1: "uchar", 2: "ushort", 4: "uint", 8: "ulong"}
# gather4d: a device array's words, read by its strides, into a contiguous one.
GATHER_ARGS = (programs.Buffer("src", "word_t", restrict=False, offset_t="long"),
               programs.Buffer("dst", "word_t", const=False, offset=False, restrict=False))

def is_device_array(a):
    return isinstance(a, cl_array.Array)


ARRAY_PROTOCOLS = ("__array__", "__array_interface__", "__array_struct__")


def as_host_array(a, name):
    """A NumPy view of a host operand: a NumPy array or an object that exports one (a CPU
    torch.Tensor ...). Anything else (None, numbers, strings, lists) is a TypeError, as torch
    refuses a non-Tensor."""
    if isinstance(a, np.ndarray):
        return a
    if not any(hasattr(a, p) for p in ARRAY_PROTOCOLS):
        raise TypeError(f"{name} must be an array (a NumPy array, a pyopencl.array.Array or "
                        f"an object with __array__ such as a CPU torch.Tensor), got "
                        f"{type(a).__name__} {_short_repr(a)}")
    try:
        return np.asarray(a)
    except Exception as err:
        raise TypeError(f"{name}: a {type(a).__name__} that does not convert to a NumPy "
                        f"array ({err})") from err


def _short_repr(a):
    text = repr(a)
    return text if len(text) <= 40 else text[:37] + "..."


def empty(queue, shape, dtype):
    # Plain buffers, no memory pool: OpenCL keeps a released buffer alive until the kernels
    # using it finish, while a pool would hand its memory to the next (blocking) upload at once.
    return cl_array.empty(queue, shape, dtype)


def operand(queue, a):
    """(buffer, element offset, owner) of a on queue's context; owner keeps it alive."""
    if not is_device_array(a):
        a = cl_array.to_device(queue, np.ascontiguousarray(a))
    elif a.context != queue.context:
        raise ValueError("a pyopencl array operand lives on another OpenCL context than the "
                         "convolution's queue")
    elif not a.flags.c_contiguous:
        a = gather_contiguous(queue, a)
    return a.base_data, a.offset // a.dtype.itemsize, a


def gather_contiguous(queue, a):
    """A contiguous copy of a strided (up to 4-D) device array, made on the device."""
    itemsize = a.dtype.itemsize
    if a.offset % itemsize or any(s % itemsize for s in a.strides):
        raise ValueError("a pyopencl array operand has strides or an offset that are not "
                         "multiples of its element size")
    pad = 4 - a.ndim
    shape = (1,) * pad + tuple(a.shape)
    strides = (0,) * pad + tuple(s // itemsize for s in a.strides)
    out = empty(queue, a.shape, a.dtype)
    kernel = programs.kernel(queue.context, "gather.cl.mako", "gather4d", GATHER_ARGS,
                             word_t=WORD_TYPES[itemsize], shape=shape, strides=strides)
    out.add_event(kernel(queue, shape[:0:-1], None, a.base_data, a.offset // itemsize,
                         out.base_data, wait_for=a.events))
    return out
