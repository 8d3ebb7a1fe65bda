"""The input gradient of a stride-1 depthwise convolution, as a depthwise convolution.

With one channel per group and stride 1, dx[c] is dy[c] correlated with w[c] turned
around, on dy padded by (kernel reach - padding) on each side: the forward's depthwise
kernel computes it, after swap_channels' turn_weight turns the weights (with one channel a
side per group, only the taps are reversed; a pass over the weights only, each call: in
training they change every step). The tuner tunes it with the forward's depthwise
parameters, on that problem.
"""
from __future__ import annotations

from .depthwise import Depthwise
from .input_grad_forward import ForwardForm, within_reach

DEPTHWISE = Depthwise()


class InputGradDepthwise(ForwardForm):
    name = "input_grad_depthwise"
    forward = DEPTHWISE
    template = "depthwise.cl.mako"
    templates = ("depthwise.cl.mako", "swap_channels.cl.mako")
    params = DEPTHWISE.params
    requirement = ("a depthwise layer (one channel in and out per group) of stride 1, zero "
                   "padding within the kernel's reach")

    def applies(self, problem):
        return (problem.groups == problem.in_channels == problem.out_channels
                and within_reach(problem))
