"""Argument validation of clconv.conv2d and clconv.Conv2d.

Bad input must be rejected with ValueError or TypeError whose message names the argument and
the rule, before any device work: the rejection tests replace the launch path
(clconv.functional.run, clconv.module.run, clconv.planner.plan, clconv.arrays.operand: the
conftest's no_device_work fixture) with functions that raise AssertionError, so a check that
comes too late fails the test.

Where torch rejects the same call too, the test also asserts that torch rejects it (any
exception), so clconv never rejects what torch accepts by accident. Cases that clconv rejects
deliberately although torch accepts them (integer and complex dtypes, stride=(1,), negative
padding with padding_mode='reflect', zero input channels) say so and do not ask torch.
The last section runs edge cases that torch accepts and compares clconv's result with torch's.
"""

import dataclasses
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clconv
import clconv.algorithms
import clconv.device
import clconv.limits

F32 = np.float32

# torch.nn.Conv2d with a zero-sized weight warns while it initialises it
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

@pytest.fixture
def no_fp64(monkeypatch):
    """The real device, as one without cl_khr_fp64."""
    real = clconv.device.queried_info

    def fake(device):
        return dataclasses.replace(real(device), fp64=False)

    monkeypatch.setattr(clconv.limits, "queried_info", fake)


def data(shape, dtype=F32, seed=0):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        return rng.integers(-3, 4, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def torch_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                 padding_mode="zeros"):
    """torch's answer to the same call (clconv.conv2d's signature): F.conv2d for zero
    padding, else torch.nn.Conv2d (in_channels = weight.shape[1] * groups) with the given
    weight and bias."""
    x = torch.from_numpy(np.array(input, order="C"))
    w = torch.from_numpy(np.array(weight, order="C"))
    b = None if bias is None else torch.from_numpy(np.array(bias, order="C"))
    if padding_mode == "zeros":
        return F.conv2d(x, w, b, stride, padding, dilation, groups).numpy()
    m = torch.nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride, padding,
                        dilation, groups, bias=b is not None, padding_mode=padding_mode)
    m.weight = torch.nn.Parameter(w, requires_grad=False)
    if b is not None:
        m.bias = torch.nn.Parameter(b, requires_grad=False)
    with torch.no_grad():
        return m(x).numpy()


def torch_rejects(fn):
    """True when fn raises (any exception) - but not because the test called a helper
    wrongly, which would pass for a rejection."""
    try:
        fn()
    except Exception as err:
        assert not re.search(r"unexpected keyword argument|required positional argument|"
                             r"positional arguments? but", str(err)), repr(err)
        return True
    return False


def assert_close_to_torch(y, t):
    assert y.shape == t.shape, (y.shape, t.shape)
    assert y.dtype == t.dtype, (y.dtype, t.dtype)
    scale = max(1.0, float(np.abs(t).max(initial=0.0)))
    np.testing.assert_allclose(y, t, rtol=1e-4, atol=1e-4 * scale)


def test_guard_catches_device_work(no_device_work):
    """The no_device_work fixture does catch a call that gets as far as the device."""
    with pytest.raises(AssertionError, match="device work started"):
        clconv.conv2d(X, W, B, groups=2)
    with pytest.raises(AssertionError, match="device work started"):
        clconv.Conv2d(4, 6, 3, groups=2)(X)


# --------------------------------------------------------------------------------------------
# clconv.conv2d: rejections
# --------------------------------------------------------------------------------------------

X = data((2, 4, 8, 8))           # base call: groups=2, weight (6, 2, 3, 3), bias (6,)
W = data((6, 2, 3, 3), seed=1)
B = data((6,), seed=2)
BASE = dict(input=X, weight=W, bias=B, stride=1, padding=0, dilation=1, groups=2,
            padding_mode="zeros")

V, T = ValueError, TypeError
# id: (overrides of BASE, exception, regex the message must match, torch rejects too)
CONV2D_BAD = {
    # groups
    "groups_not_dividing_in": (dict(weight=data((6, 1, 3, 3)), groups=3), V,
                               r"input has 4 channels.*groups=3", True),
    "groups_not_dividing_out": (dict(weight=data((5, 2, 3, 3)), bias=None), V,
                                r"out_channels=5\).*divisible by groups=2", True),
    "groups_0": (dict(groups=0), V, r"groups must be a positive integer", True),
    "groups_negative": (dict(groups=-2), V, r"groups must be a positive integer", True),
    # padding_mode
    "padding_mode_foo": (dict(padding_mode="foo"), V, r"padding_mode must be one of", True),
    "padding_mode_zero": (dict(padding_mode="zero"), V, r"padding_mode must be one of", True),
    "padding_mode_Reflect": (dict(padding_mode="Reflect"), V, r"padding_mode must be one of",
                             True),
    "padding_mode_None": (dict(padding_mode=None), V, r"padding_mode must be one of", True),
    # padding strings
    "padding_full": (dict(padding="full"), V, r"Invalid padding string 'full'", True),
    "padding_SAME": (dict(padding="SAME"), V, r"Invalid padding string 'SAME'", True),
    "padding_empty_str": (dict(padding=""), V, r"Invalid padding string", True),
    "same_stride_2": (dict(padding="same", stride=2), V,
                      r"padding='same' is not supported for strided.*stride=\(2, 2\)", True),
    "same_stride_1_2": (dict(padding="same", stride=(1, 2)), V,
                        r"padding='same' is not supported for strided.*stride=\(1, 2\)", True),
    "same_stride_2_1_reflect": (dict(padding="same", stride=(2, 1), padding_mode="reflect"), V,
                                r"padding='same' is not supported for strided", True),
    # ranges
    "padding_negative": (dict(padding=-1), V, r"padding must be >= 0", True),
    "padding_pair_negative": (dict(padding=(0, -1)), V, r"padding must be >= 0", True),
    "stride_0": (dict(stride=0), V, r"stride must be positive", True),
    "stride_negative": (dict(stride=-1), V, r"stride must be positive", True),
    "stride_pair_0": (dict(stride=(1, 0)), V, r"stride must be positive", True),
    "dilation_0": (dict(dilation=0), V, r"dilation must be positive", True),
    "dilation_pair_0": (dict(dilation=(0, 1)), V, r"dilation must be positive", True),
    # types
    "stride_float": (dict(stride=1.0), T, r"stride must be an int.*float", True),
    "stride_np_float": (dict(stride=np.float64(1)), T, r"stride must be an int", True),
    "stride_str": (dict(stride="1"), T, r"stride must be an int.*str", True),
    "stride_None": (dict(stride=None), T, r"stride must be an int.*None", True),
    "stride_pair_float": (dict(stride=(1, 1.0)), T, r"stride must be an int", True),
    "padding_float": (dict(padding=1.0), T, r"padding must be an int", True),
    "padding_None": (dict(padding=None), T, r"padding must be an int", True),
    "padding_pair_str": (dict(padding=(1, "1")), T, r"padding must be an int", True),
    "dilation_float": (dict(dilation=1.5), T, r"dilation must be an int", True),
    "dilation_None": (dict(dilation=None), T, r"dilation must be an int", True),
    "groups_float": (dict(groups=2.0), T, r"groups must be an int", True),
    "groups_str": (dict(groups="2"), T, r"groups must be an int", True),
    "groups_None": (dict(groups=None), T, r"groups must be an int", True),
    # pairs of the wrong length (length 1: see test_conv2d_rejects_length_one_pair)
    "stride_triple": (dict(stride=(1, 1, 1)), V, r"stride must be an int or a pair", True),
    "padding_triple": (dict(padding=(1, 1, 1)), V, r"padding must be an int or a pair", True),
    "dilation_triple": (dict(dilation=[1, 1, 1]), V, r"dilation must be an int or a pair",
                        True),
    # input shape
    "input_channels_wrong": (dict(input=data((2, 5, 8, 8))), V, r"input has 5 channels", True),
    "input_ndim_2": (dict(input=data((8, 8))), V, r"input must be 3-D .* or 4-D", True),
    "input_ndim_5": (dict(input=data((1, 2, 4, 8, 8))), V, r"input must be 3-D .* or 4-D",
                     True),
    "input_zero_height": (dict(input=data((1, 4, 0, 8))), V, r"input must have non-zero", True),
    "input_zero_width": (dict(input=data((1, 4, 8, 0)), padding=2), V,
                         r"input must have non-zero", True),
    "input_unbatched_zero_height": (dict(input=data((4, 0, 8))), V,
                                    r"input must have non-zero", True),
    # output size
    "kernel_taller_than_input": (dict(weight=data((6, 2, 9, 3))), V, r"output size would be < 1",
                                 True),
    "dilated_kernel_too_big": (dict(dilation=4), V, r"output size would be < 1", True),
    "kernel_bigger_than_padded": (dict(weight=data((6, 2, 11, 11)), padding=1), V,
                                  r"output size would be < 1", True),
    # reflect / circular padding limits
    "reflect_same_derived": (dict(input=data((1, 4, 2, 8)), weight=data((6, 2, 5, 5)),
                                  padding="same", padding_mode="reflect"), V,
                             r"padding_mode='reflect' needs padding < input height", True),
    "reflect_explicit_height": (dict(input=data((1, 4, 3, 8)), padding=3,
                                     padding_mode="reflect"), V,
                                r"padding_mode='reflect' needs padding < input height", True),
    "reflect_explicit_width": (dict(input=data((1, 4, 8, 3)), padding=(0, 3),
                                    padding_mode="reflect"), V,
                               r"padding_mode='reflect' needs padding < input width", True),
    "circular_explicit": (dict(input=data((1, 4, 3, 8)), padding=4, padding_mode="circular"),
                          V, r"padding_mode='circular' needs padding <= input height", True),
    "circular_same_derived": (dict(input=data((1, 4, 8, 3)), weight=data((6, 2, 1, 9)),
                                   padding="same", padding_mode="circular"), V,
                              r"padding_mode='circular' needs padding <= input width", True),
    # dtypes (torch on CPU accepts int32, int64 and complex64; clconv supports floats only)
    "input_int32": (dict(input=data(X.shape, np.int32), weight=data(W.shape, np.int32),
                         bias=None), T, r"input has dtype int32", False),
    "input_int64": (dict(input=data(X.shape, np.int64), weight=data(W.shape, np.int64),
                         bias=None), T, r"input has dtype int64", False),
    "input_bool": (dict(input=data(X.shape, bool), weight=data(W.shape, bool), bias=None), T,
                   r"input has dtype bool", True),
    "input_complex64": (dict(input=data(X.shape, np.complex64),
                             weight=data(W.shape, np.complex64), bias=None), T,
                        r"input has dtype complex64", False),
    "weight_int32": (dict(weight=data(W.shape, np.int32)), T, r"weight has dtype int32", True),
    "weight_float64": (dict(weight=data(W.shape, np.float64)), T,
                       r"weight dtype \(float64\) must match input dtype \(float32\)", True),
    "weight_float16": (dict(weight=data(W.shape, np.float16)), T,
                       r"weight dtype \(float16\) must match input", True),
    # weight shape
    "weight_3d": (dict(weight=W[0], bias=None), V, r"weight must be 4-D", True),
    "weight_5d": (dict(weight=W[None], bias=None), V, r"weight must be 4-D", True),
    "weight_2d": (dict(weight=W[0, 0], bias=None), V, r"weight must be 4-D", True),
    "weight_zero_out_channels": (dict(weight=data((0, 2, 3, 3)), bias=None), V,
                                 r"weight must have non-zero sizes", True),
    "weight_zero_kernel": (dict(weight=data((6, 2, 0, 3))), V,
                           r"weight must have non-zero sizes", True),
    "weight_in_channels_wrong": (dict(weight=data((6, 3, 3, 3))), V,
                                 r"input has 4 channels, but weight of shape \(6, 3, 3, 3\)",
                                 True),
    # bias
    "bias_wrong_length": (dict(bias=data((5,))), V, r"bias must have shape \(6,\)", True),
    "bias_2d": (dict(bias=data((1, 6))), V, r"bias must have shape \(6,\)", True),
    "bias_0d": (dict(bias=np.float32(1.0)), V, r"bias must have shape \(6,\)", True),
    "bias_float64": (dict(bias=data((6,), np.float64)), T,
                     r"bias dtype \(float64\) must match input dtype \(float32\)", True),
    "bias_int32": (dict(bias=data((6,), np.int32)), T, r"bias has dtype int32", True),
    # not arrays at all: TypeErrors that say what was passed, as torch's
    **{f"{name}_{kind}": (dict({name: value}), T, fr"{name} must be an array .*got {kind}",
                          True)
       for name in ("input", "weight") for kind, value in (
           ("NoneType", None), ("str", "x"), ("float", 1.5), ("list", [[1.0, 2.0]]))},
    "bias_str": (dict(bias="b"), T, r"bias must be an array .*got str 'b'", True),
}


@pytest.mark.parametrize("case", list(CONV2D_BAD), ids=list(CONV2D_BAD))
def test_conv2d_rejects(case, no_device_work):
    overrides, exc, match, torch_too = CONV2D_BAD[case]
    call = dict(BASE, **overrides)
    with pytest.raises(exc, match=match):
        clconv.conv2d(**call)
    # positional form, torch.nn.Conv2d's argument order
    with pytest.raises(exc, match=match):
        clconv.conv2d(*call.values())
    if torch_too:
        assert torch_rejects(lambda: torch_conv2d(**call)), f"torch accepts {case}"


def test_conv2d_rejects_zero_channels(no_device_work):
    # torch accepts (1, 0, 8, 8) with a (6, 0, 3, 3) weight and returns a (1, 0, 6, 6) output;
    # clconv rejects empty channels outright (only the batch may be empty).
    for x in (data((1, 0, 8, 8)), data((0, 8, 8))):
        with pytest.raises(ValueError, match=r"input must have non-zero channels"):
            clconv.conv2d(x, data((6, 0, 3, 3)))


def test_conv2d_length_one_pairs_expand_like_torch():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    for name, value in (("stride", (2,)), ("padding", (1,)), ("dilation", [2])):
        call = dict(BASE, **{name: value})
        y = clconv.conv2d(**call)
        ref = F.conv2d(torch.from_numpy(call["input"]), torch.from_numpy(call["weight"]),
                       torch.from_numpy(call["bias"]), stride=call["stride"],
                       padding=call["padding"], dilation=call["dilation"],
                       groups=call["groups"]).numpy()
        assert y.shape == ref.shape and np.allclose(y, ref, rtol=1e-4, atol=1e-4), name


def test_conv2d_rejects_empty_pairs(no_device_work):
    for name in ("stride", "padding", "dilation"):
        call = dict(BASE, **{name: ()})
        with pytest.raises(ValueError, match=fr"{name} must be an int or a pair of ints"):
            clconv.conv2d(**call)


def test_conv2d_rejects_non_numeric_arrays(no_device_work):
    with pytest.raises(TypeError, match=r"input has dtype <U1"):
        clconv.conv2d(np.full((1, 2, 4, 4), "a"), W)
    with pytest.raises(TypeError, match=r"weight has dtype object"):
        clconv.conv2d(X, np.array([object()] * 36).reshape(2, 2, 3, 3))


def test_conv2d_rejects_problem_larger_than_max_allocation(no_device_work):
    x = np.broadcast_to(np.float32(0), (64, 512, 1024, 1024))   # 128 GiB, no memory used
    w = np.zeros((1, 512, 1, 1), F32)
    with pytest.raises(ValueError, match=r"the input .* exceeds .*largest allocation"):
        clconv.conv2d(x, w)
    with pytest.raises(ValueError, match=r"the input .* exceeds .*largest allocation"):
        clconv.conv2d(x, w, np.zeros(1, F32), padding=1)


def test_conv2d_rejects_float64_without_fp64(no_device_work, no_fp64):
    x, w = data((1, 2, 5, 5), np.float64), data((3, 2, 3, 3), np.float64)
    with pytest.raises(TypeError, match=r"float64 needs the cl_khr_fp64 extension"):
        clconv.conv2d(x, w)
    with pytest.raises(TypeError, match=r"float64 needs the cl_khr_fp64 extension"):
        clconv.conv2d(x, w, data((3,), np.float64), padding="same", padding_mode="reflect")


def test_a_remembered_fit_is_per_device_info(monkeypatch):
    # check_device_limits remembers a problem that fit; a device without fp64 (other info)
    # still refuses the same problem
    x, w = data((1, 2, 5, 5), np.float64), data((3, 2, 3, 3), np.float64)
    if not clconv.device_info(clconv.queue_for().device).fp64:
        pytest.skip("the device has no fp64")
    clconv.conv2d(x, w)
    real = clconv.device.queried_info
    monkeypatch.setattr(clconv.limits, "queried_info",
                        lambda device: dataclasses.replace(real(device), fp64=False))
    with pytest.raises(TypeError, match=r"float64 needs the cl_khr_fp64 extension"):
        clconv.conv2d(x, w)


def test_conv2d_batch_zero_returns_empty_output():
    # numpy input, batch 0: an empty output of the right shape and dtype, as torch
    cases = [
        dict(input=np.zeros((0, 4, 8, 8), F32), weight=W, bias=B, groups=2),
        dict(input=np.zeros((0, 4, 8, 8), F32), weight=W, bias=None, stride=2, padding=1,
             dilation=2, groups=2),
        dict(input=np.zeros((0, 4, 8, 8), F32), weight=W, bias=B, padding="same", groups=2,
             padding_mode="reflect"),
        dict(input=np.zeros((0, 4, 5, 7), F32), weight=data((8, 4, 2, 3)), padding=(1, 2),
             padding_mode="circular"),
    ]
    for call in cases:
        y = clconv.conv2d(**call)
        t = torch_conv2d(**call)
        assert isinstance(y, np.ndarray)
        assert y.shape == t.shape and y.shape[0] == 0
        assert y.dtype == np.float32


def test_conv2d_batch_zero_still_checks_arguments(no_device_work):
    x = np.zeros((0, 4, 8, 8), F32)
    with pytest.raises(ValueError, match=r"input has 4 channels"):
        clconv.conv2d(x, data((6, 3, 3, 3)))
    with pytest.raises(ValueError, match=r"output size would be < 1"):
        clconv.conv2d(x, data((6, 4, 9, 9)))


# --------------------------------------------------------------------------------------------
# clconv.Conv2d: constructor rejections
# --------------------------------------------------------------------------------------------

CTOR = dict(in_channels=4, out_channels=6, kernel_size=3, stride=1, padding=0, dilation=1,
            groups=1, bias=True, padding_mode="zeros")

# id: (overrides of CTOR, exception, regex, torch rejects too (at construction or forward))
MODULE_CTOR_BAD = {
    "groups_not_dividing_in": (dict(groups=3), V, r"in_channels must be divisible by groups",
                               True),
    "groups_not_dividing_out": (dict(out_channels=6, groups=4), V,
                                r"out_channels must be divisible by groups", True),
    "groups_0": (dict(groups=0), V, r"groups must be a positive integer", True),
    "groups_negative": (dict(groups=-2), V, r"groups must be a positive integer", True),
    "padding_mode_foo": (dict(padding_mode="foo"), V, r"padding_mode must be one of", True),
    "padding_mode_zero": (dict(padding_mode="zero"), V, r"padding_mode must be one of", True),
    "padding_mode_None": (dict(padding_mode=None), V, r"padding_mode must be one of", True),
    "padding_full": (dict(padding="full"), V, r"Invalid padding string 'full'", True),
    "padding_Same": (dict(padding="Same"), V, r"Invalid padding string 'Same'", True),
    "same_stride_2": (dict(padding="same", stride=2), V,
                      r"padding='same' is not supported for strided", True),
    "same_stride_1_2": (dict(padding="same", stride=(1, 2)), V,
                        r"padding='same' is not supported for strided", True),
    "padding_negative": (dict(padding=-1), V, r"padding must be >= 0", True),
    "padding_pair_negative": (dict(padding=(1, -1)), V, r"padding must be >= 0", True),
    "stride_0": (dict(stride=0), V, r"stride must be positive", True),
    "stride_pair_0": (dict(stride=(0, 1)), V, r"stride must be positive", True),
    "stride_negative": (dict(stride=-2), V, r"stride must be positive", True),
    "dilation_0": (dict(dilation=0), V, r"dilation must be positive", True),
    "dilation_pair_0": (dict(dilation=(1, 0)), V, r"dilation must be positive", True),
    "kernel_size_0": (dict(kernel_size=0), V, r"kernel_size must be positive", True),
    "kernel_size_pair_0": (dict(kernel_size=(3, 0)), V, r"kernel_size must be positive", True),
    "kernel_size_negative": (dict(kernel_size=-1), V, r"kernel_size must be positive", True),
    "kernel_size_float": (dict(kernel_size=3.0), T, r"kernel_size must be an int", True),
    "kernel_size_str": (dict(kernel_size="3"), T, r"kernel_size must be an int", True),
    "kernel_size_None": (dict(kernel_size=None), T, r"kernel_size must be an int", True),
    "stride_float": (dict(stride=1.5), T, r"stride must be an int", True),
    "stride_str": (dict(stride="1"), T, r"stride must be an int", True),
    "stride_None": (dict(stride=None), T, r"stride must be an int", True),
    "padding_float": (dict(padding=1.0), T, r"padding must be an int", True),
    "padding_None": (dict(padding=None), T, r"padding must be an int", True),
    "dilation_float": (dict(dilation=1.0), T, r"dilation must be an int", True),
    "dilation_None": (dict(dilation=None), T, r"dilation must be an int", True),
    "groups_float": (dict(groups=1.0), T, r"groups must be an int", True),
    "groups_None": (dict(groups=None), T, r"groups must be an int", True),
    "in_channels_float": (dict(in_channels=4.0), T, r"in_channels must be an int", True),
    "in_channels_str": (dict(in_channels="4"), T, r"in_channels must be an int", True),
    "out_channels_None": (dict(out_channels=None), T, r"out_channels must be an int", True),
    "in_channels_0": (dict(in_channels=0), V, r"in_channels and out_channels must be positive",
                      True),
    "out_channels_0": (dict(out_channels=0), V, r"in_channels and out_channels must be positive",
                       True),
    "kernel_size_triple": (dict(kernel_size=(3, 3, 3)), V,
                           r"kernel_size must be an int or a pair", True),
    "kernel_size_single": (dict(kernel_size=(3,)), V, r"kernel_size must be an int or a pair",
                           True),
    "stride_triple": (dict(stride=(1, 1, 1)), V, r"stride must be an int or a pair", True),
    "padding_triple": (dict(padding=(1, 1, 1)), V, r"padding must be an int or a pair", True),
    "dilation_triple": (dict(dilation=[1, 1, 1]), V, r"dilation must be an int or a pair", True),
}


def torch_module_rejects(kwargs):
    """torch.nn.Conv2d(**kwargs) raises at construction or on a (2, 4, 8, 8) input."""
    def go():
        m = torch.nn.Conv2d(**kwargs)
        with torch.no_grad():
            m(torch.zeros(2, 4, 8, 8))
    return torch_rejects(go)


@pytest.mark.parametrize("case", list(MODULE_CTOR_BAD), ids=list(MODULE_CTOR_BAD))
def test_module_constructor_rejects(case, no_device_work):
    overrides, exc, match, torch_too = MODULE_CTOR_BAD[case]
    kwargs = dict(CTOR, **overrides)
    with pytest.raises(exc, match=match):
        clconv.Conv2d(**kwargs)
    with pytest.raises(exc, match=match):
        clconv.Conv2d(*kwargs.values())
    if torch_too:
        assert torch_module_rejects(kwargs), f"torch accepts {case}"


def test_module_constructor_rejects_what_torch_accepts(no_device_work):
    # Deliberate differences: torch accepts these (a negative padding with
    # padding_mode='reflect' crops), clconv rejects them with a reason.
    with pytest.raises(ValueError, match=r"padding must be >= 0"):
        clconv.Conv2d(4, 6, 3, padding=-1, padding_mode="reflect")
    with pytest.raises(TypeError, match=r"dtype has dtype int32"):
        clconv.Conv2d(4, 6, 3, dtype=np.int32)


# --------------------------------------------------------------------------------------------
# clconv.Conv2d: forward rejections
# --------------------------------------------------------------------------------------------

# id: (constructor overrides, input, exception, regex, torch rejects too)
MODULE_FORWARD_BAD = {
    "input_channels_wrong": (dict(), data((2, 5, 8, 8)), V, r"input has 5 channels", True),
    "input_channels_wrong_grouped": (dict(groups=2), data((2, 2, 8, 8)), V,
                                     r"input has 2 channels", True),
    "input_ndim_2": (dict(), data((8, 8)), V, r"input must be 3-D .* or 4-D", True),
    "input_ndim_5": (dict(), data((1, 2, 4, 8, 8)), V, r"input must be 3-D .* or 4-D", True),
    "input_ndim_1": (dict(), data((8,)), V, r"input must be 3-D .* or 4-D", True),
    "output_size_0": (dict(), data((1, 4, 2, 8)), V, r"output size would be < 1", True),
    "output_size_0_dilated": (dict(dilation=(1, 4)), data((1, 4, 8, 8)), V,
                              r"output size would be < 1", True),
    "reflect_same_derived": (dict(kernel_size=5, padding="same", padding_mode="reflect"),
                             data((1, 4, 2, 8)), V,
                             r"padding_mode='reflect' needs padding < input height", True),
    "reflect_explicit": (dict(padding=3, padding_mode="reflect"), data((1, 4, 8, 3)), V,
                         r"padding_mode='reflect' needs padding < input width", True),
    "reflect_explicit_unbatched": (dict(padding=(3, 1), padding_mode="reflect"),
                                   data((4, 3, 8)), V,
                                   r"padding_mode='reflect' needs padding < input height", True),
    "circular_explicit": (dict(padding=4, padding_mode="circular"), data((1, 4, 3, 8)), V,
                          r"padding_mode='circular' needs padding <= input height", True),
    "circular_same_derived": (dict(kernel_size=11, padding="same", padding_mode="circular"),
                              data((1, 4, 4, 4)), V,
                              r"padding_mode='circular' needs padding <= input", True),
    "input_int32": (dict(), data((2, 4, 8, 8), np.int32), T, r"input has dtype int32", True),
    "input_int64": (dict(), data((2, 4, 8, 8), np.int64), T, r"input has dtype int64", True),
    "input_bool": (dict(), data((2, 4, 8, 8), bool), T, r"input has dtype bool", True),
    "input_complex64": (dict(), data((2, 4, 8, 8), np.complex64), T,
                        r"input has dtype complex64", True),
    "input_float64_into_float32": (dict(), data((2, 4, 8, 8), np.float64), T,
                                   r"weight dtype \(float32\) must match input dtype "
                                   r"\(float64\)", True),
    "input_float16_into_float32": (dict(), data((2, 4, 8, 8), np.float16), T,
                                   r"must match input dtype \(float16\)", True),
    "input_zero_channels": (dict(), data((1, 0, 8, 8)), V, r"input must have non-zero", True),
    "input_zero_height": (dict(), data((1, 4, 0, 8)), V, r"input must have non-zero", True),
    "input_zero_width": (dict(padding=1, padding_mode="reflect"), data((1, 4, 8, 0)), V,
                         r"input must have non-zero", True),
}


@pytest.mark.parametrize("case", list(MODULE_FORWARD_BAD), ids=list(MODULE_FORWARD_BAD))
def test_module_forward_rejects(case, no_device_work):
    overrides, x, exc, match, torch_too = MODULE_FORWARD_BAD[case]
    kwargs = dict(CTOR, **overrides)
    m = clconv.Conv2d(**kwargs)
    with pytest.raises(exc, match=match):
        m(x)
    with pytest.raises(exc, match=match):
        m.forward(x)
    if torch_too:
        tm = torch.nn.Conv2d(**kwargs)
        assert torch_rejects(lambda: tm(torch.from_numpy(x))), f"torch accepts {case}"


def test_module_forward_rejects_bad_parameters(no_device_work):
    x = data((2, 4, 8, 8))
    m = clconv.Conv2d(4, 6, 3)
    m.weight = data((6, 4, 5, 5))
    with pytest.raises(ValueError, match=r"weight has shape \(6, 4, 5, 5\).*needs \(6, 4, 3, 3\)"):
        m(x)
    m.weight = data((6, 4, 3))
    with pytest.raises(ValueError, match=r"weight has shape"):
        m(x)
    m = clconv.Conv2d(4, 6, 3)
    m.bias = data((5,))
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        m(x)
    m.bias = data((6, 1))
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        m(x)
    m.bias = data((6,), np.float64)
    with pytest.raises(TypeError, match=r"bias dtype \(float64\) must match"):
        m(x)
    m = clconv.Conv2d(4, 6, 3)
    m.weight = m.weight.astype(np.float64)
    with pytest.raises(TypeError, match=r"weight dtype \(float64\) must match input dtype"):
        m(x)


def test_module_forward_rejects_problem_larger_than_max_allocation(no_device_work):
    x = np.broadcast_to(np.float32(0), (64, 512, 1024, 1024))
    m = clconv.Conv2d(512, 1, 1)
    with pytest.raises(ValueError, match=r"the input .* exceeds .*largest allocation"):
        m(x)


def test_module_forward_rejects_float64_without_fp64(no_device_work, no_fp64):
    m = clconv.Conv2d(2, 3, 3, padding=1).double()
    with pytest.raises(TypeError, match=r"float64 needs the cl_khr_fp64 extension"):
        m(data((1, 2, 5, 5), np.float64))


def test_module_batch_zero_returns_empty_output():
    m = clconv.Conv2d(4, 6, 3, stride=(2, 1), padding=1, padding_mode="reflect")
    y = m(np.zeros((0, 4, 8, 9), F32))
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    assert y.shape == (0, 6, 4, 9)


# --------------------------------------------------------------------------------------------
# torch accepts these, so clconv must too, with torch's result
# --------------------------------------------------------------------------------------------

# id: (input shape, weight shape, conv2d keyword arguments)
ACCEPTED = {
    "same_even_kernel_dilation_2": ((2, 3, 9, 8), (4, 3, 4, 4), dict(padding="same",
                                                                    dilation=2)),
    "same_asymmetric_reflect": ((1, 3, 7, 8), (5, 3, 4, 2), dict(padding="same", dilation=(2, 3),
                                                                 padding_mode="reflect")),
    "same_even_kernel_circular": ((1, 2, 6, 5), (3, 2, 2, 4), dict(padding="same",
                                                                   padding_mode="circular")),
    "same_kernel_bigger_than_input": ((1, 2, 3, 3), (3, 2, 7, 7), dict(padding="same")),
    "valid_stride_2": ((2, 3, 9, 10), (4, 3, 3, 2), dict(padding="valid", stride=2)),
    "depthwise_multiplier_3": ((2, 4, 7, 7), (12, 1, 3, 3), dict(groups=4, padding=1)),
    "kernel_equals_padded_input": ((2, 3, 6, 5), (4, 3, 8, 9), dict(padding=(1, 2))),
    "kernel_equals_input_valid": ((1, 3, 5, 4), (2, 3, 5, 4), dict(padding="valid")),
    "reflect_padding_size_minus_1": ((1, 2, 3, 5), (3, 2, 3, 3), dict(padding=(2, 4),
                                                                       padding_mode="reflect")),
    "circular_padding_equals_size": ((1, 2, 3, 4), (3, 2, 3, 3), dict(padding=(3, 4),
                                                                       padding_mode="circular")),
    "reflect_same_padding_size_minus_1": ((1, 2, 3, 4), (3, 2, 5, 7), dict(
        padding="same", padding_mode="reflect")),
    "circular_same_padding_equals_size": ((1, 2, 3, 3), (3, 2, 7, 6), dict(
        padding="same", padding_mode="circular")),
    "replicate_padding_bigger_than_input": ((1, 2, 2, 2), (3, 2, 3, 3),
                                            dict(padding=5, padding_mode="replicate")),
    "stride_bigger_than_input": ((2, 3, 5, 5), (4, 3, 1, 1), dict(stride=7)),
    "unbatched_same_grouped": ((4, 6, 6), (6, 2, 3, 3), dict(padding="same", groups=2)),
}


@pytest.mark.parametrize("case", list(ACCEPTED), ids=list(ACCEPTED))
def test_accepts_what_torch_accepts(case):
    xs, ws, kwargs = ACCEPTED[case]
    x, w, b = data(xs, seed=10), data(ws, seed=11), data((ws[0],), seed=12)
    t = torch_conv2d(x, w, b, **kwargs)
    y = clconv.conv2d(x, w, b, **kwargs)
    assert_close_to_torch(y, t)


def test_module_accepts_what_torch_accepts():
    for xs, ws, kwargs in (ACCEPTED["same_asymmetric_reflect"],
                           ACCEPTED["circular_padding_equals_size"],
                           ACCEPTED["kernel_equals_padded_input"]):
        groups = kwargs.get("groups", 1)
        tm = torch.nn.Conv2d(ws[1] * groups, ws[0], ws[2:], **kwargs)
        m = clconv.Conv2d.from_torch(tm)
        x = data(xs, seed=13)
        with torch.no_grad():
            t = tm(torch.from_numpy(x)).numpy()
        assert_close_to_torch(m(x), t)


def test_accepts_integer_like_arguments():
    # numpy integers and bools are ints (operator.index), as for torch
    x, w = data((1, 2, 6, 6)), data((3, 2, 3, 3))
    t = torch_conv2d(x, w, None, stride=2, padding=1, dilation=1, groups=1)
    y = clconv.conv2d(x, w, None, stride=np.int64(2), padding=(np.int32(1), True),
                      dilation=[1, np.uint8(1)], groups=np.int16(1))
    assert_close_to_torch(y, t)


# --------------------------------------------------------------------------------------------
# sizes that would wrap or cannot fit: refused before anything is allocated or enqueued
# --------------------------------------------------------------------------------------------

HUGE = 2**61


@pytest.mark.parametrize("overrides, match", [
    (dict(padding=(0, HUGE)), r"padding must be at most 2\*\*31 - 1 .*2305843009213693952"),
    (dict(padding=HUGE), r"padding must be at most 2\*\*31 - 1"),
    (dict(stride=(1, HUGE)), r"stride must be at most 2\*\*31 - 1"),
    (dict(dilation=(2**31, 1)), r"dilation must be at most 2\*\*31 - 1"),
    (dict(input=np.broadcast_to(F32(0), (1, 4, 1, 2**31))), r"input shape must be at most"),
    (dict(input=np.broadcast_to(F32(0), (2**33, 4, 1, 1))), r"input shape must be at most"),
    (dict(dilation=(2**30, 1)), r"the dilated kernel .* must be at most 2\*\*31 - 1"),
    (dict(padding=(2**30, 0), input=np.broadcast_to(F32(0), (1, 4, 2**30, 1))),
     r"the padded input must be at most 2\*\*31 - 1"),
], ids=["padding-pair", "padding-int", "stride", "dilation", "width", "batch",
        "dilated-kernel", "padded-input"])
def test_sizes_that_would_overflow_are_refused(overrides, match, no_device_work):
    call = dict(BASE, **overrides)
    with pytest.raises(ValueError, match=match):
        clconv.conv2d(**call)
    with pytest.raises(ValueError, match=match):
        clconv.conv2d_input_grad(call["input"].shape, W, np.zeros((2, 6, 1, 1), F32),
                                 *[call[k] for k in ("stride", "padding", "dilation", "groups")])


def test_a_problem_bigger_than_the_free_host_memory_is_refused(no_device_work, monkeypatch):
    # On a CPU device the operands and the result are host memory.
    info = clconv.device_info(clconv.queue_for().device)
    if not info.is_cpu:
        pytest.skip("the host-memory check applies to CPU devices")
    monkeypatch.setattr(clconv.limits, "host_memory_available", lambda: 300 * 2**20)
    x = np.broadcast_to(F32(0), (1, 1, 8192, 8192))          # 256 MiB, no memory used
    with pytest.raises(ValueError, match=r"together \(512 MiB\) exceed the host memory free "
                                         r"now \(300 MiB\)"):
        clconv.conv2d(x, np.ones((1, 1, 1, 1), F32))


def test_host_memory_available_reads_a_number():
    free = clconv.limits.host_memory_available()
    assert free is None or free > 0


def test_a_remembered_problem_never_admits_another_type():
    """make_problem remembers valid calls by value and type: after stride=1 and padding=(1, 1)
    were accepted, stride=1.0, padding=(1.0, 1) and a float32 weight for a float64 input
    are still refused, and a list padding equals the tuple's problem."""
    from clconv.problem import make_problem
    args = [(1, 2, 5, 5), np.dtype("float32"), (3, 2, 3, 3), np.dtype("float32"), None, None,
            1, (1, 1), 1, 1, "zeros"]
    problem, _ = make_problem(*args)
    assert make_problem(*args)[0] is problem
    for index, bad, error in ((6, 1.0, TypeError), (7, (1.0, 1), TypeError),
                              (1, np.dtype("float64"), TypeError), (10, "zero", ValueError)):
        changed = list(args)
        changed[index] = bad
        with pytest.raises(error):
            make_problem(*changed)
    listed = list(args)
    listed[7] = [1, 1]
    assert make_problem(*listed)[0] == problem
