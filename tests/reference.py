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

Gradients
---------
``conv2d_input_grad_ref`` / ``conv2d_weight_grad_ref`` / ``conv2d_bias_grad_ref``
are the gradients of the forward above (torch.nn.grad.conv2d_input /
conv2d_weight for ``padding_mode='zeros'``, autograd through
torch.nn.Conv2d(padding_mode=...) otherwise), written from first principles:

* input gradient: every output gradient ``g[n, o, oh, ow]`` times
  ``w[o, c, i, j]`` is scattered (added) into the *padded* input at
  ``(oh * sh + i * dh, ow * sw + j * dw)``; then every padded position is
  folded back onto the input position it was read from (``source_index``:
  an explicit index map per padding mode, independent of ``np.pad``),
  positions that read a zero are dropped.
* weight gradient: ``sum_{n, oh, ow} g[n, o, oh, ow] * xpad[n, c, ...]``
  with the padded input gathered through the same index maps.
* bias gradient: ``g`` summed over batch and space.

Each is again a sum of products, so the forward's error model applies
unchanged: ``*_abs_bound`` is the same computation on |operands| and
``*_reduction_length`` is the number of products per result element (for the
input gradient the exact maximum, counting the extra terms a padded border
folds onto an edge pixel).

Fused epilogue
--------------
``conv2d_fused_reference`` is ``act(conv + bias + residual)`` with
``activation_ref`` (relu, relu6, silu = z * sigmoid(z), gelu = exact erf
form).  ``fused_tolerance`` propagates the pre-activation bound through the
activation's Lipschitz constant and adds the activation's own evaluation error
(OpenCL allows exp 3 ulp, erf 16 ulp, divide 2.5 ulp; 64 ulp of the
accumulation format times (|z| + |act(z)|) is allowed).
"""

from __future__ import annotations

import math
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
    "source_index",
    "conv2d_input_grad_ref",
    "conv2d_weight_grad_ref",
    "conv2d_bias_grad_ref",
    "conv2d_input_grad_abs_bound",
    "conv2d_weight_grad_abs_bound",
    "conv2d_bias_grad_abs_bound",
    "input_grad_reduction_length",
    "weight_grad_reduction_length",
    "ACTIVATIONS",
    "activation_ref",
    "activation_grad_ref",
    "batch_norm_train_ref",
    "batch_norm_train_grad_ref",
    "conv2d_fused_reference",
    "fused_tolerance",
    "assert_within",
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


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------

def source_index(size, lo, hi, mode):
    """For each of the ``lo + size + hi`` padded positions along one axis, the
    input position it reads (``-1``: it reads a zero).

    Written out per mode (torch's single reflection / clamp / wrap), not via
    ``np.pad``.
    """
    out = np.empty(lo + size + hi, dtype=np.int64)
    for r in range(lo + size + hi):
        t = r - lo
        if 0 <= t < size:
            s = t
        elif mode == "zeros":
            s = -1
        elif mode == "reflect":          # mirror without repeating the edge
            s = -t if t < 0 else 2 * (size - 1) - t
        elif mode == "replicate":        # clamp to the edge
            s = 0 if t < 0 else size - 1
        elif mode == "circular":         # wrap around once
            s = t + size if t < 0 else t - size
        else:
            raise ValueError(f"invalid padding_mode {mode!r}")
        if mode != "zeros" and not 0 <= s < size:
            raise ValueError(f"{mode} padding ({lo}, {hi}) too large for size {size}")
        out[r] = s
    return out


def _shape_only(shape, name):
    """A read-only zero array of ``shape`` (for shape validation through _prepare)."""
    try:
        shape = tuple(int(v) for v in shape)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of ints, got {shape!r}")
    if any(v < 0 for v in shape):
        raise ValueError(f"{name} has a negative extent: {shape}")
    return np.broadcast_to(np.float64(0.0), shape)


def _grad_out(p, grad_out):
    """grad_out as float64 (N, C_out, Ho, Wo), checked against the problem's output."""
    g = np.asarray(grad_out)
    expected = (p["cout"], p["ho"], p["wo"])
    if not p["unbatched"]:
        expected = (p["n"],) + expected
    if g.shape != expected:
        raise ValueError(f"grad_output has shape {g.shape}, the convolution's output is {expected}")
    g = g.astype(np.float64)
    return g[None] if p["unbatched"] else g


def _input_grad(p, g):
    n, cin, cout, grp = p["n"], p["cin"], p["cout"], p["groups"]
    cin_g, cout_g = p["cin_g"], cout // grp
    kh, kw, sh, sw, dh, dw = p["kh"], p["kw"], p["sh"], p["sw"], p["dh"], p["dw"]
    ho, wo = p["ho"], p["wo"]
    (pt, pb), (pl, pr) = p["pads"]
    h, wd = p["x"].shape[2], p["x"].shape[3]
    hp, wp = h + pt + pb, wd + pl + pr
    w = p["w"].astype(np.float64).reshape(grp, cout_g, cin_g, kh, kw)
    gg = g.reshape(n, grp, cout_g, ho * wo)
    # 1. scatter-add into the padded input
    gpad = np.zeros((n, grp, cin_g, hp, wp), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            # (1, G, Cin_g, Cout_g) @ (N, G, Cout_g, P) -> (N, G, Cin_g, P)
            contrib = np.matmul(np.swapaxes(w[None, :, :, :, i, j], -1, -2), gg)
            gpad[:, :, :, i * dh: i * dh + (ho - 1) * sh + 1: sh,
                 j * dw: j * dw + (wo - 1) * sw + 1: sw] += contrib.reshape(n, grp, cin_g, ho, wo)
    gpad = gpad.reshape(n, cin, hp, wp)
    # 2. fold each padded row, then column, onto the input position it was read from
    rows = source_index(h, pt, pb, p["padding_mode"])
    cols = source_index(wd, pl, pr, p["padding_mode"])
    grows = np.zeros((n, cin, h, wp), dtype=np.float64)
    for r, src in enumerate(rows):
        if src >= 0:
            grows[:, :, src, :] += gpad[:, :, r, :]
    gx = np.zeros((n, cin, h, wd), dtype=np.float64)
    for c, src in enumerate(cols):
        if src >= 0:
            gx[:, :, :, src] += grows[:, :, :, c]
    return gx


def conv2d_input_grad_ref(input_shape, w, grad_out, stride=1, padding=0, dilation=1,
                          groups=1, padding_mode="zeros"):
    """d(sum(conv2d(x, w) * grad_out)) / dx for an input of ``input_shape`` (float64).

    ``input_shape`` is (N, C, H, W) or unbatched (C, H, W) (then ``grad_out`` is
    (C_out, Ho, Wo) and the result (C, H, W)).
    """
    p = _prepare(_shape_only(input_shape, "input_shape"), w, None, stride, padding, dilation,
                 groups, padding_mode)
    gx = _input_grad(p, _grad_out(p, grad_out))
    return gx[0] if p["unbatched"] else gx


def _weight_grad(p, g):
    n, cin, cout, grp = p["n"], p["cin"], p["cout"], p["groups"]
    cin_g, cout_g = p["cin_g"], cout // grp
    kh, kw, sh, sw, dh, dw = p["kh"], p["kw"], p["sh"], p["sw"], p["dh"], p["dw"]
    ho, wo = p["ho"], p["wo"]
    (pt, pb), (pl, pr) = p["pads"]
    x = p["x"].astype(np.float64)
    h, wd = x.shape[2], x.shape[3]
    rows = source_index(h, pt, pb, p["padding_mode"])
    cols = source_index(wd, pl, pr, p["padding_mode"])
    # gather the padded input through the index maps (a zero where the map says -1)
    xpad = np.zeros((n, cin, rows.size, cols.size), dtype=np.float64)
    vr, vc = np.nonzero(rows >= 0)[0], np.nonzero(cols >= 0)[0]
    xpad[:, :, vr[:, None], vc[None, :]] = x[:, :, rows[vr][:, None], cols[vc][None, :]]
    # (G, Cout_g, N*P)
    gg = g.reshape(n, grp, cout_g, ho * wo).transpose(1, 2, 0, 3).reshape(grp, cout_g, n * ho * wo)
    gw = np.zeros((grp, cout_g, cin_g, kh, kw), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            tap = xpad[:, :, i * dh: i * dh + (ho - 1) * sh + 1: sh,
                       j * dw: j * dw + (wo - 1) * sw + 1: sw]
            tap = tap.reshape(n, grp, cin_g, ho * wo).transpose(1, 2, 0, 3)
            tap = tap.reshape(grp, cin_g, n * ho * wo)
            # (G, Cout_g, NP) @ (G, NP, Cin_g) -> (G, Cout_g, Cin_g)
            gw[:, :, :, i, j] = np.matmul(gg, np.swapaxes(tap, -1, -2))
    return gw.reshape(cout, cin_g, kh, kw)


def conv2d_weight_grad_ref(x, weight_shape, grad_out, stride=1, padding=0, dilation=1,
                           groups=1, padding_mode="zeros"):
    """d(sum(conv2d(x, w) * grad_out)) / dw for a weight of ``weight_shape`` (float64)."""
    p = _prepare(x, _shape_only(weight_shape, "weight_shape"), None, stride, padding, dilation,
                 groups, padding_mode)
    return _weight_grad(p, _grad_out(p, grad_out))


def conv2d_bias_grad_ref(grad_out):
    """grad_out summed over batch and space: (N, C, H, W) or (C, H, W) -> (C,)."""
    g = np.asarray(grad_out)
    if g.ndim not in (3, 4):
        raise ValueError(f"grad_output must be 3-D or 4-D, got shape {g.shape}")
    g = g.astype(np.float64)
    total = np.zeros(g.shape[-3], dtype=np.float64)
    for c in range(g.shape[-3]):
        total[c] = g[..., c, :, :].sum()
    return total


def conv2d_input_grad_abs_bound(input_shape, w, grad_out, stride=1, padding=0, dilation=1,
                                groups=1, padding_mode="zeros"):
    """Element-wise sum of |w * grad_out| over the products each input gradient sums."""
    return conv2d_input_grad_ref(input_shape, np.abs(np.asarray(w, np.float64)),
                                 np.abs(np.asarray(grad_out, np.float64)), stride, padding,
                                 dilation, groups, padding_mode)


def conv2d_weight_grad_abs_bound(x, weight_shape, grad_out, stride=1, padding=0, dilation=1,
                                 groups=1, padding_mode="zeros"):
    """Element-wise sum of |x * grad_out| over the products each weight gradient sums."""
    return conv2d_weight_grad_ref(np.abs(np.asarray(x, np.float64)), weight_shape,
                                  np.abs(np.asarray(grad_out, np.float64)), stride, padding,
                                  dilation, groups, padding_mode)


def conv2d_bias_grad_abs_bound(grad_out):
    return conv2d_bias_grad_ref(np.abs(np.asarray(grad_out, np.float64)))


def input_grad_reduction_length(input_shape, weight_shape, stride=1, padding=0, dilation=1,
                                groups=1, padding_mode="zeros"):
    """The largest number of products summed into one input-gradient element.

    The input gradient applied to all-ones operands counts them exactly
    (including what reflect/replicate/circular padding folds onto an edge).
    """
    shape = tuple(int(v) for v in input_shape)
    one = (1,) + shape[-3:]
    _shape_only(weight_shape, "weight_shape")
    p = _prepare(_shape_only(one, "input_shape"), np.ones(tuple(weight_shape)),
                 None, stride, padding, dilation, groups, padding_mode)
    counts = _input_grad(p, np.ones((1, p["cout"], p["ho"], p["wo"])))
    return max(1, int(round(counts.max())))


def weight_grad_reduction_length(grad_out_shape):
    """Products summed into one weight-gradient (or bias-gradient) element: N * Ho * Wo."""
    shape = tuple(grad_out_shape)
    n = shape[0] if len(shape) == 4 else 1
    return max(1, int(n * shape[-2] * shape[-1]))


def assert_within(got, expected, tol, *, dtype, label=""):
    """Assert ``got`` is a NumPy array of ``dtype`` and ``expected``'s shape, with
    ``|got - expected| <= tol`` element-wise (NaN in ``got`` fails unless expected)."""
    dtype = np.dtype(dtype)
    expected = np.asarray(expected, np.float64)
    assert isinstance(got, np.ndarray), f"{label}: expected numpy.ndarray, got {type(got)}"
    assert got.dtype == dtype, f"{label}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == expected.shape, f"{label}: shape {got.shape}, expected {expected.shape}"
    if expected.size == 0:
        return
    tol = np.broadcast_to(np.asarray(tol, np.float64), expected.shape)
    g = got.astype(np.float64)
    err = np.abs(g - expected)
    same_nonfinite = ~np.isfinite(expected) & (np.isnan(expected) == np.isnan(g)) & \
        ((g == expected) | np.isnan(expected))
    bad = ~((err <= tol) | same_nonfinite)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        ratio = np.where(bad, np.nan_to_num(err / tol, nan=np.inf, posinf=np.inf), -1.0)
        worst = tuple(int(i) for i in np.unravel_index(np.argmax(ratio), err.shape))
        raise AssertionError(
            f"{label}: {int(bad.sum())}/{bad.size} elements out of tolerance "
            f"(dtype {dtype}, shape {expected.shape}); first bad index {idx}: got {g[idx]!r}, "
            f"expected {expected[idx]!r}, tol {tol[idx]:.3g}; worst {worst}: got {g[worst]!r}, "
            f"expected {expected[worst]!r}, |err| {err[worst]:.3g}, tol {tol[worst]:.3g} "
            f"(ratio {ratio[worst]:.3g})"
        )


# ---------------------------------------------------------------------------
# Fused epilogue: act(conv + bias + residual)
# ---------------------------------------------------------------------------

ACTIVATIONS = ("relu", "relu6", "silu", "gelu")
# Lipschitz constants: max |act'(z)| (silu' peaks at 1.0998, gelu' at 1.1289).
_LIPSCHITZ = {None: 1.0, "relu": 1.0, "relu6": 1.0, "silu": 1.1, "gelu": 1.13}
_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def activation_ref(name, z):
    """relu / relu6 / silu / gelu (exact erf form) of ``z`` in float64; None is identity."""
    z = np.asarray(z, dtype=np.float64)
    if name is None:
        return z.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        if name == "relu":
            return np.where(np.isnan(z), z, np.maximum(z, 0.0))
        if name == "relu6":
            return np.where(np.isnan(z), z, np.minimum(np.maximum(z, 0.0), 6.0))
        if name == "silu":
            # z / (1 + exp(-z)): a very negative z gives -0, z = -inf gives NaN (as torch)
            return z / (1.0 + np.exp(-z))
        if name == "gelu":
            # 0.5 z (1 + erf(z / sqrt 2)) == 0.5 z erfc(-z / sqrt 2), the latter without
            # cancellation for negative z
            return 0.5 * z * _erfc(-z / math.sqrt(2.0))
    raise ValueError(f"unknown activation {name!r}")


def conv2d_fused_reference(x, w, bias=None, residual=None, activation=None, stride=1,
                           padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """act(conv2d(x, w) + bias + residual) in float64."""
    z = conv2d_reference(x, w, bias, stride, padding, dilation, groups, padding_mode)
    if residual is not None:
        r = np.asarray(residual)
        if r.shape != z.shape:
            raise ValueError(f"residual has shape {r.shape}, the output is {z.shape}")
        z = z + r.astype(np.float64)
    return activation_ref(activation, z)


def fused_tolerance(dtype, x, w, bias=None, residual=None, activation=None, stride=1,
                    padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """Element-wise tolerance for ``conv2d_fused_reference`` computed in ``dtype``.

    Pre-activation: the forward bound with the residual as one more term.  The
    activation is L-Lipschitz (error grows at most L times) and its own
    evaluation adds at most 64 ulp (accumulation format) of |z| + |act(z)|.
    For float16 the final rounding of act(z) to half is covered because
    |act(z)| <= |z| <= bound and L >= 1.
    """
    dtype = np.dtype(dtype)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
              padding_mode=padding_mode)
    bound = conv2d_abs_bound(x, w, bias, **kw)
    n_terms = reduction_length(w, bias)
    if residual is not None:
        bound = bound + np.abs(np.asarray(residual, np.float64))
        n_terms += 1
    pre = tolerance(dtype, n_terms, bound)
    if activation is None:
        return pre
    if activation not in _LIPSCHITZ:
        raise ValueError(f"unknown activation {activation!r}")
    acc = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
    z = conv2d_fused_reference(x, w, bias, residual, None, **kw)
    y = activation_ref(activation, z)
    evaluation = 64 * _U[acc] * (np.abs(z) + np.abs(y))
    return _LIPSCHITZ[activation] * pre + evaluation


# --- training-mode BatchNorm2d and the activation after it ------------------------------

def activation_grad_ref(name, v):
    """d activation / dv at v in float64, as torch's backward of each computes it: relu and
    relu6 pass no gradient at 0 and 6 themselves (threshold_backward, hardtanh_backward)."""
    v = np.asarray(v, dtype=np.float64)
    if name is None:
        return np.ones_like(v)
    if name == "relu":
        return np.where(v <= 0, 0.0, 1.0)
    if name == "relu6":
        return np.where((v <= 0) | (v >= 6), 0.0, 1.0)
    if name == "silu":
        s = 1 / (1 + np.exp(-v))
        return s * (1 + v * (1 - s))
    if name == "gelu":
        return 0.5 * _erfc(-v / math.sqrt(2.0)) + v * np.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)
    raise ValueError(f"unknown activation {name!r}")


def batch_norm_train_ref(y, gamma, beta, running_mean, running_var, momentum, eps,
                         activation=None):
    """torch.nn.BatchNorm2d in training on y (N, C, H, W), then the activation, in float64:
    (z, mean, invstd, new running_mean, new running_var); gamma/beta or the running
    statistics may be None."""
    y = np.asarray(y, np.float64)
    count = y.shape[0] * y.shape[2] * y.shape[3]
    mean = y.mean(axis=(0, 2, 3))
    var = ((y - mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))
    invstd = 1 / np.sqrt(var + eps)
    g = np.ones_like(mean) if gamma is None else np.asarray(gamma, np.float64)
    b = np.zeros_like(mean) if beta is None else np.asarray(beta, np.float64)
    v = (y - mean[None, :, None, None]) * (g * invstd)[None, :, None, None] \
        + b[None, :, None, None]
    new_mean = new_var = None
    if running_mean is not None:
        new_mean = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean
        new_var = ((1 - momentum) * np.asarray(running_var, np.float64)
                   + momentum * var * count / (count - 1))
    return activation_ref(activation, v), mean, invstd, new_mean, new_var


def batch_norm_train_grad_ref(y, gamma, beta, grad_out, eps, activation=None):
    """(d y, d gamma, d beta) of batch_norm_train_ref's z for grad_out = d loss / dz."""
    y = np.asarray(y, np.float64)
    count = y.shape[0] * y.shape[2] * y.shape[3]
    _, mean, invstd, _, _ = batch_norm_train_ref(y, None, None, None, None, 0, eps)
    xhat = (y - mean[None, :, None, None]) * invstd[None, :, None, None]
    g = np.ones_like(mean) if gamma is None else np.asarray(gamma, np.float64)
    b = np.zeros_like(mean) if beta is None else np.asarray(beta, np.float64)
    v = xhat * g[None, :, None, None] + b[None, :, None, None]
    dv = np.asarray(grad_out, np.float64) * activation_grad_ref(activation, v)
    dbeta = dv.sum(axis=(0, 2, 3))
    dgamma = (dv * xhat).sum(axis=(0, 2, 3))
    dxhat = dv * g[None, :, None, None]
    dy = (invstd[None, :, None, None] / count) * (
        count * dxhat - dxhat.sum(axis=(0, 2, 3))[None, :, None, None]
        - xhat * (dxhat * xhat).sum(axis=(0, 2, 3))[None, :, None, None])
    return dy, dgamma, dbeta
