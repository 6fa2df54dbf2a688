"""Every CUDA source of dtrain compiled by NVRTC, on every CI run, without a GPU (issue 27).

NVRTC turns CUDA C into PTX and SASS with no device and no driver. CuPy's own
``compile_using_nvrtc`` asks the driver for the device's architecture first, so
these tests call NVRTC directly (``cupy_backends.cuda.libs.nvrtc``; libnvrtc from
the ``nvidia-cuda-nvrtc-cu12`` wheel), with the options CuPy's ``RawModule`` gives
it on a GPU: CuPy's assembly of the module's own options, ``-ftz=true``, and the
architecture. Each program is compiled to PTX (``-arch=compute_XX``) and to SASS
(``-arch=sm_XX``, what CuPy builds for a device it knows) for V100, A100 and H100.

Which sources: every dtrain module whose code builds a CuPy kernel from source
(RawModule, RawKernel, ElementwiseKernel, ReductionKernel, cupy.fuse) must list
its programs through ``cuda_programs()`` (see ``kernels.cuda.CudaProgram``); a
module that builds one and lists none fails here. Which kernel names: read from
the module's code (every ``get_function`` argument, and every literal key of a
table filled by ``get_function``), so a renamed kernel or a misspelt launch fails.

The packages come with the test extra (``pip install -e '.[test]'``); without
them these tests fail, they do not skip. ``pytest -k nvrtc`` runs exactly these.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

import dtrain

ARCHS = (70, 80, 90)  # V100, A100, H100
PACKAGE = Path(dtrain.__file__).parent
# calls that compile CUDA source at run time (cupy.fuse generates it from Python)
CUDA_BUILDERS = {"RawModule", "RawKernel", "ElementwiseKernel", "ReductionKernel", "fuse"}
# what CuPy's _compile_with_cache_cuda adds to every NVRTC compile
CUPY_ADDED = ("-ftz=true",)
PTX_ENTRY = re.compile(r"^\s*\.(?:visible\s+|weak\s+)?\.entry\s+([A-Za-z_]\w*)", re.M)
CUBIN_TEXT = re.compile(rb"\.text\.([A-Za-z_]\w*)\x00")  # one ELF section per kernel


def _call_name(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def modules_with_cuda_source() -> list[str]:
    """Dotted names of the dtrain modules whose code builds a CuPy kernel from source."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        if any(isinstance(n, ast.Call) and _call_name(n) in CUDA_BUILDERS for n in ast.walk(tree)):
            rel = path.relative_to(PACKAGE.parent).with_suffix("")
            found.append(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
    return found


def _programs():
    """(module, program) for every program every CUDA module lists, at collection time."""
    out = []
    for name in modules_with_cuda_source():
        lister = getattr(importlib.import_module(name), "cuda_programs", None)
        for prog in lister() if lister is not None else ():
            out.append(pytest.param(name, prog, id=prog.label))
    return out


PROGRAMS = _programs()


@pytest.fixture(scope="module")
def nvrtc():
    """NVRTC from the pip wheels, or a failure saying what to install."""
    try:
        from cupy_backends.cuda.libs import nvrtc as lib

        lib.getVersion()  # loads libnvrtc
    except Exception as exc:  # ImportError, or libnvrtc not found
        pytest.fail(f"NVRTC is not usable ({type(exc).__name__}: {exc}); the test extra "
                    "installs it: pip install -e '.[test]' (cupy-cuda12x, nvidia-cuda-nvrtc-cu12)")
    return lib


def cupy_options(own: tuple) -> tuple:
    """What NVRTC gets from ``RawModule(code, options=own)`` before the architecture."""
    from cupy._core.core import assemble_cupy_compiler_options

    return tuple(assemble_cupy_compiler_options(tuple(own))) + CUPY_ADDED


def nvrtc_compile(lib, source: str, options: tuple, target: str) -> tuple[str, bytes]:
    """(PTX text, or "" for SASS; the binary) of ``source`` for ``-arch=target``.
    A compile error fails the test with NVRTC's log."""
    prog = lib.createProgram(source, "dtrain.cu", [], [])
    try:
        error = None
        try:
            lib.compileProgram(prog, [*options, f"-arch={target}"])
        except lib.NVRTCError as exc:
            error = f"NVRTC -arch={target}: {exc}\n{lib.getProgramLog(prog)}"
        if error:
            pytest.fail(error, pytrace=False)
        # a clean compile says nothing but this note (so a new warning fails here too)
        log = [ln for ln in lib.getProgramLog(prog).splitlines()
               if ln.strip() and "Architectures prior to" not in ln]
        assert not log, f"NVRTC -arch={target} warns:\n" + "\n".join(log)
        if target.startswith("compute_"):
            ptx = lib.getPTX(prog)
            ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
            return ptx, ptx.encode()
        return "", lib.getCUBIN(prog)
    finally:
        lib.destroyProgram(prog)


# ---------------------------------------------------------------------------- names from code


def _tail(node) -> str | None:
    """``x`` of ``x``, ``self.x`` or ``a.b.x``."""
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else None


def _strings(node, loops: dict, module) -> set[str] | None:
    """The kernel names an expression can hold: a literal, a tuple of literals, a module-level
    tuple or string, or the variable of a loop over one of those. None: not known statically."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List)):
        parts = [_strings(e, loops, module) for e in node.elts]
        return None if any(p is None for p in parts) else set().union(*parts)
    if isinstance(node, ast.Name):
        if node.id in loops:
            return _strings(loops.pop(node.id), loops, module)
        value = getattr(module, node.id, None)
        if isinstance(value, str):
            return {value}
        if isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
            return set(value)
    return None


def asked_kernel_names(module) -> tuple[set[str], set[str], list[str]]:
    """(names passed to get_function or RawKernel, literal keys launched from a table of
    get_function results, lines whose name cannot be read statically) in ``module``'s code."""
    tree = ast.parse(inspect.getsource(module))
    loops = {n.target.id: n.iter for n in ast.walk(tree)
             if isinstance(n, (ast.comprehension, ast.For)) and isinstance(n.target, ast.Name)}
    asked, tables, unknown = set(), set(), []
    for node in ast.walk(tree):
        name_arg = None  # get_function(name); RawKernel(code, name)
        if isinstance(node, ast.Call) and _call_name(node) in ("get_function", "RawKernel"):
            at = 0 if _call_name(node) == "get_function" else 1
            name_arg = node.args[at] if len(node.args) > at else next(
                (k.value for k in node.keywords if k.arg == "name"), None)
        if name_arg is not None:
            names = _strings(name_arg, dict(loops), module)
            if names is None:
                unknown.append(f"{module.__name__} line {node.lineno}")
            else:
                asked |= names
        if isinstance(node, ast.Assign) and any(isinstance(c, ast.Call)
                                                and _call_name(c) == "get_function"
                                                for c in ast.walk(node.value)):
            tables.update(_tail(t) for t in node.targets)
    launched = {n.slice.value for n in ast.walk(tree)
                if isinstance(n, ast.Subscript) and _tail(n.value) in tables
                and isinstance(n.slice, ast.Constant) and isinstance(n.slice.value, str)}
    return asked, launched, unknown


# ---------------------------------------------------------------------------- tests


def test_nvrtc_every_cuda_source_is_listed():
    modules = modules_with_cuda_source()
    assert "dtrain.kernels.cuda" in modules  # the scan sees the one we know
    unlisted = [m for m in modules
                if not callable(getattr(importlib.import_module(m), "cuda_programs", None))]
    assert not unlisted, (f"{unlisted} build CUDA kernels from source but define no "
                          "cuda_programs(); "
                          "list the programs (kernels.cuda.CudaProgram) so NVRTC checks them")
    assert len(PROGRAMS) >= 2  # float and double of kernels.cuda at least


def test_nvrtc_loads_libnvrtc_from_the_pip_wheel(nvrtc):
    major, minor = nvrtc.getVersion()
    assert (major, minor) >= (12, 0)
    with open("/proc/self/maps") as maps:
        loaded = {ln.split()[-1] for ln in maps if "libnvrtc.so" in ln}
    assert loaded and all("nvidia/cuda_nvrtc/lib" in p for p in loaded), loaded
    supported = set(nvrtc.getSupportedArchs())
    assert set(ARCHS) <= supported, f"NVRTC {major}.{minor} lacks {set(ARCHS) - supported}"


@pytest.mark.parametrize("module_name", modules_with_cuda_source())
def test_nvrtc_kernel_names_asked_for_are_defined(module_name):
    module = importlib.import_module(module_name)
    asked, launched, unknown = asked_kernel_names(module)
    assert not unknown, f"get_function with a name not readable from the code: {unknown}"
    assert asked, f"{module_name}: no kernel name found (get_function, RawKernel): scan broken"
    assert launched <= asked, f"launched, never fetched by get_function: {sorted(launched - asked)}"
    declared = set().union(*(p.kernels for p in module.cuda_programs()))
    assert asked <= declared, f"asked for but in no listed program: {sorted(asked - declared)}"


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize(("module_name", "program"), PROGRAMS)
def test_nvrtc_compiles(nvrtc, module_name, program, arch):
    options = cupy_options(program.options)
    ptx, _ = nvrtc_compile(nvrtc, program.source, options, f"compute_{arch}")
    assert f".target sm_{arch}" in ptx
    entries = set(PTX_ENTRY.findall(ptx))
    missing = set(program.kernels) - entries
    assert not missing, f"{program.label}: not in the PTX for compute_{arch}: {sorted(missing)}"
    _, cubin = nvrtc_compile(nvrtc, program.source, options, f"sm_{arch}")
    assert cubin[:4] == b"\x7fELF"
    sass = {m.decode() for m in CUBIN_TEXT.findall(cubin)}
    assert set(program.kernels) <= sass, f"{program.label}: not in the sm_{arch} binary"
