"""The input gradient of a stride-1 depthwise convolution, as a depthwise convolution.

With one channel per group and stride 1, dx[c] is dy[c] correlated with w[c] turned
around, on dy padded by (kernel reach - padding) on each side: the forward's depthwise
kernel computes it, after flip_weight turns the weights (a pass over the weights only, each
call: in training they change every step). The tuner tunes it with the forward's depthwise
parameters, on that problem.
"""
from __future__ import annotations

from ..arrays import WORD_TYPES
from .base import Buffer, build_step, with_prepared_operand
from .depthwise import Depthwise
from .input_grad_forward import ForwardForm, within_reach

DEPTHWISE = Depthwise()
FLIP_ARGS = (Buffer("w", "word_t", offset_t="long"),
             Buffer("wf", "word_t", const=False, offset=False))


class InputGradDepthwise(ForwardForm):
    name = "input_grad_depthwise"
    forward = DEPTHWISE
    template = "depthwise.cl.mako"
    templates = ("depthwise.cl.mako", "flip_weight.cl.mako")
    params = DEPTHWISE.params
    requirement = ("a depthwise layer (one channel in and out per group) of stride 1, zero "
                   "padding within the kernel's reach")

    def applies(self, problem):
        return (problem.groups == problem.in_channels == problem.out_channels
                and within_reach(problem))

    def weight_pass(self, problem, queue, main, strict):
        kh, kw = problem.kernel_size
        channels = problem.in_channels
        itemsize = problem.numpy_dtype.itemsize
        flip = build_step(queue, "flip_weight.cl.mako", "flip_weight",
                          dict(kernel_size=problem.kernel_size, channels=channels,
                               word_t=WORD_TYPES[itemsize]), FLIP_ARGS,
                          lambda batch: (kh * kw, channels))
        return with_prepared_operand(flip, main, 1, "flipped",
                                     lambda batch: channels * kh * kw, itemsize)
