"""The weight gradient as a GEMM: M = output channels per group x N = input channels per
group x taps x K = batch x output positions, read densely.

The input is read from the forward's staged grid (padding applied, a stride split into its
phases), where every tap is a constant offset from an output position; dy is read as it is.
Each work-item holds tk output channels x tn (input channel, tap) columns, each an
accumulator vector of tw output positions along one output row, and sums its share of the
batch x output rows (K is split into `splits` shares, added in a fixed order by sum_splits:
results are deterministic). A row's last vector, when the row is not a whole number of
vectors, reads dy staged with zeros past the row's end, and x with those lanes cleared, so no
value outside the convolution's reads enters a sum (an inf there would make a NaN).
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import programs
from ..capabilities import of_info
from ..problem import INT32_LIMIT
from .base import (Algorithm, Blocks, Param, acc_itemsize, channel_blocks, even_split,
                   fitting_work_group, index_type, operation_args, summed_splits,
                   work_group_problem)
from .direct import (VECTOR_WIDTHS, geometry, gradient_row_lanes, row_width,
                     vector_width_problem)
from .implicit_gemm import (MAX_TILE_CHANNELS, Grid, grid, grid_problem, output_planes,
                            staging_launcher, tile_registers)

TILE_VALUES = tuple(range(1, 17))
SPLITS = (1, 2, 4, 8, 16, 32, 64, 128)
# The operands of one share of K the heuristic aims for on a CPU: about a core's L2.
SPLIT_BYTES = 2 << 20
# The weight gradients' columns per work-item, K shares and work-group.
COLUMNS_PARAM = Param("tn", TILE_VALUES, "(input channel, tap) columns per work-item")
SHARE_PARAMS = (
    Param("splits", SPLITS, "shares of the batch * output rows summed apart"),
    Param("lx", (1, 2, 4, 8, 16, 32), "work-group size along column blocks"),
    Param("ly", (1, 2, 4, 8), "work-group size along output-channel blocks"),
)


@dataclass(frozen=True)
class RowLayout:
    """Where one work-item reads: x on `grid`, taps at `tap_offsets` (per kh * KW + kw), dy
    on `dy_grid` (dy itself, or staged with zero columns up to whole vectors per row). Each
    output row is `full` whole vectors of tw, then, when `rem` > 0, one vector of `rem`
    valid lanes."""
    grid: Grid
    dy_grid: Grid
    tap_offsets: tuple
    full: int
    rem: int
    idx_t: str


def row_layout(problem, tw, idx_t=None) -> RowLayout:
    h_out, w_out = problem.out_height, problem.out_width
    full, rem = divmod(w_out, tw)
    vectors = full + (rem > 0)
    # A row's last vector reads up to (vectors * tw - w_out) values past the row: the grid's
    # zero rows keep the last row's reads inside it (staging an unstaged input for them).
    plain = grid(problem)
    tile = (h_out - 1) * plain.cols + vectors * tw
    over = tile + plain.reach > plain.plane
    layout = grid(problem, tile, idx_t, force_staged=bool(rem) and over)
    pitch = vectors * tw
    largest = max(layout.elements(problem.batch, problem.in_channels),
                  problem.batch * problem.out_channels * h_out * pitch)
    idx_t = idx_t or ("long" if largest > INT32_LIMIT else layout.idx_t)
    dy_grid = Grid(bool(rem), (1, 1), h_out, h_out, pitch, 0, 0, (), (), tw, idx_t)
    return RowLayout(layout, dy_grid, layout.tap_offsets, full, rem, idx_t)


def columns(problem):
    """N: the (input channel, tap) columns of a group's weight gradient."""
    return problem.cin_per_group * problem.kernel_size[0] * problem.kernel_size[1]


def tile_size_problem(problem, info, config, vectors, tw, what, registers):
    """Why a weight-gradient register tile is invalid on the device (or None): its vector
    width, its `vectors` accumulator vectors of tw against the register file, the
    `registers` vector registers it takes on a CPU, its columns, the K shares, the
    work-group."""
    if config["splits"] not in SPLITS:
        return f"splits must be one of {SPLITS}"
    if not 1 <= config["tn"] <= columns(problem):
        return "tn must be between 1 and the input channels per group x taps"
    reason = vector_width_problem(problem, info, tw)
    if reason:
        return reason
    caps = of_info(info)
    scalars = vectors * tw * acc_itemsize(problem.dtype) // 4
    if scalars > caps.accumulators():
        return (f"{what} accumulators ({scalars} scalar registers) exceed "
                f"{caps.accumulators()}, the device's register file")
    if info.is_cpu and registers > caps.vector_registers:
        return (f"the tile's {registers} vector registers exceed the device's "
                f"{caps.vector_registers}")
    return work_group_problem((config["lx"], config["ly"], 1), info)


def want_splits(problem, info, items, operand_bytes):
    """Shares of the batch * output rows (each over at least 16 rows): enough independent
    sums (items per share) to fill the device, and on a CPU, enough that a share's operands
    (of operand_bytes in all) stay within about a core's L2, while the partial sums stay
    small beside the operands (1x1 layers at batch 8: 1.1-1.3x faster with 8 shares)."""
    want = 16 * info.compute_units if info.is_cpu else 16 * 1024
    outputs = problem.out_channels * columns(problem) * acc_itemsize(problem.dtype)
    rows = problem.batch * problem.out_height

    def more(splits):
        if splits >= SPLITS[-1] or rows < 16 * splits:
            return False
        return items * splits < want or (info.is_cpu and operand_bytes > SPLIT_BYTES * splits
                                         and 2 * splits * outputs <= operand_bytes / 4)
    splits = 1
    while more(splits):
        splits *= 2
    return splits


class WeightGradGemm(Algorithm):
    operation = "weight_grad"
    name = "weight_grad_gemm"
    template = "weight_grad_gemm.cl.mako"
    templates = ("weight_grad_gemm.cl.mako", "stage.cl.mako", "sum_splits.cl.mako")
    kernel_name = "weight_grad_gemm"
    params = (
        Param("tk", TILE_VALUES, "output channels per work-item"),
        COLUMNS_PARAM,
        Param("tw", VECTOR_WIDTHS, "output positions per vector (along a row)"),
    ) + SHARE_PARAMS

    def constraints(self, problem, info, config):
        tk, tn, tw = config["tk"], config["tn"], config["tw"]
        if not 1 <= tk <= problem.cout_per_group:
            return "tk must be between 1 and the output channels per group"
        # The forward's micro-kernel with tk in the role of its vectors: tk dy vectors are
        # held while each of the tn x vectors meets them.
        layout = row_layout(problem, tw)
        return (tile_size_problem(problem, info, config, tk * tn, tw, "tk*tn*tw",
                                  tile_registers(problem, of_info(info), tn, tk, tw))
                or grid_problem("staged input", layout.grid, problem, problem.in_channels, info)
                or grid_problem("staged grad_output", layout.dy_grid, problem,
                                problem.out_channels, info))

    def default_config(self, problem, info):
        cout_g, n = problem.cout_per_group, columns(problem)
        # The narrowest vector that holds a row, else the widest, within the gradients'
        # rows (256 bits) and the hardware vector (7 columns: one 8-wide vector, its last lane
        # masked, ran faster than 4 + 3).
        lanes = row_width(problem, info, gradient_row_lanes(problem))
        widths = [w for w in of_info(info).widths_of(problem.dtype) if w <= lanes]
        tw = min((w for w in widths if w >= problem.out_width), default=max(widths))
        if info.is_cpu:
            # Two output channels, and as many columns as the registers hold beside their
            # sums and two dy vectors, up to MAX_TILE_CHANNELS (2 x 6 on AVX2's 16: measured
            # 1.0-1.35x faster than 3 x 4 and 1.3x faster than 1 x 12).
            caps = of_info(info)
            tk = min(cout_g, 2)
            tn = max((tn for tn in range(1, min(n, MAX_TILE_CHANNELS) + 1)
                      if tile_registers(problem, caps, tn, tk, tw) <= caps.vector_registers),
                     default=1)
            local = (1, 1)
        else:
            tk, tn = min(cout_g, 2), min(n, 4)
            local = fitting_work_group((16, 1), info)
        tk, tn = even_split(cout_g, tk), even_split(n, tn)
        layout = row_layout(problem, tw)
        operand_bytes = (layout.grid.elements(problem.batch, problem.in_channels)
                         + layout.dy_grid.elements(problem.batch, problem.out_channels)
                         ) * problem.numpy_dtype.itemsize
        splits = want_splits(problem, info, Blocks(n, tn).count * channel_blocks(problem, tk)[1],
                             operand_bytes)
        return {"tk": tk, "tn": tn, "tw": tw, "splits": splits, "lx": local[0],
                "ly": local[1]}

    def constants(self, problem, config):
        storage_t, acc_t = programs.c_types(problem.dtype)
        layout = row_layout(problem, config["tw"], config.get("idx_t"))
        return dict(geometry(problem, config), idx_t=layout.idx_t, layout=layout,
                    tk=config["tk"], tn=config["tn"], tw=config["tw"],
                    splits=config["splits"],
                    out_t=acc_t if config["splits"] > 1 else storage_t,
                    channel_blocks=channel_blocks(problem, config["tk"])[0],
                    column_blocks=Blocks(columns(problem), config["tn"]))

    def main_args(self, problem, constants):
        return operation_args(self.operation, problem, out_type="out_t")

    def ranges(self, problem, config):
        items = (Blocks(columns(problem), config["tn"]).count,
                 channel_blocks(problem, config["tk"])[1], config["splits"])
        return items, (config["lx"], config["ly"], 1)

    def launcher(self, problem, queue, config, strict, constants):
        main = super().launcher(problem, queue, config, strict, constants)
        layout = constants["layout"]
        staged = staging_launcher(problem, queue, layout.grid,
                                  staging_launcher(problem, queue, layout.dy_grid, main,
                                                   output_planes(problem), operand=1))
        return splits_launcher(problem, queue, config["splits"], staged)


def splits_launcher(problem, queue, splits, main):
    """run(): main, its split partial sums of the weight gradient added up (summed_splits)."""
    return summed_splits(queue, main, splits, problem.out_channels * columns(problem),
                         problem.dtype, index_type(problem))
