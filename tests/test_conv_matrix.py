"""Parametrised feature matrix for clconv.conv2d.

Every case is compared with the independent NumPy reference (tests/reference.py)
within a rigorous floating-point error bound and, for float32/float64 when
torch is installed, with torch.nn.Conv2d (weights copied in, padding_mode set).
Cases are deliberately dense: each one exercises several features at once to
keep the number of distinct OpenCL kernels (each compiled once) small.
"""

import importlib.util
import functools
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import clconv  # noqa: E402
from clconv.limits import check_fp64  # noqa: E402

from reference import (  # noqa: E402
    assert_matches,
    conv2d_abs_bound,
    conv2d_reference,
    reduction_length,
    tolerance,
)
from _cases import Conv, apply_layout, make_data, rng_for, torch_conv2d  # noqa: E402

# torch is an optional second oracle here
HAVE_TORCH = importlib.util.find_spec("torch") is not None


@functools.lru_cache(maxsize=None)
def fp64_supported():
    """clconv raises TypeError for float64 on devices without fp64: asked of its check, not
    of a convolution, which a test's forced algorithm may not compute (winograd: no 1x1)."""
    try:
        check_fp64("float64", clconv.device_info(clconv.queue_for().device))
    except TypeError:
        return False
    return True


def run_and_check(c: Conv, dtype, *, layout="contiguous", dist="normal", salt=0,
                  positional=False, with_torch=True):
    dtype = np.dtype(dtype)
    if dtype == np.float64 and not fp64_supported():
        pytest.skip("device has no fp64 support (clconv raised TypeError)")
    rng = rng_for(c.label(), salt)
    x, w, b = make_data(c, dtype, rng, dist)
    x, w = apply_layout(x, w, layout, rng)
    if layout == "b_view" and b is not None:
        big = np.zeros(2 * b.size, dtype=b.dtype)
        big[::2] = b
        b = big[::2]
    copies = (x.copy(), w.copy(), None if b is None else b.copy())
    label = f"{c.label()} dtype={dtype.name} layout={layout}"
    if positional:
        y = clconv.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups, c.mode)
    else:
        y = clconv.conv2d(x, w, bias=b, **c.kwargs())
    # inputs must not be modified
    np.testing.assert_array_equal(x, copies[0], err_msg=f"{label}: input modified")
    np.testing.assert_array_equal(w, copies[1], err_msg=f"{label}: weight modified")
    if b is not None:
        np.testing.assert_array_equal(b, copies[2], err_msg=f"{label}: bias modified")
    assert isinstance(y, np.ndarray), f"{label}: got {type(y)}"
    assert y.shape == c.out_shape(), f"{label}: shape {y.shape}, expected {c.out_shape()}"
    assert_matches(y, x, w, b, dtype=dtype, label=label + " vs reference", **c.kwargs())
    if with_torch and HAVE_TORCH and dtype in (np.float32, np.float64):
        t = torch_conv2d(x, w, b, c)
        # |y - torch| <= |y - exact| + |torch - exact|: twice the bound.
        assert_matches(y, x, w, b, dtype=dtype, expected=t, tol_scale=2.0,
                       label=label + " vs torch", **c.kwargs())
    return x, w, b, y


C = Conv
Z, RF, RP, CI = "zeros", "reflect", "replicate", "circular"

# (id, Conv) -- Conv(n, cin, h, w, cout, k, stride, padding, dilation, groups, bias, mode)
MATRIX = [
    # --- kernel sizes 1..7 and 11, each with other features mixed in -------
    ("k1_pointwise", C(2, 3, 9, 7, 5, 1)),
    ("k1_s2_p1_ch13", C(1, 5, 8, 9, 13, 1, 2, 1, 1, 1, False)),
    ("k1_s3x1_pair_reflect", C(3, 5, 7, 6, 4, 1, (3, 1), (1, 2), 1, 1, True, RF)),
    ("k2_p1_reflect", C(2, 3, 6, 7, 5, 2, 1, 1, 1, 1, True, RF)),
    ("k2_same_even", C(2, 3, 7, 6, 4, 2, 1, "same")),
    ("k2_same_even_circular", C(2, 3, 5, 6, 4, 2, 1, "same", 1, 1, False, CI)),
    ("k3_p1_ch13to17", C(2, 13, 11, 9, 17, 3, 1, 1)),
    ("k3_s2_p1_replicate", C(3, 5, 9, 10, 3, 3, 2, 1, 1, 1, True, RP)),
    ("k3_s3_floor", C(2, 3, 10, 11, 5, 3, 3, 0, 1, 1, False)),
    ("k4_same_reflect", C(1, 3, 8, 8, 4, 4, 1, "same", 1, 1, True, RF)),
    ("k4_s3_p2_circular", C(2, 2, 13, 11, 6, 4, 3, 2, 1, 1, True, CI)),
    ("k5_p2_nobias", C(2, 3, 10, 12, 5, 5, 1, 2, 1, 1, False)),
    ("k5_mixed_s_d_pair_replicate_g2", C(1, 4, 15, 11, 4, 5, (1, 2), (2, 1), (2, 1), 2, True, RP)),
    ("k6_same_d3_reflect_asym", C(2, 3, 12, 10, 3, 6, 1, "same", 3, 1, True, RF)),
    ("k6_s2_valid", C(2, 3, 13, 12, 5, 6, 2, "valid")),
    ("k7_p3", C(2, 3, 12, 13, 8, 7, 1, 3)),
    ("k7_s2_p3_reflect", C(1, 3, 11, 9, 4, 7, 2, 3, 1, 1, True, RF)),
    ("k7_same_d2_circular", C(1, 2, 13, 12, 3, 7, 1, "same", 2, 1, True, CI)),
    ("k11_same", C(1, 2, 12, 11, 3, 11, 1, "same")),
    ("k11_exact_cover_1x1", C(2, 3, 11, 11, 5, 11)),
    ("k11_s3_p5_replicate", C(1, 2, 9, 14, 3, 11, 3, 5, 1, 1, False, RP)),
    # --- non-square kernels -------------------------------------------------
    ("k1x3_p0x1", C(2, 5, 6, 7, 7, (1, 3), 1, (0, 1))),
    ("k3x1_s2x1_p1x0_replicate", C(2, 5, 9, 6, 3, (3, 1), (2, 1), (1, 0), 1, 1, True, RP)),
    ("k2x5_same_d3x1_reflect", C(2, 3, 7, 8, 4, (2, 5), 1, "same", (3, 1), 1, True, RF)),
    ("k5x2_same_d1x3_circular", C(1, 4, 9, 7, 6, (5, 2), 1, "same", (1, 3), 2, True, CI)),
    ("k4x6_s3x1_d2x1_p1x2", C(2, 3, 14, 12, 5, (4, 6), (3, 1), (1, 2), (2, 1), 1, False)),
    ("k3x7_s1x3_p2x0_circular", C(2, 3, 8, 15, 4, (3, 7), (1, 3), (2, 0), 1, 1, True, CI)),
    ("k7x2_valid_d1x2", C(1, 3, 9, 8, 2, (7, 2), (2, 2), "valid", (1, 2))),
    ("k1x11_same", C(2, 2, 5, 14, 3, (1, 11), 1, "same")),
    # --- strides / dilations ------------------------------------------------
    ("s1x2_d2x3_p3", C(2, 3, 11, 13, 5, 3, (1, 2), 3, (2, 3))),
    ("s3x1_d3x1_reflect", C(2, 3, 12, 9, 4, 3, (3, 1), (2, 1), (3, 1), 1, True, RF)),
    ("s2_d2_replicate_pair", C(1, 5, 11, 10, 5, 3, 2, (3, 1), 2, 1, False, RP)),
    ("s3_d3_circular", C(2, 4, 13, 14, 3, 3, 3, 4, 3, 1, True, CI)),
    ("s2x3_d1x2_valid", C(2, 3, 13, 17, 6, (2, 3), (2, 3), "valid", (1, 2))),
    ("same_d3_k3_replicate", C(2, 3, 9, 8, 4, 3, 1, "same", 3, 1, True, RP)),
    ("same_d2x1_k4x3_zeros", C(2, 3, 8, 9, 4, (4, 3), 1, "same", (2, 1))),
    # --- padding forms ------------------------------------------------------
    ("pad_asym_0x3", C(2, 3, 7, 5, 4, 3, 1, (0, 3))),
    ("pad_asym_3x0_reflect", C(2, 3, 5, 7, 4, 3, 1, (3, 0), 1, 1, True, RF)),
    ("pad_large_zeros", C(1, 2, 4, 5, 3, 3, 2, 5)),
    ("pad_large_replicate", C(1, 2, 3, 4, 3, 3, 1, (6, 4), 1, 1, True, RP)),
    ("pad_eq_size_circular", C(2, 2, 4, 3, 3, 3, 1, (4, 3), 1, 1, True, CI)),
    ("pad_sizeminus1_reflect", C(2, 2, 4, 3, 3, 3, 1, (3, 2), 1, 1, True, RF)),
    ("valid_circular_noop", C(2, 3, 7, 6, 4, 3, 1, "valid", 1, 1, True, CI)),
    # --- groups -------------------------------------------------------------
    ("g2", C(2, 4, 8, 7, 6, 3, 1, 1, 1, 2)),
    ("g3_reflect", C(2, 6, 7, 8, 9, 3, 2, 1, 1, 3, True, RF)),
    ("g4_cout_g1", C(2, 8, 6, 6, 4, 3, 1, "same", 1, 4, False, CI)),
    ("g2_cin_g3_cout_g5", C(1, 6, 7, 9, 10, (3, 2), (1, 2), (1, 0), 1, 2)),
    ("depthwise_c5", C(2, 5, 9, 8, 5, 3, 1, 1, 1, 5)),
    ("depthwise_c13_s2_replicate", C(2, 13, 9, 11, 13, 3, 2, 1, 1, 13, True, RP)),
    ("depthwise_mult2_c3", C(2, 3, 8, 8, 6, 3, 1, 1, 1, 3)),
    ("depthwise_mult3_c4_same_d2", C(1, 4, 9, 7, 12, 3, 1, "same", 2, 4, True, RF)),
    ("depthwise_mult3_c17_k5", C(1, 17, 7, 7, 51, 5, 1, 2, 1, 17, False, CI)),
    ("depthwise_k1", C(2, 5, 6, 7, 10, 1, 1, 0, 1, 5)),
    ("depthwise_c1_single", C(2, 1, 7, 6, 1, 3, 1, 1, 1, 1, True, RP)),
    # --- batch / unbatched --------------------------------------------------
    ("batch5", C(5, 3, 7, 6, 4, 3, 1, 1)),
    ("batch0_zeros", C(0, 3, 7, 6, 4, 3, 1, 1)),
    ("batch0_reflect_same", C(0, 3, 7, 6, 4, 4, 1, "same", 1, 1, True, RF)),
    ("batch0_circular_g3", C(0, 3, 5, 5, 6, 3, 2, 2, 1, 3, False, CI)),
    ("unbatched", C(None, 3, 7, 8, 5, 3, 1, 1)),
    ("unbatched_reflect_g2", C(None, 4, 9, 7, 6, (3, 2), (2, 1), (1, 1), 1, 2, True, RF)),
    ("unbatched_same_circular", C(None, 5, 6, 6, 5, 4, 1, "same", 1, 5, False, CI)),
    ("unbatched_replicate_d2", C(None, 3, 5, 6, 4, 3, 1, 2, 2, 1, True, RP)),
    # --- degenerate spatial sizes -------------------------------------------
    ("in1x1_k3_p1", C(2, 3, 1, 1, 4, 3, 1, 1)),
    ("in1x1_k3_p1_circular", C(2, 3, 1, 1, 4, 3, 1, 1, 1, 1, True, CI)),
    ("in1x1_k1_p2_replicate", C(1, 3, 1, 1, 4, 1, 1, 2, 1, 1, True, RP)),
    ("in1x1_k2_p1", C(1, 2, 1, 1, 3, 2, 1, 1, 1, 1, False)),
    ("in1x1_k1", C(3, 5, 1, 1, 2, 1)),
    ("in1x3_k3_p1x0", C(2, 3, 1, 3, 2, 3, 1, (1, 0))),
    ("exact_cover_5x5", C(2, 3, 5, 5, 4, 5)),
    ("exact_cover_dilated", C(2, 3, 5, 5, 4, 3, 1, 0, 2)),
    ("exact_cover_3x4", C(None, 3, 3, 4, 2, (3, 4))),
    ("exact_cover_stride", C(2, 3, 5, 5, 4, 5, 3)),
    ("odd_sizes_17x13", C(2, 5, 17, 13, 3, 3, 2, 1, 1, 1, True, RF)),
    # --- larger than typical work-group tiles -------------------------------
    ("tile_37x45_c3to17", C(1, 3, 37, 45, 17, 3, 1, 1)),
    ("tile_cin67_cout33", C(1, 67, 9, 10, 33, 3, 1, 1, 1, 1, True, RP)),
    ("tile_cout70_k1", C(2, 40, 7, 9, 70, 1, 1, 0, 1, 1, False)),
    ("tile_33x65_s2_circular", C(1, 4, 33, 65, 9, 3, 2, 1, 1, 1, True, CI)),
]

# --- real-network layers (reduced batch / spatial size) ---------------------
NETWORKS = [
    ("resnet_stem_7x7_s2_p3", C(2, 3, 32, 32, 64, 7, 2, 3, 1, 1, False)),
    ("resnet_3x3_64", C(1, 64, 8, 8, 64, 3, 1, 1, 1, 1, False)),
    ("resnet_1x1_64to256", C(2, 64, 7, 7, 256, 1, 1, 0, 1, 1, False)),
    ("resnet_1x1_s2_downsample", C(2, 64, 8, 8, 128, 1, 2, 0, 1, 1, False)),
    ("mobilenet_dw3x3_s1", C(2, 32, 14, 14, 32, 3, 1, 1, 1, 32, False)),
    ("mobilenet_dw3x3_s2", C(2, 32, 15, 15, 32, 3, 2, 1, 1, 32, False)),
    ("mobilenet_pw_1x1", C(2, 32, 7, 7, 64, 1, 1, 0, 1, 1, True)),
    ("resnext_g32_3x3", C(1, 128, 7, 7, 128, 3, 1, 1, 1, 32, False)),
    ("resnext_g32_3x3_s2", C(1, 128, 8, 8, 128, 3, 2, 1, 1, 32, False)),
    ("deeplab_3x3_d2_p2", C(1, 32, 13, 13, 32, 3, 1, 2, 2, 1, True)),
    ("deeplab_3x3_d4_same", C(1, 16, 13, 12, 16, 3, 1, "same", 4, 1, True)),
    ("alexnet_11x11_s4_p2", C(1, 3, 63, 63, 64, 11, 4, 2, 1, 1, True)),
    ("inception_1x7_p0x3", C(2, 32, 9, 9, 32, (1, 7), 1, (0, 3), 1, 1, True)),
    ("inception_7x1_p3x0", C(2, 32, 9, 9, 32, (7, 1), 1, (3, 0), 1, 1, True)),
    ("unet_3x3_reflect", C(1, 16, 16, 16, 16, 3, 1, 1, 1, 1, True, RF)),
    ("cyclegan_7x7_reflect_p3", C(1, 3, 16, 16, 16, 7, 1, 3, 1, 1, True, RF)),
]

ALL = dict(MATRIX + NETWORKS)
assert len(ALL) == len(MATRIX) + len(NETWORKS), "duplicate case ids"


@pytest.mark.parametrize("case_id", list(ALL))
def test_float32(case_id):
    run_and_check(ALL[case_id], np.float32)


F64 = [
    "k1_pointwise", "k2_same_even", "k3_s2_p1_replicate", "k4_s3_p2_circular",
    "k5_mixed_s_d_pair_replicate_g2", "k6_same_d3_reflect_asym", "k11_exact_cover_1x1",
    "k5x2_same_d1x3_circular", "s1x2_d2x3_p3", "depthwise_mult3_c4_same_d2", "batch0_reflect_same",
    "unbatched_reflect_g2", "in1x1_k3_p1_circular", "tile_cin67_cout33", "resnext_g32_3x3",
    "alexnet_11x11_s4_p2",
]


@pytest.mark.parametrize("case_id", F64)
def test_float64(case_id):
    run_and_check(ALL[case_id], np.float64)


F16 = [
    "k1_pointwise", "k2_p1_reflect", "k3_p1_ch13to17", "k4_s3_p2_circular",
    "k6_same_d3_reflect_asym", "k11_same", "k3x7_s1x3_p2x0_circular", "g3_reflect",
    "depthwise_mult2_c3", "batch0_zeros", "unbatched_same_circular", "in1x1_k1_p2_replicate",
    "tile_cin67_cout33", "resnet_stem_7x7_s2_p3", "mobilenet_dw3x3_s2", "inception_7x1_p3x0",
]


@pytest.mark.parametrize("case_id", F16)
def test_float16(case_id):
    run_and_check(ALL[case_id], np.float16)


# --- non-contiguous inputs --------------------------------------------------
LAYOUTS = [
    ("k3_p1_ch13to17", "x_view"),
    ("k5_mixed_s_d_pair_replicate_g2", "x_view"),
    ("unbatched_reflect_g2", "x_view"),
    ("k4_s3_p2_circular", "w_view"),
    ("depthwise_mult3_c4_same_d2", "w_view"),
    ("k3x7_s1x3_p2x0_circular", "b_view"),
]


@pytest.mark.parametrize("case_id,layout", LAYOUTS)
def test_noncontiguous(case_id, layout):
    run_and_check(ALL[case_id], np.float32, layout=layout, salt=1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_noncontiguous_transposed_views(dtype):
    """Input built as a transposed (channels-last) view, weight as a transposed view."""
    dtype = np.dtype(dtype)
    if dtype == np.float64 and not fp64_supported():
        pytest.skip("no fp64")
    c = ALL["k3x1_s2x1_p1x0_replicate"]
    rng = rng_for("transposed", 3)
    x = rng.standard_normal((c.n, c.h, c.w, c.cin)).astype(dtype).transpose(0, 3, 1, 2)
    w = rng.standard_normal((c.kh, c.kw, c.cin, c.cout)).astype(dtype).transpose(3, 2, 0, 1)
    b = rng.standard_normal(c.cout).astype(dtype)
    assert not x.flags.c_contiguous and not w.flags.c_contiguous
    y = clconv.conv2d(x, w, b, **c.kwargs())
    assert_matches(y, x, w, b, dtype=dtype, label=f"transposed views {dtype}", **c.kwargs())
    # also a sliced (every other row / channel) input view
    big = rng.standard_normal((c.n, 2 * c.cin, 2 * c.h + 1, c.w)).astype(dtype)
    xs = big[:, ::2, 1::2, :]
    assert xs.shape == c.x_shape()
    y = clconv.conv2d(xs, w, b, **c.kwargs())
    assert_matches(y, xs, w, b, dtype=dtype, label=f"sliced view {dtype}", **c.kwargs())


def test_positional_arguments():
    run_and_check(ALL["k5_mixed_s_d_pair_replicate_g2"], np.float32, positional=True, salt=2)


def test_default_arguments():
    c = C(2, 3, 6, 5, 4, 3, bias=False)
    x, w, _ = make_data(c, np.float32)
    y = clconv.conv2d(x, w)
    assert_matches(y, x, w, None, dtype=np.float32, label="defaults")


# --- exactness with small-integer data --------------------------------------
EXACT = ["k3_p1_ch13to17", "k5_mixed_s_d_pair_replicate_g2", "depthwise_mult2_c3",
         "tile_cin67_cout33", "resnext_g32_3x3"]


@pytest.mark.parametrize("case_id", EXACT)
def test_integer_data_is_exact_float32(case_id):
    """All partial sums are small integers, so any direct summation is exact."""
    c = ALL[case_id]
    x, w, b = make_data(c, np.float32, rng_for(case_id, 5), "int")
    y = clconv.conv2d(x, w, b, **c.kwargs())
    ref = conv2d_reference(x, w, b, **c.kwargs())
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, ref.astype(np.float32), err_msg=c.label())


def test_float16_accumulates_in_float32():
    """Positive integer data whose partial sums exceed half's exact-integer range.

    With float32 accumulation every summation order is exact and the only error
    is the final rounding to half (<= 1 ulp); accumulating in half would drift
    by many ulps.
    """
    c = C(1, 128, 6, 6, 8, 3, 1, 1, 1, 1, True)
    rng = rng_for("f16acc", 0)
    x = rng.integers(1, 5, c.x_shape()).astype(np.float16)
    w = rng.integers(1, 9, c.w_shape()).astype(np.float16)
    b = rng.integers(0, 9, c.cout).astype(np.float16)
    y = clconv.conv2d(x, w, b, **c.kwargs())
    ref = conv2d_reference(x, w, b, **c.kwargs())
    assert ref.max() < 65504 and ref.max() > 4096
    assert y.dtype == np.float16
    err = np.abs(y.astype(np.float64) - ref)
    assert np.all(err <= 2.0**-10 * np.abs(ref)), (
        f"max error {err.max()} at {np.unravel_index(err.argmax(), err.shape)}, "
        f"ref {ref.reshape(-1)[err.argmax()]}, got {y.reshape(-1)[err.argmax()]}")


# --- NaN / inf propagation --------------------------------------------------
NONFINITE = [
    ("nf_zeros_p1", C(2, 3, 7, 6, 4, 3, 1, 1, 1, 1, True, Z)),
    ("nf_reflect_g2", C(2, 4, 7, 8, 6, 3, 1, 2, 1, 2, True, RF)),
    ("nf_replicate_s2", C(1, 3, 9, 8, 4, (3, 2), 2, (1, 2), 1, 1, False, RP)),
    ("nf_circular_same_d2", C(2, 3, 8, 7, 5, 3, 1, "same", 2, 1, True, CI)),
    ("nf_depthwise_mult2_valid", C(2, 4, 8, 9, 8, 3, (2, 1), "valid", (1, 2), 4, True, Z)),
    ("nf_unbatched_g3", C(None, 6, 7, 7, 6, 2, 1, "same", 1, 3, False, Z)),
]


def _inject_nonfinite(x, rng):
    x = x.copy()
    flat = x.reshape(-1)
    idx = rng.choice(flat.size, size=min(9, flat.size), replace=False)
    for i, j in enumerate(idx):
        flat[j] = (np.nan, np.inf, -np.inf)[i % 3]
    lead = (0,) * (x.ndim - 3)
    x[lead + (0, 0, 0)] = np.inf            # corners: padding modes copy them
    x[lead + (x.shape[-3] - 1, -1, -1)] = -np.inf
    return x


@pytest.mark.parametrize("case_id", [i for i, _ in NONFINITE])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_inf_propagation(case_id, dtype):
    dtype = np.dtype(dtype)
    if dtype == np.float64 and not fp64_supported():
        pytest.skip("no fp64")
    c = dict(NONFINITE)[case_id]
    rng = rng_for(case_id, 11)
    x, w, b = make_data(c, dtype, rng)
    x = _inject_nonfinite(x, rng)
    y = clconv.conv2d(x, w, b, **c.kwargs())
    assert y.dtype == dtype and y.shape == c.out_shape()
    ref = conv2d_reference(x, w, b, **c.kwargs())
    expected = [("reference", ref)]
    if HAVE_TORCH:
        expected.append(("torch", torch_conv2d(x, w, b, c)))
    for name, e in expected:
        for what, f in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
            diff = f(y) != f(e)
            assert not diff.any(), (
                f"{c.label()} {dtype}: {what} positions differ from {name} at "
                f"{[tuple(map(int, i)) for i in np.argwhere(diff)[:5]]} "
                f"(got {y[diff][:5]}, {name} {e[diff][:5]})")
    # finite outputs still match within the bound
    fin = np.isfinite(ref)
    assert fin.any()
    bound = conv2d_abs_bound(np.where(np.isfinite(x), x, 0), w, b, **c.kwargs())
    tol = tolerance(dtype, reduction_length(w, b), bound)
    err = np.abs(y.astype(np.float64) - ref)
    assert np.all(err[fin] <= tol[fin]), f"{c.label()}: finite outputs off by {err[fin].max()}"


def test_nan_inf_float16():
    c = C(2, 3, 7, 6, 4, 3, 1, 1, 1, 1, True, RF)
    rng = rng_for("nf16", 0)
    x, w, b = make_data(c, np.float16, rng)
    x = _inject_nonfinite(x, rng)
    y = clconv.conv2d(x, w, b, **c.kwargs())
    ref = conv2d_reference(x, w, b, **c.kwargs())
    assert y.dtype == np.float16
    for f in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(f(y), f(ref), err_msg=f.__name__)


# --- errors ----------------------------------------------------------------
def test_same_with_stride_is_an_error():
    x = np.ones((1, 2, 6, 6), np.float32)
    w = np.ones((2, 2, 3, 3), np.float32)
    with pytest.raises((ValueError, RuntimeError)):
        clconv.conv2d(x, w, stride=2, padding="same")
    with pytest.raises((ValueError, RuntimeError)):
        clconv.conv2d(x, w, stride=(1, 2), padding="same")
