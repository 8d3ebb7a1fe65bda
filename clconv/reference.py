"""A plain NumPy convolution and its gradients, used by `clconv bench` and the tuner to check
kernel results.

The tests have their own, independent reference; this one serves the package's tools.
"""
from __future__ import annotations

import numpy as np

NUMPY_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge",
                   "circular": "wrap"}
# Worst |error| a kernel may show, relative to the largest |x|*|w| sum of the output.
TOLERANCE = {"float16": 2e-3, "float32": 1e-5, "float64": 1e-12}


class Check:
    """The reference result of an operation on some operands, and how far a result strays
    from it. reference(problem, *operands) computes in float64 and is linear in each
    operand, so the same function of the operands' magnitudes bounds every output."""

    def __init__(self, problem, reference, *operands):
        self.tolerance = TOLERANCE[problem.dtype]
        self.expected = reference(problem, *operands)
        bound = reference(problem, *(None if a is None else np.abs(a) for a in operands))
        self.scale = max(float(np.abs(bound).max(initial=0)), np.finfo(np.float64).tiny)

    def error(self, y):
        """max |y - expected| relative to the bound; NaN if y has any NaN."""
        return float(np.abs(np.asarray(y, np.float64) - self.expected).max(initial=0)) / self.scale

    def passes(self, error):
        return error <= self.tolerance      # NaN (an unwritten output) fails too


def test_case(problem, operation, rng):
    """(operands, output shape, reference) of random test data for an operation of problem
    ('forward', 'input_grad', 'weight_grad'), in the order its kernels take them."""
    def draw(shape):
        return rng.standard_normal(shape).astype(problem.numpy_dtype)
    if operation == "input_grad":
        return ([draw(problem.output_shape), draw(problem.weight_shape)], problem.input_shape,
                conv2d_input_grad_numpy)
    if operation == "weight_grad":
        return ([draw(problem.input_shape), draw(problem.output_shape)], problem.weight_shape,
                conv2d_weight_grad_numpy)
    bias = [draw(problem.out_channels)] if problem.has_bias else []
    return ([draw(problem.input_shape), draw(problem.weight_shape)] + bias,
            problem.output_shape, conv2d_numpy)


def conv2d_numpy(problem, x, w, b=None):
    """The convolution `problem` describes, on (N, C, H, W) x, computed in float64."""
    xp = _padded(problem, x)
    n, g = problem.batch, problem.groups
    cg, kg = problem.cin_per_group, problem.cout_per_group
    ho, wo = problem.out_height, problem.out_width
    xg = xp.reshape(n, g, cg, xp.shape[2], xp.shape[3])
    wg = np.asarray(w, np.float64).reshape(g, kg, cg, *problem.kernel_size)
    out = np.zeros((n, g, kg, ho, wo))
    for i, j, rows, cols in _taps(problem):
        out += np.einsum("ngchw,gkc->ngkhw", xg[:, :, :, rows, cols], wg[:, :, :, i, j],
                         optimize=True)
    out = out.reshape(n, g * kg, ho, wo)
    if b is not None:
        out += np.asarray(b, np.float64).reshape(1, -1, 1, 1)
    return out


def conv2d_input_grad_numpy(problem, dy, w):
    """The gradient of the convolution with respect to its input, given dy = d(loss)/d(out)."""
    n, g = problem.batch, problem.groups
    cg, kg = problem.cin_per_group, problem.cout_per_group
    pt, pb, pl, pr = problem.pad
    hp, wp = problem.height + pt + pb, problem.width + pl + pr
    dyg = np.asarray(dy, np.float64).reshape(n, g, kg, problem.out_height, problem.out_width)
    wg = np.asarray(w, np.float64).reshape(g, kg, cg, *problem.kernel_size)
    dxp = np.zeros((n, g, cg, hp, wp))
    for i, j, rows, cols in _taps(problem):
        dxp[:, :, :, rows, cols] += np.einsum("ngkhw,gkc->ngchw", dyg, wg[:, :, :, i, j],
                                              optimize=True)
    # Each padded position's gradient goes to the input position it was read from.
    rows = _read_from(problem.padding_mode, problem.height, pt, pb)
    cols = _read_from(problem.padding_mode, problem.width, pl, pr)
    dx = np.einsum("nghw,hi,wj->ngij", dxp.reshape(n, g * cg, hp, wp), rows, cols,
                   optimize=True)
    return dx


def conv2d_weight_grad_numpy(problem, x, dy):
    """The gradient of the convolution with respect to its weight."""
    xp = _padded(problem, x)
    n, g = problem.batch, problem.groups
    cg, kg = problem.cin_per_group, problem.cout_per_group
    xg = xp.reshape(n, g, cg, xp.shape[2], xp.shape[3])
    dyg = np.asarray(dy, np.float64).reshape(n, g, kg, problem.out_height, problem.out_width)
    dw = np.zeros((g, kg, cg) + tuple(problem.kernel_size))
    for i, j, rows, cols in _taps(problem):
        dw[:, :, :, i, j] = np.einsum("ngkhw,ngchw->gkc", dyg, xg[:, :, :, rows, cols],
                                      optimize=True)
    return dw.reshape(problem.weight_shape)


def _padded(problem, x):
    pt, pb, pl, pr = problem.pad
    return np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)),
                  mode=NUMPY_PAD_MODES[problem.padding_mode])


def _taps(problem):
    """(kh, kw, rows, cols): each kernel tap and the padded-input slices it reads."""
    (kh, kw), (sh, sw), (dh, dw) = problem.kernel_size, problem.stride, problem.dilation
    ho, wo = problem.out_height, problem.out_width
    for i in range(kh):
        for j in range(kw):
            yield (i, j, slice(i * dh, i * dh + (ho - 1) * sh + 1, sh),
                   slice(j * dw, j * dw + (wo - 1) * sw + 1, sw))


def _read_from(mode, size, before, after):
    """A (padded size, size) 0/1 matrix: which input position each padded position reads
    (rows of zeros for the zero padding)."""
    padded = np.arange(-before, size + after)
    if mode == "reflect":
        source = np.abs(size - 1 - np.abs(size - 1 - np.abs(padded)))
    elif mode == "replicate":
        source = np.clip(padded, 0, size - 1)
    elif mode == "circular":
        source = padded % size
    else:
        source = np.where((padded >= 0) & (padded < size), padded, -1)
    return (source[:, None] == np.arange(size)[None, :]).astype(np.float64)
