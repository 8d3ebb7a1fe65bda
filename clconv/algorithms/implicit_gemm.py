"""Implicit GEMM for stride-1 and 1x1 convolutions: channels x positions register tiles read
densely from a staged grid (the padded input, or a 1x1 convolution's strided samples)."""
from __future__ import annotations

from ..problem import INT32_LIMIT
from .base import (Algorithm, Param, build_step, fitting_work_group, index_type, operands,
                   round_up, scratch_buffer, work_group_problem)
from .direct import VECTOR_WIDTHS, geometry, tile_problem, widest_tw

# On a CPU the micro-kernel's tk * tv accumulator vectors, tv input vectors and one broadcast
# weight live in vector registers: 16 on x86-64 with AVX2 (PoCL's target here), and beyond
# that they spill (measured: 8 x 2 tiles ran at half the speed of 6 x 2).
CPU_VECTOR_REGISTERS = 16


class ImplicitGemm(Algorithm):
    name = "implicit_gemm"
    template = "implicit_gemm.cl.mako"
    kernel_name = "implicit_gemm"
    params = (
        Param("tk", tuple(range(1, 13)), "output channels per work-item"),
        Param("tv", (1, 2, 3, 4), "vectors of grid positions per work-item"),
        Param("tw", VECTOR_WIDTHS[1:], "grid positions per vector"),
        Param("lx", (1, 2, 4, 8, 16, 32), "work-group size along position tiles"),
        Param("ly", (1, 2, 4, 8), "work-group size along output-channel blocks"),
        Param("ukw", (0, 1), "unroll the kernel-column loop"),
    )

    def applies(self, problem):
        return problem.stride == (1, 1) or problem.kernel_size == (1, 1)

    def preferred(self, problem):
        # One input channel per group (depthwise) leaves one FMA per loaded input vector
        # and channel: the direct kernel, with no staging pass, was faster there.
        return self.applies(problem) and problem.cin_per_group > 1

    def constraints(self, problem, info, config):
        if not self.applies(problem):
            return "needs stride 1 or a 1x1 kernel"
        if config["tv"] not in self.params[1].values:
            return f"tv must be one of {self.params[1].values}"
        if staged(problem):
            size = staged_elements(problem, config, problem.batch) * problem.numpy_dtype.itemsize
            if size > info.max_mem_alloc_size:
                return (f"the staged input ({size} bytes) exceeds the device's largest "
                        f"allocation ({info.max_mem_alloc_size} bytes)")
        in_registers = config["tk"] * config["tv"] + config["tv"] + 1
        if info.is_cpu and in_registers > CPU_VECTOR_REGISTERS:
            return (f"tk*tv + tv + 1 = {in_registers} vectors exceed the "
                    f"{CPU_VECTOR_REGISTERS} vector registers of a CPU")
        return (tile_problem(problem, config, "tk", problem.cout_per_group,
                             "the output channels per group")
                or work_group_problem((config["lx"], config["ly"], 1), info))

    def default_config(self, problem, info):
        positions = _positions(problem)
        if info.is_cpu:
            # The 6 x 16 AVX2 micro-kernel (measured: ~190 GFLOP/s of a 234 peak on a 1x1
            # layer); fewer vectors when the grid is small.
            tw = min(8, widest_tw(problem))
            tv = max(1, min(2, positions // (4 * tw)))
            most_k, local = 6, (1, 1)
        else:
            tw, tv, most_k = min(4, widest_tw(problem)), 1, 4
            local = fitting_work_group(
                (min(32, 1 << (max(1, -(-positions // tw)).bit_length() - 1)), 1), info)
        blocks = -(-problem.cout_per_group // most_k)
        tk = -(-problem.cout_per_group // blocks)
        return {"tk": tk, "tv": tv, "tw": tw, "lx": local[0], "ly": local[1], "ukw": 0}

    def constants(self, problem, config):
        rows, cols = grid(problem, config)[:2]
        idx_t = config.get("idx_t") or (
            "long" if staged_elements(problem, config, problem.batch) > INT32_LIMIT
            else index_type(problem))
        return dict(geometry(problem, config), idx_t=idx_t, has_bias=problem.has_bias,
                    rows=rows, cols=cols, tk=config["tk"], tv=config["tv"], tw=config["tw"],
                    unroll_kw=bool(config.get("ukw", 0)), activation=None, has_residual=False)

    def ranges(self, problem, config):
        tiles = -(-_positions(problem) // (config["tv"] * config["tw"]))
        blocks = problem.groups * -(-problem.cout_per_group // config["tk"])
        return (tiles, blocks, problem.batch), (config["lx"], config["ly"], 1)

    def launcher(self, problem, queue, config, strict, epilogue):
        main = super().launcher(problem, queue, config, strict, epilogue)
        if not staged(problem):
            return main
        rows, cols, step = grid(problem, config)
        pt, _, pl, _ = problem.pad
        stage = build_step(
            queue, "stage.cl.mako", "stage",
            dict(dtype=problem.dtype, idx_t=self.constants(problem, config)["idx_t"],
                 rows=grid(problem)[0], rows_total=rows, cols=cols, step=step, pad_top=pt,
                 pad_left=pl, height=problem.height, width=problem.width,
                 channels=problem.in_channels, padding_mode=problem.padding_mode),
            operands(2) + ("int",), lambda batch: (rows, batch * problem.in_channels))
        itemsize = problem.numpy_dtype.itemsize

        def run(queue, inputs, output, batch, wait_for):
            scratch = scratch_buffer(queue, staged_elements(problem, config, batch), itemsize)
            first = stage(queue, batch, *inputs[0], scratch, 0, batch, wait_for=wait_for)
            return [first] + main(queue, [(scratch, 0)] + list(inputs[1:]), output, batch,
                                  [first])
        return run


def grid(problem, config=None):
    """(rows, cols, step) of the grid the GEMM reads: the padded input for a stride-1
    convolution, the sampled positions for a strided 1x1 one. Given a config, rows include
    the zero rows a staged grid gets so that the last tile's farthest tap is inside it."""
    pt, pb, pl, pr = problem.pad
    if problem.kernel_size == (1, 1):
        rows, cols, step = problem.out_height, problem.out_width, problem.stride
    else:
        rows, cols, step = problem.height + pt + pb, problem.width + pl + pr, (1, 1)
    if config is not None and staged(problem):
        kh, kw = problem.kernel_size
        dh, dw = problem.dilation
        tile = config["tv"] * config["tw"]
        farthest = round_up(_positions(problem), tile) + (kh - 1) * dh * cols + (kw - 1) * dw
        rows = max(rows, -(-farthest // cols))
    return rows, cols, step


def staged_elements(problem, config, batch):
    """Elements of the staged input of batch images."""
    rows, cols = grid(problem, config)[:2]
    return batch * problem.in_channels * rows * cols


def staged(problem):
    """Whether the input must be copied onto the grid first (else the GEMM reads it)."""
    return any(problem.pad) or problem.stride != (1, 1)


def _positions(problem):
    """Grid positions up to the last output."""
    cols = grid(problem)[1]
    return (problem.out_height - 1) * cols + problem.out_width
