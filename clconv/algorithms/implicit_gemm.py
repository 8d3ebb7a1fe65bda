"""Implicit GEMM for any convolution: channels x positions register tiles read densely from a
staged grid (the padded input, split into the stride's phases when there is a stride).

The grid's layout (Grid) is computed here once: the templates (implicit_gemm, tiled_gemm,
stage) only emit code from it, and it sizes the staged buffer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..capabilities import of_info
from ..limits import allocation_problem
from ..problem import INT32_LIMIT
from .base import (BATCH, Algorithm, Buffer, Param, build_step, channel_blocks,
                   channels_per_group, even_split,
                   fitting_work_group, index_type, param_named, pow2_at_most, round_up,
                   with_prepared_operand, work_group_problem)
from .direct import UNROLL_KW, VECTOR_WIDTHS, geometry, row_width, tile_problem

# Channels per CPU work-item at most: each reads its own weight row, and more rows than
# this ran slower however many registers there were (measured on PoCL 3.1's AVX-512 code on
# a Zen 4, 32 registers: 14 x 2 x 8 tiles 1.1-2.7x slower than 6 x 2 x 8 and 8 x 1 x 16).
MAX_TILE_CHANNELS = 8
# One image's read grid beyond this (a few times a CPU core's L2) gets taller work-groups.
LARGE_IMAGE_BYTES = 4 << 20
# The heuristic packs a 1x1 input (pack=1) from this many output channels per group: each
# packed value then feeds that many FMAs, so the extra pass stays a few % of the GEMM, which
# reads contiguous tiles 10-50% faster (measured on a Zen 4, PoCL 3.0's AVX2 code: 2048->512
# @7 1.21 -> 0.79 ms, 64->256 @56 0.79 -> 0.71; 256->64 @56 0.53 -> 0.59 ms). Only where a
# tile's run of one channel plane fits one cache line, as there: runs of two lines (an Intel
# Xeon's 2 x 16 floats) stream well unpacked, and the pass cost 0-3% from 256 input
# channels, 10-20% below (64->256 @56 0.65 -> 0.75 ms, 96->576 @14 0.18 -> 0.21, wall clock).
PACK_MIN_CHANNELS = 256


# The register tile of a GEMM micro-kernel and its work-group: tk output channels x tv vectors
# of tw positions per work-item (shared with Winograd's GEMM).
def register_tile_params(channels="tk", what="output channels"):
    """The Params of a GEMM register tile whose channels (M) are `what`."""
    return (
        Param(channels, tuple(range(1, 17)), f"{what} per work-item"),
        Param("tv", (1, 2, 3, 4), "vectors of positions per work-item"),
        Param("tw", VECTOR_WIDTHS[1:], "positions per vector"),
        Param("lx", (1, 2, 4, 8, 16, 32), "work-group size along position tiles"),
        Param("ly", (1, 2, 4, 8), f"work-group size along {what[:-1]} blocks"),
    )


REGISTER_TILE_PARAMS = register_tile_params()
TV_VALUES = param_named(REGISTER_TILE_PARAMS, "tv").values


@dataclass(frozen=True)
class Grid:
    """Where the implicit GEMMs read, for output tiles of `tile` grid positions.

    The staged grid is the padded input, split along each dimension into `phases` (the
    stride's, or just phase 0 when every tap reads it): then each kernel tap reads one phase
    plane at a constant offset, as in a stride-1 convolution. Each plane has `rows` x `cols`
    values: `used_rows` rows from the input, then zero rows so that the last tile's farthest
    tap reads inside it. Unstaged (no padding, no stride), the grid is the input itself.
    Output (oh, ow) sits at grid position oh * cols + ow."""
    staged: bool
    phases: tuple           # (row phases, column phases)
    used_rows: int
    rows: int
    cols: int
    positions: int          # grid positions up to the last output
    reach: int              # the farthest tap's offset from a position
    tap_rows: tuple         # the offset of each kernel row's taps (phase plane included)
    tap_cols: tuple         # ... and of each kernel column's
    tile: int
    idx_t: str

    @property
    def plane(self):
        return self.rows * self.cols

    @property
    def tiles(self):
        return -(-self.positions // self.tile)

    @property
    def tabled_cols(self):
        """Whether the column taps' offsets are not a multiple of the column (phases): the
        kernel then looks each one up in a table."""
        step = self.tap_cols[1] if len(self.tap_cols) > 1 else 0
        return self.tap_cols != tuple(j * step for j in range(len(self.tap_cols)))

    @property
    def tap_offsets(self):
        """Each tap's offset from a position, per kh * KW + kw."""
        return tuple(r + c for r in self.tap_rows for c in self.tap_cols)

    @property
    def channel_stride(self):
        """Elements of one channel's phase planes."""
        return math.prod(self.phases) * self.plane

    def elements(self, batch, channels):
        """Elements of the grid of batch images of channels channels."""
        return batch * channels * self.channel_stride


def staged(problem):
    """Whether the input must be copied onto the grid first (else the GEMM reads it)."""
    return any(problem.pad) or problem.stride != (1, 1)


def phases(problem):
    """(row phases, column phases): the stride's along a dimension where some tap reads
    another phase than 0, else 1 (a 1x1 kernel, or a dilation that is a multiple of the
    stride: staging then just samples the strided positions)."""
    def along(k, d, s):
        return s if any(i * d % s for i in range(k)) else 1
    (kh, kw), (dh, dw), (sh, sw) = problem.kernel_size, problem.dilation, problem.stride
    return along(kh, dh, sh), along(kw, dw, sw)


def grid(problem, tile=1, idx_t=None, force_staged=False) -> Grid:
    """The Grid of problem for tiles of `tile` positions; idx_t forces the index type;
    force_staged stages an input that could be read in place (for its zero rows)."""
    (kh, kw), (dh, dw), (sh, sw) = problem.kernel_size, problem.dilation, problem.stride
    is_staged = force_staged or staged(problem)
    if is_staged:
        used_rows = problem.out_height + (kh - 1) * dh // sh
        cols = problem.out_width + (kw - 1) * dw // sw
        nph, npw = phases(problem)
    else:
        used_rows, cols, (nph, npw) = problem.height, problem.width, (1, 1)
    positions = (problem.out_height - 1) * cols + problem.out_width
    reach = (kh - 1) * dh // sh * cols + (kw - 1) * dw // sw
    rows = used_rows
    if is_staged:
        rows = max(rows, -(-(round_up(positions, tile) + reach) // cols))
    plane = rows * cols
    tap_rows = tuple((i * dh % sh * npw) * plane + i * dh // sh * cols for i in range(kh))
    tap_cols = tuple((j * dw % sw) * plane + j * dw // sw for j in range(kw))
    elements = problem.batch * problem.in_channels * nph * npw * plane
    idx_t = idx_t or ("long" if elements > INT32_LIMIT else index_type(problem))
    return Grid(is_staged, (nph, npw), used_rows, rows, cols, positions, reach, tap_rows,
                tap_cols, tile, idx_t)


def staging_problem(problem, info, tile):
    """Why the staged grid cannot be allocated (or None)."""
    return grid_problem("staged input", grid(problem, tile), problem, problem.in_channels,
                        info)


def grid_problem(what, layout, problem, channels, info):
    """Why layout's grid of problem.batch images of channels cannot be allocated on the
    device (None when it is not staged, or fits)."""
    if not layout.staged:
        return None
    nbytes = layout.elements(problem.batch, channels) * problem.numpy_dtype.itemsize
    return allocation_problem(what, nbytes, info)


@dataclass(frozen=True)
class Planes:
    """The images an operand holds, as a staging pass reads them: `channels` planes of
    `height` x `width` per image, padded by (pad_top, pad_left) under padding_mode and
    sampled at stride."""
    channels: int
    height: int
    width: int
    pad_top: int = 0
    pad_left: int = 0
    stride: tuple = (1, 1)
    padding_mode: str = "zeros"


def input_planes(problem):
    """The forward's input as its GEMMs stage it."""
    return Planes(problem.in_channels, problem.height, problem.width, problem.pad[0],
                  problem.pad[2], problem.stride, problem.padding_mode)


def output_planes(problem, pad_top=0, pad_left=0):
    """The output's gradient dy as the gradients' GEMMs stage it: shifted by (pad_top,
    pad_left) zero rows and columns."""
    return Planes(problem.out_channels, problem.out_height, problem.out_width, pad_top,
                  pad_left)


def staging_launcher(problem, queue, layout, main, planes=None, operand=0):
    """run(): stage inputs[operand] (planes: default the input) onto layout's grid (when
    staged), then main on it in its place."""
    if not layout.staged:
        return main
    planes = planes or input_planes(problem)
    stage = build_step(
        queue, "stage.cl.mako", "stage",
        dict(dtype=problem.dtype, idx_t=layout.idx_t, grid=layout, stride=planes.stride,
             pad_top=planes.pad_top, pad_left=planes.pad_left, height=planes.height,
             width=planes.width, channels=planes.channels, padding_mode=planes.padding_mode),
        (Buffer("x"), Buffer("xs", const=False), BATCH),
        lambda batch: (layout.phases[0] * layout.rows, batch * planes.channels))
    return with_prepared_operand(
        stage, main, operand, f"staged{operand}",
        lambda batch: layout.elements(batch, planes.channels), problem.numpy_dtype.itemsize,
        batched=True)


def packable(problem):
    """Whether pack=1 applies: a 1x1 kernel without padding (any stride)."""
    return problem.kernel_size == (1, 1) and not any(problem.pad)


def packing_problem(problem, info, tile):
    """Why pack=1 cannot run problem in tiles of `tile` positions on the device (or None)."""
    if not packable(problem):
        return "pack needs a 1x1 kernel without padding"
    nbytes = packed_elements(problem, grid(problem, tile), problem.batch) * \
        problem.numpy_dtype.itemsize
    return allocation_problem("packed input", nbytes, info)


def packed_grid(problem, tile, idx_t=None):
    """The Grid whose tiles pack=1 packs, its index type wide enough for the packed input."""
    layout = grid(problem, tile, idx_t)
    if idx_t is None and packed_elements(problem, layout, problem.batch) > INT32_LIMIT:
        layout = grid(problem, tile, "long")
    return layout


def packing_launcher(problem, queue, layout, main):
    """run(): pack the input by layout's position tiles (pack.cl.mako), then main on it."""
    channels, tiles, tile = problem.in_channels, layout.tiles, layout.tile
    pack = build_step(
        queue, "pack.cl.mako", "pack",
        dict(dtype=problem.dtype, idx_t=layout.idx_t, stride=problem.stride,
             height=problem.height,
             width=problem.width, h_out=problem.out_height, w_out=problem.out_width,
             channels=channels, tiles=tiles, T=tile),
        (Buffer("x"), Buffer("xp", const=False), BATCH),
        lambda batch: (tiles, batch * channels))
    return with_prepared_operand(
        pack, main, 0, "packed input", lambda batch: packed_elements(problem, layout, batch),
        problem.numpy_dtype.itemsize, batched=True)


def packed_elements(problem, layout, batch):
    """Elements of the packed input: every tile's values of every channel, per image."""
    return batch * layout.tiles * layout.tile * problem.in_channels


UNROLLED_TABLE_COLUMNS = 3     # the widest kernel whose tabled column taps are unrolled


class ImplicitGemm(Algorithm):
    name = "implicit_gemm"
    template = "implicit_gemm.cl.mako"
    templates = ("implicit_gemm.cl.mako", "stage.cl.mako", "pack.cl.mako")
    kernel_name = "implicit_gemm"
    params = REGISTER_TILE_PARAMS + (
        UNROLL_KW, Param("pack", (0, 1), "1x1 kernels: the input packed by position tiles"))

    def preferred(self, problem):
        # One input channel per group (depthwise) leaves one FMA per loaded input vector
        # and channel: the depthwise kernel, with no staging pass, is faster there.
        return problem.cin_per_group > 1

    def constraints(self, problem, info, config):
        tile = config["tv"] * config["tw"]
        return (register_tile_problem(problem, info, config)
                or (packing_problem if config.get("pack") else staging_problem)(
                    problem, info, tile))

    def default_config(self, problem, info):
        # 8 channel blocks per work-group once an image's grid is far beyond L2 (vgg's
        # 64 x 226 x 226: 172 against 145 GFLOP/s), else 4.
        layout = grid(problem)
        image_bytes = layout.elements(1, problem.in_channels) * problem.numpy_dtype.itemsize
        config = register_tile_default(problem, info, layout.positions,
                                       8 if image_bytes > LARGE_IMAGE_BYTES else 4)
        tile = config["tv"] * config["tw"]
        pack = (problem.cout_per_group >= PACK_MIN_CHANNELS
                and tile * problem.numpy_dtype.itemsize <= info.cacheline
                and packing_problem(problem, info, tile) is None)
        # Unrolled, a strided 3x3's column taps are constants instead of table look-ups:
        # on the Xeon 1.12-1.61x faster on 9 of 10 3x3 stride-2 layers of resnet50 and
        # mobilenet_v2 (batch 1 and 8; 3->32 @224 at batch 8: 0.93x); a 7x7's unrolled body
        # is slower (0.84-0.87x).
        ukw = layout.tabled_cols and problem.kernel_size[1] <= UNROLLED_TABLE_COLUMNS
        return dict(config, ukw=int(ukw), pack=int(pack))

    def constants(self, problem, config):
        packed = bool(config.get("pack", 0))
        layout = (packed_grid if packed else grid)(problem, config["tv"] * config["tw"],
                                                   config.get("idx_t"))
        return dict(geometry(problem, config), idx_t=layout.idx_t, grid=layout,
                    has_bias=problem.has_bias, tk=config["tk"], tv=config["tv"],
                    tw=config["tw"], unroll_kw=bool(config.get("ukw", 0)), packed=packed,
                    channel_blocks=channel_blocks(problem, config["tk"])[0])

    def ranges(self, problem, config):
        tiles = grid(problem, config["tv"] * config["tw"]).tiles
        blocks = channel_blocks(problem, config["tk"])[1]
        return (tiles, blocks, problem.batch), (config["lx"], config["ly"], 1)

    def launcher(self, problem, queue, config, strict, constants):
        main = super().launcher(problem, queue, config, strict, constants)
        if constants["packed"]:
            return packing_launcher(problem, queue, constants["grid"], main)
        return staging_launcher(problem, queue, constants["grid"], main)


def register_tile_problem(problem, info, config, channels="tk", of="cout"):
    """Why a GEMM register tile config is invalid for problem on the device (or None). Its
    channels (M) are config[channels] of the group's output channels (of="cout") or input
    channels (of="cin")."""
    if config["tv"] not in TV_VALUES:
        return f"tv must be one of {TV_VALUES}"
    what = "output" if of == "cout" else "input"
    reason = (tile_problem(problem, info, config, channels, channels_per_group(problem, of),
                           f"the {what} channels per group")
              or work_group_problem((config["lx"], config["ly"], 1), info))
    if reason or not info.is_cpu:
        return reason
    caps = of_info(info)
    in_registers = tile_registers(problem, caps, config[channels], config["tv"], config["tw"])
    if in_registers > caps.vector_registers:
        per_vector = caps.registers_per_vector(config["tw"], problem.dtype)
        return (f"({channels}*tv + tv) * {per_vector} + 1 = {in_registers} vector registers "
                f"exceed the device's {caps.vector_registers}")
    return None


def tile_registers(problem, caps, tk, tv, tw):
    """The CPU vector registers a GEMM micro-kernel takes: its tk * tv accumulator vectors,
    tv input vectors and one broadcast weight, beyond which they spill (measured on AVX2's
    16: 8 x 2 tiles ran at half the speed of 6 x 2). A tw wider than the hardware vector
    takes several registers."""
    return (tk * tv + tv) * caps.registers_per_vector(tw, problem.dtype) + 1


def register_tile_default(problem, info, positions, most_ly, channels="tk", of="cout"):
    """The heuristic register tile and work-group of a GEMM over positions, with up to
    most_ly channel blocks per work-group on a CPU (channels, of: as register_tile_problem)."""
    per_group = channels_per_group(problem, of)
    if info.is_cpu:
        # The hardware vector, two of them up to 16 positions, and beyond where its FMAs
        # run at full width: each loaded vector feeds tk FMAs, each broadcast weight tv, and
        # one vector left a full-width unit waiting on loads (Intel Xeon, AVX-512: 8 x 2 x 16
        # 1.1-1.4x faster than 8 x 1 x 16; on a Zen 4, which splits 512-bit FMAs, 8 x 1 x 16
        # ran 2-10% faster than 6 x 2 x 8). One vector when two would pad the positions by
        # 10% more (512@7's 61 positions in 4 tiles of 16 ran 1.3x faster than in 8 of 8).
        # As many channels as the registers hold beside two vectors' sums, inputs and a
        # broadcast weight, up to MAX_TILE_CHANNELS: 6 x 2 x 8 on AVX2's 16 registers
        # (~190 GFLOP/s of a 234 peak on a 1x1 layer), 8 x 2 x 16 or 8 x 1 x 16 on 32.
        caps = of_info(info)
        tw = row_width(problem, info, 16)
        tv = 2 if ((2 * tw <= 16 or caps.full_width_fma) and round_up(positions, 2 * tw)
                   <= 1.1 * round_up(positions, tw)) else 1
        most = max((tk for tk in range(1, MAX_TILE_CHANNELS + 1)
                    if tile_registers(problem, caps, tk, 2, tw) <= caps.vector_registers),
                   default=1)
        tk = even_split(per_group, most)
        # A work-group of several channel blocks on one position tile shares the tile's
        # inputs in the core's caches and is one PoCL work-group launch instead of
        # several (measured: 1.2-3x over single work-items).
        local = (1, min(most_ly, pow2_at_most(channel_blocks(problem, tk, of)[1])))
    else:
        tw, tv = row_width(problem, info, 4), 1
        tk = even_split(per_group, 4)
        local = fitting_work_group((min(32, pow2_at_most(-(-positions // tw))), 1), info)
    return {channels: tk, "tv": tv, "tw": tw, "lx": local[0], "ly": local[1]}
