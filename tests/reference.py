"""Independent NumPy oracle for ``clconv.conv2d`` (torch.nn.Conv2d semantics).

Nothing here imports or shares code with the ``clconv`` package.  The
reference is written from the torch.nn.Conv2d documentation
(/work/shared/spec/torch-nn-Conv2d.txt) plus PyTorch's documented/observed
behaviour where the spec is silent:

* ``padding`` may be an int, a pair, ``'valid'`` (no padding) or ``'same'``
  (only for stride 1).  For ``'same'`` the total padding per dimension is
  ``dilation * (kernel - 1)``; ``total // 2`` goes to the top/left and the
  remainder (one more for an odd total) to the bottom/right.
* ``padding_mode`` other than ``'zeros'`` is "pad the input explicitly with
  that mode, then run a padding-0 convolution" (torch.nn.Conv2d does
  ``F.conv2d(F.pad(x, pad, mode), ..., padding=0)``).  The NumPy equivalents
  are ``reflect`` -> ``'reflect'``, ``replicate`` -> ``'edge'``,
  ``circular`` -> ``'wrap'``.  torch refuses reflect padding >= the input
  size and circular padding > the input size; so does this reference.
* Unbatched input (C, H, W) gives unbatched output (C_out, H_out, W_out).

Everything is computed in float64 and returned as float64.

Error model used by the tests
-----------------------------
For a direct summation of ``n`` products in a floating-point format with unit
roundoff ``u`` (in any order, with or without FMA) the classic bound is

    |fl(sum a_i b_i) - sum a_i b_i| <= gamma_n * sum |a_i| |b_i|,
    gamma_n = n u / (1 - n u).

``conv2d_abs_bound`` returns exactly ``sum |a_i||b_i|`` (+ |bias|) for every
output element (the same convolution applied to |x|, |w|, |bias|, which
commutes with every padding mode), and ``tolerance`` turns it into an
element-wise tolerance:  gamma for the device accumulation (float32 for
float16/float32 data, float64 for float64 data), times a safety factor of 2,
plus the reference's own float64 error, plus one rounding of the output to
half precision for float16, plus a tiny absolute term that allows the device
to flush subnormals to zero.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = [
    "PAD_MODES",
    "NUMPY_PAD_MODE",
    "pair",
    "resolve_padding",
    "output_size",
    "conv2d_reference",
    "conv2d_abs_bound",
    "reduction_length",
    "tolerance",
    "assert_matches",
    "max_violation",
]

PAD_MODES = ("zeros", "reflect", "replicate", "circular")
NUMPY_PAD_MODE = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}

# Unit roundoffs.
_U = {
    np.dtype(np.float16): 2.0**-11,
    np.dtype(np.float32): 2.0**-24,
    np.dtype(np.float64): 2.0**-53,
}


def pair(v, name="argument"):
    """int or 2-sequence of ints -> (a, b) tuple of Python ints."""
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return (int(v), int(v))
    try:
        a, b = v
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    for t in (a, b):
        if not isinstance(t, numbers.Integral) or isinstance(t, bool):
            raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return (int(a), int(b))


def resolve_padding(padding, kernel_size, stride=1, dilation=1):
    """Return ((top, bottom), (left, right)) explicit padding amounts."""
    kh, kw = pair(kernel_size, "kernel_size")
    sh, sw = pair(stride, "stride")
    dh, dw = pair(dilation, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            if (sh, sw) != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            th, tw = dh * (kh - 1), dw * (kw - 1)
            return (th // 2, th - th // 2), (tw // 2, tw - tw // 2)
        raise ValueError(f"invalid padding string {padding!r}")
    ph, pw = pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError("negative padding")
    return (ph, ph), (pw, pw)


def output_size(in_size, pad_lo, pad_hi, kernel, stride, dilation):
    """Spec formula: floor((H + pads - d*(k-1) - 1) / s) + 1 (may be <= 0)."""
    return (in_size + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


def _prepare(x, w, bias, stride, padding, dilation, groups, padding_mode):
    x = np.asarray(x)
    w = np.asarray(w)
    unbatched = x.ndim == 3
    if unbatched:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"input must be 3-D or 4-D, got shape {x.shape}")
    if w.ndim != 4:
        raise ValueError(f"weight must be 4-D, got shape {w.shape}")
    n, cin, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    groups = int(groups)
    if groups < 1 or cin % groups or cout % groups:
        raise ValueError(f"channels ({cin}, {cout}) not divisible by groups={groups}")
    if cin_g * groups != cin:
        raise ValueError(f"weight expects {cin_g * groups} input channels, input has {cin}")
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (cout,):
            raise ValueError(f"bias must have shape ({cout},), got {bias.shape}")
    sh, sw = pair(stride, "stride")
    dh, dw = pair(dilation, "dilation")
    if min(sh, sw, dh, dw) < 1:
        raise ValueError("stride and dilation must be >= 1")
    if padding_mode not in PAD_MODES:
        raise ValueError(f"invalid padding_mode {padding_mode!r}")
    (pt, pb), (pl, pr) = resolve_padding(padding, (kh, kw), (sh, sw), (dh, dw))
    if padding_mode == "reflect" and (max(pt, pb) >= h or max(pl, pr) >= wd):
        raise ValueError("reflect padding must be smaller than the input size")
    if padding_mode == "circular" and (max(pt, pb) > h or max(pl, pr) > wd):
        raise ValueError("circular padding must not exceed the input size")
    ho = output_size(h, pt, pb, kh, sh, dh)
    wo = output_size(wd, pl, pr, kw, sw, dw)
    if ho < 1 or wo < 1:
        raise ValueError(f"output size ({ho}, {wo}) is too small")
    return dict(
        x=x, w=w, bias=bias, unbatched=unbatched, n=n, cin=cin, cout=cout,
        cin_g=cin_g, kh=kh, kw=kw, sh=sh, sw=sw, dh=dh, dw=dw, groups=groups,
        pads=((pt, pb), (pl, pr)), ho=ho, wo=wo, padding_mode=padding_mode,
    )


def _conv(p):
    x = p["x"].astype(np.float64)
    w = p["w"].astype(np.float64)
    n, cout, ho, wo, g = p["n"], p["cout"], p["ho"], p["wo"], p["groups"]
    if n == 0:
        out = np.zeros((0, cout, ho, wo), dtype=np.float64)
    else:
        (pt, pb), (pl, pr) = p["pads"]
        widths = ((0, 0), (0, 0), (pt, pb), (pl, pr))
        if p["padding_mode"] == "zeros":
            xp = np.pad(x, widths, mode="constant", constant_values=0.0)
        else:
            xp = np.pad(x, widths, mode=NUMPY_PAD_MODE[p["padding_mode"]])
        cin_g, cout_g = p["cin_g"], cout // g
        sh, sw, dh, dw = p["sh"], p["sw"], p["dh"], p["dw"]
        wg = w.reshape(g, cout_g, cin_g, p["kh"], p["kw"])
        out = np.zeros((n, g, cout_g, ho * wo), dtype=np.float64)
        for i in range(p["kh"]):
            r0 = i * dh
            for j in range(p["kw"]):
                c0 = j * dw
                # Input pixels seen by tap (i, j) for every output pixel.
                tap = xp[:, :, r0 : r0 + (ho - 1) * sh + 1 : sh, c0 : c0 + (wo - 1) * sw + 1 : sw]
                tap = tap.reshape(n, g, cin_g, ho * wo)
                # (1, G, Cout_g, Cin_g) @ (N, G, Cin_g, P) -> (N, G, Cout_g, P)
                out += np.matmul(wg[None, :, :, :, i, j], tap)
        out = out.reshape(n, cout, ho, wo)
    if p["bias"] is not None:
        out = out + p["bias"].astype(np.float64)[None, :, None, None]
    if p["unbatched"]:
        out = out[0]
    return out


def conv2d_reference(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1,
                     padding_mode="zeros"):
    """torch.nn.Conv2d forward in float64 (returns float64)."""
    p = _prepare(x, w, bias, stride, padding, dilation, groups, padding_mode)
    return _conv(p)


def conv2d_abs_bound(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1,
                     padding_mode="zeros"):
    """Element-wise sum of |x_i * w_i| (+ |bias|) over each output's reduction."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    w = np.abs(np.asarray(w, dtype=np.float64))
    if bias is not None:
        bias = np.abs(np.asarray(bias, dtype=np.float64))
    p = _prepare(x, w, bias, stride, padding, dilation, groups, padding_mode)
    return _conv(p)


def reduction_length(w, bias=None):
    """Number of terms summed per output element: C_in/groups * KH * KW (+1 for bias)."""
    _, cin_g, kh, kw = np.shape(w)
    return cin_g * kh * kw + (0 if bias is None else 1)


def _gamma(n, u):
    return n * u / (1.0 - n * u)


def tolerance(dtype, n_terms, bound):
    """Element-wise absolute tolerance for an output of ``dtype``.

    ``bound`` is ``conv2d_abs_bound(...)``; ``n_terms`` is ``reduction_length``.
    """
    dtype = np.dtype(dtype)
    if dtype not in _U:
        raise TypeError(f"unsupported dtype {dtype}")
    acc = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
    n = n_terms + 1
    rel = 2.0 * _gamma(n, _U[acc]) + _gamma(n, _U[np.dtype(np.float64)])
    tiny = n * float(np.finfo(acc).tiny)
    if dtype == np.float16:
        rel += _U[dtype]  # final rounding of the float32 result to half
        tiny += float(np.finfo(np.float16).tiny)  # output may be flushed to zero
    return rel * bound + tiny


def max_violation(got, expected, tol):
    """max(|got - expected| / tol) over finite entries (<= 1 means pass)."""
    got = np.asarray(got, dtype=np.float64)
    err = np.abs(got - expected)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = err / tol
    return float(np.max(r)) if r.size else 0.0


def assert_matches(got, x, w, bias=None, *, stride=1, padding=0, dilation=1,
                   groups=1, padding_mode="zeros", dtype=None, expected=None,
                   tol_scale=1.0, label=""):
    """Assert ``got`` equals the reference conv within the rounding bound.

    Checks type, dtype (``dtype`` or the input's), shape and values.  If
    ``expected`` is given (e.g. torch's output) it is compared instead of the
    reference, with the same bound scaled by ``tol_scale``.
    """
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
              padding_mode=padding_mode)
    dtype = np.dtype(np.asarray(x).dtype if dtype is None else dtype)
    ref = conv2d_reference(x, w, bias, **kw) if expected is None else np.asarray(expected, np.float64)
    assert isinstance(got, np.ndarray), f"{label}: expected numpy.ndarray, got {type(got)}"
    assert got.dtype == dtype, f"{label}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref.shape, f"{label}: shape {got.shape}, expected {ref.shape}"
    if ref.size == 0:
        return
    bound = conv2d_abs_bound(x, w, bias, **kw)
    tol = tol_scale * tolerance(dtype, reduction_length(w, bias), bound)
    g = got.astype(np.float64)
    err = np.abs(g - ref)
    bad = ~(err <= tol)  # also catches NaN in got
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        worst = np.unravel_index(np.nanargmax(np.where(bad, err / tol, -1.0)), err.shape) \
            if np.isfinite(err[bad]).any() else idx
        worst = tuple(int(i) for i in worst)
        raise AssertionError(
            f"{label}: {int(bad.sum())}/{bad.size} elements out of tolerance "
            f"(dtype {dtype}, shape {ref.shape}); first bad index {idx}: got {g[idx]!r}, "
            f"expected {ref[idx]!r}, tol {tol[idx]:.3g}; worst {worst}: got {g[worst]!r}, "
            f"expected {ref[worst]!r}, |err| {err[worst]:.3g}, tol {tol[worst]:.3g}"
        )
