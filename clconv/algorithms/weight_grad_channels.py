"""The weight gradient as a GEMM vectorised along output channels, for small images.

The same GEMM as weight_grad_gemm (M = output channels per group x N = input channels per
group x taps x K = batch x output positions), with the register tile of the forward's
implicit GEMM turned around: each work-item holds tv vectors of tw output channels x tn
(input channel, tap) columns, and per output position loads tv vectors of dy's channels and
broadcasts one input value per column. dy is first transposed to position-major order
(dyt[n][g][p][channel], channels zero-padded to whole tiles), so those vectors are dense.
Only the convolution's own positions are visited: there are no row ends to mask, and no
lane sums at the end (each lane is one weight). Small images, where weight_grad_gemm's rows
are one or two vectors, are where this wins.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import programs
from ..capabilities import of_info
from ..limits import allocation_problem
from ..problem import INT32_LIMIT
from .base import (BATCH, Algorithm, Blocks, Buffer, Param, acc_itemsize, build_step,
                   channel_blocks, even_split, fitting_work_group, round_up, scratch_buffer)
from .direct import VECTOR_WIDTHS, geometry, gradient_row_lanes, row_width
from .implicit_gemm import (MAX_TILE_CHANNELS, Grid, grid, grid_problem, staging_launcher,
                            tile_registers)
from .weight_grad_gemm import (COLUMNS_PARAM, SHARE_PARAMS, columns, splits_launcher,
                               tile_size_problem, want_splits)


@dataclass(frozen=True)
class ChannelLayout:
    """x on `grid`, taps at `tap_offsets`; dy transposed to `padded` channels per group (a
    whole number of tv x tw tiles) at each of its `positions` per image."""
    grid: Grid
    tap_offsets: tuple
    positions: int
    padded: int
    idx_t: str

    def dyt_elements(self, batch, groups):
        return batch * groups * self.positions * self.padded


def channel_layout(problem, tile, idx_t=None) -> ChannelLayout:
    layout = grid(problem, 1, idx_t)
    positions = problem.out_height * problem.out_width
    padded = round_up(problem.cout_per_group, tile)
    largest = max(layout.elements(problem.batch, problem.in_channels),
                  problem.batch * problem.groups * positions * padded)
    idx_t = idx_t or ("long" if largest > INT32_LIMIT else layout.idx_t)
    return ChannelLayout(layout, layout.tap_offsets, positions, padded, idx_t)


class WeightGradChannels(Algorithm):
    operation = "weight_grad"
    name = "weight_grad_channels"
    template = "weight_grad_channels.cl.mako"
    templates = ("weight_grad_channels.cl.mako", "stage.cl.mako", "sum_splits.cl.mako")
    kernel_name = "weight_grad_channels"
    params = (
        Param("tv", (1, 2, 3, 4), "vectors of output channels per work-item"),
        Param("tw", VECTOR_WIDTHS[1:], "output channels per vector"),
        COLUMNS_PARAM,
    ) + SHARE_PARAMS

    def preferred(self, problem):
        # Measured against weight_grad_gemm (PoCL, AVX2): 1.2-3x faster up to 28 columns
        # (ResNet-50's 28, 14 and 7; ResNeXt's grouped 28), 1.1-3x slower from 56 on, and
        # far slower with fewer channels per group than a vector (depthwise).
        lanes = gradient_row_lanes(problem)
        return problem.out_width < 4 * lanes and problem.cout_per_group >= lanes

    def constraints(self, problem, info, config):
        tv, tw, tn = config["tv"], config["tw"], config["tn"]
        if tv not in self.param("tv").values:
            return f"tv must be one of {self.param('tv').values}"
        reason = tile_size_problem(problem, info, config, tv * tn, tw, "tv*tn*tw",
                                   tile_registers(problem, of_info(info), tn, tv, tw))
        if reason:
            return reason
        layout = channel_layout(problem, tv * tw)
        nbytes = layout.dyt_elements(problem.batch, problem.groups) * acc_itemsize(problem.dtype)
        return (grid_problem("staged input", layout.grid, problem, problem.in_channels, info)
                or allocation_problem("transposed grad_output", nbytes, info))

    def default_config(self, problem, info):
        n = columns(problem)
        if info.is_cpu:
            # The forward's tile turned around: the hardware vector of channels (16 floats
            # on AVX-512 ran 1.18x faster than 2 x 8 there), two of them where there are
            # enough channels, and as many columns as the registers hold beside their sums
            # (2 x 8 x 6 on AVX2).
            caps = of_info(info)
            tw = row_width(problem, info, 16)
            tv = 2 if problem.cout_per_group >= 2 * tw else 1
            most = max((tn for tn in range(1, MAX_TILE_CHANNELS + 1)
                        if tile_registers(problem, caps, tn, tv, tw) <= caps.vector_registers),
                       default=1)
            tn = even_split(n, min(n, most))
            local = (1, 1)
        else:
            tw, tv, tn = row_width(problem, info, 4), 1, even_split(n, min(n, 4))
            local = fitting_work_group((16, 1), info)
        blocks = channel_blocks(problem, tv * tw)[1]
        layout = channel_layout(problem, tv * tw)
        operand_bytes = (layout.grid.elements(problem.batch, problem.in_channels)
                         * problem.numpy_dtype.itemsize
                         + layout.dyt_elements(problem.batch, problem.groups)
                         * acc_itemsize(problem.dtype))
        splits = want_splits(problem, info, Blocks(n, tn).count * blocks, operand_bytes)
        return {"tv": tv, "tw": tw, "tn": tn, "splits": splits, "lx": local[0],
                "ly": local[1]}

    def constants(self, problem, config):
        storage_t, acc_t = programs.c_types(problem.dtype)
        tile = config["tv"] * config["tw"]
        layout = channel_layout(problem, tile, config.get("idx_t"))
        return dict(geometry(problem, config), idx_t=layout.idx_t, layout=layout,
                    tv=config["tv"], tw=config["tw"], tn=config["tn"],
                    splits=config["splits"],
                    out_t=acc_t if config["splits"] > 1 else storage_t,
                    channel_blocks=channel_blocks(problem, tile)[0],
                    column_blocks=Blocks(columns(problem), config["tn"]))

    def main_args(self, problem, constants):
        return (Buffer("x"), Buffer("dyt", "acc_t"),
                Buffer("dw", "out_t", const=False), BATCH)

    def ranges(self, problem, config):
        tile = config["tv"] * config["tw"]
        items = (Blocks(columns(problem), config["tn"]).count,
                 channel_blocks(problem, tile)[1],
                 config["splits"])
        return items, (config["lx"], config["ly"], 1)

    def launcher(self, problem, queue, config, strict, constants):
        main = super().launcher(problem, queue, config, strict,
                                dict(constants, entry=self.kernel_name))
        layout = constants["layout"]
        transpose = build_step(queue, self.template, "transpose_dy",
                               dict(constants, entry="transpose_dy"),
                               (Buffer("dy"), Buffer("dyt", "acc_t", const=False), BATCH),
                               lambda batch: (layout.positions, batch * problem.groups))
        itemsize = acc_itemsize(problem.dtype)

        def run(queue, inputs, output, batch, wait_for):
            dyt = scratch_buffer(queue, "dyt", layout.dyt_elements(batch, problem.groups),
                                 itemsize)
            first = transpose(queue, batch, *inputs[1], dyt, 0, batch, wait_for=wait_for)
            return [first] + main(queue, [inputs[0], (dyt, 0)], output, batch, [first])
        staged = staging_launcher(problem, queue, layout.grid, run)
        return splits_launcher(problem, queue, config["splits"], staged)
