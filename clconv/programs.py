"""The one place where OpenCL sources are rendered from Mako templates and built.

Every specialisation constant is rendered into the source text (never only a -D flag), so a
program is identified by its source alone. Built programs are memoised per (context, source);
pyopencl's on-disk binary cache serves later processes.
"""
from __future__ import annotations

import hashlib
import warnings
from functools import lru_cache
from pathlib import Path

import pyopencl as cl
from mako.lookup import TemplateLookup

from .paths import shipped_dir


def kernels_dir() -> Path:
    """cl_kernels/: inside the installed package, or at the top of a source checkout."""
    return shipped_dir("cl_kernels", "cl_kernels")


@lru_cache(maxsize=1)
def _lookup():
    return TemplateLookup(directories=[str(kernels_dir())], strict_undefined=True)


C_TYPES = {"float16": ("half", "float"), "float32": ("float", "float"),
           "float64": ("double", "double")}


def render(template: str, **constants) -> str:
    """Render cl_kernels/<template> with the given constants (dtype adds its C types)."""
    dtype = constants.get("dtype")
    if dtype is not None:
        constants.setdefault("storage_t", C_TYPES[dtype][0])
        constants.setdefault("acc_t", C_TYPES[dtype][1])
    return _lookup().get_template(template).render(**constants)


def sources_hash() -> str:
    """A hash of every kernel template: a kernel change invalidates anything keyed on it."""
    h = hashlib.sha256()
    for path in sorted(kernels_dir().glob("*.mako")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


_programs: dict = {}


class BuildError(RuntimeError):
    """The device's compiler rejected a rendered kernel."""


def program(context: cl.Context, source: str) -> cl.Program:
    """The built program for source on context, built once per (context, source)."""
    per_context = _programs.setdefault(context, {})
    prg = per_context.get(source)
    if prg is None:
        try:
            with warnings.catch_warnings():   # PoCL's harmless build logs are not for users
                warnings.simplefilter("ignore", cl.CompilerWarning)
                prg = cl.Program(context, source).build(options=["-cl-std=CL1.2"])
        except cl.RuntimeError as err:
            raise BuildError(f"OpenCL build failed: {err}\n--- source ---\n{source}") from err
        if not prg.kernel_names:    # seen with PoCL when its LLVM failed without an error
            raise BuildError(f"OpenCL build produced no kernels\n--- source ---\n{source}")
        per_context[source] = prg
    return prg
