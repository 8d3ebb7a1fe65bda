"""Which OpenCL device clconv runs on, and what that device can do.

Order of choice: an explicit queue, an explicit device (object or name substring), the
CLCONV_DEVICE name substring, PYOPENCL_CTX (pyopencl's own rule), else the first GPU found,
else any OpenCL device; the default skips a device whose compiler cannot build OpenCL C (a
chosen one is refused with the compiler's reason).
"""
from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from functools import lru_cache

import pyopencl as cl

NO_DRIVER_HELP = ("no OpenCL platform found. Install an OpenCL driver for your device, or the "
                  "embedded CPU device: pip install 'clconv[pocl]' (pyopencl[pocl])")


class NoDeviceError(RuntimeError):
    """No OpenCL device matches (or none is installed)."""


FORK_HELP = ("clconv: this process was forked from one that had already used OpenCL, and "
             "OpenCL state (the driver's threads, contexts, queues, buffers) does not survive "
             "fork: a call here would hang. Start worker processes with the 'spawn' or "
             "'forkserver' method (multiprocessing.set_start_method('spawn'); for a torch "
             "DataLoader, multiprocessing_context='spawn'), or use clconv only in the parent.")


class ForkedProcessError(RuntimeError):
    """clconv was called in a child forked after its parent had used OpenCL."""


# Whether this process has touched OpenCL, and whether it inherited that state through fork.
_fork_state = {"used": False, "inherited": False}


def _after_fork_in_child():
    _fork_state["inherited"] = _fork_state["inherited"] or _fork_state["used"]


os.register_at_fork(after_in_child=_after_fork_in_child)


def check_not_forked():
    """Raise ForkedProcessError where OpenCL state came through fork (see FORK_HELP), so a
    call fails at once instead of hanging in the driver."""
    if _fork_state["inherited"]:
        raise ForkedProcessError(FORK_HELP)
    _fork_state["used"] = True


@dataclass(frozen=True)
class DeviceInfo:
    """The limits and features of one device that kernels are specialised and checked on."""
    name: str
    vendor: str
    platform: str
    driver_version: str
    is_cpu: bool
    compute_units: int
    max_work_group_size: int
    max_work_item_sizes: tuple
    local_mem_size: int
    max_mem_alloc_size: int
    global_mem_size: int
    fp16: bool
    fp64: bool
    local_memory: bool = False      # dedicated local memory (not emulated in global memory)
    host_unified_memory: bool = False   # computes in the host's memory (a CPU device)
    cacheline: int = 64             # bytes of a global memory cache line
    base_addr_align: int = 128      # bytes: CL_DEVICE_MEM_BASE_ADDR_ALIGN (given in bits)
    # A CPU device's processor model (host_processor), which its OpenCL name may not tell:
    # PoCL names a Zen 4 and a Zen 5 EPYC alike. None for other devices, or where unknown.
    processor: str | None = None
    # What the device's compiler really does (clconv.capabilities.Capabilities): probed
    # above this layer, so None in the queried facts.
    capabilities: object = None

    @classmethod
    def of(cls, device):
        ext = device.extensions.split()
        return cls(
            name=device.name.strip(), vendor=device.vendor.strip(),
            platform=device.platform.name.strip(), driver_version=device.driver_version.strip(),
            is_cpu=bool(device.type & cl.device_type.CPU),
            compute_units=device.max_compute_units,
            max_work_group_size=device.max_work_group_size,
            max_work_item_sizes=tuple(device.max_work_item_sizes),
            local_mem_size=device.local_mem_size,
            max_mem_alloc_size=device.max_mem_alloc_size,
            global_mem_size=device.global_mem_size,
            fp16="cl_khr_fp16" in ext,
            fp64="cl_khr_fp64" in ext or device.double_fp_config != 0,
            local_memory=device.local_mem_type == cl.device_local_mem_type.LOCAL,
            host_unified_memory=_host_unified(device),
            cacheline=device.global_mem_cacheline_size or 64,
            base_addr_align=max(device.mem_base_addr_align // 8, 1),
            processor=host_processor() if device.type & cl.device_type.CPU else None,
        )


def host_processor(cpuinfo="/proc/cpuinfo"):
    """This machine's processor model: 'VENDOR family F model M' (x86) or 'implementer I
    part P' (Arm), from Linux's cpuinfo, else from platform.processor() (Windows gives the
    x86 form); None where neither tells."""
    fields = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break           # the first processor's block is enough
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if {"vendor_id", "cpu family", "model"} <= fields.keys():
        return f"{fields['vendor_id']} family {fields['cpu family']} model {fields['model']}"
    if {"CPU implementer", "CPU part"} <= fields.keys():
        return f"implementer {fields['CPU implementer']} part {fields['CPU part']}"
    found = re.search(r"Family (\d+) Model (\d+)\b.*?, (\S+)", platform.processor())
    return f"{found[3]} family {found[1]} model {found[2]}" if found else None


def _host_unified(device):
    """CL_DEVICE_HOST_UNIFIED_MEMORY (deprecated in OpenCL 2.0, so a driver may refuse it:
    then a CPU device is taken to share the host's memory)."""
    try:
        return bool(device.host_unified_memory)
    except (cl.Error, AttributeError):
        return bool(device.type & cl.device_type.CPU)


def queried_info(device) -> DeviceInfo:
    """The device's limits and features as the driver reports them (no capabilities: see
    clconv.capabilities.device_info)."""
    return _info_cached(device)


@lru_cache(maxsize=None)
def _info_cached(device):
    return DeviceInfo.of(device)


def all_devices():
    """[(platform, device)] for every device of every platform."""
    check_not_forked()
    try:
        platforms = cl.get_platforms()
    except cl.Error:
        platforms = []
    found = []
    for platform in platforms:
        try:
            found += [(platform, d) for d in platform.get_devices()]
        except cl.Error:    # a platform with no devices raises DEVICE_NOT_FOUND
            pass
    return found


def _matches(device, substring):
    text = f"{device.name} {device.vendor} {device.platform.name}".lower()
    return substring.lower() in text


_PROBE_KERNEL = "__kernel void clconv_compiles(__global float *a) { a[0] += 1.0f; }"
UNKNOWN_CPU_HELP = ("the driver's LLVM predates this CPU; a driver built on a newer LLVM knows "
                    "it (for PoCL on Debian or Ubuntu: apt-get install pocl-opencl-icd)")


@lru_cache(maxsize=None)
def compile_failure(device):
    """None where the device's compiler builds a trivial kernel, else why not (the error lines
    of its build log). Cheap once the driver caches the build (~40 ms per process on PoCL)."""
    try:
        cl.Program(cl.Context([device]), _PROBE_KERNEL).build()
        return None
    except cl.Error as err:
        text = str(err).strip()
        lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()]
        reason = "; ".join(lines or text.splitlines()[:1])[:300] or "the build failed"
        if "unknown target cpu" in reason.lower():
            reason += f" ({UNKNOWN_CPU_HELP})"
        return reason


def _describe(device):
    return f"{device.name.strip()} ({device.platform.name.strip()})"


def _usable(device):
    """device, or NoDeviceError where its compiler cannot build OpenCL C."""
    failure = compile_failure(device)
    if failure is not None:
        raise NoDeviceError(f"OpenCL device {_describe(device)} cannot compile kernels: "
                            f"{failure}")
    return device


def choose_device(name=None):
    """The device clconv uses when none is given explicitly (see module docstring)."""
    devices = [d for _, d in all_devices()]
    if not devices:
        raise NoDeviceError(NO_DRIVER_HELP)
    name = name if name is not None else os.environ.get("CLCONV_DEVICE")
    if name:
        chosen = [d for d in devices if _matches(d, name)]
        if not chosen:
            listing = "; ".join(_describe(d) for d in devices)
            raise NoDeviceError(f"no OpenCL device matches {name!r}; devices: {listing}")
        return _usable(chosen[0])
    if os.environ.get("PYOPENCL_CTX") is not None:
        return _usable(cl.create_some_context(interactive=False).devices[0])
    gpus = [d for d in devices if d.type & cl.device_type.GPU]
    candidates = gpus + [d for d in devices if d not in gpus]
    for device in candidates:
        if compile_failure(device) is None:
            return device
    raise NoDeviceError("no OpenCL device can compile kernels: " + "; ".join(
        f"{_describe(d)}: {compile_failure(d)}" for d in candidates))


_queues = {}
_defaults = {}      # the chosen device per (CLCONV_DEVICE, PYOPENCL_CTX)


def _default_device():
    """choose_device(), remembered per setting of the variables it reads: a call made
    without a queue need not list the platforms (10 µs) again."""
    key = (os.environ.get("CLCONV_DEVICE"), os.environ.get("PYOPENCL_CTX"))
    device = _defaults.get(key)
    if device is None:
        device = _defaults[key] = choose_device()
    return device


def queue_for(device=None, queue=None):
    """A profiling-enabled command queue for the chosen device; one shared queue per device."""
    check_not_forked()
    if queue is not None:
        if not isinstance(queue, cl.CommandQueue):
            raise TypeError(f"queue must be a pyopencl.CommandQueue, got {type(queue).__name__}")
        return queue
    if device is None:
        device = _default_device()
    elif isinstance(device, str):
        device = choose_device(device)
    elif not isinstance(device, cl.Device):
        raise TypeError("device must be a pyopencl.Device or a name substring, got "
                        f"{type(device).__name__}")
    if device not in _queues:
        ctx = cl.Context([device])
        _queues[device] = cl.CommandQueue(
            ctx, properties=cl.command_queue_properties.PROFILING_ENABLE)
    return _queues[device]
