"""Device choice and the `clconv info` / `clconv bench` commands."""
import json
import subprocess
import sys

import numpy as np
import pytest

import clconv
from clconv import device as device_mod
from clconv import programs


def test_clconv_device_substring_chooses_and_rejects(monkeypatch, queue):
    name = queue.device.name.strip()
    monkeypatch.setenv("CLCONV_DEVICE", name.upper())     # any case
    first_match = next(d for _, d in device_mod.all_devices() if device_mod._matches(d, name))
    assert clconv.choose_device() == first_match
    assert name in first_match.name
    monkeypatch.setenv("CLCONV_DEVICE", "no-such-device-xyz")
    with pytest.raises(clconv.NoDeviceError, match="no-such-device-xyz"):
        clconv.choose_device()


def test_pyopencl_ctx_is_honoured(monkeypatch):
    monkeypatch.delenv("CLCONV_DEVICE", raising=False)
    monkeypatch.setenv("PYOPENCL_CTX", "0:0")
    first = device_mod.all_devices()[0][1]
    assert clconv.choose_device() == first


def test_no_driver_says_to_install_pocl(monkeypatch):
    monkeypatch.setattr(device_mod, "all_devices", lambda: [])
    with pytest.raises(clconv.NoDeviceError, match="pocl"):
        clconv.choose_device()


class _FakeDevice:
    type = device_mod.cl.device_type.CPU
    vendor = "clconv tests"

    def __init__(self, name):
        self.name = name
        self.platform = type("Platform", (), {"name": f"{name} platform"})()


def _fake_devices(monkeypatch, failures):
    """Devices named as failures' keys, whose compilers fail with its values (None: build)."""
    devices = [_FakeDevice(name) for name in failures]
    monkeypatch.setattr(device_mod, "all_devices", lambda: [(d.platform, d) for d in devices])
    monkeypatch.setattr(device_mod, "compile_failure", lambda d: failures[d.name])
    monkeypatch.delenv("CLCONV_DEVICE", raising=False)
    monkeypatch.delenv("PYOPENCL_CTX", raising=False)
    return devices


def test_default_choice_skips_a_device_that_cannot_compile(monkeypatch):
    broken, working = _fake_devices(monkeypatch, {"old-llvm": "error: unknown target CPU",
                                                  "new-llvm": None})
    assert clconv.choose_device() is working


def test_no_device_that_compiles_names_each_reason(monkeypatch):
    _fake_devices(monkeypatch, {"a": "error: one", "b": "error: two"})
    with pytest.raises(clconv.NoDeviceError, match="a .*error: one.*b .*error: two"):
        clconv.choose_device()


def test_a_chosen_device_that_cannot_compile_is_refused(monkeypatch):
    _fake_devices(monkeypatch, {"old-llvm": "error: unknown target CPU", "new-llvm": None})
    monkeypatch.setenv("CLCONV_DEVICE", "old-llvm")
    with pytest.raises(clconv.NoDeviceError, match="old-llvm.*cannot compile.*unknown target"):
        clconv.choose_device()


def test_compile_failure_reports_the_build_log(monkeypatch, queue):
    assert device_mod.compile_failure(queue.device) is None
    log = ("clBuildProgram failed: BUILD_PROGRAM_FAILURE\n\nBuild on x:\n\n"
           "error: unknown target CPU 'generic'\nDevice x failed to build the program\n")

    def failing_build(*args):
        raise device_mod.cl.RuntimeError(log)
    monkeypatch.setattr(device_mod.cl, "Program", failing_build)
    reason = device_mod.compile_failure.__wrapped__(queue.device)
    assert reason.startswith("error: unknown target CPU 'generic'")
    assert "pocl-opencl-icd" in reason          # what to install instead


def test_device_argument_type_is_checked():
    with pytest.raises(TypeError, match="device"):
        clconv.Conv2d(1, 1, 1, device=3.5)


def test_kernel_templates_ship_with_the_package():
    kernels = programs.kernels_dir()
    assert {"direct.cl.mako", "common.cl.mako", "gather.cl.mako"} <= {
        p.name for p in kernels.glob("*.mako")}
    if "site-packages" in clconv.__file__:     # an installed (non-editable) clconv
        assert kernels.parent.resolve() == __import__("pathlib").Path(clconv.__file__).parent.resolve()


def test_second_call_does_no_rendering_or_compiling(monkeypatch, rng):
    x = rng.standard_normal((1, 3, 7, 7)).astype(np.float32)
    w = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    first = clconv.conv2d(x, w, padding=2, dilation=2)

    def forbidden(*args, **kwargs):
        raise AssertionError("rendered or compiled again")
    monkeypatch.setattr(programs, "render", forbidden)
    monkeypatch.setattr(programs.cl, "Program", forbidden)
    assert np.array_equal(clconv.conv2d(x, w, padding=2, dilation=2), first)
    # another batch size reuses the compiled program too
    clconv.conv2d(np.concatenate([x, x]), w, padding=2, dilation=2)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "clconv", *args], capture_output=True,
                          text=True, timeout=600)


def test_info_lists_and_marks_the_device(queue):
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    assert f"* {queue.device.name.strip()}" in proc.stdout
    assert "max work-group" in proc.stdout and "fp64" in proc.stdout


def test_bench_prints_a_checked_table():
    proc = run_cli("bench", "--only", "mbv2_dw3x3_960", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr
    row = [l for l in proc.stdout.splitlines() if l.startswith("mbv2_dw3x3_960")]
    assert row and row[0].rstrip().endswith("ok"), proc.stdout
    assert "GFLOP/s" in proc.stdout and "[1/1]" in proc.stderr


def test_bench_backward_adds_checked_gradient_rows():
    proc = run_cli("bench", "--only", "r50_3x3_512-512@7_b1", "--repeats", "2", "--backward")
    assert proc.returncode == 0, proc.stderr
    rows = [l.split() for l in proc.stdout.splitlines() if l.startswith("r50_3x3_512")]
    assert [r[1] for r in rows] == ["forward", "input_grad", "weight_grad"], proc.stdout
    assert all(r[-1] == "ok" for r in rows), proc.stdout
    assert "weight_grad: total" in proc.stdout and "input_grad: total" in proc.stdout


def test_bench_peak_reports_the_fma_peak():
    proc = run_cli("bench", "--peak")
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert "float32 FMA peak" in first and float(first.split("peak ")[1].split()[0]) > 0


def test_bench_json_holds_the_raw_numbers(tmp_path):
    path = tmp_path / "bench.json"
    proc = run_cli("bench", "--only", "mbv2_dw3x3_960", "--repeats", "2", "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(path.read_text())
    (row,) = data["rows"]
    assert row["name"] == "mbv2_dw3x3_960@7_b1" and row["ok"]
    for key in ("untuned_ms", "profiled_ms", "ms", "e2e_ms", "gflops", "gbps", "share_of_peak",
                "e2e_share"):
        assert row[key] > 0, key
    assert data["peak"]["gflops"] > 0
    (summary,) = data["summary"]
    assert summary["operation"] == "forward" and summary["layers"] == 1
    header = proc.stdout.splitlines()[1]
    assert all(c in header for c in ("untuned", "profiled", " ms ", "peak", "GB/s", "e2e ms",
                                     "e2e/dev"))


def test_bench_compares_onnxruntime_on_the_same_convolution(queue):
    """The onnxruntime column times ONNX's Conv of the row's own problem: its result is the
    reference's (zero padding, strides, dilation, groups, bias), and it shows in the table."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from clconv import bench
    from clconv.problem import make_problem
    from clconv.reference import Check, test_case
    problem, _ = make_problem((2, 6, 11, 13), "float32", (8, 3, 3, 2), "float32", (8,),
                              "float32", (2, 1), (1, 2), (2, 1), 2, "zeros")
    operands, _, reference = test_case(problem, "forward", np.random.default_rng(0))
    y = bench.ort_conv(problem, "forward", operands)()
    assert Check(problem, reference, *operands).error(y) <= 1e-4
    reflect = make_problem((1, 2, 5, 5), "float32", (2, 2, 3, 3), "float32", None, None, 1, 1,
                           1, 1, "reflect")[0]
    assert bench.ort_conv(reflect, "forward", operands) is None
    assert bench.ort_conv(problem, "input_grad", operands) is None
    layer = {"name": "tiny", "batch": 1, "in_channels": 4, "out_channels": 8, "groups": 1,
             "height": 8, "width": 8, "kernel_size": (3, 3), "stride": 1, "padding": 1,
             "dilation": 1}
    row = bench.bench_layer(layer, queue, 2, with_torch=False)
    assert row.ok and row.ort_ms > 0 and row.ort_speedup > 0
    assert "vs ort" in bench.format_table([row], ["ort"])


def test_host_processor_from_cpuinfo_or_the_platform(tmp_path, monkeypatch):
    """The processor model a CPU device's shipped databases are matched on: the first
    processor's block of Linux's cpuinfo (x86 or Arm), else platform.processor()'s x86 form
    (Windows), else unknown."""
    import platform
    from clconv.device import host_processor
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n"
                   "model\t\t: 17\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\n"
                   "vendor_id\t: Other\ncpu family\t: 1\nmodel\t\t: 2\n")
    assert host_processor(x86) == "AuthenticAMD family 25 model 17"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n"
                   "CPU part\t: 0xd0c\n\n")
    assert host_processor(arm) == "implementer 0x41 part 0xd0c"
    monkeypatch.setattr(platform, "processor",
                        lambda: "AMD64 Family 26 Model 2 Stepping 0, AuthenticAMD")
    assert host_processor(tmp_path / "missing") == "AuthenticAMD family 26 model 2"
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert host_processor(tmp_path / "missing") is None
