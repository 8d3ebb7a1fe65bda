"""What every convolution algorithm declares, and how a chosen one is built and launched.

An algorithm computes one `operation` (the forward convolution, or its gradient with respect
to the input or the weight). It is data plus a few small methods (after CLBlast's kernel
descriptions):
- `params`: its tunable parameters, each with the values a tuner may try, read by name;
- `templates`: the templates it renders (their hashes key its tuned entries);
- `suits`: whether it is worth trying on a device at all (the tiled GEMM needs real local
  memory); `applies`: whether it computes a problem; `preferred`: whether the heuristic picks
  it;
- `constraints`: why a configuration is invalid for a problem on a device (or None);
- `default_config`: the heuristic choice when nothing is tuned;
- `constants`: what its templates are specialised on (the layout included), and `ranges`:
  its NDRange;
- `main_args` (and the launcher's other steps): each kernel's arguments, declared once as
  `Buffer` and `Scalar` objects: the template's parameter list and the scalar dtypes come
  from them.
The base class turns a configuration into a ready `Launch`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pyopencl as cl

from .. import programs, scratch
from ..capabilities import device_info
from ..problem import INT32_LIMIT, PADDING_MODES
from ..programs import Buffer, Scalar, acc_itemsize


@dataclass(frozen=True)
class Param:
    name: str
    values: tuple
    doc: str


def param_named(params, name) -> Param:
    """The Param called name among params."""
    return next(p for p in params if p.name == name)


# --- the operations' operands ----------------------------------------------------------------

OPERATIONS = ("forward", "input_grad", "weight_grad")
OUTPUTS = {"forward": "y", "input_grad": "dx", "weight_grad": "dw"}
BATCH = Scalar("batch")
# The forward's fused epilogue when a call asks for none (constants of every forward kernel).
EPILOGUE_DEFAULTS = {"activation": None, "has_residual": False}


def operation_inputs(operation, problem, epilogue=None):
    """The input operands (Buffers) of an operation on problem, in the order a Launch and
    the kernel computing the operation whole take them (the output and batch follow)."""
    if operation == "input_grad":
        return (Buffer("dy"), Buffer("w"))
    if operation == "weight_grad":
        return (Buffer("x"), Buffer("dy"))
    has_residual = (epilogue or {}).get("has_residual", False)
    return ((Buffer("x"), Buffer("w")) + ((Buffer("b"),) if problem.has_bias else ())
            + ((Buffer("res"),) if has_residual else ()))


def operation_args(operation, problem, epilogue=None, out_type="storage_t"):
    """The arguments of a kernel that computes an operation whole: its inputs, its output,
    the batch size."""
    return operation_inputs(operation, problem, epilogue) + (
        Buffer(OUTPUTS[operation], type=out_type, const=False), BATCH)


# --- launches ----------------------------------------------------------------------------

class Launch:
    """A built operation for one problem (any batch size): call it with device operands.

    inputs: the operation's input operands in order (operation_inputs), each a (buffer,
    element offset) pair; output: the result's (buffer, offset). Returns the events of the
    kernels it enqueued, in order.
    """

    def __init__(self, run, algorithm, config):
        self._run = run
        self.algorithm, self.config = algorithm, config

    def __call__(self, queue, inputs, output, batch, wait_for=None):
        # One launch's enqueues at a time per queue: its scratch buffers are the queue's.
        with scratch.of(queue).lock:
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
        # The global size per batch: items() costs tens of µs.
        self._sizes = programs.LRUTable(STEP_SIZES_KEPT)

    def global_size(self, batch):
        size = self._sizes.get(batch)
        if size is None:
            items = self.items(batch)
            size = self._sizes[batch] = items if self.local is None else tuple(
                round_up(n, l) for n, l in zip(items, self.local))
        return size

    def __call__(self, queue, batch, *args, wait_for=None):
        return self.kernel(queue, self.global_size(batch), self.local, *args,
                           wait_for=wait_for)


STEP_SIZES_KEPT = 64


def build_step(queue, template, kernel_name, constants, args, items, local=None,
               strict=True):
    """Render, build and size one kernel as a Step. args: its arguments (Buffer/Scalar), which
    the template gets as `parameters` (its C parameter list). local None: no barriers, the
    driver sizes the work-groups; else strict=False shrinks a work-group the compiled kernel
    cannot run (its own limit can be below the device's) instead of raising."""
    info = device_info(queue.device)
    kernel = programs.kernel(queue.context, template, kernel_name, args, **constants)
    if local is not None:
        kernel_limit = kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE,
                                                  queue.device)
        while work_group_problem(local, info, kernel_limit) and not strict and max(local) > 1:
            largest = local.index(max(local))
            local = local[:largest] + (local[largest] // 2,) + local[largest + 1:]
        reason = work_group_problem(local, info, kernel_limit)
        if reason:
            raise ValueError(f"{kernel_name}: {reason}")
    return Step(kernel, items, local)


def with_scratch(first, then, scratch_elements, dtype, role, itemsize=None):
    """run(): first writes into a scratch buffer (for role) of scratch_elements(batch) acc_t
    values (or values of itemsize bytes), then `then` (a Step on (scratch, output...)) turns
    it into the output."""
    itemsize = itemsize or acc_itemsize(dtype)

    def run(queue, inputs, output, batch, wait_for):
        between = scratch_buffer(queue, role, scratch_elements(batch), itemsize)
        events = first(queue, inputs, (between, 0), batch, wait_for)
        return events + [then(queue, batch, between, *output, wait_for=events)]
    return run


def with_prepared_operand(prepare, main, operand, role, scratch_elements, itemsize,
                          batched=False):
    """run(): prepare (a Step on (inputs[operand], scratch), then (0, batch) when batched)
    writes the operand in the layout main reads into a scratch buffer (for role) of
    scratch_elements(batch) values; main then runs with that buffer in the operand's place."""
    def run(queue, inputs, output, batch, wait_for):
        buffer = scratch_buffer(queue, role, scratch_elements(batch), itemsize)
        into = (buffer, 0, batch) if batched else (buffer,)
        first = prepare(queue, batch, *inputs[operand], *into, wait_for=wait_for)
        inputs = list(inputs)
        inputs[operand] = (buffer, 0)
        return [first] + main(queue, inputs, output, batch, [first])
    return run


# sum_splits: the partial sums (acc_t), then the output.
SUM_SPLITS_ARGS = (Buffer("partial", "acc_t", offset=False), Buffer("out", const=False))


def summed_splits(queue, main, splits, count, dtype, idx_t):
    """run(): main as it is for one split; else main writes `splits` partial sums of count
    values each (acc_t scratch) and sum_splits adds them up in a fixed order."""
    if splits == 1:
        return main
    total = build_step(queue, "sum_splits.cl.mako", "sum_splits",
                       dict(dtype=dtype, idx_t=idx_t, count=count, splits=splits),
                       SUM_SPLITS_ARGS, lambda batch: (count,))
    return with_scratch(main, total, lambda batch: splits * count, dtype, "partial sums")


def scratch_buffer(queue, role, elements, itemsize):
    """A device buffer of at least elements values for intermediate results between a
    launch's kernels; role names its use, distinct among one launch's scratch buffers. Kept
    per queue and reused by later launches (clconv.scratch)."""
    return scratch.device_buffer(queue, role, max(1, elements) * itemsize)


# --- small shared rules --------------------------------------------------------------------

@dataclass(frozen=True)
class Blocks:
    """extent items split into blocks of size (a register tile's channels, a row's
    vectors): `count` blocks, the last one `ragged` when size does not divide extent;
    `whole` items lie in whole blocks. Kernels and NDRanges read these, never recompute them."""
    extent: int
    size: int

    @property
    def count(self):
        return -(-self.extent // self.size)

    @property
    def ragged(self):
        return self.extent % self.size != 0

    @property
    def whole(self):
        return self.extent - self.extent % self.size


def channels_per_group(problem, of="cout"):
    """A group's output channels, or its input channels with of="cin"."""
    return problem.cout_per_group if of == "cout" else problem.cin_per_group


def channel_blocks(problem, per_item, of="cout"):
    """Blocks of per_item channels of a group (output channels, or input channels with
    of="cin"), and the NDRange's count of them over all groups."""
    blocks = Blocks(channels_per_group(problem, of), per_item)
    return blocks, problem.groups * blocks.count


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
    total = math.prod(local_size)
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


def freeze(value):
    """A hashable copy of a constants value (dicts, lists and sets become tuples)."""
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(freeze(v) for v in value)
    return value


# --- the algorithm ---------------------------------------------------------------------------

class Algorithm:
    operation = "forward"
    name = ""
    template = ""           # the template of its main kernel
    templates: tuple = ()   # every template it renders (default: (template,))
    kernel_name = ""
    params: tuple = ()
    padding_modes: tuple = PADDING_MODES    # the padding modes it computes

    def rendered_templates(self):
        return self.templates or (self.template,)

    def param(self, name) -> Param:
        return param_named(self.params, name)

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
        """What the templates are specialised on; never the batch size, which kernels take
        as an argument (so one build serves every batch with the same constants)."""
        raise NotImplementedError

    def ranges(self, problem, config):
        """(work-items needed per dimension, local size)."""
        raise NotImplementedError

    def specialisation(self, problem, config, epilogue=None):
        """A hashable key of everything the built kernels depend on (the constants and the
        epilogue, not the batch): equal keys can share one Launch."""
        return (self.name, freeze(self.all_constants(problem, config, epilogue)))

    def all_constants(self, problem, config, epilogue=None):
        constants = self.constants(problem, config)
        if self.operation == "forward":
            constants.update(EPILOGUE_DEFAULTS, **(epilogue or {}))
        return constants

    def build(self, problem, queue, config, strict=True, epilogue=None) -> Launch:
        """The ready Launch of config (strict: see build_step)."""
        reason = self.constraints(problem, device_info(queue.device), config)
        if reason:
            raise ValueError(f"{self.name} config {config} is invalid for this problem: {reason}")
        return Launch(self.launcher(problem, queue, config, strict,
                                    self.all_constants(problem, config, epilogue)),
                      self.name, dict(config))

    def launcher(self, problem, queue, config, strict, constants):
        """run(queue, inputs, output, batch, wait_for) -> events: the default is the one
        kernel of `template`, on the inputs then the output then the batch size."""
        step = build_step(queue, self.template, self.kernel_name, constants,
                          self.main_args(problem, constants),
                          lambda batch: self.ranges(problem.with_batch(batch), config)[0],
                          self.ranges(problem, config)[1], strict)

        def run(queue, inputs, output, batch, wait_for):
            args = [a for pair in inputs for a in pair]
            return [step(queue, batch, *args, *output, batch, wait_for=wait_for)]
        return run

    def main_args(self, problem, constants):
        """The main kernel's arguments: the operation's, by default."""
        return operation_args(self.operation, problem, constants)
