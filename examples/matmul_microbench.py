"""Decode's and prefill's matmuls on CPU: XLA's dot over Hugging Face's [out, in] weights against
the C++ kernel over the same weights repacked into panels (folojax/ops/csrc/panel_matmul.cc),
for 1 to 1,024 rows, over SmolLM2-135M's fp32 weight shapes (30 layers of fused q/k/v, o, fused
gate/up and down, then the 49,152-row head): the rate each streams the weights at.

    python examples/matmul_microbench.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from folojax.ops import cpu_kernels, cpu_matmul

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def best_seconds(matmul, weights, rows: int, repeats: int = 5) -> float:
    inputs = {576: jnp.ones((rows, 576)), 1536: jnp.ones((rows, 1536))}
    step = jax.jit(lambda weights, a, b: [matmul(a if inner == 576 else b, w, out)
                                          for w, (out, inner) in zip(weights, SHAPES, strict=True)])
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
    dense = [rng.standard_normal(shape, dtype=np.float32) for shape in SHAPES]
    weights = [jnp.asarray(w) for w in dense]
    panels = [jnp.asarray(cpu_matmul.pack_panels(w)) for w in dense]
    total = sum(w.nbytes for w in dense)
    for rows in (1, 2, 4, 8, 16, 32, 48, 64, 256, 1024):
        xla = best_seconds(lambda x, w, out: x @ w.T, weights, rows)
        kernel = best_seconds(cpu_matmul.panel_matmul, panels, rows)
        flops = 2 * rows * total / 4
        print(f"rows={rows:>4}: XLA {total / xla / 1e9:5.1f} GB/s {flops / xla / 1e9:4.0f} GF/s "
              f"({xla * 1e3:6.1f} ms), kernel {total / kernel / 1e9:5.1f} GB/s "
              f"{flops / kernel / 1e9:4.0f} GF/s ({kernel * 1e3:6.1f} ms)", flush=True)


if __name__ == "__main__":
    main()
