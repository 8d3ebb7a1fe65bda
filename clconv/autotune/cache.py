"""The tuning cache: one human-readable JSON file per device, plus shipped databases.

A cache file's name and its header carry the key: device name, vendor, platform, driver
version and the hash of clconv's kernel sources. A driver update or a kernel change therefore
looks in a different file and never reuses a stale entry. Entries map a problem signature to
the winning algorithm, its parameters and the measured times.

Writes hold a lock (lock.py), re-read the file, merge, and replace it atomically (temporary
file + rename), so concurrent tuners lose nothing. A corrupt, truncated or foreign file gives
one warning and is ignored; the next write rebuilds it. Databases (tuning/database/*.json,
or `clconv tune --export`) have the same entries and a `match` of regular expressions on the
device; they are the fallback below the user's own cache.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path

from .. import __version__, options, programs
from ..algorithms import winograd
from ..paths import cache_dir, shipped_dir
from .lock import locked

CACHE_FORMAT = "clconv-tuning-cache"
DATABASE_FORMAT = "clconv-tuning-database"
VERSION = 1


class TuningCacheWarning(UserWarning):
    """A tuning cache or database file was unreadable and is being ignored."""


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


def device_key(info):
    return {"name": info.name, "vendor": info.vendor, "platform": info.platform,
            "driver_version": info.driver_version}


def cache_path(info) -> Path:
    """This device's cache file under the current driver and kernel sources."""
    key = json.dumps([device_key(info), programs.sources_hash()])
    slug = re.sub(r"[^A-Za-z0-9]+", "-", info.name).strip("-")[:48] or "device"
    return cache_dir() / "tuning" / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


def other_cache_files(info):
    """Files of the same device made under another driver or kernel version (ignored)."""
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
    """data's entries if it is a well-formed file of format fmt with header fields expect."""
    if not isinstance(data, dict) or data.get("format") != fmt or data.get("version") != VERSION:
        _warn_once(path, f"not a {fmt} version {VERSION} file")
        return {}
    for field, value in expect.items():
        if data.get(field) != value:
            _warn_once(path, f"its {field} is {data.get(field)!r}, expected {value!r}")
            return {}
    entries = data.get("entries")
    if not isinstance(entries, dict) or not all(_is_entry(e) for e in entries.values()):
        _warn_once(path, "malformed entries")
        return {}
    return entries


def _is_entry(e):
    return (isinstance(e, dict) and isinstance(e.get("algorithm"), str)
            and isinstance(e.get("config"), dict) and isinstance(e.get("batch"), int))


def _cache_header(info):
    return {"device": device_key(info), "sources_hash": programs.sources_hash()}


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


def record(info, new_entries, replace=False):
    """Merge new_entries into this device's cache file; returns the file's path.
    For a signature already present the faster entry stays, unless replace is set."""
    path = cache_path(info)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        entries = dict(_valid_entries(_read_json(path), path, CACHE_FORMAT, _cache_header(info))
                       if path.exists() else {})
        for sig, entry in new_entries.items():
            old = entries.get(sig)
            if replace or old is None or entry.get("ms", math.inf) <= old.get("ms", math.inf):
                entries[sig] = entry
        data = {"format": CACHE_FORMAT, "version": VERSION, "clconv_version": __version__,
                **_cache_header(info), "entries": dict(sorted(entries.items()))}
        write_json_atomic(path, data)
    _memo.pop(str(path), None)
    from .. import planner          # plans made from the old entries are out of date
    planner.forget()
    return path


def write_json_atomic(path, data):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def databases_dir() -> Path:
    return shipped_dir("tuning_databases", "tuning/database")


def export_database(info, path, entries=None):
    """Write a shareable database of this device's entries (default: its whole cache). Its
    `match` names this device exactly; widen the regular expressions for a device family."""
    entries = cache_entries(info) if entries is None else entries
    data = {"format": DATABASE_FORMAT, "version": VERSION, "clconv_version": __version__,
            "match": {k: re.escape(v) for k, v in device_key(info).items()
                      if k != "driver_version"},
            "tuned_on": device_key(info), "sources_hash": programs.sources_hash(),
            "entries": dict(sorted(entries.items()))}
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
    return (match, data.get("sources_hash"), entries) if entries else None


def database_entries(info):
    """{signature: entry} from every shipped database that matches this device and the
    current kernel sources (a database from other kernels is silently out of date)."""
    found = {}
    key = device_key(info)
    for path in sorted(databases_dir().glob("*.json")):
        db = _load(path, _read_database)
        if not db:
            continue
        match, sources, entries = db
        if sources == programs.sources_hash() and all(
                re.fullmatch(rx, key.get(field, "")) for field, rx in match.items()):
            for sig, entry in entries.items():
                found.setdefault(sig, entry)
    return found


def nearest(entries, problem, operation="forward"):
    """The entry for operation on problem: its own signature, else the same layer tuned at
    the nearest batch size (on a log scale), else None."""
    exact = entries.get(signature(problem, operation=operation))
    if exact is not None:
        return exact
    layer = signature(problem, batch=False, operation=operation) + " n"
    same = [e for sig, e in entries.items() if sig.startswith(layer)]
    if not same:
        return None
    n = max(problem.batch, 1)
    return min(same, key=lambda e: abs(math.log(max(e["batch"], 1) / n)))
