"""The device's probed capabilities (clconv.capabilities): what the probe finds, how a probe
that crashes or cannot run falls back, how parameter spaces, heuristics and the tuning key
follow the capabilities, and every vector width the device's compiler handles, forced."""
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pyopencl as cl
import pytest
import torch

import clconv
from clconv import capabilities, store
from clconv.algorithms import ALGORITHMS
from clconv.capabilities import WIDTHS
from clconv.problem import make_problem


@pytest.fixture(scope="module")
def info():
    return clconv.device_info(clconv.queue_for().device)


def with_caps(info, is_cpu=True, **fields):
    """info as a CPU (or not) with capabilities changed (an AVX-512 target, AVX2...)."""
    return dataclasses.replace(info, is_cpu=is_cpu, capabilities=dataclasses.replace(
        info.capabilities, is_cpu=is_cpu, **fields))


AVX512 = dict(widths=(("float", WIDTHS), ("half", WIDTHS), ("double", WIDTHS[:-1])),
              fast_width=16, registers=32, fma=())         # FMA rates untimed
# FMA rates at the probe's most chains: 16-wide at twice 8-wide's (an Intel AVX-512 core)...
FULL_WIDTH = dict(AVX512, fma=tuple((w, c, w * 12.5) for w in capabilities.FMA_WIDTHS
                                    for c in capabilities.FMA_CHAINS))
# ... or at 8-wide's (a Zen 4, which splits 512-bit FMAs).
SPLIT_WIDTH = dict(AVX512, fma=tuple((w, c, min(w, 8) * 12.5) for w in capabilities.FMA_WIDTHS
                                     for c in capabilities.FMA_CHAINS))
AVX2 = dict(widths=(("float", WIDTHS[:-1]), ("half", WIDTHS[:-1]), ("double", WIDTHS[:-2])),
            fast_width=8, registers=16, fma=())


def problem(shape=(1, 64, 14, 14), weight=(64, 64, 3, 3), padding=1, dtype="float32",
            groups=1):
    p, _ = make_problem(shape, np.dtype(dtype), weight, np.dtype(dtype), None, None, 1,
                        padding, 1, groups, "zeros")
    return p


# --- the probe -------------------------------------------------------------------------------

def test_the_probe_finds_widths_and_on_a_cpu_the_vector_and_registers(info):
    caps = info.capabilities
    for storage, widths in caps.widths:
        assert widths == WIDTHS[:len(widths)] and 4 in widths, (storage, widths)
        if len(widths) < len(WIDTHS):           # a refused width says why
            assert any(note.startswith(f"{storage}{WIDTHS[len(widths)]}:")
                       for note in caps.notes), caps.notes
    if clconv.queue_for().device.type == cl.device_type.CPU:    # a CPU alone: timed
        assert caps.fast_width in capabilities.FMA_WIDTHS
        assert caps.registers in (16, 32)
        assert caps.fast_width in dict(caps.widths)["float"]
        assert {(w, c) for w, c, _ in caps.fma} >= {(caps.fast_width, 8),
                                                   (caps.fast_width, capabilities.REGISTER_CHAINS)}
    assert "vector widths that build and run correctly" in caps.describe()


def test_capabilities_are_cached_on_disk_and_a_bad_file_is_re_probed(info, tmp_path,
                                                                       monkeypatch):
    device = clconv.queue_for().device
    monkeypatch.setenv("CLCONV_CACHE_DIR", str(tmp_path))
    capabilities.forget()
    try:
        first = capabilities.capabilities_of(device)
        path = capabilities.cache_path(info)
        saved = json.loads(path.read_text())
        assert saved["format"] == "clconv-capabilities" and saved["widths"]
        assert first.key() == info.capabilities.key()
        capabilities.forget()
        probes = []
        monkeypatch.setattr(capabilities, "probe", lambda d: probes.append(d) or first)
        assert capabilities.capabilities_of(device) == first and not probes    # from the file
        for bad in ("{not json", json.dumps(dict(saved, widths=[["float", [1, 3]]])),
                    json.dumps(dict(saved, version=99)), json.dumps(dict(saved, registers="32")),
                    json.dumps(dict(saved, widths=[["half", [1, 2]]]))):
            path.write_text(bad)
            capabilities.forget()
            with pytest.warns(UserWarning, match="re-probing the device"):
                assert capabilities.capabilities_of(device) == first
        assert len(probes) == 5
        assert json.loads(path.read_text())["widths"] == saved["widths"]     # rewritten
    finally:
        capabilities.forget()


CRASH = ("import os, sys, clconv.capabilities as c\n"
         "real = c.check_width\n"
         "c.check_width = lambda q, s, n: os.abort() if n == {n} else real(q, s, n)\n"
         "c._main(sys.argv)")


def test_a_probe_that_crashes_keeps_the_widths_below_and_the_process_alive(monkeypatch):
    device = clconv.queue_for().device
    monkeypatch.setattr(capabilities, "CHILD_CODE", CRASH.format(n=8))
    caps = capabilities.probe(device)
    for storage, widths in caps.widths:
        assert max(widths) <= 4, (storage, widths)
    assert any("float8" in note and "exited" in note for note in caps.notes)
    info = dataclasses.replace(capabilities.queried_info(device), capabilities=caps)
    p = problem()
    config = dict(ALGORITHMS["implicit_gemm"].default_config(p, info), tw=8)
    assert "tw must be one of (1, 2, 4)" in ALGORITHMS["implicit_gemm"].constraints(p, info,
                                                                                   config)
    assert ALGORITHMS["implicit_gemm"].default_config(p, info)["tw"] <= 4


def test_a_probe_that_cannot_run_falls_back_to_the_conservative_widths(monkeypatch):
    device = clconv.queue_for().device
    monkeypatch.setattr(capabilities, "CHILD_CODE", "raise SystemExit(3)")
    caps = capabilities.probe(device)
    assert dict(caps.widths)["float"] == (1, 2, 4, 8)       # 32-byte vectors at most
    assert dict(caps.widths).get("double", (1, 2, 4)) == (1, 2, 4)
    assert caps.fast_width is None and "exited with 3" in caps.notes[0]
    assert caps.accumulators() == (128 if caps.is_cpu else capabilities._gpu_accumulators(
        capabilities.queried_info(device)))
    assert not caps.probed        # not saved: the next process tries again


def test_fma_timings_that_crash_leave_the_speed_facts_unmeasured(monkeypatch):
    device = clconv.queue_for().device
    if device.type != cl.device_type.CPU:
        pytest.skip("FMA timings are taken on CPUs only")
    code = CRASH.replace("c.check_width = ", "c.fma_rates = lambda *a, **k: os.abort()\nx = ")
    monkeypatch.setattr(capabilities, "CHILD_CODE", code.format(n=0))
    caps = capabilities.probe(device)
    assert caps.fast_width is None and caps.registers is None
    assert any("FMA timing failed" in note for note in caps.notes)


# --- what follows from the capabilities -------------------------------------------------------

def test_parameter_spaces_follow_the_probed_widths(info):
    p = problem()
    gemm = ALGORITHMS["implicit_gemm"]
    wide = with_caps(info, **AVX512)
    narrow = with_caps(info, **AVX2)
    config = dict(tk=6, tv=1, tw=16, lx=1, ly=1, ukw=0)
    assert gemm.constraints(p, wide, config) is None
    assert "tw must be one of (1, 2, 4, 8)" in gemm.constraints(p, narrow, config)
    # A tw of two hardware vectors takes two registers each: 6 x 1 x 16 fits AVX2's 16.
    assert gemm.constraints(p, narrow, dict(config, tw=8, tv=2)) is None
    assert "registers" in gemm.constraints(p, narrow, dict(config, tk=8, tv=2, tw=8))
    assert gemm.constraints(p, wide, dict(config, tk=14, tv=2)) is None
    assert "registers" in gemm.constraints(p, wide, dict(config, tk=15, tv=2))
    for name in ("direct", "depthwise", "input_grad_gemm", "input_grad_depthwise",
                 "weight_grad_gemm", "weight_grad_channels"):
        algorithm = ALGORITHMS[name]
        q = problem(weight=(64, 1, 3, 3), groups=64, padding=1) if "depthwise" in name else p
        base = algorithm.default_config(q, wide)
        assert algorithm.constraints(q, wide, dict(base, tw=16)) is None, name
        assert "tw must be one of" in algorithm.constraints(q, narrow, dict(base, tw=16)), name
    assert "tw must be one of (1, 2, 4)" in gemm.constraints(
        problem(dtype="float64"), narrow, dict(config, tw=8))


def test_heuristics_fit_the_device_class(info):
    p = problem(shape=(1, 256, 14, 14), weight=(256, 256, 3, 3))
    gemm = ALGORITHMS["implicit_gemm"]
    avx512 = gemm.default_config(p, with_caps(info, **AVX512))
    avx2 = gemm.default_config(p, with_caps(info, **AVX2))
    assert (avx512["tk"], avx512["tv"], avx512["tw"]) == (8, 1, 16)
    split = gemm.default_config(p, with_caps(info, **SPLIT_WIDTH))
    assert (split["tk"], split["tv"], split["tw"]) == (8, 1, 16)
    full = gemm.default_config(p, with_caps(info, **FULL_WIDTH))
    assert (full["tk"], full["tv"], full["tw"]) == (8, 2, 16)
    assert with_caps(info, **FULL_WIDTH).capabilities.full_width_fma
    assert not with_caps(info, **SPLIT_WIDTH).capabilities.full_width_fma
    # pack=1 from 256 output channels, where a tile's run of a channel plane fits one cache
    # line: 1 x 16 floats, not 2 x 16 (unless the lines are 128 bytes).
    one_by_one = problem(shape=(1, 64, 56, 56), weight=(256, 64, 1, 1), padding=0)
    assert gemm.default_config(one_by_one, with_caps(info, **SPLIT_WIDTH))["pack"] == 1
    assert gemm.default_config(one_by_one, with_caps(info, **FULL_WIDTH))["pack"] == 0
    wide_lines = dataclasses.replace(with_caps(info, **FULL_WIDTH), cacheline=128)
    assert gemm.default_config(one_by_one, wide_lines)["pack"] == 1
    fewer = problem(shape=(1, 64, 56, 56), weight=(128, 64, 1, 1), padding=0)
    assert gemm.default_config(fewer, with_caps(info, **SPLIT_WIDTH))["pack"] == 0
    # Two vectors only where they pad the positions by 10% at most: 7x7's 49 take 64 either
    # way, 5x5's 25 would take 64 instead of 32.
    small = problem(shape=(1, 256, 5, 5), weight=(256, 256, 3, 3))
    assert gemm.default_config(small, with_caps(info, **FULL_WIDTH))["tv"] == 1
    assert (avx2["tk"], avx2["tv"], avx2["tw"]) == (6, 2, 8)
    gpu_info = with_caps(info, is_cpu=False, fast_width=None, registers=None,
                         widths=AVX512["widths"], gpu_accumulators=128)
    assert gemm.default_config(p, gpu_info)["tw"] == 4
    assert gpu_info.capabilities.accumulators() == capabilities.GPU_ACCUMULATORS
    intel = dataclasses.replace(gpu_info, vendor="Intel(R) Corporation")
    assert capabilities.unprobed(intel, "test").accumulators() == 64
    assert with_caps(info, **AVX512).capabilities.accumulators() == 512
    assert with_caps(info, **AVX2).capabilities.accumulators() == 128
    for name, q, wide in (
            ("depthwise", problem(shape=(1, 32, 56, 56), weight=(32, 1, 3, 3), groups=32), 16),
            # The gradients' rows stay within 256 bits; the input gradient's GEMM and the
            # channel-vectorised weight gradient are the forward's micro-kernel (turned
            # around), and take its widths.
            ("weight_grad_gemm", problem(shape=(1, 32, 56, 56), weight=(32, 32, 3, 3)), 8),
            ("weight_grad_channels", problem(shape=(1, 32, 14, 14), weight=(32, 32, 3, 3)), 16),
            ("input_grad_gemm", problem(shape=(1, 32, 56, 56), weight=(32, 32, 3, 3)), 16)):
        assert ALGORITHMS[name].default_config(q, with_caps(info, **AVX512))["tw"] == wide
        assert ALGORITHMS[name].default_config(q, with_caps(info, **AVX2))["tw"] == 8, name


def test_the_capabilities_are_part_of_the_tuning_key(info, tmp_path, monkeypatch):
    """A cache or database tuned with 16-wide code is never applied where the probe refuses
    16: the cache file is another, the database is passed over, a hand-copied entry is
    refused by the constraints."""
    wide, narrow = with_caps(info, **AVX512), with_caps(info, **AVX2)
    assert store.cache_path(wide) != store.cache_path(narrow)
    assert store.device_key(wide)["capabilities"]["widths"]["float"] == list(WIDTHS)
    # Timed facts steer heuristics only: a re-probe that times them otherwise keeps the file.
    assert store.cache_path(wide) == store.cache_path(with_caps(wide, registers=16))
    p = problem(shape=(1, 24, 14, 14), weight=(24, 24, 3, 3))
    sig = store.signature(p)
    config = dict(tk=6, tv=1, tw=16, lx=1, ly=1, ukw=0, pack=0)
    entry = {"algorithm": "implicit_gemm", "config": config,
             "sources": store.sources_of("implicit_gemm"), "ms": 1.0, "batch": 1}
    databases = tmp_path / "databases"
    databases.mkdir()
    monkeypatch.setattr(store, "databases_dir", lambda: databases)
    monkeypatch.setenv("CLCONV_TUNE", "cached")
    store.export_database(wide, databases / "wide.json", {sig: entry})
    assert store.database_entries(wide) == {sig: entry}
    assert store.database_entries(narrow) == {}
    algorithm, config, source = store.tuned_choice(p, wide)
    assert (algorithm.name, config, source) == ("implicit_gemm", entry["config"],
                                                databases / "wide.json")
    # The same entry in a file without capabilities: the constraints refuse it, with a warning.
    data = json.loads((databases / "wide.json").read_text())
    del data["capabilities"]
    (databases / "wide.json").write_text(json.dumps(data))
    with pytest.warns(store.TuningCacheWarning, match="tw must be one of"):
        assert store.tuned_choice(p, narrow) is None


# --- every width the compiler handles, forced ---------------------------------------------

def width_cases():
    info = clconv.device_info(clconv.queue_for().device)
    for dtype in ("float32", "float16", "float64"):
        if dtype == "float64" and not info.fp64:
            continue
        for tw in info.capabilities.widths_of(dtype):
            for name in ("implicit_gemm", "direct", "depthwise", "input_grad_gemm",
                         "input_grad_depthwise", "weight_grad_gemm", "weight_grad_channels"):
                if tw in ALGORITHMS[name].param("tw").values:
                    yield pytest.param(name, dtype, tw, id=f"{name}-{dtype}-tw{tw}")


TOLERANCE = {"float16": 2e-2, "float32": 1e-4, "float64": 1e-10}


@pytest.mark.parametrize("name, dtype, tw", list(width_cases()))
def test_every_probed_width_is_correct(name, dtype, tw):
    rng = np.random.default_rng(tw)
    groups = 6 if "depthwise" in name else 1
    x = rng.standard_normal((2, 6, 9, 37)).astype(dtype)
    w = rng.standard_normal((6, 6 // groups, 3, 3)).astype(dtype)
    xt, wt = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(w.astype(np.float64))
    smallest = {"implicit_gemm": dict(tk=1, tv=1), "input_grad_gemm": dict(tc=1, tv=1),
                "weight_grad_gemm": dict(tk=1, tn=1), "weight_grad_channels": dict(tv=1, tn=1)}
    params = dict(tw=tw) | smallest.get(name, {})
    args = dict(padding=1, groups=groups)
    with clconv.use_algorithm(name, **params):
        if name.startswith("input_grad"):
            dy = rng.standard_normal((2, 6, 9, 37)).astype(dtype)
            got = clconv.conv2d_input_grad(x.shape, w, dy, **args)
            want = torch.nn.grad.conv2d_input(x.shape, wt, torch.from_numpy(
                dy.astype(np.float64)), **args)
        elif name.startswith("weight_grad"):
            dy = rng.standard_normal((2, 6, 9, 37)).astype(dtype)
            got = clconv.conv2d_weight_grad(x, w.shape, dy, **args)
            want = torch.nn.grad.conv2d_weight(xt, w.shape, torch.from_numpy(
                dy.astype(np.float64)), **args)
        else:
            got = clconv.conv2d(x, w, **args)
            want = torch.nn.functional.conv2d(xt, wt, **args)
    scale = max(1.0, float(want.abs().max()))
    assert np.abs(got.astype(np.float64) - want.numpy()).max() / scale < TOLERANCE[dtype]


def test_a_width_the_device_refuses_is_a_clear_error(info, monkeypatch):
    refused = [w for w in WIDTHS if w not in info.capabilities.widths_of("float32")]
    if not refused:         # a compiler that handles every width: one that refuses 16
        narrow = with_caps(info, **AVX2)
        monkeypatch.setattr(clconv.planner, "device_info", lambda device: narrow)
        refused = [16]
    x = np.zeros((1, 4, 6, 6), np.float32)
    with clconv.use_algorithm("implicit_gemm", tw=refused[0], tk=1, tv=1):
        with pytest.raises(ValueError, match="tw must be one of"):
            clconv.conv2d(x, np.zeros((4, 4, 3, 3), np.float32))


def test_clconv_info_shows_the_capabilities():
    out = subprocess.run([sys.executable, "-m", "clconv", "info"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "vector widths that build and run correctly" in out.stdout
    assert "capabilities probed once per device and driver" in out.stdout


def test_bench_peak_tries_every_width_up_to_the_native_one(info):
    from clconv import peak
    measured = peak.measure(clconv.queue_for(), repeats=1)
    native = dict(info.capabilities.native_widths)["float"]
    probed = info.capabilities.widths_of("float32")
    assert {w for w, _ in measured.trials} == {w for w in probed if w <= max(4, native)}
    assert {c for _, c in measured.trials} == set(peak.CHAINS)
    assert measured.gflops == max(measured.trials.values()) > 0


def test_a_sub_device_gets_the_conservative_capabilities():
    device = clconv.queue_for().device
    try:
        sub = device.create_sub_devices([cl.device_partition_property.EQUALLY, 1])[0]
    except (cl.Error, cl.LogicError):
        pytest.skip("the device cannot be partitioned")
    caps = capabilities.probe(sub)
    assert "sub-device" in caps.notes[0] and max(dict(caps.widths)["float"]) <= 8
    # Used through device_info, it has its root device's capabilities (its compiler's).
    assert clconv.device_info(sub).capabilities == clconv.device_info(device).capabilities
