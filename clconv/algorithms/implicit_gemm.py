"""Implicit GEMM for any convolution: channels x positions register tiles read densely from a
staged grid (the padded input, split into the stride's phases when there is a stride)."""
from __future__ import annotations

import math

from ..problem import INT32_LIMIT
from .base import (Algorithm, Param, build_step, even_split, fitting_work_group, index_type,
                   operands, pow2_at_most, round_up, scratch_buffer, work_group_problem)
from .direct import VECTOR_WIDTHS, geometry, tile_problem, widest_tw

# On a CPU the micro-kernel's tk * tv accumulator vectors, tv input vectors and one broadcast
# weight live in vector registers: 16 on x86-64 with AVX2 (PoCL's target here), and beyond
# that they spill (measured: 8 x 2 tiles ran at half the speed of 6 x 2).
CPU_VECTOR_REGISTERS = 16
# One image's read grid beyond this (a few times a CPU core's L2) gets taller work-groups.
LARGE_IMAGE_BYTES = 4 << 20


# The register tile of a GEMM micro-kernel and its work-group: tk output channels x tv vectors
# of tw positions per work-item (shared with Winograd's GEMM).
REGISTER_TILE_PARAMS = (
    Param("tk", tuple(range(1, 13)), "output channels per work-item"),
    Param("tv", (1, 2, 3, 4), "vectors of positions per work-item"),
    Param("tw", VECTOR_WIDTHS[1:], "positions per vector"),
    Param("lx", (1, 2, 4, 8, 16, 32), "work-group size along position tiles"),
    Param("ly", (1, 2, 4, 8), "work-group size along output-channel blocks"),
)


class ImplicitGemm(Algorithm):
    name = "implicit_gemm"
    template = "implicit_gemm.cl.mako"
    kernel_name = "implicit_gemm"
    params = REGISTER_TILE_PARAMS + (Param("ukw", (0, 1), "unroll the kernel-column loop"),)

    def preferred(self, problem):
        # One input channel per group (depthwise) leaves one FMA per loaded input vector
        # and channel: the depthwise kernel, with no staging pass, is faster there.
        return problem.cin_per_group > 1

    def constraints(self, problem, info, config):
        return (register_tile_problem(problem, info, config)
                or self.staging_problem(problem, info, config))

    @staticmethod
    def staging_problem(problem, info, config):
        """Why the staged grid cannot be allocated (or None)."""
        if staged(problem):
            size = staged_elements(problem, config, problem.batch) * problem.numpy_dtype.itemsize
            if size > info.max_mem_alloc_size:
                return (f"the staged input ({size} bytes) exceeds the device's largest "
                        f"allocation ({info.max_mem_alloc_size} bytes)")
        return None

    def default_config(self, problem, info):
        # 8 channel blocks per work-group once an image's grid is far beyond L2 (vgg's
        # 64 x 226 x 226: 172 against 145 GFLOP/s), else 4.
        image_bytes = staged_elements(problem, None, 1) * problem.numpy_dtype.itemsize
        return dict(register_tile_default(problem, info, positions(problem),
                                          8 if image_bytes > LARGE_IMAGE_BYTES else 4), ukw=0)

    def constants(self, problem, config):
        return dict(self.grid_constants(problem, config), phases=phases(problem),
                    tk=config["tk"], tv=config["tv"], tw=config["tw"],
                    unroll_kw=bool(config.get("ukw", 0)))

    @staticmethod
    def grid_constants(problem, config):
        """The template constants of a GEMM that reads the grid."""
        rows, cols = grid(problem, config)
        idx_t = config.get("idx_t") or (
            "long" if staged_elements(problem, config, problem.batch) > INT32_LIMIT
            else index_type(problem))
        return dict(geometry(problem, config), idx_t=idx_t, has_bias=problem.has_bias,
                    rows=rows, cols=cols, activation=None, has_residual=False)

    def ranges(self, problem, config):
        tiles = -(-positions(problem) // (config["tv"] * config["tw"]))
        blocks = problem.groups * -(-problem.cout_per_group // config["tk"])
        return (tiles, blocks, problem.batch), (config["lx"], config["ly"], 1)

    def launcher(self, problem, queue, config, strict, epilogue):
        main = super().launcher(problem, queue, config, strict, epilogue)
        if not staged(problem):
            return main
        rows, cols = grid(problem, config)
        row_phases, col_phases = phases(problem)
        pt, _, pl, _ = problem.pad
        stage = build_step(
            queue, "stage.cl.mako", "stage",
            dict(dtype=problem.dtype, idx_t=self.constants(problem, config)["idx_t"],
                 rows=grid(problem)[0], rows_total=rows, cols=cols, stride=problem.stride,
                 phases=(row_phases, col_phases), pad_top=pt, pad_left=pl,
                 height=problem.height, width=problem.width, channels=problem.in_channels,
                 padding_mode=problem.padding_mode),
            operands(2) + ("int",),
            lambda batch: (row_phases * rows, batch * problem.in_channels))
        itemsize = problem.numpy_dtype.itemsize

        def run(queue, inputs, output, batch, wait_for):
            scratch = scratch_buffer(queue, staged_elements(problem, config, batch), itemsize)
            first = stage(queue, batch, *inputs[0], scratch, 0, batch, wait_for=wait_for)
            return [first] + main(queue, [(scratch, 0)] + list(inputs[1:]), output, batch,
                                  [first])
        return run


def register_tile_problem(problem, info, config):
    """Why a GEMM register tile config is invalid for problem on the device (or None)."""
    if config["tv"] not in REGISTER_TILE_PARAMS[1].values:
        return f"tv must be one of {REGISTER_TILE_PARAMS[1].values}"
    in_registers = config["tk"] * config["tv"] + config["tv"] + 1
    if info.is_cpu and in_registers > CPU_VECTOR_REGISTERS:
        return (f"tk*tv + tv + 1 = {in_registers} vectors exceed the "
                f"{CPU_VECTOR_REGISTERS} vector registers of a CPU")
    return (tile_problem(problem, config, "tk", problem.cout_per_group,
                         "the output channels per group")
            or work_group_problem((config["lx"], config["ly"], 1), info))


def register_tile_default(problem, info, positions, most_ly):
    """The heuristic register tile and work-group of a GEMM over positions, with up to
    most_ly channel blocks per work-group on a CPU."""
    if info.is_cpu:
        # The 6 x 16 AVX2 micro-kernel (measured: ~190 GFLOP/s of a 234 peak on a 1x1
        # layer); one vector when two would pad the positions by 10% more (512@7: 61
        # positions in 4 tiles of 16 ran 1.3x faster than in 8 of 8).
        tw = min(8, widest_tw(problem))
        tv = 2 if round_up(positions, 2 * tw) <= 1.1 * round_up(positions, tw) else 1
        tk = even_split(problem.cout_per_group, 6)
        # A work-group of several channel blocks on one position tile shares the tile's
        # inputs in the core's caches and is one PoCL work-group launch instead of
        # several (measured: 1.2-3x over single work-items).
        blocks = problem.groups * -(-problem.cout_per_group // tk)
        local = (1, min(most_ly, pow2_at_most(blocks)))
    else:
        tw, tv = min(4, widest_tw(problem)), 1
        tk = even_split(problem.cout_per_group, 4)
        local = fitting_work_group((min(32, pow2_at_most(-(-positions // tw))), 1), info)
    return {"tk": tk, "tv": tv, "tw": tw, "lx": local[0], "ly": local[1]}


def phases(problem):
    """(row phases, column phases) of the staged grid. A strided convolution's taps read the
    padded input at oh * s + k * d: split into s phases (padded rows a, a + s, a + 2s, ...),
    each tap reads one phase at a constant offset, as in a stride-1 convolution. Only phase 0
    is staged when every tap reads it (a 1x1 kernel, or a dilation that is a multiple of the
    stride): then staging just samples the strided positions."""
    def along(k, d, s):
        return s if any(i * d % s for i in range(k)) else 1
    (kh, kw), (dh, dw), (sh, sw) = problem.kernel_size, problem.dilation, problem.stride
    return along(kh, dh, sh), along(kw, dw, sw)


def grid(problem, config=None):
    """(rows, cols) of one phase plane of the grid the GEMM reads: the padded input's phase
    for a staged convolution (the padded input itself at stride 1), the input when there is
    nothing to stage. Given a config, rows include the zero rows a staged grid gets so that
    the last tile's farthest tap is inside it."""
    if not staged(problem):
        return problem.height, problem.width
    (kh, kw), (dh, dw), (sh, sw) = problem.kernel_size, problem.dilation, problem.stride
    rows = problem.out_height + (kh - 1) * dh // sh
    cols = problem.out_width + (kw - 1) * dw // sw
    if config is not None:
        tile = config["nwg"] if "nwg" in config else config["tv"] * config["tw"]
        farthest = (round_up(positions(problem), tile) + (kh - 1) * dh // sh * cols
                    + (kw - 1) * dw // sw)
        rows = max(rows, -(-farthest // cols))
    return rows, cols


def staged_elements(problem, config, batch):
    """Elements of the staged input of batch images (config None: without the slack rows)."""
    rows, cols = grid(problem, config)
    return batch * problem.in_channels * math.prod(phases(problem)) * rows * cols


def staged(problem):
    """Whether the input must be copied onto the grid first (else the GEMM reads it)."""
    return any(problem.pad) or problem.stride != (1, 1)


def positions(problem):
    """Grid positions up to the last output."""
    cols = grid(problem)[1]
    return (problem.out_height - 1) * cols + problem.out_width
