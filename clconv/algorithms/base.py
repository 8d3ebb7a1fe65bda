"""What every convolution algorithm declares, and how a chosen one is built and launched.

An algorithm is data plus a few small methods (after CLBlast's kernel descriptions):
- `params`: its tunable parameters, each with the values a tuner may try;
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
    """A built kernel for one problem (any batch size); call it with device buffers."""

    def __init__(self, kernel, global_size, local_size, has_bias, algorithm, config):
        self.kernel = kernel
        self.algorithm, self.config = algorithm, config     # what was asked (local_size: what runs)
        self.global_size = global_size      # batch -> NDRange (rounded to local_size)
        self.local_size = local_size
        self.has_bias = has_bias

    def __call__(self, queue, x, w, b, y, batch, wait_for=None):
        """x, w, b, y: (buffer, element offset) pairs (b is None without bias)."""
        args = [*x, *w, *(b if self.has_bias else ()), *y, batch]
        return self.kernel(queue, self.global_size(batch), self.local_size, *args,
                           wait_for=wait_for)


def round_up(n, multiple):
    return -(-n // multiple) * multiple


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


class Algorithm:
    name = ""
    template = ""
    kernel_name = ""
    params: tuple = ()

    def applies(self, problem) -> bool:
        return True

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

    def build(self, problem, queue, config, strict=True) -> Launch:
        """The ready Launch of config. strict=False shrinks a work-group the compiled kernel
        cannot run (its own limit can be below the device's) instead of raising."""
        info = device_info(queue.device)
        reason = self.constraints(problem, info, config)
        if reason:
            raise ValueError(f"{self.name} config {config} is invalid for this problem: {reason}")
        constants = self.constants(problem, config)
        prg = programs.program(queue.context, programs.render(self.template, **constants))
        kernel = cl.Kernel(prg, self.kernel_name)   # its own object: Launches set args apart
        local = self.ranges(problem, config)[1]
        kernel_limit = kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE,
                                                  queue.device)
        while work_group_problem(local, info, kernel_limit) and not strict and max(local) > 1:
            largest = local.index(max(local))
            local = local[:largest] + (local[largest] // 2,) + local[largest + 1:]
        reason = work_group_problem(local, info, kernel_limit)
        if reason:
            raise ValueError(f"{self.name} config {config}: {reason}")

        def global_size(batch):
            items = self.ranges(problem.with_batch(batch), config)[0]
            return tuple(round_up(n, l) for n, l in zip(items, local))
        idx = np.int32 if constants["idx_t"] == "int" else np.int64
        arg_types = [None, idx, None, idx] + ([None, idx] if problem.has_bias else [])
        kernel.set_scalar_arg_dtypes(arg_types + [None, idx, np.int32])
        return Launch(kernel, global_size, local, problem.has_bias, self.name, dict(config))
