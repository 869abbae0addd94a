"""`x @ w.T` on CPU by the C++ kernel (folojax/ops/csrc/panel_matmul.cc), over weights repacked
once at load time into panels of 64 output columns: the matmuls stream the weights at a rate this
code controls, whichever CPU runs it, instead of the rate XLA's codegen happens to reach for that
shape and layout (docs/BENCHMARKS.md).

A weight [out, in] becomes panels [ceil(out / 64), in, 64]: panel p at depth k holds
w[64p:64p + 64, k], zeros past the last output. `load_model` packs float32 weights this way where
the kernels are expected on the CPU backend (FOLOJAX_NATIVE_KERNELS=0: never); see
`packs_weights`.
"""

import jax
import jax.numpy as jnp
import numpy as np

from folojax.ops import cpu_kernels

PANEL = 64  # output columns per panel (the kernel's kPanel)


def packs_weights(dtype) -> bool:
    """Whether weights of `dtype` are repacked into panels here: float32 on the CPU backend
    where the native kernels are expected (a kernel build under way is not waited for)."""
    return np.dtype(dtype) == np.float32 and cpu_kernels.expected()


def pack_panels(weight: np.ndarray) -> np.ndarray:
    """[out, in] -> panels [ceil(out / PANEL), in, PANEL], zero-padded past `out`."""
    out, inner = weight.shape
    num_panels = -(-out // PANEL)
    panels = np.zeros((num_panels, inner, PANEL), weight.dtype)
    full = out // PANEL
    panels[:full] = weight[:full * PANEL].reshape(full, PANEL, inner).transpose(0, 2, 1)
    if full < num_panels:
        panels[full, :, :out - full * PANEL] = weight[full * PANEL:].T
    return panels


def unpack_panels(panels, out_features: int):
    """The inverse of pack_panels: [out_features, in] (numpy or jax, as given)."""
    num_panels, inner, width = panels.shape
    return panels.transpose(0, 2, 1).reshape(num_panels * width, inner)[:out_features]


def panel_matmul(x: jax.Array, panels: jax.Array, out_features: int) -> jax.Array:
    """x [..., in] @ w.T for the w [out_features, in] packed as `panels`: the kernel for float32 on
    the CPU backend, else XLA's einsum over the panels."""
    rows = x.reshape(-1, x.shape[-1])
    if x.dtype == jnp.float32 and panels.dtype == jnp.float32 and cpu_kernels.available():
        result = jax.ShapeDtypeStruct((rows.shape[0], out_features), jnp.float32)
        out = jax.ffi.ffi_call(cpu_kernels.PANEL_MATMUL_TARGET, result)(rows, panels)
    else:
        out = jnp.einsum("mk,pkc->mpc", rows, panels).reshape(rows.shape[0], -1)
        out = out[:, :out_features]
    return out.reshape(*x.shape[:-1], out_features)


def panel_rows(panels: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows `ids` of the w packed as `panels`: [*ids.shape, in] (an embedding lookup from a
    tied head kept only as panels)."""
    return panels[ids // PANEL, :, ids % PANEL]


