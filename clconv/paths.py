"""Where clconv's files live: data shipped in the package, and the user's cache directory."""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path

import platformdirs

_PACKAGE = Path(__file__).parent


@lru_cache(maxsize=None)
def shipped_dir(package_name: str, checkout_path: str) -> Path:
    """A data folder that the wheel installs as clconv/<package_name> and that a source
    checkout holds at <repository>/<checkout_path> (see pyproject.toml's package-dir).
    Found once per process: the planner's memo key reads the databases' folder per call."""
    installed = _PACKAGE / package_name
    return installed if installed.is_dir() else _PACKAGE.parent / checkout_path


def cache_dir() -> Path:
    """CLCONV_CACHE_DIR, else the platform's user cache directory for clconv (platformdirs:
    ~/.cache/clconv, ~/Library/Caches/clconv, %LOCALAPPDATA%\\clconv\\Cache)."""
    explicit = os.environ.get("CLCONV_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    return Path(platformdirs.user_cache_dir("clconv", appauthor=False))


def keyed_file(folder, name, key) -> Path:
    """<cache dir>/folder/<name as a slug>-<hash of key>.json: a cache file per device (and
    whatever else key holds), readable by name, distinct by key."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:48] or "device"
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    return cache_dir() / folder / f"{slug}-{digest}.json"


def write_json_atomic(path, data):
    """Write data as JSON to path atomically (a temporary file in its folder, then a rename),
    so a reader never sees a half-written file; the temporary file goes on any failure."""
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
