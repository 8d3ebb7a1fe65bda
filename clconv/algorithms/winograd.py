"""Winograd F(2x2, 3x3) for 3x3 stride-1 undilated convolutions (opt-in: clconv.options).

Four kernels of one template: transform the weights and the input tiles, 16 GEMMs (the
implicit GEMM's register tile), transform the products back into 2x2 output tiles with the
bias and the epilogue. The GEMM's positions are the tiles of the whole batch.

The scratch layout (WinogradLayout) is computed here once: the template only reads it, and
the batch-dependent strides reach the kernels as arguments computed from it at launch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .. import options
from ..limits import allocation_problem
from ..problem import INT32_LIMIT
from ..programs import Buffer, Scalar
from .base import (BATCH, Algorithm, acc_itemsize, build_step, channel_blocks, index_type,
                   operation_args, round_up, scratch_buffer)
from .direct import geometry
from .implicit_gemm import (LARGE_IMAGE_BYTES, REGISTER_TILE_PARAMS, register_tile_default,
                            register_tile_problem)

TRANSFORM_POINTS = 16       # a 4x4 tile: 16 GEMMs
# U, V and M hold 16 planes each, a multiple of PLANE_ALIGN plus PLANE_SKEW elements apart:
# 16 streams a power of two apart all fell in one cache set (5 ms for a 512x512 weight
# transform, about 1 ms with the skew).
PLANE_ALIGN, PLANE_SKEW = 1024, 16
MIN_OUTPUTS = 128           # per filter, for the heuristic to prefer it (see preferred())


@dataclass(frozen=True)
class WinogradLayout:
    """Where the transformed operands lie. U[xi][k][c] (transformed weights), V[xi][ci][p]
    (transformed input tiles) and M[xi][k][p] (products) each hold TRANSFORM_POINTS planes,
    `plane(n)` elements apart for planes of n values. Tiles p run over the whole batch (image,
    tile row, tile column), padded with zeros to `ppad(batch)`, a multiple of the GEMM's tile
    of `tile` positions."""
    tile_rows: int          # 2x2 output tiles per image: rows
    tile_cols: int          # ... and columns
    tile: int               # the GEMM's positions per work-item (tv * tw)
    filters: int            # U's values per plane: out_channels * cin_per_group
    in_channels: int
    out_channels: int
    plane_align: int
    plane_skew: int
    idx_t: str

    @property
    def tiles(self):
        """Output tiles per image."""
        return self.tile_rows * self.tile_cols

    def plane(self, elements):
        """The stride of planes of elements values."""
        return round_up(elements, self.plane_align) + self.plane_skew

    @property
    def uplane(self):
        """U's plane stride (no batch in it: a rendered constant)."""
        return self.plane(self.filters)

    def ppad(self, batch):
        """The batch's tiles, padded to the GEMM's tile."""
        return round_up(batch * self.tiles, self.tile)

    def vplane(self, batch):
        return self.plane(self.in_channels * self.ppad(batch))

    def mplane(self, batch):
        return self.plane(self.out_channels * self.ppad(batch))

    def scratch_elements(self, batch):
        """Elements of U, V and M for batch images."""
        return tuple(TRANSFORM_POINTS * n for n in (self.uplane, self.vplane(batch),
                                                    self.mplane(batch)))


def fits(problem):
    """Whether problem has the shape Winograd F(2x2, 3x3) computes."""
    return (problem.kernel_size == (3, 3) and problem.stride == (1, 1)
            and problem.dilation == (1, 1))


def layout(problem, tile=1, idx_t=None) -> WinogradLayout:
    """The WinogradLayout of problem for a GEMM tile of `tile` positions; idx_t forces the
    index type (else long once a scratch buffer at problem's batch outgrows 32-bit indices)."""
    shape = WinogradLayout(-(-problem.out_height // 2), -(-problem.out_width // 2), tile,
                           problem.out_channels * problem.cin_per_group, problem.in_channels,
                           problem.out_channels, PLANE_ALIGN, PLANE_SKEW, "int")
    long_scratch = max(shape.scratch_elements(problem.batch)) > INT32_LIMIT
    return replace(shape, idx_t=idx_t or ("long" if long_scratch else index_type(problem)))


def config_layout(problem, config):
    return layout(problem, config["tv"] * config["tw"], config.get("idx_t"))


def transformed_image_bytes(problem):
    """Bytes of one image's transformed input (V)."""
    return (TRANSFORM_POINTS * problem.in_channels * layout(problem).tiles
            * acc_itemsize(problem.dtype))


# The batch-dependent strides, kernel arguments (computed from the layout at launch).
PPAD, VPLANE, MPLANE = Scalar("ppad", "idx_t"), Scalar("vplane", "idx_t"), \
    Scalar("mplane", "idx_t")
U, V, M = (Buffer(name, type="acc_t") for name in "uvm")


def kernel_args(problem, constants):
    """Each kernel's arguments: name -> (Buffer/Scalar, ...)."""
    forward = operation_args("forward", problem, constants)     # x, w, [b], [res], y, batch
    return {
        "winograd_weights": (Buffer("w"), replace(U, const=False)),
        "winograd_input": (Buffer("x"), replace(V, const=False), BATCH, PPAD, VPLANE),
        "winograd_gemm": (U, V, replace(M, const=False), PPAD, VPLANE, MPLANE),
        "winograd_output": (M,) + forward[2:] + (PPAD, MPLANE),
    }


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
        largest = max(config_layout(problem, config).scratch_elements(problem.batch))
        return allocation_problem("largest transformed operand",
                                  largest * acc_itemsize(problem.dtype), info)

    def default_config(self, problem, info):
        # The GEMMs' reduction is short (the group's input channels), so every channel
        # block re-reads a V tile for few multiplies: 8 blocks per work-group share it in
        # the core's caches (measured: 64@56 at batch 8, 5.3 against 12.3 ms with 4).
        return register_tile_default(problem, info, problem.batch * layout(problem).tiles, 8)

    def constants(self, problem, config):
        shape = config_layout(problem, config)
        return dict(geometry(problem, config), idx_t=shape.idx_t, layout=shape,
                    has_bias=problem.has_bias, tk=config["tk"], tv=config["tv"],
                    tw=config["tw"], channel_blocks=channel_blocks(problem, config["tk"])[0])

    def ranges(self, problem, config):
        shape = config_layout(problem, config)
        positions = shape.ppad(problem.batch) // shape.tile
        return ((positions, channel_blocks(problem, config["tk"])[1], TRANSFORM_POINTS),
                (config["lx"], config["ly"], 1))

    def launcher(self, problem, queue, config, strict, constants):
        shape = constants["layout"]
        args = kernel_args(problem, constants)

        def step(kernel, items, local=None):       # the template renders `entry` alone
            return build_step(queue, self.template, kernel, dict(constants, entry=kernel),
                              args[kernel], items, local, strict)
        weights = step("winograd_weights", lambda batch: (shape.filters,))
        inputs = step("winograd_input",
                      lambda batch: (shape.tile_rows, batch * problem.in_channels))
        gemm = step("winograd_gemm",
                    lambda batch: self.ranges(problem.with_batch(batch), config)[0],
                    self.ranges(problem, config)[1])
        output = step("winograd_output",
                      lambda batch: (shape.tile_rows, batch * problem.out_channels))
        itemsize = acc_itemsize(problem.dtype)

        def run(queue, operands_in, out, batch, wait_for):
            u, v, m = (scratch_buffer(queue, role, n, itemsize)
                       for role, n in zip("uvm", shape.scratch_elements(batch)))
            ppad, vplane, mplane = shape.ppad(batch), shape.vplane(batch), shape.mplane(batch)
            (x, w), extra = operands_in[:2], [a for pair in operands_in[2:] for a in pair]
            events = [weights(queue, batch, *w, u, 0, wait_for=wait_for),
                      inputs(queue, batch, *x, v, 0, batch, ppad, vplane,
                             wait_for=wait_for)]
            events.append(gemm(queue, batch, u, 0, v, 0, m, 0, ppad, vplane, mplane,
                               wait_for=events[:2]))
            events.append(output(queue, batch, m, 0, *extra, *out, batch, ppad, mplane,
                                 wait_for=events[2:]))
            return events
        return run
