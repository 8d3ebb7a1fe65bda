"""Depthwise convolution (one input channel per group, any channel multiplier): whole output
rows per work-item, judged by GB/s since it is memory-bound."""
from __future__ import annotations

from .base import Algorithm, Blocks, Param, fitting_work_group, pow2_at_most, work_group_problem
from ..capabilities import EVEN_PAIR_WIDTHS
from .direct import VECTOR_WIDTHS, geometry, row_width, vector_width_problem


class Depthwise(Algorithm):
    name = "depthwise"
    template = "depthwise.cl.mako"
    kernel_name = "depthwise"
    params = (
        Param("tw", VECTOR_WIDTHS, "output pixels per vector along the row"),
        Param("rows", (1, 2, 4, 8, 16), "output rows per work-item"),
        Param("lx", (1, 2, 4, 8, 16), "work-group size along row blocks"),
        Param("ly", (1, 2, 4, 8, 16), "work-group size along channels"),
    )

    def applies(self, problem):
        return problem.cin_per_group == 1

    def constraints(self, problem, info, config):
        if not self.applies(problem):
            return "needs one input channel per group"
        reason = vector_width_problem(problem, info, config["tw"])
        if reason:
            return reason
        rows = self.param("rows").values
        if config["rows"] not in rows:
            return f"rows must be one of {rows}"
        return work_group_problem((config["lx"], config["ly"], 1), info)

    def default_config(self, problem, info):
        w_out = problem.out_width
        # Rows of two vectors or more, but at least 4-wide ones from 4 columns on.
        tw = row_width(problem, info, max(w_out // 2, min(w_out, 4)))
        # Measured on PoCL (AVX2): a few rows per work-item amortise its set-up; work-groups
        # of channels keep the launch count down.
        rows = min(4, pow2_at_most(problem.out_height))
        if info.is_cpu:
            local = (1, min(8, pow2_at_most(problem.batch * problem.out_channels)))
        else:
            local = fitting_work_group((1, 64), info)
        return {"tw": tw, "rows": rows, "lx": local[0], "ly": local[1]}

    def constants(self, problem, config):
        return dict(geometry(problem, config), has_bias=problem.has_bias, tw=config["tw"],
                    even_pair_widths=EVEN_PAIR_WIDTHS,
                    rows=config["rows"], row_blocks=Blocks(problem.out_height, config["rows"]),
                    column_tiles=Blocks(problem.out_width, config["tw"]))

    def ranges(self, problem, config):
        row_blocks = Blocks(problem.out_height, config["rows"]).count
        return ((row_blocks, problem.batch * problem.out_channels, 1),
                (config["lx"], config["ly"], 1))
