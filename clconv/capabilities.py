"""What the device's compiler and vector units really do: the facts kernels are fitted to.

Queried facts can mislead: PoCL 3.0 with LLVM 14 on an AMD EPYC (Zen 4) reports a native
float width of 16 but compiles for znver3 (AVX2), where a float16 vector is two 256-bit
halves and 8 chains of them already spill. So the widths are probed, once per device, driver
and probe source, and the result is cached on disk (cache_dir()/capabilities):

- correctness: for each arithmetic type (float; double where fp64 is; half storage) and each
  width in WIDTHS, the probe kernel (cl_kernels/probe.cl.mako: the vector patterns the
  templates use) is built, run and checked against NumPy. A type keeps its widths up to the
  first that fails.
- speed, on CPUs: independent FMA chains (peak.cl.mako) per width and chain count. The
  hardware vector is the widest width within FAST_SHARE of the best rate (as fast, fewer
  instructions: PoCL 3.1's AVX-512 code on a Zen 4 runs float16 at float8's rate, and the
  GEMMs ran 2-10% faster with it), and the register
  file is 32 vectors if 28 chains of it (plus the two operands) still run at REGISTER_SHARE of
  that rate, else 16 (AVX-512 targets have 32, AVX2 ones 16). The same rates tell whether
  the hardware vector's FMAs run at full width (full_width_fma: Intel's AVX-512 cores) or
  in halves (a Zen 4).

The probe runs in a child process (`python -c` running `_main`), so a compiler that
crashes costs one width of the probe, not the caller's process: the crashed check counts as
failed and the probe goes on without it. When no probe can run at all, the capabilities are
the conservative ones that every earlier release used (vectors of up to 32 bytes, 16
registers), with the reason in `notes`.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from queue import Empty, Queue

import numpy as np
import pyopencl as cl

from . import programs
from .programs import STORAGE_DTYPES, acc_itemsize
from .device import DeviceInfo, all_devices, compile_failure, queried_info
from .paths import keyed_file, write_json_atomic
from .version import __version__

WIDTHS = (1, 2, 4, 8, 16)               # the OpenCL vector widths kernels may use
# Widths at which kernels take the even lanes of two vectors (a stride-2 row); 16-wide rows
# load lane by lane instead: Oclgrind 21.10 takes a 16-wide shuffle's lanes for uninitialised.
EVEN_PAIR_WIDTHS = (2, 4, 8)
FMA_WIDTHS = (4, 8, 16)                 # timed for the hardware vector
# Enough independent chains to hide FMA latency; 12 (and the two operands) still fit 16
# registers, and the hardware vector is decided there.
FMA_CHAINS = (8, 12)
REGISTER_CHAINS = 28                    # with the two operands, 30 of 32 registers
FAST_SHARE = 0.9
# The hardware vector runs FMAs at its full width when it does this many times the FMAs of
# half its width (2 on a full unit, 1 on one split in halves: midway between).
FULL_WIDTH_GAIN = 1.5
REGISTER_SHARE = 0.8
FMA_ITERATIONS = 16384
FMA_ROUNDS = 5
UNPROBED_BYTES = 32                     # what every release before the probe used
UNPROBED_REGISTERS = 16                 # x86-64 with AVX2: the fewest of current SIMD CPUs
# A GPU work-item's register budget for accumulators, in 32-bit scalars: half of the ~255
# registers NVIDIA and AMD (VGPRs) give one, and half of the 128 floats that Intel's 128
# 32-byte GRF registers leave each lane at SIMD8.
GPU_ACCUMULATORS = 128
GPU_ACCUMULATORS_BY_VENDOR = {"intel": 64}
CHECK_TIMEOUT_S = 30
CHILD_CODE = "import sys, clconv.capabilities as c; c._main(sys.argv)"   # the probe process
FORMAT = "clconv-capabilities"
VERSION = 2         # of the file and of the rules deriving it (part of its key)
PEAK_ARGS = (programs.Buffer("out", "float", const=False, offset=False, restrict=False),
             programs.Scalar("a", "float"), programs.Scalar("b", "float"),
             programs.Scalar("iters"))


def probe_args(acc_t):
    return (programs.Buffer("x", offset=False), programs.Buffer("y", const=False, offset=False),
            programs.Buffer("sums", type=acc_t, const=False, offset=False))


@dataclass(frozen=True)
class Capabilities:
    """The probed facts of one device (see the module docstring). widths: the correct vector
    widths per storage type; fast_width: the hardware vector in floats (None: not timed);
    registers: the CPU's vector registers (None: not timed); fma: (width, chains, GFLOP/s) of
    every timed FMA kernel; notes: what failed."""
    is_cpu: bool
    native_widths: tuple        # ((type, width), ...) as the device reports them
    widths: tuple               # ((storage type, (widths...)), ...)
    fast_width: int | None = None
    registers: int | None = None
    fma: tuple = ()
    notes: tuple = ()
    preferred_widths: tuple = ()    # as the device reports them, like native_widths
    gpu_accumulators: int = GPU_ACCUMULATORS    # see accumulators()
    probed: bool = True         # False: the probe could not run (see notes)

    def widths_of(self, dtype) -> tuple:
        """The vector widths a problem of dtype may use (its storage type's probed widths)."""
        storage = programs.c_types(dtype)[0]
        return dict(self.widths).get(storage, (1,))

    @property
    def hardware_floats(self) -> int:
        """Floats in one hardware vector: the timed one, else UNPROBED_BYTES' worth (what
        every release before the probe assumed)."""
        return self.fast_width or UNPROBED_BYTES // 4

    def lanes(self, dtype) -> int:
        """Lanes of acc_t in one hardware vector."""
        return max(1, self.hardware_floats * 4 // acc_itemsize(dtype))

    def row_width(self, dtype, most) -> int:
        """The heuristics' row vector: the widest probed width within one hardware vector
        and within most (at least 1)."""
        limit = max(1, min(most, self.lanes(dtype)))
        return max(w for w in self.widths_of(dtype) if w <= limit)

    @property
    def full_width_fma(self) -> bool:
        """Whether the hardware vector's FMAs run at its full width: FULL_WIDTH_GAIN times the
        rate of half its width (Intel's AVX-512 cores; not PoCL 3.1's AVX-512 code on a Zen 4,
        which splits them). False where the rates were not timed."""
        rates = {w: r for w, c, r in self.fma if c == FMA_CHAINS[-1]}
        half = (self.fast_width or 0) // 2
        return (self.fast_width in rates and half in rates
                and rates[self.fast_width] >= FULL_WIDTH_GAIN * rates[half])

    @property
    def vector_registers(self) -> int:
        return self.registers or UNPROBED_REGISTERS

    def registers_per_vector(self, tw, dtype) -> int:
        """Hardware registers that one tw-wide vector of acc_t takes."""
        return -(-tw // self.lanes(dtype))

    def accumulators(self) -> int:
        """The bound on a register tile's accumulators, in 4-byte scalars: the register file
        on CPUs (registers x hardware vector), the vendor's GPU budget elsewhere
        (GPU_ACCUMULATORS_BY_VENDOR)."""
        if not self.is_cpu:
            return self.gpu_accumulators
        return self.vector_registers * self.hardware_floats

    def key(self) -> dict:
        """What tuned configurations depend on: part of the tuning cache's device key. Only
        the correctness facts: the timed ones (hardware vector, registers) steer the
        heuristics, and tuned entries pass the constraints they set anyway."""
        return {"widths": {t: list(w) for t, w in self.widths}}

    def speed(self) -> str:
        if self.fast_width:
            return f"hardware vector float{self.fast_width}, {self.registers} vector registers"
        return "speed not measured (timed on CPUs only; see the notes)"

    def describe(self) -> str:
        widths = ", ".join(f"{t} {'/'.join(map(str, w))}" for t, w in self.widths)
        native = ", ".join(f"{t} {w}" for t, w in self.native_widths)
        if self.preferred_widths:
            native += "; preferred: " + ", ".join(f"{t} {w}" for t, w in self.preferred_widths)
        lines = [f"vector widths that build and run correctly: {widths} (reported native: "
                 f"{native}); {self.speed()}"]
        lines += [f"probe: {note}" for note in self.notes]
        return "\n".join(lines)


def unprobed(info: DeviceInfo, reason: str) -> Capabilities:
    """The conservative capabilities of a device whose probe could not run: vectors of acc_t
    within UNPROBED_BYTES."""
    widths = tuple((s, tuple(w for w in WIDTHS if w * acc_itemsize(STORAGE_DTYPES[s])
                             <= UNPROBED_BYTES)) for s in _storage_types(info))
    return Capabilities(info.is_cpu, (), widths, notes=(reason,),
                        gpu_accumulators=_gpu_accumulators(info), probed=False)


def _storage_types(info):
    return ("float", "half") + (("double",) if info.fp64 else ())


# --- the probe's pieces (run in the child) ---------------------------------------------------

def probe_constants(storage, n):
    """What the probe kernel of a storage type and width is rendered with."""
    dtype = STORAGE_DTYPES[storage]
    return dict(dtype=dtype, storage_t=storage, acc_t=programs.c_types(dtype)[1], n=n,
                even_pair_widths=EVEN_PAIR_WIDTHS)


def check_width(queue, storage, n):
    """Build and run the probe kernel for storage type and width n; a failure's text, or
    None when the results match NumPy."""
    dtype = STORAGE_DTYPES[storage]
    acc_t = programs.c_types(dtype)[1]
    items = 4
    x = np.random.default_rng(n).uniform(-2, 2, items * 2 * n).astype(dtype)
    kernel = programs.kernel(queue.context, "probe.cl.mako", "probe", probe_args(acc_t),
                             **probe_constants(storage, n))
    mf = cl.mem_flags
    xb = cl.Buffer(queue.context, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=x)
    y = np.empty(items * n, dtype)
    sums = np.empty(items, np.float64 if acc_t == "double" else np.float32)
    yb = cl.Buffer(queue.context, mf.WRITE_ONLY, y.nbytes)
    sb = cl.Buffer(queue.context, mf.WRITE_ONLY, sums.nbytes)
    kernel(queue, (items,), None, xb, yb, sb).wait()
    cl.enqueue_copy(queue, y, yb)
    cl.enqueue_copy(queue, sums, sb).wait()
    expect = expected_probe(x.astype(np.float64), items, n)
    tol = {"half": 4e-3, "float": 1e-5, "double": 1e-12}[storage]
    for name, got, want in (("stored vector", y, expect), ("lane sums", sums,
                                                             expect.reshape(items, n).sum(1))):
        error = np.max(np.abs(got.astype(np.float64) - want) / (1 + np.abs(want)))
        if not error <= tol:
            return f"wrong {name} (relative error {error:.1e})"
    return None


def expected_probe(x, items, n):
    """What probe.cl.mako computes, in float64."""
    from math import erf
    pairs = x.reshape(items, 2, n)
    a, b = pairs[:, 0], pairs[:, 1]
    v = np.maximum(a * b + a, 0)
    if n in EVEN_PAIR_WIDTHS:
        v = v + np.concatenate([a[:, 0::2], b[:, 0::2]], axis=1)
    v = v / (1 + np.exp(-v))
    v = 0.5 * v * (1 + np.vectorize(erf)(v / np.sqrt(2)))
    return v.reshape(-1)


def fma_rates(queue, shapes, rounds=FMA_ROUNDS, iterations=FMA_ITERATIONS, one_core=False):
    """{(width, chains): GFLOP/s} of independent `x * a + b` chains on float vectors of each
    width: the best of `rounds` runs (profiling events), timed in interleaved rounds so that
    a noisy moment of a shared machine hits every shape, not one. one_core: a single
    work-group, which a CPU runs on one core (the probe's ratios then do not depend on what
    else keeps the other cores busy)."""
    info = queried_info(queue.device)
    items = (1 if one_core else info.compute_units) * (128 if info.is_cpu else 4096)
    local = (items,) if one_core else None
    out = cl.Buffer(queue.context, cl.mem_flags.WRITE_ONLY, 4 * items)
    kernels = {(w, c): programs.kernel(queue.context, "peak.cl.mako", "fma_peak", PEAK_ARGS,
                                       width=w, chains=c) for w, c in shapes}
    best = dict.fromkeys(kernels, float("inf"))
    for _ in range(rounds):
        for shape, kernel in kernels.items():
            event = kernel(queue, (items,), local, out, 0.999, 1e-3, iterations)
            event.wait()
            best[shape] = min(best[shape], (event.profile.end - event.profile.start) * 1e-9)
    return {(w, c): 2 * items * iterations * c * w / best[w, c] / 1e9 for w, c in kernels}


def _child(device_index, name, checks):
    """The child's work: each check of `checks` in order, one JSON line before and after
    each, flushed, so that the parent knows which check a crash happened in."""
    device = all_devices()[device_index][1]
    if device.name.strip() != name:
        raise SystemExit(f"device {device_index} is {device.name.strip()!r}, not {name!r}")
    queue = cl.CommandQueue(cl.Context([device]),
                            properties=cl.command_queue_properties.PROFILING_ENABLE)

    def say(**message):
        print(json.dumps(message), flush=True)

    failures = {}
    for check in checks:
        if _blocked(check, failures):
            continue
        say(start=check)
        if check[0] == "fma":       # ("fma", width, ...): every shape of those widths
            shapes = [(w, c) for w in check[1:] for c in FMA_CHAINS + (REGISTER_CHAINS,)]
            rates = fma_rates(queue, shapes, one_core=True)
            say(done=check, result=[[w, c, r] for (w, c), r in rates.items()])
            continue
        try:
            failure = check_width(queue, check[0], check[1])
        except (programs.BuildError, cl.Error) as err:
            failure = f"build or launch failed: {str(err).strip().splitlines()[0][:120]}"
        say(done=check, result=failure)
        failures[check] = failure


def _blocked(check, results):
    """Whether a check need not run: its storage type failed at this width or a narrower
    one, or, for half (computed in float vectors), float did."""
    storage, n = check[0], check[1]
    related = ("half", "float") if storage == "half" else (storage,)
    return any(result is not None and s in related and m <= n and s != "fma"
               for (s, m, *_), result in results.items())


# --- the parent: run the probe, derive, cache --------------------------------------------------

def _run_child(index, checks):
    """{check: result} for the checks the child finished, and the check it died or hung in
    (or None) with the reason. A check (or the start) that gives no output for
    CHECK_TIMEOUT_S is a hang: PoCL's LLVM 14 spent minutes and gigabytes on some 16-wide
    kernels for AVX2."""
    # This clconv, whatever the working directory or PYTHONPATH holds.
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); " \
        + CHILD_CODE
    command = [sys.executable, "-c", code, str(index), all_devices()[index][1].name.strip(),
               json.dumps(checks)]
    try:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, errors="replace")
    except OSError as err:
        return {}, None, f"the probe process could not start: {err}"
    lines = Queue()

    def read():
        try:
            for line in proc.stdout:
                lines.put(line)
        finally:
            proc.stdout.close()     # at EOF: the child is gone (or killed)
            lines.put(None)
    threading.Thread(target=read, daemon=True).start()
    results, started, failure = {}, None, None
    try:
        while True:
            try:
                line = lines.get(timeout=CHECK_TIMEOUT_S)
            except Empty:
                failure = f"the probe process gave no output for {CHECK_TIMEOUT_S} s"
                break
            if line is None:
                break
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            if "start" in message:
                started = tuple(message["start"])
            elif "done" in message:
                results[tuple(message["done"])] = message["result"]
                started = None
    finally:
        if proc.poll() is None:
            proc.kill()
        code = proc.wait()
    if failure is None and code != 0:
        failure = f"the probe process exited with {code}"
    return results, started, failure


def probe(device) -> Capabilities:
    """Run the probe for device (in child processes) and derive its capabilities."""
    info = queried_info(device)
    devices = [d for _, d in all_devices()]
    if device not in devices:       # a sub-device: the child process could not find it
        return unprobed(info, "not among the platforms' devices (a sub-device?): not probed")
    index = devices.index(device)
    failure = compile_failure(device)
    if failure is not None:
        return unprobed(info, f"its compiler cannot build kernels: {failure}")
    pending = [(s, n) for s in _storage_types(info) for n in WIDTHS]
    results, notes = {}, []
    while pending:
        done, crashed, failure = _run_child(index, pending)
        results.update(done)
        if crashed is not None:
            results[crashed] = f"{failure} in this check (compiler crash or hang?)"
        elif not done:              # died before its first check: no progress possible
            return unprobed(info, failure or "the probe process gave no result")
        pending = [c for c in pending if c not in results and not _blocked(c, results)]
    widths = []
    for storage in _storage_types(info):
        ok = []
        for n in WIDTHS:
            failure = results.get((storage, n), "not tried (a narrower width, or for half the "
                                  "float vector of this width, failed)")
            if failure is not None:
                notes.append(f"{storage}{n if n > 1 else ''}: {failure}; "
                             f"{storage} vectors stay below {n}")
                break
            ok.append(n)
        widths.append((storage, tuple(ok) or (1,)))
    caps = Capabilities(info.is_cpu, _reported_widths(device, "native"), tuple(widths),
                        notes=tuple(notes), preferred_widths=_reported_widths(device, "preferred"),
                        gpu_accumulators=_gpu_accumulators(info))
    if _is_plain_cpu(device):
        caps = _timed(caps, index)
    return caps


def _timed(caps, index):
    """caps with the hardware vector and register file from FMA timings."""
    check = ("fma",) + tuple(w for w in FMA_WIDTHS if w in dict(caps.widths)["float"])
    done, _, failure = _run_child(index, [check])
    if not done.get(check):
        return dataclasses.replace(caps, notes=caps.notes + (
            f"FMA timing failed ({failure or 'no result'}); speed facts not measured",))
    rates = {(w, c): r for w, c, r in done[check]}
    # At the most chains: a width the compiler splits into several registers spills there.
    best = {w: rates[w, FMA_CHAINS[-1]] for w in check[1:]}
    fast = max(w for w in best if best[w] >= FAST_SHARE * max(best.values()))
    registers = 32 if rates[fast, REGISTER_CHAINS] >= REGISTER_SHARE * best[fast] else 16
    fma = tuple(sorted((w, c, round(r, 1)) for (w, c), r in rates.items()))
    return dataclasses.replace(caps, fast_width=fast, registers=registers, fma=fma)


def _reported_widths(device, kind):
    return tuple((t, getattr(device, f"{kind}_vector_width_{t}")) for t in
                 ("float", "double", "half"))


def _gpu_accumulators(info):
    vendor = info.vendor.lower()
    return next((bound for name, bound in GPU_ACCUMULATORS_BY_VENDOR.items() if name in vendor),
                GPU_ACCUMULATORS)


def _is_plain_cpu(device):
    """A CPU and nothing else (Oclgrind, a simulator, reports every device type)."""
    return device.type & ~cl.device_type.DEFAULT == cl.device_type.CPU


# --- the cache -----------------------------------------------------------------------------

def probe_sources():
    return programs.sources_hash(("probe.cl.mako", "peak.cl.mako"))


def cache_path(info) -> Path:
    return keyed_file("capabilities", info.name, [info.name, info.vendor, info.platform,
                                                  info.driver_version, probe_sources(),
                                                  __version__, VERSION])


def _to_json(caps):
    return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(caps)}


def _from_json(data):
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ValueError("not a capabilities file of this version")
    fields = {f.name for f in dataclasses.fields(Capabilities)}
    values = {k: v for k, v in data.items() if k in fields}
    for field in ("native_widths", "preferred_widths"):
        values[field] = tuple(tuple(p) for p in values.get(field, ()))
    values["widths"] = tuple((t, tuple(w)) for t, w in values["widths"])
    values["fma"] = tuple(tuple(f) for f in values.get("fma", ()))
    values["notes"] = tuple(values.get("notes", ()))
    caps = Capabilities(**values)
    if "float" not in dict(caps.widths) or not all(
            set(w) <= set(WIDTHS) and 1 in w for _, w in caps.widths):
        raise ValueError("widths out of range")
    for name in ("fast_width", "registers"):
        if not (getattr(caps, name) is None or type(getattr(caps, name)) is int):
            raise ValueError(f"{name} must be an integer or null")
    if type(caps.is_cpu) is not bool or type(caps.gpu_accumulators) is not int:
        raise ValueError("is_cpu must be a boolean and gpu_accumulators an integer")
    return caps


def _read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return _from_json(json.load(f))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as err:
        warnings.warn(f"clconv: re-probing the device: {path} is unusable ({err})",
                      stacklevel=3)
        return None


def _write(path, caps):
    """Atomically; an unwritable cache only costs a re-probe in the next process."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, _to_json(caps))
    except OSError as err:
        warnings.warn(f"clconv: could not save the device's capabilities to {path}: {err}",
                      stacklevel=3)


_probing = threading.Lock()      # threads asking at once wait for one probe


@lru_cache(maxsize=None)
def capabilities_of(device) -> Capabilities:
    """The device's capabilities: from the cache file, else probed (and saved there); once
    per process and device. A sub-device has its root device's (its compiler's)."""
    return _root_capabilities(_root(device))


@lru_cache(maxsize=None)
def _root_capabilities(device):
    with _probing:
        info = queried_info(device)
        path = cache_path(info)
        caps = _read(path)
        if caps is None:
            print(f"clconv: probing {info.name} once for its vector widths and FMA rate "
                  f"(saved in {path})", file=sys.stderr, flush=True)
            caps = probe(device)
            if caps.probed:     # a probe that could not run is tried again next process
                _write(path, caps)
        return caps


def _root(device):
    try:
        while device.parent_device is not None:
            device = device.parent_device
    except cl.Error:        # OpenCL 1.1 drivers know no parent
        pass
    return device


@lru_cache(maxsize=None)
def device_info(device) -> DeviceInfo:
    """The device's queried limits and features with its probed capabilities (once per
    process and device: every call and plan asks)."""
    return dataclasses.replace(queried_info(device), capabilities=capabilities_of(device))


def forget():
    """Drop what this process remembers of every device's capabilities (the files stay)."""
    for memo in (device_info, capabilities_of, _root_capabilities):
        memo.cache_clear()


def of_info(info) -> Capabilities:
    """info's capabilities (the unprobed ones for an info made without them)."""
    return info.capabilities or unprobed(info, "not probed")


def _main(argv):
    """The probe process: argv is [-c, device index, device name, checks as JSON]."""
    _child(int(argv[1]), argv[2], [tuple(c) for c in json.loads(argv[3])])
