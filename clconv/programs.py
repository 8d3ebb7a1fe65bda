"""The one place where OpenCL sources are rendered from Mako templates and built.

Every specialisation constant is rendered into the source text (never only a -D flag), so a
program is identified by its source alone. Built programs are memoised per (context, source)
in tables held weakly by the context and bounded to the most recently used
(ContextMemo, options.memo_size), so dropping a context frees them;
pyopencl's on-disk binary cache serves later processes.

Each template has a hash of its own text and of the templates it includes (template_hash):
the tuning store keys an algorithm's entries by the hashes of the templates it renders, so
editing one template invalidates only what renders it.

Branch recording (recording_branches) instruments every `% if / % elif / % else` line of the
templates through a Mako preprocessor, so a test can observe which compile-time branches
renders took (tests/test_oclgrind.py requires the Oclgrind variants to take all of them).
"""
from __future__ import annotations

import hashlib
import re
import warnings
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyopencl as cl
from mako.lookup import TemplateLookup

from . import options
from .paths import shipped_dir


def kernels_dir() -> Path:
    """cl_kernels/: inside the installed package, or at the top of a source checkout."""
    return shipped_dir("cl_kernels", "cl_kernels")


C_TYPES = {"float16": ("half", "float"), "float32": ("float", "float"),
           "float64": ("double", "double")}


STORAGE_DTYPES = {storage: dtype for dtype, (storage, _) in C_TYPES.items()}


def c_types(dtype):
    """(storage_t, acc_t) of a dtype name: half is stored as half, computed in float."""
    return C_TYPES[dtype]


def acc_itemsize(dtype):
    """Bytes of one acc_t value: float for half and float, double for double."""
    return 8 if c_types(dtype)[1] == "double" else 4


# --- rendering -------------------------------------------------------------------------------

_BRANCH = re.compile(r"^\s*%\s*(if|elif|else)\b")
_taken = None       # the set that recording_branches() fills, else None


def template_branches(name):
    """The (template, line) of every `% if/elif/else` arm of a template."""
    lines = (kernels_dir() / name).read_text().splitlines()
    return {(name, i) for i, line in enumerate(lines, 1) if _BRANCH.match(line)}


def all_template_branches():
    return set().union(*(template_branches(p.name) for p in kernels_dir().glob("*.mako")))


def record_branch(name, line):
    """Called from instrumented templates: the arm at line of template name was taken."""
    if _taken is not None:
        _taken.add((name, line))


def _instrument(name, source):
    """source with a record_branch call after each `% if/elif/else` line (same line count
    per arm: the call ends in a backslash, so it adds no output line)."""
    out = []
    for i, line in enumerate(source.splitlines(), 1):
        out.append(line)
        if _BRANCH.match(line):
            out.append(f"<% __import__('clconv.programs').programs.record_branch({name!r}, {i})"
                       " %>\\")
    return "\n".join(out) + "\n"


@lru_cache(maxsize=2)
def _lookup(instrumented=False):
    if not instrumented:
        return TemplateLookup(directories=[str(kernels_dir())], strict_undefined=True)
    return TemplateLookup(directories=[str(kernels_dir())], strict_undefined=True,
                          preprocessor=lambda source: _instrument(_name_of(source), source))


def _name_of(source):
    """The name of the template whose text is source (a preprocessor sees only the text)."""
    for path in kernels_dir().glob("*.mako"):
        if path.read_text() == source:
            return path.name
    raise LookupError("an instrumented template's text matches no file in "
                      f"{kernels_dir()} (edited while rendering?)")


@contextmanager
def recording_branches():
    """A block in which renders record their branches; yields the set of (template, line)."""
    global _taken
    saved, _taken = _taken, set()
    try:
        yield _taken
    finally:
        _taken = saved


def render(template: str, **constants) -> str:
    """Render cl_kernels/<template> with the given constants (dtype adds its C types)."""
    dtype = constants.get("dtype")
    if dtype is not None:
        storage_t, acc_t = c_types(dtype)
        constants.setdefault("storage_t", storage_t)
        constants.setdefault("acc_t", acc_t)
    return _lookup(_taken is not None).get_template(template).render(**constants)


# --- source hashes ---------------------------------------------------------------------------

_INCLUDES = re.compile(r"<%(?:namespace|include|inherit)\b[^>]*\bfile=\"([^\"]+)\"")


@lru_cache(maxsize=None)
def template_hash(name) -> str:
    """A hash of template name's text and of every template it includes, recursively."""
    h = hashlib.sha256()
    for current in sorted(_with_includes(name)):
        h.update(current.encode())
        h.update((kernels_dir() / current).read_bytes())
    return h.hexdigest()[:16]


def _with_includes(name):
    """name and every template it includes, recursively."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += _INCLUDES.findall((kernels_dir() / current).read_text())
    return seen


def sources_hash(templates=None) -> str:
    """The hash of the given templates (with their includes), default every template: what
    tuned entries of an algorithm rendering them are keyed by."""
    names = sorted(templates) if templates is not None else sorted(
        p.name for p in kernels_dir().glob("*.mako"))
    return hashlib.sha256(" ".join(template_hash(n) for n in names).encode()).hexdigest()[:16]


# --- kernel arguments, declared once --------------------------------------------------------

@dataclass(frozen=True)
class Buffer:
    """A __global pointer argument. type: a C type or a type name the template defines
    (storage_t, acc_t, out_t, word_t); offset: followed by `<name>_off`, an element offset of
    offset_t (idx_t, a template typedef)."""
    name: str
    type: str = "storage_t"
    const: bool = True
    offset: bool = True
    restrict: bool = True
    offset_t: str = "idx_t"


@dataclass(frozen=True)
class Scalar:
    """A scalar argument of C type int, long, float, double or idx_t."""
    name: str
    type: str = "int"


SCALAR_DTYPES = {"int": np.int32, "long": np.int64, "float": np.float32,
                 "double": np.float64}


def c_parameters(args, types):
    """The C parameter list of args; types maps the template's type names to C types."""
    decls = []
    for a in args:
        if isinstance(a, Scalar):
            decls.append(f"const {a.type} {a.name}")
            continue
        const = "const " if a.const else ""
        restrict = " restrict " if a.restrict else ""
        decls.append(f"__global {const}{types.get(a.type, a.type)} *{restrict}{a.name}")
        if a.offset:
            decls.append(f"const {a.offset_t} {a.name}_off")
    return ",\n    ".join(decls)


def scalar_dtypes(args, idx_t):
    """set_scalar_arg_dtypes' list for args: None for buffers, NumPy dtypes for scalars."""
    idx = np.int32 if idx_t == "int" else np.int64
    dtypes = []
    for a in args:
        if isinstance(a, Scalar):
            dtypes.append(idx if a.type == "idx_t" else SCALAR_DTYPES[a.type])
        else:
            dtypes.append(None)
            if a.offset:
                dtypes.append(idx if a.offset_t == "idx_t" else SCALAR_DTYPES[a.offset_t])
    return dtypes


# --- building --------------------------------------------------------------------------------

class LRUTable(OrderedDict):
    """A memo table that keeps its maxsize most recently used entries; get() and
    assignment are the whole interface its users need."""

    def __init__(self, maxsize):
        super().__init__()
        self.maxsize = maxsize

    def get(self, key, default=None):
        try:
            self.move_to_end(key)       # a hit: two look-ups of the key in all
        except KeyError:
            return default
        return self[key]

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)


class ContextMemo:
    """Memo tables per OpenCL context, held weakly by the context (when its last Python
    object goes, so do the tables: programs, built launches), each bounded to the
    options.memo_size() most recently used entries."""

    def __init__(self):
        self._tables = weakref.WeakKeyDictionary()

    def table(self, context) -> LRUTable:
        table = self._tables.get(context)
        if table is None:
            table = self._tables[context] = LRUTable(options.memo_size())
        return table

    def clear(self):
        self._tables.clear()


class BuildError(RuntimeError):
    """The device's compiler rejected a rendered kernel."""


_programs = ContextMemo()


def program(context: cl.Context, source: str) -> cl.Program:
    """The built program for source on context, built once per (context, source)."""
    per_context = _programs.table(context)
    prg = per_context.get(source)
    if prg is None:
        # The program holds the Context object it is made with: a wrapper of its own, so
        # that the memo's (weak) key can go while the program lives.
        own = cl.Context.from_int_ptr(context.int_ptr)
        try:
            with warnings.catch_warnings():   # PoCL's harmless build logs are not for users
                warnings.simplefilter("ignore", cl.CompilerWarning)
                prg = cl.Program(own, source).build(options=["-cl-std=CL1.2"])
        except cl.RuntimeError as err:
            raise BuildError(f"OpenCL build failed: {err}\n--- source ---\n{source}") from err
        if not prg.kernel_names:    # seen with PoCL when its LLVM failed without an error
            raise BuildError(f"OpenCL build produced no kernels\n--- source ---\n{source}")
        per_context[source] = prg
    return prg


def kernel(context, template, kernel_name, args, **constants) -> cl.Kernel:
    """A new Kernel object (Launches set their arguments apart) of template rendered with
    constants and `parameters`, the C parameter list of args, whose scalar argument dtypes
    come from the same args. Type names in args (storage_t, acc_t, out_t, ...) resolve
    through the dtype's C types and the constants ending in _t."""
    types = dict(zip(("storage_t", "acc_t"), c_types(constants["dtype"]))) \
        if "dtype" in constants else {}
    types.update({k: v for k, v in constants.items() if k.endswith("_t")})
    source = render(template, parameters=c_parameters(args, types), **constants)
    built = cl.Kernel(program(context, source), kernel_name)
    built.set_scalar_arg_dtypes(scalar_dtypes(args, constants.get("idx_t", "int")))
    return built
