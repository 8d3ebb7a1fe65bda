"""The input gradient of a stride-1 convolution as a forward convolution, and of a strided
1x1 convolution as that of a stride-1 one, spread out.

With stride 1, dx is dy correlated with the weight turned around (each filter's rows and
columns reversed, each group's input and output channels swapped), on dy padded by the
kernel's reach minus the padding on each side: a forward problem with the channels
exchanged (as_forward). The forward's register-tiled implicit GEMM computes it, its packing
and staging included, after turn_weight lays the weight out (a pass over the weight only,
each call: in training it changes every step). The tuner tunes it with the forward's
parameters, on that problem; where the forward's kernel outruns input_grad_gemm's (its 1x1
layers at 7x7 and 14x14 positions), it wins.

A 1x1 kernel with a stride reads only the input positions (i * SH - PT, j * SW - PL); the
others get no gradient. At the positions it reads, dx is the input gradient of the stride-1,
unpadded 1x1 problem on them (compact), which the forward form computes into scratch; the
spread pass then writes it out with zeros between (input_grad_spread).
"""
from __future__ import annotations

import dataclasses

from ..arrays import WORD_TYPES
from .base import Algorithm, Buffer, build_step, index_type, with_scratch
from .implicit_gemm import ImplicitGemm
from .input_grad_gemm import weight_pass_launcher

IMPLICIT_GEMM = ImplicitGemm()
# The heuristic takes this form for 1x1 layers of at least this many FLOPs. Measured against
# input_grad_gemm on an Intel Xeon (AVX-512, PoCL 3.1), kernels and the weight's pass: every
# 1x1 layer of resnet50 and mobilenet_v2 at batch 8 1.04-1.9x faster, resnet50's at batch 1
# (103-411 MFLOP) 1.0-1.44x; mobilenet_v2's at batch 1 (13-40 MFLOP), where the pass and a
# second kernel weigh more, 0.68-1.17x. 3x3 layers (0.90-1.05x) stay with input_grad_gemm.
PREFERRED_MIN_FLOPS = 64e6
SPREAD_ARGS = (Buffer("compact", "word_t", offset=False), Buffer("dx", "word_t", const=False))


def within_reach(problem):
    """Whether problem's input gradient is a forward problem: stride 1 and zero padding no
    wider than the kernel's reach (beyond it, dy would be cropped)."""
    (kh, kw), (dh, dw) = problem.kernel_size, problem.dilation
    pt, pb, pl, pr = problem.pad
    return (problem.stride == (1, 1) and problem.padding_mode == "zeros"
            and max(pt, pb) <= dh * (kh - 1) and max(pl, pr) <= dw * (kw - 1))


def as_forward(problem):
    """The forward problem whose output is problem's input gradient (within_reach)."""
    (kh, kw), (dh, dw) = problem.kernel_size, problem.dilation
    reach_h, reach_w = dh * (kh - 1), dw * (kw - 1)
    pt, pb, pl, pr = problem.pad
    return dataclasses.replace(
        problem, in_channels=problem.out_channels, out_channels=problem.in_channels,
        height=problem.out_height, width=problem.out_width,
        pad=(reach_h - pt, reach_h - pb, reach_w - pl, reach_w - pr), has_bias=False)


def spreads(problem):
    """Whether problem's input gradient is the compact problem's spread out: a 1x1 kernel
    with a stride, under zero padding."""
    return (problem.kernel_size == (1, 1) and problem.stride != (1, 1)
            and problem.padding_mode == "zeros")


def compact(problem):
    """The stride-1, unpadded 1x1 problem on the input positions that problem's 1x1 kernel
    reads (spreads): its input gradient is problem's there."""
    return dataclasses.replace(problem, height=problem.out_height, width=problem.out_width,
                               stride=(1, 1), pad=(0, 0, 0, 0))


class ForwardForm(Algorithm):
    """An input gradient computed as a forward problem (forward_problem) by the forward
    algorithm `forward`, tuned with its parameters, after turn_weight turns the weight.
    Subclasses give applies() (within_reach and more) and `requirement`, the reason when it
    fails."""
    operation = "input_grad"
    padding_modes = ("zeros",)
    forward: Algorithm
    requirement = ""

    def suits(self, info):
        return self.forward.suits(info)

    def forward_problem(self, problem):
        """The forward problem whose output is problem's input gradient."""
        return as_forward(problem)

    def constraints(self, problem, info, config):
        if not self.applies(problem):
            return f"needs {self.requirement}"
        return self.forward.constraints(self.forward_problem(problem), info, config)

    def default_config(self, problem, info):
        return self.forward.default_config(self.forward_problem(problem), info)

    def all_constants(self, problem, config, epilogue=None):
        return self.forward.all_constants(self.forward_problem(problem), config)

    def launcher(self, problem, queue, config, strict, constants):
        main = self.forward.launcher(self.forward_problem(problem), queue, config, strict,
                                     constants)
        return weight_pass_launcher(problem, queue, main, turn=True, strict=strict)


class InputGradForward(ForwardForm):
    name = "input_grad_forward"
    forward = IMPLICIT_GEMM
    template = IMPLICIT_GEMM.template
    templates = IMPLICIT_GEMM.templates + ("swap_channels.cl.mako",)
    params = IMPLICIT_GEMM.params
    requirement = "stride 1 and zero padding within the kernel's reach"

    def applies(self, problem):
        return within_reach(problem)

    def preferred(self, problem):
        return (problem.kernel_size == (1, 1) and problem.cin_per_group > 1
                and problem.cout_per_group > 1 and self.applies(problem)
                and problem.flops >= PREFERRED_MIN_FLOPS)


class InputGradSpread(InputGradForward):
    """input_grad_forward on the compact problem, into scratch, then the spread pass."""
    name = "input_grad_spread"
    templates = InputGradForward.templates + ("spread.cl.mako",)
    requirement = "a 1x1 kernel with a stride, and zero padding"

    def applies(self, problem):
        return spreads(problem)

    def forward_problem(self, problem):
        return as_forward(compact(problem))

    def launcher(self, problem, queue, config, strict, constants):
        inner = compact(problem)
        spread = build_step(
            queue, "spread.cl.mako", "spread",
            dict(stride=problem.stride, pad_top=problem.pad[0], pad_left=problem.pad[2],
                 height=problem.height, width=problem.width, rows=inner.height,
                 cols=inner.width, idx_t=index_type(problem),
                 word_t=WORD_TYPES[problem.numpy_dtype.itemsize]),
            SPREAD_ARGS, lambda batch: (problem.width, problem.height,
                                        batch * problem.in_channels))
        return with_scratch(super().launcher(problem, queue, config, strict, constants),
                            spread, lambda batch: batch * problem.in_channels * inner.height
                            * inner.width, problem.dtype, "compact dx",
                            itemsize=problem.numpy_dtype.itemsize)
