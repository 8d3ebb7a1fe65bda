"""Run every kernel variant clconv can emit at a small shape; meant to run under Oclgrind.

    oclgrind --data-races --uninitialized python tests/oclgrind_variants.py [NAME ...]

Each variant is checked against a small NumPy loop too; the process exits non-zero on a
wrong result. Oclgrind itself reports invalid accesses, races and uninitialised reads on
stderr (tests/test_oclgrind.py fails on any of them).
"""
from __future__ import annotations

import itertools
import sys

import numpy as np
import pyopencl.array as cl_array

import clconv
from clconv.algorithms import ALGORITHMS
from clconv.problem import make_problem

TOL = {"float16": 2e-2, "float32": 1e-5, "float64": 1e-12}


def naive(x, w, b, p):
    """Direct loops over the padded input (index maps written independently of the kernel)."""
    pt, pb, pl, pr = p.pad
    mode = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)),
                mode=mode[p.padding_mode])
    y = np.zeros(p.output_shape)
    cg, kg = p.cin_per_group, p.cout_per_group
    for n, k, i, j in itertools.product(range(p.batch), range(p.out_channels),
                                        range(p.out_height), range(p.out_width)):
        g = k // kg
        for c, a, e in itertools.product(range(cg), range(p.kernel_size[0]),
                                         range(p.kernel_size[1])):
            y[n, k, i, j] += (w[k, c, a, e]
                              * xp[n, g * cg + c, i * p.stride[0] + a * p.dilation[0],
                                   j * p.stride[1] + e * p.dilation[1]])
        if b is not None:
            y[n, k, i, j] += b[k]
    return y


def variants():
    """(name, input shape, weight shape, bias?, conv kwargs, dtype, config)."""
    modes = ("zeros", "reflect", "replicate", "circular")
    for mode in modes:
        # border and interior tiles, ragged last tile (w_out 7 % 4), ragged channel block
        yield (f"{mode}-s1-tw4-tk3", (2, 2, 5, 7), (5, 2, 3, 3), True,
               dict(padding=1, padding_mode=mode), "float32", dict(tk=3, tw=4))
        # stride 2, dilation 2, asymmetric 'same'-like padding through a pair, groups
        yield (f"{mode}-s2-d2-g2", (1, 4, 9, 10), (4, 2, 2, 3), False,
               dict(stride=2, dilation=(2, 1), padding=(2, 1), groups=2, padding_mode=mode),
               "float32", dict(tk=2, tw=4))
        yield (f"{mode}-same-even", (1, 3, 6, 6), (2, 3, 4, 2), True,
               dict(padding="same", padding_mode=mode), "float32", dict(tk=2, tw=8))
    for tw in ALGORITHMS["direct"].params[1].values:
        yield (f"tw{tw}", (1, 3, 6, 11), (4, 3, 3, 3), True, dict(padding=1), "float32",
               dict(tk=4, tw=tw))
    yield ("depthwise-mult2", (1, 3, 7, 7), (6, 1, 3, 3), True, dict(padding=1, groups=3),
           "float32", dict(tk=1, tw=4))
    yield ("1x1-stride2", (2, 5, 7, 9), (3, 5, 1, 1), False, dict(stride=2), "float32",
           dict(tk=3, tw=4))
    yield ("kernel-covers-input", (1, 2, 5, 5), (3, 2, 5, 5), True, {}, "float32",
           dict(tk=3, tw=1))
    yield ("1x1-input-padded", (1, 2, 1, 1), (2, 2, 3, 3), True, dict(padding=1), "float32",
           dict(tk=2, tw=1))
    yield ("unroll-kw-reflect", (1, 2, 5, 9), (3, 2, 3, 5), True,
           dict(padding=(1, 2), padding_mode="reflect"), "float32", dict(tk=3, tw=4, ukw=1))
    yield ("long-index", (1, 2, 5, 6), (3, 2, 3, 3), True, dict(padding=1), "float32",
           dict(tk=2, tw=4, idx_t="long"))
    for dtype in ("float16", "float64"):
        for mode in ("zeros", "reflect"):
            yield (f"{dtype}-{mode}", (1, 3, 6, 9), (4, 3, 3, 3), True,
                   dict(padding=1, padding_mode=mode), dtype, dict(tk=2, tw=4))
        yield (f"{dtype}-tw1", (1, 2, 4, 4), (2, 2, 3, 3), False, dict(stride=2), dtype,
               dict(tk=2, tw=1))


def run_variant(queue, name, x_shape, w_shape, with_bias, kwargs, dtype, config):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if with_bias else None
    args = dict(stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros") | kwargs
    problem, _ = make_problem(x.shape, x.dtype, w.shape, w.dtype,
                              None if b is None else b.shape, None if b is None else b.dtype,
                              args["stride"], args["padding"], args["dilation"], args["groups"],
                              args["padding_mode"])
    algorithm = ALGORITHMS["direct"]
    launch = algorithm.build(problem, queue, dict(lx=1, ly=1, lz=1) | config)
    xd, wd = cl_array.to_device(queue, x), cl_array.to_device(queue, w)
    bd = None if b is None else cl_array.to_device(queue, b)
    y = cl_array.empty(queue, problem.output_shape, x.dtype)
    launch(queue, (xd.data, 0), (wd.data, 0), None if bd is None else (bd.data, 0),
           (y.data, 0), problem.batch).wait()
    err = np.abs(y.get().astype(np.float64) - naive(x, w, b, problem)).max()
    scale = max(1.0, float(np.abs(naive(np.abs(x), np.abs(w), None, problem)).max()))
    return err / scale <= TOL[dtype], err


def run_gather(queue, dtype):
    """A non-contiguous device array goes through the gather kernel before the convolution."""
    base = np.arange(2 * 3 * 5 * 8, dtype=dtype).reshape(2, 3, 5, 8)
    view = cl_array.to_device(queue, base)[:, :, 1:4, ::2]
    y = clconv.conv2d(view, cl_array.to_device(queue, np.ones((1, 3, 1, 1), dtype)))
    expect = base[:, :, 1:4, ::2].astype(np.float64).sum(axis=1, keepdims=True)
    err = np.abs(y.get() - expect).max()
    return np.allclose(y.get(), expect, rtol=1e-3), err


def all_names():
    return [v[0] for v in variants()] + [f"gather-{d}" for d in ("float16", "float32", "float64")]


def main(names):
    """Run the named variants (all by default); exit status 1 if any result is wrong."""
    queue = clconv.queue_for()
    print(f"device: {queue.device.name}", flush=True)
    specs = {v[0]: v[1:] for v in variants()}
    failures = []
    for name in names or all_names():
        if name.startswith("gather-"):
            good, err = run_gather(queue, np.dtype(name[len("gather-"):]))
        else:
            good, err = run_variant(queue, name, *specs[name])
        print(f"{name}: {'ok' if good else 'WRONG'} (max error {err:.2e})", flush=True)
        if not good:
            failures.append(name)
    print(f"{len(failures)} failed" if failures else "all variants ok", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
