"""Register-tiled direct convolution: any stride, dilation, padding mode and groups."""
from __future__ import annotations

from ..capabilities import WIDTHS, of_info
from .base import (Algorithm, Blocks, Param, acc_itemsize, channel_blocks, even_split,
                   fitting_work_group, index_type, pow2_at_most, work_group_problem)

# tw is one OpenCL vector: every width the capability probe may allow; a device takes those
# its compiler builds and runs correctly (PoCL's LLVM 14 crashes on 16-wide vectors where it
# targets AVX2). 3-wide ones crash Oclgrind 21.10's uninitialised-value check.
VECTOR_WIDTHS = WIDTHS
# Off by default: on PoCL (AVX2) unrolling kw turned overlapping row loads into shuffles and
# spills (~2x slower on 3x3 layers); other compilers may gain from it.
UNROLL_KW = Param("ukw", (0, 1), "unroll the kernel-column loop")


def work_group_params(along_x, along_y, along_z):
    """The lx, ly, lz parameters of a kernel with a 3-D NDRange (tiles, rows, channels)."""
    return (Param("lx", (1, 2, 4, 8, 16, 32), f"work-group size along {along_x}"),
            Param("ly", (1, 2, 4, 8, 16), f"work-group size along {along_y}"),
            Param("lz", (1, 2, 4, 8), f"work-group size along {along_z}"))


class Direct(Algorithm):
    name = "direct"
    template = "direct.cl.mako"
    kernel_name = "conv2d_direct"
    params = (
        Param("tk", tuple(range(1, 17)), "output channels per work-item"),
        Param("tw", VECTOR_WIDTHS, "output pixels per work-item along the row (one vector)"),
        *work_group_params("width tiles", "output rows", "output-channel blocks"),
        UNROLL_KW,
    )

    def constraints(self, problem, info, config):
        return (tile_problem(problem, info, config, "tk", problem.cout_per_group,
                             "the output channels per group")
                or work_group_problem((config["lx"], config["ly"], config["lz"]), info))

    def default_config(self, problem, info):
        w_out, cout_g = problem.out_width, problem.cout_per_group
        # Measured on PoCL (AVX2): 8-wide rows, except mid-sized rows where 4-wide tiles
        # leave more tiles on the fast interior path; small images want more channels per
        # work-item to reuse each input vector. (The implicit GEMM is the usual choice; this
        # fallback stays within 8 lanes and the device's vector.)
        tw = 4 if 8 < w_out < 28 else 8 if w_out >= 6 else 4 if w_out >= 3 else w_out
        tw = row_width(problem, info, tw)
        most_k = 16 if w_out < 28 else 8
        tk = even_split(cout_g, most_k)
        if info.is_cpu:
            # A work-group runs on one core; independent work-items are enough.
            local = (1, 1, 1)
        else:
            tw, tk = min(tw, 4), min(tk, 4)
            local = fitting_work_group((min(16, pow2_at_most(-(-w_out // tw))), 4, 1), info)
        return {"tk": tk, "tw": tw, "lx": local[0], "ly": local[1], "lz": local[2], "ukw": 0}

    def constants(self, problem, config):
        return dict(geometry(problem, config), has_bias=problem.has_bias, tk=config["tk"],
                    tw=config["tw"], unroll_kw=bool(config.get("ukw", 0)),
                    channel_blocks=channel_blocks(problem, config["tk"])[0],
                    column_tiles=Blocks(problem.out_width, config["tw"]))

    def ranges(self, problem, config):
        tiles = Blocks(problem.out_width, config["tw"]).count
        blocks = channel_blocks(problem, config["tk"])[1]
        items = (tiles, problem.batch * problem.out_height, blocks)
        return items, (config["lx"], config["ly"], config["lz"])


def tile_problem(problem, info, config, channels, most, what):
    """Why a register tile of config[channels] channels x tv (default 1) tw-wide vectors is
    invalid for problem on the device (or None): the widths its compiler handles, and the
    accumulator bound of its register file."""
    tw = config["tw"]
    reason = vector_width_problem(problem, info, tw)
    if reason:
        return reason
    if not 1 <= config[channels] <= most:
        return f"{channels} must be between 1 and {what}"
    # Accumulators in scalar registers of 4 bytes: a double takes two.
    scalars = config[channels] * config.get("tv", 1) * tw * acc_itemsize(problem.dtype) // 4
    bound = of_info(info).accumulators()
    if scalars > bound:
        return (f"{channels}*tv*tw accumulators ({scalars} scalar registers) exceed "
                f"{bound}, the device's register file")
    return None


def vector_width_problem(problem, info, tw):
    """Why tw-wide row vectors are invalid for problem on the device (or None): the widths its
    compiler builds and runs correctly (clconv.capabilities)."""
    widths = of_info(info).widths_of(problem.dtype)
    if tw not in widths:
        return (f"tw must be one of {widths} for {problem.dtype} on this device (the widths "
                "its compiler builds and runs correctly)")
    return None


def geometry(problem, config):
    """The template constants every convolution kernel is specialised on. idx_t may be
    forced to 'long' by the config (tests cover that variant on small problems)."""
    return dict(
        dtype=problem.dtype, idx_t=config.get("idx_t") or index_type(problem),
        kernel_size=problem.kernel_size, stride=problem.stride,
        dilation=problem.dilation, pad=problem.pad, padding_mode=problem.padding_mode,
        height=problem.height, width=problem.width,
        h_out=problem.out_height, w_out=problem.out_width,
        cin=problem.in_channels, cout=problem.out_channels, groups=problem.groups,
        cin_g=problem.cin_per_group, cout_g=problem.cout_per_group)


# The weight gradient's heuristic rows along positions stay within 256 bits of acc_t: on
# PoCL 3.1's AVX-512 code (Zen 4) 16 floats ran 1.6-2x slower with the release's gradient
# kernels, and weight_grad_gemm's 6% slower, where the forward GEMM gained from them.
GRADIENT_ROW_BYTES = 32


def gradient_row_lanes(problem):
    return GRADIENT_ROW_BYTES // acc_itemsize(problem.dtype)


def row_width(problem, info, most):
    """The heuristics' row vector: the widest the device allows up to its hardware vector
    and up to most."""
    return of_info(info).row_width(problem.dtype, most)
