"""The attention backends: one registry, one entry point per step (step_attention; a single
set of rows: paged_attention), one choice per engine.

Every backend reads the same host-side metadata, work items (folojax/ops/paged_attention.py),
which folojax/runner/prepare.py:work_items builds from the scheduler's output with the backend's
own ChunkSizes (keys per item, items per loop iteration, the bucket of item counts) for the
platform. Its device call maps (queries, caches, items, query positions) to the attention output;
a backend may serve a step's decode rows and prefill tiles in one call (attend_step).

- `reference`: dense scores over every item's gathered blocks, one softmax; the oracle.
- `xla`: a loop of gathers and dots over a few items at a time (any platform).
- `cpu`: the C++ kernel through XLA's FFI, built at first use (CPU, float32 caches).
- `pallas`: the Pallas kernel, Triton lowering (GPU); `pallas-interpret` runs the same kernel in
  Pallas' interpreter on any platform, for tests (slow, so not listed).

`auto` takes the first backend of the platform's AUTO_ORDER that is available and serves the
model's shape, and logs its choice; a backend named outright that cannot serve the shape raises
a ValueError naming the limit (check_backend), never falling back.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp

from folojax.ops import cpu_kernels, pallas_attention
from folojax.ops.attention import dense_paged_attention
from folojax.ops.paged_attention import (
    ACCELERATOR_CHUNKS,
    CPU_CHUNKS,
    CPU_KERNEL_CHUNKS,
    NATIVE_MAX_BLOCK_SIZE,
    NATIVE_MAX_HEAD_DIM,
    AttentionRows,
    ChunkSizes,
    WorkItems,
    native_paged_attention,
    xla_paged_attention,
)

logger = logging.getLogger(__name__)

AUTO = "auto"
CACHE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """One backend: its device call, its work items' sizes, where it runs and what it serves."""

    name: str
    summary: str
    attend: Callable  # (q, k_cache, v_cache, items, query_positions, items_per_iteration) -> out
    # The ChunkSizes of its work items on a platform ("cpu", "gpu", ...).
    chunk_sizes: Callable[[str], ChunkSizes]
    platforms: tuple[str, ...] | None = None  # where it runs (None: every platform)
    # Why it cannot serve (head_dim, block_size, cache dtype name), or None.
    unsupported: Callable[[int, int, str], str | None] = lambda *_: None
    # Why it is not available on a platform here (a kernel that does not build), or None.
    unavailable: Callable[[str], str | None] = lambda _: None
    listed: bool = True  # listed by list_attention_backends (not the interpreter's)
    # (k_cache, v_cache, parts: AttentionRows...) -> each part's output, in one call; None: a
    # call of `attend` per part.
    attend_step: Callable | None = None


def _work_item_chunks(name: str, platform: str) -> ChunkSizes:
    chunks = CPU_CHUNKS if platform == "cpu" else ACCELERATOR_CHUNKS
    return dataclasses.replace(chunks, backend=name)


def _cpu_unsupported(head_dim: int, block_size: int, dtype: str) -> str | None:
    if dtype != "float32":
        return f"it reads float32 caches, not {dtype}"
    if head_dim > NATIVE_MAX_HEAD_DIM:
        return f"head_dim {head_dim} is above its {NATIVE_MAX_HEAD_DIM}"
    if block_size > NATIVE_MAX_BLOCK_SIZE:
        return f"block_size {block_size} is above its {NATIVE_MAX_BLOCK_SIZE}"
    return None


def _cpu_unavailable(platform: str) -> str | None:
    if not cpu_kernels.available(platform):
        return ("the C++ kernels did not build here (no C++ compiler, a failed build, or "
                "FOLOJAX_NATIVE_KERNELS=0: see the warning logged by folojax.ops.cpu_kernels)")
    return None


def _pallas_unsupported(head_dim: int, block_size: int, dtype: str) -> str | None:
    return pallas_attention.unsupported(head_dim, block_size)


BACKENDS: dict[str, AttentionBackend] = {backend.name: backend for backend in (
    AttentionBackend("reference", "dense scores over the gathered blocks (the oracle)",
                     dense_paged_attention, functools.partial(_work_item_chunks, "reference")),
    AttentionBackend("xla", "XLA's gathers and dots over work items",
                     xla_paged_attention, functools.partial(_work_item_chunks, "xla")),
    AttentionBackend("cpu", "the C++ kernel over blocks in place",
                     native_paged_attention, lambda platform: CPU_KERNEL_CHUNKS,
                     platforms=("cpu",), unsupported=_cpu_unsupported,
                     unavailable=_cpu_unavailable),
    AttentionBackend("pallas", "the Pallas kernel (Triton) over blocks in place",
                     pallas_attention.pallas_paged_attention,
                     functools.partial(_work_item_chunks, "pallas"), platforms=("gpu",),
                     unsupported=_pallas_unsupported,
                     attend_step=pallas_attention.pallas_step_attention),
    AttentionBackend("pallas-interpret", "the Pallas kernel in Pallas' interpreter (tests)",
                     functools.partial(pallas_attention.pallas_paged_attention, interpret=True),
                     functools.partial(_work_item_chunks, "pallas-interpret"),
                     unsupported=_pallas_unsupported, listed=False,
                     attend_step=functools.partial(pallas_attention.pallas_step_attention,
                                                   interpret=True)),
)}

# `auto`'s preference per platform. On GPU the Pallas kernel has not been measured against XLA's
# loop yet (docs/BENCHMARKS.md: GPU figures pending), so it is chosen only by name.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("cpu", "xla")}
DEFAULT_AUTO_ORDER = ("xla",)


def platform_name(platform: str | None = None) -> str:
    """JAX's default backend, or `platform`, as the registry names it ("cuda"/"rocm": "gpu")."""
    platform = platform or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def list_attention_backends(platform: str | None = None) -> list[str]:
    """The backends usable on this platform (default: JAX's default backend), `auto`'s choice
    first among them where it is listed."""
    platform = platform_name(platform)
    usable = [name for name, backend in BACKENDS.items() if backend.listed
              and (backend.platforms is None or platform in backend.platforms)
              and backend.unavailable(platform) is None]
    order = AUTO_ORDER.get(platform, DEFAULT_AUTO_ORDER)
    return sorted(usable, key=lambda name: order.index(name) if name in order else len(order))


def check_backend_name(name: str) -> None:
    if not isinstance(name, str) or (name != AUTO and name not in BACKENDS):
        raise ValueError(f"attention_backend {name!r} is not one of: "
                         f"{', '.join([AUTO, *BACKENDS])}")


def _why_not(backend: AttentionBackend, platform: str, head_dim: int, block_size: int,
             dtype: str) -> str | None:
    if backend.platforms is not None and platform not in backend.platforms:
        return f"it runs on {', '.join(backend.platforms)}, not {platform}"
    return (backend.unavailable(platform)
            or backend.unsupported(head_dim, block_size, dtype))


def check_backend(name: str, head_dim: int, block_size: int, dtype,
                  platform: str | None = None) -> AttentionBackend:
    """The backend `name` (or `auto`'s choice) for caches of this head_dim, block_size and dtype
    on this platform. A backend named outright that cannot serve them raises a ValueError that
    names the limit."""
    check_backend_name(name)
    platform = platform_name(platform)
    dtype = jnp.dtype(dtype).name
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"KV-cache dtype {dtype} is not one of {', '.join(CACHE_DTYPES)}")
    if name != AUTO:
        backend = BACKENDS[name]
        reason = _why_not(backend, platform, head_dim, block_size, dtype)
        if reason is not None:
            raise ValueError(f"attention_backend {name!r} cannot serve head_dim={head_dim}, "
                             f"block_size={block_size}, {dtype} caches on {platform}: {reason}")
        return backend
    passed_over = []
    for candidate in AUTO_ORDER.get(platform, DEFAULT_AUTO_ORDER):
        reason = _why_not(BACKENDS[candidate], platform, head_dim, block_size, dtype)
        if reason is None:
            logger.info("attention backend: %s (auto on %s for head_dim=%d, block_size=%d, %s%s)",
                        candidate, platform, head_dim, block_size, dtype,
                        "".join(f"; not {n}: {r}" for n, r in passed_over))
            return BACKENDS[candidate]
        passed_over.append((candidate, reason))
    raise AssertionError("the xla backend serves every shape")


def paged_attention(
    q: jax.Array,  # [rows, q_len, num_heads, head_dim]: decode rows (q_len 1) or prefill tiles
    k_cache: jax.Array,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: jax.Array,
    items: WorkItems,
    query_positions: jax.Array,  # [rows, q_len] (-1 = padding)
    items_per_iteration: int,
    backend: str = "xla",
) -> jax.Array:  # [rows, q_len, num_heads, head_dim]
    """Attention over the paged cache by the named backend (a static name, as in ChunkSizes)."""
    return BACKENDS[backend].attend(q, k_cache, v_cache, items, query_positions,
                                    items_per_iteration)


def step_attention(backend: str, k_cache: jax.Array, v_cache: jax.Array,
                   parts: tuple[AttentionRows, ...]) -> tuple[jax.Array, ...]:
    """A step's attention, each part (decode rows, prefill tiles) by the named backend: in one
    call where the backend serves them together (`pallas`), else a call per part."""
    entry = BACKENDS[backend]
    if entry.attend_step is not None:
        return entry.attend_step(k_cache, v_cache, parts)
    return tuple(entry.attend(part.q, k_cache, v_cache, part.items, part.positions,
                              part.items_per_iteration) for part in parts)
