"""Native CPU kernels: C++ sources in folojax/ops/csrc (paged attention; the matmuls over weights
repacked into panels, float32 or quantized; int8 weights against int8 activations), compiled on
first use with the system's C++ compiler against jaxlib's FFI headers into one library, cached,
and registered as XLA FFI targets.

The build is cached under $FOLOJAX_CACHE_DIR (default ~/.cache/folojax), keyed by the source,
the flags, the compiler, jaxlib's version and this CPU's instruction sets (it is built with
-march=native). Without a compiler, or with FOLOJAX_NATIVE_KERNELS=0, `available()` is False and
callers use their pure-JAX path.
"""

import ctypes
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import jax
import jaxlib

from folojax.compilation_cache import cache_root
from folojax.env import switched_off

logger = logging.getLogger(__name__)

SOURCE_DIR = pathlib.Path(__file__).parent / "csrc"
SOURCES = tuple(SOURCE_DIR / name
                for name in ("paged_attention.cc", "panel_matmul.cc", "quant_matmul.cc",
                             "int8_matmul.cc"))
HEADERS = tuple(SOURCE_DIR / name for name in ("parallel_for.h", "panel_tile.h"))
PAGED_ATTENTION_TARGET = "folojax_paged_attention"
PANEL_MATMUL_TARGET = "folojax_panel_matmul"
QUANT_MATMUL_TARGET = "folojax_quant_matmul"
INT8_MATMUL_TARGET = "folojax_int8_matmul"
# FFI target -> the handler symbol the library exports.
TARGETS = {PAGED_ATTENTION_TARGET: "FolojaxPagedAttention",
           PANEL_MATMUL_TARGET: "FolojaxPanelMatmul",
           QUANT_MATMUL_TARGET: "FolojaxQuantMatmul",
           INT8_MATMUL_TARGET: "FolojaxInt8Matmul"}
FLAGS = ("-O3", "-march=native", "-ffast-math", "-std=c++17", "-shared", "-fPIC")

_state: dict[str, bool] = {}  # "loaded": the outcome of the first load() (then cached)
_load_lock = threading.Lock()  # one load at a time: a second caller waits for the first's outcome


class KernelBuildError(RuntimeError):
    """The C++ compiler failed on a kernel source."""


def enabled() -> bool:
    return not switched_off("FOLOJAX_NATIVE_KERNELS")


def cache_dir() -> pathlib.Path:
    return cache_root() / "kernels"


def cpu_flags() -> str:
    """The flags line of /proc/cpuinfo (empty where there is none)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def compiler() -> str:
    """$CXX, else c++ or g++ on the PATH."""
    name = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    path = shutil.which(name) if name else None
    if path is None:
        tried = f"CXX={name}" if name else "no c++ or g++ on the PATH"
        raise KernelBuildError(f"no C++ compiler found ({tried}; set CXX or install g++)")
    return path


def build(sources: tuple[pathlib.Path, ...] = SOURCES, flags: tuple[str, ...] = FLAGS
          ) -> pathlib.Path:
    """One shared library of `sources`, compiled with `flags` unless the cache already holds
    it."""
    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\n".join([*(path.read_text() for path in (*sources, *HEADERS)),
                                    " ".join(flags), version, jaxlib.__version__, cpu_flags()]
                                   ).encode()).hexdigest()
    library = cache_dir() / f"folojax-kernels-{key[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: concurrent builds never load a partial file.
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        objects = [pathlib.Path(scratch) / f"{source.stem}.o" for source in sources]
        # The sources compile side by side (one compiler process each), then link.
        _run_all([[cxx, *flags, "-c", "-I", jax.ffi.include_dir(), str(source), "-o", str(obj)]
                  for source, obj in zip(sources, objects, strict=True)])
        partial = pathlib.Path(scratch) / library.name
        _run_all([[cxx, *flags, *map(str, objects), "-o", str(partial)]])
        os.replace(partial, library)
    logger.info("built %s", library)
    return library


def _run_all(commands: list[list[str]]) -> None:
    """Runs the commands at once; raises KernelBuildError with the first failure's output."""
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for command in commands]
    for command, process in zip(commands, processes, strict=True):
        _, stderr = process.communicate()
        if process.returncode != 0:
            raise KernelBuildError(f"{' '.join(command)} failed:\n{stderr[-4000:]}")


def load() -> bool:
    """Builds (once) and registers the kernels; False, with a warning, if they cannot be. A call
    while another thread loads them (start_loading) waits for that load."""
    with _load_lock:
        if "loaded" not in _state:
            _state["loaded"] = _build_and_register() if enabled() else False
    return _state["loaded"]


def _build_and_register() -> bool:
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        return True
    except (KernelBuildError, OSError) as error:
        logger.warning("native CPU kernels unavailable, using the JAX path: %s", error)
        return False


def start_loading() -> None:
    """Starts load() in a background thread, if the kernels will serve this backend and are not
    loaded yet: a first build (seconds of compiler processes) then runs while the weights load.
    The first caller of load() or available() waits for it."""
    if "loaded" in _state or not enabled() or jax.default_backend() != "cpu":
        return
    threading.Thread(target=load, name="folojax-kernel-build", daemon=True).start()


def expected(backend: str | None = None) -> bool:
    """Whether the kernels are expected to serve this backend, without waiting for a build that
    is under way: the outcome once loaded; before that, whether they are switched on for a CPU
    backend with a C++ compiler at hand (a build that then fails warns, and callers fall back
    to their pure-JAX path)."""
    if (backend or jax.default_backend()) != "cpu":
        return False
    if "loaded" in _state:
        return available(backend)
    try:
        compiler()
    except KernelBuildError:
        return False
    return enabled()


def available(backend: str | None = None) -> bool:
    """Whether the native kernels serve this backend (default: JAX's default backend)."""
    return (backend or jax.default_backend()) == "cpu" and load()
