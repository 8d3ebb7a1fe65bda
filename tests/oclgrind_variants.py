"""Run every kernel variant clconv can emit (the forward with its fused epilogue, both
gradients, the padding fold, the split sums) at a small shape; meant to run under Oclgrind.

    oclgrind --data-races --uninitialized python tests/oclgrind_variants.py [NAME ...]

Each variant is checked against a small NumPy loop too; the process exits non-zero on a
wrong result. Oclgrind itself reports invalid accesses, races and uninitialised reads on
stderr (tests/test_oclgrind.py fails on any of them).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import sys

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

import clconv
from clconv import arrays, batch_norm, capabilities
from clconv.algorithms import ALGORITHMS
from clconv.problem import make_problem
from reference import batch_norm_train_grad_ref, batch_norm_train_ref

TOL = {"float16": 2e-2, "float32": 1e-5, "float64": 1e-12}


def naive(x, w, b, dy, p):
    """The convolution and its gradients by direct loops over the padded input (index maps
    written independently of the kernels): (y, dx, dw) for input x, weight w, bias b and an
    output gradient dy."""
    pt, pb, pl, pr = p.pad
    mode = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)),
                mode=mode[p.padding_mode])
    y = np.zeros(p.output_shape)
    dxp, dw = np.zeros_like(xp), np.zeros(w.shape)
    cg, kg = p.cin_per_group, p.cout_per_group
    for n, k, i, j in itertools.product(range(p.batch), range(p.out_channels),
                                        range(p.out_height), range(p.out_width)):
        g = k // kg
        for c, a, e in itertools.product(range(cg), range(p.kernel_size[0]),
                                         range(p.kernel_size[1])):
            at = (n, g * cg + c, i * p.stride[0] + a * p.dilation[0],
                  j * p.stride[1] + e * p.dilation[1])
            y[n, k, i, j] += w[k, c, a, e] * xp[at]
            dxp[at] += w[k, c, a, e] * dy[n, k, i, j]
            dw[k, c, a, e] += xp[at] * dy[n, k, i, j]
        if b is not None:
            y[n, k, i, j] += b[k]
    # Each padded position's gradient goes to the input position padding copied there.
    extra = {} if p.padding_mode != "zeros" else {"constant_values": -1}
    rows = np.pad(np.arange(p.height), (pt, pb), mode=mode[p.padding_mode], **extra)
    cols = np.pad(np.arange(p.width), (pl, pr), mode=mode[p.padding_mode], **extra)
    dx = np.zeros(x.shape)
    for q, r in enumerate(rows):
        for t, c in enumerate(cols):
            if r >= 0 and c >= 0:
                dx[:, :, r, c] += dxp[:, :, q, t]
    return y, dx, dw


ACTIVATIONS = {None: lambda z: z, "relu": lambda z: np.maximum(z, 0),
               "relu6": lambda z: np.clip(z, 0, 6), "silu": lambda z: z / (1 + np.exp(-z)),
               "gelu": lambda z: 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))}


def variants():
    """(name, operation, input shape, weight shape, bias?, conv kwargs, dtype, config).
    A forward config may carry an epilogue: activation and residual (True/False)."""
    modes = ("zeros", "reflect", "replicate", "circular")
    for mode in modes:
        for op in ("forward", "input_grad", "weight_grad"):
            prefix = "" if op == "forward" else f"{op}-"
            # border and interior tiles, ragged last tile (7 % 4), ragged channel block
            yield (f"{prefix}{mode}-s1-tw4-tk3", op, (2, 3, 5, 7), (5, 3, 3, 3), True,
                   dict(padding=1, padding_mode=mode), "float32", TILES[op](3, 4))
            # stride 2, dilation 2, asymmetric 'same'-like padding through a pair, groups
            yield (f"{prefix}{mode}-s2-d2-g2", op, (1, 4, 9, 10), (4, 2, 2, 3), False,
                   dict(stride=2, dilation=(2, 1), padding=(2, 1), groups=2, padding_mode=mode),
                   "float32", TILES[op](2, 4))
            yield (f"{prefix}{mode}-same-even", op, (1, 3, 6, 6), (2, 3, 4, 2), True,
                   dict(padding="same", padding_mode=mode), "float32", TILES[op](2, 8))
    for tw in ALGORITHMS["direct"].params[1].values:
        for op in ("forward", "input_grad", "weight_grad"):
            prefix = "" if op == "forward" else f"{op}-"
            config = TILES[op](4 if op == "forward" else 3, tw)
            if takes(op, config, "tw", tw):
                yield (f"{prefix}tw{tw}", op, (1, 3, 6, 11), (4, 3, 3, 3), True,
                       dict(padding=1), "float32", config)
    yield ("depthwise-mult2", "forward", (1, 3, 7, 7), (6, 1, 3, 3), True,
           dict(padding=1, groups=3), "float32", dict(tk=1, tw=4))
    yield ("1x1-stride2", "forward", (2, 5, 7, 9), (3, 5, 1, 1), False, dict(stride=2),
           "float32", dict(tk=3, tw=4))
    yield ("kernel-covers-input", "forward", (1, 2, 5, 5), (3, 2, 5, 5), True, {}, "float32",
           dict(tk=3, tw=1))
    yield ("1x1-input-padded", "forward", (1, 2, 1, 1), (2, 2, 3, 3), True, dict(padding=1),
           "float32", dict(tk=2, tw=1))
    yield ("unroll-kw-reflect", "forward", (1, 2, 5, 9), (3, 2, 3, 5), True,
           dict(padding=(1, 2), padding_mode="reflect"), "float32", dict(tk=3, tw=4, ukw=1))
    for op in ("forward", "input_grad", "weight_grad"):
        yield (f"{op}-long-index", op, (1, 2, 5, 6), (3, 2, 3, 3), True, dict(padding=1),
               "float32", dict(TILES[op](2, 4), idx_t="long"))
    for dtype in ("float16", "float64"):
        for op in ("forward", "input_grad", "weight_grad"):
            prefix = "" if op == "forward" else f"{op}-"
            for mode in ("zeros", "reflect"):
                yield (f"{prefix}{dtype}-{mode}", op, (1, 3, 6, 9), (4, 3, 3, 3), True,
                       dict(padding=1, padding_mode=mode), dtype, TILES[op](2, 4))
            if takes(op, TILES[op](2, 1), "tw", 1):
                yield (f"{prefix}{dtype}-tw1", op, (1, 2, 4, 4), (2, 2, 3, 3), False,
                       dict(stride=2), dtype, TILES[op](2, 1))
    yield from gemm_variants()
    yield from tiled_gemm_variants()
    yield from depthwise_variants()
    yield from winograd_variants()
    yield from input_grad_variants()
    yield from weight_grad_variants()
    # The fused epilogue: every activation, with a residual, on full and ragged tiles.
    for activation in list(ACTIVATIONS)[1:]:
        for dtype in ("float16", "float32", "float64"):
            yield (f"epilogue-{activation}-{dtype}", "forward", (2, 3, 5, 7), (5, 3, 3, 3),
                   True, dict(padding=1), dtype,
                   dict(tk=3, tw=4, activation=activation, residual=True))


def register_tile(algorithm, tk, tv, tw, **extra):
    """The config of a GEMM register tile (implicit_gemm, winograd), with extras."""
    return dict(algorithm=algorithm, tk=tk, tv=tv, tw=tw) | extra


def gemm_variants():
    """The implicit GEMM forward: staged grids under every padding mode (a strided 1x1's
    sampled grid, strided kernels' phase planes), unstaged inputs whose last tile reads
    shifted back (dense and gapped output grids) or, on a plane smaller than a tile, lane by
    lane, every vector width, dtypes and the epilogue."""
    def gemm(tk, tv, tw, **extra):
        return register_tile("implicit_gemm", tk, tv, tw, **extra)
    for mode in ("zeros", "reflect", "replicate", "circular"):
        yield (f"gemm-{mode}-p1", "forward", (2, 3, 5, 7), (5, 3, 3, 3), True,
               dict(padding=1, padding_mode=mode), "float32", gemm(3, 2, 4))
        yield (f"gemm-{mode}-same-even-d2-g2", "forward", (1, 4, 9, 10), (4, 2, 2, 3), False,
               dict(padding="same", dilation=(2, 1), groups=2, padding_mode=mode), "float32",
               gemm(2, 1, 8))
    yield ("gemm-unpadded-3x3", "forward", (1, 3, 6, 7), (4, 3, 3, 3), True, {}, "float32",
           gemm(4, 1, 4))
    yield ("gemm-1x1-dense", "forward", (2, 5, 3, 5), (3, 5, 1, 1), True, {}, "float32",
           gemm(2, 4, 2))
    # pack=1: a 1x1 input packed by tiles (a ragged last tile zero-filled; the strided
    # pack's index path; groups; the epilogue), every dtype.
    yield ("gemm-pack-1x1", "forward", (2, 5, 3, 5), (3, 5, 1, 1), True, {}, "float32",
           gemm(2, 1, 4, pack=1))
    yield ("gemm-pack-stride2-groups", "forward", (2, 4, 7, 9), (6, 2, 1, 1), True,
           dict(stride=2, groups=2), "float32",
           gemm(3, 2, 4, pack=1, activation="relu", residual=True))
    yield ("gemm-pack-long-index", "forward", (2, 3, 3, 5), (4, 3, 1, 1), False, {},
           "float32", gemm(2, 1, 4, pack=1, idx_t="long"))
    for dtype in ("float16", "float64"):
        yield (f"gemm-pack-{dtype}", "forward", (1, 3, 3, 5), (4, 3, 1, 1), False, {}, dtype,
               gemm(2, 1, 4, pack=1))
    yield ("gemm-1x1-plane-under-a-tile", "forward", (2, 3, 2, 3), (3, 3, 1, 1), True, {},
           "float32", gemm(2, 1, 8, activation="relu", residual=True))
    yield ("gemm-1x1-stride2-padded", "forward", (2, 5, 7, 9), (3, 5, 1, 1), False,
           dict(stride=2, padding=1, padding_mode="reflect"), "float32", gemm(3, 1, 4))
    # Strided kernels read phase planes: both dimensions split, one split (the dilation a
    # multiple of the stride along rows), a stem-like 7x7 at stride 2 with ragged channels.
    for mode in ("zeros", "reflect"):
        yield (f"gemm-{mode}-s2-phases", "forward", (2, 3, 9, 11), (5, 3, 3, 3), True,
               dict(stride=2, padding=1, padding_mode=mode), "float32", gemm(3, 2, 4))
    yield ("gemm-s2x3-d2x1-phases", "forward", (1, 4, 11, 13), (4, 2, 3, 4), False,
           dict(stride=(2, 3), dilation=(2, 1), padding=(2, 1), groups=2,
                padding_mode="circular"), "float32", gemm(2, 1, 8))
    yield ("gemm-stem-7x7-s2", "forward", (1, 3, 15, 17), (5, 3, 7, 7), True,
           dict(stride=2, padding=3), "float32", gemm(4, 2, 4))
    yield ("gemm-depthwise-mult2", "forward", (1, 3, 7, 7), (6, 1, 3, 3), True,
           dict(padding=1, groups=3), "float32", gemm(2, 3, 4, ukw=1))
    yield ("gemm-long-index", "forward", (1, 2, 5, 6), (3, 2, 3, 3), True, dict(padding=1),
           "float32", gemm(2, 1, 4, idx_t="long"))
    for dtype in ("float16", "float64"):
        yield (f"gemm-{dtype}-staged", "forward", (1, 3, 6, 9), (4, 3, 3, 3), True,
               dict(padding=1, padding_mode="circular"), dtype, gemm(2, 2, 4))
        yield (f"gemm-{dtype}-1x1", "forward", (2, 3, 3, 5), (4, 3, 1, 1), False, {}, dtype,
               gemm(4, 1, 4))
    for activation in list(ACTIVATIONS)[1:]:
        for dtype, kwargs in (("float32", dict(padding=1)), ("float16", {})):
            yield (f"gemm-epilogue-{activation}-{dtype}", "forward", (2, 3, 5, 7), (5, 3, 3, 3),
                   True, kwargs, dtype, gemm(3, 1, 4, activation=activation, residual=True))
    # 16-wide vectors (AVX-512 targets): staged and unstaged, every dtype, an epilogue's
    # vector builtins, a ragged last tile.
    for dtype in DTYPES:
        tile = (1, 1) if dtype == "float64" else (2, 2)     # double16 takes 4 registers
        yield (f"gemm-tw16-{dtype}", "forward", (2, 3, 5, 9), (5, 3, 3, 3), True,
               dict(padding=1), dtype, gemm(*tile, 16, activation="gelu", residual=True))
    yield ("gemm-tw16-unstaged", "forward", (1, 3, 7, 11), (4, 3, 3, 3), False, {},
           "float32", gemm(2, 1, 16, activation="silu"))


def tiled_gemm_variants():
    """The local-memory tiled GEMM: staged grids under every padding mode and strided phase
    planes, unstaged inputs whose last tiles clamp their reads, ragged channel blocks and
    K chunks, tiles wider than the work-group in both directions, groups, dtypes, the
    epilogue and long indices."""
    def tiled(mwg, nwg, mdim, ndim, cib, **extra):
        return dict(algorithm="tiled_gemm", mwg=mwg, nwg=nwg, mdim=mdim, ndim=ndim,
                    cib=cib) | extra
    for mode in ("zeros", "reflect", "replicate", "circular"):
        yield (f"tiled-{mode}-p1", "forward", (2, 3, 5, 7), (5, 3, 3, 3), True,
               dict(padding=1, padding_mode=mode), "float32", tiled(16, 16, 4, 8, 2))
    yield ("tiled-unstaged-ragged", "forward", (1, 5, 6, 7), (6, 5, 3, 3), False, {},
           "float32", tiled(16, 32, 8, 4, 4))
    yield ("tiled-1x1", "forward", (2, 8, 3, 5), (16, 8, 1, 1), True, {}, "float32",
           tiled(16, 16, 4, 4, 8))
    yield ("tiled-s2-phases-groups", "forward", (1, 4, 9, 11), (6, 2, 3, 3), True,
           dict(stride=2, padding=1, groups=2, padding_mode="reflect"), "float32",
           tiled(16, 16, 8, 8, 1))
    yield ("tiled-stem-7x7-s2", "forward", (1, 3, 15, 17), (5, 3, 7, 7), False,
           dict(stride=2, padding=3), "float32", tiled(16, 32, 4, 8, 2))
    yield ("tiled-long-index", "forward", (1, 2, 5, 6), (3, 2, 3, 3), True, dict(padding=1),
           "float32", tiled(16, 16, 4, 4, 2, idx_t="long"))
    for dtype in ("float16", "float64"):
        yield (f"tiled-{dtype}", "forward", (1, 3, 6, 9), (4, 3, 3, 3), True,
               dict(padding=1, padding_mode="circular"), dtype, tiled(16, 16, 4, 4, 2))
    for activation in list(ACTIVATIONS)[1:]:
        yield (f"tiled-epilogue-{activation}", "forward", (2, 3, 5, 7), (5, 3, 3, 3), True,
               dict(padding=1), "float32",
               tiled(16, 16, 4, 4, 1, activation=activation, residual=True))


def depthwise_variants():
    """The depthwise kernel: every padding mode on border tiles (columns unrolled as
    constants), ragged row blocks and rows, channel multipliers, stride 2's paired vector
    loads, other strides' lane loads, borders too wide to unroll (lanes chosen at run time),
    rows with no inside tile, every vector width, dtypes, the epilogue and long indices."""
    def dw(tw, rows, **extra):
        return dict(algorithm="depthwise", tw=tw, rows=rows) | extra
    for mode in ("zeros", "reflect", "replicate", "circular"):
        yield (f"dw-{mode}-mult2", "forward", (1, 3, 7, 13), (6, 1, 3, 3), True,
               dict(padding=1, groups=3, padding_mode=mode), "float32", dw(4, 2))
        yield (f"dw-{mode}-runtime-border", "forward", (1, 2, 5, 10), (2, 1, 3, 9), False,
               dict(padding=(1, 4), groups=2, padding_mode=mode), "float32", dw(1, 4))
    yield ("dw-s2-paired-loads", "forward", (2, 2, 9, 37), (2, 1, 3, 3), True,
           dict(stride=2, padding=1, groups=2), "float32", dw(4, 2))
    yield ("dw-s3-d2-lane-loads", "forward", (1, 3, 11, 29), (3, 1, 3, 3), False,
           dict(stride=3, dilation=2, padding=2, groups=3, padding_mode="reflect"), "float32",
           dw(2, 1))
    yield ("dw-tw8-no-inside-tile", "forward", (1, 2, 3, 5), (2, 1, 3, 3), True,
           dict(padding=1, groups=2), "float32", dw(8, 8))
    yield ("dw-tw8-wide", "forward", (1, 2, 4, 40), (4, 1, 3, 3), True,
           dict(padding=1, groups=2, padding_mode="circular"), "float32", dw(8, 2))
    for stride in (1, 2):
        yield (f"dw-tw16-s{stride}", "forward", (1, 2, 4, 70), (2, 1, 3, 3), True,
               dict(stride=stride, padding=1, groups=2, padding_mode="reflect"), "float32",
               dw(16, 2, activation="silu"))
    yield ("dw-cin1-groups1", "forward", (2, 1, 6, 11), (3, 1, 3, 3), True, dict(padding=1),
           "float32", dw(4, 4))
    yield ("dw-long-index", "forward", (1, 2, 5, 9), (2, 1, 3, 3), True,
           dict(padding=1, groups=2), "float32", dw(4, 2, idx_t="long"))
    for dtype in ("float16", "float64"):
        for stride in (1, 2):
            yield (f"dw-{dtype}-s{stride}", "forward", (1, 3, 7, 21), (3, 1, 3, 3), True,
                   dict(stride=stride, padding=1, groups=3, padding_mode="replicate"), dtype,
                   dw(4, 2))
    for activation in list(ACTIVATIONS)[1:]:
        for dtype in ("float32", "float16"):
            yield (f"dw-epilogue-{activation}-{dtype}", "forward", (2, 3, 5, 11), (3, 1, 3, 3),
                   True, dict(padding=1, groups=3), dtype,
                   dw(4, 2, activation=activation, residual=True))


def winograd_variants():
    """Winograd F(2x2, 3x3): every padding mode on border and inside tiles, odd output sizes
    (partial last tiles), no inside tile, no border tile, zero padding tiles after the batch,
    ragged channel blocks, groups, every vector width and count, dtypes, the epilogue and
    long indices."""
    def wino(tk, tv, tw, **extra):
        return register_tile("winograd", tk, tv, tw, **extra)
    for mode in ("zeros", "reflect", "replicate", "circular"):
        yield (f"wino-{mode}-p1-odd", "forward", (2, 3, 7, 9), (5, 3, 3, 3), True,
               dict(padding=1, padding_mode=mode), "float32", wino(3, 3, 4))
        yield (f"wino-{mode}-p2x1-no-inside", "forward", (1, 2, 3, 3), (2, 2, 3, 3), False,
               dict(padding=(2, 1), padding_mode=mode), "float32", wino(2, 1, 8))
    yield ("wino-unpadded-g2", "forward", (1, 4, 6, 8), (4, 2, 3, 3), True, dict(groups=2),
           "float32", wino(2, 2, 2))
    yield ("wino-tv4", "forward", (3, 5, 6, 7), (6, 5, 3, 3), False, dict(padding=1),
           "float32", wino(2, 4, 2))
    yield ("wino-tw16", "forward", (2, 3, 9, 11), (4, 3, 3, 3), True, dict(padding=1),
           "float32", wino(2, 2, 16, activation="relu"))
    yield ("wino-long-index", "forward", (1, 2, 5, 6), (3, 2, 3, 3), True, dict(padding=1),
           "float32", wino(2, 1, 4, idx_t="long"))
    for dtype in ("float16", "float64"):
        yield (f"wino-{dtype}", "forward", (2, 3, 6, 9), (4, 3, 3, 3), True,
               dict(padding=1, padding_mode="reflect"), dtype, wino(3, 2, 4))
    for activation in list(ACTIVATIONS)[1:]:
        for dtype in ("float32", "float16"):
            yield (f"wino-epilogue-{activation}-{dtype}", "forward", (2, 3, 5, 7), (5, 3, 3, 3),
                   True, dict(padding=1), dtype,
                   wino(3, 1, 4, activation=activation, residual=True))


def input_grad_variants():
    """The input gradient's GEMMs: phases without taps (zeros), dy read in place by a 1x1
    kernel whose last tiles read lane by lane, strided stores (whole vectors within a row
    and across its end), every vector count and width, unrolled columns, dtypes, long
    indices; the stride-1 depthwise form (the forward's kernel on turned weights), the
    stride-1 forward form (input_grad_forward) and the strided 1x1 form (input_grad_spread)."""
    def gemm(tc, tv, tw, **extra):
        return dict(algorithm="input_grad_gemm", tc=tc, tv=tv, tw=tw) | extra
    op = "input_grad"
    yield ("igemm-1x1-in-place-tail", op, (2, 5, 3, 5), (3, 5, 1, 1), False, {}, "float32",
           gemm(2, 2, 4))
    yield ("igemm-1x1-s2-empty-phases", op, (2, 5, 7, 9), (3, 5, 1, 1), False,
           dict(stride=2), "float32", gemm(3, 1, 2))
    yield ("igemm-s2x3-d2x1-g2", op, (1, 4, 11, 13), (4, 2, 3, 4), False,
           dict(stride=(2, 3), dilation=(2, 1), padding=(2, 1), groups=2), "float32",
           gemm(1, 3, 4, ukw=1))
    yield ("igemm-stem-7x7-s2", op, (1, 3, 15, 17), (5, 3, 7, 7), False,
           dict(stride=2, padding=3), "float32", gemm(2, 4, 2))
    yield ("igemm-depthwise-mult2-s2", op, (1, 3, 9, 11), (6, 1, 3, 3), False,
           dict(stride=2, padding=1, groups=3, padding_mode="replicate"), "float32",
           gemm(1, 4, 8))
    # wt=1: the weight's channels swapped first (groups, ragged and whole blocks of
    # swap_channels, dtypes).
    yield ("igemm-transposed-g2-ragged", op, (2, 6, 7, 9), (4, 3, 3, 3), False,
           dict(stride=2, padding=1, groups=2), "float32", gemm(2, 2, 4, wt=1))
    yield ("igemm-transposed-blocks", op, (1, 10, 5, 6), (17, 10, 3, 3), False,
           dict(padding=1), "float32", gemm(2, 1, 4, wt=1))
    for dtype in ("float16", "float64"):
        yield (f"igemm-transposed-{dtype}", op, (1, 3, 5, 6), (4, 3, 3, 3), False,
               dict(padding=1), dtype, gemm(2, 1, 4, wt=1))
    for dtype in DTYPES:
        tile = (1, 1) if dtype == "float64" else (2, 1)
        yield (f"igemm-tw16-{dtype}", op, (1, 3, 5, 19), (4, 3, 3, 3), False,
               dict(padding=1, padding_mode="reflect"), dtype, gemm(*tile, 16))
    def dw(tw, rows, **extra):
        return dict(algorithm="input_grad_depthwise", tw=tw, rows=rows) | extra
    yield ("igdw-p1", op, (2, 3, 7, 13), (3, 1, 3, 3), False, dict(padding=1, groups=3),
           "float32", dw(4, 2))
    yield ("igdw-same-d2-asym", op, (1, 2, 8, 9), (2, 1, 2, 3), False,
           dict(padding="same", dilation=2, groups=2), "float32", dw(2, 4))
    yield ("igdw-unpadded-wide", op, (1, 2, 4, 40), (2, 1, 3, 3), False, dict(groups=2),
           "float32", dw(8, 1))
    yield ("igdw-tw1-narrow", op, (1, 2, 5, 3), (2, 1, 3, 3), False, dict(padding=1, groups=2),
           "float32", dw(1, 2))
    yield ("igdw-long-index", op, (1, 2, 5, 9), (2, 1, 3, 3), False,
           dict(padding=1, groups=2), "float32", dw(4, 2, idx_t="long"))
    for dtype in DTYPES:
        yield (f"igdw-tw16-{dtype}", op, (1, 2, 4, 70), (2, 1, 3, 3), False,
               dict(padding=1, groups=2), dtype, dw(16, 2))
    for dtype in ("float16", "float64"):
        yield (f"igdw-{dtype}", op, (1, 3, 7, 21), (3, 1, 3, 3), False,
               dict(padding=1, groups=3), dtype, dw(4, 2))
    # The stride-1 form as the forward's implicit GEMM on the turned weight (turn_weight):
    # 1x1 packed and staged, groups with a ragged channel block, asymmetric and dilated
    # padding, every vector count and width, unrolled columns, dtypes, long indices.
    def fwd(tk, tv, tw, **extra):
        return register_tile("input_grad_forward", tk, tv, tw, **extra)
    yield ("igfwd-1x1-packed", op, (2, 5, 3, 5), (3, 5, 1, 1), False, {}, "float32",
           fwd(2, 1, 4, pack=1))
    for dtype in DTYPES:        # whole and ragged 8 x 8 blocks of a 1x1 weight's turn
        yield (f"igfwd-1x1-blocks-{dtype}", op, (1, 17, 4, 5), (10, 17, 1, 1), False, {},
               dtype, fwd(1, 1, 4))
    yield ("igfwd-1x1-g2-ragged", op, (2, 6, 4, 9), (6, 3, 1, 1), False, dict(groups=2),
           "float32", fwd(2, 2, 8))
    yield ("igfwd-same-even-d2-g2", op, (1, 4, 9, 10), (4, 2, 2, 3), False,
           dict(padding="same", dilation=(1, 2), groups=2), "float32", fwd(1, 3, 2, ukw=1))
    yield ("igfwd-p1-tv4", op, (1, 3, 5, 7), (4, 3, 3, 3), False, dict(padding=1), "float32",
           fwd(2, 4, 2))
    yield ("igfwd-long-index", op, (1, 3, 5, 6), (4, 3, 3, 3), False, dict(padding=(2, 1)),
           "float32", fwd(2, 1, 4, idx_t="long"))
    for dtype in DTYPES:
        tile = (1, 1) if dtype == "float64" else (2, 1)
        yield (f"igfwd-tw16-{dtype}", op, (1, 3, 5, 19), (4, 3, 3, 3), False,
               dict(padding=1), dtype, fwd(*tile, 16))
    # A strided 1x1 layer's form: the forward's GEMM on the compact positions into scratch,
    # then the spread (asymmetric strides and padding, groups, every vector count and width,
    # dtypes, long indices).
    def spread(tk, tv, tw, **extra):
        return register_tile("input_grad_spread", tk, tv, tw, **extra)
    yield ("igspread-s2-packed", op, (2, 5, 7, 9), (3, 5, 1, 1), False, dict(stride=2),
           "float32", spread(2, 1, 4, pack=1))
    yield ("igspread-s2x3-p1-g2-ragged", op, (1, 6, 8, 10), (6, 3, 1, 1), False,
           dict(stride=(2, 3), padding=1, groups=2), "float32", spread(2, 2, 8))
    yield ("igspread-s3-asym-pad", op, (2, 3, 7, 8), (4, 3, 1, 1), False,
           dict(stride=3, padding=(2, 1)), "float32", spread(1, 3, 2, ukw=1))
    yield ("igspread-tv4", op, (1, 3, 9, 9), (4, 3, 1, 1), False, dict(stride=2), "float32",
           spread(2, 4, 2))
    yield ("igspread-long-index", op, (1, 3, 6, 7), (4, 3, 1, 1), False, dict(stride=2),
           "float32", spread(2, 1, 4, idx_t="long"))
    for dtype in DTYPES:
        tile = (1, 1) if dtype == "float64" else (2, 1)
        yield (f"igspread-tw16-{dtype}", op, (1, 3, 5, 37), (4, 3, 1, 1), False,
               dict(stride=2, padding=1), dtype, spread(*tile, 16))


def weight_grad_variants():
    """The weight gradient's GEMMs: rows that are whole vectors and rows with a cleared
    last vector, an unpadded input staged for that vector's reads, ragged channel and column
    blocks, split sums (sum_splits), every dtype and width, long indices; and the form
    vectorised along output channels (dy transposed) with ragged channel tiles."""
    def gemm(tk, tn, tw, **extra):
        return dict(algorithm="weight_grad_gemm", tk=tk, tn=tn, tw=tw, splits=1) | extra
    def channels(tv, tw, tn, **extra):
        return dict(algorithm="weight_grad_channels", tv=tv, tw=tw, tn=tn, splits=1) | extra
    op = "weight_grad"
    yield ("wgemm-1x1-whole-rows", op, (2, 5, 3, 8), (3, 5, 1, 1), False, {}, "float32",
           gemm(2, 4, 4))
    yield ("wgemm-unpadded-staged-for-last-vector", op, (1, 3, 6, 7), (4, 3, 3, 3), False, {},
           "float32", gemm(3, 2, 4))
    yield ("wgemm-s2-phases-g2", op, (2, 4, 9, 11), (6, 2, 3, 3), False,
           dict(stride=2, padding=1, groups=2, padding_mode="reflect"), "float32",
           gemm(2, 5, 2))
    for dtype in DTYPES:
        yield (f"wgemm-splits-{dtype}", op, (3, 2, 5, 9), (4, 2, 3, 3), False,
               dict(padding=1, padding_mode="circular"), dtype, gemm(3, 4, 4, splits=4))
        tile = (1, 1) if dtype == "float64" else (2, 2)
        yield (f"wgemm-tw16-{dtype}", op, (1, 3, 4, 21), (4, 3, 3, 3), False,
               dict(padding=1), dtype, gemm(*tile, 16))
    for mode in ("zeros", "reflect", "replicate", "circular"):
        yield (f"wchan-{mode}-ragged", op, (2, 3, 5, 7), (5, 3, 3, 3), False,
               dict(padding=1, padding_mode=mode), "float32", channels(1, 4, 4))
    for tv in (2, 3, 4):
        yield (f"wchan-tv{tv}-s2-g2", op, (1, 4, 9, 10), (2 * 2 * tv + 2, 2, 2, 3), False,
               dict(stride=2, dilation=(2, 1), padding=(2, 1), groups=2), "float32",
               channels(tv, 2, 2))
    yield ("wchan-splits-long-index", op, (3, 2, 5, 6), (4, 2, 3, 3), False, dict(padding=1),
           "float32", channels(1, 4, 5, splits=4, idx_t="long"))
    for dtype in DTYPES:
        yield (f"wchan-{dtype}", op, (2, 3, 6, 9), (4, 3, 3, 3), False,
               dict(padding=1, padding_mode="replicate"), dtype, channels(1, 2, 3))
        yield (f"wchan-tw{8 if dtype == 'float64' else 16}-{dtype}", op, (1, 2, 4, 5),
               (16, 2, 3, 3), False, dict(padding=1), dtype,
               channels(1, 8 if dtype == "float64" else 16, 2))
    for tw in (4, 8):
        yield (f"wchan-tw{tw}", op, (1, 2, 4, 5), (9, 2, 3, 3), False, {}, "float32",
               channels(1, tw, 2))


def heuristic_variants():
    """Problems run with the heuristic's choice for the device at hand, built strictly (a
    work-group its kernel cannot run is an error, not shrunk): under Oclgrind's GPU-like
    limits (tests/test_oclgrind.py) they show that every heuristic fits them. Each operation
    on a dense 3x3 layer, a strided one, a 1x1 and a depthwise one."""
    shapes = {"3x3": ((1, 16, 10, 10), (16, 16, 3, 3), dict(padding=1)),
              "s2": ((2, 8, 11, 11), (16, 8, 3, 3), dict(stride=2, padding=1)),
              "1x1": ((2, 16, 7, 7), (32, 16, 1, 1), {}),
              "depthwise": ((1, 16, 12, 12), (16, 1, 3, 3), dict(padding=1, groups=16))}
    for op in ("forward", "input_grad", "weight_grad"):
        for name, (x_shape, w_shape, kwargs) in shapes.items():
            yield (f"heuristic-{op}-{name}", op, x_shape, w_shape, op == "forward", kwargs,
                   "float32", dict(algorithm=HEURISTIC))


HEURISTIC = "heuristic"     # a variant's algorithm: the heuristic's choice on the device


# Tile parameters per operation: (channels per work-item, vector width) -> config.
TILES = {"forward": lambda k, w: dict(tk=k, tw=w),
         "input_grad": lambda k, w: dict(tc=k, tv=1, tw=w),
         "weight_grad": lambda k, w: dict(tk=k, tn=1, tw=w, splits=1)}
# The algorithm of a variant whose config names none.
DEFAULT_ALGORITHM = {"forward": "direct", "input_grad": "input_grad_gemm",
                     "weight_grad": "weight_grad_gemm"}


def algorithm_of(operation, config):
    """The algorithm a variant's config runs."""
    return ALGORITHMS[config.get("algorithm", DEFAULT_ALGORITHM[operation])]


def takes(operation, config, name, value):
    """Whether the variant's algorithm declares value among its parameter name's values."""
    return value in algorithm_of(operation, config).param(name).values


def allowed(queue, dtype, config):
    """Whether the device's compiler handles the variant's vector width (its probed widths:
    Oclgrind handles every one; PoCL's LLVM 14 no 16-wide vector where it targets AVX2)."""
    caps = clconv.device_info(queue.device).capabilities
    return config.get("tw", 1) in caps.widths_of(dtype)


def build_variant(queue, name, operation, x_shape, w_shape, with_bias, kwargs, dtype, config):
    """A variant's built Launch (building renders its templates) with what running it needs:
    (launch, problem, operands, epilogue); operands (x, w, b, dy, residual) are random arrays,
    b None without a bias; epilogue (activation, residual?) of a forward config."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if with_bias else None
    args = dict(stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros") | kwargs
    problem, _ = make_problem(x.shape, x.dtype, w.shape, w.dtype,
                              None if b is None else b.shape, None if b is None else b.dtype,
                              args["stride"], args["padding"], args["dilation"], args["groups"],
                              args["padding_mode"])
    if operation != "forward":
        problem = dataclasses.replace(problem, has_bias=False)
        b = None
    dy = rng.standard_normal(problem.output_shape).astype(dtype)
    residual = rng.standard_normal(problem.output_shape).astype(dtype)
    config = dict(config)
    activation, with_residual = config.pop("activation", None), config.pop("residual", False)
    epilogue = dict(activation=activation, has_residual=with_residual) if operation == "forward" \
        else None
    if config.get("algorithm") == HEURISTIC:
        algorithm, config = clconv.algorithms.choose(problem, clconv.device_info(queue.device),
                                                     operation)
        print(f"{name}: {algorithm.name} {config}", flush=True)
    else:
        algorithm = algorithm_of(operation, config)
        config.pop("algorithm", None)
        config = {p.name: 1 for p in algorithm.params if p.name in ("lx", "ly", "lz")} | config
    launch = algorithm.build(problem, queue, config, epilogue=epilogue)
    return launch, problem, (x, w, b, dy, residual), (activation, with_residual)


def run_variant(queue, name, operation, x_shape, w_shape, with_bias, kwargs, dtype, config):
    launch, problem, (x, w, b, dy, residual), (activation, with_residual) = build_variant(
        queue, name, operation, x_shape, w_shape, with_bias, kwargs, dtype, config)
    inputs = {"forward": [x, w] + ([b] if b is not None else [])
              + ([residual] if with_residual else []),
              "input_grad": [dy, w], "weight_grad": [x, dy]}[operation]
    y_naive, dx_naive, dw_naive = naive(x, w, b, dy, problem)
    expected = {"forward": ACTIVATIONS[activation](y_naive + (residual if with_residual else 0)),
                "input_grad": dx_naive, "weight_grad": dw_naive}[operation]
    on_device = [cl_array.to_device(queue, a) for a in inputs]
    out = cl_array.empty(queue, expected.shape, x.dtype)
    launch(queue, [(a.data, 0) for a in on_device], (out.data, 0), problem.batch)[-1].wait()
    bound = naive(np.abs(x), np.abs(w), None, np.abs(dy), problem)
    scale = max(1.0, float(np.abs(bound[("forward", "input_grad", "weight_grad")
                                         .index(operation)]).max()))
    err = np.abs(out.get().astype(np.float64) - expected).max()
    return err / scale <= TOL[dtype], err


def run_bias_grad(queue, dtype, batch):
    """The bias gradient (channel sums; split over the batch when it is large)."""
    dy = np.random.default_rng(0).standard_normal((batch, 3, 5, 7)).astype(dtype)
    db = clconv.conv2d_bias_grad(cl_array.to_device(queue, dy)).get()
    err = np.abs(db.astype(np.float64) - dy.astype(np.float64).sum(axis=(0, 2, 3))).max()
    return err <= TOL[dtype.name] * max(1.0, float(np.abs(dy).sum(axis=(0, 2, 3)).max())), err


# The batch_norm kernels: (activation, dtype, affine and running, work-group size,
# channels a group, plane height): every activation on ragged channel groups and a plane
# with a tail (35 values), a tree sum of 4 work-items; no parameters, one work-item, whole
# vectors only (height 2, width the vector width).
BATCH_NORM_VARIANTS = {
    **{f"batch_norm-{a}": (a, "float32", True, 4, 2, 5) for a in ACTIVATIONS},
    "batch_norm-float64-plain": ("relu6", "float64", False, 1, 1, 2),
}


def run_batch_norm(queue, name):
    """The batch_norm kernels of BATCH_NORM_VARIANTS[name] (the forward, then the backward
    on its statistics) against tests/reference.py."""
    activation, dtype, params, local, per_group, height = BATCH_NORM_VARIANTS[name]
    info = clconv.device_info(queue.device)
    width = 7 if height > 2 else max(capabilities.of_info(info).widths_of(dtype))
    shape = (2, 5, height, width)
    problem, _ = make_problem(shape, dtype, (5, 5, 1, 1), dtype, None, None, 1, 0, 1, 1,
                              "zeros")
    rng = np.random.default_rng(0)
    y, dz = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    gamma, beta, running_mean = (rng.standard_normal(5).astype(dtype) for _ in range(3))
    running_var = (rng.random(5) + 0.5).astype(dtype)
    to = lambda a: cl_array.to_device(queue, a)     # noqa: E731
    z, dy = cl_array.empty_like(to(y)), cl_array.empty_like(to(y))
    mean, invstd, dgamma, dbeta = (cl_array.empty(queue, 5, dtype) for _ in range(4))
    run_mean, run_var = to(running_mean), to(running_var)
    affine = [v for a in (gamma, beta) for v in (to(a).data, 0)] if params else []
    steps = [batch_norm.build(queue, batch_norm.constants(
        info, op, problem, activation, params, params and op == "forward", local, per_group))
        for op in ("forward", "backward")]
    running = [run_mean.data, 0, run_var.data, 0] if params else []
    steps[0](queue, 2, to(y).data, 0, *affine, z.data, 0, mean.data, invstd.data, *running,
             2, 0.25, 1e-3).wait()
    steps[1](queue, 2, to(y).data, 0, to(dz).data, 0, *affine, mean.data, invstd.data,
             dy.data, 0, dgamma.data, dbeta.data, 2).wait()
    g, b = (gamma, beta) if params else (None, None)
    want = batch_norm_train_ref(y, g, b, running_mean, running_var, 0.25, 1e-3, activation)
    want_grads = batch_norm_train_grad_ref(y, g, b, dz, 1e-3, activation)
    pairs = [(z, want[0]), (mean, want[1]), (invstd, want[2]), (dy, want_grads[0])]
    if params:
        pairs += [(run_mean, want[3]), (run_var, want[4]), (dgamma, want_grads[1]),
                  (dbeta, want_grads[2])]
    err = max(float(np.abs(got.get() - expected).max() / max(1.0, np.abs(expected).max()))
              for got, expected in pairs)
    return err <= 10 * TOL[dtype], err


def run_batch_norm_end_to_end(queue):
    """clconv.conv2d_batch_norm and its backward: a strided depthwise convolution, relu6."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 7, 6)).astype(np.float32)
    w = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    gamma, beta, running_mean = (rng.standard_normal(8).astype(np.float32) for _ in range(3))
    running_var = np.ones(8, np.float32)
    geometry = (2, 1, 1, 4)
    z, y, mean, invstd = clconv.conv2d_batch_norm(x, w, None, gamma, beta, running_mean,
                                                  running_var, *geometry, activation="relu6",
                                                  queue=queue)
    problem, _ = make_problem(x.shape, "float32", w.shape, "float32", None, None, *geometry,
                              "zeros")
    dz = rng.standard_normal(z.shape).astype(np.float32)
    dx, dw, _, dgamma, dbeta = clconv.conv2d_batch_norm_backward(
        x, w, y, mean, invstd, gamma, beta, dz, *geometry, activation="relu6", queue=queue)
    dy, dgamma_ref, dbeta_ref = batch_norm_train_grad_ref(y, gamma, beta, dz, 1e-5, "relu6")
    y_ref, dx_ref, dw_ref = naive(x, w, None, dy, problem)
    z_ref = batch_norm_train_ref(y_ref, gamma, beta, None, None, 0, 1e-5, "relu6")[0]
    err = max(float(np.abs(got - expected).max() / max(1.0, np.abs(expected).max()))
              for got, expected in ((y, y_ref), (z, z_ref), (dx, dx_ref), (dw, dw_ref),
                                    (dgamma, dgamma_ref), (dbeta, dbeta_ref)))
    return err <= 10 * TOL["float32"], err


def run_gather(queue, dtype):
    """A non-contiguous device array goes through the gather kernel before the convolution."""
    base = np.arange(2 * 3 * 5 * 8, dtype=dtype).reshape(2, 3, 5, 8)
    view = cl_array.to_device(queue, base)[:, :, 1:4, ::2]
    y = clconv.conv2d(view, cl_array.to_device(queue, np.ones((1, 3, 1, 1), dtype)))
    expect = base[:, :, 1:4, ::2].astype(np.float64).sum(axis=1, keepdims=True)
    err = np.abs(y.get() - expect).max()
    return np.allclose(y.get(), expect, rtol=1e-3), err


def run_probe(queue, storage, n):
    """The capability probe's kernel (clconv.capabilities) at one storage type and width."""
    failure = capabilities.check_width(queue, storage, n)
    return failure is None, 0.0 if failure is None else float("inf")


def run_mark(queue):
    """The kernel of the probe of whether kernels write host memory in place
    (clconv.arrays.writes_in_place), on a buffer of the device's own: its words read back."""
    buffer = cl.Buffer(queue.context, cl.mem_flags.READ_WRITE, arrays.PROBE_WORDS * 4)
    words = np.empty(arrays.PROBE_WORDS, np.uint32)
    cl.enqueue_copy(queue, words, buffer, wait_for=[arrays.mark(queue, buffer)])
    wrong = int(np.count_nonzero(words != arrays.marks()))
    return not wrong, float(wrong)


DTYPES = ("float16", "float32", "float64")
PROBES = [(s, n) for s in ("half", "float", "double") for n in capabilities.WIDTHS]


def gpu_like_names():
    """What runs under Oclgrind's GPU-like limits: the heuristics, the local-memory tiled
    GEMM's variants and the batch_norm kernels as clconv sizes them."""
    return ([v[0] for v in heuristic_variants()]
            + [v[0] for v in tiled_gemm_variants() if "epilogue" not in v[0]]
            + ["batch_norm-end-to-end"])


def all_names():
    return ([v[0] for v in variants()] + [f"gather-{d}" for d in DTYPES]
            + [f"bias_grad-{d}-n{n}" for d in DTYPES for n in (1, 64)]
            + [f"probe-{s}-{n}" for s, n in PROBES] + ["mark"]
            + list(BATCH_NORM_VARIANTS) + ["batch_norm-end-to-end"])


def main(names):
    """Run the named variants (all by default); exit status 1 if any result is wrong."""
    queue = clconv.queue_for()
    print(f"device: {queue.device.name}", flush=True)
    specs = {v[0]: v[1:] for v in itertools.chain(variants(), heuristic_variants())}
    failures = []
    for name in names or all_names():
        if name.startswith("gather-"):
            good, err = run_gather(queue, np.dtype(name[len("gather-"):]))
        elif name.startswith("bias_grad-"):
            dtype, batch = name[len("bias_grad-"):].split("-n")
            good, err = run_bias_grad(queue, np.dtype(dtype), int(batch))
        elif name.startswith("probe-"):
            storage, n = name[len("probe-"):].split("-")
            good, err = run_probe(queue, storage, int(n))
        elif name == "mark":
            good, err = run_mark(queue)
        elif name == "batch_norm-end-to-end":
            good, err = run_batch_norm_end_to_end(queue)
        elif name.startswith("batch_norm-"):
            good, err = run_batch_norm(queue, name)
        else:
            good, err = run_variant(queue, name, *specs[name])
        print(f"{name}: {'ok' if good else 'WRONG'} (max error {err:.2e})", flush=True)
        if not good:
            failures.append(name)
    print(f"{len(failures)} failed" if failures else "all variants ok", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
