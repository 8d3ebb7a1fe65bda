"""What every convolution algorithm declares, and how a chosen one is built and launched.

An algorithm computes one `operation` (the forward convolution, or its gradient with respect
to the input or the weight). It is data plus a few small methods (after CLBlast's kernel
descriptions):
- `params`: its tunable parameters, each with the values a tuner may try;
- `suits`: whether it is worth trying on a device at all (the tiled GEMM needs real local
  memory);
- `constraints`: why a configuration is invalid for a problem on a device (or None);
- `default_config`: the heuristic choice when nothing is tuned;
- `constants`: what its template is specialised on, and `ranges`: its NDRange.
The base class turns a configuration into a ready `Launch`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyopencl as cl

from .. import programs
from ..device import device_info
from ..problem import INT32_LIMIT


@dataclass(frozen=True)
class Param:
    name: str
    values: tuple
    doc: str


class Launch:
    """A built operation for one problem (any batch size): call it with device operands.

    inputs: the operation's input operands in order, each a (buffer, element offset) pair
    (forward: x, w, then bias and residual when the problem has them; input_grad: dy, w;
    weight_grad: x, dy); output: the result's (buffer, offset). Returns the events of the
    kernels it enqueued, in order.
    """

    def __init__(self, run, algorithm, config):
        self._run = run
        self.algorithm, self.config = algorithm, config

    def __call__(self, queue, inputs, output, batch, wait_for=None):
        return self._run(queue, inputs, output, batch, wait_for)

    def timed(self, queue, inputs, output, batch):
        """Run once and wait; the device time in ms from the first kernel's start to the last
        one's end (profiling events: the queue must have profiling enabled)."""
        events = self(queue, inputs, output, batch)
        events[-1].wait()
        return (events[-1].profile.end - events[0].profile.start) * 1e-6


class Step:
    """One built kernel and its NDRange: items(batch) work-items, in work-groups of local."""

    def __init__(self, kernel, items, local):
        self.kernel, self.items, self.local = kernel, items, local

    def __call__(self, queue, batch, *args, wait_for=None):
        items = self.items(batch)
        size = items if self.local is None else tuple(round_up(n, l)
                                                      for n, l in zip(items, self.local))
        return self.kernel(queue, size, self.local, *args, wait_for=wait_for)


def round_up(n, multiple):
    return -(-n // multiple) * multiple


def even_split(channels, most):
    """Channels per block when channels are spread evenly over blocks of at most most."""
    blocks = -(-channels // most)
    return -(-channels // blocks)


def pow2_at_most(n):
    """The largest power of two <= n (1 for n < 2)."""
    return 1 << (max(1, n).bit_length() - 1)


def index_type(problem):
    """'int' when every flat index fits in 32 bits, else 'long'."""
    largest = max(math.prod(problem.input_shape), math.prod(problem.output_shape),
                  math.prod(problem.weight_shape))
    return "int" if largest <= INT32_LIMIT else "long"


def work_group_problem(local_size, info, kernel_limit=None):
    """Why local_size cannot run on the device (or None)."""
    total = int(np.prod(local_size))
    limit = min(info.max_work_group_size, kernel_limit or info.max_work_group_size)
    if total > limit:
        return f"work-group of {total} work-items exceeds the limit {limit}"
    for i, (size, most) in enumerate(zip(local_size, info.max_work_item_sizes)):
        if size > most:
            return f"local size {size} in dimension {i} exceeds the device's {most}"
    return None


def fitting_work_group(local, info):
    """local with every dimension halved (never below 1) until the device can run it: the
    heuristic defaults' work-groups on devices with small limits."""
    while work_group_problem(local, info) and max(local) > 1:
        local = tuple(max(1, n // 2) for n in local)
    return local


# The input operands of each operation, in order (the output follows them).
OPERATIONS = {
    "forward": lambda p, k: ("x", "w") + (("b",) if p.has_bias else ())
    + (("residual",) if k.get("has_residual") else ()),
    "input_grad": lambda p, k: ("dy", "w"),
    "weight_grad": lambda p, k: ("x", "dy"),
}


class Algorithm:
    operation = "forward"
    name = ""
    template = ""
    kernel_name = ""
    params: tuple = ()

    def applies(self, problem) -> bool:
        return True

    def suits(self, info) -> bool:
        """Whether the algorithm is worth trying on the device at all: the heuristic and the
        tuner pass over it otherwise (forced, it still runs correctly)."""
        return True

    def preferred(self, problem) -> bool:
        """Whether the heuristic (untuned) choice should be this algorithm."""
        return self.applies(problem)

    def constraints(self, problem, info, config):
        """A reason why config is invalid here, or None."""
        return None

    def default_config(self, problem, info) -> dict:
        raise NotImplementedError

    def constants(self, problem, config) -> dict:
        raise NotImplementedError

    def ranges(self, problem, config):
        """(work-items needed per dimension, local size)."""
        raise NotImplementedError

    def inputs(self, problem, constants):
        """The names of the operation's input operands, in the kernel's order."""
        return OPERATIONS[self.operation](problem, constants)

    def build(self, problem, queue, config, strict=True, epilogue=None) -> Launch:
        """The ready Launch of config (strict: see build_step)."""
        reason = self.constraints(problem, device_info(queue.device), config)
        if reason:
            raise ValueError(f"{self.name} config {config} is invalid for this problem: {reason}")
        return Launch(self.launcher(problem, queue, config, strict, epilogue), self.name,
                      dict(config))

    def launcher(self, problem, queue, config, strict, epilogue):
        """run(queue, inputs, output, batch, wait_for) -> events: the default is the one
        kernel of `template`, on the inputs then the output then the batch size."""
        constants = self.constants(problem, config)
        constants.update(epilogue or {})
        count = len(self.inputs(problem, constants)) + 1
        step = build_step(queue, self.template, self.kernel_name, constants,
                          operands(count) + ("int",),
                          lambda batch: self.ranges(problem.with_batch(batch), config)[0],
                          self.ranges(problem, config)[1], strict)

        def run(queue, inputs, output, batch, wait_for):
            args = [a for pair in inputs for a in pair]
            return [step(queue, batch, *args, *output, batch, wait_for=wait_for)]
        return run


def build_step(queue, template, kernel_name, constants, signature, items, local=None,
               strict=True):
    """Render, build and size one kernel as a Step. signature: its arguments' kinds in
    order, 'buffer', 'offset' (an idx_t) or 'int'. local None: no barriers, the driver sizes
    the work-groups; else strict=False shrinks a work-group the compiled kernel cannot run
    (its own limit can be below the device's) instead of raising."""
    info = device_info(queue.device)
    prg = programs.program(queue.context, programs.render(template, **constants))
    kernel = cl.Kernel(prg, kernel_name)   # its own object: Launches set args apart
    if local is not None:
        kernel_limit = kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE,
                                                  queue.device)
        while work_group_problem(local, info, kernel_limit) and not strict and max(local) > 1:
            largest = local.index(max(local))
            local = local[:largest] + (local[largest] // 2,) + local[largest + 1:]
        reason = work_group_problem(local, info, kernel_limit)
        if reason:
            raise ValueError(f"{kernel_name}: {reason}")
    idx = np.int32 if constants["idx_t"] == "int" else np.int64
    kernel.set_scalar_arg_dtypes(
        [{"buffer": None, "offset": idx, "int": np.int32}[kind] for kind in signature])
    return Step(kernel, items, local)


def with_scratch(first, then, scratch_elements, dtype):
    """run(): first writes into a scratch buffer of scratch_elements(batch) acc_t values,
    then `then` (a Step on (scratch, output...)) turns it into the output."""
    itemsize = acc_itemsize(dtype)

    def run(queue, inputs, output, batch, wait_for):
        scratch = scratch_buffer(queue, scratch_elements(batch), itemsize)
        events = first(queue, inputs, (scratch, 0), batch, wait_for)
        return events + [then(queue, batch, scratch, *output, wait_for=events)]
    return run


def acc_itemsize(dtype):
    """Bytes of one acc_t value: float for half and float, double for double."""
    return 8 if dtype == "float64" else 4


def scratch_buffer(queue, elements, itemsize):
    """A device buffer for intermediate results between a launch's kernels."""
    return cl.Buffer(queue.context, cl.mem_flags.READ_WRITE, max(1, elements) * itemsize)


def operands(count):
    """The signature of count (buffer, element offset) operands."""
    return ("buffer", "offset") * count
