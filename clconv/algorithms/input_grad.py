"""The input gradient as a register-tiled transposed convolution (gather, no atomics)."""
from __future__ import annotations

import dataclasses

from .. import programs
from .base import (Algorithm, Blocks, Buffer, Param, build_step, channel_blocks, even_split,
                   fitting_work_group, index_type, operation_args, with_scratch,
                   work_group_problem)
from .direct import (VECTOR_WIDTHS, geometry, gradient_row_lanes, row_width, tile_problem,
                     work_group_params)


class InputGrad(Algorithm):
    operation = "input_grad"
    name = "input_grad"
    template = "input_grad.cl.mako"
    templates = ("input_grad.cl.mako", "fold_padding.cl.mako")
    kernel_name = "conv2d_input_grad"
    params = (
        Param("tc", tuple(range(1, 17)), "input channels per work-item"),
        Param("tw", VECTOR_WIDTHS, "input columns per work-item (one vector)"),
        *work_group_params("column tiles", "rows", "input-channel blocks"),
    )

    def constraints(self, problem, info, config):
        return (tile_problem(problem, info, config, "tc", problem.cin_per_group,
                             "the input channels per group")
                or work_group_problem((config["lx"], config["ly"], config["lz"]), info))

    def default_config(self, problem, info):
        cols = _target(problem)[1]
        tw = row_width(problem, info, min(cols, gradient_row_lanes(problem)))
        tc = even_split(problem.cin_per_group, 8)
        local = (1, 1, 1) if info.is_cpu else fitting_work_group((min(16, -(-cols // tw)), 4, 1),
                                                                 info)
        return {"tc": tc, "tw": tw, "lx": local[0], "ly": local[1], "lz": local[2]}

    def constants(self, problem, config):
        rows, cols, row0, col0 = _target(problem)
        padded_target = problem.padding_mode != "zeros"
        storage_t, acc_t = programs.c_types(problem.dtype)
        # The padded plane may need wider indices than the input; it is kept in acc_t, so
        # half rounds once, after fold_padding's sum.
        return dict(geometry(problem, config),
                    idx_t=config.get("idx_t") or index_type(padded(problem)),
                    rows=rows, cols=cols, row0=row0, col0=col0,
                    out_t=acc_t if padded_target else storage_t,
                    tc=config["tc"], tw=config["tw"],
                    channel_blocks=channel_blocks(problem, config["tc"], of="cin")[0],
                    column_tiles=Blocks(cols, config["tw"]))

    def main_args(self, problem, constants):
        return operation_args(self.operation, problem, out_type="out_t")

    def ranges(self, problem, config):
        rows, cols = _target(problem)[:2]
        items = (Blocks(cols, config["tw"]).count, problem.batch * rows,
                 channel_blocks(problem, config["tc"], of="cin")[1])
        return items, (config["lx"], config["ly"], config["lz"])

    def launcher(self, problem, queue, config, strict, constants):
        main = super().launcher(problem, queue, config, strict, constants)
        if problem.padding_mode == "zeros":
            return main
        # Other modes: the gradient of the whole padded plane, then folded onto the input.
        fold = build_step(queue, "fold_padding.cl.mako", "fold_padding", constants,
                          (Buffer("dxp", "acc_t", offset=False), Buffer("dx", const=False)),
                          lambda batch: (problem.width, problem.height,
                                         batch * problem.in_channels))
        rows, cols = _target(problem)[:2]
        return with_scratch(main, fold, lambda batch: batch * problem.in_channels * rows * cols,
                            problem.dtype)


def _target(problem):
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
