"""Validate the NumPy oracle (tests/reference.py) itself.

The torch-free tests check the oracle against hand-computed results; the rest
prove it against torch.nn.Conv2d / torch.nn.functional.conv2d in float64 over
a broad set of configurations (including every configuration of the random
sweep), and check that the error bound is not tighter than what a real
float32 implementation (torch on CPU) achieves.
"""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reference import (  # noqa: E402
    conv2d_abs_bound,
    conv2d_reference,
    max_violation,
    reduction_length,
    resolve_padding,
    tolerance,
)
from _cases import Conv, make_data, rng_for, sweep_configs, torch_conv2d  # noqa: E402


# ---------------------------------------------------------------------------
# torch-free checks
# ---------------------------------------------------------------------------

def test_hand_computed_small():
    x = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)
    w = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    y = conv2d_reference(x, w, np.array([0.5]))
    # out[i,j] = x[i,j] + 2 x[i,j+1] + 3 x[i+1,j] + 4 x[i+1,j+1] + 0.5
    expected = np.array([[[[0 + 2 + 9 + 16, 1 + 4 + 12 + 20], [3 + 8 + 18 + 28, 4 + 10 + 21 + 32]]]]) + 0.5
    np.testing.assert_array_equal(y, expected)


def test_hand_computed_padding_modes():
    x = np.array([[[1.0, 2.0, 3.0]]])  # unbatched, 1 channel, 1x3
    w = np.array([[[[1.0, 10.0, 100.0]]]])  # 1x3 kernel
    exp = {
        "zeros": [0 * 1 + 1 * 10 + 2 * 100, 1 + 20 + 300, 2 + 30 + 0],
        "reflect": [2 * 1 + 1 * 10 + 2 * 100, 1 + 20 + 300, 2 + 30 + 2 * 100],
        "replicate": [1 + 10 + 200, 1 + 20 + 300, 2 + 30 + 300],
        "circular": [3 + 10 + 200, 1 + 20 + 300, 2 + 30 + 100],
    }
    for mode, e in exp.items():
        y = conv2d_reference(x, w, padding=(0, 1), padding_mode=mode)
        assert y.shape == (1, 1, 3)
        np.testing.assert_array_equal(y[0, 0], e, err_msg=mode)


def test_hand_computed_stride_dilation_groups():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 9, 8))
    w = rng.standard_normal((6, 2, 2, 3))
    b = rng.standard_normal(6)
    y = conv2d_reference(x, w, b, stride=(2, 3), padding=(1, 2), dilation=(3, 2), groups=2)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (2, 2)))
    ho = (9 + 2 - 3 * 1 - 1) // 2 + 1
    wo = (8 + 4 - 2 * 2 - 1) // 3 + 1
    assert y.shape == (2, 6, ho, wo)
    e = np.zeros_like(y)
    for n in range(2):
        for o in range(6):
            g = o // 3
            for i in range(ho):
                for j in range(wo):
                    s = b[o]
                    for c in range(2):
                        for a in range(2):
                            for bb in range(3):
                                s += w[o, c, a, bb] * xp[n, 2 * g + c, i * 2 + a * 3, j * 3 + bb * 2]
                    e[n, o, i, j] = s
    np.testing.assert_allclose(y, e, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("k,d,expected", [
    (1, 1, (0, 0)), (2, 1, (0, 1)), (3, 1, (1, 1)), (4, 1, (1, 2)), (4, 2, (3, 3)),
    (4, 3, (4, 5)), (2, 3, (1, 2)), (5, 2, (4, 4)), (6, 1, (2, 3)), (11, 1, (5, 5)),
])
def test_same_padding_split(k, d, expected):
    assert resolve_padding("same", k, 1, d) == (expected, expected)


def test_same_padding_rejects_stride():
    with pytest.raises(ValueError):
        resolve_padding("same", 3, (1, 2), 1)


@pytest.mark.parametrize("mode,pad,size,ok", [
    ("reflect", 2, 3, True), ("reflect", 3, 3, False), ("circular", 3, 3, True),
    ("circular", 4, 3, False), ("replicate", 9, 1, True),
])
def test_padding_mode_size_limits(mode, pad, size, ok):
    x = np.ones((1, 1, size, size))
    w = np.ones((1, 1, 1, 1))
    if ok:
        assert conv2d_reference(x, w, padding=pad, padding_mode=mode).shape == (1, 1, size + 2 * pad, size + 2 * pad)
    else:
        with pytest.raises(ValueError):
            conv2d_reference(x, w, padding=pad, padding_mode=mode)


def test_output_too_small_rejected():
    with pytest.raises(ValueError):
        conv2d_reference(np.ones((1, 1, 2, 5)), np.ones((1, 1, 3, 3)))


def test_batch_zero_and_unbatched_shapes():
    w = np.ones((6, 1, 3, 3))
    assert conv2d_reference(np.ones((0, 3, 5, 5)), w, groups=3, padding=1,
                            padding_mode="reflect").shape == (0, 6, 5, 5)
    assert conv2d_reference(np.ones((3, 5, 5)), w, groups=3).shape == (6, 3, 3)


def test_abs_bound_dominates_and_tolerance_positive():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 7, 6))
    w = rng.standard_normal((4, 3, 3, 2))
    b = rng.standard_normal(4)
    for mode in ("zeros", "reflect", "replicate", "circular"):
        y = conv2d_reference(x, w, b, padding=1, padding_mode=mode)
        bound = conv2d_abs_bound(x, w, b, padding=1, padding_mode=mode)
        assert np.all(np.abs(y) <= bound * (1 + 1e-12))
        for dt in (np.float16, np.float32, np.float64):
            tol = tolerance(dt, reduction_length(w, b), bound)
            assert np.all(tol > 0)
    # float32 tolerance is ~ (2n) * 2^-24 relative: principled, not loose.
    t = tolerance(np.float32, 27, np.ones(1))[0]
    assert 27 * 2.0**-24 < t < 100 * 2.0**-24


# ---------------------------------------------------------------------------
# Against torch (float64)
# ---------------------------------------------------------------------------

C = Conv
BROAD = [
    # every padding mode with int / pair / asymmetric pair padding
    *[C(2, 3, 7, 8, 5, 3, 1, 1, 1, 1, True, m) for m in ("zeros", "reflect", "replicate", "circular")],
    *[C(2, 4, 9, 6, 6, (3, 2), (2, 1), (2, 1), (1, 2), 2, False, m)
      for m in ("zeros", "reflect", "replicate", "circular")],
    *[C(1, 3, 5, 4, 2, 5, 1, (4, 3), 1, 1, True, m) for m in ("zeros", "reflect", "replicate", "circular")],
    *[C(3, 2, 4, 4, 3, 1, (1, 3), (0, 3), 1, 1, True, m) for m in ("zeros", "replicate", "circular")],
    # 'same', even kernels, dilation, all modes
    *[C(2, 3, 9, 10, 4, k, 1, "same", d, 1, True, m)
      for k in (2, 4, (2, 5), (6, 3)) for d in (1, 2, 3, (3, 1))
      for m in ("zeros", "reflect", "replicate", "circular")],
    # 'valid'
    *[C(2, 3, 8, 7, 4, (3, 4), (2, 3), "valid", (1, 2), 1, True, m) for m in ("zeros", "reflect")],
    # groups / depthwise / multiplier
    C(2, 6, 7, 7, 9, 3, 1, 1, 1, 3, True, "zeros"),
    C(2, 5, 7, 7, 5, 3, 2, 1, 1, 5, True, "reflect"),
    C(2, 4, 8, 6, 8, (3, 5), 1, "same", 2, 4, True, "circular"),
    C(2, 3, 6, 6, 9, 2, 1, "same", 1, 3, False, "replicate"),
    C(1, 8, 5, 5, 4, 1, 1, 0, 1, 4, True, "zeros"),
    # unbatched, batch 0, 1x1 input, kernel covering the input
    C(None, 3, 6, 5, 4, 3, 1, 1, 1, 1, True, "reflect"),
    C(None, 4, 6, 5, 8, 3, (2, 1), (1, 2), 2, 4, False, "circular"),
    C(0, 3, 6, 5, 4, 3, 1, 1, 1, 1, True, "reflect"),
    C(0, 3, 6, 5, 4, 3, 1, "same", 1, 1, True, "zeros"),
    C(2, 2, 1, 1, 3, 3, 1, 1, 1, 1, True, "zeros"),
    C(2, 2, 1, 1, 3, 3, 1, 1, 1, 1, True, "circular"),
    C(2, 2, 1, 1, 3, 1, 1, 2, 1, 1, True, "replicate"),
    C(2, 3, 5, 7, 2, (5, 7), 1, 0, 1, 1, True, "zeros"),
    C(1, 3, 11, 11, 4, 11, 4, 2, 1, 1, True, "zeros"),
]


def _torch():
    return pytest.importorskip("torch")


def check_against_torch_float64(c):
    """The reference equals torch.nn.Conv2d in float64 within the float64 bound."""
    x, w, b = make_data(c, np.float64)
    y = conv2d_reference(x, w, b, **c.kwargs())
    t = torch_conv2d(x, w, b, c)
    assert y.shape == t.shape == c.out_shape()
    bound = conv2d_abs_bound(x, w, b, **c.kwargs())
    assert max_violation(y, t, tolerance(np.float64, reduction_length(w, b), bound)) <= 1.0
    return x, w, b, y, bound


@pytest.mark.parametrize("c", BROAD, ids=[c.label() for c in BROAD])
def test_reference_matches_torch_broad(c):
    torch = _torch()
    x, w, b, y, bound = check_against_torch_float64(c)
    if c.mode == "zeros":
        # functional form as well
        ft = torch.nn.functional.conv2d(
            torch.from_numpy(x), torch.from_numpy(w), None if b is None else torch.from_numpy(b),
            c.stride, c.padding, c.dilation, c.groups).numpy()
        assert max_violation(y, ft, tolerance(np.float64, reduction_length(w, b), bound)) <= 1.0


SWEEP = sweep_configs()


@pytest.mark.parametrize("c", [c for _, c, _ in SWEEP], ids=[i for i, _, _ in SWEEP])
def test_reference_matches_torch_sweep(c):
    _torch()
    check_against_torch_float64(c)
    # A real float32 implementation (torch CPU) must fit the float32 bound,
    # otherwise the bound would be unfairly tight.
    x32, w32, b32 = make_data(c, np.float32)
    t32 = torch_conv2d(x32, w32, b32, c)
    y32 = conv2d_reference(x32, w32, b32, **c.kwargs())
    bound32 = conv2d_abs_bound(x32, w32, b32, **c.kwargs())
    assert max_violation(t32, y32, tolerance(np.float32, reduction_length(w32, b32), bound32)) <= 1.0


def test_reference_errors_agree_with_torch():
    torch = _torch()
    bad = [
        C(1, 2, 3, 5, 2, 3, 1, 3, 1, 1, True, "reflect"),      # reflect pad == size
        C(1, 2, 3, 5, 2, 3, 1, (1, 6), 1, 1, True, "circular"),  # circular pad > size
        C(1, 2, 2, 5, 2, 3, 1, 0, 1, 1, True, "zeros"),        # kernel larger than input
    ]
    for c in bad:
        x, w, b = make_data(c, np.float64)
        with pytest.raises(ValueError):
            conv2d_reference(x, w, b, **c.kwargs())
        with pytest.raises((RuntimeError, ValueError)):
            torch_conv2d(x, w, b, c)
    with pytest.raises(ValueError):
        torch.nn.Conv2d(2, 2, 3, stride=2, padding="same")
    with pytest.raises(ValueError):
        conv2d_reference(np.ones((1, 2, 5, 5)), np.ones((2, 2, 3, 3)), stride=2, padding="same")


NONFINITE = [
    C(2, 3, 7, 6, 4, 3, 1, 1, 1, 1, True, m) for m in ("zeros", "reflect", "replicate", "circular")
] + [
    C(2, 4, 8, 7, 8, (3, 2), (2, 1), "valid", (1, 2), 4, False, "zeros"),
    C(1, 6, 9, 9, 6, 3, 1, "same", 2, 3, True, "reflect"),
]


def inject_nonfinite(x, rng, count=4):
    """Put NaN, +inf and -inf at random positions, including the borders."""
    x = x.copy()
    flat = x.reshape(-1)
    idx = rng.choice(flat.size, size=min(3 * count, flat.size), replace=False)
    vals = [np.nan, np.inf, -np.inf]
    for i, j in enumerate(idx):
        flat[j] = vals[i % 3]
    # Corners of a channel so that padding modes copy them.
    x[(0,) * (x.ndim - 3) + (0, 0, 0)] = np.inf
    x[(0,) * (x.ndim - 3) + (x.shape[-3] - 1, -1, -1)] = -np.inf
    return x


@pytest.mark.parametrize("c", NONFINITE, ids=[c.label() for c in NONFINITE])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_reference_nonfinite_matches_torch(c, dtype):
    _torch()
    rng = rng_for(c.label(), 7)
    x, w, b = make_data(c, dtype, rng)
    x = inject_nonfinite(x, rng)
    y = conv2d_reference(x, w, b, **c.kwargs())
    t = torch_conv2d(x, w, b, c)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(t))
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(t))
    np.testing.assert_array_equal(np.isneginf(y), np.isneginf(t))
    assert np.isnan(y).any() and np.isinf(y).any() and np.isfinite(y).any()
