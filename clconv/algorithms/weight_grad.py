"""The weight gradient: a split reduction over batch * output rows, vectorised along rows."""
from __future__ import annotations

from .. import programs
from .base import (Algorithm, Blocks, Buffer, Param, build_step, channel_blocks,
                   fitting_work_group, index_type, operation_args, with_scratch,
                   work_group_problem)
from .direct import VECTOR_WIDTHS, geometry, gradient_row_lanes, row_width, tile_problem

SPLITS = (1, 2, 4, 8, 16, 32, 64, 128)
# sum_splits: the partial sums (acc_t), then the output.
SUM_SPLITS_ARGS = (Buffer("partial", "acc_t", offset=False), Buffer("out", const=False))


class WeightGrad(Algorithm):
    operation = "weight_grad"
    name = "weight_grad"
    template = "weight_grad.cl.mako"
    templates = ("weight_grad.cl.mako", "sum_splits.cl.mako")
    kernel_name = "conv2d_weight_grad"
    params = (
        Param("tk", (1, 2, 3, 4, 6, 8, 12, 16), "output channels per work-item"),
        Param("tw", VECTOR_WIDTHS, "output columns per step (one vector)"),
        Param("splits", SPLITS, "shares of the batch * output rows summed apart"),
        Param("lx", (1, 2, 4, 8, 16, 32, 64), "work-group size along (c, kh, kw)"),
        Param("ly", (1, 2, 4, 8), "work-group size along output-channel blocks"),
    )

    def constraints(self, problem, info, config):
        if config["splits"] not in SPLITS:
            return f"splits must be one of {SPLITS}"
        return (tile_problem(problem, info, config, "tk", problem.cout_per_group,
                             "the output channels per group")
                or work_group_problem((config["lx"], config["ly"], 1), info))

    def default_config(self, problem, info):
        w_out = problem.out_width
        tw = row_width(problem, info, min(w_out, gradient_row_lanes(problem)))
        tk = max(v for v in self.param("tk").values if v <= min(4, problem.cout_per_group))
        # Enough independent sums to fill the device, each over at least 8 rows.
        outputs = (problem.cin_per_group * problem.kernel_size[0] * problem.kernel_size[1]
                   * channel_blocks(problem, tk)[1])
        want = 16 * info.compute_units if info.is_cpu else 16 * 1024
        rows = problem.batch * problem.out_height
        splits = 1
        while splits < SPLITS[-1] and outputs * splits < want and rows >= 16 * splits:
            splits *= 2
        local = (1, 1) if info.is_cpu else fitting_work_group((min(64, outputs), 1), info)
        return {"tk": tk, "tw": tw, "splits": splits, "lx": local[0], "ly": local[1]}

    def constants(self, problem, config):
        storage_t, acc_t = programs.c_types(problem.dtype)
        return dict(geometry(problem, config), tk=config["tk"], tw=config["tw"],
                    splits=config["splits"],
                    out_t=acc_t if config["splits"] > 1 else storage_t,
                    channel_blocks=channel_blocks(problem, config["tk"])[0],
                    column_vectors=Blocks(problem.out_width, config["tw"]))

    def main_args(self, problem, constants):
        return operation_args(self.operation, problem, out_type="out_t")

    def ranges(self, problem, config):
        kh, kw = problem.kernel_size
        items = (problem.cin_per_group * kh * kw, channel_blocks(problem, config["tk"])[1],
                 config["splits"])
        return items, (config["lx"], config["ly"], 1)

    def launcher(self, problem, queue, config, strict, constants):
        main = super().launcher(problem, queue, config, strict, constants)
        splits = config["splits"]
        if splits == 1:
            return main
        count = problem.out_channels * problem.cin_per_group * (problem.kernel_size[0]
                                                                 * problem.kernel_size[1])
        total = build_step(queue, "sum_splits.cl.mako", "sum_splits",
                           dict(dtype=problem.dtype, idx_t=index_type(problem), count=count,
                                splits=splits), SUM_SPLITS_ARGS, lambda batch: (count,))
        return with_scratch(main, total, lambda batch: splits * count, problem.dtype)
