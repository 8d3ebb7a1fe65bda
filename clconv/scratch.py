"""Buffers kept per command queue and reused by later calls: scratch between a launch's
kernels (a staged input, partial sums), and pinned host staging for copies to and from a
device that does not compute in the host's memory.

A new buffer per call costs an allocation and, on a CPU device, the first touch of every
page; a kept one is safe to reuse on an in-order queue, whose later commands start only once
earlier ones have finished with it. Each queue has a lock, held by a launch (and an upload or
download through staging) for all of its enqueues, so that threads sharing a queue cannot
interleave two of them. An out-of-order queue gets new buffers every time (OpenCL keeps a
released buffer until the commands using it finish). Each queue keeps, per role, the largest
buffer it needed so far; release() frees them all.
"""
from __future__ import annotations

import threading

import pyopencl as cl

from .programs import ContextMemo


class QueueBuffers:
    """The kept buffers and the lock of one queue."""

    def __init__(self, queue):
        # A reference of our own to the queue, so that its handle (the key) is not reused by
        # a new queue while this entry lives; not the caller's object, which holds the
        # context that keys the table.
        self.queue = cl.CommandQueue.from_int_ptr(queue.int_ptr)
        self.in_order = not (queue.properties
                             & cl.command_queue_properties.OUT_OF_ORDER_EXEC_MODE_ENABLE)
        self.lock = threading.RLock()
        self.buffers = {}

    def get(self, role, nbytes, flags):
        """A buffer of at least nbytes with flags for role (distinct among the buffers one
        launch or copy uses at once); kept per (role, flags), so a staging buffer is never
        handed out as device scratch or the other way round."""
        buffer = self.buffers.get((role, flags))
        if buffer is None or buffer.size < nbytes:
            buffer = cl.Buffer(self.queue.context, flags, max(1, nbytes))
            if self.in_order:
                self.buffers[role, flags] = buffer
        return buffer


_kept = ContextMemo()


def of(queue) -> QueueBuffers:
    table = _kept.table(queue.context)
    kept = table.get(queue.int_ptr)
    if kept is None:
        kept = table[queue.int_ptr] = QueueBuffers(queue)
    return kept


def device_buffer(queue, role, nbytes):
    """Scratch in device memory for role (see the module docstring)."""
    return of(queue).get(role, nbytes, cl.mem_flags.READ_WRITE)


def staging_buffer(queue, role, nbytes):
    """Host memory the driver can copy to and from the device directly (ALLOC_HOST_PTR,
    pinned on GPU drivers) for role; hold of(queue).lock while using it."""
    return of(queue).get(role, nbytes, cl.mem_flags.READ_WRITE | cl.mem_flags.ALLOC_HOST_PTR)


def release():
    """Free the buffers kept for later calls."""
    _kept.clear()
