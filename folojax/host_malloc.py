"""Host memory: glibc malloc settings that keep freed buffers in the process for the next step,
instead of handing them back to the kernel and faulting them in again.

On CPU, every engine step allocates and frees the same temporaries: the logits alone are
[rows, vocab] floats. With glibc's defaults such blocks leave the process when freed
(allocations above the mmap threshold are unmapped, the heap top is trimmed, per-thread arenas
shrink), and the next step faults every page in again, zero-filled.

The settings: blocks up to 256 MB come from the heap (not mmap), up to 256 MB of free heap top
is kept, and all threads share one arena (XLA's worker threads would otherwise each grow and trim
their own). They are process-wide and take full effect before XLA's threads start. So they are
applied only where folojax owns the process: the `folojax` command applies them first thing
(FOLOJAX_TUNE_MALLOC=0 leaves glibc's defaults). A program that imports folojax opts in with
FOLOJAX_TUNE_MALLOC=1 in the environment (applied at import) or by calling tune_host_malloc()
before it first uses JAX; importing folojax otherwise changes nothing. Elsewhere (not Linux, not
glibc) nothing changes. docs/BENCHMARKS.md has the measured effect.
"""

import ctypes
import sys

from folojax.env import switched_off, switched_on

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's <malloc.h>
SETTINGS = ((M_TRIM_THRESHOLD, 256 << 20), (M_MMAP_THRESHOLD, 256 << 20), (M_ARENA_MAX, 1))
ENV_VAR = "FOLOJAX_TUNE_MALLOC"


def glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (Linux only; musl has no gnu_get_libc_version), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def tune_host_malloc() -> bool:
    """Applies SETTINGS through glibc's mallopt; returns whether all of them took effect (False
    when turned off by FOLOJAX_TUNE_MALLOC=0 or when the C library is not glibc)."""
    if switched_off(ENV_VAR):
        return False
    libc = glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = [mallopt(parameter, value) == 1 for parameter, value in SETTINGS]  # each one tried
    return all(applied)


def tune_if_opted_in() -> bool:
    """At import: applies the settings only if FOLOJAX_TUNE_MALLOC=1 asks for them."""
    return switched_on(ENV_VAR) and tune_host_malloc()
