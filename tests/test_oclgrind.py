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

import numpy as np
import pyopencl as cl
import pytest

import clconv
import oclgrind_variants
from clconv import capabilities, programs
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


# A GPU's limits, smaller than PoCL's 4096 work-items and 2 MB of "local" memory.
GPU_LIKE = ("--max-wgsize", "256", "--local-mem-size", str(32 * 1024))


def oclgrind_env():
    """The environment for a process under Oclgrind: its one device, whatever else this
    run chose (CLCONV_DEVICE or PYOPENCL_CTX name other platforms)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for choice in ("CLCONV_DEVICE", "PYOPENCL_CTX"):
        env.pop(choice, None)
    return env


def run_under_oclgrind(name, limits=()):
    oclgrind_or_skip()
    env = oclgrind_env()
    proc = subprocess.run([OCLGRIND, "--data-races", "--uninitialized", *limits,
                           sys.executable, str(SCRIPT), name], capture_output=True, text=True,
                          timeout=600, env=env)
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    assert "device: Oclgrind" in proc.stdout, report
    assert f"{name}: ok" in proc.stdout, report
    assert not PROBLEMS.search(proc.stderr), report


@pytest.mark.parametrize("name", oclgrind_variants.all_names())
def test_variant_is_clean_under_oclgrind(name):
    run_under_oclgrind(name)


@pytest.mark.parametrize("name", oclgrind_variants.gpu_like_names())
def test_heuristics_and_local_memory_fit_gpu_like_limits(name):
    """Every operation's heuristic, and the tiled GEMM, under 256 work-items per group and
    32 KiB of local memory: built strictly, run clean and right."""
    run_under_oclgrind(name, GPU_LIKE)


def test_variants_cover_every_template_branch():
    """Building every variant renders its templates; together they take every `% if / % elif /
    % else` arm of cl_kernels/*.mako (observed through programs.recording_branches). The peak
    kernel (clconv.peak) is not rendered: peak.cl.mako has no arm of its own and it never runs
    under Oclgrind, so an arm of common.cl.mako that only it took would not be checked there.
    Variants of widths this device's compiler refuses are not built here (the probe's are
    rendered, for the arms of 16 lanes); under Oclgrind every one runs."""
    device = clconv.queue_for().device
    queue = cl.CommandQueue(cl.Context([device]))   # a new context: nothing memoised on it
    specs = {v[0]: v[1:] for v in oclgrind_variants.variants()}
    caps = clconv.device_info(device).capabilities
    with programs.recording_branches() as taken:
        for name in oclgrind_variants.all_names():    # what the Oclgrind runs run
            if name.startswith("gather-"):
                oclgrind_variants.run_gather(queue, np.dtype(name[len("gather-"):]))
            elif name.startswith("bias_grad-"):
                dtype, batch = name[len("bias_grad-"):].split("-n")
                oclgrind_variants.run_bias_grad(queue, np.dtype(dtype), int(batch))
            elif name.startswith("probe-"):
                storage, n = name[len("probe-"):].split("-")
                if int(n) in caps.widths_of(programs.STORAGE_DTYPES[storage]):
                    oclgrind_variants.run_probe(queue, storage, int(n))
                else:       # rendered only: the arms of widths this compiler refuses
                    programs.render("probe.cl.mako", parameters="",
                                    **capabilities.probe_constants(storage, int(n)))
            elif name == "mark":
                oclgrind_variants.run_mark(queue)
            elif name == "batch_norm-end-to-end":
                oclgrind_variants.run_batch_norm_end_to_end(queue)
            elif name.startswith("batch_norm-"):
                oclgrind_variants.run_batch_norm(queue, name)
            elif oclgrind_variants.allowed(queue, specs[name][-2], specs[name][-1]):
                oclgrind_variants.build_variant(queue, name, *specs[name])
    missing = sorted(programs.all_template_branches() - taken)
    lines = {name: (programs.kernels_dir() / name).read_text().splitlines()
             for name in {name for name, _ in missing}}
    assert not missing, "arms no Oclgrind variant takes:\n" + "\n".join(
        f"{name}:{line}: {lines[name][line - 1].strip()}" for name, line in missing)


# Values that shape a kernel's code without a template branch of their own (vector widths
# and counts, unrolling), besides the dtype, the padding mode and the index type.
SHAPING = {"tw": None, "tv": None, "ukw": 0}     # name -> the value a config without it has


def test_variants_run_every_dtype_mode_index_type_and_vector_shape():
    """Every algorithm runs under Oclgrind in each dtype, padding mode and index type, and
    with each declared value of the parameters in SHAPING it has."""
    seen = {name: set() for name in ALGORITHMS}
    for _, operation, _, _, _, kwargs, dtype, config in oclgrind_variants.variants():
        algorithm = oclgrind_variants.algorithm_of(operation, config)
        seen[algorithm.name] |= {("dtype", dtype), ("idx_t", config.get("idx_t", "int")),
                                 ("padding_mode", kwargs.get("padding_mode", "zeros"))}
        seen[algorithm.name] |= {(p.name, config.get(p.name, SHAPING[p.name]))
                                 for p in algorithm.params if p.name in SHAPING}
    for algorithm in ALGORITHMS.values():
        wanted = ({("dtype", d) for d in oclgrind_variants.DTYPES}
                  | {("idx_t", t) for t in ("int", "long")}
                  | {("padding_mode", m) for m in algorithm.padding_modes}
                  | {(p.name, v) for p in algorithm.params if p.name in SHAPING
                     for v in p.values})
        assert wanted <= seen[algorithm.name], (algorithm.name,
                                                sorted(wanted - seen[algorithm.name]))


def test_oclgrind_catches_an_out_of_bounds_write():
    """The harness itself can fail: a kernel writing past its buffer is reported."""
    oclgrind_or_skip()
    code = ("import numpy as np, pyopencl as cl, pyopencl.array as A\n"
            "ctx = cl.create_some_context(False); q = cl.CommandQueue(ctx)\n"
            "k = cl.Program(ctx, '__kernel void f(__global float *a)"
            "{ a[get_global_id(0) + 1] = 1.0f; }').build().f\n"
            "a = A.zeros(q, 4, np.float32); k(q, (4,), None, a.data); q.finish()\n")
    proc = subprocess.run([OCLGRIND, sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=120, env=oclgrind_env())
    assert PROBLEMS.search(proc.stderr), proc.stderr
