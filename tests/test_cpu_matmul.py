"""The C++ matmul of a few rows by a weight (folojax/ops/csrc/matmul.cc) against numpy, and when
the decoder uses it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from folojax.model.layers import matmul_transposed
from folojax.ops import cpu_kernels, cpu_matmul

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ kernels here")


# Up to 8 rows: rows in register tiles of 4 and a remainder; columns in tiles of 4, a
# remainder, and tasks of 64. From 9 to 48: rows in 1, 2 or 3 vectors of 16, partly padding;
# columns in tiles of 8 and a remainder; inner sizes past one depth pass. Inner sizes a
# multiple of the 16-float vector and not.
@needs_kernels
@pytest.mark.parametrize("rows, inner, out", [
    (1, 576, 960), (3, 577, 1027), (4, 64, 7), (5, 20, 3), (8, 577, 67), (7, 15, 65),
    (9, 577, 1027), (16, 1536, 130), (12, 15, 65),
    (17, 577, 1027), (32, 64, 7), (33, 20, 3), (48, 1536, 130), (40, 15, 65), (48, 300, 197)])
def test_small_matmul_equals_numpy(rows, inner, out):
    rng = np.random.default_rng(rows * inner)
    x = rng.standard_normal((rows, inner), dtype=np.float32)
    weight = rng.standard_normal((out, inner), dtype=np.float32)
    ours = np.asarray(jax.jit(cpu_matmul.small_matmul)(jnp.asarray(x), jnp.asarray(weight)))
    reference = x.astype(np.float64) @ weight.T.astype(np.float64)
    # float32 rounding: the many-row tiles sum each output along `inner` in one chain (measured
    # up to 1.4e-6 of the largest output at inner 1536); a misplaced row or column is off by O(1).
    assert np.abs(ours - reference).max() <= 1e-5 * np.abs(reference).max()


@needs_kernels
def test_the_kernel_serves_few_float32_rows_and_xla_the_rest():
    weight = jnp.ones((8, 32), jnp.float32)
    assert cpu_matmul.serves(jnp.ones((1, 16, 32)), weight)  # 16 rows
    assert cpu_matmul.serves(jnp.ones((48, 32)), weight)
    assert not cpu_matmul.serves(jnp.ones((49, 32)), weight)
    assert not cpu_matmul.serves(jnp.ones((2, 32), jnp.bfloat16), weight.astype(jnp.bfloat16))
    x = jnp.arange(3 * 2 * 32, dtype=jnp.float32).reshape(3, 2, 32) / 100
    np.testing.assert_allclose(np.asarray(matmul_transposed(x, weight)),
                               np.asarray(x) @ np.ones((32, 8), np.float32), rtol=1e-6)


def test_without_the_kernels_xla_computes_it(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "available", lambda backend=None: False)
    x, weight = jnp.ones((2, 32)), jnp.ones((8, 32))
    assert not cpu_matmul.serves(x, weight)
    np.testing.assert_allclose(np.asarray(matmul_transposed(x, weight)), np.full((2, 8), 32.0))


@needs_kernels
def test_the_kernel_names_its_row_limit():
    with pytest.raises(ValueError, match="small_matmul serves 1 to 48 rows of x, got 49"):
        cpu_matmul.small_matmul(jnp.ones((49, 32)), jnp.ones((8, 32)))
