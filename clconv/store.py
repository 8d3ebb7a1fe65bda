"""The tuning store: one human-readable JSON file per device, plus shipped databases.

A cache file's name and its header carry the device's key: name, vendor, platform, driver
version and the probed capabilities' key (clconv.capabilities: the vector widths its
compiler builds and runs correctly), so a driver update, or a probe that now refuses a
width, looks in another file. Entries map a problem signature
to the winning algorithm, its parameters, the measured times, `algorithms` (the candidates'
algorithms) and `sources`: the hash of the templates that algorithm renders
(programs.sources_hash). An entry whose sources differ from the installed templates' is out
of date and silently skipped, so editing one template invalidates exactly the entries of the
algorithms that render it; so is one whose search lacked an algorithm that now applies.

Writes hold a cross-process lock (filelock, on <file>.lock), re-read the file, merge, and
replace it atomically (temporary file + rename), so concurrent tuners lose nothing. A
corrupt, truncated or foreign file gives one warning and is ignored; the next write rebuilds
it. Every write bumps the generation in state(), which the planner's memo keys include, so
plans made from older entries are not reused. Databases (tuning/database/*.json, or
`clconv tune --export`) hold the same entries and a `match` of regular expressions on the
device (and, for a CPU device, its processor model); they are the fallback below the user's
own cache, for the devices their `match` names whose capabilities' key equals the one they
were tuned with (their `capabilities`, when they give it). Every entry from either is
validated against its algorithm (known, of the operation, applies, suits the device, its
declared parameters and values, its constraints) before it is used.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

from filelock import FileLock

from . import algorithms, options, programs
from .algorithms import winograd
from .capabilities import of_info
from .paths import keyed_file, shipped_dir, write_json_atomic
from .version import __version__

CACHE_FORMAT = "clconv-tuning-cache"
DATABASE_FORMAT = "clconv-tuning-database"
VERSION = 2         # 2: sources per entry (1 had one hash of all templates per file)


class TuningCacheWarning(UserWarning):
    """A tuning cache or database file, or an entry of one, is unusable and being ignored."""


class CacheWriteError(OSError):
    """The tuning cache cannot be written (the message says which file and why)."""


def _write_error(path, err):
    return CacheWriteError(f"cannot write the tuning cache {path}: {err.strerror or err}; "
                           "set CLCONV_CACHE_DIR to a writable directory")


def check_writable(info):
    """Raise CacheWriteError unless this device's cache file can be written: before minutes
    of tuning, not after."""
    path = cache_path(info)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "a directory is in the file's place")
        _check_lock(path)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise _write_error(path, err) from err


def _check_lock(path):
    """The lock file is created, never followed: a symlink there is refused (filelock opens
    it with O_NOFOLLOW as well)."""
    if os.path.islink(f"{path}.lock"):
        raise OSError(errno.ELOOP, f"{path}.lock is a symbolic link; remove it")


def signature(problem, batch=True, operation="forward"):
    """A readable, unique text for an operation on a problem (everything a kernel depends
    on). Gradients are prefixed with their operation; the forward has no prefix, and ends in
    'winograd' where Winograd is allowed (clconv.options) and fits."""
    p = problem
    text = (f"{p.dtype} {p.in_channels}x{p.height}x{p.width} -> {p.out_channels} "
            f"k{p.kernel_size[0]}x{p.kernel_size[1]} s{p.stride[0]}x{p.stride[1]} "
            f"d{p.dilation[0]}x{p.dilation[1]} pad{','.join(map(str, p.pad))} g{p.groups} "
            f"{p.padding_mode}{' bias' if p.has_bias else ''}")
    if operation == "forward" and options.allow_winograd() and winograd.fits(p):
        text += " winograd"     # tuned with Winograd allowed: a choice of its own
    text = text if operation == "forward" else f"{operation} {text}"
    return f"{text} n{p.batch}" if batch else text


@lru_cache(maxsize=None)
def sources_of(algorithm_name):
    """The hash of the templates an algorithm renders (with their includes)."""
    return programs.sources_hash(algorithms.ALGORITHMS[algorithm_name].rendered_templates())


_generation = [0]       # bumped by every write of the cache in this process


def state():
    """What the store's answers depend on besides the problem: the generation, the cache
    directory and the databases' directory (a plan memo key)."""
    return _generation[0], os.environ.get("CLCONV_CACHE_DIR"), databases_dir()


def device_key(info):
    return {"name": info.name, "vendor": info.vendor, "platform": info.platform,
            "driver_version": info.driver_version, "capabilities": of_info(info).key()}


def database_key(info):
    """What a database's `match` and `tuned_on` name: device_key and, for a CPU device, its
    processor model (DeviceInfo.processor), since one OpenCL name can cover CPUs whose best
    configurations differ. Not part of the cache's key: a user's own cache is of one
    machine."""
    key = device_key(info)
    if info.processor is not None:
        key["processor"] = info.processor
    return key


def cache_path(info) -> Path:
    """This device's cache file under the current driver."""
    return keyed_file("tuning", info.name, device_key(info))


def other_cache_files(info):
    """Files of the same device made under another driver (ignored)."""
    mine = cache_path(info)
    stem = mine.stem.rsplit("-", 1)[0]
    return sorted(p for p in mine.parent.glob(f"{stem}-*.json") if p != mine)


_warned = set()


def _warn_once(path, reason):
    if (str(path), reason) not in _warned:
        _warned.add((str(path), reason))
        warnings.warn(f"clconv: ignoring tuning file {path}: {reason}", TuningCacheWarning,
                      stacklevel=4)


def _read_json(path):
    """The parsed file, None if absent, or None with a warning if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:        # ValueError covers JSON and UTF-8 errors
        _warn_once(path, f"unreadable ({type(err).__name__}: {err})")
        return None


def _valid_entries(data, path, fmt, expect):
    """data's well-formed entries if it is a file of format fmt with header fields expect;
    a malformed entry, or one naming an algorithm this clconv lacks, is passed over with a
    warning and the others kept."""
    if not isinstance(data, dict) or data.get("format") != fmt or data.get("version") != VERSION:
        _warn_once(path, f"not a {fmt} version {VERSION} file")
        return {}
    for field, value in expect.items():
        if data.get(field) != value:
            _warn_once(path, f"its {field} is {data.get(field)!r}, expected {value!r}")
            return {}
    entries = data.get("entries")
    if not isinstance(entries, dict):
        _warn_once(path, "malformed entries")
        return {}
    kept = {}
    for sig, e in entries.items():
        reason = _entry_form_problem(e)
        if reason:
            _warn_once(path, f"entry {sig!r}: {reason}")
        else:
            kept[sig] = e
    return kept


def _entry_form_problem(e):
    """Why e is not a well-formed entry (or None); its values are checked at use
    (entry_problem)."""
    if not isinstance(e, dict):
        return "not an object"
    if not isinstance(e.get("algorithm"), str) or not isinstance(e.get("config"), dict):
        return "needs an algorithm name and a config object"
    if e["algorithm"] not in algorithms.ALGORITHMS:
        return f"unknown algorithm {e['algorithm']!r}"
    if type(e.get("batch")) is not int or e["batch"] < 0:
        return f"batch must be a non-negative int, got {e.get('batch')!r}"
    if not isinstance(e.get("sources"), (str, type(None))):
        return "sources must be a string"
    searched = e.get("algorithms", [])
    if not (isinstance(searched, list) and all(isinstance(a, str) for a in searched)):
        return "algorithms must be a list of algorithm names"
    ms = e.get("ms", 0.0)
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not ms >= 0:
        return f"ms must be a non-negative number, got {ms!r}"
    return None


def _cache_header(info):
    return {"device": device_key(info)}


_memo: dict = {}     # path -> ((mtime_ns, size), entries)


def _load(path, reader):
    """reader(path)'s result, re-read only when the file changes."""
    try:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = None
    hit = _memo.get(str(path))
    if hit is None or hit[0] != stamp:
        hit = _memo[str(path)] = (stamp, reader(path) if stamp else {})
    return hit[1]


def cache_entries(info):
    """{signature: entry} of the user's cache for this device (empty if none or unreadable)."""
    path = cache_path(info)
    return _load(path, lambda p: _valid_entries(_read_json(p), p, CACHE_FORMAT,
                                                _cache_header(info)))


def _stamped(entry):
    """entry with the sources of its algorithm when it names none (a hand-made entry)."""
    if entry.get("sources") is None and entry.get("algorithm") in algorithms.ALGORITHMS:
        entry = dict(entry, sources=sources_of(entry["algorithm"]))
    return entry


def record(info, new_entries, replace=False):
    """Merge new_entries into this device's cache file; returns the file's path.
    For a signature already present the faster entry stays, unless replace is set (or the
    present one is out of date, or searched fewer algorithms)."""
    path = cache_path(info)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _check_lock(path)
        with FileLock(f"{path}.lock"):
            entries = dict(_valid_entries(_read_json(path), path, CACHE_FORMAT,
                                          _cache_header(info)) if path.exists() else {})
            for sig, entry in new_entries.items():
                entry, old = _stamped(entry), entries.get(sig)
                if (replace or old is None or not is_current(old)
                        or set(old.get("algorithms", ())) < set(entry.get("algorithms", ()))
                        or entry.get("ms", math.inf) <= old.get("ms", math.inf)):
                    entries[sig] = entry
            data = {"format": CACHE_FORMAT, "version": VERSION, "clconv_version": __version__,
                    **_cache_header(info), "entries": dict(sorted(entries.items()))}
            write_json_atomic(path, data)
    except OSError as err:
        raise _write_error(path, err) from err
    _memo.pop(str(path), None)
    _generation[0] += 1
    return path


def databases_dir() -> Path:
    return shipped_dir("tuning_databases", "tuning/database")


def export_database(info, path, entries=None):
    """Write a shareable database of this device's entries (default: its whole cache). Its
    `match` names this device exactly; widen the regular expressions for a device family."""
    entries = cache_entries(info) if entries is None else entries
    data = {"format": DATABASE_FORMAT, "version": VERSION, "clconv_version": __version__,
            "match": {k: re.escape(v) for k, v in database_key(info).items()
                      if k not in ("driver_version", "capabilities")},
            "capabilities": of_info(info).key(),
            "tuned_on": database_key(info),
            "entries": dict(sorted((k, _stamped(e)) for k, e in entries.items()))}
    write_json_atomic(path, data)
    return len(entries)


def _read_database(path):
    data = _read_json(path)
    entries = _valid_entries(data, path, DATABASE_FORMAT, {})
    match = data.get("match") if entries else None
    if entries and not (isinstance(match, dict) and
                        all(isinstance(v, str) for v in match.values())):
        _warn_once(path, "its match must map device fields to regular expressions")
        return None
    return (match, data.get("capabilities"), entries) if entries else None


def matching_databases(info):
    """[(path, entries)] of every shipped database that matches this device, in name order
    (entries whose sources are out of date included: tuned_choice skips them)."""
    found = []
    key = database_key(info)
    for path in sorted(databases_dir().glob("*.json")):
        db = _load(path, _read_database)
        if not db:
            continue
        match, capabilities, entries = db
        if (capabilities in (None, key["capabilities"])
                and all(isinstance(key.get(field), str) and re.fullmatch(rx, key[field])
                        for field, rx in match.items())):
            found.append((path, entries))
    return found


def database_entries(info):
    """{signature: entry} from every shipped database that matches this device (the first
    database, in name order, giving a signature wins)."""
    found = {}
    for _, entries in matching_databases(info):
        for sig, entry in entries.items():
            found.setdefault(sig, entry)
    return found


def is_current(entry):
    """Whether entry was tuned with the installed templates of its algorithm."""
    return (entry.get("algorithm") in algorithms.ALGORITHMS
            and entry.get("sources") == sources_of(entry["algorithm"]))


def unsearched(entry, problem, info, operation="forward"):
    """The algorithms that apply to operation on problem on this device but were not among
    entry's candidates (its `algorithms`): a tuned choice is the best of what was tried, so
    an algorithm added since puts it out of date. [] for an entry that does not say (tuned
    before clconv recorded it)."""
    searched = entry.get("algorithms")
    if searched is None:
        return []
    return [a.name for a in algorithms.for_operation(operation)
            if a.name not in searched and a.suits(info) and a.applies(problem)]


def usable(entry, problem, info, operation="forward"):
    """Whether entry is current (is_current) and searched every algorithm that applies."""
    return is_current(entry) and not unsearched(entry, problem, info, operation)


def nearest(entries, problem, info, operation="forward"):
    """The usable entry for operation on problem: its own signature, else the same layer
    tuned at the nearest batch size (on a log scale), else None."""
    exact = entries.get(signature(problem, operation=operation))
    if exact is not None and usable(exact, problem, info, operation):
        return exact
    layer = signature(problem, batch=False, operation=operation) + " n"
    same = [e for sig, e in entries.items()
            if sig.startswith(layer) and usable(e, problem, info, operation)]
    if not same:
        return None
    n = max(problem.batch, 1)
    return min(same, key=lambda e: abs(math.log(max(e["batch"], 1) / n)))


def entry_problem(algorithm, config, problem, info, operation):
    """Why a tuned (algorithm, config) cannot run operation on problem here (or None)."""
    if algorithm is None:
        return "unknown algorithm"
    if algorithm.operation != operation:
        return f"not a {operation} algorithm"
    if not algorithm.applies(problem):
        return "does not apply"
    if not algorithm.suits(info):
        return "does not suit this device"
    names = [p.name for p in algorithm.params]
    if set(config) != set(names):
        return f"parameters differ (expected {names})"
    for p in algorithm.params:
        value = config[p.name]
        if type(value) is not int or value not in p.values:
            return f"{p.name} must be one of {p.values}, got {value!r}"
    return algorithm.constraints(problem, info, config)


def tuned_choice(problem, info, operation="forward"):
    """(algorithm, config, file) from the user's cache, else a database, or None (mode
    'off', or nothing tuned for this problem). An entry that does not fit is ignored with a
    warning naming its file."""
    if options.tuning_mode() == "off":
        return None
    for path, entries in [(cache_path(info), cache_entries(info))] + matching_databases(info):
        entry = nearest(entries, problem, info, operation)
        if entry is None:
            continue
        algorithm = algorithms.ALGORITHMS.get(entry["algorithm"])
        config = entry["config"]
        reason = entry_problem(algorithm, config, problem, info, operation)
        if reason:
            _warn_once(path, f"entry for {signature(problem, operation=operation)}: {reason}")
            continue
        return algorithm, dict(config), path
    return None


def needs_tuning(problem, info, operation="forward"):
    """In mode 'on': whether operation on problem is missing from the user's own cache."""
    if options.tuning_mode() != "on":
        return False
    entry = cache_entries(info).get(signature(problem, operation=operation))
    return entry is None or not usable(entry, problem, info, operation)
