"""A plain NumPy convolution, used by `clconv bench` (and the tuner) to check kernel results.

The tests have their own, independent reference; this one serves the package's tools.
"""
from __future__ import annotations

import numpy as np

NUMPY_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge",
                   "circular": "wrap"}
# Worst |error| a kernel may show, relative to the largest |x|*|w| sum of the output.
TOLERANCE = {"float16": 2e-3, "float32": 1e-5, "float64": 1e-12}


class Check:
    """The reference output of one problem on x, w, b, and how far a result strays from it."""

    def __init__(self, problem, x, w, b=None):
        self.tolerance = TOLERANCE[problem.dtype]
        self.expected = conv2d_numpy(problem, x, w, b)
        bound = conv2d_numpy(problem, np.abs(x), np.abs(w), None if b is None else np.abs(b))
        self.scale = max(float(np.abs(bound).max()), np.finfo(np.float64).tiny)

    def error(self, y):
        """max |y - expected| relative to the bound; NaN if y has any NaN."""
        return float(np.abs(np.asarray(y, np.float64) - self.expected).max()) / self.scale

    def passes(self, error):
        return error <= self.tolerance      # NaN (an unwritten output) fails too


def conv2d_numpy(problem, x, w, b=None):
    """The convolution `problem` describes, on (N, C, H, W) x, computed in float64."""
    pt, pb, pl, pr = problem.pad
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)),
                mode=NUMPY_PAD_MODES[problem.padding_mode])
    n, g = problem.batch, problem.groups
    cg, kg = problem.cin_per_group, problem.cout_per_group
    ho, wo = problem.out_height, problem.out_width
    (kh, kw), (sh, sw), (dh, dw) = problem.kernel_size, problem.stride, problem.dilation
    xg = xp.reshape(n, g, cg, xp.shape[2], xp.shape[3])
    wg = np.asarray(w, np.float64).reshape(g, kg, cg, kh, kw)
    out = np.zeros((n, g, kg, ho, wo))
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + (ho - 1) * sh + 1, sh)
            cols = slice(j * dw, j * dw + (wo - 1) * sw + 1, sw)
            out += np.einsum("ngchw,gkc->ngkhw", xg[:, :, :, rows, cols], wg[:, :, :, i, j],
                             optimize=True)
    out = out.reshape(n, g * kg, ho, wo)
    if b is not None:
        out += np.asarray(b, np.float64).reshape(1, -1, 1, 1)
    return out
