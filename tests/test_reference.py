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


# ---------------------------------------------------------------------------
# Gradient references (tests/reference.py: conv2d_*_grad_ref)
# ---------------------------------------------------------------------------

from reference import (  # noqa: E402
    ACTIVATIONS,
    activation_ref,
    conv2d_bias_grad_abs_bound,
    conv2d_bias_grad_ref,
    conv2d_fused_reference,
    conv2d_input_grad_abs_bound,
    conv2d_input_grad_ref,
    conv2d_weight_grad_abs_bound,
    conv2d_weight_grad_ref,
    fused_tolerance,
    input_grad_reduction_length,
    source_index,
    weight_grad_reduction_length,
)


def test_source_index_hand_computed():
    assert source_index(3, 2, 2, "reflect").tolist() == [2, 1, 0, 1, 2, 1, 0]
    assert source_index(3, 2, 2, "replicate").tolist() == [0, 0, 0, 1, 2, 2, 2]
    assert source_index(3, 3, 1, "circular").tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert source_index(3, 1, 2, "zeros").tolist() == [-1, 0, 1, 2, -1, -1]
    with pytest.raises(ValueError):
        source_index(3, 3, 0, "reflect")
    with pytest.raises(ValueError):
        source_index(3, 0, 4, "circular")


def test_gradients_hand_computed_padding_modes():
    x = np.array([[[1.0, 2.0, 3.0]]])  # unbatched, 1 channel, 1x3
    w = np.array([[[[1.0, 10.0, 100.0]]]])
    g = np.ones((1, 1, 3))
    # out[k] = sum_j w[j] * xpad[k + j]; d/dx[s] sums w[j] over (k, j) whose padded
    # position k + j reads x[s]; d/dw[j] = sum_k xpad[k + j].
    exp_gx = {"zeros": [11, 111, 110], "reflect": [11, 212, 110],
              "replicate": [12, 111, 210], "circular": [111, 111, 111]}
    exp_gw = {"zeros": [3, 6, 5], "reflect": [5, 6, 7], "replicate": [4, 6, 8],
              "circular": [6, 6, 6]}
    for mode in exp_gx:
        gx = conv2d_input_grad_ref((1, 1, 3), w, g, padding=(0, 1), padding_mode=mode)
        assert gx.shape == (1, 1, 3)
        np.testing.assert_array_equal(gx[0, 0], exp_gx[mode], err_msg=mode)
        gw = conv2d_weight_grad_ref(x, (1, 1, 1, 3), g, padding=(0, 1), padding_mode=mode)
        assert gw.shape == (1, 1, 1, 3)
        np.testing.assert_array_equal(gw[0, 0, 0], exp_gw[mode], err_msg=mode)
    np.testing.assert_array_equal(conv2d_bias_grad_ref(np.arange(24.0).reshape(2, 3, 2, 2)),
                                  [(0 + 1 + 2 + 3) + (12 + 13 + 14 + 15),
                                   (4 + 5 + 6 + 7) + (16 + 17 + 18 + 19),
                                   (8 + 9 + 10 + 11) + (20 + 21 + 22 + 23)])
    np.testing.assert_array_equal(conv2d_bias_grad_ref(np.ones((3, 4, 5))), [20, 20, 20])


def test_input_grad_uncovered_rows_are_zero():
    # H = 10, k = 3, s = 3: rows 0..8 are read, row 9 never is.
    w = np.ones((2, 1, 3, 3))
    g = np.ones((1, 2, 3, 3))
    gx = conv2d_input_grad_ref((1, 1, 10, 11), w, g, stride=3)
    assert gx.shape == (1, 1, 10, 11)
    assert np.all(gx[:, :, 9, :] == 0) and np.all(gx[:, :, :, 9:] == 0)
    assert np.all(gx[:, :, :9, :9] == 2)


def test_reduction_lengths():
    # no padding, stride 1: an interior pixel gets Cout_g * KH * KW products
    assert input_grad_reduction_length((1, 4, 9, 9), (6, 2, 3, 3), groups=2) == 3 * 3 * 3
    # replicate padding 2 folds 3 padded columns/rows onto the corner
    n = input_grad_reduction_length((1, 1, 5, 5), (1, 1, 3, 3), padding=2,
                                    padding_mode="replicate")
    assert n == 9 * 4  # corner: 3x3 padded positions, each read by the taps that reach it
    assert weight_grad_reduction_length((2, 3, 4, 5)) == 40
    assert weight_grad_reduction_length((3, 4, 5)) == 20
    assert weight_grad_reduction_length((0, 3, 4, 5)) == 1


def test_gradient_reference_errors():
    w = np.ones((4, 3, 3, 3))
    with pytest.raises(ValueError, match="grad_output"):
        conv2d_input_grad_ref((2, 3, 7, 7), w, np.ones((2, 4, 6, 5)))
    with pytest.raises(ValueError, match="grad_output"):
        conv2d_weight_grad_ref(np.ones((2, 3, 7, 7)), (4, 3, 3, 3), np.ones((1, 4, 5, 5)))
    with pytest.raises(ValueError):
        conv2d_input_grad_ref((3, 7), w, np.ones((4, 5, 5)))
    with pytest.raises(ValueError):
        conv2d_input_grad_ref((2, 6, 7, 7), w, np.ones((2, 4, 5, 5)))
    with pytest.raises(ValueError):
        conv2d_weight_grad_ref(np.ones((2, 3, 7, 7)), (4, 3, 3), np.ones((2, 4, 5, 5)))
    with pytest.raises(ValueError):
        conv2d_bias_grad_ref(np.ones((4, 5)))


def _torch_grads(x, w, b, g, c):
    """(dx, dw, db) of sum(nn.Conv2d(padding_mode=...)(x) * g) by torch autograd."""
    torch = _torch()
    dt = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[x.dtype]
    m = torch.nn.Conv2d(c.cin, c.cout, (c.kh, c.kw), stride=c.stride, padding=c.padding,
                        dilation=c.dilation, groups=c.groups, bias=b is not None,
                        padding_mode=c.mode, dtype=dt)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(w))
        if b is not None:
            m.bias.copy_(torch.from_numpy(b))
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    m(xt).backward(torch.from_numpy(g))
    return (xt.grad.numpy(), m.weight.grad.numpy(),
            None if b is None else m.bias.grad.numpy())


GRAD_EXTRA = [
    C(2, 3, 10, 11, 4, 3, 3, 0, 1, 1, True, "zeros"),          # rows/cols never read
    C(1, 2, 10, 11, 3, 3, 3, 1, 1, 1, True, "reflect"),
    C(2, 2, 11, 9, 3, (2, 3), (3, 2), (1, 0), (2, 1), 1, True, "replicate"),
    C(2, 2, 3, 4, 3, 3, 1, (6, 4), 1, 1, True, "replicate"),   # heavy folding onto edges
    C(2, 2, 4, 3, 3, 3, 1, (4, 3), 1, 1, True, "circular"),    # circular pad == size
    C(2, 2, 4, 3, 3, 3, 1, (3, 2), 1, 1, True, "reflect"),     # reflect pad == size - 1
    C(2, 6, 7, 8, 12, 3, 2, 1, 1, 6, True, "circular"),        # depthwise multiplier 2
    C(None, 4, 8, 7, 4, (4, 2), 1, "same", (1, 2), 4, True, "reflect"),
    C(3, 5, 6, 7, 5, 1, 2, 0, 1, 1, True, "zeros"),            # 1x1, stride 2
]
GRAD_CASES = BROAD + GRAD_EXTRA


def _grad_data(c, dtype, salt=3):
    rng = rng_for(c.label(), salt)
    x, w, b = make_data(c, dtype, rng)
    g = rng.standard_normal(c.out_shape()).astype(dtype)
    return x, w, b, g


def _grad_checks(c, x, w, b, g):
    """[(name, reference, tolerance-for-dtype-fn)] for the three gradients."""
    kw = c.kwargs()
    xs = x.shape
    n_in = input_grad_reduction_length(xs, w.shape, **kw)
    n_w = weight_grad_reduction_length(g.shape)
    out = [
        ("input", conv2d_input_grad_ref(xs, w, g, **kw),
         lambda dt: tolerance(dt, n_in, conv2d_input_grad_abs_bound(xs, w, g, **kw))),
        ("weight", conv2d_weight_grad_ref(x, w.shape, g, **kw),
         lambda dt: tolerance(dt, n_w, conv2d_weight_grad_abs_bound(x, w.shape, g, **kw))),
    ]
    if b is not None:
        out.append(("bias", conv2d_bias_grad_ref(g),
                    lambda dt: tolerance(dt, n_w, conv2d_bias_grad_abs_bound(g))))
    return out


@pytest.mark.parametrize("c", GRAD_CASES, ids=[c.label() for c in GRAD_CASES])
def test_gradient_reference_matches_torch(c):
    torch = _torch()
    x, w, b, g = _grad_data(c, np.float64)
    t = _torch_grads(x, w, b, g, c)
    checks = _grad_checks(c, x, w, b, g)
    for (name, ref, tol), tg in zip(checks, t):
        assert ref.shape == tg.shape, name
        assert max_violation(ref, tg, tol(np.float64)) <= 1.0, name
    # torch.nn.grad (zeros padding given as numbers, batched)
    if c.mode == "zeros" and not isinstance(c.padding, str) and c.n is not None:
        tw, tg_ = torch.from_numpy(w), torch.from_numpy(g)
        args = (c.stride, c.padding, c.dilation, c.groups)
        gi = torch.nn.grad.conv2d_input(x.shape, tw, tg_, *args).numpy()
        gw = torch.nn.grad.conv2d_weight(torch.from_numpy(x), w.shape, tg_, *args).numpy()
        assert max_violation(checks[0][1], gi, checks[0][2](np.float64)) <= 1.0
        assert max_violation(checks[1][1], gw, checks[1][2](np.float64)) <= 1.0
    # a float32 implementation (torch CPU) fits the float32 bound
    x32, w32, b32, g32 = (None if a is None else a.astype(np.float32) for a in (x, w, b, g))
    t32 = _torch_grads(x32, w32, b32, g32, c)
    for (name, _, _), ref32, tg in zip(checks, _grad_checks(c, x32, w32, b32, g32), t32):
        assert max_violation(tg, ref32[1], ref32[2](np.float32)) <= 1.0, name + " float32"


@pytest.mark.parametrize("c", GRAD_CASES[::3], ids=[c.label() for c in GRAD_CASES[::3]])
def test_gradient_reference_is_the_adjoint_of_the_forward(c):
    """<conv(x, w), g> == <x, dx(g)> == <w, dw(x, g)>; torch-free."""
    x, w, _, g = _grad_data(c, np.float64, salt=4)
    kw = c.kwargs()
    y = conv2d_reference(x, w, None, **kw)
    lhs = float(np.sum(y * g))
    gx = conv2d_input_grad_ref(x.shape, w, g, **kw)
    gw = conv2d_weight_grad_ref(x, w.shape, g, **kw)
    scale = float(np.sum(np.abs(y) * np.abs(g))) + 1e-300
    assert abs(lhs - float(np.sum(x * gx))) <= 1e-12 * scale + 1e-300
    assert abs(lhs - float(np.sum(w * gw))) <= 1e-12 * scale + 1e-300


def test_gradient_reference_batch_zero_matches_torch():
    torch = _torch()
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3))
    g = np.zeros((0, 4, 5, 5))
    x = np.zeros((0, 3, 7, 7))
    gi = conv2d_input_grad_ref((0, 3, 7, 7), w, g)
    gw = conv2d_weight_grad_ref(x, (4, 3, 3, 3), g)
    ti = torch.nn.grad.conv2d_input((0, 3, 7, 7), torch.from_numpy(w), torch.from_numpy(g))
    tw = torch.nn.grad.conv2d_weight(torch.from_numpy(x), (4, 3, 3, 3), torch.from_numpy(g))
    assert gi.shape == tuple(ti.shape) == (0, 3, 7, 7)
    assert gw.shape == tuple(tw.shape) == (4, 3, 3, 3)
    np.testing.assert_array_equal(gw, tw.numpy())
    np.testing.assert_array_equal(gw, 0)
    np.testing.assert_array_equal(conv2d_bias_grad_ref(g), np.zeros(4))


# ---------------------------------------------------------------------------
# Fused epilogue reference
# ---------------------------------------------------------------------------

_TORCH_ACT = {"relu": "relu", "relu6": "relu6", "silu": "silu", "gelu": "gelu"}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_ref_matches_torch(name):
    torch = _torch()
    f = getattr(torch.nn.functional, _TORCH_ACT[name])
    z = np.concatenate([np.linspace(-12, 12, 2401), [-1e4, -50.0, -0.0, 0.0, 6.0, 1e4],
                        np.random.default_rng(2).standard_normal(500) * 3])
    r = activation_ref(name, z)
    t = f(torch.from_numpy(z)).numpy()
    # torch evaluates gelu as 0.5 z (1 + erf(z / sqrt 2)): cancellation costs ~ulp(|z|)
    assert np.all(np.abs(r - t) <= 4e-15 * np.abs(t) + 4 * 2.0**-53 * np.abs(z))
    special = np.array([np.nan, np.inf, -np.inf])
    np.testing.assert_array_equal(activation_ref(name, special),
                                  f(torch.from_numpy(special)).numpy())
    # float32 torch fits the evaluation-error allowance of fused_tolerance (64 ulp)
    z32 = z.astype(np.float32)
    t32 = f(torch.from_numpy(z32)).numpy().astype(np.float64)
    r32 = activation_ref(name, z32)
    assert np.all(np.abs(t32 - r32) <= 64 * 2.0**-24 * (np.abs(z32) + np.abs(r32)) + 1e-37)


def test_activation_ref_hand_values():
    z = np.array([-2.0, 0.0, 3.0, 7.0])
    np.testing.assert_array_equal(activation_ref("relu", z), [0, 0, 3, 7])
    np.testing.assert_array_equal(activation_ref("relu6", z), [0, 0, 3, 6])
    np.testing.assert_allclose(activation_ref("silu", z), z / (1 + np.exp(-z)), rtol=1e-15)
    np.testing.assert_allclose(activation_ref("gelu", np.array([1.0])),
                               [0.8413447460685429], rtol=1e-15)
    np.testing.assert_array_equal(activation_ref(None, z), z)
    with pytest.raises(ValueError):
        activation_ref("tanh", z)


@pytest.mark.parametrize("act", (None,) + ACTIVATIONS)
def test_fused_reference_matches_torch(act):
    torch = _torch()
    c = C(2, 4, 7, 6, 6, 3, 1, 1, 1, 2, True, "reflect")
    rng = rng_for("fused" + str(act), 0)
    x, w, b = make_data(c, np.float64, rng)
    r = rng.standard_normal(c.out_shape())
    y = conv2d_fused_reference(x, w, b, r, act, **c.kwargs())
    z = torch.from_numpy(torch_conv2d(x, w, b, c) + r)
    t = z.numpy() if act is None else getattr(torch.nn.functional, _TORCH_ACT[act])(z).numpy()
    tol = fused_tolerance(np.float64, x, w, b, r, act, **c.kwargs())
    assert max_violation(y, t, tol) <= 1.0
    # a float32 torch pipeline (conv, + residual, act, each rounded) fits the float32 bound
    x32, w32, b32, r32 = (a.astype(np.float32) for a in (x, w, b, r))
    z32 = torch.from_numpy(torch_conv2d(x32, w32, b32, c)) + torch.from_numpy(r32)
    t32 = z32.numpy() if act is None else getattr(torch.nn.functional, _TORCH_ACT[act])(z32).numpy()
    y32 = conv2d_fused_reference(x32, w32, b32, r32, act, **c.kwargs())
    assert max_violation(t32, y32, fused_tolerance(np.float32, x32, w32, b32, r32, act,
                                                   **c.kwargs())) <= 1.0
    with pytest.raises(ValueError):
        conv2d_fused_reference(x, w, b, r[:, :, :-1], act, **c.kwargs())
