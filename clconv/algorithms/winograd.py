"""Winograd F(2x2, 3x3) for 3x3 stride-1 undilated convolutions (opt-in: clconv.options).

Four kernels of one template: transform the weights and the input tiles, 16 GEMMs (the
implicit GEMM's register tile), transform the products back into 2x2 output tiles with the
bias and the epilogue. The GEMM's positions are the tiles of the whole batch.
"""
from __future__ import annotations

from .. import options
from ..problem import INT32_LIMIT
from .base import (Algorithm, acc_itemsize, build_step, index_type, operands, round_up,
                   scratch_buffer)
from .direct import geometry
from .implicit_gemm import (LARGE_IMAGE_BYTES, REGISTER_TILE_PARAMS, register_tile_default,
                            register_tile_problem)

TRANSFORM_POINTS = 16       # a 4x4 tile: 16 GEMMs
# U, V and M hold 16 planes each, a multiple of PLANE_ALIGN plus PLANE_SKEW elements apart:
# 16 streams a power of two apart all fell in one cache set (5 ms for a 512x512 weight
# transform, about 1 ms with the skew).
PLANE_ALIGN, PLANE_SKEW = 1024, 16
MIN_OUTPUTS = 128           # per filter, for the heuristic to prefer it (see preferred())


def fits(problem):
    """Whether problem has the shape Winograd F(2x2, 3x3) computes."""
    return (problem.kernel_size == (3, 3) and problem.stride == (1, 1)
            and problem.dilation == (1, 1))


def tiles(problem):
    """2x2 output tiles per image: (rows, columns)."""
    return -(-problem.out_height // 2), -(-problem.out_width // 2)


def transformed_image_bytes(problem):
    """Bytes of one image's transformed input (V)."""
    rows, cols = tiles(problem)
    return TRANSFORM_POINTS * problem.in_channels * rows * cols * acc_itemsize(problem.dtype)


def padded_tiles(problem, config):
    """The batch's tiles, padded to the GEMM's tile of positions."""
    rows, cols = tiles(problem)
    return round_up(problem.batch * rows * cols, config["tv"] * config["tw"])


def plane(elements):
    """The stride of planes of elements values (the template's PLANE)."""
    return round_up(elements, PLANE_ALIGN) + PLANE_SKEW


def scratch_elements(problem, config):
    """Elements of U (transformed weights), V (transformed input) and M (products)."""
    ppad = padded_tiles(problem, config)
    return tuple(TRANSFORM_POINTS * plane(n) for n in (
        problem.out_channels * problem.cin_per_group, problem.in_channels * ppad,
        problem.out_channels * ppad))


class Winograd(Algorithm):
    name = "winograd"
    template = "winograd.cl.mako"
    params = REGISTER_TILE_PARAMS

    def applies(self, problem):
        return options.allow_winograd() and fits(problem)

    def preferred(self, problem):
        # The transforms are memory-bound passes over 4x the input and the output: they
        # cost more than the multiplies they save with few channels (measured: even at 64,
        # depthwise and resnext's 8 per group far slower), or once the transformed image
        # outgrows the caches (vgg's 64 x 224 x 224: 36 against 20 ms). The weight transform
        # moves ~100 bytes per weight, more than the multiplies it saves below ~70 outputs
        # per filter (512@7 at batch 1: 2.1 against 1.6-1.9 ms).
        return (self.applies(problem) and problem.cin_per_group >= 64
                and problem.cout_per_group >= 64
                and problem.batch * problem.out_height * problem.out_width >= MIN_OUTPUTS
                and transformed_image_bytes(problem) <= LARGE_IMAGE_BYTES)

    def constraints(self, problem, info, config):
        reason = register_tile_problem(problem, info, config)
        if reason:
            return reason
        largest = max(scratch_elements(problem, config)) * acc_itemsize(problem.dtype)
        if largest > info.max_mem_alloc_size:
            return (f"the transformed operands ({largest} bytes) exceed the device's largest "
                    f"allocation ({info.max_mem_alloc_size} bytes)")
        return None

    def default_config(self, problem, info):
        # The GEMMs' reduction is short (the group's input channels), so every channel
        # block re-reads a V tile for few multiplies: 8 blocks per work-group share it in
        # the core's caches (measured: 64@56 at batch 8, 5.3 against 12.3 ms with 4).
        rows, cols = tiles(problem)
        return register_tile_default(problem, info, problem.batch * rows * cols, 8)

    def constants(self, problem, config):
        long_scratch = max(scratch_elements(problem, config)) > INT32_LIMIT
        idx_t = config.get("idx_t") or ("long" if long_scratch else index_type(problem))
        return dict(geometry(problem, config), idx_t=idx_t, has_bias=problem.has_bias,
                    tk=config["tk"], tv=config["tv"], tw=config["tw"], plane_align=PLANE_ALIGN,
                    plane_skew=PLANE_SKEW, activation=None, has_residual=False)

    def ranges(self, problem, config):
        blocks = problem.groups * -(-problem.cout_per_group // config["tk"])
        positions = padded_tiles(problem, config) // (config["tv"] * config["tw"])
        return (positions, blocks, TRANSFORM_POINTS), (config["lx"], config["ly"], 1)

    def launcher(self, problem, queue, config, strict, epilogue):
        constants = dict(self.constants(problem, config), **(epilogue or {}))
        tile_rows = tiles(problem)[0]
        extras = len(self.inputs(problem, constants)) - 2       # bias, residual

        def step(kernel, count, items, local=None):
            return build_step(queue, self.template, kernel, constants,
                              operands(count) + ("int",), items, local, strict)
        weights = step("winograd_weights", 2,
                       lambda batch: (problem.out_channels * problem.cin_per_group,))
        inputs = step("winograd_input", 2,
                      lambda batch: (tile_rows, batch * problem.in_channels))
        gemm = step("winograd_gemm", 3,
                    lambda batch: self.ranges(problem.with_batch(batch), config)[0],
                    self.ranges(problem, config)[1])
        output = step("winograd_output", 2 + extras,
                      lambda batch: (tile_rows, batch * problem.out_channels))
        itemsize = acc_itemsize(problem.dtype)

        def run(queue, operands_in, out, batch, wait_for):
            sizes = scratch_elements(problem.with_batch(batch), config)
            u, v, m = (scratch_buffer(queue, n, itemsize) for n in sizes)
            (x, w), extra = operands_in[:2], [a for pair in operands_in[2:] for a in pair]
            events = [weights(queue, batch, *w, u, 0, batch, wait_for=wait_for),
                      inputs(queue, batch, *x, v, 0, batch, wait_for=wait_for)]
            events.append(gemm(queue, batch, u, 0, v, 0, m, 0, batch, wait_for=events[:2]))
            events.append(output(queue, batch, m, 0, *extra, *out, batch,
                                 wait_for=events[2:]))
            return events
        return run
