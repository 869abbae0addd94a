"""JAX's persistent compilation cache in folojax's cache directory, so that a second process
finds the step's executables compiled instead of compiling them again.

Turned on at import unless the program already chose a cache directory (jax's
`jax_compilation_cache_dir`) or FOLOJAX_COMPILATION_CACHE=0 is set. Every compile is kept, even a
short one: the engine's shape buckets are few.
"""

import os
import pathlib

import jax

from folojax.env import switched_off

ENV_VAR = "FOLOJAX_COMPILATION_CACHE"


def cache_root() -> pathlib.Path:
    """$FOLOJAX_CACHE_DIR, default ~/.cache/folojax (the native kernels live here too)."""
    default = pathlib.Path.home() / ".cache" / "folojax"
    return pathlib.Path(os.environ.get("FOLOJAX_CACHE_DIR", default))


def enable_compilation_cache() -> str | None:
    """Points JAX's persistent cache at <cache root>/xla; returns the directory in use (None if
    turned off)."""
    chosen = jax.config.jax_compilation_cache_dir
    if chosen:
        return chosen
    if switched_off(ENV_VAR):
        return None
    directory = str(cache_root() / "xla")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory
