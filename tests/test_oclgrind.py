"""Every kernel variant clconv can emit runs clean under Oclgrind.

Each variant runs in its own Oclgrind process (tests/oclgrind_variants.py NAME). Without
Oclgrind installed the tests skip, unless CLCONV_REQUIRE_OCLGRIND=1 (CI sets it), where they
fail.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import oclgrind_variants
from clconv.algorithms import ALGORITHMS

SCRIPT = Path(__file__).with_name("oclgrind_variants.py")
OCLGRIND = shutil.which("oclgrind")
PROBLEMS = re.compile(r"invalid (read|write)|data race|uninitiali[sz]ed|oclgrind fatal|"
                      r"undefined external|error", re.IGNORECASE)


def oclgrind_or_skip():
    if OCLGRIND is None:
        if os.environ.get("CLCONV_REQUIRE_OCLGRIND"):
            pytest.fail("oclgrind is not installed (apt-get install -y oclgrind)")
        pytest.skip("oclgrind is not installed (apt-get install -y oclgrind)")


@pytest.mark.parametrize("name", oclgrind_variants.all_names())
def test_variant_is_clean_under_oclgrind(name):
    oclgrind_or_skip()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([OCLGRIND, "--data-races", "--uninitialized", sys.executable,
                           str(SCRIPT), name], capture_output=True, text=True, timeout=600,
                          env=env)
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    assert "device: Oclgrind" in proc.stdout, report
    assert f"{name}: ok" in proc.stdout, report
    assert not PROBLEMS.search(proc.stderr), report


def switches(name, operation, x_shape, w_shape, with_bias, kwargs, dtype, config):
    """The template's compile-time branches that one variant takes, as (operation, switch,
    value) triples."""
    from clconv.problem import make_problem
    args = dict(stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros") | kwargs
    p, _ = make_problem(x_shape, dtype, w_shape, dtype, (w_shape[0],) if with_bias else None,
                        dtype if with_bias else None, args["stride"], args["padding"],
                        args["dilation"], args["groups"], args["padding_mode"])
    if config.get("algorithm") == "implicit_gemm":
        return gemm_switches(p, dtype, with_bias, config)
    if config.get("algorithm") == "depthwise":
        return depthwise_switches(p, dtype, with_bias, config)
    if config.get("algorithm") == "tiled_gemm":
        return tiled_gemm_switches(p, dtype, with_bias, config)
    if config.get("algorithm") == "winograd":
        return winograd_switches(p, dtype, with_bias, config)
    channels = config.get("tk", config.get("tc"))
    per_group = p.cin_per_group if operation == "input_grad" else p.cout_per_group
    width = {"forward": p.out_width, "input_grad": p.width + sum(p.pad[2:]),
             "weight_grad": p.out_width}[operation]
    if operation == "input_grad" and p.padding_mode == "zeros":
        width = p.width
    found = {("mode", p.padding_mode), ("dtype", dtype), ("tw", config["tw"]),
             ("ragged_channels", per_group % channels != 0),
             ("ragged_width", width % config["tw"] != 0), ("stride1", p.stride[1] == 1),
             ("idx", config.get("idx_t", "int"))}
    if operation == "forward":
        found |= {("bias", with_bias), ("ukw", config.get("ukw", 0)),
                  ("activation", config.get("activation")),
                  ("residual", config.get("residual", False))}
    if operation == "weight_grad":
        found |= {("split", config["splits"] > 1)}
    return {(operation,) + s for s in found}


def gemm_switches(p, dtype, with_bias, config):
    """The implicit GEMM's compile-time branches that one variant takes."""
    from clconv.algorithms.implicit_gemm import grid, phases, staged
    rows, cols = grid(p, config)
    tile = config["tv"] * config["tw"]
    positions = (p.out_height - 1) * cols + p.out_width
    reach = ((p.kernel_size[0] - 1) * p.dilation[0] // p.stride[0] * cols
             + (p.kernel_size[1] - 1) * p.dilation[1] // p.stride[1])
    found = {("mode", p.padding_mode), ("dtype", dtype), ("tw", config["tw"]),
             ("tv", config["tv"]), ("bias", with_bias), ("ukw", config.get("ukw", 0)),
             ("activation", config.get("activation")),
             ("residual", config.get("residual", False)),
             ("ragged_channels", p.cout_per_group % config["tk"] != 0),
             ("staged", staged(p)), ("dense_out", cols == p.out_width),
             ("lane_loads", -(-positions // tile) * tile - 1 + reach >= rows * cols),
             ("phases", "several" if phases(p) != (1, 1) else "one"),
             ("strided", p.stride != (1, 1)),
             ("idx", config.get("idx_t", "int"))}
    if cols != p.out_width:
        # A gapped output grid stores a vector inside one output row at once, others by lane.
        found |= {("gapped_store", "vector" if start < p.out_height * cols
                   and start % cols + config["tw"] <= p.out_width and config["tw"] > 1
                   else "lanes")
                  for start in range(0, -(-positions // tile) * tile, config["tw"])}
    return {("implicit_gemm",) + s for s in found}


def tiled_gemm_switches(p, dtype, with_bias, config):
    """The local-memory tiled GEMM's compile-time branches that one variant takes."""
    from clconv.algorithms.implicit_gemm import phases, staged
    k_values = config["cib"] * p.kernel_size[0] * p.kernel_size[1]
    found = {("mode", p.padding_mode), ("dtype", dtype), ("bias", with_bias),
             ("activation", config.get("activation")),
             ("residual", config.get("residual", False)),
             ("staged", staged(p)), ("phases", "several" if phases(p) != (1, 1) else "one"),
             ("ragged_channels", p.cout_per_group % config["mwg"] != 0),
             ("ragged_chunk", p.cin_per_group % config["cib"] != 0),
             ("partial_weight_loads", k_values % config["ndim"] != 0),
             ("partial_input_loads", k_values % config["mdim"] != 0),
             ("several_per_item", config["mwg"] > config["mdim"]
              and config["nwg"] > config["ndim"]),
             ("groups", p.groups > 1), ("idx", config.get("idx_t", "int"))}
    return {("tiled_gemm",) + s for s in found}


def depthwise_switches(p, dtype, with_bias, config):
    """The depthwise kernel's compile-time branches that one variant takes."""
    tw, sw = config["tw"], p.stride[1]
    even_loads = sw == 2 and tw > 1
    span = (p.kernel_size[1] - 1) * p.dilation[1] + (2 * tw if even_loads else (tw - 1) * sw + 1)
    tiles = -(-p.out_width // tw)
    inside = [t for t in range(tiles) if 0 <= t * tw * sw - p.pad[2]
              and t * tw * sw - p.pad[2] + span <= p.width and (t + 1) * tw <= p.out_width]
    found = {("mode", p.padding_mode), ("dtype", dtype), ("tw", tw), ("bias", with_bias),
             ("activation", config.get("activation")),
             ("residual", config.get("residual", False)),
             ("loads", "paired" if even_loads else "vector" if sw == 1 else "lanes"),
             ("inside_tiles", bool(inside)),
             ("static_border", (tiles - len(inside)) * p.kernel_size[1] <= 64),
             ("ragged_rows", p.out_height % config["rows"] != 0),
             ("ragged_width", p.out_width % tw != 0),
             ("multiplier", p.cout_per_group > 1), ("idx", config.get("idx_t", "int"))}
    return {("depthwise",) + s for s in found}


def winograd_switches(p, dtype, with_bias, config):
    """Winograd's compile-time branches that one variant takes."""
    tile_cols = -(-p.out_width // 2)
    inside = [t for t in range(tile_cols) if 0 <= 2 * t - p.pad[2] <= p.width - 4]
    tiles = p.batch * -(-p.out_height // 2) * tile_cols
    found = {("mode", p.padding_mode), ("dtype", dtype), ("tw", config["tw"]),
             ("tv", config["tv"]), ("bias", with_bias), ("activation", config.get("activation")),
             ("residual", config.get("residual", False)),
             ("ragged_channels", p.cout_per_group % config["tk"] != 0),
             ("inside_tiles", bool(inside)), ("border_tiles", len(inside) < tile_cols),
             ("odd_output", p.out_height % 2 == 1 or p.out_width % 2 == 1),
             ("padding_tiles", tiles % (config["tv"] * config["tw"]) != 0),
             ("groups", p.groups > 1), ("idx", config.get("idx_t", "int"))}
    return {("winograd",) + s for s in found}


def test_variants_cover_every_template_branch():
    covered = set().union(*(switches(*v) for v in oclgrind_variants.variants()))
    direct = {p.name: p.values for p in ALGORITHMS["direct"].params}
    common = ({("mode", m) for m in ("zeros", "reflect", "replicate", "circular")}
              | {("dtype", d) for d in ("float16", "float32", "float64")}
              | {("tw", t) for t in direct["tw"]}
              | {(k, v) for k in ("ragged_channels", "ragged_width", "stride1")
                 for v in (True, False)}
              | {("idx", "int"), ("idx", "long")})
    wanted = ({("forward",) + s for s in common}
              | {("input_grad",) + s for s in common}
              | {("weight_grad",) + s for s in common}
              | {("forward", "bias", b) for b in (True, False)}
              | {("forward", "ukw", u) for u in direct["ukw"]}
              | {("forward", "activation", a) for a in oclgrind_variants.ACTIVATIONS}
              | {("forward", "residual", r) for r in (True, False)}
              | {("weight_grad", "split", s) for s in (True, False)})
    gemm = {p.name: p.values for p in ALGORITHMS["implicit_gemm"].params}
    wanted |= {("implicit_gemm",) + s for s in (
        {("mode", m) for m in ("zeros", "reflect", "replicate", "circular")}
        | {("dtype", d) for d in ("float16", "float32", "float64")}
        | {("tw", t) for t in gemm["tw"]} | {("tv", t) for t in gemm["tv"]}
        | {("ukw", u) for u in gemm["ukw"]}
        | {("activation", a) for a in oclgrind_variants.ACTIVATIONS}
        | {("phases", k) for k in ("one", "several")}
        | {("gapped_store", k) for k in ("vector", "lanes")}
        | {(k, v) for k in ("bias", "residual", "ragged_channels", "staged", "dense_out",
                            "lane_loads", "strided") for v in (True, False)}
        | {("idx", "int"), ("idx", "long")})}
    wanted |= {("tiled_gemm",) + s for s in (
        {("mode", m) for m in ("zeros", "reflect", "replicate", "circular")}
        | {("dtype", d) for d in ("float16", "float32", "float64")}
        | {("activation", a) for a in oclgrind_variants.ACTIVATIONS}
        | {("phases", k) for k in ("one", "several")}
        | {(k, v) for k in ("bias", "residual", "staged", "ragged_channels", "ragged_chunk",
                            "partial_weight_loads", "partial_input_loads", "groups")
           for v in (True, False)}
        | {("several_per_item", True), ("idx", "int"), ("idx", "long")})}
    depthwise = {p.name: p.values for p in ALGORITHMS["depthwise"].params}
    wanted |= {("depthwise",) + s for s in (
        {("mode", m) for m in ("zeros", "reflect", "replicate", "circular")}
        | {("dtype", d) for d in ("float16", "float32", "float64")}
        | {("tw", t) for t in depthwise["tw"]}
        | {("loads", k) for k in ("vector", "paired", "lanes")}
        | {("activation", a) for a in oclgrind_variants.ACTIVATIONS}
        | {(k, v) for k in ("bias", "residual", "inside_tiles", "static_border", "ragged_rows",
                            "ragged_width", "multiplier") for v in (True, False)}
        | {("idx", "int"), ("idx", "long")})}
    wino = {p.name: p.values for p in ALGORITHMS["winograd"].params}
    wanted |= {("winograd",) + s for s in (
        {("mode", m) for m in ("zeros", "reflect", "replicate", "circular")}
        | {("dtype", d) for d in ("float16", "float32", "float64")}
        | {("tw", t) for t in wino["tw"]} | {("tv", t) for t in wino["tv"]}
        | {("activation", a) for a in oclgrind_variants.ACTIVATIONS}
        | {(k, v) for k in ("bias", "residual", "ragged_channels", "inside_tiles",
                            "border_tiles", "odd_output", "padding_tiles", "groups")
           for v in (True, False)}
        | {("idx", "int"), ("idx", "long")})}
    assert wanted <= covered, f"not covered under Oclgrind: {sorted(wanted - covered)}"
    names = oclgrind_variants.all_names()
    assert {f"bias_grad-{d}-n{n}" for d in ("float16", "float64") for n in (1, 64)} <= set(names)


def test_oclgrind_catches_an_out_of_bounds_write():
    """The harness itself can fail: a kernel writing past its buffer is reported."""
    oclgrind_or_skip()
    code = ("import numpy as np, pyopencl as cl, pyopencl.array as A\n"
            "ctx = cl.create_some_context(False); q = cl.CommandQueue(ctx)\n"
            "k = cl.Program(ctx, '__kernel void f(__global float *a)"
            "{ a[get_global_id(0) + 1] = 1.0f; }').build().f\n"
            "a = A.zeros(q, 4, np.float32); k(q, (4,), None, a.data); q.finish()\n")
    proc = subprocess.run([OCLGRIND, sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=120)
    assert PROBLEMS.search(proc.stderr), proc.stderr
