"""The input gradient of a stride-1 convolution as a forward convolution.

With stride 1, dx is dy correlated with the weight turned around (each filter's rows and
columns reversed, each group's input and output channels swapped), on dy padded by the
kernel's reach minus the padding on each side: a forward problem with the channels
exchanged (as_forward). The forward's register-tiled implicit GEMM computes it, its packing
and staging included, after turn_weight lays the weight out (a pass over the weight only,
each call: in training it changes every step). The tuner tunes it with the forward's
parameters, on that problem; where the forward's kernel outruns input_grad_gemm's (its 1x1
layers at 7x7 and 14x14 positions), it wins.
"""
from __future__ import annotations

import dataclasses

from ..capabilities import device_info
from .base import Algorithm, fitting_work_group
from .implicit_gemm import ImplicitGemm
from .input_grad_gemm import weight_pass_launcher

IMPLICIT_GEMM = ImplicitGemm()
# The heuristic takes this form for 1x1 layers of at least this many FLOPs. Measured against
# input_grad_gemm on an Intel Xeon (AVX-512, PoCL 3.1), kernels and the weight's pass: every
# 1x1 layer of resnet50 and mobilenet_v2 at batch 8 1.04-1.9x faster, resnet50's at batch 1
# (103-411 MFLOP) 1.0-1.44x; mobilenet_v2's at batch 1 (13-40 MFLOP), where the pass and a
# second kernel weigh more, 0.68-1.17x. 3x3 layers (0.90-1.05x) stay with input_grad_gemm.
PREFERRED_MIN_FLOPS = 64e6
# The turn's work-groups: tiles of the weight whose reads and strided writes stay in the
# caches while a work-group runs (the driver's own sizing made the pass over resnet50's
# 2048 x 512 weight take 3-5 ms, against 0.4-0.9 ms of convolution).
TURN_TILE = (16, 16)


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


class ForwardForm(Algorithm):
    """An input gradient computed as a forward problem (as_forward) by the forward algorithm
    `forward`, tuned with its parameters, after weight_pass lays the weight out. Subclasses
    give applies() (within_reach and more) and `requirement`, the reason when it fails."""
    operation = "input_grad"
    padding_modes = ("zeros",)
    forward: Algorithm
    requirement = ""

    def suits(self, info):
        return self.forward.suits(info)

    def constraints(self, problem, info, config):
        if not self.applies(problem):
            return f"needs {self.requirement}"
        return self.forward.constraints(as_forward(problem), info, config)

    def default_config(self, problem, info):
        return self.forward.default_config(as_forward(problem), info)

    def all_constants(self, problem, config, epilogue=None):
        return self.forward.all_constants(as_forward(problem), config)

    def launcher(self, problem, queue, config, strict, constants):
        main = self.forward.launcher(as_forward(problem), queue, config, strict, constants)
        return self.weight_pass(problem, queue, main, strict)

    def weight_pass(self, problem, queue, main, strict):
        """run(): the pass that lays the weight out for `forward`, then main."""
        raise NotImplementedError


class InputGradForward(ForwardForm):
    name = "input_grad_forward"
    forward = IMPLICIT_GEMM
    template = IMPLICIT_GEMM.template
    templates = IMPLICIT_GEMM.templates + ("turn_weight.cl.mako",)
    params = IMPLICIT_GEMM.params
    requirement = "stride 1 and zero padding within the kernel's reach"

    def applies(self, problem):
        return within_reach(problem)

    def preferred(self, problem):
        return (problem.kernel_size == (1, 1) and problem.cin_per_group > 1
                and problem.cout_per_group > 1 and self.applies(problem)
                and problem.flops >= PREFERRED_MIN_FLOPS)

    def weight_pass(self, problem, queue, main, strict):
        return weight_pass_launcher(problem, queue, main, "turn_weight", "turned weight",
                                    fitting_work_group(TURN_TILE, device_info(queue.device)),
                                    strict)
