"""Conv2d: torch.nn.Conv2d's module, with NumPy parameters and an OpenCL forward."""
from __future__ import annotations

import math
from collections import namedtuple

import numpy as np

from . import arrays
from .device import check_not_forked, queue_for
from .functional import _operand, _resolve_queue, check_call, run
from .limits import check_device_limits
from .problem import check_channels, dtype_name, make_problem, normalise_geometry

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class Conv2d:
    """torch.nn.Conv2d on an OpenCL device.

    Same constructor, attributes, initialisation (U(-sqrt(k), sqrt(k)), k = groups /
    (in_channels * kH * kW), drawn from NumPy's global generator, so np.random.seed makes it
    reproducible) and state_dict keys as torch. `weight` and `bias` are live NumPy arrays: an
    in-place edit or a reassignment takes effect on the next call. Extra keyword arguments:
    `device` (pyopencl.Device or name substring), `queue` (pyopencl.CommandQueue), `dtype`.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", *, device=None, queue=None,
                 dtype=np.float32):
        (self.kernel_size, self.stride, self.padding, self.dilation, self.groups,
         self.padding_mode) = normalise_geometry(kernel_size, stride, padding, dilation,
                                                 groups, padding_mode)
        self.in_channels, self.out_channels = check_channels(in_channels, out_channels,
                                                             self.groups)
        dtype = np.dtype(dtype_name(dtype, "dtype"))
        if device is not None and not isinstance(device, str):
            queue_for(device=device)   # type check now; the queue itself is made on first use
        self._device, self._queue = device, queue
        self._on_device = {}
        fan_in = self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        bound = 1.0 / math.sqrt(fan_in)
        shape = (self.out_channels, self.in_channels // self.groups) + self.kernel_size
        self.weight = np.random.uniform(-bound, bound, shape).astype(dtype)
        self.bias = (np.random.uniform(-bound, bound, self.out_channels).astype(dtype)
                     if bias else None)

    # --- device -------------------------------------------------------------------------

    @property
    def queue(self):
        """The module's command queue (chosen on first use)."""
        check_not_forked()
        if self._queue is None:
            self._queue = queue_for(self._device)
        return self._queue

    def _device_copy(self, name, queue):
        """The parameter on queue's context, uploaded again only when it changed."""
        host = getattr(self, name)
        if host is None or arrays.is_device_array(host):
            return host
        cached = self._on_device.get(name)
        if (cached is not None and cached[0] is queue.context and cached[1] is host
                and np.array_equal(cached[2], host, equal_nan=True)):
            return cached[3]
        copy = np.array(host, order="C")
        on_device = arrays.operand(queue, copy)[2]
        self._on_device[name] = (queue.context, host, copy, on_device)
        return on_device

    # --- forward ------------------------------------------------------------------------

    def forward(self, input):
        x = _operand(input, "input")
        w, b = self.weight, self.bias
        expected = (self.out_channels, self.in_channels // self.groups) + self.kernel_size
        if tuple(w.shape) != expected:
            raise ValueError(f"weight has shape {tuple(w.shape)}, but this module needs "
                             f"{expected}")
        problem, unbatched = check_call(x, w, b, self.stride, self.padding, self.dilation,
                                        self.groups, self.padding_mode)
        queue = _resolve_queue(None, x) if arrays.is_device_array(x) else self.queue
        check_device_limits(problem, queue.device)
        out_shape = problem.output_shape[1:] if unbatched else problem.output_shape
        return run(problem, queue, "forward", [x, self._device_copy("weight", queue),
                                               self._device_copy("bias", queue)], out_shape)

    __call__ = forward

    def problem_for(self, input_shape):
        """The Problem this module solves for an input of input_shape (its own dtype); what
        clconv.tune(module, input_shape) tunes."""
        w, b = self.weight, self.bias
        return make_problem(tuple(input_shape), w.dtype, w.shape, w.dtype,
                            None if b is None else b.shape, None if b is None else b.dtype,
                            self.stride, self.padding, self.dilation, self.groups,
                            self.padding_mode)[0]

    # --- parameters, like torch -----------------------------------------------------------

    def parameters(self):
        return [p for p in (self.weight, self.bias) if p is not None]

    def state_dict(self):
        state = {"weight": self.weight}
        if self.bias is not None:
            state["bias"] = self.bias
        return state

    def load_state_dict(self, state_dict, strict=True):
        """Copy the values of state_dict into the parameters (torch's keys and rules)."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"state_dict does not match Conv2d: missing keys {missing}, "
                           f"unexpected keys {unexpected}")
        for key in own:
            if key in state_dict:
                value = _to_numpy(state_dict[key])
                if value.shape != own[key].shape:
                    raise ValueError(f"state_dict[{key!r}] has shape {value.shape}, "
                                     f"the module's {key} has {own[key].shape}")
                own[key][...] = value
        return IncompatibleKeys(missing, unexpected)

    def to(self, dtype):
        """Convert the parameters to dtype (float16/32/64) in place; returns self."""
        dtype = np.dtype(dtype_name(dtype, "dtype"))
        self.weight = self.weight.astype(dtype)
        if self.bias is not None:
            self.bias = self.bias.astype(dtype)
        return self

    def half(self):
        return self.to(np.float16)

    def float(self):
        return self.to(np.float32)

    def double(self):
        return self.to(np.float64)

    @classmethod
    def from_torch(cls, module, **kwargs):
        """A clconv Conv2d with the configuration and a copy of the weights of a
        torch.nn.Conv2d. kwargs: device, queue."""
        weight = _to_numpy(module.weight)
        new = cls(module.in_channels, module.out_channels, module.kernel_size,
                  stride=module.stride, padding=module.padding, dilation=module.dilation,
                  groups=module.groups, bias=module.bias is not None,
                  padding_mode=module.padding_mode, dtype=weight.dtype, **kwargs)
        new.load_state_dict({k: v for k, v in module.state_dict().items()})
        return new

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s

    def __repr__(self):
        return f"Conv2d({self.extra_repr()})"


def _to_numpy(value):
    if hasattr(value, "detach"):      # a torch tensor or parameter
        value = value.detach().cpu().numpy()
    return np.asarray(value)
