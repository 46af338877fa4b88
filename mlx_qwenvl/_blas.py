"""Bind an optimized BLAS for MLX's CPU backend on Linux (issue 7).

The ``mlx[cpu]`` wheel links the unoptimized reference BLAS it bundles in
``mlx_cpu.libs/``: a float32 matmul runs at a few GFLOP/s. libmlx.so resolves
``cblas_sgemm`` (and the LAPACK routines) through the process's global symbol
scope first, so loading a system OpenBLAS with ``RTLD_GLOBAL`` *before*
``mlx.core`` is imported makes MLX call OpenBLAS instead, 50x faster or more.
Once libmlx.so is loaded its symbols are bound, so this must run first:
``mlx_qwenvl/__init__.py`` calls :func:`bind_optimized_blas` before anything
imports mlx.

Set ``MLX_QWENVL_NO_BLAS=1`` to keep the bundled reference BLAS.
"""

import ctypes
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import sysconfig
import warnings

# The symbols libmlx.so takes from BLAS; a library must define both (not just
# import them) to serve. This rules out builds with prefixed or suffixed
# symbols (scipy-openblas32's ``scipy_sgemm_``, 64-bit-integer ``sgemm_64_``),
# which would leave MLX on the reference BLAS while we claimed otherwise.
_REQUIRED = (b"sgemm_", b"cblas_sgemm")

_info = None  # blas_info()'s answer, set by the first bind_optimized_blas()
_lib = None  # the bound library, kept so it is never unloaded


def blas_info():
    """One line telling which BLAS MLX's float32 matmuls use (for --verbose)."""
    return _info if _info is not None else bind_optimized_blas()


def bind_optimized_blas():
    """Bind OpenBLAS globally if this is Linux with MLX's CPU wheel; say what MLX uses.

    Idempotent; returns the same one-line description as :func:`blas_info`.
    """
    global _info, _lib
    if _info is not None:
        return _info
    if sys.platform == "darwin":
        _info = "Accelerate (macOS)"
    elif not sys.platform.startswith("linux"):
        _info = "MLX's default BLAS"
    elif _cuda_wheel():
        # The CUDA build does its matmuls on the GPU; leave its libraries alone.
        _info = "CUDA backend"
    elif os.environ.get("MLX_QWENVL_NO_BLAS", "") not in ("", "0"):
        _info = "reference BLAS (unoptimized; MLX_QWENVL_NO_BLAS is set)"
    else:
        path = next((p for p in _candidates() if _defines(p, _REQUIRED)), None)
        if path is None:
            _info = "reference BLAS (unoptimized; install libopenblas0-pthread)"
        elif "mlx.core" in sys.modules or "mlx" in sys.modules:
            # libmlx.so (may be) loaded and bound to the reference BLAS already.
            warnings.warn(
                "mlx was imported before mlx_qwenvl, so OpenBLAS could not be bound "
                "and float32 matrix products stay on MLX's slow reference BLAS; "
                "import mlx_qwenvl before mlx (or set MLX_QWENVL_NO_BLAS=1 to "
                "silence this).",
                RuntimeWarning,
                stacklevel=3,
            )
            _info = "reference BLAS (unoptimized; mlx was imported before mlx_qwenvl)"
        else:
            try:
                _lib = ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
                _info = f"{_describe(_lib)} ({path})"
            except OSError as e:  # e.g. its libgfortran is missing: stay slow, not broken
                _info = f"reference BLAS (unoptimized; loading {path} failed: {e})"
    return _info


def _cuda_wheel():
    """Whether an mlx-cuda-* wheel is installed, found without importing mlx."""
    for d in sys.path:
        try:
            names = os.listdir(d or ".")
        except OSError:
            continue
        if any(n.startswith("mlx_cuda") and n.endswith(".dist-info") for n in names):
            return True
    return False


def _candidates():
    """Paths that may hold a system OpenBLAS, most specific first."""
    arch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    dirs += [
        f"/usr/lib/{arch}",  # Debian/Ubuntu: the update-alternatives choice
        f"/usr/lib/{arch}/openblas-pthread",
        f"/usr/lib/{arch}/openblas-openmp",
        f"/usr/lib/{arch}/openblas-serial",
        "/usr/lib64",  # Fedora/RHEL/SUSE
        "/usr/lib",  # Arch
        "/usr/local/lib",
    ]
    # Fedora names its threaded build libopenblasp.
    names = ("libopenblas.so.0", "libopenblasp.so.0", "libopenblas.so")
    found = [os.path.join(d, n) for d in dirs for n in names]
    found = [p for p in found if os.path.isfile(p)]
    # ctypes.util.find_library only returns a soname, but the symbol check needs
    # the file, so ask the loader cache for paths directly (only as a fallback).
    return found or _ldconfig_paths()


def _ldconfig_paths():
    try:
        ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"  # often not on a user's PATH
        out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [
        line.rsplit("=> ", 1)[1].strip()
        for line in out.splitlines()
        if line.strip().startswith("libopenblas") and "=> " in line
    ]


def _defines(path, symbols):
    """Whether the ELF64 shared library at `path` defines all of `symbols`.

    Reads the dynamic symbol table from the file, so a library that does not
    serve is never loaded (its constructors start threads, for one).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            # ELF64 (class 2), little endian (data 1): x86-64 and aarch64 Linux.
            if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return False
            shoff, = struct.unpack_from("<Q", head, 0x28)
            shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize) for i in range(shnum)]
            for _, kind, _, _, off, size, link, _, _, entsize in sections:
                if kind != 11:  # SHT_DYNSYM
                    continue
                f.seek(off)
                syms = f.read(size)
                f.seek(sections[link][4])
                strtab = f.read(sections[link][5])
                defined = set()
                for i in range(0, size, entsize):
                    name, _, _, shndx = struct.unpack_from("<IBBH", syms, i)
                    if shndx:  # 0 is SHN_UNDEF: imported, not defined
                        defined.add(strtab[name : strtab.index(b"\0", name)])
                return all(s in defined for s in symbols)
    except (OSError, struct.error, IndexError, ValueError):
        pass
    return False


def _describe(lib):
    """'OpenBLAS 0.3.21, 2 threads', after capping threads at the CPUs we may use."""
    try:
        lib.openblas_get_config.restype = ctypes.c_char_p
        version = " ".join(lib.openblas_get_config().decode().split()[:2])
        threads = lib.openblas_get_num_threads()
    except (AttributeError, UnicodeDecodeError):
        return "optimized BLAS"
    # OpenBLAS already follows the CPU affinity mask, but not a container's CPU
    # quota: one spinning thread per host core on a 2-CPU quota thrashes. An
    # explicit OPENBLAS_NUM_THREADS / OMP_NUM_THREADS is the user's choice.
    if not any(v in os.environ for v in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")):
        cap = min(threads, _usable_cpus())
        if cap < threads:
            lib.openblas_set_num_threads(cap)
            threads = cap
    return f"{version}, {threads} thread{'s' * (threads != 1)}"


def _usable_cpus():
    cpus = len(os.sched_getaffinity(0))
    try:  # cgroup v2 quota: "max 100000" or "<quota> <period>"
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus
