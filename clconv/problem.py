"""Argument rules: turn torch.nn.Conv2d's arguments into one immutable, hashable Problem.

Every violation raises ValueError or TypeError naming the argument and the rule, before any
device work happens. The rules and messages follow torch.nn.Conv2d / F.conv2d.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
PADDING_STRINGS = ("valid", "same")
INT32_LIMIT = 2**31 - 1
DTYPES = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32",
          np.dtype(np.float64): "float64"}


def as_int(value, name):
    """An integer argument; floats, strings and None are TypeErrors, as in torch."""
    if isinstance(value, (float, np.floating)) or value is None or isinstance(value, str):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None


def as_pair(value, name, single_ok=True):
    """An int or a pair of ints (height, width), as torch's _pair. F.conv2d also expands a
    one-element stride/padding/dilation; a one-element kernel_size fails in torch."""
    if isinstance(value, (tuple, list)) or (isinstance(value, np.ndarray) and value.ndim):
        if len(value) != 2 and not (single_ok and len(value) == 1):
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return (as_int(value[0], name), as_int(value[-1], name))
    v = as_int(value, name)
    return (v, v)


def check_at_least(pair, name, minimum):
    if min(pair) < minimum:
        rule = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {rule} in each dimension, got {pair}")
    return check_size(pair, name)


def check_size(sizes, name):
    """sizes (a shape, or a pair of a geometry argument) if each fits the 32-bit integers
    that kernels and NDRanges are computed in: a larger one could only wrap."""
    if max(sizes, default=0) > INT32_LIMIT:
        raise ValueError(f"{name} must be at most 2**31 - 1 in each dimension, got "
                         f"{tuple(sizes)}")
    return sizes


def normalise_geometry(kernel_size, stride, padding, dilation, groups, padding_mode):
    """Check the layer arguments that do not depend on data; return them normalised.

    padding comes back as the string 'valid'/'same' or a pair of ints, like torch stores it.
    """
    kernel_size = check_at_least(as_pair(kernel_size, "kernel_size", single_ok=False),
                                 "kernel_size", 1)
    stride = check_at_least(as_pair(stride, "stride"), "stride", 1)
    dilation = check_at_least(as_pair(dilation, "dilation"), "dilation", 1)
    if isinstance(padding, str):
        if padding not in PADDING_STRINGS:
            raise ValueError(f"Invalid padding string {padding!r}, should be one of "
                             f"{set(PADDING_STRINGS)}")
        if padding == "same" and stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions "
                             f"(stride={stride}); use stride=1")
    else:
        padding = check_at_least(as_pair(padding, "padding"), "padding", 0)
    groups = as_int(groups, "groups")
    if groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups}")
    if not isinstance(padding_mode, str) or padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    return kernel_size, stride, padding, dilation, groups, padding_mode


def check_channels(in_channels, out_channels, groups):
    in_channels = as_int(in_channels, "in_channels")
    out_channels = as_int(out_channels, "out_channels")
    if in_channels < 1 or out_channels < 1:
        raise ValueError("in_channels and out_channels must be positive, got "
                         f"{in_channels} and {out_channels}")
    if in_channels % groups:
        raise ValueError(f"in_channels must be divisible by groups "
                         f"(in_channels={in_channels}, groups={groups})")
    if out_channels % groups:
        raise ValueError(f"out_channels must be divisible by groups "
                         f"(out_channels={out_channels}, groups={groups})")
    return in_channels, out_channels


def explicit_padding(padding, kernel_size, dilation):
    """(top, bottom, left, right). 'same' puts the odd extra row/column at the bottom/right,
    as torch does."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        (kh, kw), (dh, dw) = kernel_size, dilation
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    ph, pw = padding
    return (ph, ph, pw, pw)


def dtype_name(dtype, name):
    if hasattr(dtype, "is_floating_point"):       # a torch dtype, e.g. torch.float64
        dtype = str(dtype).replace("torch.", "")
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name}: {dtype!r} is not a dtype clconv supports "
                        "(float16, float32, float64)") from None
    if dt not in DTYPES:
        raise TypeError(f"{name} has dtype {dt}; clconv supports float16, float32 and float64")
    return DTYPES[dt]


@dataclass(frozen=True)
class Problem:
    """One convolution, fully specified: all the static facts a kernel is specialised on."""
    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel_size: tuple
    stride: tuple
    dilation: tuple
    pad: tuple            # (top, bottom, left, right)
    groups: int
    padding_mode: str
    has_bias: bool
    dtype: str            # 'float16' | 'float32' | 'float64'

    @property
    def out_height(self):
        return _out_size(self.height, self.pad[0] + self.pad[1], self.kernel_size[0],
                         self.dilation[0], self.stride[0])

    @property
    def out_width(self):
        return _out_size(self.width, self.pad[2] + self.pad[3], self.kernel_size[1],
                         self.dilation[1], self.stride[1])

    @property
    def cin_per_group(self):
        return self.in_channels // self.groups

    @property
    def cout_per_group(self):
        return self.out_channels // self.groups

    @property
    def input_shape(self):
        return (self.batch, self.in_channels, self.height, self.width)

    @property
    def weight_shape(self):
        return (self.out_channels, self.cin_per_group) + tuple(self.kernel_size)

    @property
    def output_shape(self):
        return (self.batch, self.out_channels, self.out_height, self.out_width)

    @property
    def flops(self):
        kh, kw = self.kernel_size
        return (2 * self.batch * self.out_channels * self.out_height * self.out_width
                * self.cin_per_group * kh * kw)

    @property
    def numpy_dtype(self):
        return np.dtype(self.dtype)

    def with_batch(self, batch):
        return Problem(batch, *[getattr(self, f) for f in _FIELDS[1:]])


_FIELDS = [f for f in Problem.__dataclass_fields__]


def _out_size(size, total_pad, k, d, s):
    return (size + total_pad - d * (k - 1) - 1) // s + 1


def make_problem(*args):
    """make_problem(input_shape, input_dtype, weight_shape, weight_dtype, bias_shape,
    bias_dtype, stride, padding, dilation, groups, padding_mode): check a call of conv2d by
    its arrays' shapes and dtypes; return (Problem, unbatched). A call with the arguments of
    an earlier valid one (the same values of the same types) is a dict look-up."""
    key = _memo_key(args)
    found = _problems.get(key) if key is not None else None
    if found is None:
        found = _checked_problem(*args)
        if key is not None:
            if len(_problems) >= PROBLEMS_KEPT:
                _problems.clear()
            _problems[key] = found
    return found


PROBLEMS_KEPT = 4096
_problems = {}
_EXACT = (int, str, type(None))


def _memo_key(args):
    """args with each value's type, or None if one is not a plain int, str, None, tuple or
    list of ints, or NumPy dtype (anything else, e.g. a float stride that must be refused, or
    a torch dtype, takes the full check every time)."""
    key = []
    for a in args:
        kind = type(a)
        if kind in (tuple, list):
            if not all(type(v) is int for v in a):
                return None
            a = tuple(a)
        elif kind not in _EXACT and not isinstance(a, np.dtype):
            return None
        key.append((kind, a))
    return tuple(key)


def _checked_problem(input_shape, input_dtype, weight_shape, weight_dtype, bias_shape,
                     bias_dtype, stride, padding, dilation, groups, padding_mode):
    input_shape = tuple(input_shape)
    if len(input_shape) not in (3, 4):
        raise ValueError("input must be 3-D (C, H, W) unbatched or 4-D (N, C, H, W) batched, "
                         f"got shape {input_shape}")
    check_size(input_shape, "input shape")
    unbatched = len(input_shape) == 3
    n, c, h, w = (1,) + input_shape if unbatched else input_shape
    if min(c, h, w) < 1:
        raise ValueError(f"input must have non-zero channels, height and width (only the batch "
                         f"may be empty), got shape {input_shape}")
    dtype = dtype_name(input_dtype, "input")
    if dtype_name(weight_dtype, "weight") != dtype:
        raise TypeError(f"weight dtype ({np.dtype(weight_dtype)}) must match input dtype "
                        f"({np.dtype(input_dtype)})")
    weight_shape = tuple(weight_shape)
    if len(weight_shape) != 4:
        raise ValueError(f"weight must be 4-D (out_channels, in_channels/groups, kH, kW), "
                         f"got shape {weight_shape}")
    if min(weight_shape) < 1:
        raise ValueError(f"weight must have non-zero sizes (out_channels, in_channels/groups, "
                         f"kH, kW), got shape {weight_shape}")
    check_size(weight_shape, "weight shape")
    kernel_size = weight_shape[2:]
    kernel_size, stride, padding, dilation, groups, padding_mode = normalise_geometry(
        kernel_size, stride, padding, dilation, groups, padding_mode)
    cout = weight_shape[0]
    if cout % groups:
        raise ValueError(f"weight.shape[0] (out_channels={cout}) must be divisible by "
                         f"groups={groups}")
    if weight_shape[1] * groups != c:
        raise ValueError(f"input has {c} channels, but weight of shape {weight_shape} with "
                         f"groups={groups} expects {weight_shape[1] * groups} "
                         f"(in_channels = weight.shape[1] * groups)")
    if bias_shape is not None:
        if dtype_name(bias_dtype, "bias") != dtype:
            raise TypeError(f"bias dtype ({np.dtype(bias_dtype)}) must match input dtype "
                            f"({np.dtype(input_dtype)})")
        if tuple(bias_shape) != (cout,):
            raise ValueError(f"bias must have shape ({cout},) (out_channels), "
                             f"got {tuple(bias_shape)}")
    pad = explicit_padding(padding, kernel_size, dilation)
    problem = Problem(n, c, h, w, cout, kernel_size, stride, dilation, pad, groups,
                      padding_mode, bias_shape is not None, dtype)
    _check_padded_size(problem)
    return problem, unbatched


def _check_padded_size(p):
    (pt, pb, pl, pr), (kh, kw), (dh, dw) = p.pad, p.kernel_size, p.dilation
    if p.padding_mode == "reflect":
        for size, before, after, dim in ((p.height, pt, pb, "height"), (p.width, pl, pr, "width")):
            if max(before, after) >= size:
                raise ValueError(f"padding_mode='reflect' needs padding < input {dim}: padding "
                                 f"({before}, {after}) for input {dim} {size}")
    if p.padding_mode == "circular":
        for size, before, after, dim in ((p.height, pt, pb, "height"), (p.width, pl, pr, "width")):
            if max(before, after) > size:
                raise ValueError(f"padding_mode='circular' needs padding <= input {dim}: padding "
                                 f"({before}, {after}) for input {dim} {size} would wrap around "
                                 f"more than once")
    padded = (p.height + pt + pb, p.width + pl + pr)
    extent = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    check_size(extent, "the dilated kernel (dilation * (kernel_size - 1) + 1)")
    check_size(padded, "the padded input")
    if padded[0] < extent[0] or padded[1] < extent[1]:
        raise ValueError(f"output size would be < 1: padded input size {padded} is smaller than "
                         f"the dilated kernel size {extent} (kernel_size={(kh, kw)}, "
                         f"dilation={(dh, dw)}, padding={(pt, pb, pl, pr)})")
