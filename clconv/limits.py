"""What a device can hold and compute: checks made before any device work, each raising (or
returning) a reason that names the operand and the limit. Sizes are Python integers, which
never wrap."""
from __future__ import annotations

import math
import os

from .device import queried_info
from .problem import INT32_LIMIT


def check_fp64(dtype, info):
    if dtype == "float64" and not info.fp64:
        raise TypeError(f"float64 needs the cl_khr_fp64 extension, which {info.name} lacks; "
                        "use float32")


def allocation_problem(what, nbytes, info):
    """Why one buffer of nbytes cannot be allocated on the device (or None)."""
    if nbytes > info.max_mem_alloc_size:
        return (f"the {what} ({_size(nbytes)}) exceeds the device's largest allocation "
                f"({_size(info.max_mem_alloc_size)})")
    return None


def _size(nbytes):
    return f"{nbytes / 2**20:.0f} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"


# Below this many bytes a call's host memory is not worth reading /proc/meminfo for.
HOST_CHECK_BYTES = 256 * 2**20


# (problem, device info) pairs that passed check_device_limits without the host-memory
# reading, whose answer cannot change (a set look-up instead of ~9 µs a call).
_fitting = set()
FITTING_KEPT = 4096


def check_device_limits(problem, device):
    """Reject what the device cannot hold or compute, with the reason, before any work.
    On a CPU device, whose memory is the host's, they must also fit the host memory free
    now."""
    info = queried_info(device)
    if (problem, info) in _fitting:
        return
    check_fp64(problem.dtype, info)
    itemsize = problem.numpy_dtype.itemsize
    sizes = {"input": problem.input_shape, "weight": problem.weight_shape,
             "output": problem.output_shape}
    total = 0
    for name, shape in sizes.items():
        nbytes = math.prod(shape) * itemsize
        total += nbytes
        reason = allocation_problem(name, nbytes, info)
        if reason:
            raise ValueError(f"{reason} on {info.name}; split the batch")
    if total > info.global_mem_size:
        raise ValueError(f"input, weight and output together ({_size(total)}) exceed "
                         f"{info.name}'s memory ({_size(info.global_mem_size)})")
    # A CPU device's buffers are host memory (NumPy operands are used in place, a
    # non-contiguous one copied once): the operands and the result must fit what is free.
    if info.is_cpu and total > HOST_CHECK_BYTES:
        free = host_memory_available()
        if free is not None and total > free:
            raise ValueError(f"input, weight and output together ({_size(total)}) exceed the "
                             f"host memory free now ({_size(free)}) on {info.name}; split "
                             "the batch")
    if problem.batch * problem.out_height > INT32_LIMIT:
        raise ValueError("batch * output height exceeds 2**31 - 1; split the batch")
    if not (info.is_cpu and total > HOST_CHECK_BYTES):
        if len(_fitting) >= FITTING_KEPT:
            _fitting.clear()
        _fitting.add((problem, info))


def host_memory_available():
    """Bytes of host memory available now (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
