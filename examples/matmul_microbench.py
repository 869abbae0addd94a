"""Decode's matmuls on CPU: XLA's dot against the C++ kernel (folojax/ops/csrc/matmul.cc), for
1 to 48 rows, over SmolLM2-135M's fp32 weight shapes (30 layers of fused q/k/v, o, fused
gate/up and down, then the 49,152-row head): the rate each streams the weights at.

    python examples/matmul_microbench.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from folojax.ops import cpu_kernels, cpu_matmul

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def best_seconds(matmul, weights, rows: int, repeats: int = 7) -> float:
    inputs = {576: jnp.ones((rows, 576)), 1536: jnp.ones((rows, 1536))}
    step = jax.jit(lambda weights, a, b: [matmul(a if w.shape[1] == 576 else b, w)
                                          for w in weights])
    jax.block_until_ready(step(weights, inputs[576], inputs[1536]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(weights, inputs[576], inputs[1536]))
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    if not cpu_kernels.load():
        raise SystemExit("the C++ kernels did not build here")
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for shape in SHAPES]
    total = sum(w.nbytes for w in weights)
    for rows in (1, 2, 4, 8, 16, 24, 32, 48):
        xla = best_seconds(lambda x, w: x @ w.T, weights, rows)
        kernel = best_seconds(cpu_matmul.small_matmul, weights, rows)
        print(f"rows={rows:>2}: XLA {total / xla / 1e9:5.1f} GB/s ({xla * 1e3:5.1f} ms), "
              f"kernel {total / kernel / 1e9:5.1f} GB/s ({kernel * 1e3:5.1f} ms)")


if __name__ == "__main__":
    main()
