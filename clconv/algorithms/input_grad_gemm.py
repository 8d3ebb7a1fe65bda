"""The input gradient as implicit GEMMs, one per stride phase.

Input position q (padded coordinates) receives dy[(q - kh*DH) / SH] * w[kh] from the taps
whose kh*DH is congruent to q modulo SH. So the positions of one phase (q = a, a + SH, ...)
form a dense stride-1 correlation of dy with that phase's taps: a GEMM of M = input channels
per group x N = the phase's positions x K = output channels per group x the phase's taps,
with the forward's register tile (input channels x vectors of positions). dy is staged once
onto a zero-padded grid on which every tap of every phase reads at a constant offset; the
weight needs no new layout (each tap's weight is broadcast from w as it is, flipped by the
offsets alone). A phase without taps stores zeros.

The layout (PhaseGrid) is computed here once; the template only emits code from it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .. import programs
from ..arrays import WORD_TYPES
from ..capabilities import of_info
from ..problem import INT32_LIMIT
from .base import (Algorithm, Buffer, Param, build_step, channel_blocks, fitting_work_group,
                   index_type, operation_args, with_prepared_operand, with_scratch)
from .direct import UNROLL_KW, geometry
from .implicit_gemm import (TV_VALUES, Grid, grid_problem, output_planes,
                            register_tile_default, register_tile_params, register_tile_problem,
                            staging_launcher, tile_registers)

# Products per input position (output channels per group x a phase's taps) below which the
# heuristic gives a work-item more positions.
SMALL_SUM = 16
# The heuristic swaps the weight's channels (wt=1) from this many bytes of weight per group
# (below, the work-items' weights stay in the caches however far apart they lie) where the
# GEMM reads the weight at least TRANSPOSE_MIN_READS times (once per position tile and image):
# then the pass pays for itself. Measured on an Intel Xeon (AVX-512, PoCL 3.0), pass included:
# 512@7 b8 (16 reads) 16.6 -> 11.0 ms, 3x3 d2 512@28 b1 (28) 29.9 -> 22.0, 256@14 b8 (56)
# 9.8 -> 8.4; 512@7 b1 (2 reads) 1.96 -> 2.06, 1x1 1024->256 @14 b1 (7) 0.76 -> 1.05.
TRANSPOSE_MIN_BYTES = 256 << 10
TRANSPOSE_MIN_READS = 16
# The weight passes' blocks of channels a side (swap_channels.cl.mako).
SWAP_BLOCK = 8
WEIGHT_PASS_ARGS = (Buffer("w", "word_t", offset_t="long"),
                    Buffer("wt", "word_t", const=False, offset=False))


@dataclass(frozen=True)
class Phase:
    """The input positions a + SH*u, b + SW*v (target coordinates) of one stride phase:
    `rows` x `cols` of them, at grid positions u * grid cols + v. row_taps, col_taps: the
    (kernel row, grid offset) and (kernel column, grid offset) of the taps that reach them,
    each an arithmetic progression (so the kernel loops over them without tables)."""
    a: int
    b: int
    rows: int
    cols: int
    row_taps: tuple
    col_taps: tuple
    positions: int      # grid positions up to the phase's last one
    tile: int
    first_tile: int     # where its tiles start along the NDRange's first dimension

    @property
    def taps(self):
        return len(self.row_taps) * len(self.col_taps)

    @property
    def reach(self):
        """The farthest tap's offset."""
        if not self.taps:
            return 0
        return max(o for _, o in self.row_taps) + max(o for _, o in self.col_taps)

    @property
    def tiles(self):
        return -(-self.positions // self.tile)

    @property
    def row_steps(self):
        return progression(self.row_taps)

    @property
    def col_steps(self):
        return progression(self.col_taps)


def progression(taps):
    """(first kernel index, its step, first offset, its step) of one axis's taps: the
    taps of a phase step evenly along each axis (the kernel loops over them)."""
    if not taps:
        return (0, 0, 0, 0)
    (k0, o0), (k1, o1) = taps[0], taps[min(1, len(taps) - 1)]
    steps = (k0, k1 - k0, o0, o1 - o0)
    assert all(t == (k0 + i * steps[1], o0 + i * steps[3]) for i, t in enumerate(taps))
    return steps


def axis_taps(size, first, stride, dilation, kernel):
    """Along one dimension: per phase a (< stride) of `size` target positions whose first
    sits at padded coordinate `first`, (a, count, ((kernel index, dy offset), ...)): target
    a + stride*u reads dy at u + offset. Offsets may be negative."""
    phases = []
    for a in range(min(stride, size)):
        q = a + first
        taps = tuple((i, (q - i * dilation) // stride) for i in range(kernel)
                     if (q - i * dilation) % stride == 0)
        phases.append((a, -(-(size - a) // stride), taps))
    return phases


@dataclass(frozen=True)
class PhaseGrid:
    """The staged dy grid (`grid`: dy shifted by `lead` rows and columns, zero elsewhere)
    and the phases that read it."""
    grid: Grid
    lead: tuple         # (rows, columns) of zeros before dy's first
    phases: tuple

    @property
    def tiles(self):
        """Every phase's tiles, one after another."""
        return self.phases[-1].first_tile + self.phases[-1].tiles


def phase_grid(problem, tile, idx_t=None) -> PhaseGrid:
    rows_t, cols_t, row0, col0 = target(problem)
    (kh, kw), (sh, sw), (dh, dw) = problem.kernel_size, problem.stride, problem.dilation
    along_rows = axis_taps(rows_t, row0, sh, dh, kh)
    along_cols = axis_taps(cols_t, col0, sw, dw, kw)
    offsets = [[o for _, _, taps in along for _, o in taps] for along in (along_rows, along_cols)]
    lead = tuple(max(0, -min(o, default=0)) for o in offsets)
    reach_cols = [max((o for _, o in t), default=0) + lead[1] for _, _, t in along_cols]
    # Every tap of a phase's columns reads within the grid row of its position.
    cols = max(n + r for (_, n, _), r in zip(along_cols, reach_cols))
    unstaged = lead == (0, 0) and not any(offsets[0] + offsets[1]) and cols == problem.out_width
    phases = []
    for a, n_rows, r_taps in along_rows:
        for b, n_cols, c_taps in along_cols:
            first = phases[-1].first_tile + phases[-1].tiles if phases else 0
            phases.append(Phase(a, b, n_rows, n_cols,
                                tuple((i, (o + lead[0]) * cols) for i, o in r_taps),
                                tuple((j, o + lead[1]) for j, o in c_taps),
                                (n_rows - 1) * cols + n_cols, tile, first))
    if unstaged:
        rows = problem.out_height
    else:
        # Zero rows after dy so that the last tile of every phase reads whole vectors.
        ends = [p.tiles * tile + p.reach for p in phases if p.taps]
        rows = max([problem.out_height + lead[0]] + [-(-e // cols) for e in ends])
    elements = problem.batch * problem.out_channels * rows * cols
    idx_t = idx_t or ("long" if elements > INT32_LIMIT else index_type(padded(problem)))
    dy_grid = Grid(not unstaged, (1, 1), rows, rows, cols, 0, 0, (), (), tile, idx_t)
    return PhaseGrid(dy_grid, lead, tuple(phases))


class InputGradGemm(Algorithm):
    operation = "input_grad"
    name = "input_grad_gemm"
    template = "input_grad_gemm.cl.mako"
    templates = ("input_grad_gemm.cl.mako", "stage.cl.mako", "fold_padding.cl.mako",
                 "swap_channels.cl.mako")
    kernel_name = "input_grad_gemm"
    params = register_tile_params("tc", "input channels") + (
        UNROLL_KW, Param("wt", (0, 1), "the weight's channels swapped first (a pass over it)"))

    def constraints(self, problem, info, config):
        reason = register_tile_problem(problem, info, config, "tc", of="cin")
        if reason:
            return reason
        if config.get("wt") and not transposable(problem):
            return "wt=1 needs several input and output channels per group"
        return grid_problem("staged grad_output",
                            phase_grid(problem, config["tv"] * config["tw"]).grid, problem,
                            problem.out_channels, info)

    def default_config(self, problem, info):
        layout = phase_grid(problem, 1)
        positions = max(p.positions for p in layout.phases)
        taps = max(p.taps for p in layout.phases)
        if problem.cout_per_group * taps >= SMALL_SUM or not info.is_cpu:
            config = register_tile_default(problem, info, positions, 4, "tc", of="cin")
            reads = problem.batch * phase_grid(problem, config["tv"] * config["tw"]).tiles
            wt = (transposable(problem) and reads >= TRANSPOSE_MIN_READS
                  and weight_bytes(problem) // problem.groups >= TRANSPOSE_MIN_BYTES)
            return dict(config, ukw=0, wt=int(wt))
        # Few products per position (depthwise at stride 2: 1 to 4): the most positions
        # per work-item, and work-groups of 4 position tiles, to amortise their set-up
        # (measured on 144@56: 0.24-0.27 ms, against 0.30-0.50 with 2 vectors and 4 or 8
        # channel blocks per work-group).
        config = register_tile_default(problem, info, positions, 1, "tc", of="cin")
        caps = of_info(info)
        config["tv"] = max(tv for tv in TV_VALUES if tile_registers(
            problem, caps, config["tc"], tv, config["tw"]) <= caps.vector_registers)
        return dict(config, lx=fitting_work_group((4, 1), info)[0], ukw=0, wt=0)

    def constants(self, problem, config):
        tile = config["tv"] * config["tw"]
        layout = phase_grid(problem, tile, config.get("idx_t"))
        rows, cols = target(problem)[:2]
        storage_t, acc_t = programs.c_types(problem.dtype)
        return dict(geometry(problem, config), idx_t=layout.grid.idx_t, layout=layout,
                    rows=rows, cols=cols,
                    out_t=acc_t if problem.padding_mode != "zeros" else storage_t,
                    tc=config["tc"], tv=config["tv"], tw=config["tw"],
                    unroll_kw=bool(config.get("ukw", 0)),
                    transposed_weight=bool(config.get("wt", 0)),
                    channel_blocks=channel_blocks(problem, config["tc"], of="cin")[0])

    def main_args(self, problem, constants):
        return operation_args(self.operation, problem, out_type="out_t")

    def ranges(self, problem, config):
        tiles = phase_grid(problem, config["tv"] * config["tw"]).tiles
        blocks = channel_blocks(problem, config["tc"], of="cin")[1]
        return (tiles, blocks, problem.batch), (config["lx"], config["ly"], 1)

    def launcher(self, problem, queue, config, strict, constants):
        layout = constants["layout"]
        main = staging_launcher(problem, queue, layout.grid,
                                super().launcher(problem, queue, config, strict, constants),
                                output_planes(problem, *layout.lead))
        if constants["transposed_weight"]:
            main = transposing_launcher(problem, queue, main)
        return fold_launcher(problem, queue, constants, main)


def transposable(problem):
    """Whether swapping the weight's channels changes its layout (not with one channel a side
    per group)."""
    return problem.cin_per_group > 1 and problem.cout_per_group > 1


def weight_elements(problem):
    return math.prod(problem.weight_shape)


def weight_bytes(problem):
    return weight_elements(problem) * problem.numpy_dtype.itemsize


def transposing_launcher(problem, queue, main):
    """run(): swap each group's channels of the weight (swap_channels.cl.mako's
    transpose_weight) into scratch, then main on it."""
    return weight_pass_launcher(problem, queue, main, turn=False)


def weight_pass_launcher(problem, queue, main, turn, strict=True):
    """run(): swap_channels.cl.mako's pass over the weight, a work-item per block of
    SWAP_BLOCK x SWAP_BLOCK channels, into scratch; then main on that. turn: turn_weight (the
    taps reversed too, for a forward form), else transpose_weight."""
    kernel_name, role = (("turn_weight", "turned weight") if turn
                         else ("transpose_weight", "transposed weight"))
    cin_g, cout_g = problem.cin_per_group, problem.cout_per_group
    elements = weight_elements(problem)
    itemsize = problem.numpy_dtype.itemsize
    step = build_step(
        queue, "swap_channels.cl.mako", kernel_name,
        dict(function=kernel_name, reverse_taps=turn, block=SWAP_BLOCK,
             kernel_size=problem.kernel_size, cin_g=cin_g, cout_g=cout_g,
             groups=problem.groups, word_t=WORD_TYPES[itemsize],
             idx_t="long" if elements > INT32_LIMIT else "int"),
        WEIGHT_PASS_ARGS, lambda batch: (-(-cin_g // SWAP_BLOCK),
                                         problem.groups * -(-cout_g // SWAP_BLOCK)),
        strict=strict)
    return with_prepared_operand(step, main, 1, role, lambda batch: elements, itemsize)


def fold_launcher(problem, queue, constants, main):
    """run(): main as it is under 'zeros' padding; under the other modes, main computes the
    gradient of the whole padded plane (in acc_t scratch) and fold_padding adds it onto the
    input positions it was read from."""
    if problem.padding_mode == "zeros":
        return main
    fold = build_step(queue, "fold_padding.cl.mako", "fold_padding", constants,
                      (Buffer("dxp", "acc_t", offset=False), Buffer("dx", const=False)),
                      lambda batch: (problem.width, problem.height,
                                     batch * problem.in_channels))
    rows, cols = target(problem)[:2]
    return with_scratch(main, fold, lambda batch: batch * problem.in_channels * rows * cols,
                        problem.dtype, "padded dx")


def target(problem):
    """(rows, cols, first row, first column) of what the main kernel computes, in padded
    coordinates: the input itself under 'zeros' padding, else the whole padded plane."""
    pt, pb, pl, pr = problem.pad
    if problem.padding_mode == "zeros":
        return problem.height, problem.width, pt, pl
    return problem.height + pt + pb, problem.width + pl + pr, 0, 0


def padded(problem):
    """The problem with its input grown by the padding: what the padded plane indexes."""
    pt, pb, pl, pr = problem.pad
    return dataclasses.replace(problem, height=problem.height + pt + pb,
                               width=problem.width + pl + pr)
