"""Local-memory tiled implicit GEMM for devices whose local memory is real (GPUs): each
work-group stages a weight tile and an input tile of the implicit GEMM's grid in local
memory and every work-item accumulates a small block of outputs from there."""
from __future__ import annotations

from .base import (Algorithm, Param, acc_itemsize, channel_blocks, fitting_work_group,
                   pow2_at_most, work_group_problem)
from .direct import geometry
from .implicit_gemm import grid, staging_launcher, staging_problem

# The most accumulators per work-item (registers, not local memory, hold them).
MOST_OUTPUTS_PER_ITEM = 64
# The heuristic's K values per chunk: enough multiply-adds per barrier pair.
CHUNK_K = 32


def taps(problem):
    return problem.kernel_size[0] * problem.kernel_size[1]


def local_bytes(problem, config):
    """Local memory of the weight and input tiles."""
    k_values = config["cib"] * taps(problem)
    return k_values * (config["mwg"] + config["nwg"]) * acc_itemsize(problem.dtype)


class TiledGemm(Algorithm):
    name = "tiled_gemm"
    template = "tiled_gemm.cl.mako"
    templates = ("tiled_gemm.cl.mako", "stage.cl.mako")
    kernel_name = "tiled_gemm"
    params = (
        Param("mwg", (16, 32, 64, 128), "output channels per work-group"),
        Param("nwg", (16, 32, 64, 128), "grid positions per work-group"),
        Param("mdim", (4, 8, 16, 32), "work-items along channels"),
        Param("ndim", (4, 8, 16, 32), "work-items along positions"),
        Param("cib", (1, 2, 4, 8, 16, 32), "input channels per local-memory chunk"),
    )

    def suits(self, info):
        # Where local memory is emulated in global memory (CPUs), the copies and barriers
        # only cost: the register-tiled implicit GEMM is the one for those.
        return info.local_memory

    def preferred(self, problem):
        return problem.cin_per_group > 1

    def constraints(self, problem, info, config):
        mwg, nwg, mdim, ndim = (config[k] for k in ("mwg", "nwg", "mdim", "ndim"))
        if mwg % mdim or nwg % ndim:
            return "mwg must be a multiple of mdim and nwg of ndim"
        if (mwg // mdim) * (nwg // ndim) > MOST_OUTPUTS_PER_ITEM:
            return (f"(mwg/mdim)*(nwg/ndim) outputs per work-item exceed "
                    f"{MOST_OUTPUTS_PER_ITEM}")
        if config["cib"] > pow2_at_most(problem.cin_per_group):
            return "cib exceeds the input channels per group"
        local = local_bytes(problem, config)
        if local > info.local_mem_size:
            return (f"the tiles' {local} bytes exceed the device's {info.local_mem_size} "
                    f"bytes of local memory")
        return (staging_problem(problem, info, nwg)
                or work_group_problem((ndim, mdim, 1), info))

    def default_config(self, problem, info):
        # 64 x 64 outputs in 16 x 16 work-items (4 x 4 each), as GEMMs on GPUs commonly
        # start; chunks of about CHUNK_K values of K; smaller when the device needs it.
        ndim, mdim, _ = fitting_work_group((16, 16, 1), info)
        config = {"mwg": 64 if problem.cout_per_group > 32 else 32, "nwg": 64,
                  "mdim": mdim, "ndim": ndim,
                  "cib": min(pow2_at_most(CHUNK_K // taps(problem)),
                             pow2_at_most(problem.cin_per_group))}
        while local_bytes(problem, config) > info.local_mem_size and config["cib"] > 1:
            config["cib"] //= 2
        return config

    def constants(self, problem, config):
        layout = grid(problem, config["nwg"], config.get("idx_t"))
        return dict(geometry(problem, config), idx_t=layout.idx_t, grid=layout,
                    has_bias=problem.has_bias, mwg=config["mwg"], nwg=config["nwg"],
                    mdim=config["mdim"], ndim=config["ndim"], cib=config["cib"],
                    channel_blocks=channel_blocks(problem, config["mwg"])[0])

    def ranges(self, problem, config):
        tiles = grid(problem, config["nwg"]).tiles
        blocks = channel_blocks(problem, config["mwg"])[1]
        return ((tiles * config["ndim"], blocks * config["mdim"], problem.batch),
                (config["ndim"], config["mdim"], 1))

    def launcher(self, problem, queue, config, strict, constants):
        # The kernel's barriers need the work-group it was written for: never shrunk.
        main = super().launcher(problem, queue, config, True, constants)
        return staging_launcher(problem, queue, constants["grid"], main)
