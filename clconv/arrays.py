"""Operands on the device: pyopencl arrays stay where they are; NumPy arrays are copied in,
except on a device that computes in the host's memory (a CPU device: PoCL), where a buffer
is made over the array's own memory (CL_MEM_USE_HOST_PTR: no copy) and a NumPy result is
written in place: read as soon as its kernel is done where a probe showed the kernels write
that memory itself (writes_in_place), else mapped and unmapped. Elsewhere (a GPU) the
copies go through pinned staging buffers kept per queue (clconv.scratch), which the driver
copies from and to directly rather than through its own staging of pageable memory.

An operand is handed to kernels as (buffer, offset in elements). A non-contiguous pyopencl
array is first gathered into a contiguous one on the device, never through the host; a
non-contiguous NumPy array is made contiguous on the host first (one copy).
"""
from __future__ import annotations

import math
import threading

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from . import programs, scratch
from .device import queried_info

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


def shares_host_memory(queue):
    """Whether queue's device computes in the host's memory, so that NumPy arrays can be
    handed to kernels without a copy."""
    return queried_info(queue.device).host_unified_memory


def host_buffer(queue, a, flags):
    """A buffer over the memory of the C-contiguous, non-empty NumPy array a (no copy on a
    device that shares the host's memory); a must outlive every kernel that uses it."""
    return cl.Buffer(queue.context, flags | cl.mem_flags.USE_HOST_PTR, hostbuf=a)


def output_buffer(queue, a):
    """A buffer for kernels to write the NumPy array a's values into, for to_host: over a's
    own memory where the device shares the host's, else the device's own."""
    if shares_host_memory(queue):
        return host_buffer(queue, a, cl.mem_flags.READ_WRITE)
    return cl.Buffer(queue.context, cl.mem_flags.READ_WRITE, a.nbytes)


def updated_buffer(queue, a):
    """A buffer that kernels read the C-contiguous NumPy array a's values from and write new
    ones into, for to_host: over a's own memory where the device shares the host's, else a
    copy of a on the device."""
    flags = cl.mem_flags.READ_WRITE
    if shares_host_memory(queue):
        return host_buffer(queue, a, flags)
    return cl.Buffer(queue.context, flags | cl.mem_flags.COPY_HOST_PTR, hostbuf=a)


NUMPY_ALIGNMENT = 16     # what every NumPy allocation has (malloc's)


def aligned_empty(queue, shape, dtype):
    """np.empty(shape, dtype), aligned as a result written in place needs to be for to_host
    to skip the map (writes_in_place) where NumPy's own alignment is not enough."""
    align = writes_in_place(queue) if shares_host_memory(queue) else 0
    if align <= NUMPY_ALIGNMENT:
        return np.empty(shape, dtype)
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def to_host(queue, outputs):
    """For each (buffer, a, wait_for) of outputs: wait for wait_for, then make the device's
    writes to buffer (output_buffer) visible in a: nothing more where they are already in a's
    memory (writes_in_place), else a map and unmap, which copy nothing where the memory is
    shared (and a copy where a driver maps elsewhere), or a read of the device's own buffer.
    One wait for all: each wait on PoCL costs a round trip of ~50-100 µs."""
    if not shares_host_memory(queue):
        cl.wait_for_events([cl.enqueue_copy(queue, a, buffer, wait_for=wait_for,
                                            is_blocking=False)
                            for buffer, a, wait_for in outputs])
        return
    alignment = writes_in_place(queue)
    if alignment and all(a.ctypes.data % alignment == 0 for _, a, _ in outputs):
        cl.wait_for_events([event for _, _, wait_for in outputs for event in wait_for or ()])
        return
    maps = [cl.enqueue_map_buffer(queue, buffer, cl.map_flags.READ, 0, a.shape, a.dtype,
                                  wait_for=wait_for, is_blocking=False)
            for buffer, a, wait_for in outputs]
    cl.wait_for_events([event for _, event in maps])
    for (mapped, _), (_, a, _) in zip(maps, outputs):
        if mapped.ctypes.data != a.ctypes.data:
            a[...] = mapped
        # Not waited for: unmapping a read-only map moves no data.
        mapped.base.release(queue)


# writes_in_place's probe: a kernel marks PROBE_WORDS words (not a whole number of cache
# lines) of a host array at each alignment in turn, from the loosest a NumPy array may have.
PROBE_WORDS = 1000
PROBE_MARKER = 0x5EED0000
MARK_ARGS = (programs.Buffer("dst", "uint", const=False, offset=False),)
_in_place = {}      # device -> writes_in_place's answer


def writes_in_place(queue):
    """The alignment in bytes that a NumPy array's memory needs on queue's device for a
    kernel's writes to a buffer over it (host_buffer) to be in that memory as soon as the
    kernel's event completes, so that to_host waits for the event alone (a map and an unmap
    are two more commands for the driver's threads to pick up: ~50-100 µs a result on PoCL);
    0: never (then to_host maps). Probed once per device, CPU devices only: a kernel writes
    an array at 16 bytes' alignment, then at CL_DEVICE_MEM_BASE_ADDR_ALIGN; the first whose
    words are all there when read without a map, and whose map gives the array's own
    pointer, is the answer."""
    device = queue.device
    if device not in _in_place:
        info = queried_info(device)
        found = 0
        if info.is_cpu and info.host_unified_memory:
            for alignment in sorted({16, info.base_addr_align}):
                if _lands_in_place(queue, alignment, info.base_addr_align):
                    found = alignment
                    break
        _in_place[device] = found
    return _in_place[device]


def _lands_in_place(queue, alignment, base_align):
    """Whether the mark kernel's writes to an array whose start is aligned to alignment
    bytes, and to no more than that below base_align, are in its memory without a map."""
    raw = np.zeros(PROBE_WORDS + 2 * base_align // 4, np.uint32)
    start = (-raw.ctypes.data % base_align + (alignment % base_align)) // 4
    a = raw[start:start + PROBE_WORDS]
    try:
        buffer = host_buffer(queue, a, cl.mem_flags.READ_WRITE)
        mark(queue, buffer).wait()
        landed = bool(np.all(a == marks()))
        mapped, _ = cl.enqueue_map_buffer(queue, buffer, cl.map_flags.READ, 0, a.shape,
                                          a.dtype, is_blocking=True)
        same = mapped.ctypes.data == a.ctypes.data
        mapped.base.release(queue)
        queue.finish()
    except cl.Error:
        return False
    return landed and same


def mark(queue, buffer):
    """Launch writes_in_place's probe kernel on buffer (PROBE_WORDS uint words): each word
    becomes its value in marks()."""
    kernel = programs.kernel(queue.context, "mark.cl.mako", "mark", MARK_ARGS,
                             marker=PROBE_MARKER)
    return kernel(queue, (PROBE_WORDS,), None, buffer)


def marks():
    """The words mark writes: the marker plus each word's index."""
    return PROBE_MARKER + np.arange(PROBE_WORDS, dtype=np.uint32)


def upload(queue, a, role):
    """A device array with the values of the C-contiguous NumPy array a, copied through the
    queue's pinned staging buffer for role. The copy out of staging is enqueued, not
    waited for: the next use of the staging buffer maps it (blocking) after that copy on an
    in-order queue; an out-of-order queue gets a plain copy."""
    kept = scratch.of(queue)
    if not kept.in_order or not a.size:
        return cl_array.to_device(queue, a)
    out = empty(queue, a.shape, a.dtype)
    with kept.lock:
        staging = scratch.staging_buffer(queue, role, a.nbytes)
        mapped, _ = cl.enqueue_map_buffer(queue, staging, cl.map_flags.WRITE, 0, a.shape,
                                          a.dtype, is_blocking=True)
        mapped[...] = a
        mapped.base.release(queue)
        out.add_event(cl.enqueue_copy(queue, out.base_data, staging, byte_count=a.nbytes))
    return out


def download(queue, y):
    """A NumPy copy of the contiguous device array y, through the queue's pinned staging
    buffer (waits for y)."""
    kept = scratch.of(queue)
    if not kept.in_order or not y.size:
        return y.get()
    with kept.lock:
        staging = scratch.staging_buffer(queue, "download", y.nbytes)
        copied = cl.enqueue_copy(queue, staging, y.base_data, byte_count=y.nbytes,
                                 wait_for=y.events)
        mapped, _ = cl.enqueue_map_buffer(queue, staging, cl.map_flags.READ, 0, y.shape,
                                          y.dtype, wait_for=[copied], is_blocking=True)
        result = mapped.copy()
        mapped.base.release(queue)      # a read-only map: nothing to wait for
    return result


def operand(queue, a, in_place=False, role="upload"):
    """(buffer, element offset, owner) of a on queue's context; owner keeps it alive (a
    device array, or the NumPy array whose memory the buffer is). in_place: a NumPy array
    may be used in place (host_buffer), for a caller that waits for every kernel reading it
    before it lets go of owner; else it is uploaded through staging for role."""
    if not is_device_array(a):
        a = np.ascontiguousarray(a)
        if a.size and in_place:
            return host_buffer(queue, a, cl.mem_flags.READ_ONLY), 0, a
        a = upload(queue, a, role)
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
    key = (WORD_TYPES[itemsize], shape, strides)
    gathers = _gathers.table(queue.context)
    built = gathers.get(key)
    if built is None:
        built = gathers[key] = (programs.kernel(queue.context, "gather.cl.mako", "gather4d",
                                                GATHER_ARGS, word_t=key[0], shape=shape,
                                                strides=strides), threading.Lock())
    kernel, lock = built
    with lock:      # a Kernel's arguments are set, then enqueued: one caller at a time
        out.add_event(kernel(queue, shape[:0:-1], None, a.base_data, a.offset // itemsize,
                             out.base_data, wait_for=a.events))
    return out


# Built gather kernels per context, by (word type, shape, strides): a new Kernel object costs
# a few hundred µs in pyopencl (its argument setter), more than most gathers.
_gathers = programs.ContextMemo()
